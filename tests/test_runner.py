"""The trial queue across processes (experiments.study, queue, workers): shared storages, racing searches, a
worker killed mid-trial, worker processes stopped and resumed.

PostgreSQL tests need a server: `.ci/run` starts Debian's `postgresql` (`.ci/postgres.sh`) and
sets EFFNET_TEST_POSTGRES_URL; without one they skip, saying so.
"""

import io
import os
import signal
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import pytest
from suite_paths import CACHE

from effnet_jax.errors import UserError
from experiments import queue, workers
from experiments.study import storage_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two grid points that round to the same tiny network (one compile); no references.
GRID = ["--config.search.alpha=(1.2,1.25)", "--config.search.beta=(1.05,1.05)", "--config.search.gamma=(1.2,1.2)",
        "--config.search.tolerance=0.1", "--config.search.include_baseline=False",
        "--config.search.include_paper=False", "--config.search.strategy=exhaustive", "--config.search.final_seeds=()",
        "--config.train.model.network=tiny", f"--config.train.compile_cache_dir={CACHE}",
        "--config.search.require_learning=False"]  # a few tiny steps learn nothing: the machinery is under test


def postgres_url() -> str:
    url = os.environ.get("EFFNET_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL server: EFFNET_TEST_POSTGRES_URL is unset (.ci/run starts one with "
                    ".ci/postgres.sh after apt-get install postgresql)")
    try:
        storage_for(url, "/tmp")
    except Exception as e:  # noqa: BLE001 - any refusal means: no server to test against
        pytest.skip(f"PostgreSQL at EFFNET_TEST_POSTGRES_URL refused the connection: {e}")
    return url


def command(workdir, *extra):
    return [sys.executable, "-m", "experiments.grid_search", f"--workdir={workdir}", "--local_workers=1", *GRID,
            *extra]


def reported(stdout):
    """The search's closing report: its winner, or (GRID's tiny trials learn nothing) why it has no answer."""
    return "winner:" in stdout or "no answer (" in stdout


def trials_by_key(storage, workdir, name):
    import optuna

    study = optuna.load_study(study_name=name, storage=storage_for(storage, str(workdir)))
    out = {}
    for t in study.get_trials(deepcopy=False):
        out.setdefault(t.user_attrs.get("key"), []).append(t)
    return out


def complete_once(by_key, expected: int):
    done = {k: [t for t in ts if t.state.name == "COMPLETE"] for k, ts in by_key.items()}
    assert len(done) == expected, sorted(done)
    assert all(len(v) == 1 for v in done.values()), {k: len(v) for k, v in done.items()}
    return {k: v[0] for k, v in done.items()}


def kill_mid_trial_then_resume(storage, workdir, name, extra):
    """Start a search, SIGKILL it once a trial has a checkpoint but no result, rerun: every trial once."""
    args = command(workdir, *extra, "--config.train.num_train_steps=8", "--config.train.checkpoint_every_steps=2")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline, killed_in = time.time() + 400, None
    while time.time() < deadline and killed_in is None and proc.poll() is None:
        trials = workdir / "trials"
        for t in sorted(trials.iterdir()) if trials.exists() else []:
            ck = t / "checkpoints"
            if ck.exists() and any(d.isdigit() for d in os.listdir(ck)) and not (t / "result.json").exists():
                killed_in = t.name
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed_in is not None, "never caught a trial mid-way"
    rerun = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "lost its worker" in rerun.stdout
    done = complete_once(trials_by_key(storage, workdir, name), expected=2)
    resumed = [t for t in done.values() if t.user_attrs.get("resumed_from_step")]
    assert len(resumed) == 1 and resumed[0].user_attrs["resumed_from_step"] >= 2
    assert resumed[0].user_attrs["result"]["steps"] == 8
    failed = [t for ts in trials_by_key(storage, workdir, name).values() for t in ts if t.state.name == "FAIL"]
    assert [t.user_attrs.get("reason") for t in failed] == ["worker died"]


@pytest.mark.slow
def test_journal_kill_mid_trial_then_resume(tmp_path):
    kill_mid_trial_then_resume(None, tmp_path / "grid", "grid_search", [])


@pytest.mark.slow
def test_postgres_kill_mid_trial_then_resume(tmp_path):
    url = postgres_url()
    name = f"test-{uuid.uuid4().hex[:8]}"
    kill_mid_trial_then_resume(url, tmp_path / "grid", name, [f"--storage={url}", f"--study_name={name}"])


def run_two_at_once(cmds):
    procs = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [o for o, _ in outs]


