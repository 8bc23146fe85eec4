"""The one trial runner: planned training runs as Optuna trials on a durable, shared storage.

An experiment (the grid search, the scaling study, the fidelity study) plans a list of
``TrialPlan``s and calls ``run``; every process that runs the same command against the
same storage works the same queue:

* **Storage.** ``open_study`` opens an Optuna study on a journal file in the workdir (the
  default: no server, safe for several processes, replayed on restart) or on any Optuna RDB
  URL (``sqlite:///...``, ``postgresql://...``), so machines without a shared disk share one
  experiment by running the same command against the same URL. The study keeps the
  *identity* of its trials (the trainer config minus cosmetic fields): a rerun with another
  one is refused with one line naming the difference, never mixed in.
* **Exactly once.** Each plan is enqueued as a WAITING trial whose user attribute ``key``
  names it; a worker claims one by moving it to RUNNING, which the storage grants to one
  process only. The canonical trial of a key is its lowest-numbered trial that has not
  failed, so a trial enqueued twice by racing planners runs once (the later copy is failed
  as a duplicate when claimed).
* **Dead workers.** A running trial records its owner (host, pid, process start time) and a
  heartbeat every ``HEARTBEAT_S``. A trial whose owner is gone (same host: the pid is dead;
  elsewhere: no heartbeat for ``GRACE_S``) is failed and enqueued again; the new attempt
  trains in the same trial directory, so the trainer resumes it from its last checkpoint.
* **States.** COMPLETE: a score. PRUNED: finished without one for a reason that a rerun
  would repeat (diverged). FAIL: worker died, was interrupted, or raised; a later run of
  the experiment tries that key again.

Trial attributes hold what a results row held before: ``attrs`` (candidate, seed, rung...)
and ``result`` (the trainer's final metrics); ``report`` turns them into tables and files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from effnet_jax import rundir
from effnet_jax.errors import UserError
from effnet_jax.metrics import finite_or_none

HEARTBEAT_S = 30.0
GRACE_S = 600.0  # a heartbeat older than this marks a remote worker dead
POLL_S = 2.0
RESULT_FIELDS = (
    "status", "reason", "val_top1", "val_top5", "val_loss", "ema_val_top1", "ema_val_top5", "train_loss",
    "resolution", "width", "depth", "blocks", "params", "macs", "num_classes", "dataset", "batch_size", "steps",
    "epochs", "wall_time_s", "compile_s", "train_img_per_s",
)


@dataclasses.dataclass(frozen=True)
class TrialPlan:
    """One planned training run."""

    key: str  # unique in the study
    config: ml_collections.ConfigDict  # the trainer config
    attrs: Mapping[str, Any]  # what the report shows: candidate, seed, rung, family, ...
    directory: str = ""  # the trial's directory under workdir/trials ("" = key); runs of one model
    # at growing budgets share one, so a longer run continues the shorter one's checkpoint
    keep_checkpoint: bool = False  # keep the checkpoint when done (a later, longer run continues it)


# ----------------------------------------------------------------------- storage

def storage_for(url: str | None, workdir: str) -> Any:
    """An Optuna storage: a journal file in ``workdir`` by default, else an RDB URL or a journal path."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if not url:
        os.makedirs(workdir, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(os.path.join(workdir, "study.journal")))
    if "://" not in url:  # a path: a journal file, e.g. on a shared (NFS) disk
        os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    if url.startswith("postgresql://") and not _has_module("psycopg2") and _has_module("psycopg"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]  # SQLAlchemy's psycopg 3 dialect
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except ImportError as e:
        raise UserError(f"--storage={url}: missing database driver ({e}); for PostgreSQL: "
                        "pip install -e '.[postgres]'") from None
    except Exception as e:  # sqlalchemy's OperationalError / ArgumentError: a bad URL or no server
        raise UserError(f"--storage={url}: cannot open the storage: {_first_line(e)}") from None


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What makes two trials with the same key comparable: the trainer config minus cosmetic fields."""
    d = json.loads(config.to_json_best_effort())
    return {k: v for k, v in d.items() if k not in rundir.COSMETIC_FIELDS}


def differences(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 5) -> list[str]:
    """'key old -> new' for each field of ``new`` that ``old`` holds otherwise, read as a workdir's config is
    (``rundir.stored_fields``: a field ``old`` predates counts as its default, one ``new`` lacks is read by
    nothing)."""
    a, b = rundir.stored_fields(dict(old)), rundir.config_fields(dict(new))
    return rundir.describe_differences(a, b, [k for k in sorted(b) if k not in a or a[k] != b[k]], limit)


def open_study(storage: Any, name: str, ident: Mapping[str, Any], where: str, sampler: Any = None) -> Any:
    """Create or load the study ``name``; refuse one that was started with another identity."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True,
                                sampler=sampler)
    ident = json.loads(json.dumps(ident))  # as stored: tuples become lists
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", ident)
        stored = optuna.load_study(study_name=name, storage=storage).user_attrs["identity"]  # a racing creator's
    diff = differences(stored, ident) if stored != ident else []
    if diff:
        raise UserError(f"study {name!r} in {where} was started with a different trial config: "
                        f"{'; '.join(diff)}. Use a new --workdir (or --study_name), or rerun with the original "
                        "config")
    return study


