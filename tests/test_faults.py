"""Preemption and real faults, through the command lines: SIGTERM and early Ctrl-C, a torn journal, a really
full disk, two runs on one workdir, a backend that is not there, repeated overrides, secrets in messages,
worker counts, a read-only workdir for the search.

Each case checks the exit code and that stderr is exactly one ``error:`` line where that applies, and that
nothing is lost or run twice. The trainer's runs share one compiled program (tiny network, batch 32,
``schedule_steps`` 200) through the persistent compilation cache, like tests/test_bad_input.py.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest
from test_bad_input import env, one_error_line, train_cmd
from test_runner import command, complete_once, trials_by_key

from experiments.study import redact

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def popen(args, **kw):
    return subprocess.Popen(args, cwd=ROOT, env=kw.pop("env", env()), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def wait_for_checkpoint(directory, proc, timeout=400):
    """Until some run under ``directory`` has a finished checkpoint (the run is past its first steps)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        for dirpath, dirs, _ in os.walk(directory):
            if os.path.basename(dirpath) == "checkpoints" and any(d.isdigit() for d in dirs):
                return True
        time.sleep(0.05)
    return False


def errors(stderr):
    """stderr's lines other than warnings (the tiny grid warns that its MACs are not 2x)."""
    return [ln for ln in stderr.splitlines() if not ln.startswith("warning: ")]


