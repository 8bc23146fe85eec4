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

Trial attributes hold a results row: ``attrs`` (candidate, seed, rung...) and ``result`` (the
trainer's final metrics); ``report`` turns them into tables and files. Only Optuna's public API
is used (``Study``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from effnet_jax import errors, signals
from effnet_jax.errors import EXIT_USER_ERROR, Interrupted, UserError
from effnet_jax.training import rundir
from effnet_jax.training.metrics import finite_or_none

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

    if not url:
        os.makedirs(workdir, exist_ok=True)
        return _journal(os.path.join(workdir, "study.journal"))
    if "://" not in url:  # a path: a journal file, e.g. on a shared (NFS) disk
        os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
        return _journal(url)
    engine_url = url
    if url.startswith("postgresql://") and not _has_module("psycopg2") and _has_module("psycopg"):
        engine_url = "postgresql+psycopg://" + url[len("postgresql://"):]  # SQLAlchemy's psycopg 3 dialect
    try:
        return optuna.storages.RDBStorage(engine_url, engine_kwargs={"pool_pre_ping": True})
    except ImportError as e:
        raise UserError(f"--storage={redact(url)}: missing database driver ({e}); for PostgreSQL: "
                        "pip install -e '.[postgres]'") from None
    except Exception as e:  # sqlalchemy's OperationalError / ArgumentError: a bad URL or no server
        raise UserError(f"--storage={redact(url)}: cannot open the storage: {redact(_first_line(e))}") from None


def _journal(path: str) -> Any:
    """Optuna's journal file storage, after cutting off a record torn by a crash mid-write.

    Optuna's reader skips a torn last line, but its next write would be glued onto it and lost
    with it, and every later run would fail: so the torn bytes go (under the journal's own lock,
    while no other process writes). A file that is not a journal is one line saying what to do.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    if os.path.isfile(path) and os.path.getsize(path):
        lock = JournalFileSymlinkLock(path)
        lock.acquire()
        try:
            with open(path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.seek(0)
                    data = f.read()
                    keep = data.rfind(b"\n") + 1
                    f.truncate(keep)
                    print(f"{path} ended in a record torn by a crash ({len(data) - keep} bytes): removed it",
                          flush=True)
        finally:
            lock.release()
    try:
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path} is not a readable Optuna journal ({_first_line(e)}); move it aside and rerun to "
                        "start the study afresh (trial directories with checkpoints resume)") from None


_CREDENTIALS = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^:/@\s]*:)[^@\s]*@")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it masked (postgresql://user:***@host/db)."""
    return _CREDENTIALS.sub(r"\1***@", text)


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


@dataclasses.dataclass
class Study:
    """An Optuna study and its storage, reached only through Optuna's public API: the storage's
    ``set_trial_*`` calls address a trial by the id that ``get_trial_id_from_study_id_trial_number`` gives."""

    study: Any  # optuna.Study
    storage: Any  # optuna.storages.BaseStorage
    study_id: int
    _ids: dict[int, int] = dataclasses.field(default_factory=dict)

    @property
    def study_name(self) -> str:
        return self.study.study_name

    def get_trials(self) -> list[Any]:
        return self.study.get_trials(deepcopy=False)

    def trial_id(self, t: Any) -> int:
        if t.number not in self._ids:
            self._ids[t.number] = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, t.number)
        return self._ids[t.number]

    def set_attr(self, t: Any, key: str, value: Any) -> None:
        self.storage.set_trial_user_attr(self.trial_id(t), key, value)

    def set_state(self, t: Any, state: Any) -> bool:
        """Move ``t`` to ``state``; False if another process moved it first (the storage decides)."""
        return self.storage.set_trial_state_values(self.trial_id(t), state)


def open_study(storage: Any, name: str, ident: Mapping[str, Any], where: str, sampler: Any = None) -> Study:
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
        raise UserError(f"study {name!r} in {redact(where)} was started with a different trial config: "
                        f"{'; '.join(diff)}. Use a new --workdir (or --study_name), or rerun with the original "
                        "config")
    return Study(study, storage, storage.get_study_id_from_name(name))


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

    def __init__(self, study: Study, t: Any):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(study, t), daemon=True)
        self._thread.start()

    def _beat(self, study: Study, t: Any) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                study.set_attr(t, "heartbeat", time.time())
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
    live = {t.user_attrs.get("key") for t in study.get_trials() if _state_name(t) != "FAIL"}
    queued = 0
    for p in plans:
        if p.key not in live:
            study.study.enqueue_trial({}, user_attrs={"key": p.key, "attrs": finite_or_none(dict(p.attrs))})
            queued += 1
    return queued


