"""Measured cost: interleaved medians and their spread, and a real measurement on the tiny network."""

import os

import pytest
from suite_paths import CACHE

from effnet_jax.configs import digits
from effnet_jax.training import latency
from experiments import strategies


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


@pytest.mark.slow
def test_measure_times_a_few_networks_at_a_time_beside_the_reference(monkeypatch):
    # a grid's worth of compiled programs at once exhausted host memory; each group is released first
    live, peak, built = set(), [0], []

    class Runner:
        def __init__(self, name, kind):
            self.name = name
            live.add(id(self))
            peak[0] = max(peak[0], len(live))
            built.append((kind, name))

        def __call__(self, steps):
            pass

        def __del__(self):
            live.discard(id(self))

    monkeypatch.setattr(latency, "step_runner", lambda config, nc, kind, spe: Runner(config, kind))
    configs = {name: name for name in ["ref", *"abcde"]}
    out = latency.measure(configs, 10, "ref", rounds=3, steps=1, group=2)
    assert peak[0] == 3  # the reference and two others
    assert [name for kind, name in built if kind == "train"] == ["ref", "a", "b", "ref", "c", "d", "ref", "e"]
    assert set(out) == set(configs) and all(set(costs) == set(latency.KINDS) for costs in out.values())
    assert out["ref"]["train"]["ratio"] == 1.0
    with pytest.raises(ValueError, match="reference"):
        latency.measure(configs, 10, "missing")


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("--config.search.sampler=tpe", "search.constraint=latency works with search.sampler="
     + " or ".join(sorted(n for n, p in strategies.PROPOSERS.items() if not p.on_surface))),
    ("--config.search.latency_kind=wall", f"search.latency_kind must be {' or '.join(latency.KINDS)}"),
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


@pytest.mark.slow
def test_measure_latency_times_every_candidate_whatever_the_constraint(tmp_path):
    from experiments import grid_search
    from experiments.configs import grid_search as grid_config

    config = grid_config.get_config()
    s, train = config.search, config.train
    s.alpha, s.beta, s.gamma, s.tolerance = (1.2, 1.3), (1.05, 1.05), (1.2, 1.2), 0.5  # the formula keeps both
    s.measure_latency, s.latency_window, s.latency_rounds, s.include_paper = True, 0.01, 2, False
    train.model.network, train.compile_cache_dir = "tiny", CACHE
    run = grid_search.setup(config, str(tmp_path), log=lambda m: None)
    assert len(run.cands) == 4 and run.meter is not None  # three grid points and the baseline
    # the window (for choosing what the latency constraint compiles) does not hide a candidate's cost
    for c in run.cands:
        cost = run.meter.measurements[run.meter.network_key(c)]
        assert all(cost[kind]["ratio"] > 0 for kind in latency.KINDS)


@pytest.mark.slow
def test_latency_table_times_every_network_a_constraint_could_keep_and_compares_runs(tmp_path, capsys):
    import json

    from experiments import latency_table

    grid = ["--config.search.alpha=(1.2,1.3)", "--config.search.beta=(1.05,1.05)", "--config.search.gamma=(1.2,1.2)",
            "--config.search.tolerance=0.2", "--config.search.latency_rounds=2",
            "--config.train.model.network=tiny", f"--config.train.compile_cache_dir={CACHE}"]
    rows = latency_table.main(["prog", f"--out={tmp_path / 'a.json'}", *grid])
    labels = [r["label"] for r in rows]
    assert labels[0] == "baseline" and "paper" in labels and rows[0]["xtrain"] == rows[0]["xinfer"] == 1.0
    formula = [r for r in rows if "formula" in r.get("admitted_by", [])]
    assert formula and all(abs(r["alpha"] * r["beta"] ** 2 * r["gamma"] ** 2 - 2.0) <= 0.2 for r in formula)
    assert all(r["xtrain"] > 0 and r["xinfer"] > 0 and r["xmacs"] > 0 for r in rows)
    assert "admitted by" in capsys.readouterr().out
    data = json.loads((tmp_path / "a.json").read_text())
    for r in data["rows"]:  # a second "run" 10% slower on every network but the last
        r["xtrain"] *= 1.0 if r is data["rows"][-1] else 1.1
    (tmp_path / "b.json").write_text(json.dumps(data))
    latency_table.main(["prog", f"--compare={tmp_path / 'a.json'},{tmp_path / 'b.json'}"])
    out = capsys.readouterr().out
    n = len(rows) - 1
    assert f"xtrain: 1/{n} networks within 5% between the runs" in out and "largest +10.0%" in out
    assert f"xinfer: {n}/{n} networks within 5%" in out
    with pytest.raises(SystemExit) as e:
        latency_table.main(["prog", f"--compare={tmp_path / 'a.json'}"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --compare takes two JSON files")


SHARED_COMPILE = r"""
import os, sys
from effnet_jax import compile_cache
from effnet_jax.training import latency, recipe, trainer
from effnet_jax.configs import digits
cache, workdir = sys.argv[1], sys.argv[2]
compile_cache.enable(cache)
c = digits.get_config()
c.model.network, c.model.resolution, c.batch_size, c.num_train_steps, c.schedule_steps = "tiny", 32, 16, 6, 18
c.log_every_steps, c.eval_every_steps, c.progress_bar, c.save_weights = 3, 10**9, False, False
prepared = recipe.prepare(c)
def entries():
    return {f: os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache)}
for kind in latency.KINDS:
    latency.step_runner(c, prepared.source.num_classes, kind, prepared.steps_per_epoch)(1)
measured = entries()
trainer.train_and_evaluate(c, workdir, prepared)
new = {f: n for f, n in entries().items() if f not in measured}
print(max(measured.values()), max(new.values(), default=0))
"""


@pytest.mark.slow
def test_a_measured_network_hands_its_trial_the_compiled_train_step(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", SHARED_COMPILE, str(tmp_path / "cache"), str(tmp_path / "run")],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    largest_measured, largest_new = map(int, proc.stdout.split()[-2:])
    # the train step is the largest program; the trial compiled nothing of its size again (a different
    # learning-rate schedule or batch would have made it compile its own)
    assert largest_new < largest_measured / 4, (largest_measured, largest_new)
