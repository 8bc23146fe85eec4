"""A run's directory: whether it can take a run, whether it belongs to this config, what --restart
deletes, and a lock so that one run at a time trains in it.

A workdir belongs to one config: its ``config.json`` is compared with the new config (minus
cosmetic fields such as ``log_every_steps``) and any difference is refused, because resuming
someone else's checkpoint would silently mix two runs. The one exception: with the same
positive ``schedule_steps`` a run may grow its ``num_train_steps``, continuing the shorter run
exactly (the grid search's promoted trials). A finished workdir is not trained again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections

from effnet_jax.configs import to_steps
from effnet_jax.data import fingerprint
from effnet_jax.errors import UserError, one_line
from effnet_jax.training import metrics
from effnet_jax.training.metrics import write_json as write_json  # a run's JSON files: the one atomic, strict writer

# Config fields that change how a run reports or saves itself, not what it computes: a workdir
# may be resumed with other values (as experiments.study's trial identity).
COSMETIC_FIELDS = ("progress_bar", "log_every_steps", "compile_cache_dir", "checkpoint_every_steps",
                   "keep_checkpoints", "eval_every_steps", "eval_ema", "save_weights")
# Where a wsd run keeps the state at its cooldown's start: what a longer wsd run of the config continues.
STABLE_CHECKPOINTS = "stable_checkpoints"
# The fingerprint of the data the run read (effnet_jax.data.fingerprint), beside its config.json.
DATA_FILE = "data.json"
# What --restart deletes (and nothing else the user may keep in the workdir).
RUN_FILES = ("checkpoints", STABLE_CHECKPOINTS, "tensorboard", "metrics.jsonl", "result.json", "config.json",
             "weights.safetensors", "ema_weights.safetensors", DATA_FILE)


def check_workdir(workdir: str) -> None:
    """Refuse a workdir that cannot hold a run (a file, /proc, read-only), before anything is written."""
    if "://" in workdir:  # a remote file system (gs://...): its own client reports
        return
    path = os.path.abspath(workdir)
    real = os.path.realpath(path)
    for virtual in ("/proc", "/sys"):
        if real == virtual or real.startswith(virtual + os.sep):
            raise UserError(f"--workdir {workdir} is under {virtual}, a virtual file system that cannot hold "
                            "checkpoints; choose a directory on a disk")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--workdir {workdir} is a file, not a directory")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--workdir {workdir} cannot be created: {existing} is a file, not a directory")
    readonly = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    if readonly or not os.access(existing, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if readonly else "is not writable (permission denied)"
        raise UserError(f"--workdir {workdir} cannot be written: {existing} {why}")


def make_workdir(workdir: str) -> None:
    """Create ``workdir`` and write (then delete) a probe file: the last check before the run writes."""
    path = os.path.abspath(workdir)
    created = []
    parent = path
    while not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    probe = os.path.join(path, f".write_test.{os.getpid()}.{jax.process_index()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok\n")
        os.remove(probe)
    except OSError as e:
        for d in created:  # deepest first: leave nothing behind
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise UserError(f"--workdir {workdir} cannot be written: {e.strerror or e}") from None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: config fields by their dotted names."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as config.json holds it (tuples as lists, non-finite floats as null)."""
    return json.loads(metrics.dumps(json.loads(config.to_json_best_effort())))


def config_fields(d: dict[str, Any]) -> dict[str, Any]:
    """A config (as JSON) by dotted field name, without the cosmetic fields."""
    return {k: v for k, v in flatten(d).items() if k.split(".")[0] not in COSMETIC_FIELDS}


def stored_fields(old: dict[str, Any]) -> dict[str, Any]:
    """A stored config's fields (``config_fields``), where it predates a field, that field's default."""
    from effnet_jax.configs import default

    return {**config_fields(_as_json(default.get_config())), **config_fields(old)}


def describe_differences(a: dict[str, Any], b: dict[str, Any], keys: list[str], limit: int = 5) -> list[str]:
    """'field a -> b' for ``keys`` (at most ``limit`` lines, then a count)."""
    lines = [f"{k} {a.get(k, '(unset)')} -> {b[k]}" for k in keys]
    return lines[:limit] + ([f"and {len(lines) - limit} more"] if len(lines) > limit else [])


