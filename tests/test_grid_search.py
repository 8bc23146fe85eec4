"""Grid search: candidates, the plan, halving with continuation, verdicts, outputs, best.json hand-off."""

import json
import os
import sys

import numpy as np
import pytest
from suite_paths import CACHE

from effnet_jax import create_model, from_constants, load_constants
from effnet_jax.errors import UserError
from experiments import constraints, runner, stats, strategies, trials
from experiments import grid_search as gs
from experiments.configs import grid_search as grid_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two grid points that round to the same tiny network (one compile), plus the references.
SMALL = {"alpha": (1.2, 1.25), "beta": (1.05, 1.05), "gamma": (1.2, 1.2), "tolerance": 0.1}


def small_config(cache_dir, steps=2, **search):
    c = grid_config.get_config()
    c.train.model.network = "tiny"
    c.train.num_train_steps = steps
    c.train.compile_cache_dir = str(cache_dir)
    c.search.strategy = "exhaustive"
    c.search.final_seeds = ()
    for k, v in {**SMALL, **search}.items():
        c.search[k] = v
    return c


def quiet(*_):
    return None


@pytest.fixture(scope="module")
def cache_dir():
    """The suite's compilation cache (tests/conftest.py): the tiny network's programs compile once per run."""
    return CACHE


def network(train_config, c):
    spec, arch = trials.network(train_config, c)
    return arch, spec.resolution


def macs(train_config, c):
    return trials.figures(train_config, c, 1.0, 10)["macs"]


def test_default_candidates_satisfy_constraint_and_include_references():
    s = grid_config.get_config().search
    cands = constraints.candidates(s)
    grid = [c for c in cands if not c.label]
    assert len(grid) >= 9
    for c in grid:
        assert abs(c.product - s.target) <= s.tolerance
        assert s.alpha[0] <= c.alpha <= s.alpha[1] and s.beta[0] <= c.beta <= s.beta[1]
        assert s.gamma[0] <= c.gamma <= s.gamma[1]
        assert min(c.alpha, c.beta, c.gamma) >= 1.0
    labels = {c.label: c for c in cands if c.label}
    assert (labels["paper"].alpha, labels["paper"].beta, labels["paper"].gamma) == (1.2, 1.1, 1.15)
    assert (labels["baseline"].alpha, labels["baseline"].beta, labels["baseline"].gamma) == (1.0, 1.0, 1.0)
    assert len({c.key for c in cands}) == len(cands)


def test_grid_values_and_step():
    assert constraints.grid_values((1.0, 1.2), 0.05) == [1.0, 1.05, 1.1, 1.15, 1.2]
    with pytest.raises(UserError):
        constraints.grid_values((0.9, 1.2), 0.05)


def test_no_candidate_names_the_closest_point():
    s = grid_config.get_config().search
    s.alpha, s.beta, s.gamma, s.tolerance = (1.0, 1.1), (1.0, 1.05), (1.0, 1.05), 0.01
    with pytest.raises(UserError, match=r"closest is alpha=1.1, beta=1.05, gamma=1.05"):
        constraints.candidates(s)


def test_macs_constraint_keeps_real_cost_one_point_per_network():
    c = grid_config.get_config()
    c.train.model.base_resolution = 40
    s = c.search
    s.constraint, s.macs_tolerance = "macs", 0.1
    s.alpha = s.beta = s.gamma = (1.0, 1.25)
    cands = constraints.candidates(s, c.train, 10)
    base = macs(c.train, trials.BASELINE)
    nets = [network(c.train, x) for x in cands]
    assert len(set(nets)) == len(nets)  # every network trained once; the paper's stands for its grid twin
    grid = [x for x in cands if not x.label]
    assert len(grid) >= 4
    for x in grid:
        assert abs(macs(c.train, x) / base / 2.0 - 1) <= 0.1
    # the rule keeps points the formula would reject, and rejects points the formula keeps
    assert any(abs(x.product - 2.0) > 0.1 for x in grid)
    formula = grid_config.get_config().search
    dropped = [x for x in constraints.candidates(formula) if not x.label and x.key not in {y.key for y in cands}]
    assert dropped and all(abs(macs(c.train, x) / base / 2.0 - 1) > 0.1 or network(c.train, x) in nets
                           for x in dropped)
    # the winner must be on the real-MACs constraint; the formula's product does not matter
    entry = {"label": "", "product": 1.5, "macs_ratio": 2.1}
    rule = constraints.constraint_for(s)
    assert rule.satisfies(entry) and not rule.satisfies({**entry, "macs_ratio": 2.3})
    assert not rule.satisfies({**entry, "label": "baseline"})


def test_macs_constraint_without_a_point_names_the_closest():
    c = grid_config.get_config()  # 32 px: any gamma > 1 jumps the cost
    c.search.constraint, c.search.macs_tolerance = "macs", 0.05
    with pytest.raises(UserError, match=r"closest is alpha=.* at 2\.\d\dx.*base_resolution"):
        constraints.candidates(c.search, c.train, 10)


@pytest.mark.parametrize("field, value, message", [
    ("halving_eta", 0, "halving_eta"), ("halving_eta", 1, "halving_eta"), ("halving_rungs", 0, "halving_rungs"),
    ("strategy", "random", "strategy"), ("metric", "accuracy", "metric"), ("seeds", (), "seeds"),
    ("final_seeds", (0, 0), "final_seeds"), ("alpha_level", 2.0, "alpha_level"), ("constraint", "flops", "constraint"),
    ("rung_mode", "snapshot", "search.rung_mode must be continued, cooldown or independent, got 'snapshot'"),
    ("max_seeds", 1, r"search.max_seeds must be 0 \(no racing\) or at least the top rung's 2 seeds"),
    ("max_seeds", -1, "search.max_seeds"),
    ("test", "student", "search.test"),
])
def test_whole_search_config_is_checked_before_any_trial(field, value, message):
    c = grid_config.get_config()
    c.search[field] = value
    with pytest.raises(UserError, match=message):
        gs.check_search(c)


@pytest.mark.parametrize("changes, message", [
    ({"constraint": "macs", "macs_tolerance": 0.0}, "macs_tolerance"),
    ({"constraint": "macs", "sampler": "tpe"}, "sampler=grid"),
])
def test_macs_constraint_settings_are_checked(changes, message):
    c = grid_config.get_config()
    for k, v in changes.items():
        c.search[k] = v
    with pytest.raises(UserError, match=message):
        gs.check_search(c)


