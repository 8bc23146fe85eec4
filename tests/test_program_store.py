"""program_store.compile_fresh: only what XLA compiled in this process may be stored.

jax 0.10.2's XLA:CPU re-serializes an executable that JAX loaded from its persistent cache without some of its
kernels, and a program stored from one fails in the next process ("Function ... not found"). JAX's in-memory
cache can hand such an executable to a later compile of the same program without asking the persistent cache.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = """
import sys
import jax, jax.numpy as jnp
from effnet_jax import compile_cache
from effnet_jax.training import program_store
compile_cache.enable(sys.argv[1])
x = jnp.arange(64.0)
def f(x):
    return jnp.sin(x) * 2 + jnp.cos(x)
print([program_store.compile_fresh(jax.jit(f).trace(x).lower())[1] for _ in range(2)])
"""


@pytest.mark.slow
def test_only_a_program_xla_compiled_here_counts_as_fresh(tmp_path):
    def run():
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "cache")], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.split("\n")[-2]

    # first process: compiled (fresh), then the same program again from JAX's in-memory cache (not fresh)
    assert run() == "[True, False]"
    # second process: loaded from JAX's persistent cache, then from its in-memory cache: neither is fresh
    assert run() == "[False, False]"


def test_a_file_that_cannot_be_read_is_no_program_and_is_deleted(tmp_path, monkeypatch):
    """A file cut short (a full disk, a killed writer) or from elsewhere: load gives None (the trainer then
    compiles) and deletes it; a program that could not be keyed is never looked up."""
    from effnet_jax.training import program_store

    monkeypatch.setattr(program_store, "directory", lambda: str(tmp_path))
    path = program_store._path("ab" * 32, "train", ("signature",))
    with open(path, "wb") as f:
        f.write(b"x" * 1000)
    assert program_store.load("ab" * 32, "train", ("signature",)) is None
    assert not os.path.exists(path)
    assert program_store.load(None, "train", ()) is None and not program_store.save(None, "train", (), object())
