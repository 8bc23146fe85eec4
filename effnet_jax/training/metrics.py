"""Metrics to a JSON-lines file and TensorBoard event files, without TensorFlow.

The JSON lines are the source of truth (the grid search and tests read them); the
event files are for TensorBoard. On resume, rows past the restored step are dropped
so a killed-and-resumed run logs each step once. Non-finite numbers (a diverged loss)
are written as ``null``: bare ``NaN`` is not JSON and breaks strict readers.

TensorBoard's writer imports TensorFlow whenever it is installed, which costs seconds and
prints TensorFlow's C++ banners to stderr; unless TensorFlow is already loaded (the tfds
data path), it is told to use its own TensorFlow-free stub instead.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import types
from typing import Any


def _use_tensorboard_stub() -> None:
    """Make ``tensorboard.compat.tf`` the bundled stub (TensorBoard's own 'no_tensorflow' switch)."""
    if "tensorflow" not in sys.modules:
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


class MetricsWriter:
    """Appends {"step": s, **scalars} rows to metrics.jsonl and scalars to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        truncate_jsonl(self.path, keep=lambda row: row.get("step", 0) <= resume_step)
        if "://" not in str(workdir):  # remote file systems need TensorFlow's gfile
            _use_tensorboard_stub()
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._tb = EventFileWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _py(v) for k, v in scalars.items()}}
        append_jsonl(self.path, row)
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float))]
        self._tb.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _py(v: Any) -> Any:
    try:
        return v.item()
    except AttributeError:
        return v


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf), nested in dicts / lists, as None (JSON null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    item = getattr(obj, "item", None)  # numpy / jax scalars
    if callable(item) and getattr(obj, "ndim", None) == 0:
        return finite_or_none(item())
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (never bare NaN / Infinity): non-finite floats become null."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def atomic_write(path: str, text: str) -> None:
    """Write ``text`` to a temporary name and rename it: a reader, or a kill mid-write, never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented strict JSON (NaN / inf as null), written atomically."""
    atomic_write(path, dumps(obj, indent=2, default=str) + "\n")


def append_jsonl(path: str, row: dict[str, Any]) -> None:
    """Append one row with a single write + fsync: a kill leaves at most a torn last line."""
    data = (dumps(row) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Complete rows of a JSON-lines file; a torn (unterminated) last line is ignored."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def truncate_jsonl(path: str, keep: Any = lambda row: True) -> list[dict[str, Any]]:
    """Rewrite ``path`` atomically with the complete rows that ``keep`` accepts."""
    if not os.path.exists(path):
        return []
    rows = [r for r in read_jsonl(path) if keep(r)]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return rows
