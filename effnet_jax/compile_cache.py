"""Persistent XLA compilation cache, so a restarted trainer skips recompiling.

A B0 train step takes seconds to compile on a small CPU; with the cache on disk a
second process loads it instead (measured in docs/benchmarks.md). JAX by default
only caches programs that took over a second to compile and skips tiny ones; we
cache everything, since a grid search compiles many small programs repeatedly. The trainer's
train and eval steps are also kept in ``program_store``, under this directory, loaded without tracing.
"""

from __future__ import annotations

import os

import jax


def enable(path: str | os.PathLike, min_compile_time_s: float = 0.0) -> str:
    """Turn on JAX's persistent compilation cache in ``path``; returns the directory."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
