"""experiments.stats on synthetic scores: intervals, the pooled and Welch tests (proved on simulated searches with
known truth), verdicts, contender sets, sentences, rank agreement with bootstrap intervals, the noise ceiling."""

import math
import statistics

import numpy as np
import pytest

from experiments import stats

WIN, LOW = [0.90, 0.91, 0.89], [0.50, 0.52, 0.51]


def test_interval_matches_hand_computed_t():
    iv = stats.interval(WIN)
    assert iv["n"] == 3 and iv["mean"] == pytest.approx(0.90) and iv["std"] == pytest.approx(0.01)
    assert iv["t"] == pytest.approx(4.303, abs=1e-3)  # t(0.975, 2)
    assert iv["half"] == pytest.approx(4.303 * 0.01 / math.sqrt(3), rel=1e-3)
    assert not iv["seed_noise_unknown"] and iv["val_se"] is None
    assert stats.interval([0.5, 0.7], level=0.9)["t"] == pytest.approx(6.314, abs=1e-3)  # t(0.95, 1)


def test_interval_adds_validation_sampling_error():
    n_val = 400
    iv = stats.interval(WIN, n_val=n_val)
    p = 0.9
    assert iv["val_se"] == pytest.approx(math.sqrt(p * (1 - p) / (3 * n_val)))
    assert iv["half"] == pytest.approx(4.303 * math.sqrt(0.01**2 / 3 + p * (1 - p) / (3 * n_val)), rel=1e-3)
    assert iv["half"] > stats.interval(WIN)["half"]


def test_interval_one_seed_and_empty():
    one = stats.interval([0.8])
    assert one["half"] is None and one["std"] is None and one["seed_noise_unknown"]
    val = stats.interval([0.8], n_val=100)
    assert val["seed_noise_unknown"] and val["half"] == pytest.approx(1.96 * math.sqrt(0.8 * 0.2 / 100), rel=1e-3)
    assert stats.interval([])["mean"] is None and stats.interval([])["half"] is None


def test_compare_welch():
    c = stats.compare(WIN, LOW)
    assert c["diff"] == pytest.approx(0.39) and c["p_value"] < 1e-4
    lo, hi = c["ci95"]
    assert lo < 0.39 < hi and lo > 0.3
    # against a hand-computed Welch test: equal n, so t = diff / sqrt((s1^2 + s2^2) / n)
    a, b = [0.80, 0.84, 0.82, 0.86], [0.78, 0.83, 0.75, 0.80]
    va, vb = statistics.variance(a) / 4, statistics.variance(b) / 4
    dof = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 3)
    from scipy import stats as st

    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    got = stats.compare(a, b)
    assert got["p_value"] == pytest.approx(2 * st.t.sf(t, dof)) and got["dof"] == pytest.approx(dof)
    assert stats.compare([0.9], LOW)["p_value"] is None and stats.compare(WIN, [0.5])["ci95"] is None
    assert stats.compare([0.5, 0.5], [0.5, 0.5])["p_value"] == 1.0
    assert stats.compare([0.6, 0.6], [0.5, 0.5])["p_value"] == 0.0


def test_verdicts_separated_winner():
    v = stats.verdicts([{"key": "win", "values": WIN}, {"key": "low", "values": LOW},
                        {"key": "paper", "values": [0.6, 0.61, 0.62]}], reference="paper", test="welch")
    assert v["verdicts"] == {"win": "best", "low": "below", "paper": "below"}
    assert v["winner"] == "win" and v["runner_up"] == "low"
    assert v["separated_from_runner_up"] is True and v["separated_from_reference"] is True
    assert [r["key"] for r in v["rows"]] == ["win", "low", "paper"] and v["rows"][1]["p_value"] < 0.05
    s = v["sentence"]
    assert "separated from the runner-up low" in s and "separated from the paper's point paper" in s
    assert "not separated" not in s and "Welch's t-test over seeds, alpha 0.05" in s