# ------------------------------------------------------------------------ owners

def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc), so a reused pid is not mistaken for it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def _owner_alive(owner: Mapping[str, Any] | None, heartbeat: float | None, now: float,
                 started: float | None = None) -> bool:
    if not owner:  # claimed, owner not written yet (or its worker died between the two): give it the grace
        last = heartbeat if heartbeat is not None else started
        return last is not None and now - last < GRACE_S
    if owner.get("host") == socket.gethostname():
        start = _process_start(int(owner["pid"]))
        return bool(start) and start == owner.get("start")
    return heartbeat is not None and now - heartbeat < GRACE_S


class _Heartbeat:
    """Records ``heartbeat`` on the running trial every HEARTBEAT_S from a daemon thread."""

    def __init__(self, study: Any, trial_id: int):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(study, trial_id), daemon=True)
        self._thread.start()

    def _beat(self, study: Any, trial_id: int) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                study._storage.set_trial_user_attr(trial_id, "heartbeat", time.time())
            except Exception:  # finished meanwhile, or the storage hiccuped: the next beat tries again
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------- running

def _canonical(trials: Sequence[Any], key: str) -> list[Any]:
    return [t for t in trials if t.user_attrs.get("key") == key]


def _state_name(t: Any) -> str:
    return t.state.name


def enqueue_missing(study: Any, plans: Sequence[TrialPlan]) -> int:
    """Queue every plan that has no trial except failed ones; returns how many were queued."""
    live = {t.user_attrs.get("key") for t in study.get_trials(deepcopy=False) if _state_name(t) != "FAIL"}
    queued = 0
    for p in plans:
        if p.key not in live:
            study.enqueue_trial({}, user_attrs={"key": p.key, "attrs": finite_or_none(dict(p.attrs))})
            queued += 1
    return queued


def release_dead(study: Any, reason: str = "worker died") -> None:
    """Fail and requeue the running trials whose worker is gone (after the caller stopped its workers)."""
    _fail_stale(study, study.get_trials(deepcopy=False), lambda m: None, reason)


def _fail_stale(study: Any, trials: Sequence[Any], log: Callable[[str], None], reason: str = "worker died") -> None:
    """Fail RUNNING trials whose worker is gone and queue them again (they resume from their checkpoint)."""
    import optuna

    now = time.time()
    for t in trials:
        if _state_name(t) != "RUNNING" or "key" not in t.user_attrs:
            continue
        started = t.datetime_start.timestamp() if t.datetime_start else None
        if _owner_alive(t.user_attrs.get("owner"), t.user_attrs.get("heartbeat"), now, started):
            continue
        try:
            study._storage.set_trial_user_attr(t._trial_id, "reason", reason)
            if not study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL):
                continue
        except Exception:  # another process failed it first
            continue
        keep = {k: v for k, v in t.user_attrs.items() if k in ("key", "attrs", "sampled")}
        study.enqueue_trial(dict(t.params), user_attrs={**keep, "retry_of": t.number})
        log(f"trial {t.user_attrs['key']} (#{t.number}) lost its worker; queued again, it resumes from its "
            "checkpoint")


def _claim(study: Any, trials: Sequence[Any], order: Mapping[str, int]) -> Any | None:
    """Move one WAITING trial of ours to RUNNING (the storage grants it to one process); plan order first."""
    import optuna

    waiting = sorted((t for t in trials if _state_name(t) == "WAITING" and t.user_attrs.get("key") in order),
                     key=lambda t: (order[t.user_attrs["key"]], t.number))
    for t in waiting:
        try:
            if study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.RUNNING):
                return t
        except Exception:  # finished by another process meanwhile (a duplicate failed)
            continue
    return None


