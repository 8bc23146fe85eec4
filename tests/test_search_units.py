"""The grid search's pieces without training: candidates, checks, plans, verdicts, analysis, registries."""

import dataclasses
import json

import numpy as np
import pytest
from search_helpers import network, one_of, quiet, with_search

from effnet_jax.errors import UserError
from experiments import analysis, constraints, search_report, stats, strategies, trials
from experiments import grid_search as gs
from experiments.analysis import CandidateSummary
from experiments.configs import grid_search as grid_config
from experiments.study import differences, identity, open_study, storage_for


def macs(train_config, c):
    return trials.figures(train_config, c, 1.0, 10)["macs"]


def _rows(scores: dict, rung: int = 0):
    out = []
    for (a, b, g, label), values in scores.items():
        for seed, v in enumerate(values):
            out.append({"label": label, "alpha": a, "beta": b, "gamma": g, "product": a * b * b * g * g,
                        "rung": rung, "seed": seed, "status": "ok", "val_top1": v, "macs": 10})
    return out


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
    # the winner must be on the real-MACs constraint (its own cost of the network); the formula's product does not
    # matter
    rule = constraints.constraint_for(s, c.train, 10)
    assert rule.trained_cost(grid[0]) == macs(c.train, grid[0]) / base
    entry = CandidateSummary("", 1.3, 1.0, 1.0, product=1.5, cost=2.1)
    assert rule.satisfies(entry) and not rule.satisfies(dataclasses.replace(entry, cost=2.3))
    assert not rule.satisfies(dataclasses.replace(entry, label="baseline"))
    assert not rule.satisfies(dataclasses.replace(entry, cost=None))  # not known: not admitted


def test_macs_constraint_without_a_point_names_the_closest():
    c = grid_config.get_config()  # 32 px: any gamma > 1 jumps the cost
    c.search.constraint, c.search.macs_tolerance = "macs", 0.05
    with pytest.raises(UserError, match=r"closest is alpha=.* at 2\.\d\dx.*base_resolution"):
        constraints.candidates(c.search, c.train, 10)


@pytest.mark.parametrize("field, value, message", [
    ("halving_eta", 0, "halving_eta"), ("halving_eta", 1, "halving_eta"), ("halving_rungs", 0, "halving_rungs"),
    ("strategy", "random", "strategy"), ("metric", "accuracy", "metric"), ("seeds", (), "seeds"),
    ("final_seeds", (0, 0), "final_seeds"), ("alpha_level", 2.0, "alpha_level"), ("constraint", "flops", "constraint"),
    ("rung_mode", "snapshot", f"search.rung_mode must be {one_of(strategies.RUNG_MODES)}, got 'snapshot'"),
    ("sampler", "anneal", f"search.sampler must be {one_of(strategies.PROPOSERS)}, got 'anneal'"),
    ("strategy", "bohb", f"search.strategy must be {one_of(strategies.SCHEDULES)}, got 'bohb'"),
    ("constraint", "energy", f"search.constraint must be {one_of(constraints.CONSTRAINTS)}, got 'energy'"),
    ("alpha", 1.2, r"search.alpha must be a range \(lo, hi\) of two numbers with 1 <= lo <= hi, got 1.2"),
    ("beta", (1.2,), r"search.beta must be a range \(lo, hi\)"), ("gamma", (1.3, 1.1), "search.gamma"),
    ("gamma", (0.9, 1.1), "search.gamma"), ("alpha", ("1.0", "1.2"), "search.alpha"),
    ("step", 0.0, "search.step must be a number > 0"), ("target", -2.0, "search.target"), ("phi", 0.0, "search.phi"),
    ("tolerance", -0.1, "search.tolerance must be a number >= 0"), ("seeds", 3, "search.seeds must be a non-empty"),
    ("include_paper", "yes", "search.include_paper must be True or False"),
    ("measure_latency", 1, "search.measure_latency"),
    ("max_seeds", 1, r"search.max_seeds must be 0 \(no racing\) or at least the top rung's 2 seeds"),
    ("max_seeds", -1, "search.max_seeds"),
    ("test", "student", "search.test"),
])
def test_whole_search_config_is_checked_before_any_trial(field, value, message):
    c = grid_config.get_config()
    with c.search.ignore_type():  # a scalar where a range belongs, as a hand-edited config can hold
        c.search[field] = value
    with pytest.raises(UserError, match=message):
        strategies.check_search(c)