def test_plan_longest_first_rungs_and_continuation():
    c = grid_config.get_config()
    cands = constraints.candidates(c.search)
    steps = gs.rung_steps(c, steps_per_epoch=67)  # num_train_steps = 40 wins over num_epochs
    assert steps == [40, 120]  # halving: eta = 3 times longer at the top rung
    plans = gs.plan_rung(c, cands, 0, steps, 10)
    assert len(plans) == len(cands) * len(c.search.seeds) and len({p.key for p in plans}) == len(plans)
    assert all(p.keep_checkpoint and p.config.num_train_steps == 40 and p.config.schedule_steps == 120
               for p in plans)
    # every trial's schedule spans the top rung, so a promoted run continues its rung-0 directory
    top = gs.plan_rung(c, cands[:2], 1, steps, 10)
    assert {p.attrs["seed"] for p in top} == set(c.search.final_seeds)
    assert all(not p.keep_checkpoint and p.config.num_train_steps == 120 for p in top)
    assert {p.directory for p in top} >= {p.directory for p in plans if p.attrs["alpha"] == cands[0].alpha
                                          and p.attrs["beta"] == cands[0].beta and p.attrs["gamma"] == cands[0].gamma}
    # longest first: every network's first (compiling) trial before any repeat; the paper's point rounds to the
    # network of (1.25, 1.1, 1.15) at 32 px, so it reuses that compile and runs last; the baseline before it
    order = [(p.attrs["alpha"], p.attrs["beta"], p.attrs["gamma"], p.attrs["label"]) for p in plans]
    assert order[-1][3] == "paper" and order[-2][3] == "baseline"
    assert order.index((1.25, 1.1, 1.15, "")) < order.index((1.2, 1.1, 1.15, "paper"))


def test_survivors_keep_the_best_third_and_the_references():
    cands = [trials.Candidate(1.0 + i / 10, 1.0, 1.0) for i in range(6)] + [
        trials.Candidate(1.2, 1.1, 1.15, "paper"), trials.Candidate(1.0, 1.0, 1.0, "baseline")]
    scores = [0.5, 0.9, 0.1, 0.8, 0.3, 0.7, 0.2, 0.99]
    rows = [{"label": c.label, "alpha": c.alpha, "beta": c.beta, "gamma": c.gamma, "product": c.product, "rung": 0,
             "status": "ok", "val_top1": v, "macs": 1} for c, v in zip(cands, scores)]
    kept = strategies.Halving(grid_config.get_config().search).survivors(gs.summarize(rows, "val_top1"), cands, 0)
    assert [(c.alpha, c.label) for c in kept] == [(1.1, ""), (1.3, ""), (1.2, "paper"), (1.0, "baseline")]


def test_pick_best_skips_baseline_and_off_constraint():
    s = grid_config.get_config().search
    summary = [
        {"label": "baseline", "alpha": 1.0, "beta": 1.0, "gamma": 1.0, "product": 1.0, "mean": 0.99, "rung": 0,
         "macs": 1},
        {"label": "paper", "alpha": 1.2, "beta": 1.1, "gamma": 1.15, "product": 1.92, "mean": 0.95, "rung": 0,
         "macs": 2},
        {"label": "", "alpha": 1.25, "beta": 1.1, "gamma": 1.15, "product": 2.0, "mean": 0.9, "rung": 0, "macs": 2},
    ]
    best = gs.pick_best(summary, s)  # tolerance 0.02: the paper point (1.92) is off the constraint
    assert (best["alpha"], best["beta"], best["gamma"]) == (1.25, 1.1, 1.15)


def _rows(scores: dict, rung: int = 0):
    out = []
    for (a, b, g, label), values in scores.items():
        for seed, v in enumerate(values):
            out.append({"label": label, "alpha": a, "beta": b, "gamma": g, "product": a * b * b * g * g,
                        "rung": rung, "seed": seed, "status": "ok", "val_top1": v, "macs": 10})
    return out


def test_verdicts_separated_tied_and_one_seed():
    s = grid_config.get_config().search
    win, tie, low = (1.25, 1.1, 1.15, ""), (1.15, 1.15, 1.15, ""), (1.15, 1.25, 1.05, "")
    paper = (1.2, 1.1, 1.15, "paper")
    rows = _rows({win: [0.90, 0.91, 0.89], tie: [0.88, 0.93, 0.86], low: [0.50, 0.52, 0.51],
                  paper: [0.60, 0.61, 0.62]})
    summary = gs.summarize(rows, "val_top1", base_macs=5, num_eval=360)
    best = gs.pick_best(summary, s)
    assert (best["alpha"], best["beta"], best["gamma"]) == win[:3]
    assert best["half"] is not None and best["macs_ratio"] == 2.0
    v = gs.judge(summary, best, s)
    assert v["verdicts"][trials.candidate_name(best)] == "best"
    assert v["verdicts"]["(1.15, 1.15, 1.15)"] == "tied with best"
    assert v["verdicts"]["(1.15, 1.25, 1.05)"] == "below"
    assert stats.TEST_NAME in v["sentence"] and "Contender set: 2 of 4" in v["sentence"]
    assert [(c["alpha"], c["beta"], c["gamma"]) for c in v["contender_set"]] == [win[:3], tie[:3]]
    assert v["seeds"] == [0, 1, 2] and v["seed_model"]["residual_dof"] == 6
    table = gs.format_table(summary, "val_top1", v["verdicts"])
    marked = [ln for ln in table.splitlines() if ln[2:3] == "*"]  # the C column
    assert len(marked) == 2 and "contender set" in table
    s.test = "welch"
    welch = gs.summarize(rows, "val_top1", num_eval=360, test="welch")
    w = gs.judge(welch, gs.pick_best(welch, s), s)
    assert "Welch" in w["sentence"] and w["verdicts"] == v["verdicts"]
    s.test = "pooled"
    one = gs.summarize(_rows({win: [0.9], low: [0.5]}), "val_top1")
    v1 = gs.judge(one, gs.pick_best(one, s), s)
    assert "one seed" in v1["sentence"].lower() or "nothing" in v1["sentence"].lower()
    assert "below" not in v1["verdicts"].values()
    # candidates cut at a cheaper rung are named as outside the set (two runs can promote different ones)
    top = [dict(r, rung=1) for r in rows]
    halved = gs.summarize(top + _rows({(1.15, 1.05, 1.25, ""): [0.3], (1.25, 1.2, 1.05, ""): [0.2]}), "val_top1")
    h = gs.judge(halved, gs.pick_best(halved, s), s)
    assert h["cut"] == 2 and "the 4 candidates at the deciding rung; 2 others were cut" in h["sentence"]
    assert v["cut"] == 0 and "cut" not in v["sentence"]


