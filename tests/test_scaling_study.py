"""Scaling study: matched-budget construction (no training), a tiny end-to-end run, resume."""

import json
import os
import sys

import pytest

from effnet_jax.errors import UserError
from effnet_jax.model.scaling import PAPER_CONSTANTS
from effnet_jax.training import trainer
from experiments import scaling_study, trials
from experiments.configs import scaling_study as study_config


def _plan(network: str = "b0", budgets: tuple = (1.0, 2.0, 4.0), constants: dict | None = None):
    config = study_config.get_config()
    config.train.model.network = network
    config.study.budgets = budgets
    return config, scaling_study.plan(config, constants or dict(PAPER_CONSTANTS), num_classes=10)


@pytest.mark.parametrize("network, budgets", [("b0", (1.0, 2.0, 4.0)), ("tiny", (1.0, 2.0))])
def test_each_family_matches_its_budget_and_scales_only_its_axis(network, budgets):
    config, points = _plan(network, budgets)
    base = points[0]
    assert base.family == "baseline" and base.ratio == 1.0
    assert (base.width, base.depth, base.resolution) == (1.0, 1.0, 32)
    families = {(p.family, p.budget) for p in points[1:]}
    # 1x is the shared baseline, never a second trial; every family has a model per larger budget
    assert families == {(f, b) for f in scaling_study.FAMILIES for b in budgets[1:]}
    for p in points[1:]:
        assert abs(p.ratio / p.budget - 1) <= config.study.tolerance, (p.family, p.budget, p.ratio)
        c = p.candidate
        if p.family == "width":
            assert (c.alpha, c.gamma, p.phi) == (1.0, 1.0, 1.0) and p.width > 1
            assert (p.depth, p.resolution, p.blocks) == (1.0, 32, base.blocks)
        elif p.family == "depth":
            assert (c.beta, c.gamma, p.phi) == (1.0, 1.0, 1.0) and p.blocks > base.blocks
            assert (p.width, p.resolution) == (1.0, 32)
        elif p.family == "resolution":
            assert (c.alpha, c.beta, p.phi) == (1.0, 1.0, 1.0) and p.resolution > 32
            assert (p.width, p.depth, p.blocks) == (1.0, 1.0, base.blocks)
        else:
            assert (c.alpha, c.beta, c.gamma) == tuple(PAPER_CONSTANTS.values()) and p.phi > 0
            assert (p.width, p.depth) == pytest.approx((1.1**p.phi, 1.2**p.phi))
        # the MACs are those of the model the trial runner trains
        cfg = trials.trial_config(config.train, c, p.phi, seed=0)
        assert (cfg.model.alpha, cfg.model.beta, cfg.model.gamma, cfg.model.phi) == (c.alpha, c.beta, c.gamma, p.phi)


def test_width_and_depth_land_close_and_the_closer_neighbour_wins():
    _, points = _plan("b0", budgets=(2.0, 4.0))
    for p in points[1:]:
        if p.family in ("width", "depth"):  # fine-grained axes: within 5% at 32 px
            assert abs(p.ratio / p.budget - 1) < 0.05, (p.family, p.budget, p.ratio)
    # matching never returns a coefficient that costs more than needed for the same model
    base_macs = points[0].macs
    calls = []

    def macs_at(coef: float) -> int:
        calls.append(coef)
        return int(base_macs * (1 + 3 * (coef >= 1.5)))  # a step: 1x below 1.5, 4x from 1.5

    coef, macs = scaling_study.match_budget("width", 3.0, base_macs, macs_at, 0.5)
    assert (coef, macs) == (1.5, 4 * base_macs)
    with pytest.raises(UserError, match="within 10%"):
        scaling_study.match_budget("width", 2.0, base_macs, macs_at, 0.1)


def test_constants_file_drives_the_compound_family(tmp_path):
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"alpha": 1.4, "beta": 1.0, "gamma": 1.0, "val_top1": 0.9}))
    config = study_config.get_config()
    config.study.constants = str(path)
    constants = scaling_study.check_config(config)
    assert constants == {"alpha": 1.4, "beta": 1.0, "gamma": 1.0}
    config.study.budgets = (2.0,)
    points = scaling_study.plan(config, constants, num_classes=10)
    comp = next(p for p in points if p.family == "compound")
    assert comp.width == 1.0 and comp.resolution == 32 and comp.depth == pytest.approx(1.4**comp.phi)
    growth = scaling_study.flops_growth(config.train, constants, [0.0, 1.0], 10)
    assert growth["product"] == pytest.approx(1.4)
    assert growth["rows"][0]["measured_ratio"] == 1.0 and growth["rows"][1]["predicted_ratio"] == pytest.approx(1.4)


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("--config.study.families=('width','bogus')", "study.families"),
    ("--config.study.budgets=(0.5,2)", "study.budgets"),
    ("--config.study.seeds=()", "study.seeds"),
    ("--config.study.constants=/nonexistent/best.json", "not found"),
    ("--config.study.budgets=(1,2)", "within 1%"),
    ("--config.study.nosuch=1", "unknown config field 'study.nosuch'"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, override, message):
    workdir = tmp_path / "study"
    extra = ["--config.study.tolerance=0.01"] if "within" in message else []
    argv = ["prog", f"--workdir={workdir}", override, *extra]
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections' config overrides are read from sys.argv
    with pytest.raises(SystemExit) as e:
        scaling_study.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not workdir.exists()


