"""Training on an image folder through Grain, with TensorFlow made unimportable: kill and resume gives the
uninterrupted run's parameters, and a rerun after the folder changed is refused with one line.

CLI runs of the tiny network at 32 px (seconds each on 2 cores, the suite's compilation cache shared).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from suite_paths import CACHE
from test_grain_source import without_tensorflow

pytestmark = pytest.mark.slow  # every test here trains or starts a process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "effnet_jax", "configs", "digits.py")


def write_folder(root, per_class=10, val_per_class=3):
    """Three classes told apart by colour, JPEGs and PNGs of varying size."""
    rng = np.random.default_rng(0)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    for split, n in (("train", per_class), ("val", val_per_class)):
        for k, colour in enumerate(colours):
            os.makedirs(root / split / f"c{k}", exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(24, 56, size=2))
                pixels = np.clip(np.array(colour) + rng.integers(-30, 31, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{k}" / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def train_cmd(workdir, data, *overrides):
    """The training CLI in an interpreter without TensorFlow (``data`` has a sibling folder for its site)."""
    site = data.parent / "site"
    if not site.exists():
        site.mkdir()
        (site / "code.py").write_text(without_tensorflow(site) + "import runpy\n"
                                      "runpy.run_module('effnet_jax.train', run_name='__main__', alter_sys=True)\n")
    return [sys.executable, "-c", (site / "code.py").read_text(), f"--config={DIGITS}", f"--workdir={workdir}",
            "--config.model.network=tiny", "--config.progress_bar=False", f"--config.compile_cache_dir={CACHE}",
            f"--config.data.name=folder:{data}",
            "--config.data.train_split=train", "--config.data.eval_split=val", "--config.batch_size=8",
            "--config.data.randaugment_layers=2", *overrides]


def run(cmd, check=True):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def result(workdir):
    return json.loads((workdir / "result.json").read_text())


ARGS = ["--config.num_train_steps=12", "--config.checkpoint_every_steps=2", "--config.log_every_steps=1",
        "--config.eval_every_steps=100"]


def test_folder_run_killed_and_resumed_ends_with_the_uninterrupted_parameters(tmp_path):
    data = write_folder(tmp_path / "images")
    run(train_cmd(tmp_path / "whole", data, *ARGS))
    whole = result(tmp_path / "whole")
    assert whole["status"] == "ok" and whole["num_classes"] == 3
    assert json.loads((tmp_path / "whole" / "data.json").read_text())["train"]["files"] == 30

    wd = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(wd, data, *ARGS), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once a checkpoint past step 4 exists, mid-run
        ckpts = wd / "checkpoints"
        if ckpts.exists() and max([int(d) for d in os.listdir(ckpts) if d.isdigit()], default=0) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (wd / "result.json").exists(), "the run finished before it could be killed"
    run(train_cmd(wd, data, *ARGS))
    assert result(wd)["params_sha256"] == whole["params_sha256"]


def test_a_rerun_after_the_folder_changed_is_refused_with_one_line(tmp_path):
    data = write_folder(tmp_path / "images")
    wd = tmp_path / "wd"
    run(train_cmd(wd, data, "--config.num_train_steps=2"))
    before = result(wd)
    Image.new("RGB", (30, 30), (200, 40, 40)).save(data / "train" / "c0" / "extra.png")
    proc = run(train_cmd(wd, data, "--config.num_train_steps=2"), check=False)
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("warning: ")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    line = lines[0]
    assert line.startswith(f"error: workdir {wd} was trained on other data: train: 30 -> 31 images, "), line
    assert "class 'c0' 10 -> 11" in line and line.endswith("use a new --workdir or pass --restart to start over")
    assert result(wd) == before, "nothing written"
    os.remove(data / "train" / "c0" / "extra.png")
    assert run(train_cmd(wd, data, "--config.num_train_steps=2")).returncode == 0  # the same data again: the result