def test_rung_agreement_between_rungs():
    a, b, c = (1.25, 1.1, 1.15, ""), (1.15, 1.15, 1.15, ""), (1.15, 1.25, 1.05, "")
    rows = _rows({a: [0.3], b: [0.2], c: [0.1]}, rung=0) + _rows({a: [0.9, 0.9], b: [0.8, 0.8], c: [0.7, 0.7]}, 1)
    (agree,) = gs.rung_agreement(rows, "val_top1")
    assert agree["kendall_tau"] == pytest.approx(1.0) and agree["same_winner"]
    rows = _rows({a: [0.1], b: [0.2], c: [0.3]}, rung=0) + _rows({a: [0.9], b: [0.8], c: [0.7]}, 1)
    (agree,) = gs.rung_agreement(rows, "val_top1")
    assert agree["kendall_tau"] == pytest.approx(-1.0) and not agree["same_winner"]


def test_rung_taus_carry_intervals_and_the_top_rung_its_noise_ceiling():
    cands = [(1.0 + i / 20, 1.1, 1.15, "") for i in range(8)]
    rng = np.random.default_rng(0)
    rows = _rows({c: [0.1 * i] for i, c in enumerate(cands)}, rung=0)
    rows += _rows({c: [0.5 + 0.05 * i + float(rng.normal(0, 0.005)) for _ in range(2)] for i, c in enumerate(cands)}, 1)
    (agree,) = gs.rung_agreement(rows, "val_top1")
    assert agree["kendall_tau"] == pytest.approx(1.0) and agree["kendall_ci"] == [1.0, 1.0]
    ceiling = gs.noise_ceiling(rows, "val_top1")
    assert ceiling["rung"] == 1 and ceiling["tau"] == pytest.approx(1.0) and ceiling["seeds"] == [0, 1]
    assert "limited by seed noise" in gs.ceiling_line([agree], ceiling, [40, 120])
    # seeds that disagree at the top rung: within seed noise, and the line says what to raise
    noisy = _rows({c: [0.1 * i] for i, c in enumerate(cands)}, rung=0) + _rows(
        {c: [0.8 + float(rng.normal(0, 0.01)) for _ in range(2)] for c in cands}, 1)
    ceiling = gs.noise_ceiling(noisy, "val_top1")
    assert ceiling["ci"][0] <= 0 and ceiling["ci"][0] <= ceiling["tau"] <= ceiling["ci"][1]
    line = gs.ceiling_line(gs.rung_agreement(noisy, "val_top1"), ceiling, [40, 120])
    assert "within seed noise" in line and "120 steps" in line and "fashion_mnist.py" in line
    line = gs.ceiling_line(gs.rung_agreement(noisy, "val_top1"), ceiling, [40, 120], "fashion_mnist")
    assert "within seed noise" in line and "num_train_steps" in line and "fashion_mnist.py" not in line
    # one seed at the top rung: the ceiling is unknown, and the line says so
    assert "unknown" in gs.ceiling_line([], gs.noise_ceiling(rows[:8], "val_top1"), [40])


def test_training_share_counts_the_steps_each_trial_trained():
    """A rung-1 trial that continued a 40-step checkpoint to 120 trained 80 steps: its share is its own
    timed steps over its wall time, not where its run ended (the figure once read 50% for a true 43%)."""
    rows = [{"steps": 40, "batch_size": 16, "train_img_per_s": 64.0, "wall_time_s": 50.0, "timings": {"train_s": 10.0}},
            {"steps": 120, "batch_size": 16, "train_img_per_s": 64.0, "wall_time_s": 30.0,
             "timings": {"train_s": 20.0}},
            {"steps": 120, "batch_size": 16, "wall_time_s": 20.0, "timings": None}]  # an old row: wall time only
    assert gs.training_share(rows) == pytest.approx(30.0 / 100.0)
    assert gs.training_share([{"wall_time_s": 5.0, "timings": {}}]) is None


def test_search_writes_outputs_and_best_json_round_trips(tmp_path, cache_dir):
    c = small_config(cache_dir)
    out = gs.search(c, str(tmp_path), log=quiet)
    rows = out["rows"]
    assert len(rows) == len(constraints.candidates(c.search))
    assert all(r["status"] == "ok" and r["state"] == "COMPLETE" for r in rows)
    for name in ("study.journal", "results.csv", "best.json", "grid.png", "accuracy_vs_macs.png"):
        assert (tmp_path / name).exists(), name
    assert os.listdir(tmp_path / "tensorboard_hparams")
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["config"]["search"]["target"] == 2.0 and best["config"]["train"]["model"]["network"] == "tiny"
    assert best["num_classes"] == 10 and best["dataset"] == "digits" and "sentence" in best["verdict"]
    # two steps of the tiny network learn nothing: every score sits at the majority class's rate, and best.json
    # says that it is no answer (what the user's constants loader refuses); the answer's round trip: below
    chance = best["learning"]["chance"]
    assert 0.09 < chance < 0.12 and all(abs(v - chance) < 0.05 for r in rows for v in [r["val_top1"]])
    assert best["answer"] is False and "did not learn" in best["reason"] and "num_train_steps" in best["reason"]
    with pytest.raises(UserError, match="is no answer: the trials did not learn"):
        load_constants(tmp_path / "best.json")
    assert best["provenance"]["jax"] and best["provenance"]["device_count"] >= 1 and "noise_ceiling" in best
    row = rows[0]
    for key in ("alpha", "beta", "gamma", "product", "resolution", "width", "depth", "blocks", "params", "macs",
                "val_top1", "train_loss", "wall_time_s", "train_img_per_s", "status", "seed"):
        assert row.get(key) is not None, key
    # finished trials keep no checkpoint
    assert not any(os.path.exists(tmp_path / "trials" / d / "checkpoints") for d in os.listdir(tmp_path / "trials"))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished trial was trained again")

    real = gs.trainer.train_and_evaluate
    gs.trainer.train_and_evaluate = no_training
    try:  # a rerun finds every trial done: same rows, nothing trained
        again = gs.search(c, str(tmp_path), log=quiet)
    finally:
        gs.trainer.train_and_evaluate = real
    assert [r["val_top1"] for r in again["rows"]] == [r["val_top1"] for r in rows]