@pytest.mark.parametrize("changes, message", [
    ({"constraint": "macs", "macs_tolerance": 0.0}, "macs_tolerance"),
    ({"constraint": "macs", "sampler": "tpe"},
     "sampler=" + " or ".join(sorted(n for n, p in strategies.PROPOSERS.items() if not p.on_surface))),
])
def test_macs_constraint_settings_are_checked(changes, message):
    c = grid_config.get_config()
    for k, v in changes.items():
        c.search[k] = v
    with pytest.raises(UserError, match=message):
        strategies.check_search(c)


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
    kept = strategies.Halving(grid_config.get_config().search).survivors(analysis.summarize(rows, "val_top1"), cands,
                                                                         0)
    assert [(c.alpha, c.label) for c in kept] == [(1.1, ""), (1.3, ""), (1.2, "paper"), (1.0, "baseline")]


def test_pick_best_skips_baseline_and_off_constraint():
    s = grid_config.get_config().search
    summary = [  # cost: the formula's (the product)
        CandidateSummary("baseline", 1.0, 1.0, 1.0, product=1.0, mean=0.99, macs=1, cost=1.0),
        CandidateSummary("paper", 1.2, 1.1, 1.15, product=1.92, mean=0.95, macs=2, cost=1.92),
        CandidateSummary("", 1.25, 1.1, 1.15, product=2.0, mean=0.9, macs=2, cost=2.0),
    ]
    best = analysis.pick_best(summary, s)  # tolerance 0.02: the paper point (1.92) is off the constraint
    assert (best.alpha, best.beta, best.gamma) == (1.25, 1.1, 1.15)
    assert analysis.pick_best([dataclasses.replace(e, cost=None) for e in summary], s) is None  # no cost: no winner


def test_verdicts_separated_tied_and_one_seed():
    s = grid_config.get_config().search
    win, tie, low = (1.25, 1.1, 1.15, ""), (1.15, 1.15, 1.15, ""), (1.15, 1.25, 1.05, "")
    paper = (1.2, 1.1, 1.15, "paper")
    rows = _rows({win: [0.90, 0.91, 0.89], tie: [0.88, 0.93, 0.86], low: [0.50, 0.52, 0.51],
                  paper: [0.60, 0.61, 0.62]})
    formula = constraints.constraint_for(s)
    summary = analysis.summarize(rows, "val_top1", base_macs=5, num_eval=360, constraint=formula)
    best = analysis.pick_best(summary, s)
    assert (best.alpha, best.beta, best.gamma) == win[:3]
    assert best.half is not None and best.macs_ratio == 2.0 and best.cost == best.product
    v = analysis.judge(summary, best, s)
    assert v["verdicts"][best.name] == "best" and best.name == trials.candidate_name(dataclasses.asdict(best))
    assert v["verdicts"]["(1.15, 1.15, 1.15)"] == "tied with best"
    assert v["verdicts"]["(1.15, 1.25, 1.05)"] == "below"
    assert stats.TEST_NAME in v["sentence"] and "Contender set: 2 of 4" in v["sentence"]
    assert [(c["alpha"], c["beta"], c["gamma"]) for c in v["contender_set"]] == [win[:3], tie[:3]]
    assert v["seeds"] == [0, 1, 2] and v["seed_model"]["residual_dof"] == 6
    table = search_report.format_table(summary, "val_top1", v["verdicts"])
    marked = [ln for ln in table.splitlines() if ln[2:3] == "*"]  # the C column
    assert len(marked) == 2 and "contender set" in table
    s.test = "welch"
    welch = analysis.summarize(rows, "val_top1", num_eval=360, test="welch", constraint=formula)
    w = analysis.judge(welch, analysis.pick_best(welch, s), s)
    assert "Welch" in w["sentence"] and w["verdicts"] == v["verdicts"]
    s.test = "pooled"
    one = analysis.summarize(_rows({win: [0.9], low: [0.5]}), "val_top1", constraint=formula)
    v1 = analysis.judge(one, analysis.pick_best(one, s), s)
    assert "one seed" in v1["sentence"].lower() or "nothing" in v1["sentence"].lower()
    assert "below" not in v1["verdicts"].values()
    # candidates cut at a cheaper rung are named as outside the set (two runs can promote different ones)
    top = [dict(r, rung=1) for r in rows]
    halved = analysis.summarize(top + _rows({(1.15, 1.05, 1.25, ""): [0.3], (1.25, 1.2, 1.05, ""): [0.2]}),
                                "val_top1", constraint=formula)
    h = analysis.judge(halved, analysis.pick_best(halved, s), s)
    assert h["cut"] == 2 and "the 4 candidates at the deciding rung; 2 others were cut" in h["sentence"]
    assert v["cut"] == 0 and "cut" not in v["sentence"]


