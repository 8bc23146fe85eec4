"""Every user mistake or environment fault in the trainer CLI ends in one ``error:`` line.

Each case checks the exit code, that the *whole* stderr is that one line (nothing filtered),
and, where the mistake is detectable before training, that nothing was written. Runs share
one compiled train step: the tiny network, batch 32 and ``schedule_steps`` = 200, so the
program is the same whatever ``num_train_steps`` is (the persistent compilation cache).
"""

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from suite_paths import CACHE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "effnet_jax", "configs", "digits.py")
FAST = ["--config.model.network=tiny", "--config.progress_bar=False", f"--config.compile_cache_dir={CACHE}",
        "--config.schedule_steps=200", "--config.checkpoint_every_steps=2", "--config.log_every_steps=1",
        "--config.eval_every_steps=100"]
TF_QUIET = ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")  # conftest sets them; the CLI must not need them


def env():
    return {k: v for k, v in os.environ.items() if k not in TF_QUIET}


def train_cmd(workdir, *overrides, config=DIGITS):
    return [sys.executable, "-m", "effnet_jax.train", f"--config={config}", f"--workdir={workdir}", *FAST, *overrides]


def cli(*args):
    return subprocess.run(list(args), capture_output=True, text=True, cwd=ROOT, env=env(), timeout=600)


