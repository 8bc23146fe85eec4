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