def test_a_search_that_learned_writes_an_answer_with_its_contender_set(tmp_path, monkeypatch):
    monkeypatch.setattr(gs.trainer, "train_and_evaluate", _fake_training)  # scores far above chance
    c = small_config(tmp_path / "cache", alpha=(1.1, 1.3), tolerance=0.3)
    c.search.seeds = (0, 1)
    out = gs.search(c, str(tmp_path / "wd"), log=quiet)
    assert out["learning"]["learned"] and all(out["learning"]["above"].values())
    best = json.loads((tmp_path / "wd" / "best.json").read_text())
    assert best["answer"] is True and "reason" not in best
    assert best["test"] == stats.TEST_NAME and best["alpha_level"] == 0.05 and best["test_seeds"] == [0, 1]
    # equal seeds: no seed noise, so any difference separates; the contender set is the winner alone
    assert [(x["alpha"], x["beta"], x["gamma"]) for x in best["contenders"]] == [(best["alpha"], best["beta"],
                                                                                  best["gamma"])]
    assert best["contenders"][0]["mean"] == best["val_top1"] and "Contender set: 1 of" in best["verdict"]["sentence"]
    for key in ("jax", "jaxlib", "flax", "optax", "device_kind", "device_count", "cpu", "effnet_jax", "commit"):
        assert key in best["provenance"], key
    constants = load_constants(tmp_path / "wd" / "best.json")
    assert constants == {"alpha": best["alpha"], "beta": best["beta"], "gamma": best["gamma"]}
    spec = from_constants(**constants, phi=1, base_resolution=32, resolution_multiple=1)
    model = create_model(spec, num_classes=10)
    assert model.arch.blocks and spec.resolution == best["resolution"]


def test_search_on_real_macs_picks_a_winner_on_that_constraint(tmp_path, cache_dir):
    c = small_config(cache_dir, steps=1, constraint="macs", macs_tolerance=0.1, alpha=(1.3, 1.3), beta=(1.05, 1.05),
                     gamma=(1.05, 1.1), include_paper=False)
    c.train.model.base_resolution = 40
    out = gs.search(c, str(tmp_path), log=quiet)
    assert len(out["rows"]) == 3 and not out["macs_warnings"]  # two tiny networks at 2x +- 10%, the baseline
    best = json.loads((tmp_path / "best.json").read_text())
    assert abs(best["macs_ratio"] / 2.0 - 1) <= 0.1 and best["config"]["search"]["constraint"] == "macs"


def test_changed_trial_config_is_refused_by_name(tmp_path, cache_dir):
    c = small_config(cache_dir, include_baseline=False, include_paper=False)
    gs.search(c, str(tmp_path), log=quiet)
    c.train.batch_size = 8
    with pytest.raises(UserError, match=r"batch_size 16 -> 8"):
        gs.search(c, str(tmp_path), log=quiet)
    c = small_config(cache_dir, steps=3, include_baseline=False, include_paper=False)
    with pytest.raises(UserError, match=r"num_train_steps 2 -> 3"):
        gs.search(c, str(tmp_path), log=quiet)


def test_old_results_jsonl_workdir_is_refused_with_what_to_do(tmp_path, cache_dir):
    (tmp_path / "results.jsonl").write_text('{"alpha": 1.2}\n')
    with pytest.raises(UserError, match="new --workdir"):
        gs.search(small_config(cache_dir), str(tmp_path), log=quiet)


def test_halving_continues_promoted_runs_and_decides_at_the_top_rung(tmp_path, cache_dir):
    c = small_config(cache_dir, steps=2, strategy="halving", halving_eta=2, halving_rungs=2, include_paper=False,
                     final_seeds=(0, 1), alpha=(1.2, 1.3), tolerance=0.3)
    c.train.checkpoint_every_steps = 1
    seen = []
    real = gs.trainer.train_and_evaluate

    def spy(cfg, workdir, *a, **k):
        ckpt = os.path.join(workdir, "checkpoints")
        seen.append((os.path.basename(workdir), cfg.num_train_steps,
                     sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []))
        return real(cfg, workdir, *a, **k)

    gs.trainer.train_and_evaluate = spy
    try:
        out = gs.search(c, str(tmp_path), log=quiet)
    finally:
        gs.trainer.train_and_evaluate = real
    grid = [x for x in constraints.candidates(c.search) if not x.label]
    assert len(grid) == 3
    top = [r for r in out["rows"] if r["rung"] == 1]
    assert {r["seed"] for r in top} == {0, 1} and all(r["steps"] == 4 for r in top)
    assert len({(r["alpha"], r["beta"], r["gamma"]) for r in top if not r["label"]}) == 2  # 3 / 2 rounded up
    continued = [s for s in seen if s[1] == 4 and s[0].endswith("-s0")]
    assert continued and all(2 in s[2] for s in continued)  # rung 1 seed 0 starts from rung 0's step-2 checkpoint
    assert out["best"]["rung"] == 1 and out["best"]["ok"] == 2
    # nothing that stopped, and nothing finished, keeps its checkpoints
    assert not any(os.path.exists(tmp_path / "trials" / d / "checkpoints") for d in os.listdir(tmp_path / "trials"))


def test_diverging_trials_are_recorded_and_the_search_goes_on(tmp_path, cache_dir):
    c = small_config(cache_dir, steps=3, include_baseline=False, include_paper=False)
    c.train.optimizer.name, c.train.optimizer.learning_rate, c.train.log_every_steps = "sgd", 1e12, 1
    c.train.optimizer.warmup_epochs = 0.0
    out = gs.search(c, str(tmp_path), log=quiet)
    assert len(out["rows"]) == len(constraints.candidates(c.search)) >= 2
    assert {r["status"] for r in out["rows"]} == {"diverged"} and {r["state"] for r in out["rows"]} == {"PRUNED"}
    assert all(r["reason"] == "non-finite training loss" for r in out["rows"])
    assert out["best"] is None and not (tmp_path / "best.json").exists()


