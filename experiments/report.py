"""Outputs shared by every experiment: JSON / CSV files, text tables, TensorBoard hparams.

Each file is written whole to a temporary name and renamed, so a reader (or a process
killed mid-write) never leaves half a file; non-finite numbers are written as null.
"""

from __future__ import annotations

import csv
import datetime
import io
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from effnet_jax.errors import UserError
from effnet_jax.training.metrics import atomic_write
from effnet_jax.training.metrics import write_json as write_json  # the experiments' JSON outputs: the one writer


def write_csv(path: str, rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, buf.getvalue())


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


Column = tuple[str, int, Callable[[Any], str]]  # header, width, cell (of one row: a dict or a typed record)


def format_table(rows: Sequence[Any], columns: Sequence[Column], notes: Sequence[str] = ()) -> str:
    """A fixed-width text table (headers right-aligned like the cells), then note lines."""
    head = " ".join(f"{h:>{w}}" for h, w, _ in columns)
    lines = [head, "-" * len(head)]
    lines += [" ".join(f"{cell(r):>{w}}" for _, w, cell in columns) for r in rows]
    return "\n".join([*lines, *notes])


def score_text(mean: float | None, half: float | None = None) -> str:
    """'0.8123±0.0210' (mean ± 95% half-width), the mean alone when no interval exists, '-' without a mean."""
    if mean is None:
        return "-"
    return f"{mean:.4f}" + (f"±{half:.4f}" if half is not None else "")


def write_hparams(workdir: str, rows: Sequence[Mapping[str, Any]], hparams: Sequence[str],
                  metrics: Sequence[str]) -> None:
    """One TensorBoard run per trial with its hparams and final metrics (the HParams dashboard)."""
    # tensorboard imports TensorFlow when it is installed: keep its C++ banners off our output
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import summary_v2 as hp
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    root = os.path.join(workdir, "tensorboard_hparams")
    for r in rows:
        path = os.path.join(root, str(r["trial_id"]))
        if os.path.isdir(path):
            continue
        writer = EventFileWriter(path)
        values = {k: r[k] if isinstance(r.get(k), (int, float, bool)) else str(r.get(k) or "")
                  for k in hparams}
        writer.add_event(Event(wall_time=time.time(), step=0, summary=hp.hparams_pb(values, trial_id=r["trial_id"])))
        scalars = [Summary.Value(tag=k, simple_value=float(r[k])) for k in metrics
                   if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        writer.add_event(Event(wall_time=time.time(), step=0, summary=Summary(value=scalars)))
        writer.close()


def parse_floats(text: str, flag: str) -> list[float]:
    """'1,2,3' -> [1.0, 2.0, 3.0]; a mistake is one line naming the flag."""
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise UserError(f"{flag} takes finite numbers >= 0, got {text!r}")
    return values