def result(workdir):
    with open(os.path.join(workdir, "result.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------- signals


@pytest.mark.slow
def test_sigterm_saves_where_it_stopped_exits_143_and_resumes_bit_identical(tmp_path):
    """What Slurm, Kubernetes and preemptible VMs send: a checkpoint at the step reached, one line, 143."""
    steps = ["--config.num_train_steps=60", "--config.checkpoint_every_steps=25"]
    whole = subprocess.run(train_cmd(tmp_path / "whole", *steps), cwd=ROOT, env=env(), capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    wd = tmp_path / "cut"
    proc = popen(train_cmd(wd, *steps))
    assert wait_for_checkpoint(wd, proc), "never saw the first checkpoint"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    line = one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), code=143)
    m = re.fullmatch(r"error: terminated \(SIGTERM\) at step (\d+) of 60; rerun the same command to resume from "
                     r"the last checkpoint \(step (\d+)\)", line)
    assert m and m[1] == m[2], line  # saved exactly where it stopped, not at the last periodic save
    assert int(m[1]) in {int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit()}
    assert not (wd / "result.json").exists()
    again = subprocess.run(train_cmd(wd, *steps), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert result(wd)["params_sha256"] == result(tmp_path / "whole")["params_sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 2.0])
def test_ctrl_c_while_starting_is_one_line_exit_130_not_a_full_run(tmp_path, delay):
    """A Ctrl-C while JAX imports or initialises (where Python's own KeyboardInterrupt can be swallowed by a
    callback) is recorded and reported, whatever the machine's load."""
    wd = tmp_path / "wd"
    proc = popen(train_cmd(wd, "--config.num_train_steps=200"))
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert len(err.splitlines()) == 1 and err.startswith("error: interrupted"), err
    assert not (wd / "result.json").exists()


@pytest.mark.slow
def test_a_ctrl_c_dropped_inside_a_gc_callback_is_still_one_line_exit_130(tmp_path):
    """The loaded-machine case above, made certain: the stop arrives while a garbage-collection callback runs
    (where JAX's ``_xla_gc_callback`` sits), Python drops the exception it raises, and the run reports it at
    its next check as one line, with no 'Exception ignored' traceback."""
    script = tmp_path / "stop_in_gc.py"
    script.write_text(
        "import gc, os, signal\n"
        "from effnet_jax import errors, signals\n"
        "def callback(phase, info):\n"
        "    if phase == 'start' and not signals.requested():\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        sum(range(1000))  # the handler runs here, inside the callback\n"
        "@errors.exit_on_user_error\n"
        "def main():\n"
        "    gc.callbacks.append(callback)\n"
        "    gc.collect()\n"
        "    assert signals.requested() == signal.SIGINT, 'the stop was lost'\n"
        "    signals.check()\n"
        "    print('ran to the end')\n"
        "main()\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == ["error: interrupted"], proc.stderr
    assert "ran to the end" not in proc.stdout


@pytest.mark.slow
def test_sigterm_stops_a_search_requeues_its_trials_and_the_rerun_matches_an_uninterrupted_one(tmp_path):
    steps = ["--config.train.num_train_steps=60", "--config.train.checkpoint_every_steps=25"]
    whole = subprocess.run(command(tmp_path / "whole", *steps), cwd=ROOT, capture_output=True, text=True,
                           timeout=900)
    assert whole.returncode == 0, whole.stderr[-3000:]
    wd = tmp_path / "cut"
    args = [*command(wd, *steps), "--local_workers=2"]
    proc = popen(args, start_new_session=True)
    assert wait_for_checkpoint(wd / "trials", proc), "never caught a trial mid-way"
    proc.send_signal(signal.SIGTERM)  # the parent only, as Kubernetes does: it stops its workers
    out, err = proc.communicate(timeout=300)
    line = one_error_line(subprocess.CompletedProcess(args, proc.returncode, out, err), code=143)
    assert line.startswith("error: terminated (SIGTERM); finished trials are kept") and "rerun `" in line, line
    trials = [t for ts in trials_by_key(None, wd, "grid_search").values() for t in ts]
    assert not any(t.state.name == "RUNNING" for t in trials)
    stopped = [t for t in trials if t.user_attrs.get("reason") == "interrupted"]
    waiting = {t.user_attrs["key"] for t in trials if t.state.name == "WAITING"}  # (racing planners may have
    assert stopped and {t.user_attrs["key"] for t in stopped} <= waiting  # queued a key twice: it runs once)
    rerun = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    done = complete_once(trials_by_key(None, wd, "grid_search"), expected=2)
    assert any(t.user_attrs.get("resumed_from_step") for t in done.values())
    for key in done:
        trial_dir = key.rsplit("-n", 1)[0]
        assert result(wd / "trials" / trial_dir)["params_sha256"] == \
            result(tmp_path / "whole" / "trials" / trial_dir)["params_sha256"], key


# ------------------------------------------------------------------------------ torn journal


@pytest.mark.slow
def test_a_journal_torn_by_a_crash_is_repaired_and_the_rerun_completes(tmp_path):
    wd = tmp_path / "grid"
    args = command(wd, "--config.train.num_train_steps=2")
    assert subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600).returncode == 0
    journal = wd / "study.journal"
    data = journal.read_bytes()
    journal.write_bytes(data[:-9])  # a crash in the middle of the last write
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and not errors(again.stderr), again.stderr[-3000:]
    assert "torn by a crash" in again.stdout
    third = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)  # nothing left broken
    assert third.returncode == 0 and not errors(third.stderr), third.stderr[-3000:]
    assert journal.read_bytes().endswith(b"\n")
    complete_once(trials_by_key(None, wd, "grid_search"), expected=2)


@pytest.mark.slow
def test_a_journal_that_is_not_one_is_one_line(tmp_path):
    wd = tmp_path / "grid"
    wd.mkdir()
    (wd / "study.journal").write_text("this is not json\n{}\n")
    line = one_error_line(subprocess.run(command(wd), cwd=ROOT, capture_output=True, text=True, timeout=600))
    assert "is not a readable Optuna journal" in line and "move it aside" in line, line


# ------------------------------------------------------------------------------- full disk


@pytest.fixture
def full_disk(tmp_path):
    """A real 8 MB file system with 64 KB left (tmpfs; skipped where this process may not mount)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({proc.stderr.strip() or 'mount failed'}); needs root")
    try:
        st = os.statvfs(mnt)
        with open(mnt / "filler", "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - 64 * 1024))
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_really_full_disk_is_one_line_exit_2_for_the_search_and_the_rerun_completes(full_disk, tmp_path, workers):
    wd = full_disk / "grid"
    args = [*command(wd, "--config.train.num_train_steps=4"), f"--local_workers={workers}"]
    line = one_error_line(subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600))
    assert "No space left on device (ENOSPC)" in line and "rerun" in line, line
    os.remove(full_disk / "filler")
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    complete_once(trials_by_key(None, wd, "grid_search"), expected=2)


@pytest.mark.slow
def test_a_really_full_disk_is_one_line_exit_2_for_the_trainer(full_disk):
    wd = full_disk / "wd"
    proc = subprocess.run(train_cmd(wd, "--config.num_train_steps=4"), cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=600)
    line = one_error_line(proc)
    assert line.startswith(f"error: cannot write {wd}") and "No space left on device (ENOSPC)" in line, line
    os.remove(full_disk / "filler")
    again = subprocess.run(train_cmd(wd, "--config.num_train_steps=4"), cwd=ROOT, env=env(), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]


# ----------------------------------------------------------------------------- one workdir


@pytest.mark.slow
def test_a_workdir_in_use_is_refused_and_freed_when_its_holder_dies(tmp_path):
    wd = tmp_path / "wd"
    first = popen(train_cmd(wd, "--config.num_train_steps=200"))
    try:
        assert wait_for_checkpoint(wd, first)
        second = subprocess.run(train_cmd(wd, "--config.num_train_steps=200"), cwd=ROOT, env=env(),
                                capture_output=True, text=True, timeout=600)
        line = one_error_line(second)
        assert re.match(rf"error: workdir {re.escape(str(wd))} is in use by another run \(pid {first.pid} on ", line), \
            line
    finally:
        first.kill()
        first.communicate()
    rows = (wd / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(r)["step"] for r in rows if "loss" in json.loads(r)]
    assert len(steps) == len(set(steps))  # nobody wrote a row twice
    after = subprocess.run(train_cmd(wd, "--config.num_train_steps=6"), cwd=ROOT, env=env(), capture_output=True,
                           text=True, timeout=600)  # the dead holder's lock is gone; a changed config is refused
    assert "in use" not in after.stderr, after.stderr


# ---------------------------------------------------------------------------- environment


@pytest.mark.slow
@pytest.mark.parametrize("module", ["effnet_jax.train", "experiments.grid_search"])
def test_a_backend_that_is_not_here_is_one_line(tmp_path, module):
    if os.environ.get("JAX_PLATFORMS") == "cuda":
        pytest.skip("this machine runs cuda")
    args = train_cmd(tmp_path / "wd") if module == "effnet_jax.train" else command(tmp_path / "grid")
    proc = subprocess.run(args, cwd=ROOT, env={**env(), "JAX_PLATFORMS": "cuda"}, capture_output=True, text=True,
                          timeout=300)
    line = one_error_line(proc)
    assert "JAX could not start the cuda backend" in line and "JAX_PLATFORMS" in line, line
    assert not (tmp_path / "wd").exists() and not (tmp_path / "grid" / "study.journal").exists()


def test_a_repeated_override_takes_the_last_value():
    from effnet_jax import cli

    config, _ = cli.parse_config_flags(
        ["grid_search", "--config.search.alpha=(1.1,1.3)", "--config.search.alpha", "(1.2,1.2)",
         "--config.train.batch_size=8", "--config.train.batch_size=4"],
        os.path.join(ROOT, "experiments", "configs", "grid_search.py"))
    assert tuple(config.search.alpha) == (1.2, 1.2) and config.train.batch_size == 4


@pytest.mark.slow
def test_passwords_never_reach_a_message(tmp_path):
    secret = f"pw{uuid.uuid4().hex[:8]}"
    url = f"postgresql://effnet:{secret}@127.0.0.1:1/effnet"  # nothing listens on port 1
    proc = subprocess.run(command(tmp_path / "grid", f"--storage={url}"), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    line = one_error_line(proc)
    assert secret not in proc.stderr + proc.stdout and "postgresql://effnet:***@127.0.0.1:1/effnet" in line, line
    assert redact(f"see {url} and sqlite:///x.db") == \
        "see postgresql://effnet:***@127.0.0.1:1/effnet and sqlite:///x.db"


@pytest.mark.slow
@pytest.mark.parametrize("value, message", [("-1", "--local_workers must be >= 0"),
                                            ("100", "more than this machine's")])
def test_impossible_worker_counts_are_one_line(tmp_path, value, message):
    proc = subprocess.run([*command(tmp_path / "grid"), f"--local_workers={value}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert message in one_error_line(proc)


@pytest.mark.slow
def test_a_storage_error_is_said_once_before_any_worker_starts(tmp_path):
    proc = subprocess.run([*command(tmp_path / "grid", "--storage=postgresql://u:p@127.0.0.1:1/x"),
                           "--local_workers=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    one_error_line(proc)
    assert "[" not in proc.stdout  # no worker said anything: none was started


@pytest.mark.slow
@pytest.mark.parametrize("module", ["experiments.grid_search", "experiments.scaling_study", "experiments.fidelity"])
def test_a_read_only_workdir_is_one_line_for_every_experiment(tmp_path, module):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs (needs root)")
    try:
        proc = subprocess.run([sys.executable, "-m", module, f"--workdir={ro / 'run'}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert "read-only file system" in one_error_line(proc)
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)