def test_a_params_constraint_is_one_class_and_one_registry_line(monkeypatch):
    """A constraint on parameters instead of MACs, registered from here: the class costs a candidate, and the
    summary carries that cost to pick_best and judge (no params_ratio field anywhere). Synthetic rows, no training."""

    class Params(constraints.Constraint):
        """Toy: the rounded network's parameters over unscaled B0's, at most 1.05 (resolution-only scaling)."""

        name, needs_network = "params", True

        def cost(self, c):
            def params(x):
                return trials.figures(self.train_config, x, self.search.phi, self.num_classes)["params"]

            return params(c) / params(trials.BASELINE)

        def admits(self, cost):
            return cost <= 1.05

    monkeypatch.setitem(constraints.CONSTRAINTS, Params.name, Params)
    c = grid_config.get_config()
    c.search.constraint = "params"
    strategies.check_search(c)  # the one registry line is all the search's check needs
    wide, tall, paper, base = (1.25, 1.1, 1.15, ""), (1.0, 1.0, 1.4, ""), (1.2, 1.1, 1.15, "paper"), \
        (1.0, 1.0, 1.0, "baseline")
    rows = _rows({wide: [0.90, 0.91, 0.89], tall: [0.80, 0.82, 0.81], paper: [0.70, 0.71, 0.69],
                  base: [0.85, 0.86, 0.84]})
    rule = constraints.constraint_for(c.search, c.train, 10)
    summary = analysis.summarize(rows, "val_top1", constraint=rule)
    costs = {e.name: e.cost for e in summary}
    assert costs["(1, 1, 1.4)"] == pytest.approx(1.0) and costs["(1.25, 1.1, 1.15)"] > 1.05
    assert all(e.cost == Params(c.search, c.train, 10).cost(e.candidate) for e in summary)
    assert "params_ratio" not in {f.name for f in dataclasses.fields(CandidateSummary)}
    best = analysis.pick_best(summary, c.search)  # the best-scoring candidate has too many parameters
    assert (best.alpha, best.beta, best.gamma) == tall[:3]
    v = analysis.judge(summary, best, c.search)
    assert v["verdicts"][best.name] == "best" and "(1.25, 1.1, 1.15)" not in v["verdicts"]  # not admitted
    assert v["verdicts"]["(1.2, 1.1, 1.15) (paper)"] == "below"  # the paper's point is judged whatever it costs
    assert [x["alpha"] for x in v["contender_set"]] == [1.0]
    # the same rows under the formula: the widest network wins
    c.search.constraint = "formula"
    formula = analysis.summarize(rows, "val_top1", constraint=constraints.constraint_for(c.search))
    assert analysis.pick_best(formula, c.search).name == "(1.25, 1.1, 1.15)"


