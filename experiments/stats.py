"""Statistics for a small search: intervals over seeds, Welch's test, verdicts, rank agreement.

A search with a handful of seeds per candidate and a few hundred validation images is
noisy in two ways: seed to seed (initialisation, data order, dropout) and in the finite
validation sample. ``interval`` reports both; ``verdicts`` says which candidates are
separated from the winner by Welch's t-test over seeds (unequal variances, two-sided:
seeds of different candidates need not be equally noisy); ``rank_agreement`` measures
whether two budgets rank candidates alike (Kendall tau, Spearman rho). With one seed
nothing can be separated: the seed spread, usually the larger noise, is unknown.
scipy is imported lazily (inside the functions), so importing this module is cheap.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

TEST_NAME = "Welch's t-test over seeds"


def interval(values: Sequence[float], n_val: int | None = None, level: float = 0.95) -> dict[str, Any]:
    """Mean, sample std, n and the half-width of a ``level`` interval for the mean score.

    n >= 2: half = t(1 - (1 - level)/2, n - 1) * sqrt(s^2/n + p(1-p)/(n * n_val)): the seed spread
    plus, when ``n_val`` (validation images) is given, the binomial error of an accuracy p measured
    on n_val images, averaged over n runs. That sum is an approximation: the seed spread already
    contains part of the sampling error (so it errs wide), and the binomial term treats p as the
    accuracy of a fixed model. Without ``n_val`` it is the plain t interval mean +- t * s / sqrt(n).
    n == 1: the seed interval is undefined; with ``n_val`` the half-width is the validation
    sample's alone, z * sqrt(p(1-p)/n_val) (z = 1.96 at 0.95), flagged ``seed_noise_unknown``;
    without it, None. ``val_se`` = sqrt(p(1-p)/(n * n_val)), the validation sampling error of the mean.
    """
    from scipy import stats as st

    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "half": None, "seed_noise_unknown": True, "val_se": None,
                "t": None, "level": level}
    mean = statistics.fmean(values)
    p = min(max(mean, 0.0), 1.0)
    val_var = p * (1 - p) / (n * n_val) if n_val else 0.0  # variance of the mean from validation sampling
    val_se = math.sqrt(val_var) if n_val else None
    if n == 1:
        half = float(st.norm.ppf(0.5 + level / 2)) * math.sqrt(val_var) if n_val else None
        return {"mean": mean, "std": None, "n": 1, "half": half, "seed_noise_unknown": True, "val_se": val_se,
                "t": None, "level": level}
    s = statistics.stdev(values)
    t = float(st.t.ppf(0.5 + level / 2, n - 1))
    return {"mean": mean, "std": s, "n": n, "half": t * math.sqrt(s * s / n + val_var),
            "seed_noise_unknown": False, "val_se": val_se, "t": t, "level": level}


def compare(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Welch's t-test of mean(a) - mean(b): difference, two-sided p-value, its 95% interval.

    Welch rather than Student: two candidates' seed spreads need not be equal. p is None when
    either side has fewer than two values (no spread to test against); two identical constant
    samples give p = 1, different constants p = 0.
    """
    from scipy import stats as st

    diff = statistics.fmean(a) - statistics.fmean(b) if a and b else None
    out: dict[str, Any] = {"diff": diff, "p_value": None, "ci95": None, "dof": None, "n_a": len(a), "n_b": len(b),
                           "test": TEST_NAME}
    if len(a) < 2 or len(b) < 2:
        return out
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {**out, "p_value": 1.0 if diff == 0 else 0.0, "ci95": (diff, diff)}
    dof = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    with warnings.catch_warnings():  # near-constant samples: scipy warns about precision, the answer is fine
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(st.ttest_ind(a, b, equal_var=False).pvalue)
    t = float(st.t.ppf(0.975, dof))
    return {**out, "p_value": p, "ci95": (diff - t * se, diff + t * se), "dof": dof}


def _separated(test: Mapping[str, Any] | None, alpha: float) -> bool | None:
    """Winner above the other at level alpha: True / False, None when there are too few seeds to test."""
    if test is None or test["p_value"] is None:
        return None
    return test["p_value"] < alpha and test["diff"] > 0