def test_verdicts_tie():
    tie = [0.88, 0.93, 0.86]  # overlaps the winner's spread
    v = stats.verdicts([{"key": "win", "values": WIN}, {"key": "tie", "values": tie},
                        {"key": "low", "values": LOW}], test="welch")
    assert v["verdicts"] == {"win": "best", "tie": "tied with best", "low": "below"}
    assert v["runner_up"] == "tie" and v["separated_from_runner_up"] is False
    assert v["separated_from_reference"] is None
    assert "not separated from the runner-up tie" in v["sentence"] and "Welch" in v["sentence"]


def test_verdicts_one_seed_separates_nothing():
    v = stats.verdicts([{"key": "win", "values": [0.9]}, {"key": "low", "values": [0.1]},
                        {"key": "paper", "values": [0.2, 0.21]}], reference="paper", test="welch")
    assert set(v["verdicts"].values()) == {"best", "tied with best"}
    assert v["separated_from_runner_up"] is None and v["separated_from_reference"] is None
    assert v["one_seed"] and "one seed" in v["sentence"] and "nothing is separated" in v["sentence"]
    assert "seed noise is unknown" in v["sentence"]
    # the winner has seeds, the others one each: tied, and the sentence says why
    v2 = stats.verdicts([{"key": "win", "values": WIN}, {"key": "low", "values": [0.1]}], test="welch")
    assert v2["verdicts"]["low"] == "tied with best" and "too few seeds" in v2["sentence"]
    # pooled: the paper's two seeds measure the seed noise for everyone, so one-seed candidates can be separated
    p = stats.verdicts([{"key": "win", "values": [0.9]}, {"key": "low", "values": [0.1]},
                        {"key": "paper", "values": [0.2, 0.21]}], reference="paper")
    assert p["verdicts"] == {"win": "best", "low": "below", "paper": "below"} and not p["one_seed"]
    assert p["seed_model"]["run_dof"] == 1 and p["seed_model"]["residual_sd"] is None  # one shared seed: unpaired
    nothing = stats.verdicts([{"key": "win", "values": [0.9]}, {"key": "low", "values": [0.1]}])
    assert nothing["one_seed"] and set(nothing["verdicts"].values()) == {"best", "tied with best"}
    assert "seed noise is unknown" in nothing["sentence"] and stats.TEST_NAME in nothing["sentence"]


def test_verdicts_edge_cases():
    assert stats.verdicts([])["sentence"].startswith("no candidate")
    only = stats.verdicts([{"key": "win", "values": WIN}])
    assert only["verdicts"] == {"win": "best"} and "only candidate" in only["sentence"]
    # the paper's point is the winner
    v = stats.verdicts([{"key": "paper", "values": WIN}, {"key": "low", "values": LOW}], reference="paper")
    assert "(the paper's point)" in v["sentence"] and v["separated_from_reference"] is None
    # a caller whose winner is significantly beaten (e.g. picked by cost among eligible rows) is told so
    v = stats.verdicts([{"key": "low", "values": LOW}, {"key": "win", "values": WIN}], test="welch")
    assert v["verdicts"]["win"] == "above best"
    assert stats.sentence(v) == v["sentence"]


def test_rank_agreement_known_examples():
    a = {"w": 4.0, "x": 3.0, "y": 2.0, "z": 1.0}
    same = stats.rank_agreement(a, {"w": 0.9, "x": 0.8, "y": 0.7, "z": 0.6})
    assert same["kendall_tau"] == pytest.approx(1.0) and same["spearman_rho"] == pytest.approx(1.0)
    assert same["n"] == 4 and same["same_winner"]
    rev = stats.rank_agreement(a, {"w": 0.6, "x": 0.7, "y": 0.8, "z": 0.9})
    assert rev["kendall_tau"] == pytest.approx(-1.0) and rev["spearman_rho"] == pytest.approx(-1.0)
    assert not rev["same_winner"]
    swap = stats.rank_agreement(a, {"w": 0.9, "x": 0.8, "y": 0.6, "z": 0.7})  # one adjacent swap of 4
    assert swap["kendall_tau"] == pytest.approx(2 / 3) and swap["spearman_rho"] == pytest.approx(0.8)
    assert swap["same_winner"] and 0 < swap["kendall_p"] <= 1
    top_swap = stats.rank_agreement(a, {"w": 0.8, "x": 0.9, "y": 0.7, "z": 0.6})
    assert top_swap["kendall_tau"] == pytest.approx(2 / 3) and not top_swap["same_winner"]