def test_failed_trial_is_a_row_not_a_crash_and_a_rerun_retries_it(tmp_path, cache_dir, monkeypatch):
    c = small_config(cache_dir, include_baseline=False, include_paper=False)
    real = gs.trainer.train_and_evaluate
    calls = []

    def flaky(cfg, workdir, run=None):
        calls.append(workdir)
        if len(calls) == 1:
            raise RuntimeError("out of memory\nsecond line")
        return real(cfg, workdir)

    monkeypatch.setattr(gs.trainer, "train_and_evaluate", flaky)
    out = gs.search(c, str(tmp_path), log=quiet)
    statuses = sorted(r["status"] for r in out["rows"])
    assert statuses.count("failed") == 1 and statuses.count("ok") == len(statuses) - 1
    failed = next(r for r in out["rows"] if r["status"] == "failed")
    assert failed["reason"] == "RuntimeError: out of memory" and failed["state"] == "FAIL"
    assert out["best"] is not None
    again = gs.search(c, str(tmp_path), log=quiet)  # the failed key is tried again; the rest is kept
    assert len(calls) == len(statuses) + 1 and {r["status"] for r in again["rows"]} == {"ok"}


def _folder(root, classes=7, per_class=6, val_per_class=2):
    """An image folder of random images: its labels say nothing about its pixels (nothing to learn)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for k in range(classes):
            os.makedirs(root / split / f"c{k}")
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                    root / split / f"c{k}" / f"{i}.png")


def _on_folder(c, root):
    c.train.data.name, c.train.data.train_split, c.train.data.eval_split = f"folder:{root}", "train", "val"
    c.train.batch_size = 8
    return c


def test_scale_up_trains_with_the_searchs_dataset_and_classes(tmp_path, cache_dir, capsys, monkeypatch):
    pytest.importorskip("tensorflow_datasets", reason="image folders need TFDS: pip install -e '.[data]'")
    from experiments import scale_up

    _folder(tmp_path / "data")
    c = _on_folder(small_config(cache_dir, include_baseline=False, include_paper=False), tmp_path / "data")
    with monkeypatch.context() as m:  # the search's scores: an answer (random images teach nothing); its data: real
        m.setattr(gs.trainer, "train_and_evaluate", _fake_training)
        out = gs.search(c, str(tmp_path / "grid"), log=quiet)
    assert out["best"] is not None and out["num_classes"] == 7
    assert out["learning"]["chance"] == pytest.approx(1 / 7)  # two validation images per class
    rows = scale_up.main(["prog", f"--constants={tmp_path / 'grid' / 'best.json'}", "--phi=1", "--train",
                          f"--workdir={tmp_path / 'scaled'}"])
    printed = capsys.readouterr().out
    assert "7 classes" in printed and f"folder:{tmp_path / 'data'}" in printed
    assert rows[0]["status"] == "ok" and rows[0]["num_classes"] == 7
    result = json.loads((tmp_path / "scaled" / "phi1" / "result.json").read_text())
    assert result["num_classes"] == 7 and result["provenance"]["jax"]
    assert rows[0]["params"] == result["params"]  # the table counted the real head (7 classes)
    # "--constants PATH" (no "="): the same models, already trained, so nothing trains again
    again = scale_up.main(["prog", "--constants", str(tmp_path / "grid" / "best.json"), "--phi=1", "--train",
                           f"--workdir={tmp_path / 'scaled'}"])
    assert again[0]["status"] == "ok" and again[0]["wall_time_s"] == result["wall_time_s"]  # the stored result


def test_a_search_on_random_labels_says_its_trials_did_not_learn(tmp_path, cache_dir, capsys, monkeypatch):
    pytest.importorskip("tensorflow_datasets", reason="image folders need TFDS: pip install -e '.[data]'")
    from experiments import scale_up

    _folder(tmp_path / "data", val_per_class=6)
    wd = tmp_path / "grid"
    argv = ["prog", f"--workdir={wd}", "--config.train.model.network=tiny", "--config.train.num_train_steps=2",
            f"--config.train.compile_cache_dir={cache_dir}", "--config.search.strategy=exhaustive",
            "--config.search.final_seeds=()", f"--config.train.data.name=folder:{tmp_path / 'data'}",
            "--config.train.data.train_split=train", "--config.train.data.eval_split=val",
            "--config.train.batch_size=8", *(f"--config.search.{k}={v}" for k, v in SMALL.items())]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        gs.main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if not ln.startswith("warning: ")]
    assert len(err) == 1 and err[0].startswith("error: the trials did not learn at this budget"), captured.err
    assert "chance 0.1429" in err[0] and "num_train_steps" in err[0] and "learning_rate" in err[0]
    assert "no answer" in captured.out and "winner:" not in captured.out
    best = json.loads((wd / "best.json").read_text())
    assert best["answer"] is False and best["learning"]["learned"] is False
    with pytest.raises(SystemExit) as e:
        scale_up.main(["prog", f"--constants={wd / 'best.json'}", "--phi=1"])
    assert e.value.code == 2
    refusal = capsys.readouterr().err.strip()
    assert refusal.startswith("error:") and "is no answer" in refusal and "\n" not in refusal


def test_bad_search_config_one_line_exit_2(tmp_path):
    import subprocess

    wd = tmp_path / "wd"
    for override in ("--config.search.alpha=(1.0,1.1)", "--config.search.halving_eta=0",
                     "--config.search.nosuch=3", "--config.search.max_seeds=1"):
        proc = subprocess.run([sys.executable, "-m", "experiments.grid_search", f"--workdir={wd}",
                               "--config.search.tolerance=0.0001", override],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
        assert not wd.exists()


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_flags_and_exits_0_without_running(tmp_path, capsys, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)  # a run would create runs/ here
    with pytest.raises(SystemExit) as e:
        gs.main(["prog", flag])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--local_workers" in out and "--storage" in out and "--config.<field>" in out
    assert not os.listdir(tmp_path)


def test_identity_ignores_cosmetic_fields():
    a = grid_config.get_config().train
    b = grid_config.get_config().train
    b.progress_bar, b.log_every_steps = True, 1
    assert runner.identity(a) == runner.identity(b)
    b.batch_size = 7
    assert runner.differences(runner.identity(a), runner.identity(b)) == ["batch_size 16 -> 7"]


def test_tpe_sampler_proposes_points_on_the_surface_and_promotes_the_best(tmp_path, cache_dir):
    c = small_config(cache_dir, sampler="tpe", n_trials=4, strategy="halving", halving_eta=2, halving_rungs=2,
                     alpha=(1.1, 1.3), beta=(1.0, 1.2), gamma=(1.0, 1.3), include_baseline=False)
    out = gs.search(c, str(tmp_path), log=quiet)
    sampled = [r for r in out["rows"] if r["rung"] == 0 and not r["label"]]
    assert 1 <= len(sampled) <= 4
    for r in sampled:
        assert abs(r["alpha"] * r["beta"] ** 2 * r["gamma"] ** 2 - 2.0) < 0.01
        assert 1.0 <= r["gamma"] <= 1.3 and 1.0 <= r["beta"] <= 1.2
    top = [r for r in out["rows"] if r["rung"] == 1]
    assert any(r["label"] == "paper" for r in top) and any(not r["label"] for r in top)
    assert out["best"] is not None and out["best"]["rung"] == 1


def test_a_study_from_before_a_field_existed_reopens_when_the_field_keeps_its_default(tmp_path):
    """A study stored without a field added since (model.kernels, say) reads it as its default, as a workdir does."""
    c = grid_config.get_config().train
    old = json.loads(json.dumps(runner.identity(c)))
    del old["model"]["kernels"]
    old["model"]["retired_field"] = 1  # removed since: read by nothing
    assert runner.differences(old, runner.identity(c)) == []
    c.model.kernels = "reference"
    assert runner.differences(old, runner.identity(c)) == ["model.kernels auto -> reference"]
    storage, ident = runner.storage_for(None, str(tmp_path)), runner.identity(grid_config.get_config().train)
    study = runner.open_study(storage, "s", old, str(tmp_path))  # created by the older code
    assert runner.open_study(storage, "s", ident, str(tmp_path)).study_name == study.study_name
    with pytest.raises(UserError, match="model.kernels auto -> reference"):
        runner.open_study(storage, "s", runner.identity(c), str(tmp_path))


def _fake_training(cfg, workdir, *args, **kwargs):
    """No training: a score that grows with alpha * gamma, and the network's real figures."""
    from effnet_jax.model import cost, scaling

    spec = scaling.model_spec(cfg.model)
    arch = scaling.build_architecture(spec, scaling.network(cfg.model), cfg.model.drop_path_rate)
    m = cfg.model
    return {"status": "ok", "val_top1": m.alpha * m.gamma / 2, "wall_time_s": 0.01, "steps": cfg.num_train_steps,
            **cost.figures(spec, arch, 10)}