def one_error_line(proc, code=2, allow_warnings=False):
    """The single stderr line (``error: ...``) of a run that exited with ``code``."""
    assert proc.returncode == code, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    if allow_warnings:
        lines = [ln for ln in lines if not ln.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def snapshot(path):
    """{relative path: sha256} of every file under ``path``: equal snapshots mean nothing changed."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            full = os.path.join(dirpath, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def strict_json(text):
    def refuse(constant):
        raise ValueError(f"bare {constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------ config file and fields


@pytest.mark.slow
def test_missing_config_file(tmp_path):
    wd = tmp_path / "wd"
    line = one_error_line(cli(*train_cmd(wd, config=tmp_path / "nope.py")))
    assert line == f"error: config file not found: {tmp_path / 'nope.py'}"
    assert not wd.exists()


@pytest.mark.slow
def test_config_file_with_a_syntax_error(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n    return None\n")
    wd = tmp_path / "wd"
    line = one_error_line(cli(*train_cmd(wd, config=bad)))
    assert line.startswith(f"error: config file {bad} line 1: ") and "syntax" in line
    assert not wd.exists()


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("--config.num_train_steps=-5", "error: num_train_steps must not be negative (0: train for num_epochs), got -5"),
    ("--config.num_epochs=-1", "error: num_epochs must not be negative, got -1"),
])
def test_negative_num_train_steps_or_epochs_is_one_line_before_anything_is_written(tmp_path, override, message):
    """A negative step count used to be read as 0 ("train by num_epochs") and trained silently with exit 0."""
    wd = tmp_path / "wd"
    line = one_error_line(cli(*train_cmd(wd, override)))
    assert line == message
    assert not wd.exists()


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("--config.nosuch=3", "unknown config field 'nosuch' (did you mean: "),
    ("--config.model.nosuch=1", "unknown config field 'model.nosuch' (did you mean: model."),
    ("--config.optimizer.lerning_rate=0.1", "unknown config field 'optimizer.lerning_rate' "
                                             "(did you mean: optimizer.learning_rate?)"),
    ("--config.batch_size.x=1", "config field 'batch_size' (int) has no field 'x'"),
])
def test_unknown_config_field_is_named_with_the_nearest_ones(override, message):
    """In parse_config_flags, so the grid search and the scaling study say the same (in-process, no training)."""
    from effnet_jax import cli
    from effnet_jax.errors import UserError

    with pytest.raises(UserError) as e:
        cli.parse_config_flags(["train", f"--config={DIGITS}", override])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_unknown_field_of_a_default_config_file():
    """The grid search and the scaling study pass their config as the default: overridden at flag definition."""
    from effnet_jax import cli
    from effnet_jax.errors import UserError

    with pytest.raises(UserError, match=r"unknown config field 'modl' \(did you mean: model\?\)"):
        cli.parse_config_flags(["experiments/grid_search.py", "--config.modl.phi=2"], DIGITS)


@pytest.mark.slow
@pytest.mark.parametrize("config, kind", [("scaling_study.py", "scaling-study"), ("fidelity.py", "fidelity")])
def test_unknown_preset_of_an_experiment_config_is_one_line(config, kind):
    from effnet_jax import cli
    from effnet_jax.errors import UserError

    path = os.path.join(ROOT, "experiments", "configs", config)
    with pytest.raises(UserError, match=rf"unknown {kind} preset 'imagenet': .*fashion_mnist") as e:
        cli.parse_config_flags(["prog", f"--config={path}:imagenet"])
    assert "\n" not in str(e.value)
    for preset in ("fashion_mnist", ""):  # the named presets load
        config_obj, _ = cli.parse_config_flags(["prog", f"--config={path}" + (f":{preset}" if preset else "")])
        assert config_obj.train.model.base_resolution == (40 if preset else 32)


# ------------------------------------------------------------------------- the experiments' flags


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("--config.search.alpha=1.2",
     "search.alpha must be a range (lo, hi) of two numbers with 1 <= lo <= hi, got (1.2,)"),
    ("--config.search.step=-0.05", "search.step must be a number > 0, got -0.05"),
])
def test_a_bad_search_field_is_one_line_before_anything_is_written(tmp_path, override, message):
    """A scalar where the search wants a (lo, hi) range was an IndexError traceback: strategies.check_search."""
    wd = tmp_path / "wd"
    line = one_error_line(cli(sys.executable, "-m", "experiments.grid_search", f"--workdir={wd}", override))
    assert line == f"error: {message}"
    assert not wd.exists()


@pytest.mark.slow
def test_scale_up_with_an_empty_phi_is_one_line(tmp_path):
    """--phi= (no value) printed an empty table and exited 0."""
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"alpha": 1.2, "beta": 1.1, "gamma": 1.15, "config": {"train": {}}}))
    line = one_error_line(cli(sys.executable, "-m", "experiments.scale_up", f"--constants={best}", "--phi="))
    assert line == "error: --phi takes one or more comma-separated phi values (1,2,3), got ''"


# ------------------------------------------------------------------------- image folders


def write_pngs(root, counts):
    from PIL import Image

    for label, n in counts.items():
        os.makedirs(root / label)
        for i in range(n):
            Image.new("RGB", (24, 20), (i * 20, 100, 200)).save(root / label / f"{i}.png")


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("corrupt", "train/dog/3.png is not a readable image (cannot identify image file); remove or replace it"),
    ("one_class", "has a single class ('cat'): a classifier needs at least two"),
])
def test_bad_image_folder_one_line_before_training(tmp_path, case, message):
    """Through the CLI: TensorFlow is imported on this path and must print nothing of its own."""
    pytest.importorskip("tensorflow_datasets")
    root = tmp_path / "images"
    labels = {"cat": 6} if case == "one_class" else {"cat": 6, "dog": 6}
    write_pngs(root / "train", labels)
    write_pngs(root / "val", {k: 2 for k in labels})
    if case == "corrupt":
        (root / "train" / "dog" / "3.png").write_bytes(b"\x89PNG but then garbage")
    wd = tmp_path / "wd"
    line = one_error_line(cli(*train_cmd(wd, f"--config.data.name=folder:{root}", "--config.data.train_split=train",
                                         "--config.data.eval_split=val", "--config.batch_size=4")))
    assert line.startswith(f"error: image folder {str(root)!r}") and message in line, line
    assert not wd.exists()


# --------------------------------------------------------------------------------- workdir


@pytest.mark.slow
def test_workdir_that_is_a_file(tmp_path):
    wd = tmp_path / "file"
    wd.write_text("mine\n")
    line = one_error_line(cli(*train_cmd(wd, "--config.num_train_steps=4")))
    assert line == f"error: --workdir {wd} is a file, not a directory"
    assert wd.read_text() == "mine\n"
    line = one_error_line(cli(*train_cmd(wd / "sub", "--config.num_train_steps=4")))
    assert "is a file, not a directory" in line


@pytest.mark.slow
def test_workdir_under_proc():
    """Root ignores file modes, so /proc is the unwritable place every test machine has."""
    line = one_error_line(cli(*train_cmd("/proc/effnet_test", "--config.num_train_steps=4")))
    assert "--workdir /proc/effnet_test is under /proc" in line
    assert not os.path.exists("/proc/effnet_test")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode-0500 directory anyway")
def test_read_only_workdir(tmp_path):
    wd = tmp_path / "ro"
    wd.mkdir()
    wd.chmod(0o500)
    try:
        for target in (wd, wd / "sub"):
            line = one_error_line(cli(*train_cmd(target, "--config.num_train_steps=4")))
            assert "cannot be written" in line
        assert os.listdir(wd) == []
    finally:
        wd.chmod(0o700)


def test_unwritable_workdir_is_refused_before_writing(tmp_path, monkeypatch):
    """What a mode-0500 directory is to a non-root user, here as root: access(W_OK) says no."""
    from effnet_jax.errors import UserError
    from effnet_jax.training import rundir

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(tmp_path)) else real_access(
        p, mode))
    for target in (tmp_path, tmp_path / "sub"):
        with pytest.raises(UserError, match=f"cannot be written: {tmp_path} is not writable"):
            rundir.check_workdir(str(target))
    assert os.listdir(tmp_path) == []


def _fail_saves(monkeypatch, exc):
    import orbax.checkpoint as ocp

    def save(self, step, *args, **kwargs):
        raise exc

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)


def _wrapped(e):
    try:
        raise e
    except OSError as cause:
        try:
            raise RuntimeError("checkpoint save failed") from cause
        except RuntimeError as wrapper:
            return wrapper


@pytest.mark.slow
@pytest.mark.parametrize("code, wrap", [(errno.ENOSPC, False), (errno.EROFS, True), (errno.EACCES, False)])
def test_full_or_read_only_disk_during_training(tmp_path, monkeypatch, capsys, code, wrap):
    """An OSError while saving (raw, or wrapped as orbax does) is one line naming the path; exit 2."""
    from effnet_jax import train

    wd = tmp_path / "wd"
    target = str(wd / "checkpoints" / "2")
    err = OSError(code, os.strerror(code), target)
    _fail_saves(monkeypatch, _wrapped(err) if wrap else err)
    with pytest.raises(SystemExit) as e:
        train.main(train_cmd(wd, "--config.num_train_steps=4")[2:])
    assert e.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {target}: {os.strerror(code)}"), lines


@pytest.mark.slow
def test_a_real_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Only storage errnos become one line: any other exception propagates unchanged."""
    from effnet_jax import train

    _fail_saves(monkeypatch, OSError(errno.EBADF, "bad file descriptor"))
    with pytest.raises(OSError, match="bad file descriptor"):
        train.main(train_cmd(tmp_path / "wd", "--config.num_train_steps=4")[2:])


# --------------------------------------------------------------------------------- the run


@pytest.mark.slow
def test_sigint_says_where_to_resume_exit_130(tmp_path):
    wd = tmp_path / "wd"
    proc = subprocess.Popen(train_cmd(wd, "--config.num_train_steps=200"), cwd=ROOT, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # once the first checkpoint is complete
        if (wd / "checkpoints").is_dir() and any(d.isdigit() for d in os.listdir(wd / "checkpoints")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    lines = err.splitlines()
    assert len(lines) == 1, err
    m = re.fullmatch(r"error: interrupted at step (\d+) of 200; rerun the same command to resume from the last "
                     r"checkpoint \(step (\d+)\)", lines[0])
    assert m, lines[0]
    at, saved = int(m[1]), int(m[2])
    assert 2 <= saved <= at < 200 and saved == max(int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit())
    assert not (wd / "result.json").exists()


@pytest.mark.slow
def test_divergence_exits_1_and_writes_strict_json(tmp_path):
    wd = tmp_path / "wd"
    proc = cli(*train_cmd(wd, "--config.num_train_steps=6", "--config.optimizer.learning_rate=1e12"))
    line = one_error_line(proc, code=1)
    m = re.fullmatch(r"error: training diverged at step (\d+) \(non-finite loss\); lower the learning rate", line)
    assert m, line
    result = strict_json((wd / "result.json").read_text())
    assert result["status"] == "diverged" and result["steps"] == int(m[1]) and result["train_loss"] is None
    rows = [strict_json(r) for r in (wd / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] is None


# ------------------------------------------------------------------ resuming a workdir


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run (checkpoints at 2 and 4); tests work on copies of it."""
    wd = tmp_path_factory.mktemp("finished") / "wd"
    proc = cli(*train_cmd(wd, "--config.num_train_steps=4"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    return wd


@pytest.fixture
def copy(finished, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(finished, wd)
    return wd


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--config.log_every_steps=2", "--config.progress_bar=True"]])
def test_rerunning_a_finished_workdir_changes_nothing(copy, extra):
    before = snapshot(copy)
    result = json.loads((copy / "result.json").read_text())
    proc = cli(*train_cmd(copy, "--config.num_train_steps=4", *extra))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    from effnet_jax.training import trainer

    assert proc.stdout.splitlines() == [f"{trainer.summary_line(result)} (already finished; nothing changed)"]
    assert snapshot(copy) == before


@pytest.mark.slow
def test_finished_workdir_in_process_returns_the_stored_result(copy):
    """The grid search calls train_and_evaluate per trial: a finished one is neither retrained nor rewritten."""
    from effnet_jax import cli
    from effnet_jax.training import trainer

    before = snapshot(copy)
    config, _ = cli.parse_config_flags(train_cmd(copy, "--config.num_train_steps=4")[2:])
    assert trainer.train_and_evaluate(config, str(copy)) == json.loads((copy / "result.json").read_text())
    assert snapshot(copy) == before


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["--config.num_train_steps=4", "--config.batch_size=16", "--config.model.network=b0"],
     "batch_size 32 -> 16, model.network tiny -> b0"),
    (["--config.num_train_steps=2"], "num_train_steps 4 -> 2"),
    (["--config.num_train_steps=8", "--config.schedule_steps=0"], "num_train_steps 4 -> 8, schedule_steps 200 -> 0"),
    (["--config.num_train_steps=8", "--config.schedule_steps=300"],
     "num_train_steps 4 -> 8, schedule_steps 200 -> 300"),
])
def test_resuming_with_a_changed_config_is_refused(copy, overrides, message):
    before = snapshot(copy)
    line = one_error_line(cli(*train_cmd(copy, *overrides)))
    assert line == (f"error: workdir {copy} was started with a different config: {message}; use a new --workdir "
                    "or pass --restart to start over")
    assert snapshot(copy) == before


def test_config_differences_ignore_cosmetics_and_fields_added_or_removed_since():
    """A workdir from before a field existed resumes when the new config keeps that field's default."""
    from effnet_jax.configs import digits
    from effnet_jax.training import rundir

    new = digits.get_config()
    old = json.loads(new.to_json_best_effort())
    del old["schedule_steps"]  # added since (default 0)
    old["model"]["retired_field"] = 1  # removed since
    old["log_every_steps"], old["progress_bar"] = 1, False
    assert rundir.config_differences(old, new, steps_per_epoch=33) == []
    new.schedule_steps, new.batch_size = 100, 16
    assert rundir.config_differences(old, new, 33) == ["batch_size 32 -> 16", "schedule_steps 0 -> 100"]
    old["schedule_steps"], old["num_train_steps"], new.num_train_steps, new.batch_size = 100, 0, 60, 32
    assert rundir.config_differences(old, new, 33) == ["num_train_steps 0 -> 60"]  # 60 < 15 epochs of 33 steps
    new.num_train_steps = 600
    assert rundir.config_differences(old, new, 33) == []  # longer, same schedule: continues


@pytest.mark.slow
def test_checkpoint_past_the_configs_steps_is_refused(copy):
    (copy / "config.json").unlink()  # a workdir from before config.json: the checkpoint still tells
    (copy / "result.json").unlink()
    before = snapshot(copy)
    line = one_error_line(cli(*train_cmd(copy, "--config.num_train_steps=2")))
    assert "holds a checkpoint at step 4, past this config's 2 steps" in line
    assert snapshot(copy) == before


@pytest.mark.slow
def test_restart_starts_over(copy):
    old = json.loads((copy / "result.json").read_text())
    (copy / "notes.txt").write_text("keep me\n")
    proc = cli(*train_cmd(copy, "--config.num_train_steps=4", "--config.seed=1", "--restart"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    new = json.loads((copy / "result.json").read_text())
    assert new["steps"] == 4 and new["params_sha256"] != old["params_sha256"]
    assert json.loads((copy / "config.json").read_text())["seed"] == 1
    assert [json.loads(r)["step"] for r in (copy / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(r)] == [1, 2, 3, 4]
    assert (copy / "notes.txt").read_text() == "keep me\n"


@pytest.mark.slow
def test_growing_with_the_same_schedule_continues_exactly(copy, tmp_path):
    """The grid search's promoted trial: 4 steps then 6 ends bit-identical to 6 straight."""
    proc = cli(*train_cmd(copy, "--config.num_train_steps=6"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    grown = json.loads((copy / "result.json").read_text())
    assert grown["steps"] == 6 and json.loads((copy / "config.json").read_text())["num_train_steps"] == 6
    ref = tmp_path / "ref"
    assert cli(*train_cmd(ref, "--config.num_train_steps=6")).returncode == 0
    assert json.loads((ref / "result.json").read_text())["params_sha256"] == grown["params_sha256"]


@pytest.mark.slow
def test_bad_head_init_is_one_line_before_anything_is_written(tmp_path):
    wd = tmp_path / "wd"
    proc = subprocess.run([sys.executable, "-m", "effnet_jax.train", f"--config={DIGITS}", f"--workdir={wd}",
                           "--config.model.head_init=big"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model.head_init must be"), proc.stderr
    assert not wd.exists()
