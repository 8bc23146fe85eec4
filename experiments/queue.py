"""The trial queue: planned training runs as trials of a shared study (``experiments.study``), each run once.

An experiment (the grid search, the scaling study, the fidelity study) plans a list of ``TrialPlan``s and
calls ``work``; every process that runs the same command against the same storage works the same queue:

* **Exactly once.** Each plan is enqueued as a WAITING trial whose user attribute ``key`` names it; a
  worker claims one by moving it to RUNNING, which the storage grants to one process only. The canonical
  trial of a key is its lowest-numbered trial that has not failed, so a trial enqueued twice by racing
  planners runs once (the later copy is failed as a duplicate when claimed).
* **Dead workers.** A running trial records its owner (host, pid, process start time) and a heartbeat
  every ``HEARTBEAT_S``. A trial whose owner is gone (same host: the pid is dead; elsewhere: no heartbeat
  for ``GRACE_S``) is failed and enqueued again; the new attempt trains in the same trial directory, so
  the trainer resumes it from its last checkpoint.
* **States.** COMPLETE: a score. PRUNED: finished without one for a reason that a rerun would repeat
  (diverged). FAIL: worker died, was interrupted, or raised; a later run of the experiment tries that key
  again.
* **Programs.** A worker process keeps the programs it compiled (``Worker.programs``, the trainer's
  ``Programs``): it claims the trials of networks it trained already first and, with ``--compile_ahead``,
  compiles the next trial's program on a thread while the current one trains.

Trial attributes hold a results row: ``attrs`` (candidate, seed, rung...) and ``result`` (the trainer's
final metrics); ``row_of`` reads it back, ``experiments.report`` turns rows into tables and files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ml_collections

from effnet_jax import errors
from effnet_jax.errors import UserError
from effnet_jax.training import rundir
from effnet_jax.training.metrics import finite_or_none
from experiments.study import Study, TrialFinished, first_line

if TYPE_CHECKING:
    from effnet_jax.training.programs import Programs

HEARTBEAT_S = 30.0
GRACE_S = 600.0  # a heartbeat older than this marks a remote worker dead
POLL_S = 2.0
RESULT_FIELDS = (
    "status", "reason", "val_top1", "val_top5", "val_loss", "ema_val_top1", "ema_val_top5", "train_loss",
    "resolution", "width", "depth", "blocks", "params", "macs", "num_classes", "dataset", "batch_size", "steps",
    "epochs", "wall_time_s", "compile_s", "train_img_per_s",
)
# --compile_ahead: while a trial trains, a thread builds and compiles the program of the trial this process will
# claim next. "auto": on accelerators, where the host CPU idles while the device trains; a CPU's cores are
# already busy compiling or training.
AHEAD_MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class TrialPlan:
    """One planned training run."""

    key: str  # unique in the study
    config: ml_collections.ConfigDict  # the trainer config
    attrs: Mapping[str, Any]  # what the report shows: candidate, seed, rung, family, ...
    directory: str = ""  # the trial's directory under workdir/trials ("" = key); runs of one model
    # at growing budgets share one, so a longer run continues the shorter one's checkpoint
    keep_checkpoint: bool = False  # keep the checkpoint when done (a later, longer run continues it)


def _new_programs() -> Programs:
    from effnet_jax.training.programs import Programs

    return Programs()


@dataclasses.dataclass(frozen=True)
class Worker:
    """This process as a worker of the queue: ONE ``Programs`` for the whole process, which the queue consults
    (claim order, compile-ahead) and the trainer trains with, so a program compiled ahead or by an earlier trial
    is the one the next trial finds; and the --compile_ahead mode (``AHEAD_MODES``)."""

    programs: Programs = dataclasses.field(default_factory=_new_programs)
    compile_ahead: str = "auto"
    deadline: float | None = None  # time.time() past which this worker claims no new trial (a time budget)

    def train(self, config: ml_collections.ConfigDict, directory: str) -> dict[str, Any]:
        """``trainer.train_and_evaluate`` with this process's programs: the ``train_fn`` of ``work``."""
        from effnet_jax.training import trainer

        return trainer.train_and_evaluate(config, directory, programs=self.programs)

    def work(self, study: Study, plans: Sequence[TrialPlan], workdir: str, metric: str,
             log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
        """``work`` with this worker's trainer, programs and compile-ahead mode."""
        return work(study, plans, workdir, self.train, metric, log, programs=self.programs,
                    compile_ahead=self.compile_ahead, deadline=self.deadline)

    def work_sampled(self, study: Study, n_trials: int, propose: Callable[[Any], TrialPlan | None], workdir: str,
                     metric: str, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
        """``work_sampled`` with this worker's trainer and programs."""
        return work_sampled(study, n_trials, propose, workdir, self.train, metric, log, programs=self.programs)


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


# ------------------------------------------------------------------------- queue

def _canonical(trials: Sequence[Any], key: str) -> list[Any]:
    return [t for t in trials if t.user_attrs.get("key") == key]


def _state_name(t: Any) -> str:
    return t.state.name


def enqueue_missing(study: Study, plans: Sequence[TrialPlan]) -> int:
    """Queue every plan that has no trial except failed ones; returns how many were queued."""
    live = {t.user_attrs.get("key") for t in study.get_trials() if _state_name(t) != "FAIL"}
    queued = 0
    for p in plans:
        if p.key not in live:
            study.enqueue({}, {"key": p.key, "attrs": finite_or_none(dict(p.attrs))})
            queued += 1
    return queued


def release_dead(study: Study, reason: str = "worker died") -> None:
    """Fail and requeue the running trials whose worker is gone (after the caller stopped its workers)."""
    _fail_stale(study, study.get_trials(), lambda m: None, reason)


def _fail_stale(study: Study, trials: Sequence[Any], log: Callable[[str], None], reason: str = "worker died") -> None:
    """Fail RUNNING trials whose worker is gone and queue them again (they resume from their checkpoint)."""
    now = time.time()
    for t in trials:
        if _state_name(t) != "RUNNING" or "key" not in t.user_attrs:
            continue
        started = t.datetime_start.timestamp() if t.datetime_start else None
        if _owner_alive(t.user_attrs.get("owner"), t.user_attrs.get("heartbeat"), now, started):
            continue
        try:
            study.set_attr(t, "reason", reason)
            if not study.set_state(t, "FAIL"):
                continue
        except Exception:  # another process failed it first
            continue
        _requeue(study, t)
        log(f"trial {t.user_attrs['key']} (#{t.number}) lost its worker; queued again, it resumes from its "
            "checkpoint")


def _requeue(study: Study, t: Any) -> None:
    """Queue ``t``'s plan again (after failing it): the new attempt resumes from its checkpoint."""
    keep = {k: v for k, v in t.user_attrs.items() if k in ("key", "attrs", "sampled")}
    study.enqueue(dict(t.params), {**keep, "retry_of": t.number})


def _claim(study: Study, trials: Sequence[Any], plans: Sequence[TrialPlan], programs: Programs) -> Any | None:
    """Move one WAITING trial of ours to RUNNING (the storage grants it to one process); plan order first,
    after the trials of a network this process has trained already (its program is still compiled here) or is
    compiling ahead.

    A plan whose directory an earlier plan shares (a longer run continuing a shorter one) waits until
    that one is done: one run at a time in a directory, the shorter first.
    """
    order = {p.key: i for i, p in enumerate(plans)}
    blocked, seen = set(), set()
    for p in plans:
        directory = p.directory or p.key
        if directory in seen:
            blocked.add(p.key)
        if not is_done(trials, p.key):
            seen.add(directory)
    mine = {p.key for p in plans if programs.holds(p.config)}
    waiting = sorted((t for t in trials if _state_name(t) == "WAITING" and t.user_attrs.get("key") in order
                      and t.user_attrs["key"] not in blocked),
                     key=lambda t: (t.user_attrs["key"] not in mine, order[t.user_attrs["key"]], t.number))
    for t in waiting:
        try:
            if study.set_state(t, "RUNNING"):
                return t
        except Exception:  # finished by another process meanwhile (a duplicate failed)
            continue
    return None


def _is_duplicate(study: Study, t: Any) -> bool:
    """A lower-numbered trial of the same key that has not failed exists: it is the canonical one."""
    key = t.user_attrs["key"]
    return any(o.user_attrs.get("key") == key and o.number < t.number and _state_name(o) != "FAIL"
               for o in study.get_trials())


def is_done(trials: Sequence[Any], key: str) -> bool:
    """``key``'s trials are all finished (each worker waits for this, whoever trains them)."""
    mine = _canonical(trials, key)
    return bool(mine) and not any(_state_name(t) in ("WAITING", "RUNNING") for t in mine)


def work(study: Study, plans: Sequence[TrialPlan], workdir: str, train_fn: Callable[..., dict[str, Any]],
         metric: str, log: Callable[[str], None] = print, programs: Programs | None = None,
         compile_ahead: str = "auto", deadline: float | None = None) -> dict[str, dict[str, Any]]:
    """Work the queue until every plan has a finished trial (trained by this or any other process), or until
    ``deadline`` (``time.time()``): then no new trial is claimed, and the rows are those of the finished plans.

    Returns {key: row} for the plans; a row is the trial's attrs, its result and its state.
    ``train_fn(config, trial_dir)`` trains one trial with ``programs``, this process's one ``Programs``
    (``Worker.train``: ``trainer.train_and_evaluate(..., programs=programs)``). Without ``programs``, the
    claim order groups this call's networks only and nothing is compiled ahead (``train_fn`` would not find it).
    """
    ahead = programs is not None and ahead_enabled(compile_ahead)
    programs = _new_programs() if programs is None else programs
    order = {p.key: i for i, p in enumerate(plans)}
    by_key = {p.key: p for p in plans}
    enqueue_missing(study, plans)
    while True:
        trials = study.get_trials()
        if all(is_done(trials, k) for k in order):
            rows = {k: row_of(latest(trials, k)) for k in order}
            unscored = [k for k, r in rows.items() if r.get("status") == "ok" and r.get(metric) is None]
            if unscored and metric.startswith("ema_"):  # trials of a search that ranked on val_* (trial_config)
                raise UserError(f"trial {unscored[0]} in {workdir} did not evaluate the EMA weights (its search "
                                f"ranked on another metric); search.metric={metric} needs a new --workdir")
            return rows
        if deadline is not None and time.time() >= deadline:
            done = [k for k in order if is_done(trials, k)]
            log(f"time budget reached: {len(order) - len(done)} of {len(order)} planned trials not finished here "
                "are left out")
            return {k: row_of(latest(trials, k)) for k in done}
        _fail_stale(study, trials, log)
        t = _claim(study, study.get_trials(), plans, programs)
        if t is None:
            time.sleep(POLL_S)  # the rest is running elsewhere
            continue
        if _is_duplicate(study, t):
            study.tell(t, "FAIL")
            continue
        plan = by_key[t.user_attrs["key"]]
        if ahead:
            _start_ahead(study.get_trials(), plans, plan, programs, log)
        _train_one(study, t, plan, workdir, train_fn, metric, log, programs)


def ahead_enabled(mode: str) -> bool:
    """--compile_ahead ``mode``: "on", "off", or "auto" (on where the default backend is not the CPU)."""
    if mode == "auto":
        import jax

        return jax.default_backend() != "cpu"
    return mode == "on"


def _start_ahead(trials: Sequence[Any], plans: Sequence[TrialPlan], current: TrialPlan, programs: Programs,
                 log: Callable[[str], None]) -> None:
    """Compile, on a thread, the program of the first waiting plan (in claim order) whose program this process
    has neither trained nor built: the trial it will most likely claim after ``current``. One at a time, besides
    ``current``'s own build (which the trial is about to wait for)."""
    if programs.ahead_busy(except_config=current.config):
        return
    order = {p.key: i for i, p in enumerate(plans)}
    own = programs.group(current.config)
    waiting = sorted((t for t in trials if _state_name(t) == "WAITING" and t.user_attrs.get("key") in order),
                     key=lambda t: (order[t.user_attrs["key"]], t.number))
    by_key = {p.key: p for p in plans}
    nxt = next((p for p in (by_key[t.user_attrs["key"]] for t in waiting)
                if programs.group(p.config) != own and not programs.holds(p.config)), None)
    if nxt is None:
        return
    programs.start_ahead(nxt.config, log, label=nxt.key)  # logs "compiling ahead: <key>"


def _train_one(study: Study, t: Any, plan: TrialPlan, workdir: str, train_fn: Callable[..., dict[str, Any]],
               metric: str, log: Callable[[str], None], programs: Programs) -> None:
    """Train the claimed trial ``t`` (its heartbeat beating meanwhile) and record its row and final state."""
    try:
        study.set_attr(t, "owner", _owner())
        study.set_attr(t, "heartbeat", time.time())
        study.record_params(t, plan.attrs)
    except TrialFinished:  # another process judged it stale and queued it again: that copy runs
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
    programs.trained(plan.config)
    try:  # the wait for an ahead-build too: a stop while waiting queues the trial again like one while training
        programs.wait_ahead(plan.config, log)
        result = train_fn(plan.config, directory)
    except UserError:
        beat.stop()
        _tell(study, t, {"status": "failed", "reason": "invalid config"}, "FAIL")
        raise
    except KeyboardInterrupt:  # stopped by a signal: queued again for whichever worker runs next
        beat.stop()
        study.set_attr(t, "reason", "interrupted")
        _tell(study, t, {"status": "interrupted", "reason": "interrupted"}, "FAIL")
        _requeue(study, t)
        raise
    except Exception as e:  # a broken trial is a result, not the end of the experiment; a full disk is
        if errors.storage_error(e) is not None:
            beat.stop()
            with contextlib.suppress(Exception):  # the study may live on the full disk too
                _tell(study, t, {"status": "failed", "reason": "disk full or read-only"}, "FAIL")
                _requeue(study, t)
            raise
        result = {"status": "failed", "reason": first_line(e)[:300], "wall_time_s": time.time() - start}
    beat.stop()
    row = {k: result.get(k) for k in RESULT_FIELDS}
    if isinstance(result.get("timings"), dict):  # seconds per phase (the trainer's), for the search's summary
        study.set_attr(t, "timings", finite_or_none(result["timings"]))
    if row["status"] == "diverged":
        row["reason"] = "non-finite training loss"
    score = row.get(metric)
    if row["status"] == "ok" and isinstance(score, (int, float)) and math.isfinite(score):
        _tell(study, t, row, "COMPLETE", float(score))
    elif row["status"] == "failed":
        _tell(study, t, row, "FAIL")
    else:
        _tell(study, t, row, "PRUNED")
    if not plan.keep_checkpoint:
        drop_checkpoints(directory)
    log(f"  {row['status']}: {metric} {score if score is None else round(score, 4)}, "
        f"{row.get('wall_time_s') or 0:.1f} s")


def work_sampled(study: Study, n_trials: int, propose: Callable[[Any], TrialPlan | None], workdir: str,
                 train_fn: Callable[..., dict[str, Any]], metric: str, log: Callable[[str], None] = print,
                 programs: Programs | None = None) -> list[dict[str, Any]]:
    """Model-based proposals: ``n_trials`` trials (over every process), each a point that the study's sampler
    suggests and ``propose(trial)`` turns into a plan (None: infeasible, pruned untrained). Returns their rows.
    ``programs``: as ``work``'s (nothing is compiled ahead: the next point is not known yet)."""
    programs = _new_programs() if programs is None else programs
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
        t = study.ask()  # a queued retry of a sampled trial first (its params fixed), else the sampler's
        study.set_attr(t, "sampled", True)
        plan = propose(t)
        if plan is None:
            study.tell(t, "PRUNED")
            continue
        done = [o for o in trials if o.user_attrs.get("key") == plan.key and _state_name(o) in ("COMPLETE", "PRUNED")]
        study.set_attr(t, "key", plan.key)
        study.set_attr(t, "attrs", finite_or_none(dict(plan.attrs)))
        if done:  # the sampler proposed a point it has already seen (after rounding): its result stands
            _tell(study, t, done[-1].user_attrs.get("result") or {}, _state_name(done[-1]), done[-1].value)
            continue
        _train_one(study, t, plan, workdir, train_fn, metric, log, programs)


def _tell(study: Study, t: Any, row: Mapping[str, Any], state: str, value: float | None = None) -> None:
    study.set_attr(t, "result", finite_or_none(dict(row)))
    study.tell(t, state, value, skip_if_finished=True)


# -------------------------------------------------------------------- checkpoints

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


# -------------------------------------------------------------------------- rows

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