def test_rank_agreement_common_keys_and_degenerate():
    r = stats.rank_agreement({"a": 1.0, "b": 2.0, "c": 3.0, "only_a": 9.0}, {"a": 1.0, "b": 2.0, "c": 3.0})
    assert r["n"] == 3 and r["kendall_tau"] == pytest.approx(1.0)
    assert stats.rank_agreement({"a": 1.0}, {"a": 2.0})["kendall_tau"] is None
    const = stats.rank_agreement({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 2.0})
    assert const["kendall_tau"] is None and const["spearman_rho"] is None


@pytest.mark.slow
def test_scipy_imported_lazily():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import sys, experiments.stats; assert 'scipy' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True).returncode == 0


# ----------------------------------------------------------------- the pooled test, proved on known truth

def _simulated_searches(n_searches=2000, seeds=2, sd_seed=0.015, sd_run=0.03, rng_seed=0):
    """Searches of k = 5 candidates x ``seeds`` seeds: true means, a per-seed effect shared by every candidate
    (data order), independent run noise. Candidates 0 and 1 are equal. Yields (true means, scores k x seeds)."""
    rng = np.random.default_rng(rng_seed)
    mu = np.array([0.85, 0.85, 0.83, 0.80, 0.86])
    for _ in range(n_searches):
        yield mu, mu[:, None] + rng.normal(0, sd_seed, seeds)[None, :] + rng.normal(0, sd_run, (len(mu), seeds))


def test_pooled_intervals_cover_and_equal_candidates_are_rarely_separated():
    n = 2000
    covered = naive_covered = intervals = separated = naive_separated = 0
    for mu, y in _simulated_searches(n):
        groups = [dict(enumerate(row)) for row in y]
        model = stats.fit_seed_model(groups)
        for i, row in enumerate(y):
            iv = stats.interval(list(row), n_val=360, model=model)
            covered += abs(iv["mean"] - mu[i]) <= iv["half"]
            # the naive interval this replaces in spirit: z instead of t over one candidate's two seeds
            naive_covered += abs(row.mean() - mu[i]) <= 1.96 * row.std(ddof=1) / math.sqrt(len(row))
            intervals += 1
        # the search's own path: candidate 0 as the winner, is the equal candidate 1 called separated?
        v = stats.verdicts([{"key": str(i), "values": list(row)} for i, row in enumerate(y)])
        separated += v["verdicts"]["1"] != "tied with best"
        se = math.sqrt((y[0].var(ddof=1) + y[1].var(ddof=1)) / y.shape[1])  # Welch's statistic read against z
        naive_separated += abs(y[0].mean() - y[1].mean()) / se > 1.96
    coverage, false_sep = covered / intervals, separated / n
    assert 0.93 <= coverage <= 0.97, coverage
    # an exact 5% test measured on 2000 searches lands within 5% +- 2 standard errors of a proportion
    assert false_sep <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / n), false_sep
    # the same checks fail a naive test: Welch's statistic against z covers ~70% and separates equals ~15%
    assert naive_covered / intervals < 0.9 and naive_separated / n > 0.1


def test_pooled_test_separates_what_welch_cannot_with_two_seeds():
    rng = np.random.default_rng(3)
    means = [0.90, 0.88, 0.80, 0.79, 0.78, 0.80, 0.81, 0.79, 0.80, 0.78, 0.79]
    rows = [{"key": f"c{i}", "values": list(m + rng.normal(0, 0.01, 2))} for i, m in enumerate(means)]
    rows.sort(key=lambda r: -statistics.fmean(r["values"]))
    pooled, welch = stats.verdicts(rows), stats.verdicts(rows, test="welch")
    assert sum(w == "below" for w in pooled["verdicts"].values()) >= 8
    below = sum(w == "below" for w in pooled["verdicts"].values())
    assert sum(w == "below" for w in welch["verdicts"].values()) < below
    assert pooled["contenders"][0] == pooled["winner"] and set(pooled["contenders"]) == {
        k for k, w in pooled["verdicts"].items() if w != "below"}
    assert pooled["test"] == stats.TEST_NAME and pooled["test_key"] == "pooled" and welch["test"] == stats.WELCH_NAME
    assert f"Contender set: {len(pooled['contenders'])} of 11 candidates" in pooled["sentence"]
    assert stats.TEST_NAME in pooled["sentence"] and pooled["seed_model"]["residual_dof"] == 10
    assert pooled["levene_p"] is None  # two seeds per candidate: Levene cannot test the spreads