def verdicts(rows: Sequence[Mapping[str, Any]], alpha: float = 0.05, reference: str | None = None
             ) -> dict[str, Any]:
    """Each candidate against the winner: "best", "tied with best", "below" (or "above best").

    ``rows``: [{"key", "values": scores over seeds}], the winner first: ranked by mean, or the
    caller's pick (it may break ties by cost). "below" needs Welch p < alpha and a lower mean;
    "tied with best" is everything not separated, including any side with fewer than two seeds;
    "above best" only arises when the caller's winner is significantly beaten. ``reference``
    names a row to report separately (the paper's point); the runner-up is the best other row.

    Returns {"winner", "verdicts": {key: word}, "rows": [{key, mean, n, verdict, diff, p_value}],
    "runner_up", "vs_runner_up", "separated_from_runner_up", "reference", "vs_reference",
    "separated_from_reference", "one_seed", "test", "alpha", "sentence"}; the separated_* flags
    are None when there is nothing, or too few seeds, to test.
    """
    if not rows:
        return {"winner": None, "verdicts": {}, "rows": [], "sentence": "no candidate finished: nothing to judge"}
    best, rest = rows[0], list(rows[1:])
    words = {best["key"]: "best"}
    tests: dict[str, dict[str, Any]] = {}
    table = [{"key": best["key"], "mean": _mean(best["values"]), "n": len(best["values"]), "verdict": "best",
              "diff": None, "p_value": None}]
    for r in rest:
        test = compare(best["values"], r["values"]) if r["values"] and best["values"] else None
        tests[r["key"]] = test
        sep = test is not None and test["p_value"] is not None and test["p_value"] < alpha
        word = ("below" if test["diff"] > 0 else "above best") if sep else "tied with best"
        words[r["key"]] = word
        table.append({"key": r["key"], "mean": _mean(r["values"]), "n": len(r["values"]), "verdict": word,
                      "diff": test["diff"] if test else None, "p_value": test["p_value"] if test else None})
    ranked = sorted(rest, key=lambda r: -statistics.fmean(r["values"]) if r["values"] else math.inf)
    runner_up = next((r["key"] for r in ranked if r["key"] != reference), None)
    vs_ref = tests.get(reference) if reference and reference != best["key"] else None
    out = {"winner": best["key"], "verdicts": words, "rows": table, "test": TEST_NAME, "alpha": alpha,
           "runner_up": runner_up, "vs_runner_up": tests.get(runner_up) if runner_up else None,
           "reference": reference, "vs_reference": vs_ref, "one_seed": len(best["values"]) < 2}
    out["separated_from_runner_up"] = _separated(out["vs_runner_up"], alpha)
    out["separated_from_reference"] = _separated(vs_ref, alpha)
    out["sentence"] = sentence(out)
    return out


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _against(name: str, test: Mapping[str, Any] | None, alpha: float) -> str:
    if test is None or test["p_value"] is None:
        return f"not separated from {name} (too few seeds to test)"
    word = "separated from" if _separated(test, alpha) else "not separated from"
    return f"{word} {name} (difference {test['diff']:+.4f}, p = {test['p_value']:.3f})"


def sentence(info: Mapping[str, Any]) -> str:
    """One sentence from ``verdicts``' output: is the winner separated from the runner-up and the paper's point?

    Names the test and alpha, so a reader knows what "separated" means; with one seed for the
    winner it says that nothing is separated, because the seed noise is unknown.
    """
    winner = info.get("winner")
    if winner is None:
        return "no candidate finished: nothing to judge"
    alpha = info.get("alpha", 0.05)
    if info.get("one_seed"):
        return (f"The winner {winner} ran with one seed, so seed noise is unknown and nothing is separated "
                f"({TEST_NAME} needs two or more seeds; run more seeds, e.g. search.final_seeds).")
    parts = []
    if info.get("runner_up"):
        parts.append(_against(f"the runner-up {info['runner_up']}", info.get("vs_runner_up"), alpha))
    reference = info.get("reference")
    if reference and reference != winner:
        parts.append(_against(f"the paper's point {reference}", info.get("vs_reference"), alpha))
    lead = f"The winner {winner}" + (" (the paper's point)" if reference and reference == winner else "")
    if not parts:
        return f"{lead} is the only candidate at the deciding budget: nothing to compare."
    return f"{lead} is " + " and ".join(parts) + f" by {TEST_NAME}, alpha {alpha:g}."


def rank_agreement(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, Any]:
    """Kendall tau and Spearman rho (with p-values) between two scorings over their common keys; same argmax?

    Answers whether a cheap budget ranks candidates as the expensive one does (and picks the same
    winner). A constant scoring has no ranking: its coefficients are None.
    """
    from scipy import stats as st

    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        return {"n": len(keys), "kendall_tau": None, "kendall_p": None, "spearman_rho": None, "spearman_p": None,
                "same_winner": None}
    x, y = [a[k] for k in keys], [b[k] for k in keys]
    with warnings.catch_warnings():  # constant input: scipy warns and returns nan, reported here as None
        warnings.simplefilter("ignore")
        tau = st.kendalltau(x, y)
        rho = st.spearmanr(x, y)

    def clean(v: float | None) -> float | None:
        return None if v is None or not math.isfinite(v) else float(v)

    return {"n": len(keys), "kendall_tau": clean(tau.statistic), "kendall_p": clean(tau.pvalue),
            "spearman_rho": clean(rho.statistic), "spearman_p": clean(rho.pvalue),
            "same_winner": max(keys, key=lambda k: a[k]) == max(keys, key=lambda k: b[k])}
