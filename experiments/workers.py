"""Experiments as commands: one flag set, worker processes on this machine, and a clean stop.

Every experiment's ``main`` starts from ``begin`` (its flags, config check and workdir) and runs its job
through ``Experiment.serve``: ``--local_workers`` processes on this machine work the experiment's queue
(``experiments.queue``) on one storage (``experiments.study``), each with its own GPUs on a GPU host and
its own ``queue.Worker`` (the programs it keeps compiled); then the calling process finishes what is left
and writes the report. A progress line (tqdm, on a terminal only) counts the study's trials over every
worker and machine. Ctrl-C or SIGTERM stops the workers, queues their trials again and says how to resume.
"""

from __future__ import annotations

import dataclasses
import os
import signal
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
from experiments import queue
from experiments.study import existing, identity, open_study, redact, storage_for

STOP_WAIT_S = 20.0  # how long stopped workers get to save their checkpoints before they are killed


# ----------------------------------------------------------------- progress line

def progress_counts(trials: Sequence[Any]) -> tuple[int, int, int | None]:
    """(trials done, trials planned, the rung being worked) of a study, counting each planned key once
    (its retries and duplicates are one trial); the rung is the highest among the unfinished trials'."""
    keys = {t.user_attrs["key"] for t in trials if "key" in t.user_attrs}
    done = sum(queue.is_done(trials, k) for k in keys)
    keyed = [t for t in trials if "key" in t.user_attrs]
    active = [t for t in keyed if t.state.name in ("WAITING", "RUNNING")] or keyed
    rungs = [r for t in active if isinstance(r := (t.user_attrs.get("attrs") or {}).get("rung"), int)]
    return done, len(keys), max(rungs) if rungs else None



class ProgressLine:
    """One updating line on stderr (tqdm): trials done / planned, the current rung, elapsed time and an ETA.

    Read from the study every queue.POLL_S on a daemon thread, so it counts the trials of every worker and machine.
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
        while not self._stop.wait(queue.POLL_S):
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
        if not held:
            found = existing(storage, workdir, name)
            if found is None:
                return None
            held.append(found)
        return held[0].get_trials()

    return load


# ----------------------------------------------------------------- local workers

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
    flags.DEFINE_enum("compile_ahead", "auto", queue.AHEAD_MODES, "while a trial trains, compile the next trial's "
                      "program on a thread (auto: on accelerators, where the host CPU is otherwise idle)",
                      flag_values=fv)
    flags.DEFINE_bool("worker", False, "internal: run trials only, no report (a local worker)", flag_values=fv)


@dataclasses.dataclass
class Experiment:
    """What every experiment's ``main`` starts from: its config, flags, workdir and command line, and this
    process's ``queue.Worker`` (its programs and --compile_ahead), which the experiment's job works with."""

    config: ml_collections.ConfigDict
    flags: Any
    workdir: str
    argv: list[str]
    module: str
    worker: queue.Worker = dataclasses.field(default_factory=queue.Worker)

    def serve(self, job: Callable[[Callable[[str], None], bool], Any],
              prepare: Callable[[Callable[[str], None]], Any] | None = None) -> Any:
        """``serve`` with this experiment's flags, workdir and trial identity."""
        return serve(self.flags, self.argv, self.module, self.workdir, identity(self.config.train), job, prepare)


def begin(argv: Sequence[str] | None, module: str, default_config: str, check: Callable[[Any], Any],
          define_extra: Callable[[Any], None] | None = None) -> Experiment:
    """Parse an experiment's flags (``define_flags``' and ``define_extra``'s), enable the compilation cache, check
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
    workdir = fv.workdir or trials.default_workdir(name)
    check(config)
    rundir.check_workdir(workdir)
    if not fv.worker:
        print(f"workdir: {workdir}", flush=True)
    return Experiment(config, fv, workdir, argv, module, queue.Worker(compile_ahead=fv.compile_ahead))


def count(fv: Any, cpus: int | None = None) -> int:
    """How many processes work the study from this machine on a CPU (a time budget prices its plan for them):
    ``--local_workers``, else one per core, at most two."""
    return fv.local_workers or min(2, cpus or os.cpu_count() or 1)


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
    n = count(fv, cpus)
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
        queue.release_dead(open_study(storage_for(fv.storage, workdir), fv.study_name, ident, where), "interrupted")
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