def config_differences(old: dict[str, Any], new: ml_collections.ConfigDict, steps_per_epoch: int,
                       limit: int = 5) -> list[str]:
    """'field old -> new' for each non-cosmetic field of a workdir's config.json that ``new`` changes.

    A field missing from the old file (a workdir from before the field existed) counts as its
    default; one missing from the new config (a field since removed) is read by nothing.
    Longer training (num_train_steps / num_epochs) is no difference when both configs have the
    same positive schedule_steps (the new run continues the old one exactly), or when both are
    ``wsd`` runs over their own length (the new run continues the old one's constant phase from
    its stable checkpoint: ``forks``).
    """
    a, b, diff = _fields_and_diff(old, new)

    def steps(c: dict[str, Any]) -> int:
        return to_steps(c.get("num_train_steps", 0), c.get("num_epochs", 0), steps_per_epoch)

    same_schedule = b.get("schedule_steps", 0) > 0 and a.get("schedule_steps") == b["schedule_steps"]
    wsd = a.get("optimizer.schedule") == b.get("optimizer.schedule") == "wsd" and not a.get("schedule_steps") \
        and not b.get("schedule_steps")
    if diff and set(diff) <= {"num_train_steps", "num_epochs"} and (same_schedule or wsd) and steps(b) >= steps(a):
        diff = []  # a longer run continuing this one
    return describe_differences(a, b, diff, limit)


def _fields_and_diff(old: dict[str, Any], new: ml_collections.ConfigDict
                     ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The old and new configs' fields and the names of those that differ."""
    b, a = config_fields(_as_json(new)), stored_fields(old)
    if a.get("num_train_steps") and b.get("num_train_steps"):  # num_epochs is read by neither run
        b = {k: v for k, v in b.items() if k != "num_epochs"}
    return a, b, sorted(k for k in b if a.get(k, _UNSET) != b[k])


def forks(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """Whether ``workdir`` holds another (shorter) wsd run of this config, which this one continues from its
    stable checkpoint: that run's own checkpoints (past its cooldown's start) are then no state of this run."""
    if config.optimizer.schedule != "wsd":
        return False
    old = read_json(os.path.join(workdir, "config.json"), workdir)
    return old is not None and bool(_fields_and_diff(old, config)[2])


_UNSET = object()


def read_json(path: str, workdir: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"workdir {workdir} has an unreadable {os.path.basename(path)} ({one_line(e)[:100]}); "
                        "use a new --workdir or pass --restart to start over") from None


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the finished checkpoints in ``workdir`` (orbax writes a temporary name, then renames)."""
    try:
        return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    except OSError:
        return []


def stable_steps(workdir: str) -> list[int]:
    """Steps of the finished stable checkpoints (a wsd run's state at its cooldown's start) in ``workdir``."""
    try:
        return sorted(int(d) for d in os.listdir(os.path.join(workdir, STABLE_CHECKPOINTS)) if d.isdigit())
    except OSError:
        return []


def check_resume(config: ml_collections.ConfigDict, workdir: str, total_steps: int, steps_per_epoch: int,
                 data: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Check that ``workdir`` can take this run (UserError if not); its stored result if already finished.

    Writes nothing. Refused: a workdir of a different config (``config_differences``), one whose
    ``data.json`` says it read other data than ``data`` (the source's fingerprint) says this run reads,
    or one whose checkpoint is past this config's last step.
    """
    check_workdir(workdir)
    if "://" in workdir:
        return None
    old = read_json(os.path.join(workdir, "config.json"), workdir)
    if old is not None:
        diff = config_differences(old, config, steps_per_epoch)
        if diff:
            raise UserError(f"workdir {workdir} was started with a different config: {', '.join(diff)}; "
                            "use a new --workdir or pass --restart to start over")
    stored_data = read_json(os.path.join(workdir, DATA_FILE), workdir) if data else None
    if isinstance(stored_data, dict) and (changed := fingerprint.describe_change(stored_data, data)):
        raise UserError(f"workdir {workdir} was trained on other data: {changed}; "
                        "use a new --workdir or pass --restart to start over")
    steps = checkpoint_steps(workdir)
    if steps and steps[-1] > total_steps:
        raise UserError(f"workdir {workdir} holds a checkpoint at step {steps[-1]}, past this config's "
                        f"{total_steps} steps; use a new --workdir or pass --restart to start over")
    result = read_json(os.path.join(workdir, "result.json"), workdir)
    if isinstance(result, dict) and result.get("status") == "ok" and result.get("steps") == total_steps:
        return result
    return None


def clear_workdir(workdir: str) -> None:
    """Delete a run's files from ``workdir`` (checkpoints, metrics, results, weights); keep anything else."""
    for name in RUN_FILES:
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


LOCK_FILE = ".lock"


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
    """Hold ``workdir``'s lock while a run trains in it: a second run is refused with one line naming
    the holder. An flock, so the kernel releases it when the holder dies however it dies (a stale lock
    file is never an obstacle). Remote workdirs (``gs://``) are not locked."""
    if "://" in workdir:
        yield
        return
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.read(fd, 200).decode(errors="replace").strip()
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise UserError(f"workdir {workdir} is in use by another run ({holder or 'unknown process'}); wait for it "
                        "to finish, stop it, or use another --workdir") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 .encode())
        yield
    finally:
        os.close(fd)