@pytest.mark.slow
def test_two_searches_at_once_on_one_workdir_train_each_trial_once(tmp_path):
    wd = tmp_path / "grid"
    outs = run_two_at_once([command(wd, "--config.train.num_train_steps=3")] * 2)
    assert all(reported(o) for o in outs)
    complete_once(trials_by_key(None, wd, "grid_search"), expected=2)
    assert (wd / "best.json").exists()


@pytest.mark.slow
def test_two_machines_share_one_postgres_study(tmp_path):
    url = postgres_url()
    name = f"test-{uuid.uuid4().hex[:8]}"
    # two "machines": separate workdirs (no shared disk), one storage URL
    outs = run_two_at_once([command(tmp_path / f"m{i}", "--config.train.num_train_steps=3", f"--storage={url}",
                                    f"--study_name={name}") for i in (0, 1)])
    assert all(reported(o) for o in outs)
    complete_once(trials_by_key(url, tmp_path, name), expected=2)
    dirs = [set(os.listdir(tmp_path / f"m{i}" / "trials")) if (tmp_path / f"m{i}" / "trials").exists() else set()
            for i in (0, 1)]
    assert len(dirs[0] | dirs[1]) == 2 and not dirs[0] & dirs[1]  # each trial trained on one machine only
    assert (tmp_path / "m0" / "best.json").exists() and (tmp_path / "m1" / "best.json").exists()