def test_seed_model_against_a_hand_computed_two_way_anova():
    y = np.array([[0.80, 0.84, 0.82], [0.70, 0.75, 0.71], [0.60, 0.66, 0.61]])  # 3 candidates x 3 seeds
    k, m = y.shape
    res = y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + y.mean()
    ms_res = (res**2).sum() / ((k - 1) * (m - 1))
    ms_seed = k * ((y.mean(0) - y.mean()) ** 2).sum() / (m - 1)
    model = stats.fit_seed_model([dict(enumerate(r)) for r in y])
    assert model.residual_var == pytest.approx(ms_res) and model.residual_dof == 4
    within = sum(((r - r.mean()) ** 2).sum() for r in y) / (k * (m - 1))  # one-way within-candidate mean square
    assert model.run_var == pytest.approx(within)
    a, b = ms_seed / k, (k - 1) * ms_res / k  # Satterthwaite: one run's variance = a + b, each with its dof
    assert model.run_dof == pytest.approx((a + b) ** 2 / (a * a / (m - 1) + b * b / ((k - 1) * (m - 1))))
    assert model.seeds == (0, 1, 2) and 1 <= model.run_dof <= k * (m - 1)
    c = stats.compare_pooled(dict(enumerate(y[0])), dict(enumerate(y[1])), model)
    from scipy import stats as st

    d = (y[0] - y[1]).mean()
    assert c["paired"] and c["diff"] == pytest.approx(d)
    assert c["p_value"] == pytest.approx(2 * st.t.sf(abs(d) / math.sqrt(2 * ms_res / m), 4))
    # the same network reached twice counts once
    twice = stats.fit_seed_model([dict(enumerate(r)) for r in y] + [dict(enumerate(y[0]))])
    assert twice == model
    # Levene needs three seeds per candidate: with two, every spread of deviations is zero
    assert stats.levene([[0.1, 0.2], [0.5, 0.9], [0.3, 0.31]]) is None
    # a candidate missing a seed stays out of the block, and is compared over the seeds it shares
    model2 = stats.fit_seed_model([dict(enumerate(r)) for r in y] + [{0: 0.5}])
    assert model2.seeds == (0,) and model2.residual_var is None  # only seed 0 is shared by all: one-way pooling


def test_above_chance():
    assert stats.above_chance([0.9, 0.88], 0.1, 360)["above"]
    at = stats.above_chance([0.11, 0.1], 0.1, 360)
    assert not at["above"] and at["p_value"] > 0.05 and at["margin"] == pytest.approx(0.005)
    # the binomial floor: 0.16 on 20 images is no evidence against a chance rate of 0.1
    assert not stats.above_chance([0.16], 0.1, 20)["above"] and stats.above_chance([0.16], 0.1, 20000)["above"]
    # a seed spread larger than the binomial one takes over
    noisy = stats.fit_seed_model([{0: 0.1, 1: 0.5}, {0: 0.2, 1: 0.6}])
    assert not stats.above_chance([0.3, 0.32], 0.1, 20000, noisy)["above"]
    assert stats.above_chance([], 0.1, 10)["above"] is None


# ---------------------------------------------------------------------- tau intervals and the noise ceiling