def release_dead(study: Any, reason: str = "worker died") -> None:
    """Fail and requeue the running trials whose worker is gone (after the caller stopped its workers)."""
    _fail_stale(study, study.get_trials(), lambda m: None, reason)


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
            study.set_attr(t, "reason", reason)
            if not study.set_state(t, optuna.trial.TrialState.FAIL):
                continue
        except Exception:  # another process failed it first
            continue
        _requeue(study, t)
        log(f"trial {t.user_attrs['key']} (#{t.number}) lost its worker; queued again, it resumes from its "
            "checkpoint")


def _requeue(study: Study, t: Any) -> None:
    """Queue ``t``'s plan again (after failing it): the new attempt resumes from its checkpoint."""
    keep = {k: v for k, v in t.user_attrs.items() if k in ("key", "attrs", "sampled")}
    study.study.enqueue_trial(dict(t.params), user_attrs={**keep, "retry_of": t.number})


# The programs (``program_group``) this process has trained: the trainer keeps them compiled in memory.
_RAN_GROUPS: set[str] = set()
# Compile ahead (--compile_ahead): while this process trains one trial, a thread builds and compiles the program
# of the trial it will claim next (``trainer.compile_ahead``). "auto": on accelerators, where the host CPU idles
# while the device trains; a CPU's cores are already busy compiling or training. {program_group: its build}
COMPILE_AHEAD = "auto"
AHEAD_MODES = ("auto", "on", "off")
_AHEAD: dict[str, concurrent.futures.Future] = {}
NOT_IN_GROUP = ("seed", "num_train_steps", "num_epochs")


def program_group(config: ml_collections.ConfigDict) -> str:
    """What trials that may share one compiled program have in common: the trial identity without its seed
    and length (seeds and rungs of one network; the trainer's own key decides whether they do)."""
    return json.dumps({k: v for k, v in identity(config).items() if k not in NOT_IN_GROUP}, sort_keys=True,
                      default=str)


def _claim(study: Any, trials: Sequence[Any], plans: Sequence[TrialPlan]) -> Any | None:
    """Move one WAITING trial of ours to RUNNING (the storage grants it to one process); plan order first,
    after the trials of a network this process has trained already (its program is still compiled here).

    A plan whose directory an earlier plan shares (a longer run continuing a shorter one) waits until
    that one is done: one run at a time in a directory, the shorter first.
    """
    import optuna

    order = {p.key: i for i, p in enumerate(plans)}
    blocked, seen = set(), set()
    for p in plans:
        directory = p.directory or p.key
        if directory in seen:
            blocked.add(p.key)
        if not _done(trials, p.key):
            seen.add(directory)
    held = _RAN_GROUPS | _AHEAD.keys()  # programs this process has compiled, or is compiling ahead
    mine = {p.key for p in plans if program_group(p.config) in held}
    waiting = sorted((t for t in trials if _state_name(t) == "WAITING" and t.user_attrs.get("key") in order
                      and t.user_attrs["key"] not in blocked),
                     key=lambda t: (t.user_attrs["key"] not in mine, order[t.user_attrs["key"]], t.number))
    for t in waiting:
        try:
            if study.set_state(t, optuna.trial.TrialState.RUNNING):
                return t
        except Exception:  # finished by another process meanwhile (a duplicate failed)
            continue
    return None


def _is_duplicate(study: Any, t: Any) -> bool:
    """A lower-numbered trial of the same key that has not failed exists: it is the canonical one."""
    key = t.user_attrs["key"]
    return any(o.user_attrs.get("key") == key and o.number < t.number and _state_name(o) != "FAIL"
               for o in study.get_trials())