def _is_duplicate(study: Any, t: Any) -> bool:
    """A lower-numbered trial of the same key that has not failed exists: it is the canonical one."""
    key = t.user_attrs["key"]
    return any(o.user_attrs.get("key") == key and o.number < t.number and _state_name(o) != "FAIL"
               for o in study.get_trials(deepcopy=False))


def _done(trials: Sequence[Any], key: str) -> bool:
    mine = _canonical(trials, key)
    return bool(mine) and not any(_state_name(t) in ("WAITING", "RUNNING") for t in mine)


def run(study: Any, plans: Sequence[TrialPlan], workdir: str, train_fn: Callable[..., dict[str, Any]],
        metric: str, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Work the queue until every plan has a finished trial (run by this or any other process).

    Returns {key: row} for the plans; a row is the trial's attrs, its result and its state.
    ``train_fn(config, trial_dir)`` trains one trial (``effnet_jax.trainer.train_and_evaluate``).
    """
    import optuna

    order = {p.key: i for i, p in enumerate(plans)}
    by_key = {p.key: p for p in plans}
    enqueue_missing(study, plans)
    while True:
        trials = study.get_trials(deepcopy=False)
        if all(_done(trials, k) for k in order):
            return {k: row_of(latest(trials, k)) for k in order}
        _fail_stale(study, trials, log)
        t = _claim(study, study.get_trials(deepcopy=False), order)
        if t is None:
            time.sleep(POLL_S)  # the rest is running elsewhere
            continue
        if _is_duplicate(study, t):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            continue
        plan = by_key[t.user_attrs["key"]]
        _run_one(study, t, plan, workdir, train_fn, metric, log)


def _run_one(study: Any, t: Any, plan: TrialPlan, workdir: str, train_fn: Callable[..., dict[str, Any]],
             metric: str, log: Callable[[str], None]) -> None:
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError

    storage = study._storage
    try:
        storage.set_trial_user_attr(t._trial_id, "owner", _owner())
        storage.set_trial_user_attr(t._trial_id, "heartbeat", time.time())
        _record_params(storage, t, plan.attrs)
    except UpdateFinishedTrialError:  # another process judged it stale and queued it again: that copy runs
        return
    directory = os.path.join(workdir, "trials", plan.directory or plan.key)
    resumed = checkpoint_step(directory)
    if resumed:
        storage.set_trial_user_attr(t._trial_id, "resumed_from_step", resumed)
    log(f"trial {plan.key} (#{t.number})" + (f" from its step-{resumed} checkpoint" if resumed else "") + " ...")
    beat = _Heartbeat(study, t._trial_id)
    start = time.time()
    try:
        result = train_fn(plan.config, directory)
    except UserError:
        beat.stop()
        _tell(study, t, {"status": "failed", "reason": "invalid config"}, optuna.trial.TrialState.FAIL)
        raise
    except KeyboardInterrupt:
        beat.stop()
        _tell(study, t, {"status": "interrupted", "reason": "interrupted"}, optuna.trial.TrialState.FAIL)
        raise
    except Exception as e:  # a broken trial is a result, not the end of the experiment
        result = {"status": "failed", "reason": _first_line(e)[:300], "wall_time_s": time.time() - start}
    beat.stop()
    row = {k: result.get(k) for k in RESULT_FIELDS}
    if row["status"] == "diverged":
        row["reason"] = "non-finite training loss"
    score = row.get(metric)
    if row["status"] == "ok" and isinstance(score, (int, float)) and math.isfinite(score):
        _tell(study, t, row, optuna.trial.TrialState.COMPLETE, float(score))
    elif row["status"] == "failed":
        _tell(study, t, row, optuna.trial.TrialState.FAIL)
    else:
        _tell(study, t, row, optuna.trial.TrialState.PRUNED)
    if not plan.keep_checkpoint:
        drop_checkpoints(directory)
    log(f"  {row['status']}: {metric} {score if score is None else round(score, 4)}, "
        f"{row.get('wall_time_s') or 0:.1f} s")


def run_sampled(study: Any, n_trials: int, propose: Callable[[Any], TrialPlan | None], workdir: str,
                train_fn: Callable[..., dict[str, Any]], metric: str, log: Callable[[str], None] = print
                ) -> list[dict[str, Any]]:
    """Model-based proposals: ``n_trials`` trials (over every process), each a point that the study's sampler
    suggests and ``propose(trial)`` turns into a plan (None: infeasible, pruned untrained). Returns their rows."""
    import optuna

    while True:
        trials = study.get_trials(deepcopy=False)
        _fail_stale(study, trials, log)
        live = [t for t in trials if t.user_attrs.get("sampled") and _state_name(t) != "FAIL"]
        pending = [t for t in live if _state_name(t) in ("WAITING", "RUNNING")]
        if len(live) >= n_trials:
            if not pending:
                return [row_of(t) for t in live if "key" in t.user_attrs]
            if not any(_state_name(t) == "WAITING" for t in pending):
                time.sleep(POLL_S)  # the last ones run elsewhere
                continue
        t = study.ask()  # a queued retry of a sampled trial first (its params fixed), else the sampler's point
        study._storage.set_trial_user_attr(t._trial_id, "sampled", True)
        plan = propose(t)
        if plan is None:
            study.tell(t, state=optuna.trial.TrialState.PRUNED)
            continue
        done = [o for o in trials if o.user_attrs.get("key") == plan.key and _state_name(o) in ("COMPLETE", "PRUNED")]
        study._storage.set_trial_user_attr(t._trial_id, "key", plan.key)
        study._storage.set_trial_user_attr(t._trial_id, "attrs", finite_or_none(dict(plan.attrs)))
        if done:  # the sampler proposed a point it has already seen (after rounding): its result stands
            _tell(study, t, done[-1].user_attrs.get("result") or {}, done[-1].state, done[-1].value)
            continue
        _run_one(study, t, plan, workdir, train_fn, metric, log)


def _record_params(storage: Any, t: Any, attrs: Mapping[str, Any]) -> None:
    """The plan's numbers as the trial's params, so optuna-dashboard can plot them (labels stay user attrs:
    a categorical param may not change its choices between trials)."""
    from optuna.distributions import FloatDistribution

    have = set(t.params)
    for k, v in attrs.items():
        if k in have:
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            storage.set_trial_param(t._trial_id, k, float(v), FloatDistribution(float(v), float(v)))


def _tell(study: Any, t: Any, row: Mapping[str, Any], state: Any, value: float | None = None) -> None:
    study._storage.set_trial_user_attr(t._trial_id, "result", finite_or_none(dict(row)))
    study.tell(t.number, value if state.name == "COMPLETE" else None, state=state, skip_if_finished=True)


def checkpoint_step(directory: str) -> int:
    """The latest checkpointed step in a trial directory (0: none), where its run will resume."""
    try:
        return max((int(d) for d in os.listdir(os.path.join(directory, "checkpoints")) if d.isdigit()), default=0)
    except OSError:
        return 0


def drop_checkpoints(directory: str) -> None:
    """Delete a finished trial's checkpoints (its weights are not what an experiment keeps)."""
    shutil.rmtree(os.path.join(directory, "checkpoints"), ignore_errors=True)


def latest(trials: Sequence[Any], key: str) -> Any:
    """The trial that speaks for ``key``: its latest finished attempt."""
    mine = [t for t in _canonical(trials, key) if _state_name(t) not in ("WAITING", "RUNNING")]
    ok = [t for t in mine if _state_name(t) in ("COMPLETE", "PRUNED")]
    return max(ok or mine, key=lambda t: t.number)


def row_of(t: Any) -> dict[str, Any]:
    """A results row: the plan's attrs, the trainer's result, the key and the trial's number and state."""
    result = dict(t.user_attrs.get("result") or {})
    result.setdefault("status", {"FAIL": "failed"}.get(_state_name(t), _state_name(t).lower()))
    return {"trial_id": t.user_attrs["key"], "trial_number": t.number, "state": _state_name(t),
            **t.user_attrs.get("attrs", {}), **{k: result.get(k) for k in RESULT_FIELDS}}


def rows(study: Any) -> list[dict[str, Any]]:
    """One row per key in the study (its latest finished attempt), in the order the keys first appeared."""
    trials = study.get_trials(deepcopy=False)
    keys = list(dict.fromkeys(t.user_attrs["key"] for t in trials if "key" in t.user_attrs))
    return [row_of(latest(trials, k)) for k in keys if _done(trials, k)]


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def define_flags(fv: Any, study_name: str) -> None:
    """--storage and --study_name, the same for every experiment's CLI."""
    from absl import flags

    flags.DEFINE_string("storage", None, "Optuna storage: an RDB URL (sqlite:///..., postgresql://...) or a journal "
                        "file path shared by every machine; default: WORKDIR/study.journal", flag_values=fv)
    flags.DEFINE_string("study_name", study_name, "study name in the storage", flag_values=fv)
