"""Measured cost: interleaved medians and their spread, and a real measurement on the tiny network."""

import os

import pytest

from effnet_jax import latency
from effnet_jax.configs import digits

CACHE = os.path.join(os.environ.get("PYTEST_CACHE_ROOT", "/tmp"), f"effnet_jax_test_xla_{os.getuid()}")


def test_interleaved_takes_per_round_ratios_and_their_spread(monkeypatch):
    clock = iter(range(10_000))
    monkeypatch.setattr(latency.time, "perf_counter", lambda: float(next(clock)))
    # each call to run() advances the fake clock once more per step: "slow" takes 3 ticks a step, "ref" 1
    calls = {"ref": 1, "slow": 3}

    def runner(name):
        def run(steps):
            for _ in range(steps * calls[name] - 1):
                next(clock)
        return run

    costs = latency.interleaved({"ref": runner("ref"), "slow": runner("slow")}, "ref", rounds=5, steps=2)
    assert costs["ref"].ratio == 1.0 and costs["ref"].spread == 0.0
    assert costs["slow"].ratio == pytest.approx(3.0) and costs["slow"].spread == 0.0
    assert costs["slow"].seconds == pytest.approx(3.0)


def test_a_bigger_input_measures_slower_on_the_device_at_hand():
    def config(resolution):
        c = digits.get_config()
        c.model.network, c.model.resolution, c.batch_size = "tiny", resolution, 16
        c.compile_cache_dir = CACHE
        return c

    out = latency.measure({"small": config(16), "large": config(64)}, 10, "small", rounds=3, steps=2)
    for kind in latency.KINDS:
        assert out["small"][kind]["ratio"] == 1.0
        assert out["large"][kind]["ratio"] > 1.5, out  # 16x the pixels
        assert out["large"][kind]["seconds"] > 0 and out["large"][kind]["spread"] >= 0
    assert latency.device_key().startswith("cpu:")


def test_scale_up_prints_each_models_measured_cost(capsys):
    from experiments import scale_up
    from experiments.configs import grid_search as grid_config
    from experiments.trials import PAPER

    train = grid_config.get_config().train
    train.model.network, train.compile_cache_dir = "tiny", CACHE
    out = scale_up.print_latency(train, PAPER, [1.0], 10)
    assert set(out) == {"0", "1"} and out["0"]["train"]["ratio"] == 1.0 and out["0"]["infer"]["ratio"] == 1.0
    assert all(out["1"][kind]["ratio"] > 0 for kind in latency.KINDS)
    text = capsys.readouterr().out
    assert f"measured on {latency.device_key()}" in text and "phi=1: train " in text and "x B0" in text


LATENCY_GRID = ["--config.search.constraint=latency", "--config.search.alpha=(1.2,1.3)",
                "--config.search.beta=(1.05,1.05)", "--config.search.gamma=(1.2,1.2)",
                "--config.search.latency_tolerance=1000.0", "--config.search.latency_window=0.9",
                "--config.search.latency_rounds=2", "--config.search.include_paper=False",
                "--config.search.strategy=exhaustive", "--config.search.final_seeds=()",
                "--config.train.model.network=tiny", "--config.train.num_train_steps=2",
                f"--config.train.compile_cache_dir={CACHE}", "--local_workers=1",
                "--config.search.require_learning=False"]  # two tiny steps learn nothing: latency is under test


def test_a_search_on_measured_latency_admits_trains_and_reuses_its_measurements(tmp_path):
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [sys.executable, "-m", "experiments.grid_search", f"--workdir={tmp_path / 'grid'}", *LATENCY_GRID]
    first = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    import re

    assert re.search(r"^measuring [1-3] networks' train-step and inference time against unscaled B0 on cpu:",
                     first.stdout, re.M), first.stdout[-3000:]
    assert "xTrain" in first.stdout and "xInfer" in first.stdout
    best = json.loads((tmp_path / "grid" / "best.json").read_text())
    assert best["latency_train"] > 0 and best["latency_infer"] > 0
    # (the tolerance admits any measured network: on a loaded machine the tiny networks' times are mostly noise)
    again = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "measuring" not in again.stdout, again.stdout[-3000:]  # kept in the study
    assert json.loads((tmp_path / "grid" / "best.json").read_text())["latency_train"] == best["latency_train"]


@pytest.mark.parametrize("override, message", [
    ("--config.search.sampler=tpe", "search.constraint=latency works with search.sampler=grid"),
    ("--config.search.latency_kind=wall", "search.latency_kind must be train or infer"),
    ("--config.search.latency_tolerance=-0.5", "search.latency_tolerance must be > 0"),
    ("--config.search.latency_window=1.5", "search.latency_window must be in (0, 1)"),
])
def test_what_the_latency_constraint_cannot_serve_is_one_line(tmp_path, override, message):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "experiments.grid_search", f"--workdir={tmp_path / 'grid'}",
                           *LATENCY_GRID, override], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1, \
        proc.stderr
    assert message in proc.stderr and not (tmp_path / "grid" / "study.journal").exists()