def _done(trials: Sequence[Any], key: str) -> bool:
    mine = _canonical(trials, key)
    return bool(mine) and not any(_state_name(t) in ("WAITING", "RUNNING") for t in mine)


def run(study: Any, plans: Sequence[TrialPlan], workdir: str, train_fn: Callable[..., dict[str, Any]],
        metric: str, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Work the queue until every plan has a finished trial (run by this or any other process).

    Returns {key: row} for the plans; a row is the trial's attrs, its result and its state.
    ``train_fn(config, trial_dir)`` trains one trial (``effnet_jax.training.trainer.train_and_evaluate``).
    """
    import optuna

    order = {p.key: i for i, p in enumerate(plans)}
    by_key = {p.key: p for p in plans}
    enqueue_missing(study, plans)
    while True:
        trials = study.get_trials()
        if all(_done(trials, k) for k in order):
            rows = {k: row_of(latest(trials, k)) for k in order}
            unscored = [k for k, r in rows.items() if r.get("status") == "ok" and r.get(metric) is None]
            if unscored and metric.startswith("ema_"):  # trials of a search that ranked on val_* (trial_config)
                raise UserError(f"trial {unscored[0]} in {workdir} did not evaluate the EMA weights (its search "
                                f"ranked on another metric); search.metric={metric} needs a new --workdir")
            return rows
        _fail_stale(study, trials, log)
        t = _claim(study, study.get_trials(), plans)
        if t is None:
            time.sleep(POLL_S)  # the rest is running elsewhere
            continue
        if _is_duplicate(study, t):
            study.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            continue
        plan = by_key[t.user_attrs["key"]]
        if ahead_enabled():
            _start_ahead(study.get_trials(), plans, plan, log)
        _run_one(study, t, plan, workdir, train_fn, metric, log)


def ahead_enabled() -> bool:
    """``COMPILE_AHEAD``: "on", "off", or "auto" (on where the default backend is not the CPU)."""
    if COMPILE_AHEAD == "auto":
        import jax

        return jax.default_backend() != "cpu"
    return COMPILE_AHEAD == "on"


def _start_ahead(trials: Sequence[Any], plans: Sequence[TrialPlan], current: TrialPlan,
                 log: Callable[[str], None]) -> None:
    """Compile, on a thread, the program of the first waiting plan (in claim order) whose program this process
    has neither trained nor built: the trial it will most likely claim after ``current``. One at a time, besides
    ``current``'s own build (which the trial is about to wait for)."""
    if any(not f.done() for g, f in _AHEAD.items() if g != program_group(current.config)):
        return
    order = {p.key: i for i, p in enumerate(plans)}
    skip = {program_group(current.config), *_RAN_GROUPS, *_AHEAD}
    waiting = sorted((t for t in trials if _state_name(t) == "WAITING" and t.user_attrs.get("key") in order),
                     key=lambda t: (order[t.user_attrs["key"]], t.number))
    by_key = {p.key: p for p in plans}
    nxt = next((by_key[t.user_attrs["key"]] for t in waiting
                if program_group(by_key[t.user_attrs["key"]].config) not in skip), None)
    if nxt is None:
        return
    from effnet_jax.training import trainer

    future: concurrent.futures.Future = concurrent.futures.Future()

    def build() -> None:
        try:
            future.set_result(trainer.compile_ahead(nxt.config))
        except BaseException as e:  # noqa: BLE001 - the trial then compiles for itself and meets the error
            future.set_exception(e)

    _AHEAD[program_group(nxt.config)] = future
    threading.Thread(target=build, name="effnet-compile-ahead", daemon=True).start()
    log(f"compiling ahead: {nxt.key}")


def _wait_ahead(plan: TrialPlan, log: Callable[[str], None]) -> None:
    """A trial whose program a compile-ahead thread is building waits for it instead of compiling it twice."""
    future = _AHEAD.get(program_group(plan.config))
    if future is None:
        return
    try:
        future.result()
    except Exception as e:  # noqa: BLE001
        log(f"  compile ahead failed ({_first_line(e)}): the trial compiles for itself")


def _run_one(study: Any, t: Any, plan: TrialPlan, workdir: str, train_fn: Callable[..., dict[str, Any]],
             metric: str, log: Callable[[str], None]) -> None:
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        study.set_attr(t, "owner", _owner())
        study.set_attr(t, "heartbeat", time.time())
        _record_params(study, t, plan.attrs)
    except UpdateFinishedTrialError:  # another process judged it stale and queued it again: that copy runs
        return
    directory = os.path.join(workdir, "trials", plan.directory or plan.key)
    resumed = checkpoint_step(directory)
    if rundir.forks(plan.config, directory):  # a longer wsd run: from the shorter one's stable state
        resumed = max(rundir.stable_steps(directory), default=0)
        if not resumed:  # dropped when a search ended, and a rerun (another rule, more rungs) promotes it
            rundir.clear_workdir(directory)  # the same run from scratch
    if resumed:
        study.set_attr(t, "resumed_from_step", resumed)
    log(f"trial {plan.key} (#{t.number})" + (f" from its step-{resumed} checkpoint" if resumed else "") + " ...")
    beat = _Heartbeat(study, t)
    start = time.time()
    _RAN_GROUPS.add(program_group(plan.config))
    try:
        _wait_ahead(plan, log)  # inside: a stop while waiting queues the trial again like one while training
        result = train_fn(plan.config, directory)
    except UserError:
        beat.stop()
        _tell(study, t, {"status": "failed", "reason": "invalid config"}, optuna.trial.TrialState.FAIL)
        raise
    except KeyboardInterrupt:  # stopped by a signal: queued again for whichever worker runs next
        beat.stop()
        study.set_attr(t, "reason", "interrupted")
        _tell(study, t, {"status": "interrupted", "reason": "interrupted"}, optuna.trial.TrialState.FAIL)
        _requeue(study, t)
        raise
    except Exception as e:  # a broken trial is a result, not the end of the experiment; a full disk is
        if errors.storage_error(e) is not None:
            beat.stop()
            with contextlib.suppress(Exception):  # the study may live on the full disk too
                _tell(study, t, {"status": "failed", "reason": "disk full or read-only"}, optuna.trial.TrialState.FAIL)
                _requeue(study, t)
            raise
        result = {"status": "failed", "reason": _first_line(e)[:300], "wall_time_s": time.time() - start}
    beat.stop()
    row = {k: result.get(k) for k in RESULT_FIELDS}
    if isinstance(result.get("timings"), dict):  # seconds per phase (the trainer's), for the search's summary
        study.set_attr(t, "timings", finite_or_none(result["timings"]))
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
        trials = study.get_trials()
        _fail_stale(study, trials, log)
        live = [t for t in trials if t.user_attrs.get("sampled") and _state_name(t) != "FAIL"]
        pending = [t for t in live if _state_name(t) in ("WAITING", "RUNNING")]
        if len(live) >= n_trials:
            if not pending:
                return [row_of(t) for t in live if "key" in t.user_attrs]
            if not any(_state_name(t) == "WAITING" for t in pending):
                time.sleep(POLL_S)  # the last ones run elsewhere
                continue
        t = study.study.ask()  # a queued retry of a sampled trial first (its params fixed), else the sampler's
        study.set_attr(t, "sampled", True)
        plan = propose(t)
        if plan is None:
            study.study.tell(t, state=optuna.trial.TrialState.PRUNED)
            continue
        done = [o for o in trials if o.user_attrs.get("key") == plan.key and _state_name(o) in ("COMPLETE", "PRUNED")]
        study.set_attr(t, "key", plan.key)
        study.set_attr(t, "attrs", finite_or_none(dict(plan.attrs)))
        if done:  # the sampler proposed a point it has already seen (after rounding): its result stands
            _tell(study, t, done[-1].user_attrs.get("result") or {}, done[-1].state, done[-1].value)
            continue
        _run_one(study, t, plan, workdir, train_fn, metric, log)


def _record_params(study: Study, t: Any, attrs: Mapping[str, Any]) -> None:
    """The plan's numbers as the trial's params, so optuna-dashboard can plot them (labels stay user attrs:
    a categorical param may not change its choices between trials)."""
    from optuna.distributions import FloatDistribution

    have = set(t.params)
    for k, v in attrs.items():
        if k in have:
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            study.storage.set_trial_param(study.trial_id(t), k, float(v), FloatDistribution(float(v), float(v)))


def _tell(study: Any, t: Any, row: Mapping[str, Any], state: Any, value: float | None = None) -> None:
    study.set_attr(t, "result", finite_or_none(dict(row)))
    study.study.tell(t.number, value if state.name == "COMPLETE" else None, state=state, skip_if_finished=True)


def checkpoint_step(directory: str) -> int:
    """The latest checkpointed step in a trial directory (0: none), where its run will resume."""
    try:
        return max((int(d) for d in os.listdir(os.path.join(directory, "checkpoints")) if d.isdigit()), default=0)
    except OSError:
        return 0


def drop_checkpoints(directory: str) -> None:
    """Delete a finished trial's checkpoints, stable ones too (its weights are not what an experiment keeps)."""
    for name in ("checkpoints", rundir.STABLE_CHECKPOINTS):
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


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
            **t.user_attrs.get("attrs", {}), **{k: result.get(k) for k in RESULT_FIELDS},
            "timings": t.user_attrs.get("timings")}