def test_noise_ceiling_on_synthetic_rankings():
    rng = np.random.default_rng(0)
    true = {f"c{i}": i / 10 for i in range(12)}
    agree = stats.noise_ceiling({k: {s: v + s for s in range(3)} for k, v in true.items()})
    assert agree["tau"] == pytest.approx(1.0) and agree["ci"] == [1.0, 1.0] and agree["pairs"] == 3
    noise = {k: {s: float(rng.normal()) for s in range(3)} for k in [f"c{i}" for i in range(30)]}
    ceiling = stats.noise_ceiling(noise)
    assert abs(ceiling["tau"]) < 0.2 and ceiling["ci"][0] < 0 < ceiling["ci"][1]
    assert ceiling["ci"][0] <= ceiling["tau"] <= ceiling["ci"][1]
    assert stats.noise_ceiling(noise) == ceiling and stats.noise_ceiling(noise, seed=1)["ci"] != ceiling["ci"]
    # moderate agreement: between the two, with the point inside its interval
    mid = stats.noise_ceiling({k: {s: v + float(rng.normal(0, 0.15)) for s in range(2)} for k, v in true.items()})
    assert 0.2 < mid["tau"] < 1 and mid["ci"][0] <= mid["tau"] <= mid["ci"][1]
    # one seed, or one candidate: unknown
    assert stats.noise_ceiling({k: {0: v} for k, v in true.items()})["tau"] is None
    assert stats.noise_ceiling({"a": {0: 1.0, 1: 2.0}})["ci"] is None


def test_noise_ceiling_interval_covers_zero_under_no_association():
    rng = np.random.default_rng(1)
    covered = sum(
        (lambda c: c["ci"][0] <= 0 <= c["ci"][1])(stats.noise_ceiling(
            {str(i): {0: rng.normal(), 1: rng.normal()} for i in range(10)}, resamples=300, seed=r))
        for r in range(200))
    assert covered / 200 >= 0.9


def test_rank_agreement_bootstrap_interval():
    a = {f"c{i}": float(i) for i in range(10)}
    r = stats.rank_agreement(a, {k: v + 0.1 for k, v in a.items()}, resamples=500)
    assert r["kendall_ci"] == [1.0, 1.0]
    rng = np.random.default_rng(2)
    noisy = {k: v + float(rng.normal(0, 3)) for k, v in a.items()}
    r = stats.rank_agreement(a, noisy, resamples=500, seed=4)
    lo, hi = r["kendall_ci"]
    assert lo <= r["kendall_tau"] <= hi and hi - lo > 0.3  # ten candidates: a wide interval
    assert stats.rank_agreement(a, noisy, resamples=500, seed=4) == r
    assert "kendall_ci" not in stats.rank_agreement(a, noisy)  # backwards compatible without resamples


def test_limit_line_names_what_limits_a_proxy():
    flat = {"tau": 0.05, "ci": [-0.3, 0.4]}
    line = stats.limit_line([{"name": "rung 0", "tau": 0.1, "ci": [-0.3, 0.5]}], flat, "120 steps", "raise X")
    assert "within seed noise" in line and "raise X" in line and "\n" not in line
    high = {"tau": 0.8, "ci": [0.6, 0.95]}
    assert "limited by seed noise" in stats.limit_line([{"name": "rung 0", "tau": 0.7, "ci": [0.5, 0.9]}], high,
                                                        "120 steps", "")
    assert "limited by the proxy" in stats.limit_line([{"name": "rung 0", "tau": 0.1, "ci": [-0.2, 0.4]}], high,
                                                       "120 steps", "")
    assert "unknown" in stats.limit_line([], {"tau": None, "ci": None}, "120 steps", "")
    # an interval that reaches 0 and a good agreement (the Fashion-MNIST preset's 4-5 finalists): it cannot
    # be told from zero, whatever the estimate (0.78 and 0.49 in two runs), and the line says so alike
    for tau, n in ((0.78, 4), (0.49, 5)):
        few = stats.limit_line([], {"tau": tau, "ci": [-0.33, 1.0], "n": n}, "282 steps", "raise X")
        assert "cannot be told from zero" in few and f"over {n} candidates" in few and "raise X" in few
        assert "experiments.fidelity" in few and "\n" not in few


def test_pooled_sentence_warns_when_seed_spreads_differ():
    rows = [{"key": f"c{i}", "values": [0.8 - i / 100 + d for d in (0.0, 0.001, -0.001)]} for i in range(4)]
    rows.append({"key": "wild", "values": [0.2, 0.9, 0.5]})
    v = stats.verdicts(rows)
    assert v["levene_p"] < 0.05 and "Levene" in v["sentence"] and "search.test=welch" in v["sentence"]
    assert "Levene" not in stats.verdicts(rows[:4])["sentence"]