def test_rung_agreement_between_rungs():
    a, b, c = (1.25, 1.1, 1.15, ""), (1.15, 1.15, 1.15, ""), (1.15, 1.25, 1.05, "")
    rows = _rows({a: [0.3], b: [0.2], c: [0.1]}, rung=0) + _rows({a: [0.9, 0.9], b: [0.8, 0.8], c: [0.7, 0.7]}, 1)
    (agree,) = analysis.rung_agreement(rows, "val_top1")
    assert agree["kendall_tau"] == pytest.approx(1.0) and agree["same_winner"]
    rows = _rows({a: [0.1], b: [0.2], c: [0.3]}, rung=0) + _rows({a: [0.9], b: [0.8], c: [0.7]}, 1)
    (agree,) = analysis.rung_agreement(rows, "val_top1")
    assert agree["kendall_tau"] == pytest.approx(-1.0) and not agree["same_winner"]


def test_rung_taus_carry_intervals_and_the_top_rung_its_noise_ceiling():
    cands = [(1.0 + i / 20, 1.1, 1.15, "") for i in range(8)]
    rng = np.random.default_rng(0)
    rows = _rows({c: [0.1 * i] for i, c in enumerate(cands)}, rung=0)
    rows += _rows({c: [0.5 + 0.05 * i + float(rng.normal(0, 0.005)) for _ in range(2)] for i, c in enumerate(cands)}, 1)
    (agree,) = analysis.rung_agreement(rows, "val_top1")
    assert agree["kendall_tau"] == pytest.approx(1.0) and agree["kendall_ci"] == [1.0, 1.0]
    ceiling = analysis.noise_ceiling(rows, "val_top1")
    assert ceiling["rung"] == 1 and ceiling["tau"] == pytest.approx(1.0) and ceiling["seeds"] == [0, 1]
    assert "limited by seed noise" in analysis.ceiling_line([agree], ceiling, [40, 120])
    # seeds that disagree at the top rung: within seed noise, and the line says what to raise
    noisy = _rows({c: [0.1 * i] for i, c in enumerate(cands)}, rung=0) + _rows(
        {c: [0.8 + float(rng.normal(0, 0.01)) for _ in range(2)] for c in cands}, 1)
    ceiling = analysis.noise_ceiling(noisy, "val_top1")
    assert ceiling["ci"][0] <= 0 and ceiling["ci"][0] <= ceiling["tau"] <= ceiling["ci"][1]
    line = analysis.ceiling_line(analysis.rung_agreement(noisy, "val_top1"), ceiling, [40, 120])
    assert "within seed noise" in line and "120 steps" in line and "fashion_mnist.py" in line
    line = analysis.ceiling_line(analysis.rung_agreement(noisy, "val_top1"), ceiling, [40, 120], "fashion_mnist")
    assert "within seed noise" in line and "num_train_steps" in line and "fashion_mnist.py" not in line
    # one seed at the top rung: the ceiling is unknown, and the line says so
    assert "unknown" in analysis.ceiling_line([], analysis.noise_ceiling(rows[:8], "val_top1"), [40])


def test_training_share_counts_the_steps_each_trial_trained():
    """A rung-1 trial that continued a 40-step checkpoint to 120 trained 80 steps: its share is its own
    timed steps over its wall time, not where its run ended (the figure once read 50% for a true 43%)."""
    rows = [{"steps": 40, "batch_size": 16, "train_img_per_s": 64.0, "wall_time_s": 50.0, "timings": {"train_s": 10.0}},
            {"steps": 120, "batch_size": 16, "train_img_per_s": 64.0, "wall_time_s": 30.0,
             "timings": {"train_s": 20.0}},
            {"steps": 120, "batch_size": 16, "wall_time_s": 20.0, "timings": None}]  # an old row: wall time only
    assert analysis.training_share(rows) == pytest.approx(30.0 / 100.0)
    assert analysis.training_share([{"wall_time_s": 5.0, "timings": {}}]) is None


def test_identity_ignores_cosmetic_fields():
    a = grid_config.get_config().train
    b = grid_config.get_config().train
    b.progress_bar, b.log_every_steps = True, 1
    assert identity(a) == identity(b)
    b.batch_size = 7
    assert differences(identity(a), identity(b)) == ["batch_size 16 -> 7"]