@pytest.mark.slow
def test_two_local_workers_share_one_grid(tmp_path):
    wd = tmp_path / "grid2"
    proc = subprocess.run([*command(wd, "--config.train.num_train_steps=2"), "--local_workers=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import re

    assert len(set(re.findall(r"^\[(\d+)\] trial ", proc.stdout, re.M))) == 2 and reported(proc.stdout)
    done = complete_once(trials_by_key(None, wd, "grid_search"), expected=2)
    assert len({t.user_attrs["owner"]["pid"] for t in done.values()}) == 2  # one trial each
    assert (wd / "best.json").exists()


@pytest.mark.slow
def test_compile_ahead_builds_the_next_network_while_a_trial_trains(tmp_path):
    """--compile_ahead=on (the accelerator default, forced on this CPU): while one trial trains, a thread
    compiles the next waiting trial's program, which that trial then finds compiled ("hit"). That such a
    trial trains and scores as one that compiled for itself: tests/test_train.py."""
    import json

    wd = tmp_path / "ahead"
    proc = subprocess.run(command(wd, "--config.train.num_train_steps=2", "--config.search.include_baseline=True",
                                  "--compile_ahead=on"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiling ahead:") == 2, proc.stdout
    results = [json.loads(p.read_text()) for p in (wd / "trials").glob("*/result.json")]
    # three trials of three programs: the first compiled for itself, the next two were compiled ahead
    assert sorted(r["timings"]["program_cache"] for r in results) == ["hit", "hit", "miss"]
    assert all(r["status"] == "ok" for r in results)


@pytest.mark.slow
def test_sigint_stops_every_local_worker_and_says_how_to_resume(tmp_path):
    wd = tmp_path / "grid"
    args = [*command(wd, "--config.train.num_train_steps=200", "--config.train.checkpoint_every_steps=5"),
            "--local_workers=2"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        trials = wd / "trials"
        if trials.exists() and any((t / "checkpoints").exists() for t in trials.iterdir()):
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted") and "rerun" in lines[0], err
    trials = [t for ts in trials_by_key(None, wd, "grid_search").values() for t in ts]
    assert not any(t.state.name == "RUNNING" for t in trials)
    interrupted = [t for t in trials if t.user_attrs.get("reason") == "interrupted"]
    assert interrupted and all(t.state.name == "FAIL" for t in interrupted)
    waiting = {t.user_attrs["key"] for t in trials if t.state.name == "WAITING"}
    assert {t.user_attrs["key"] for t in interrupted} <= waiting  # queued again (a key two planners queued runs once)


@pytest.mark.slow
def test_no_private_optuna_name_anywhere():
    """Only Optuna's public API: no ``study._storage`` / ``trial._trial_id`` / ``optuna._x`` in any file here."""
    import re

    private = re.compile(r"\b(?:study|trial|t|storage)\._(?!_)[a-z]\w*|\boptuna\._\w+|from optuna\._")
    found = []
    for top in ("effnet_jax", "experiments", "scripts", "tests", "notebooks"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py") and f != "test_runner.py":
                    text = open(os.path.join(dirpath, f)).read()
                    found += [f"{f}: {m}" for m in private.findall(text)]
    assert not found, found
    assert private.search("x = study._storage") and private.search("s.set(t._trial_id)")  # the pattern can fail


@pytest.mark.slow
@pytest.mark.parametrize("module, args, expected", [
    ("experiments.fidelity",
     ["--config.search.alpha=(1.2,1.25)", "--config.search.beta=(1.05,1.05)", "--config.search.gamma=(1.2,1.2)",
      "--config.search.tolerance=0.1", "--config.search.include_baseline=False", "--config.search.include_paper=False",
      "--config.fidelity.budgets=(1,2)"], 4),
    ("experiments.scaling_study",
     ["--config.study.budgets=(1,2)", "--config.study.seeds=(0,)", "--config.study.families=('compound','width')"], 3),
])
def test_two_local_workers_run_the_fidelity_and_scaling_studies_each_trial_once(tmp_path, module, args, expected):
    wd = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", module, f"--workdir={wd}", "--local_workers=2",
                           "--config.train.model.network=tiny", "--config.train.num_train_steps=2",
                           f"--config.train.compile_cache_dir={CACHE}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import re

    assert len(set(re.findall(r"^\[(\d+)\] trial ", proc.stdout, re.M))) == 2, proc.stdout
    name = module.split(".")[1]
    done = complete_once(trials_by_key(None, wd, name), expected=expected)
    assert len({t.user_attrs["owner"]["pid"] for t in done.values()}) == 2


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _trial(number, state, key=None, rung=None):
    attrs = {"key": key, "attrs": {"rung": rung}} if key else {}
    return SimpleNamespace(number=number, state=SimpleNamespace(name=state), user_attrs=attrs)


def test_progress_line_counts_each_planned_trial_once_and_is_silent_off_a_terminal():
    trials = [_trial(0, "COMPLETE", "a", 0), _trial(1, "FAIL", "b", 0), _trial(2, "COMPLETE", "b", 0),
              _trial(3, "PRUNED", "c", 0), _trial(4, "RUNNING", "d", 1), _trial(5, "WAITING", "e", 1),
              _trial(6, "FAIL", "f", 1), _trial(7, "WAITING", "f", 1), _trial(8, "COMPLETE")]  # last: no plan
    # a retried trial (b) and a requeued one (f) count once; done = a, b, c; the rung is the unfinished ones'
    assert workers.progress_counts(trials) == (3, 6, 1)
    assert workers.progress_counts(trials[:4]) == (3, 3, 0)

    quiet = io.StringIO()
    line = workers.ProgressLine(file=quiet).start(lambda: pytest.fail("a disabled line polls nothing"))
    assert not line.enabled
    line.update(trials)
    line.close()
    assert quiet.getvalue() == ""

    shown = _Terminal()
    line = workers.ProgressLine(file=shown)
    line.update(trials[:2])  # a, b done when the line starts
    line.update(trials)
    line.close()
    out = shown.getvalue()
    assert "2/2 trials, rung 0" in out and "3/6 trials, rung 1" in out and "ETA" in out, out


def test_phase_line_sums_each_phase_over_the_trials_that_report_timings():
    rows = [{"wall_time_s": 10.0, "timings": {"train_s": 4.0, "train_load_s": 0.5, "program_save_s": 0.5,
                                              "train_compile_s": 2.0, "eval_s": 2.0, "eval_compile_wait_s": 1.0,
                                              "build_s": 0.5, "program_cache": "miss", "program_store": "hit"}},
            {"wall_time_s": 10.0, "timings": {"train_s": 8.0, "eval_s": 1.0, "checkpoint_s": 0.5,
                                              "program_cache": "hit"}},
            {"wall_time_s": 99.0, "timings": None}]  # a trial from before timings were recorded: left out
    line = queue.phase_line(rows)
    assert line.startswith("trial time by phase (2 trials, 20 s): training steps 60%, compile 20%, evaluation 10%, "
                           "setup 2%, checkpoints 2%, writing 0%"), line
    assert line.endswith("; 1 reused a program compiled by an earlier trial in the same process, 1 loaded one an "
                         "earlier process had compiled"), line
    assert queue.phase_line(rows[2:]) == ""


# ------------------------------------------------------------- the queue in process


class _Programs:
    """A stand-in for the trainer's ``Programs``: groups by ``config.net``, records what the queue asks."""

    def __init__(self):
        self.trained_groups, self.ahead, self.calls = set(), set(), []

    @staticmethod
    def group(config):
        return config.net

    def holds(self, config):
        return config.net in self.trained_groups | self.ahead

    def trained(self, config):
        self.trained_groups.add(config.net)
        self.calls.append(("trained", config.net))

    def ahead_busy(self, except_config=None):
        return False

    def start_ahead(self, config, log, label=None):
        self.ahead.add(config.net)
        self.calls.append(("start_ahead", label))
        log(f"compiling ahead: {label}")

    def wait_ahead(self, config, log):
        self.calls.append(("wait_ahead", config.net))


def _plans(*keys):
    import ml_collections

    return [queue.TrialPlan(k, ml_collections.ConfigDict({"net": k[0], "optimizer": {"schedule": "cosine"}}),
                            {"seed": int(k[1])}) for k in keys]


def _fresh_study(tmp_path, name="s"):
    from experiments.study import open_study

    return open_study(storage_for(None, str(tmp_path)), name, {"identity": 1}, str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("ahead, order", [("off", ["a0", "a1", "b0"]), ("on", ["a0", "b0", "a1"])])
def test_the_queue_trains_each_key_once_a_workers_own_networks_first(tmp_path, ahead, order):
    """Claim order: a network this worker trained (or compiles ahead) first; a key enqueued twice trains once
    (the later copy fails as a duplicate); a rerun trains nothing and returns the same rows."""
    study, programs, trained, lines = _fresh_study(tmp_path), _Programs(), [], []
    plans = _plans("a0", "b0", "a1")
    queue.enqueue_missing(study, plans)
    study.enqueue({}, {"key": "a0", "attrs": {"seed": 0}})  # a racing planner's copy

    def train(config, directory):
        trained.append(os.path.basename(directory))
        return {"status": "ok", "val_top1": 0.5 + len(trained) / 10, "wall_time_s": 0.1}

    rows = queue.work(study, plans, str(tmp_path), train, "val_top1", lines.append, programs=programs,
                      compile_ahead=ahead)
    assert trained == order
    assert {k: (r["state"], r["seed"]) for k, r in rows.items()} == {"a0": ("COMPLETE", 0), "b0": ("COMPLETE", 0),
                                                                     "a1": ("COMPLETE", 1)}
    assert [t.state.name for t in study.get_trials() if t.user_attrs["key"] == "a0"] == ["COMPLETE", "FAIL"]
    assert [c for c in programs.calls if c[0] == "start_ahead"] == ([("start_ahead", "b0")] if ahead == "on" else [])
    assert sum("compiling ahead: b0" == m for m in lines) == (ahead == "on")
    assert [c for c in programs.calls if c[0] == "wait_ahead"] == [("wait_ahead", k[0]) for k in order]
    again = queue.work(study, plans, str(tmp_path), lambda *a: pytest.fail("trained twice"), "val_top1", lines.append)
    assert again == rows


def test_the_study_keeps_one_latency_cache_per_device(tmp_path):
    study = _fresh_study(tmp_path)
    assert study.latencies("cpu:x") == {}
    study.store_latencies("cpu:x", {"net": {"train": {"ratio": 1.5}}})
    study.store_latencies("gpu:y", {"net": {"infer": {"ratio": 2.0}}})
    again = _fresh_study(tmp_path)  # another worker, or a rerun
    assert again.latencies("cpu:x") == {"net": {"train": {"ratio": 1.5}}}
    assert again.latencies("gpu:y") == {"net": {"infer": {"ratio": 2.0}}}
    assert again.user_attr("identity") == {"identity": 1}


@pytest.mark.slow
def test_a_storage_that_is_a_directory_is_one_line_and_an_empty_one_is_the_default(tmp_path):
    from test_bad_input import one_error_line

    from effnet_jax.errors import UserError

    folder = tmp_path / "shared"
    folder.mkdir()
    with pytest.raises(UserError, match="names a directory"):
        storage_for(str(folder), str(tmp_path / "wd"))
    storage_for("", str(tmp_path / "wd"))  # --storage= (empty): the workdir's journal
    assert (tmp_path / "wd" / "study.journal").exists()
    proc = subprocess.run(command(tmp_path / "grid", f"--storage={folder}"), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    line = one_error_line(proc)
    assert f"--storage={folder} names a directory" in line and "study.journal" in line, line
    assert not os.listdir(folder)


def test_a_study_keeps_its_data_and_refuses_other_data_in_one_line(tmp_path):
    """Finished trials are reused without the trainer reading the data again: the study itself refuses a
    rerun on changed data, naming what changed, and accepts the same data."""
    study = _fresh_study(tmp_path)
    old = {"train": {"files": 30, "bytes": 3000, "classes": {"a": 15, "b": 15}, "sha256": "x"}}
    study.check_data(old, str(tmp_path))
    study.check_data(dict(old), str(tmp_path))
    new = {"train": {"files": 31, "bytes": 3100, "classes": {"a": 16, "b": 15}, "sha256": "y"}}
    with pytest.raises(UserError, match=r"trained on other data: train: 30 -> 31 images") as e:
        _fresh_study(tmp_path).check_data(new, str(tmp_path))
    assert "\n" not in str(e.value)
