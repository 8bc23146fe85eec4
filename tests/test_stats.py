"""experiments.stats on synthetic scores: intervals, Welch's test, verdicts, sentences, rank agreement."""

import math
import statistics

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
                        {"key": "paper", "values": [0.6, 0.61, 0.62]}], reference="paper")
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
                        {"key": "low", "values": LOW}])
    assert v["verdicts"] == {"win": "best", "tie": "tied with best", "low": "below"}
    assert v["runner_up"] == "tie" and v["separated_from_runner_up"] is False
    assert v["separated_from_reference"] is None
    assert "not separated from the runner-up tie" in v["sentence"] and "Welch" in v["sentence"]


def test_verdicts_one_seed_separates_nothing():
    v = stats.verdicts([{"key": "win", "values": [0.9]}, {"key": "low", "values": [0.1]},
                        {"key": "paper", "values": [0.2, 0.21]}], reference="paper")
    assert set(v["verdicts"].values()) == {"best", "tied with best"}
    assert v["separated_from_runner_up"] is None and v["separated_from_reference"] is None
    assert v["one_seed"] and "one seed" in v["sentence"] and "nothing is separated" in v["sentence"]
    assert "seed noise is unknown" in v["sentence"]
    # the winner has seeds, the others one each: tied, and the sentence says why
    v2 = stats.verdicts([{"key": "win", "values": WIN}, {"key": "low", "values": [0.1]}])
    assert v2["verdicts"]["low"] == "tied with best" and "too few seeds" in v2["sentence"]


def test_verdicts_edge_cases():
    assert stats.verdicts([])["sentence"].startswith("no candidate")
    only = stats.verdicts([{"key": "win", "values": WIN}])
    assert only["verdicts"] == {"win": "best"} and "only candidate" in only["sentence"]
    # the paper's point is the winner
    v = stats.verdicts([{"key": "paper", "values": WIN}, {"key": "low", "values": LOW}], reference="paper")
    assert "(the paper's point)" in v["sentence"] and v["separated_from_reference"] is None
    # a caller whose winner is significantly beaten (e.g. picked by cost among eligible rows) is told so
    v = stats.verdicts([{"key": "low", "values": LOW}, {"key": "win", "values": WIN}])
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


def test_scipy_imported_lazily():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import sys, experiments.stats; assert 'scipy' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True).returncode == 0