@pytest.mark.slow
def test_tiny_end_to_end_writes_outputs_then_resume_runs_nothing(tmp_path, monkeypatch):
    workdir = str(tmp_path / "study")
    argv = ["prog", f"--workdir={workdir}", "--config.train.model.network=tiny", "--config.train.num_train_steps=2",
            "--config.study.budgets=(1,2)", "--config.study.seeds=(0,)", "--config.study.families=('compound',)"]
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections' config overrides are read from sys.argv
    out = scaling_study.main(argv)
    for name in ("study.journal", "study.csv", "summary.json", "accuracy_vs_macs.png", "flops_growth.json"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    rows = out["rows"]
    assert len(rows) == 2  # the baseline + compound at 2x, one seed (the plan tests cover every family)
    assert {r["family"] for r in rows} == {"baseline", "compound"}
    assert all(r["status"] == "ok" and r["steps"] == 2 for r in rows)
    for r in rows:  # what the trainer built is what the plan measured
        point = next(p for p in out["points"] if p.key == r["point"])
        assert r["macs"] == point.macs and r["resolution"] == point.resolution
    growth = json.load(open(os.path.join(workdir, "flops_growth.json")))
    compound = next(p for p in out["points"] if p.family == "compound")
    assert {0.0, 1.0, compound.phi} <= {g["phi"] for g in growth["rows"]}
    assert all(g["predicted_ratio"] == pytest.approx(growth["product"] ** g["phi"]) for g in growth["rows"])

    assert not any(os.path.exists(os.path.join(workdir, "trials", r["trial_id"], "checkpoints")) for r in rows)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished trial was trained again")

    monkeypatch.setattr(trainer, "train_and_evaluate", no_training)
    again = scaling_study.main(argv)
    assert len(again["rows"]) == 2
    assert [s["mean"] for s in again["summary"]] == [s["mean"] for s in out["summary"]]


def test_latency_match_aims_the_macs_until_the_measured_time_lands():
    config = study_config.get_config()
    base_macs = trials.figures(config.train, trials.BASELINE, 0.0, 10)["macs"]

    def macs_at(w: float) -> int:
        return trials.figures(config.train, *scaling_study.family_candidate("width", w, {}), 10)["macs"]

    probes = []

    def latency_at(w: float) -> float:  # time grows slower than MACs: the MACs match alone undershoots
        probes.append(w)
        return (macs_at(w) / base_macs) ** 0.6

    coef, ratio = scaling_study.match_latency("width", 2.0, base_macs, macs_at, latency_at, tolerance=0.1)
    assert abs(ratio / 2.0 - 1) <= 0.1 and ratio == latency_at(coef)
    assert 1 < len(set(probes)) <= 5  # a few networks compiled, not a bisection's dozen
    macs_coef, _ = scaling_study.match_budget("width", 2.0, base_macs, macs_at, 0.3)
    assert coef > macs_coef  # it had to go past the MACs match
    with pytest.raises(UserError, match="cannot get within 10% of 2x the baseline's measured time"):
        scaling_study.match_latency("width", 2.0, base_macs, macs_at, lambda w: 1.0, tolerance=0.1)


@pytest.mark.slow
def test_tiny_study_matched_on_measured_time_keeps_its_measurements(tmp_path, monkeypatch):
    config = study_config.get_config()
    config.train.model.network, config.train.num_train_steps = "tiny", 2
    s = config.study
    s.budgets, s.seeds, s.families, s.match, s.latency_rounds, s.tolerance = (1, 2), (0,), ("width",), "latency", 2, 5.0
    workdir = str(tmp_path / "study")
    _, points, _ = scaling_study.setup(config, workdir, log=lambda m: None)
    width = next(p for p in points if p.family == "width")
    assert width.latency is not None and width.latency > 0 and points[0].latency == 1.0
    summary = scaling_study.summarize([], points, "val_top1")
    assert next(e for e in summary if e["family"] == "width")["latency"] == width.latency
    assert "x time" in scaling_study.format_table(summary, "val_top1")

    def no_timing(*args, **kwargs):
        raise AssertionError("a stored measurement was taken again")

    from effnet_jax.training import latency

    monkeypatch.setattr(latency, "step_runner", no_timing)  # a worker or a rerun plans from the study's
    _, again, _ = scaling_study.setup(config, workdir, log=lambda m: None)
    assert [(p.key, p.latency) for p in again] == [(p.key, p.latency) for p in points]