def phases(timings: Mapping[str, Any]) -> dict[str, float]:
    """A trial's seconds per phase from the trainer's ``timings``; the evaluation's wait for its step's compile
    counts as compile."""
    t = {k: v for k, v in timings.items() if isinstance(v, (int, float))}
    wait = t.get("eval_compile_wait_s", 0.0)
    return {"training steps": t.get("train_s", 0.0),
            "compile": sum(t.get(k, 0.0) for k in ("train_trace_s", "train_lower_s", "train_compile_s",
                                                     "train_load_s", "program_save_s")) + wait,
            "evaluation": t.get("eval_s", 0.0) - wait,
            "setup": t.get("prepare_s", 0.0) + t.get("build_s", 0.0) + t.get("restore_s", 0.0),
            "checkpoints": t.get("checkpoint_s", 0.0), "writing": t.get("write_s", 0.0)}


def phase_line(rows: Sequence[Mapping[str, Any]]) -> str:
    """Where the trials' time went, from their ``timings``: 'compile 41%, evaluation 9%, ...' of the summed
    wall time of the trials that report them (the rest: the first step's run, logging, the data)."""
    timed = [r for r in rows if isinstance(r.get("timings"), Mapping) and r.get("wall_time_s")]
    wall = sum(r["wall_time_s"] for r in timed)
    if wall <= 0:
        return ""
    per = [phases(r["timings"]) for r in timed]
    parts = [f"{name} {sum(p[name] for p in per) / wall:.0%}" for name in per[0]]
    hits = sum(r["timings"].get("program_cache") == "hit" for r in timed)
    loaded = sum(r["timings"].get("program_store") == "hit" for r in timed)
    return (f"trial time by phase ({len(timed)} trials, {wall:.0f} s): " + ", ".join(parts)
            + f"; {hits} reused a program compiled by an earlier trial in the same process, {loaded} loaded one"
            " an earlier process had compiled")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# ----------------------------------------------------------------- progress line