def test_a_new_constraint_and_a_new_proposer_are_one_class_and_one_registry_line_each(tmp_path, monkeypatch):
    class ShallowOnly(constraints.Constraint):
        """Toy: a candidate costs its alpha; alpha <= 1.2 is admitted."""

        name = "shallow"

        def cost(self, c):
            return c.alpha

        def entry_cost(self, entry):
            return entry["alpha"]

        def admits(self, cost):
            return cost <= 1.2 + constraints.EPS

        def distance(self, cost):
            return cost - 1.2

        def refusal(self, closest, cost):
            return f"no grid point has alpha <= 1.2 (the closest has {cost})"

    class Ends(strategies.Proposer):
        """Toy: rung 0 trains the first and the last admitted grid point, and the references."""

        name = "ends"

        def first_rung(self, cands, rung):
            grid = [c for c in cands if not c.label]
            chosen = [grid[0], grid[-1], *(c for c in cands if c.label)]
            return chosen, rung.run(rung.plan(chosen))

    monkeypatch.setitem(constraints.CONSTRAINTS, ShallowOnly.name, ShallowOnly)
    monkeypatch.setitem(strategies.PROPOSERS, Ends.name, Ends)
    monkeypatch.setattr(gs.trainer, "train_and_evaluate", _fake_training)
    c = small_config(tmp_path / "cache", constraint="shallow", sampler="ends", alpha=(1.1, 1.3), beta=(1.05, 1.05),
                     gamma=(1.0, 1.1), include_baseline=False)
    out = gs.search(c, str(tmp_path / "wd"), log=quiet, write=False)
    trained = sorted((r["alpha"], r["beta"], r["gamma"], r["label"]) for r in out["rows"])
    assert trained == [(1.1, 1.05, 1.0, ""), (1.2, 1.05, 1.1, ""), (1.2, 1.1, 1.15, "paper")]
    assert (out["best"]["alpha"], out["best"]["gamma"]) == (1.2, 1.15)  # the highest toy score within alpha <= 1.2
    c.search.alpha = (1.25, 1.3)
    with pytest.raises(UserError, match="alpha <= 1.2"):
        gs.check_search(c)
    c.search.sampler = "nosuch"
    with pytest.raises(UserError, match="search.sampler must be ends, grid, random or tpe"):
        gs.check_search(c)


def test_random_proposer_stays_on_the_surface(tmp_path, monkeypatch):
    monkeypatch.setattr(gs.trainer, "train_and_evaluate", _fake_training)
    c = small_config(tmp_path / "cache", sampler="random", n_trials=3, alpha=(1.1, 1.3), beta=(1.0, 1.2),
                     gamma=(1.0, 1.3), include_baseline=False, include_paper=False)
    out = gs.search(c, str(tmp_path / "wd"), log=quiet, write=False)
    assert 1 <= len(out["rows"]) <= 3
    assert all(abs(r["alpha"] * r["beta"] ** 2 * r["gamma"] ** 2 - 2.0) < 0.01 for r in out["rows"])


def test_cooldown_fraction_is_checked_only_where_it_is_read():
    c = grid_config.get_config()
    c.search.cooldown_fraction = 1.0
    gs.check_search(c)  # continued: not read
    c.search.rung_mode = "cooldown"
    with pytest.raises(UserError, match=r"search.cooldown_fraction must be in \(0, 1\) with search.rung_mode=cooldown"):
        gs.check_search(c)