def test_a_study_from_before_a_field_existed_reopens_when_the_field_keeps_its_default(tmp_path):
    """A study stored without a field added since (model.kernels, say) reads it as its default, as a workdir does."""
    c = grid_config.get_config().train
    old = json.loads(json.dumps(identity(c)))
    del old["model"]["kernels"]
    old["model"]["retired_field"] = 1  # removed since: read by nothing
    assert differences(old, identity(c)) == []
    c.model.kernels = "reference"
    assert differences(old, identity(c)) == ["model.kernels auto -> reference"]
    storage, ident = storage_for(None, str(tmp_path)), identity(grid_config.get_config().train)
    study = open_study(storage, "s", old, str(tmp_path))  # created by the older code
    assert open_study(storage, "s", ident, str(tmp_path)).study_name == study.study_name
    with pytest.raises(UserError, match="model.kernels auto -> reference"):
        open_study(storage, "s", identity(c), str(tmp_path))


def test_cooldown_fraction_is_checked_only_where_it_is_read():
    c = grid_config.get_config()
    c.search.cooldown_fraction = 1.0
    strategies.check_search(c)  # continued: not read
    c.search.rung_mode = "cooldown"
    with pytest.raises(UserError, match=r"search.cooldown_fraction must be in \(0, 1\) with search.rung_mode=cooldown"):
        strategies.check_search(c)


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
    plans = {m: {r: gs.plan_rung(with_search(c, rung_mode=m), cands, r, steps, 10) for r in (0, 1)}
             for m in strategies.RUNG_MODES}
    keys = {m: {p.key for r in (0, 1) for p in plans[m][r]} for m in plans}
    assert not (keys["continued"] & keys["cooldown"]) and not (keys["cooldown"] & keys["independent"])
    assert keys["continued"] & keys["independent"] == {p.key for p in plans["continued"][1]}
    for a, b in zip(plans["continued"][1], plans["independent"][1]):
        assert (a.key, a.directory, a.keep_checkpoint) == (b.key, b.directory, b.keep_checkpoint)
        assert identity(a.config) == identity(b.config)
    # a search ranking on val_top1 skips evaluating the EMA weights (half the evaluation); on theirs, it keeps it
    assert not any(p.config.eval_ema for p in low + top)
    assert all(p.config.eval_ema for p in gs.plan_rung(with_search(c, metric="ema_val_top1"), cands, 0, steps, 10))


def test_racing_stops_once_nothing_is_tied_with_the_leader(monkeypatch):
    c = grid_config.get_config()
    c.search.max_seeds = 6
    cands = [trials.Candidate(1.25, 1.1, 1.15), trials.Candidate(1.15, 1.15, 1.15)]  # on the default's constraint
    rows = _rows({(1.25, 1.1, 1.15, ""): [0.90, 0.91], (1.15, 1.15, 1.15, ""): [0.50, 0.51]}, rung=1)
    planned = []
    monkeypatch.setattr(gs.queue, "work", lambda study, plans, *a, **k: planned.extend(plans) or {})
    by_key = {i: r for i, r in enumerate(rows)}
    formula = constraints.constraint_for(c.search)

    def summarize(r):
        return analysis.summarize(r, "val_top1", constraint=formula)

    gs.race(c, None, "", cands, by_key, [40, 120], 10, summarize, quiet)
    summary = summarize(rows)
    verdicts = analysis.judge(summary, analysis.pick_best(summary, c.search), c.search)["verdicts"]
    assert verdicts["(1.15, 1.15, 1.15)"] == "below"
    assert planned == []  # separated at the final seeds: no seed is added
    close = _rows({(1.25, 1.1, 1.15, ""): [0.90, 0.91], (1.15, 1.15, 1.15, ""): [0.89, 0.92]}, rung=1)
    gs.race(c, None, "", cands, dict(enumerate(close)), [40, 120], 10, summarize, quiet)
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
