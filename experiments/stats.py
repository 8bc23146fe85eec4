"""Statistics for a small search: seed noise, intervals, verdicts, the contender set, rank agreement.

A search with a handful of seeds per candidate and a few hundred validation images is
noisy seed to seed (initialisation, data order, dropout) and in the finite validation
sample. Two tests say which candidates are separated from the winner:

* ``pooled`` (the default, ``TEST_NAME``): every candidate at the deciding budget trains with
  the same seeds, and seed noise is about as large for one candidate as for another, so the
  noise is estimated once over all of them with a two-way (candidate + seed) model
  (``fit_seed_model``). A comparison is paired by seed (a seed's shared luck, its data order,
  cancels) against the model's residual variance, with (k - 1)(n - 1) degrees of freedom
  instead of Welch's n - 1 per side: 2 seeds x 11 candidates give t(0.975, 10) = 2.23, not
  t(0.975, 1) = 12.7. A candidate's interval uses the run-to-run variance about its true mean
  (seed effect plus residual, Satterthwaite's degrees of freedom): the shared seed effect does
  not average away over candidates. tests/test_stats.py proves both on simulated searches.
* ``welch`` (``WELCH_NAME``): Welch's t-test over each pair's own seeds (unequal variances);
  with two seeds it can hardly separate anything.

The validation split's sampling error: every candidate and seed is scored on the same images,
so the split's own luck is common to all of them and cancels from comparisons, while the part
that differs from run to run (which images a seed gets right) is already in the seed spread.
The pooled intervals are therefore for the expected score on this validation split, without
a binomial term; ``welch`` keeps the older interval (seed spread plus the binomial term).

``rank_agreement`` measures whether two budgets rank candidates alike (Kendall tau with a
bootstrap interval over candidates); ``noise_ceiling`` how far two seeds at one budget agree,
the best any cheap proxy can do. scipy is imported lazily (inside the functions), so importing
this module is cheap.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

POOLED, WELCH = "pooled", "welch"
TEST_NAME = "seed-paired pooled t-test (two-way candidate + seed model)"
WELCH_NAME = "Welch's t-test over seeds"
TESTS = {POOLED: TEST_NAME, WELCH: WELCH_NAME}
BOOTSTRAP_RESAMPLES = 1000


# ------------------------------------------------------------------ seed noise over all candidates

@dataclasses.dataclass(frozen=True)
class SeedModel:
    """Seed noise estimated once over every candidate at one budget.

    ``residual_var`` (dof ``residual_dof``): the variance a seed-paired difference sees (noise and
    candidate-by-seed interaction, not the seed's shared effect); None when no two candidates share
    two seeds. ``run_var`` (dof ``run_dof``, Satterthwaite): one run's variance about its candidate's
    true mean (shared seed effect included); what an interval needs. None: no seed spread at all.
    """

    residual_var: float | None
    residual_dof: int
    run_var: float | None
    run_dof: float
    seeds: tuple[Any, ...]  # the seeds every candidate of the balanced block has
    candidates: int  # candidates in the block the variances come from

    def describe(self) -> dict[str, Any]:
        """JSON-ready: the standard deviations and degrees of freedom behind the verdicts."""
        return {"residual_sd": None if self.residual_var is None else math.sqrt(self.residual_var),
                "residual_dof": self.residual_dof, "run_sd": None if self.run_var is None else math.sqrt(self.run_var),
                "run_dof": self.run_dof, "seeds": list(self.seeds), "candidates": self.candidates}


def as_by_seed(values: Sequence[float] | Mapping[Any, float], seeds: Sequence[Any] | None = None
               ) -> dict[Any, float]:
    """{seed: score}; a plain list of scores is taken as seeds 0, 1, ... in order (or ``seeds``)."""
    if isinstance(values, Mapping):
        return dict(values)
    return dict(zip(seeds if seeds is not None else range(len(values)), values))


def fit_seed_model(groups: Sequence[Mapping[Any, float]]) -> SeedModel:
    """The two-way (candidate + seed) model over the candidates that share two or more seeds.

    The block is every candidate holding all the seeds that every non-empty candidate shares; candidates
    with identical scores on every seed (one network reached from two grid points) count once.
    Without such a block (fewer than two shared seeds or candidates) the seed spread is pooled
    one way (each candidate's own seeds, sum(n_i - 1) degrees of freedom) and nothing is paired.
    """
    # a network trained twice (two grid points that round to one network) scores the same on every seed: it is
    # one candidate's evidence, not two, and counting it twice would invent degrees of freedom
    unique = {tuple(sorted(g.items(), key=lambda kv: str(kv[0]))): dict(g) for g in groups if g}
    groups = list(unique.values())
    shared = set.intersection(*(set(g) for g in groups)) if groups else set()
    seeds = tuple(sorted(shared, key=str))
    k, m = len(groups), len(seeds)
    if k >= 2 and m >= 2:
        y = np.array([[g[s] for s in seeds] for g in groups], dtype=float)
        grand, rows, cols = y.mean(), y.mean(axis=1, keepdims=True), y.mean(axis=0, keepdims=True)
        res_dof, seed_dof = (k - 1) * (m - 1), m - 1
        ms_res = float(((y - rows - cols + grand) ** 2).sum()) / res_dof
        ms_seed = k * float(((cols - grand) ** 2).sum()) / seed_dof
        # one run about its true mean: seed effect + residual = (MS_seed + (k - 1) MS_res) / k, the one-way
        # within-candidate mean square; its degrees of freedom by Satterthwaite (fewer when seeds differ a lot)
        a, b = ms_seed / k, (k - 1) * ms_res / k
        run_var = a + b
        denom = a * a / seed_dof + b * b / res_dof
        run_dof = run_var * run_var / denom if denom > 0 else float(res_dof + seed_dof)
        return SeedModel(ms_res, res_dof, run_var, run_dof, seeds, k)
    ss = sum(sum((v - statistics.fmean(g.values())) ** 2 for v in g.values()) for g in groups)
    dof = sum(len(g) - 1 for g in groups)
    return SeedModel(None, 0, ss / dof if dof else None, float(dof), seeds, k)


def interval(values: Sequence[float], n_val: int | None = None, level: float = 0.95,
             model: SeedModel | None = None) -> dict[str, Any]:
    """Mean, sample std, n and the half-width of a ``level`` interval for the mean score.

    With ``model`` (the pooled test) and a seed spread in it: half = t(dof) * sqrt(run_var / n), the
    seed noise estimated over every candidate (``fit_seed_model``), so even a one-seed candidate gets an
    interval; no binomial term (module docstring: it is common to every candidate on this split).
    Otherwise (Welch): n >= 2: half = t(1 - (1 - level)/2, n - 1) * sqrt(s^2/n + p(1-p)/(n * n_val)): the
    seed spread plus, when ``n_val`` (validation images) is given, the binomial error of an accuracy p
    measured on n_val images (an approximation that errs wide). n == 1: with ``n_val`` the half-width is
    the validation sample's alone, z * sqrt(p(1-p)/n_val), flagged ``seed_noise_unknown``; without it,
    None. ``val_se`` = sqrt(p(1-p)/(n * n_val)), the validation sampling error of the mean.
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
    own_std = statistics.stdev(values) if n >= 2 else None
    if model is not None and model.run_var is not None and model.run_dof > 0:
        t = float(st.t.ppf(0.5 + level / 2, model.run_dof))
        return {"mean": mean, "std": own_std, "n": n, "half": t * math.sqrt(model.run_var / n),
                "seed_noise_unknown": False, "val_se": val_se, "t": t, "level": level, "dof": model.run_dof,
                "pooled_std": math.sqrt(model.run_var)}
    if n == 1:
        half = float(st.norm.ppf(0.5 + level / 2)) * math.sqrt(val_var) if n_val else None
        return {"mean": mean, "std": None, "n": 1, "half": half, "seed_noise_unknown": True, "val_se": val_se,
                "t": None, "level": level}
    t = float(st.t.ppf(0.5 + level / 2, n - 1))
    return {"mean": mean, "std": own_std, "n": n, "half": t * math.sqrt(own_std * own_std / n + val_var),
            "seed_noise_unknown": False, "val_se": val_se, "t": t, "level": level, "dof": n - 1}


def compare(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Welch's t-test of mean(a) - mean(b): difference, two-sided p-value, its 95% interval.

    Welch rather than Student: two candidates' seed spreads need not be equal. p is None when
    either side has fewer than two values (no spread to test against); two identical constant
    samples give p = 1, different constants p = 0.
    """
    from scipy import stats as st

    diff = statistics.fmean(a) - statistics.fmean(b) if a and b else None
    out: dict[str, Any] = {"diff": diff, "p_value": None, "ci95": None, "dof": None, "n_a": len(a), "n_b": len(b),
                           "test": WELCH_NAME}
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


def compare_pooled(a: Mapping[Any, float], b: Mapping[Any, float], model: SeedModel) -> dict[str, Any]:
    """The pooled test of a - b ({seed: score} each): paired over their shared seeds against the model's
    residual variance; unpaired against its run-to-run variance when they share no seed (or the model
    has no residual). Same keys as ``compare``; p is None when the model holds no seed spread."""
    from scipy import stats as st

    shared = [s for s in a if s in b]
    paired = bool(shared) and model.residual_var is not None and model.residual_dof > 0
    if paired:
        diff = statistics.fmean(a[s] - b[s] for s in shared)
        var, dof = model.residual_var * 2 / len(shared), float(model.residual_dof)
    else:
        diff = statistics.fmean(a.values()) - statistics.fmean(b.values()) if a and b else None
        ok = model.run_var is not None and model.run_dof > 0 and a and b
        var, dof = (model.run_var * (1 / len(a) + 1 / len(b)), model.run_dof) if ok else (None, None)
    out: dict[str, Any] = {"diff": diff, "p_value": None, "ci95": None, "dof": dof, "n_a": len(a), "n_b": len(b),
                           "test": TEST_NAME, "paired": paired}
    if var is None or diff is None:
        return out
    if var == 0:
        return {**out, "p_value": 1.0 if diff == 0 else 0.0, "ci95": (diff, diff)}
    se = math.sqrt(var)
    t = float(st.t.ppf(0.975, dof))
    return {**out, "p_value": float(2 * st.t.sf(abs(diff) / se, dof)), "ci95": (diff - t * se, diff + t * se)}


def _separated(test: Mapping[str, Any] | None, alpha: float) -> bool | None:
    """Winner above the other at level alpha: True / False, None when there are too few seeds to test."""
    if test is None or test["p_value"] is None:
        return None
    return test["p_value"] < alpha and test["diff"] > 0


def verdicts(rows: Sequence[Mapping[str, Any]], alpha: float = 0.05, reference: str | None = None,
             test: str = POOLED, pool: Sequence[Mapping[Any, float]] | None = None) -> dict[str, Any]:
    """Each candidate against the winner: "best", "tied with best", "below" (or "above best"); the contenders.

    ``rows``: [{"key", "values": scores over seeds, "seeds": their seeds (default 0, 1, ... in order)}], the
    winner first: ranked by mean, or the caller's pick (it may break ties by cost). ``test``: ``pooled``
    (seed noise from a two-way model over ``pool``, default the rows' own scores; ``compare_pooled``) or
    ``welch`` (``compare``). "below" needs p < alpha and a lower mean; "tied with best" is everything not
    separated, including any side without the seeds to test; "above best" only arises when the caller's
    winner is significantly beaten. The contender set is the winner and every candidate not below it.
    ``reference`` names a row to report separately (the paper's point); the runner-up is the best other row.

    Returns {"winner", "verdicts": {key: word}, "rows": [{key, mean, n, verdict, diff, p_value}],
    "contenders", "runner_up", "vs_runner_up", "separated_from_runner_up", "reference", "vs_reference",
    "separated_from_reference", "one_seed", "test", "test_key", "alpha", "seed_model", "levene_p",
    "sentence"}; the separated_* flags are None when there is nothing, or too few seeds, to test.
    """
    if test not in TESTS:
        raise ValueError(f"test must be one of {', '.join(TESTS)}, got {test!r}")
    if not rows:
        return {"winner": None, "verdicts": {}, "rows": [], "contenders": [], "test": TESTS[test],
                "sentence": "no candidate finished: nothing to judge"}
    by_seed = {r["key"]: as_by_seed(r["values"], r.get("seeds")) for r in rows}
    model = fit_seed_model(pool if pool is not None else list(by_seed.values())) if test == POOLED else None
    best, rest = rows[0], list(rows[1:])
    words = {best["key"]: "best"}
    tests: dict[str, dict[str, Any]] = {}
    table = [{"key": best["key"], "mean": _mean(best["values"]), "n": len(best["values"]), "verdict": "best",
              "diff": None, "p_value": None}]
    for r in rest:
        if not (r["values"] and best["values"]):
            test_out = None
        elif model is not None:
            test_out = compare_pooled(by_seed[best["key"]], by_seed[r["key"]], model)
        else:
            test_out = compare(best["values"], r["values"])
        tests[r["key"]] = test_out
        sep = test_out is not None and test_out["p_value"] is not None and test_out["p_value"] < alpha
        word = ("below" if test_out["diff"] > 0 else "above best") if sep else "tied with best"
        words[r["key"]] = word
        table.append({"key": r["key"], "mean": _mean(r["values"]), "n": len(r["values"]), "verdict": word,
                      "diff": test_out["diff"] if test_out else None,
                      "p_value": test_out["p_value"] if test_out else None})
    ranked = sorted(rest, key=lambda r: -statistics.fmean(r["values"]) if r["values"] else math.inf)
    runner_up = next((r["key"] for r in ranked if r["key"] != reference), None)
    vs_ref = tests.get(reference) if reference and reference != best["key"] else None
    no_spread = model.run_var is None if model is not None else len(best["values"]) < 2
    out = {"winner": best["key"], "verdicts": words, "rows": table, "test": TESTS[test], "test_key": test,
           "alpha": alpha, "runner_up": runner_up, "vs_runner_up": tests.get(runner_up) if runner_up else None,
           "reference": reference, "vs_reference": vs_ref, "one_seed": no_spread,
           "contenders": [t["key"] for t in table if t["verdict"] != "below"],
           "seed_model": model.describe() if model is not None else None,
           "levene_p": levene([list(v.values()) for v in by_seed.values()])}
    out["separated_from_runner_up"] = _separated(out["vs_runner_up"], alpha)
    out["separated_from_reference"] = _separated(vs_ref, alpha)
    out["sentence"] = sentence(out)
    return out


def levene(groups: Sequence[Sequence[float]]) -> float | None:
    """Levene's p-value for equal seed spreads across the groups with three or more values (None: untestable).

    The pooled test assumes seed noise of a similar size for every candidate; a small p says it is not."""
    from scipy import stats as st

    # two values per group are degenerate: both lie equally far from their median, so every group's spread of
    # deviations is zero and any difference reads as p ~ 0; three or more per group are needed
    usable = [list(g) for g in groups if len(g) >= 3]
    if len(usable) < 2 or all(statistics.pvariance(g) == 0 for g in usable):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = float(st.levene(*usable).pvalue)
    return p if math.isfinite(p) else None


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _against(name: str, test: Mapping[str, Any] | None, alpha: float) -> str:
    if test is None or test["p_value"] is None:
        return f"not separated from {name} (too few seeds to test)"
    word = "separated from" if _separated(test, alpha) else "not separated from"
    return f"{word} {name} (difference {test['diff']:+.4f}, p = {test['p_value']:.3f})"


def sentence(info: Mapping[str, Any]) -> str:
    """One sentence from ``verdicts``' output: is the winner separated from the runner-up and the paper's point,
    and which candidates remain contenders?

    Names the test and alpha, so a reader knows what "separated" means; without any seed spread it says
    that nothing is separated, because the seed noise is unknown.
    """
    winner = info.get("winner")
    if winner is None:
        return "no candidate finished: nothing to judge"
    alpha = info.get("alpha", 0.05)
    name = info.get("test", WELCH_NAME)
    if info.get("one_seed"):
        return (f"The winner {winner} ran with one seed, so seed noise is unknown and nothing is separated "
                f"({name} needs two or more seeds; run more seeds, e.g. search.final_seeds).")
    parts = []
    if info.get("runner_up"):
        parts.append(_against(f"the runner-up {info['runner_up']}", info.get("vs_runner_up"), alpha))
    reference = info.get("reference")
    if reference and reference != winner:
        parts.append(_against(f"the paper's point {reference}", info.get("vs_reference"), alpha))
    lead = f"The winner {winner}" + (" (the paper's point)" if reference and reference == winner else "")
    if not parts:
        return f"{lead} is the only candidate at the deciding budget: nothing to compare."
    out = f"{lead} is " + " and ".join(parts) + f" by {name}, alpha {alpha:g}."
    levene_p = info.get("levene_p")
    if info.get("test_key") == POOLED and levene_p is not None and levene_p < alpha:
        out += (f" The candidates' seed spreads differ (Levene p = {levene_p:.3f}): search.test=welch does not "
                "pool them.")
    contenders = info.get("contenders")
    if contenders is not None:
        others = [c for c in contenders if c != winner]
        n = len(info.get("rows") or [])
        out += (f" Contender set: {len(contenders)} of {n} candidates ("
                + (f"the winner and {', '.join(others)}, none separated from the winner" if others
                   else "the winner alone: every other candidate is separated from it") + ").")
    return out


def rank_agreement(a: Mapping[str, float], b: Mapping[str, float], resamples: int = 0, seed: int = 0,
                   level: float = 0.95) -> dict[str, Any]:
    """Kendall tau and Spearman rho (with p-values) between two scorings over their common keys; same argmax?

    Answers whether a cheap budget ranks candidates as the expensive one does (and picks the same
    winner). A constant scoring has no ranking: its coefficients are None. ``resamples`` > 0 adds
    ``kendall_ci``, a bootstrap interval over candidates (a tau over 10 candidates has a standard
    deviation of about 0.25 under no association: the point alone says little).
    """
    from scipy import stats as st

    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        return {"n": len(keys), "kendall_tau": None, "kendall_p": None, "spearman_rho": None, "spearman_p": None,
                "same_winner": None, **({"kendall_ci": None} if resamples else {})}
    x, y = [a[k] for k in keys], [b[k] for k in keys]
    with warnings.catch_warnings():  # constant input: scipy warns and returns nan, reported here as None
        warnings.simplefilter("ignore")
        tau = st.kendalltau(x, y)
        rho = st.spearmanr(x, y)

    def clean(v: float | None) -> float | None:
        return None if v is None or not math.isfinite(v) else float(v)

    out = {"n": len(keys), "kendall_tau": clean(tau.statistic), "kendall_p": clean(tau.pvalue),
           "spearman_rho": clean(rho.statistic), "spearman_p": clean(rho.pvalue),
           "same_winner": max(keys, key=lambda k: a[k]) == max(keys, key=lambda k: b[k])}
    if resamples:
        out["kendall_ci"] = _bootstrap_tau(np.array([x, y], dtype=float), resamples, seed, level)
    return out


def _tau_b(scores: np.ndarray) -> np.ndarray:
    """Kendall's tau-b between rows 0 and 1 of ``scores`` (..., 2, n): nan where a row has no ranking."""
    sign = np.sign(scores[..., :, None] - scores[..., None, :])  # (..., 2, n, n)
    x, y = sign[..., 0, :, :], sign[..., 1, :, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * y).sum(axis=(-1, -2)) / np.sqrt((x * x).sum(axis=(-1, -2)) * (y * y).sum(axis=(-1, -2)))


def _bootstrap_tau(scores: np.ndarray, resamples: int, seed: int, level: float) -> list[float] | None:
    """Percentile interval of the mean tau-b over ``scores``' pairs of rows (m, n), candidates resampled."""
    m, n = scores.shape
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    boot = scores[:, idx]  # (m, B, n)
    taus = [_tau_b(np.stack([boot[i], boot[j]], axis=1)) for i, j in itertools.combinations(range(m), 2)]
    with warnings.catch_warnings():  # a resample whose every pair has no ranking: dropped below
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(np.stack(taus), axis=0)
    mean = mean[np.isfinite(mean)]
    if not len(mean):
        return None
    lo, hi = np.quantile(mean, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def noise_ceiling(scores: Mapping[str, Mapping[Any, float]], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                  level: float = 0.95) -> dict[str, Any]:
    """How far two seeds at one budget rank the candidates alike: the best any cheap proxy can do.

    ``scores``: {candidate: {seed: score}}. Over the candidates that have every seed that two or more
    of them share, the mean Kendall tau-b over all pairs of seeds, with a bootstrap interval over
    candidates (``resamples``, seeded: the same figures on every run). tau None (and no interval)
    with fewer than two shared seeds or candidates.
    """
    counts: dict[Any, int] = {}
    for by in scores.values():
        for s in by:
            counts[s] = counts.get(s, 0) + 1
    seeds = sorted((s for s, c in counts.items() if c >= 2), key=str)
    cands = [k for k, by in scores.items() if all(s in by for s in seeds)]
    out: dict[str, Any] = {"tau": None, "ci": None, "n": len(cands), "seeds": seeds,
                           "pairs": len(seeds) * (len(seeds) - 1) // 2, "level": level, "resamples": resamples}
    if len(seeds) < 2 or len(cands) < 2:
        return out
    y = np.array([[scores[k][s] for k in cands] for s in seeds], dtype=float)  # (m seeds, n candidates)
    pairs = [float(_tau_b(y[[i, j]])) for i, j in itertools.combinations(range(len(seeds)), 2)]
    finite = [t for t in pairs if math.isfinite(t)]
    out["tau"] = statistics.fmean(finite) if finite else None
    out["pair_taus"] = [None if not math.isfinite(t) else t for t in pairs]
    out["ci"] = _bootstrap_tau(y, resamples, seed, level) if finite else None
    return out


# A ceiling whose interval reaches 0 and stays below this rules out a good agreement: the candidates are within
# seed noise. One whose interval reaches 0 and this too (4-5 finalists give intervals like [-0.33, 1]) only
# cannot be told from zero.
AGREE = 0.5


def limit_line(proxies: Sequence[Mapping[str, Any]], ceiling: Mapping[str, Any], budget: str, remedy: str) -> str:
    """One line: is a cheap proxy limited by itself or by seed noise at the long budget?

    ``proxies``: [{"name", "tau", "ci"}]; ``ceiling``: ``noise_ceiling``'s output at ``budget`` (text such
    as "120 steps"); ``remedy``: what to raise when the ceiling itself is indistinguishable from zero.
    A proxy whose interval reaches the ceiling's is limited by seed noise (a second long run would agree
    no better); one that stays below it is limited by the proxy.
    """
    if ceiling.get("tau") is None or ceiling.get("ci") is None:
        return (f"noise ceiling at {budget}: unknown (it needs two or more seeds of two or more candidates there); "
                "proxy taus cannot be told from seed noise")
    lo, hi = ceiling["ci"]
    head = f"noise ceiling at {budget}: seed-to-seed Kendall tau {ceiling['tau']:.2f} [{lo:.2f}, {hi:.2f}]"
    if lo <= 0 and hi < AGREE:
        return (f"{head}: at this budget the candidates are within seed noise, so no cheap rung can rank them; "
                f"{remedy}")
    if lo <= 0:
        n = ceiling.get("n")
        return (f"{head}: over {n if n else 'these'} candidates the interval reaches 0, so the ceiling cannot be told "
                "from zero: the candidates may be within seed noise at this budget, and no proxy can be judged "
                f"against it; {remedy}, or measure it over every candidate (python -m experiments.fidelity)")
    parts = []
    for p in proxies:
        if p.get("tau") is None or p.get("ci") is None:
            parts.append(f"{p['name']}: no tau (constant scores)")
        elif p["ci"][1] >= lo:
            parts.append(f"{p['name']} (tau {p['tau']:.2f} [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}]) cannot be told from "
                         "the ceiling: limited by seed noise at the long budget (as far as these candidates show)")
        else:
            parts.append(f"{p['name']} (tau {p['tau']:.2f} [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}]) is limited by the "
                         "proxy: a second long run agrees better")
    return head + ("; " + "; ".join(parts) if parts else "")


def above_chance(values: Sequence[float], chance: float, n_val: int, model: SeedModel | None = None,
                 alpha: float = 0.05) -> dict[str, Any]:
    """One-sided test that a candidate's mean score exceeds ``chance`` (the validation split's majority rate).

    Per-run variance: the larger of the binomial variance of a chance-level predictor on ``n_val`` images,
    chance(1 - chance)/n_val (normal quantile), and the seed model's run-to-run variance (its t): the
    cautious choice, so that a trial is called learned only when it clears both the sampling and the seed
    noise. Returns {"mean", "chance", "margin", "p_value", "above"}.
    """
    from scipy import stats as st

    n = len(values)
    if not n or not n_val:
        return {"mean": None, "chance": chance, "margin": None, "p_value": None, "above": None}
    mean = statistics.fmean(values)
    binom = chance * (1 - chance) / n_val
    seed_var = model.run_var if model is not None and model.run_var is not None and model.run_dof > 0 else None
    if seed_var is not None and seed_var > binom:
        se = math.sqrt(seed_var / n)
        p = float(st.t.sf((mean - chance) / se, model.run_dof))
    else:
        se = math.sqrt(binom / n)
        p = float(st.norm.sf((mean - chance) / se)) if se > 0 else (0.0 if mean > chance else 1.0)
    return {"mean": mean, "chance": chance, "margin": mean - chance, "p_value": p, "above": p < alpha}
