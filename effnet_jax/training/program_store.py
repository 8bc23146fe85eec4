"""Compiled train and eval steps on disk, found by what they were built from rather than by their HLO.

JAX's persistent compilation cache keys a program by its lowered HLO, so a process that finds a program
there has still traced and lowered it (most of a warm start: docs/benchmarks.md). This store keys the
serialized executable by everything the trainer bakes into it (the trainer's ``program_key``), the input
signature, the library versions, the backend and XLA flags, and a digest of the source files that build
the steps, so a process that finds it loads it without tracing.

It lives beside JAX's cache (``<compilation cache dir>/programs``) and is on exactly when that cache is:
``effnet_jax.compile_cache.enable`` turns on both. Only executables XLA compiled in this process are
stored: one that JAX loaded from its own cache serializes without some of its kernels (jax 0.10.2,
XLA:CPU: the reloaded program fails with "Function ... not found"), so a program JAX's cache already held
when the store began is not stored until that entry is gone. A file that cannot be read is deleted and
the program compiled (``forget`` does the same for one that loads but fails to run); writes are atomic,
so concurrent workers never see half a file. Like JAX's cache, a stored file is machine code that this
process runs: the directory must be the user's own.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import inspect
import os
import pickle
import tempfile
import threading
import zlib
from collections.abc import Callable
from typing import Any

import jax
from jax.experimental import serialize_executable

from effnet_jax import provenance

SUBDIR = "programs"
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # effnet_jax/, every layer
# jax options that change what a trace produces without appearing in the trainer's config
JAX_OPTIONS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
               "jax_threefry_partitionable", "jax_numpy_dtype_promotion", "jax_numpy_rank_promotion")


_THREAD = threading.local()  # this thread's counts of JAX's persistent-cache events
_REQUEST, _HIT = "/jax/compilation_cache/compile_requests_use_cache", "/jax/compilation_cache/cache_hits"
_LISTENING = threading.Lock()
_listener_added = False


def _count(event: str, **_: Any) -> None:
    if event in (_REQUEST, _HIT):
        setattr(_THREAD, event, getattr(_THREAD, event, 0) + 1)


def compile_fresh(lowered: Any) -> tuple[Any, bool]:
    """``lowered.compile()``, and whether XLA compiled it here (True): JAX asked its persistent cache and
    missed. False when the cache had it, or when JAX's in-memory cache answered without asking (the
    executable may be one loaded from disk earlier): such an executable must not be stored (above)."""
    global _listener_added
    with _LISTENING:
        if not _listener_added:
            jax.monitoring.register_event_listener(_count)
            _listener_added = True
    before = [getattr(_THREAD, e, 0) for e in (_REQUEST, _HIT)]
    compiled = lowered.compile()
    requests, hits = (getattr(_THREAD, e, 0) - b for e, b in zip((_REQUEST, _HIT), before))
    return compiled, requests > 0 and hits == 0


def directory() -> str | None:
    """Where programs are stored: under JAX's persistent cache directory, or None while that cache is off."""
    cache = jax.config.jax_compilation_cache_dir
    return os.path.join(cache, SUBDIR) if cache else None


@functools.cache
def _source_digest(*files: str) -> str:
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            h.update(os.path.relpath(path, _PACKAGE).encode() + b"\0" + f.read())
    return h.hexdigest()


@functools.cache
def _package_files() -> tuple[str, ...]:
    return tuple(sorted(glob.glob(os.path.join(_PACKAGE, "**", "*.py"), recursive=True)))


@functools.cache
def _environment() -> str:
    """What a compiled program depends on besides its code and config that a process cannot change: the
    package versions, the device and CPU, and the XLA flags (read once, when the backend starts)."""
    device = jax.devices()[0]
    env = {**provenance.versions(), "backend": jax.default_backend(),
           "platform_version": device.client.platform_version, "device_kind": device.device_kind,
           "cpu": provenance.cpu_model(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", "")}
    return repr(sorted(env.items()))


def _code_files(fn: Callable) -> tuple[str, ...] | None:
    """This package's sources and ``fn``'s module: the code a program is built from. None for a function
    defined inside another (a closure's captured values are not in any key)."""
    if "<locals>" in getattr(fn, "__qualname__", "<locals>"):
        return None
    package = _package_files()
    try:
        own = inspect.getsourcefile(fn)
    except TypeError:
        return None
    return tuple(package) + ((os.path.abspath(own),) if own and os.path.abspath(own) not in package else ())


def program_id(program_key: tuple[Any, ...], make_eval_step: Callable) -> str | None:
    """The stored programs' shared key prefix for a trainer program, or None where it cannot be keyed
    safely or the program spans several processes (the store is then not used)."""
    files = _code_files(make_eval_step)
    if files is None or jax.process_count() > 1:  # a multi-host program is built by every host together
        return None
    options = {name: str(getattr(jax.config, name, None)) for name in JAX_OPTIONS}  # settable at any time
    parts = [*(p for p in program_key if isinstance(p, str)),
             f"{make_eval_step.__module__}.{make_eval_step.__qualname__}", _environment(),
             repr(sorted(options.items())), _source_digest(*files)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _path(pid: str, kind: str, signature: Any) -> str | None:
    root = directory()
    if root is None:
        return None
    digest = hashlib.sha256(f"{kind}\n{signature!r}".encode()).hexdigest()[:24]
    return os.path.join(root, f"{kind}-{pid[:40]}-{digest}.pkl.z")


def load(pid: str | None, kind: str, signature: Any) -> Any | None:
    """The stored executable of ``kind`` ("train" / "eval") for this program and input signature, loaded
    onto this process's devices; None when there is none or it cannot be read."""
    path = _path(pid, kind, signature) if pid else None
    if path is None or not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            blob, in_tree, out_tree = pickle.loads(zlib.decompress(f.read()))
        return serialize_executable.deserialize_and_load(blob, in_tree, out_tree)
    except Exception:  # noqa: BLE001 - a truncated or foreign file: compile instead, and forget it
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None


def save(pid: str | None, kind: str, signature: Any, compiled: Any) -> bool:
    """Store ``compiled`` for the next process; False (nothing written) when the store is off or the
    executable cannot be serialized."""
    path = _path(pid, kind, signature) if pid else None
    if path is None:
        return False
    try:
        data = zlib.compress(pickle.dumps(serialize_executable.serialize(compiled)), 1)  # ~1/5 the size
    except (ValueError, NotImplementedError, TypeError, pickle.PicklingError, jax.errors.JaxRuntimeError):
        return False  # e.g. XLA:CPU cannot serialize a sort's comparator ("`LessThan` is not serializable")
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:  # a full or read-only disk: the next process compiles, as without the store
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return False
    return True


def forget(pid: str | None) -> int:
    """Delete every stored executable of this program (one that loaded but does not run: the next process
    compiles it again); returns how many files went."""
    root = directory()
    if not pid or root is None:
        return 0
    gone = 0
    for path in glob.glob(os.path.join(root, f"*-{pid[:40]}-*.pkl.z")):
        with contextlib.suppress(OSError):
            os.unlink(path)
            gone += 1
    return gone
