"""A damaged checkpoint (files cut short by an interrupted copy of a workdir) is found when the run resumes: it
falls back to the checkpoint before it, or, with none, stops with one ``error:`` line naming the damaged one."""

import json
import os
import shutil

import pytest
from test_bad_input import cli, train_cmd

pytestmark = pytest.mark.slow  # every test here trains or starts a process

# The tiny digits run of the suite's CLI tests (test_bad_input.train_cmd), four steps with the plain schedule.
STEPS = ("--config.num_train_steps=4", "--config.schedule_steps=0")


def run_train(workdir):
    return cli(*train_cmd(workdir, *STEPS))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4; tests damage copies of it."""
    wd = tmp_path_factory.mktemp("finished") / "wd"
    proc = run_train(wd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4"]
    return wd


@pytest.fixture
def copied(finished, tmp_path):
    """The run as a copy interrupted before result.json arrived: it resumes from its latest checkpoint."""
    wd = tmp_path / "wd"
    shutil.copytree(finished, wd)
    (wd / "result.json").unlink()
    return wd


def cut_short(step_dir):
    """Truncate the step's largest file (its arrays' data) to half, as an interrupted copy leaves it."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before_and_finishes_the_same(finished, copied):
    cut_short(copied / "checkpoints" / "4")
    proc = run_train(copied)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "damaged" in line]
    assert len(warnings) == 1, proc.stderr
    assert warnings[0].startswith(f"warning: checkpoint {copied / 'checkpoints' / '4'} is damaged (")
    assert warnings[0].endswith("moved aside to 4.damaged, resuming from the checkpoint of step 2")
    assert "Traceback" not in proc.stderr, proc.stderr
    result = json.loads((copied / "result.json").read_text())
    expected = json.loads((finished / "result.json").read_text())
    assert result["steps"] == 4 and result["params_sha256"] == expected["params_sha256"]  # steps 3, 4 again
    assert sorted(os.listdir(copied / "checkpoints")) == ["2", "4", "4.damaged"]
    rows = [json.loads(line) for line in (copied / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # the steps past 2 logged once


def test_a_damaged_only_checkpoint_is_one_error_line_naming_it(copied):
    shutil.rmtree(copied / "checkpoints" / "2")
    cut_short(copied / "checkpoints" / "4")
    proc = run_train(copied)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint {copied / 'checkpoints' / '4'} is damaged ("), \
        proc.stderr
    assert lines[0].endswith("and there is no earlier one; pass --restart to start over, or use a new --workdir")
    assert not (copied / "result.json").exists()
    assert sorted(os.listdir(copied / "checkpoints")) == ["4"]  # nothing moved or deleted: the user decides