def test_a_rung_whose_cooldown_falls_inside_the_warmup_is_refused_before_the_study(tmp_path):
    """Every rung's trial schedule is checked when the search starts: rung 0's 2 steps would begin their cooldown
    inside digits' 16-step warmup, which used to surface as a failed trial mid-run."""
    c = grid_config.get_config()
    c.train.model.network, c.train.num_train_steps, c.search.rung_mode = "tiny", 2, "cooldown"
    with pytest.raises(UserError, match=r"trial a1.000-b1.000-g1.000-phi0-s0-n2-cd: train.optimizer.cooldown_fraction "
                                        r"0.2 starts the cooldown at step 1, inside the 16-step warmup"):
        gs.setup(c, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("mode, tag, schedule, span, shared, keep0", [
    ("continued", "", "cosine", 120, True, True),  # the keys and directories of searches from before the modes
    ("cooldown", "-cd", "wsd", 0, True, True),
    ("independent", "-own", "cosine", 0, False, False),
])
def test_each_rung_mode_plans_its_schedule_keys_and_directories(mode, tag, schedule, span, shared, keep0):
    c = grid_config.get_config()
    c.search.rung_mode, c.search.cooldown_fraction = mode, 0.25
    cands = constraints.candidates(c.search)[:2]
    steps = gs.rung_steps(c, steps_per_epoch=67)
    low, top = gs.plan_rung(c, cands, 0, steps, 10), gs.plan_rung(c, cands, 1, steps, 10)
    for p in low + top:
        own = mode == "independent" and p in top  # its top rung is the continued mode's top run
        assert p.key.endswith(f"-n{p.config.num_train_steps}{'' if own else tag}")
        assert p.config.optimizer.schedule == schedule and p.config.schedule_steps == (120 if own else span)
        if mode == "cooldown":
            assert p.config.optimizer.cooldown_fraction == 0.25
    assert all(p.keep_checkpoint == keep0 for p in low) and not any(p.keep_checkpoint for p in top)
    dirs = {p.key.rsplit("-n", 1)[0]: p.directory for p in low}
    assert all((dirs[p.key.rsplit("-n", 1)[0]] == p.directory) == shared for p in top if p.attrs["seed"] == 0)
    # the modes share no trial (the mode is no part of the study's identity) but the one that is the same run:
    # independent's top rung, a full schedule over the top budget, is continued's, config for config
    plans = {m: {r: gs.plan_rung(_with(c, rung_mode=m), cands, r, steps, 10) for r in (0, 1)}
             for m in strategies.RUNG_MODES}
    keys = {m: {p.key for r in (0, 1) for p in plans[m][r]} for m in plans}
    assert not (keys["continued"] & keys["cooldown"]) and not (keys["cooldown"] & keys["independent"])
    assert keys["continued"] & keys["independent"] == {p.key for p in plans["continued"][1]}
    for a, b in zip(plans["continued"][1], plans["independent"][1]):
        assert (a.key, a.directory, a.keep_checkpoint) == (b.key, b.directory, b.keep_checkpoint)
        assert runner.identity(a.config) == runner.identity(b.config)
    # a search ranking on val_top1 skips evaluating the EMA weights (half the evaluation); on theirs, it keeps it
    assert not any(p.config.eval_ema for p in low + top)
    assert all(p.config.eval_ema for p in gs.plan_rung(_with(c, metric="ema_val_top1"), cands, 0, steps, 10))


def _with(c, **search):
    c = c.copy_and_resolve_references()
    for k, v in search.items():
        c.search[k] = v
    return c


@pytest.mark.parametrize("mode", ["cooldown", "independent"])
def test_halving_in_each_rung_mode_on_the_tiny_network(tmp_path, cache_dir, mode, monkeypatch):
    """cooldown: the promoted run starts from rung 0's stable checkpoint (step 1 of 2) and forks its own at step 3
    of 4; independent: every rung from scratch in its own directory. Nothing is kept at the end."""
    from effnet_jax.training import rundir

    c = small_config(cache_dir, steps=2, strategy="halving", halving_eta=2, halving_rungs=2, include_paper=False,
                     final_seeds=(0,), alpha=(1.2, 1.3), tolerance=0.3, rung_mode=mode, cooldown_fraction=0.3)
    c.train.optimizer.warmup_epochs = 0.0
    seen = []
    real = gs.trainer.train_and_evaluate

    def spy(cfg, workdir, *a, **k):
        seen.append((os.path.basename(workdir), cfg.num_train_steps, cfg.optimizer.schedule,
                     rundir.stable_steps(workdir), rundir.checkpoint_steps(workdir)))
        out = real(cfg, workdir, *a, **k)
        seen[-1] += (rundir.stable_steps(workdir),)
        return out

    gs.trainer.train_and_evaluate = spy
    lines = []
    try:
        out = gs.search(c, str(tmp_path), log=lines.append)
    finally:
        gs.trainer.train_and_evaluate = real
    resumed = sorted(line.split(" (#")[0] + line.split(")")[-1] for line in lines if "checkpoint ..." in line)
    # the log names the step the promoted run starts from: rung 0's stable state, not its cooled-down end
    assert len(resumed) == (3 if mode == "cooldown" else 0) and all(r.endswith("from its step-1 checkpoint ...")
                                                                     for r in resumed)
    top = [r for r in out["rows"] if r["rung"] == 1]
    assert len(top) == 3 and all(r["status"] == "ok" and r["steps"] == 4 for r in top)  # 3 / 2 up = 2, the baseline
    promoted = [s for s in seen if s[1] == 4]
    assert len(promoted) == 3 and len(seen) == 4 + 3  # 3 grid points and the baseline at rung 0
    if mode == "cooldown":
        assert all(s[2] == "wsd" for s in seen)
        assert all(s[3] == [1] and s[5] == [1, 3] for s in promoted)  # rung 0 forked at 1; rung 1 continues it
        assert all(s[0].endswith("-s0-cd") for s in seen)
    else:
        assert all(s[3] == [] and s[4] == [] and s[0].endswith("-s0") for s in promoted)  # continued's directory
    assert out["best"]["rung"] == 1
    if mode == "cooldown":  # a rerun that promotes the grid point cut at rung 0 (another rule, say): its rung-0
        # checkpoints went when the search ended, so its longer run trains from scratch
        monkeypatch.setattr(strategies.Halving, "survivors", lambda self, summary, alive, rung: list(alive))
        again = [r for r in gs.search(c, str(tmp_path), log=quiet)["rows"] if r["rung"] == 1]
        assert len(again) == 4 and all(r["status"] == "ok" and r["steps"] == 4 for r in again)
    if mode == "independent":  # these trials skipped the EMA weights: ranking on them needs new trials
        with pytest.raises(UserError, match=r"did not evaluate the EMA weights .* needs a new --workdir"):
            gs.search(_with(c, metric="ema_val_top1"), str(tmp_path), log=quiet)
    for d in os.listdir(tmp_path / "trials"):
        assert not (tmp_path / "trials" / d / "checkpoints").exists()
        assert not (tmp_path / "trials" / d / rundir.STABLE_CHECKPOINTS).exists()


# ------------------------------------------------------------------------ racing

RACE = {(1.2, 1.05): 0.9, (1.25, 1.05): 0.9, (1.2, 1.1): 0.5}  # two candidates tied, the paper far below


def race_score(cfg):
    """A: 0.9 +- 0.001 by seed parity, B the mirror image (tied at every seed count), the paper at 0.5 (separated
    from both once each has two seeds)."""
    m = cfg.model
    sign = (-1) ** cfg.seed * (-1 if m.alpha == 1.25 else 1)
    return RACE[(m.alpha, m.beta)] + 0.001 * sign


def race_config(cache_dir, steps=2):
    return small_config(cache_dir, steps=steps, include_baseline=False, max_seeds=4)


def test_racing_adds_seeds_only_to_tied_candidates_and_stops_at_max_seeds(tmp_path, cache_dir, monkeypatch):
    real = gs.trainer.train_and_evaluate

    def scored(cfg, workdir, *a, **k):  # the tiny network trains; its score is replaced by a known one
        return {**real(cfg, workdir, *a, **k), "val_top1": race_score(cfg)}

    monkeypatch.setattr(gs.trainer, "train_and_evaluate", scored)
    out = gs.search(race_config(cache_dir), str(tmp_path), log=quiet, write=False)
    seeds = {}
    for r in out["rows"]:
        seeds.setdefault((r["alpha"], r["beta"], r["label"]), []).append(r["seed"])
    # one seed at first: nothing separated, every candidate gets seed 1; then the paper is below and stops
    assert {k: sorted(v) for k, v in seeds.items()} == {
        (1.2, 1.05, ""): [0, 1, 2, 3], (1.25, 1.05, ""): [0, 1, 2, 3], (1.2, 1.1, "paper"): [0, 1]}
    assert out["verdict"]["verdicts"]["(1.2, 1.1, 1.15) (paper)"] == "below"
    assert len({r["trial_id"] for r in out["rows"]}) == len(out["rows"]) == 10


def test_racing_stops_once_nothing_is_tied_with_the_leader(monkeypatch):
    c = grid_config.get_config()
    c.search.max_seeds = 6
    cands = [trials.Candidate(1.25, 1.1, 1.15), trials.Candidate(1.15, 1.15, 1.15)]  # on the default's constraint
    rows = _rows({(1.25, 1.1, 1.15, ""): [0.90, 0.91], (1.15, 1.15, 1.15, ""): [0.50, 0.51]}, rung=1)
    planned = []
    monkeypatch.setattr(gs.runner, "run", lambda study, plans, *a: planned.extend(plans) or {})
    by_key = {i: r for i, r in enumerate(rows)}
    gs.race(c, None, "", cands, by_key, [40, 120], 10, lambda r: gs.summarize(r, "val_top1"), quiet)
    summary = gs.summarize(rows, "val_top1")
    assert gs.judge(summary, gs.pick_best(summary, c.search), c.search)["verdicts"]["(1.15, 1.15, 1.15)"] == "below"
    assert planned == []  # separated at the final seeds: no seed is added
    close = _rows({(1.25, 1.1, 1.15, ""): [0.90, 0.91], (1.15, 1.15, 1.15, ""): [0.89, 0.92]}, rung=1)
    gs.race(c, None, "", cands, dict(enumerate(close)), [40, 120], 10, lambda r: gs.summarize(r, "val_top1"), quiet)
    assert [p.attrs["seed"] for p in planned] == [2, 2, 3, 3, 4, 4, 5, 5]  # the rows never change: to max_seeds
    assert gs.race_seeds(c, 2) == [2, 3, 4, 5]
    c.search.final_seeds = (3, 4)  # a second run on disjoint seeds races on seeds no earlier run used
    assert gs.race_seeds(c, 2) == [5, 6, 7, 8]


def test_the_fashion_mnist_preset_passes_the_search_checks_and_races_on_seeds_after_its_own():
    from experiments.configs import fashion_mnist

    c = fashion_mnist.get_config()
    strategies.check_search(c)
    assert gs.rung_seeds(c, 0, 2) == gs.rung_seeds(c, 1, 2) == [0, 1] and gs.race_seeds(c, 2) == []
    c.search.max_seeds = 3  # racing, as the README's runs A and B did
    assert gs.race_seeds(c, 2) == [2]
    c.search.seeds = c.search.final_seeds = (3, 4)  # run B: disjoint from run A throughout
    assert gs.race_seeds(c, 2) == [5]


RACE_SCRIPT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]  # this checkout's package, whatever is installed
from effnet_jax import compile_cache
from experiments import grid_search as gs
import test_grid_search as t

