"""What a probe measured: the noise model at every budget of its ladder, and the cost model of a trial.

A probe trains unscaled B0 and a few candidates with two or more seeds at a geometric ladder of
budgets (cooldown forks: one run serves every budget). From its rows (the search's result rows:
candidate, seed, ``budget_steps``, the metric, ``wall_time_s``, ``compile_s``, ``train_img_per_s``,
``batch_size``, ``macs``, ``blocks``, optionally ``timings`` and ``start_step``):

* ``fit_noise``: at every budget the seed model the pooled test uses (``stats.fit_seed_model``), the
  spread between the candidates' true means (``tau``, the one-way ANOVA estimate over the seed model's
  block, with an F interval), B0's test against chance (``stats.above_chance``), the noise ceiling and
  the rank agreement between budgets (``stats.noise_ceiling`` / ``rank_agreement``), and the correlation
  of the candidates' true means between two budgets (what a cut at the cheaper one keeps).
* ``fit_cost``: a trial's wall time = evaluation and setup (grows with MACs) + trained steps x the step
  time (grows with MACs) + its first step (a compile, growing with the network's blocks, for the first
  trial of a network at a budget; a cache load or hit for the others). Fitted on the probe's own trials,
  so the times are this machine's with this many workers running at once.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from experiments import stats
from experiments.power import Noise

BASELINE = "baseline"


def cand_key(row: Mapping[str, Any]) -> str:
    """One name per candidate: its constants and label (unscaled B0 and the paper's point carry theirs)."""
    return f"{float(row['alpha']):g}-{float(row['beta']):g}-{float(row['gamma']):g}-{row.get('label') or ''}"


def budget_of(row: Mapping[str, Any]) -> int:
    return int(row.get("budget_steps") or row["steps"])


def _ok(rows: Iterable[Mapping[str, Any]], metric: str) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("status", "ok") == "ok" and _num(r.get(metric)) is not None]


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------------------------- noise

@dataclasses.dataclass(frozen=True)
class BudgetNoise:
    """The noise at one budget. ``sigma``: residual sd (a seed-paired difference's), None without two shared
    seeds; ``seed_sd``: the shared seed effect's; ``tau``: the candidates' spread (B0 left out: it is not
    judged), floored at 0, with ``tau_ci`` (95%); ``chance``: B0's ``stats.above_chance``."""

    steps: int
    candidates: int
    seeds: int
    sigma: float | None
    seed_sd: float
    dof: int
    tau: float
    tau_ci: tuple[float, float]
    means: dict[str, float]
    chance: dict[str, Any]
    ceiling: dict[str, Any]
    judged: int = 0  # candidates (B0 left out) behind tau
    ms_cand: float = 0.0  # their mean square: seeds x the variance of their means (E = sigma^2 + seeds tau^2)

    def noise(self, tau: float | None = None) -> Noise:
        return Noise(self.tau if tau is None else tau, self.sigma or 0.0, self.seed_sd)

    def draws(self, sims: int, seed: int = 0) -> Noise:
        """``sims`` values of (tau, sigma) that the probe's numbers leave plausible: sigma^2 = s^2 dof / chi2(dof),
        sigma^2 + n tau^2 = MS_cand (k - 1) / chi2(k - 1), tau^2 floored at 0 (flat priors). A power averaged over
        them is what the probe can promise; point estimates from 4 candidates x 2 seeds are far too sure."""
        if not self.sigma or self.dof <= 0 or self.judged < 2:
            return self.noise()
        rng = np.random.default_rng(seed)
        s2 = self.sigma ** 2 * self.dof / rng.chisquare(self.dof, sims)
        total = self.ms_cand * (self.judged - 1) / rng.chisquare(self.judged - 1, sims)
        return Noise(np.sqrt(np.maximum(total - s2, 0.0) / self.seeds), np.sqrt(s2), self.seed_sd)

    @property
    def learned(self) -> bool:
        return bool(self.chance.get("above"))