def progress_counts(trials: Sequence[Any]) -> tuple[int, int, int | None]:
    """(trials done, trials planned, the rung being worked) of a study, counting each planned key once
    (its retries and duplicates are one trial); the rung is the highest among the unfinished trials'."""
    keys = {t.user_attrs["key"] for t in trials if "key" in t.user_attrs}
    done = sum(_done(trials, k) for k in keys)
    keyed = [t for t in trials if "key" in t.user_attrs]
    active = [t for t in keyed if _state_name(t) in ("WAITING", "RUNNING")] or keyed
    rungs = [r for t in active if isinstance(r := (t.user_attrs.get("attrs") or {}).get("rung"), int)]
    return done, len(keys), max(rungs) if rungs else None


class ProgressLine:
    """One updating line on stderr (tqdm): trials done / planned, the current rung, elapsed time and an ETA.

    Read from the study every POLL_S on a daemon thread, so it counts the trials of every worker and machine.
    Entirely off (no thread, no output) when ``file`` is not a terminal: logs and CI stay clean.
    """

    def __init__(self, file: Any = None):
        from tqdm import tqdm

        # smoothing=0: the ETA from this run's mean pace (trials differ too much for a recent-rate estimate)
        self.bar = tqdm(total=0, file=file or sys.stderr, disable=None, unit="trial", dynamic_ncols=True,
                        leave=False, desc="search", mininterval=0, smoothing=0,
                        bar_format="{desc}: {n}/{total} trials{postfix} [{elapsed} elapsed, ETA {remaining}]")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False

    @property
    def enabled(self) -> bool:
        return not self.bar.disable

    def update(self, trials: Sequence[Any]) -> None:
        """Show the study's counts; trials already done when the line started count as its start, not its
        rate (the ETA is from this run's pace)."""
        done, planned, rung = progress_counts(trials)
        if not self.enabled:
            return
        if not self._started:
            self._started = True
            self.bar.reset(total=planned)
            self.bar.initial = self.bar.n = done
        self.bar.total = planned
        if rung is not None:
            self.bar.set_postfix_str(f"rung {rung}", refresh=False)
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        else:
            self.bar.refresh()

    def start(self, load: Callable[[], Sequence[Any] | None]) -> ProgressLine:
        """Poll ``load()`` (the study's trials; None: no study yet) until ``close``."""
        if self.enabled:
            self._thread = threading.Thread(target=self._poll, args=(load,), daemon=True)
            self._thread.start()
        return self

    def _poll(self, load: Callable[[], Sequence[Any] | None]) -> None:
        while not self._stop.wait(POLL_S):
            try:
                trials = load()
            except Exception:  # the storage hiccuped, or the study is being created: the next poll tries again
                continue
            if trials is not None:
                self.update(trials)

    def write(self, message: str) -> None:
        """A log line above the progress line (plain print when there is none)."""
        if self.enabled:
            self.bar.write(message, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(message, flush=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.bar.close()


_LINE: ProgressLine | None = None  # the search's progress line while ``serve`` runs (log lines go above it)


def _say(message: str) -> None:
    if _LINE is not None:
        _LINE.write(message)
    else:
        print(message, flush=True)


def _study_trials(storage: str | None, workdir: str, name: str) -> Callable[[], Sequence[Any] | None]:
    """A reader of the study's trials for the progress line: None until the study exists (it never creates
    a journal, so the experiment's own checks of a workdir stay first)."""
    held: list[Any] = []

    def load() -> Sequence[Any] | None:
        import optuna

        if not held:
            if not storage and not os.path.exists(os.path.join(workdir, "study.journal")):
                return None
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            try:
                held.append(optuna.load_study(study_name=name, storage=storage_for(storage, workdir)))
            except KeyError:  # not created yet
                return None
        return held[0].get_trials(deepcopy=False)

    return load


# ----------------------------------------------------------------- local workers

STOP_WAIT_S = 20.0  # how long stopped workers get to save their checkpoints before they are killed


def define_flags(fv: Any, study_name: str) -> None:
    """--storage, --study_name and the local worker flags, the same for every experiment's CLI."""
    from absl import flags

    flags.DEFINE_string("storage", None, "Optuna storage: an RDB URL (sqlite:///..., postgresql://...) or a journal "
                        "file path shared by every machine; default: WORKDIR/study.journal", flag_values=fv)
    flags.DEFINE_string("study_name", study_name, "study name in the storage", flag_values=fv)
    flags.DEFINE_integer("local_workers", 0, "worker processes on this machine (0: 2 on a CPU with >= 2 cores, one "
                         "per GPU / per devices_per_trial GPUs, 1 on TPU); XLA compiles on one core, so two workers "
                         "halve a CPU run. On a GPU each worker gets its own devices", flag_values=fv)
    flags.DEFINE_integer("devices_per_trial", 1, "GPUs per worker (each trial runs data-parallel on them)",
                         flag_values=fv)
    flags.DEFINE_enum("compile_ahead", "auto", AHEAD_MODES, "while a trial trains, compile the next trial's "
                      "program on a thread (auto: on accelerators, where the host CPU is otherwise idle)",
                      flag_values=fv)
    flags.DEFINE_bool("worker", False, "internal: run trials only, no report (a local worker)", flag_values=fv)


@dataclasses.dataclass
class Experiment:
    """What every experiment's ``main`` starts from: its config, flags, workdir and command line."""

    config: ml_collections.ConfigDict
    flags: Any
    workdir: str
    argv: list[str]
    module: str

    def serve(self, job: Callable[[Callable[[str], None], bool], Any],
              prepare: Callable[[Callable[[str], None]], Any] | None = None) -> Any:
        """``serve`` with this experiment's flags, workdir and trial identity."""
        return serve(self.flags, self.argv, self.module, self.workdir, identity(self.config.train), job, prepare)


def begin(argv: Sequence[str] | None, module: str, default_config: str, check: Callable[[Any], Any],
          define_extra: Callable[[Any], None] | None = None) -> Experiment:
    """Parse an experiment's flags (the runner's and ``define_extra``'s), enable the compilation cache, check
    the config (``check``) and the workdir before anything is written, and say where the results go."""
    from effnet_jax import cli
    from experiments import trials

    argv = list(sys.argv if argv is None else argv)
    name = module.rsplit(".", 1)[-1]

    def define(fv: Any) -> None:
        define_flags(fv, name)
        if define_extra is not None:
            define_extra(fv)

    config, fv = cli.parse_config_flags(argv, default_config, define)
    cli.enable_compile_cache(config.train.compile_cache_dir)
    global COMPILE_AHEAD
    COMPILE_AHEAD = fv.compile_ahead
    workdir = fv.workdir or trials.default_workdir(name)
    check(config)
    rundir.check_workdir(workdir)
    if not fv.worker:
        print(f"workdir: {workdir}", flush=True)
    return Experiment(config, fv, workdir, argv, module)


def worker_environments(fv: Any, backend: str, local_devices: int, cpus: int) -> list[dict[str, str]]:
    """One environment per local worker (its own GPUs on a GPU host); UserError for a count that cannot be."""
    if fv.local_workers < 0:
        raise UserError(f"--local_workers must be >= 0 (0: one per core or device), got {fv.local_workers}")
    if fv.devices_per_trial < 1:
        raise UserError(f"--devices_per_trial must be >= 1, got {fv.devices_per_trial}")
    if backend == "gpu":
        per = fv.devices_per_trial
        n = fv.local_workers or max(1, local_devices // per)
        if n * per > local_devices:
            raise UserError(f"{n} workers x {per} GPUs need {n * per} GPUs; this host has {local_devices}")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(str(i * per + k) for k in range(per))} for i in range(n)]
    if backend == "tpu":
        if fv.local_workers > 1:
            raise UserError("on TPU only one process can hold the chips: --local_workers must be 1 "
                            "(run one process per host against a shared --storage)")
        return [{}]
    n = fv.local_workers or min(2, cpus)
    if n > cpus:
        raise UserError(f"--local_workers={n} is more than this machine's {cpus} cores (each worker needs one to "
                        f"compile); use at most {cpus}, or share a --storage with other machines")
    return [{} for _ in range(n)]


def serve(fv: Any, argv: Sequence[str], module: str, workdir: str, ident: Mapping[str, Any],
          job: Callable[[Callable[[str], None], bool], Any],
          prepare: Callable[[Callable[[str], None]], Any] | None = None) -> Any:
    """Run an experiment the way its flags ask: ``job(log, write)`` in ``--local_workers`` processes on one
    storage, then here (which finishes what is left and, with ``write``, writes the report). ``prepare(log)``
    runs here first, alone on the machine, before any worker starts (timing networks, say).

    The storage is opened and checked once, here, before any worker starts. Ctrl-C or SIGTERM stops the
    workers (each saves its trial's checkpoint; one that does not within STOP_WAIT_S is killed), queues
    their trials again and raises ``Interrupted`` with the command that resumes.
    """
    if fv.worker:
        log = _prefixed_log
        try:
            return job(log, False)
        except KeyboardInterrupt as e:  # the parent says how to resume: a worker's stderr stays quiet
            log(f"stopped: {e}")
            _exit_now(signals.exit_code(getattr(e, "signum", signal.SIGINT)))
        except Exception as e:  # a mistake or a full disk: the parent meets it too, and says it once
            err = errors.storage_error(e)
            if not isinstance(e, UserError) and err is None:
                raise
            log(f"stopped: {e if err is None else errors.storage_message(err)}")
            _exit_now(EXIT_USER_ERROR)
    import jax

    prealloc = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # this process must not hold the GPUs its workers need
    try:
        envs = worker_environments(fv, jax.default_backend(), jax.local_device_count(), os.cpu_count() or 1)
    finally:
        if prealloc is None:
            os.environ.pop("XLA_PYTHON_CLIENT_PREALLOCATE")
        else:
            os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = prealloc
    where = fv.storage or workdir
    if fv.storage or os.path.exists(os.path.join(workdir, "study.journal")):  # one error line, before workers
        open_study(storage_for(fv.storage, workdir), fv.study_name, ident, where)  # (a new journal cannot fail)
    children: list[subprocess.Popen] = []
    global _LINE
    _LINE = ProgressLine().start(_study_trials(fv.storage, workdir, fv.study_name))
    try:
        if len(envs) > 1:
            if prepare is not None:
                prepare(_say)
            children = [_spawn_worker(module, argv, workdir, env) for env in envs]
            with signals.deferred():
                while any(c.poll() is None for c in children) and signals.requested() is None:
                    time.sleep(0.2)
            signals.check()
            failed = sum(c.returncode not in (0, EXIT_USER_ERROR) for c in children)
            if failed:
                print(f"warning: {failed} worker process(es) failed; this process finishes what they left",
                      file=sys.stderr, flush=True)
        return job(_say, True)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        _stop(children)
        release_dead(open_study(storage_for(fv.storage, workdir), fv.study_name, ident, where), "interrupted")
        cmd = redact(" ".join(["python -m", module, *argv[1:]]))
        raise Interrupted(f"{signals.describe(signum)}; finished trials are kept and the interrupted ones resume "
                          f"from their last checkpoints: rerun `{cmd}`", signum) from None
    finally:
        line, _LINE = _LINE, None
        line.close()


def _exit_now(code: int) -> None:
    """End a worker whose trial is already recorded, without the interpreter's shutdown (where orbax's
    writer threads, stopped mid-save, print tracebacks about a closed event loop)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _prefixed_log(message: str) -> None:
    print(f"[{os.getpid()}] {message}", flush=True)


def _stop(children: Sequence[subprocess.Popen]) -> None:
    """SIGTERM every live worker (each checkpoints its trial and queues it again), SIGKILL the ones still
    running after STOP_WAIT_S (their trials resume from their last periodic checkpoint)."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.time() + STOP_WAIT_S
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _spawn_worker(module: str, argv: Sequence[str], workdir: str, env: dict[str, str]) -> subprocess.Popen:
    """Another worker process on this machine, killed with us (Linux) so that no orphan trains on."""
    args = [a for a in argv[1:] if not a.startswith(("--workdir", "--local_workers", "--then_", "--worker"))]
    cmd = [sys.executable, "-m", module, *args, f"--workdir={workdir}", "--local_workers=1", "--worker"]

    def die_with_parent() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches us too: the parent stops us
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass

    with warnings.catch_warnings():  # jax warns on any fork; this one execs at once
        warnings.simplefilter("ignore", RuntimeWarning)
        # Under a progress line a worker's stdout comes through us too, so that its lines go above the line.
        piped = subprocess.PIPE if _LINE is not None and _LINE.enabled else None
        child = subprocess.Popen(cmd, preexec_fn=die_with_parent, env={**os.environ, **env}, stderr=subprocess.PIPE,
                                 stdout=piped, text=True, errors="replace")
    threading.Thread(target=_relay, args=(child, child.stderr, f"[{child.pid}] "), daemon=True).start()
    if piped:
        threading.Thread(target=_relay, args=(child, child.stdout, ""), daemon=True).start()
    return child


def _relay(child: subprocess.Popen, stream: Any, prefix: str) -> None:
    """A worker's stderr (or stdout), line by line, onto our stdout: stderr is the parent's, for its one
    error line."""
    for line in stream:
        _say(f"{prefix}{line.rstrip()}")