compile_cache.enable({cache!r})  # as the suite's own processes (tests/conftest.py): the killed run's programs load

real = gs.trainer.train_and_evaluate
gs.trainer.train_and_evaluate = lambda cfg, wd, *a, **k: {{**real(cfg, wd, *a, **k), "val_top1": t.race_score(cfg)}}
c = t.race_config({cache!r}, steps=6)
c.train.checkpoint_every_steps = 1
gs.search(c, sys.argv[1], log=lambda m: print(m, flush=True), write=False)
"""


def test_racing_resumes_after_sigkill_without_a_duplicate(tmp_path, cache_dir):
    import signal
    import subprocess
    import time

    from test_runner import complete_once, trials_by_key

    script = tmp_path / "race.py"
    script.write_text(RACE_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), cache=str(cache_dir)))
    wd = tmp_path / "wd"
    proc = subprocess.Popen([sys.executable, str(script), str(wd)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, caught = time.time() + 500, None
    while time.time() < deadline and caught is None and proc.poll() is None:  # a racing seed's trial mid-way
        for d in sorted((wd / "trials").iterdir()) if (wd / "trials").exists() else []:
            if "-s2" in d.name and runner.checkpoint_step(str(d)) and not (d / "result.json").exists():
                caught = d.name
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert caught is not None, "never caught a racing trial mid-way"
    rerun = subprocess.run([sys.executable, str(script), str(wd)], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    done = complete_once(trials_by_key(None, wd, "grid_search"), expected=10)  # each key once, as uninterrupted
    assert sorted(k.split("-s")[-1] for k in done) == sorted(["0-n6", "1-n6"] * 3 + ["2-n6", "3-n6"] * 2)
    assert any(t.user_attrs.get("resumed_from_step") for t in done.values())