@dataclasses.dataclass(frozen=True)
class NoiseModel:
    """The probe's noise at every budget it reached, and between budgets: ``rho[(low, high)]`` the correlation
    of true means (None: unknown), ``agreement[(low, high)]`` Kendall's tau of the means (``stats.rank_agreement``)."""

    budgets: dict[int, BudgetNoise]
    rho: dict[tuple[int, int], float | None]
    agreement: dict[tuple[int, int], dict[str, Any]]
    chance: float
    n_val: int
    alpha: float

    @property
    def ladder(self) -> list[int]:
        return sorted(self.budgets)

    def plannable(self, min_learned: float = 0.0) -> list[int]:
        """Budgets a search can decide at: the seed noise measured, B0 above chance, and B0's margin over chance
        at least ``min_learned`` of its margin at the longest probed budget (a budget on the steep part of B0's
        learning curve ranks how fast networks start, not where they get)."""
        last = self.budgets[self.ladder[-1]].chance.get("mean") if self.budgets else None
        out = []
        for b in self.ladder:
            n = self.budgets[b]
            m = n.chance.get("mean")
            far = last is not None and m is not None and last > self.chance and (
                m - self.chance < min_learned * (last - self.chance))
            if n.learned and n.sigma and not far:
                out.append(b)
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-ready, for best.json: the figures the plan came from."""
        return {"chance": self.chance, "n_val": self.n_val, "alpha": self.alpha,
                "budgets": {str(b): {"candidates": n.candidates, "seeds": n.seeds, "sigma": n.sigma,
                                     "seed_sd": n.seed_sd, "tau": n.tau, "tau_ci": list(n.tau_ci),
                                     "b0": n.chance.get("mean"), "b0_p": n.chance.get("p_value"),
                                     "learned": n.learned, "ceiling_tau": n.ceiling.get("tau")}
                            for b, n in sorted(self.budgets.items())},
                "rho": {f"{a}-{b}": v for (a, b), v in self.rho.items()},
                "kendall": {f"{a}-{b}": v.get("kendall_tau") for (a, b), v in self.agreement.items()}}


def _block(groups: Mapping[str, Mapping[Any, float]], model: stats.SeedModel) -> tuple[list[str], np.ndarray]:
    names = [k for k, g in groups.items() if all(s in g for s in model.seeds)]
    return names, np.array([[groups[k][s] for s in model.seeds] for k in names], dtype=float).reshape(
        len(names), len(model.seeds))


def _tau(y: np.ndarray, res_var: float | None, dof: int, level: float = 0.95) -> tuple[float, tuple[float, float]]:
    """The spread of true means over the rows of ``y`` (candidates x seeds): (MS_cand - MS_res) / n, with the
    interval that (1 + n tau^2 / sigma^2) = F_obs / F(k - 1, dof) gives."""
    from scipy import stats as st

    k, n = y.shape
    if k < 2 or n < 1:
        return 0.0, (0.0, math.inf)
    ms_c = n * float(y.mean(axis=1).var(ddof=1))
    if not res_var or dof <= 0:
        return math.sqrt(max(ms_c / n, 0.0)), (0.0, math.inf)
    f = ms_c / res_var
    lo_q, hi_q = st.f.ppf([(1 + level) / 2, (1 - level) / 2], k - 1, dof)
    to_tau = lambda ratio: math.sqrt(max((ratio - 1) * res_var / n, 0.0))  # noqa: E731
    return to_tau(f), (to_tau(f / lo_q), to_tau(f / hi_q))


def fit_noise(rows: Sequence[Mapping[str, Any]], chance: float, n_val: int, metric: str = "val_top1",
              alpha: float = 0.05, resamples: int = 200) -> NoiseModel:
    """The noise model of the probe's finished rows (``chance``: the validation split's majority rate)."""
    by: dict[int, dict[str, dict[Any, float]]] = {}
    for r in _ok(rows, metric):
        by.setdefault(budget_of(r), {}).setdefault(cand_key(r), {})[r.get("seed")] = float(r[metric])
    budgets, resid = {}, {}
    for b, groups in sorted(by.items()):
        model = stats.fit_seed_model(list(groups.values()))
        names, y = _block(groups, model)
        judged = [i for i, k in enumerate(names) if not k.endswith(BASELINE)]
        tau, ci = _tau(y[judged], model.residual_var, (len(judged) - 1) * (len(model.seeds) - 1))
        ms_cand = len(model.seeds) * float(y[judged].mean(axis=1).var(ddof=1)) if len(judged) >= 2 else 0.0
        seed_var = max((model.run_var or 0.0) - (model.residual_var or 0.0), 0.0)
        base = next((list(g.values()) for k, g in groups.items() if k.endswith(BASELINE)), [])
        test = stats.above_chance(base, chance, n_val, model if model.residual_var else None, alpha)
        means = {k: statistics.fmean(g.values()) for k, g in groups.items()}
        budgets[b] = BudgetNoise(b, len(names), len(model.seeds),
                                 math.sqrt(model.residual_var) if model.residual_var else None, math.sqrt(seed_var),
                                 model.residual_dof, tau, ci, means, test,
                                 stats.noise_ceiling(groups, resamples=resamples), len(judged), ms_cand)
        if y.size and y.shape[1] >= 2:
            res = y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + y.mean()
            resid[b] = {(k, s): res[i, j] for i, k in enumerate(names) for j, s in enumerate(model.seeds)}
    rho, agreement = {}, {}
    ladder = sorted(budgets)
    for i, lo in enumerate(ladder):
        for hi in ladder[i + 1:]:
            keys = [k for k in budgets[lo].means if k in budgets[hi].means and not k.endswith(BASELINE)]
            a, c = budgets[lo], budgets[hi]
            agreement[(lo, hi)] = stats.rank_agreement({k: a.means[k] for k in keys}, {k: c.means[k] for k in keys})
            rho[(lo, hi)] = _rho(keys, a, c, resid.get(lo, {}), resid.get(hi, {}))
    return NoiseModel(budgets, rho, agreement, chance, n_val, alpha)


def _rho(keys: list[str], a: BudgetNoise, c: BudgetNoise, ra: Mapping[Any, float], rc: Mapping[Any, float]
         ) -> float | None:
    """Correlation of true means between two budgets: the candidates' mean covariance less the runs' own
    (a cooldown fork shares its run's luck up to the fork), over the product of the taus; None when unknown."""
    if len(keys) < 3 or a.tau <= 0 or c.tau <= 0:
        return None
    cov = float(np.cov([a.means[k] for k in keys], [c.means[k] for k in keys])[0, 1])
    both = [(ra[x], rc[x]) for x in ra if x in rc and x[0] in keys]
    n = max(min(a.seeds, c.seeds), 1)
    noise = sum(p * q for p, q in both) / max(len(both) - len(keys) - n + 1, 1) / n if both else 0.0
    return float(np.clip((cov - noise) / (a.tau * c.tau), -1.0, 1.0))


# ------------------------------------------------------------------------------------------------ cost

def start_steps(rows: Sequence[Mapping[str, Any]], mode: str = "cooldown", fraction: float = 0.2) -> list[int]:
    """Where each row's run started (its own ``start_step`` where given): a longer run of the same candidate and
    seed continues the shorter one's, from before its cooldown (``cooldown``), from its end (``continued``),
    or not at all (``independent``)."""
    runs: dict[tuple[str, Any], list[int]] = {}
    for r in rows:
        runs.setdefault((cand_key(r), r.get("seed")), []).append(budget_of(r))
    out = []
    for r in rows:
        if r.get("start_step") is not None:
            out.append(int(r["start_step"]))
            continue
        out.append(resume_step(budget_of(r), runs[(cand_key(r), r.get("seed"))], mode, fraction))
    return out


def resume_step(steps: int, earlier: Iterable[int], mode: str, fraction: float) -> int:
    """The step a run of ``steps`` starts from when the same candidate and seed ran the ``earlier`` budgets."""
    below = [b for b in earlier if b < steps]
    if not below or mode == "independent":
        return 0
    b = max(below)
    return b - max(1, round(fraction * b)) if mode == "cooldown" else b


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Seconds of one trial on this machine with ``workers`` trials running at once: ``rest`` (evaluation, setup,
    checkpoints: a + b x MMACs) + the trained steps after the first x ``step`` (a + b x MMACs) + the first step:
    ``cold`` (a compile: a + b x blocks) for the first trial of a network at a budget, else ``warm`` (a cache load
    or hit)."""

    step: tuple[float, float]
    rest: tuple[float, float]
    cold: tuple[float, float]
    warm: float
    workers: int = 1
    between_rungs_s: float = 5.0

    def trial_s(self, macs: float, blocks: float, trained: int, cold: bool) -> float:
        m = macs / 1e6
        first = self.cold[0] + self.cold[1] * blocks if cold else self.warm
        steps = max(trained - 1, 0) * max(self.step[0] + self.step[1] * m, 1e-6)  # the first is in ``first``
        return max(self.rest[0] + self.rest[1] * m, 0.0) + steps + first

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares a + b x over per-x medians; a constant (b = 0) when x does not vary."""
    pts: dict[float, list[float]] = {}
    for a, b in zip(x, y):
        pts.setdefault(round(a, 6), []).append(b)
    xs = np.array(sorted(pts))
    ys = np.array([statistics.median(pts[v]) for v in xs])
    if len(xs) < 2:
        return (float(ys[0]) if len(ys) else 0.0), 0.0
    b, a = np.polyfit(xs, ys, 1)
    return float(a), float(b)


def cold_flags(rows: Sequence[Mapping[str, Any]]) -> list[bool]:
    """Which rows compiled their program: the trainer's cache flags where ``timings`` has them, else the larger
    of two clusters of first-step times (split at the widest gap, when it is a factor of 3 or more)."""
    out: list[bool | None] = []
    for r in rows:
        t = r.get("timings") if isinstance(r.get("timings"), Mapping) else {}
        hit = "hit" in (t.get("program_cache"), t.get("program_store"))
        out.append(None if "program_cache" not in t else not hit)
    firsts = sorted({max(float(r["compile_s"]), 1e-3) for r, f in zip(rows, out) if f is None})
    cut = math.inf
    if len(firsts) >= 2:
        gaps = [(math.log(b / a), b) for a, b in zip(firsts, firsts[1:])]
        g, at = max(gaps)
        cut = at if g >= math.log(3) else (0.0 if firsts[0] > 10 else math.inf)
    return [f if f is not None else float(r["compile_s"]) >= cut for r, f in zip(rows, out)]


def fit_cost(rows: Sequence[Mapping[str, Any]], workers: int = 1, mode: str = "cooldown", fraction: float = 0.2,
             between_rungs_s: float = 5.0) -> CostModel:
    """The cost model of the probe's finished rows (run with ``workers`` trials at once)."""
    rows = [r for r in rows if r.get("status", "ok") == "ok" and _num(r.get("wall_time_s")) and
            _num(r.get("train_img_per_s")) and _num(r.get("compile_s")) is not None]
    if not rows:
        raise ValueError("no finished trial with its timings: nothing to fit a cost model on")
    starts = start_steps(rows, mode, fraction)
    cold = cold_flags(rows)
    macs = [float(r["macs"]) / 1e6 for r in rows]
    step = [float(r["batch_size"]) / float(r["train_img_per_s"]) for r in rows]
    trained = [max(budget_of(r) - s, 1) for r, s in zip(rows, starts)]
    rest = [float(r["wall_time_s"]) - float(r["compile_s"]) - (n - 1) * st for r, n, st in zip(rows, trained, step)]
    step_fit = _line(macs, step)
    warm_i = [i for i, c in enumerate(cold) if not c] or list(range(len(rows)))
    rest_fit = _line([macs[i] for i in warm_i], [rest[i] for i in warm_i])
    warm = statistics.median(float(rows[i]["compile_s"]) for i in warm_i)
    cold_i = [i for i, c in enumerate(cold) if c]
    extra = [float(rows[i]["compile_s"]) + rest[i] - (rest_fit[0] + rest_fit[1] * macs[i]) for i in cold_i]
    cold_fit = _line([float(rows[i].get("blocks") or 0) for i in cold_i], extra) if cold_i else (warm, 0.0)
    return CostModel(step_fit, rest_fit, cold_fit, warm, workers, between_rungs_s)


def makespan(durations: Iterable[float], workers: int) -> float:
    """Wall time of one rung's trials on ``workers``: longest first, each to the worker free first (the order
    ``grid_search.plan_rung`` sorts them in, claimed by every worker)."""
    free = [0.0] * max(workers, 1)
    for d in sorted(durations, reverse=True):
        i = free.index(min(free))
        free[i] += d
    return max(free)
