"""What a run's data is: a fingerprint of each split a source reads, and what changed between two.

A source's ``fingerprint`` is JSON: {split: summary}. Image folders: the file count, total bytes,
images per class and a sha256 of the sorted (relative path, size) list (a stat per file, no reads);
IDX files: each file's sha256; the embedded digits: a sha256 of its arrays; TFDS: the dataset's
version and its record files' names and sizes. The trainer keeps it in the workdir (``data.json``)
beside ``config.json``: a rerun after the data changed is refused with one line saying what changed,
as a changed config is, because resuming on other data would silently mix two datasets in one run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

Fingerprint = dict[str, dict[str, Any]]


def _sha256(lines: Iterable[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()


def listing(root: str, by_label: dict[str, list[str]], size: Callable[[str], int] = os.path.getsize
            ) -> dict[str, Any]:
    """One folder split: files, bytes, images per class and the sha256 of its (relative path, size) list."""
    entries = sorted((os.path.relpath(p, root), size(p)) for paths in by_label.values() for p in paths)
    return {"files": len(entries), "bytes": sum(s for _, s in entries),
            "classes": {label: len(paths) for label, paths in sorted(by_label.items())},
            "sha256": _sha256(f"{path}\t{n}" for path, n in entries)}


def file_digests(paths: Iterable[str]) -> dict[str, Any]:
    """Files read whole (IDX): {"files": {basename: sha256}}."""
    out = {}
    for path in paths:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(chunk)
        out[os.path.basename(path)] = h.hexdigest()
    return {"files": dict(sorted(out.items()))}


def array_digest(*arrays: Any) -> str:
    """sha256 of arrays' shapes, dtypes and bytes (an embedded dataset)."""
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype.str}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def digest(fingerprint: Fingerprint) -> str:
    """One sha256 for a whole fingerprint (what an experiment's identity can hold)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)  # unreachable


def _split_change(name: str, a: dict[str, Any], b: dict[str, Any]) -> str:
    """'split: what changed' for one split's two summaries."""
    parts = []
    if a.get("files") != b.get("files"):
        files = (a.get("files"), b.get("files"))
        if all(isinstance(f, int) for f in files):
            parts.append(f"{files[0]} -> {files[1]} images")
        else:  # {basename: sha256}
            fa, fb = files[0] or {}, files[1] or {}
            changed = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
            parts.append(f"{', '.join(changed[:3])}{' and more' if len(changed) > 3 else ''} changed")
    if a.get("bytes") != b.get("bytes") and isinstance(a.get("bytes"), int) and isinstance(b.get("bytes"), int):
        parts.append(f"{_size(a['bytes'])} -> {_size(b['bytes'])}")
    ca, cb = a.get("classes") or {}, b.get("classes") or {}
    classes = [f"class {k!r} {ca.get(k, 0)} -> {cb.get(k, 0)}" for k in sorted(set(ca) | set(cb))
               if ca.get(k) != cb.get(k)]
    parts += classes[:3] + ([f"{len(classes) - 3} more classes"] if len(classes) > 3 else [])
    for key in sorted(set(a) | set(b)):
        if key not in ("files", "bytes", "classes", "sha256") and a.get(key) != b.get(key):
            parts.append(f"{key} {a.get(key)} -> {b.get(key)}")
    if not parts:  # same counts and sizes: names or single sizes moved, or the bytes themselves
        parts.append("other file names, sizes or contents (same totals)")
    return f"{name}: {', '.join(parts)}"


def describe_change(old: Fingerprint, new: Fingerprint, limit: int = 3) -> str | None:
    """What changed from ``old`` to ``new`` on one line ("train: 1200 -> 1201 images, ..."); None if nothing did.

    Only splits both read are compared: a split that only one of them reads (another eval split) is
    the config's difference, which the config check reports."""
    changed = [_split_change(k, old[k], new[k]) for k in sorted(set(old) & set(new)) if old[k] != new[k]]
    if not changed:
        return None
    return "; ".join(changed[:limit]) + (f"; and {len(changed) - limit} more splits" if len(changed) > limit else "")
