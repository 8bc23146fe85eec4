"""What makes one machine's numbers differ from another's, recorded beside the numbers.

The same search, seeds and config gave different winners on two machines of one kind (float
rounding in the compiled programs): a result is only comparable with the library versions, the
accelerator, the CPU and the code that produced it. ``provenance()`` is written into every
trial's result.json (``trainer``) and the search's best.json.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from typing import Any

PACKAGES = ("jax", "jaxlib", "flax", "optax")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def provenance() -> dict[str, Any]:
    """{package versions, device kind and count, CPU model, this project's version and git commit}.

    The commit is None (never an error) outside a git checkout or without git; ``dirty`` says whether
    tracked files differ from it.
    """
    import jax

    from effnet_jax import __version__

    devices = jax.devices()
    return {**versions(), "device_kind": devices[0].device_kind if devices else None,
            "device_count": jax.device_count(), "platform": jax.default_backend(), "cpu": cpu_model(),
            "effnet_jax": __version__, **git_commit(ROOT)}


@functools.cache
def versions() -> dict[str, str | None]:
    """The installed versions of ``PACKAGES`` (None for one that is not installed)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


@functools.cache
def git_commit(root: str) -> dict[str, Any]:
    """{"commit": HEAD's hash, "dirty": bool} of the checkout at ``root``; None values when it is not one."""
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if not status.returncode else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what ``platform`` knows: part of a CPU device's identity."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
