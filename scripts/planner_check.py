"""The planner's two acceptance numbers from docs/data (issue 36), printed with what they were measured on.

    python scripts/planner_check.py            # ~30 s on a 2-core CPU; --sims=N for more simulated searches

1. **Power calibration.** Noise models measured from the fidelity studies in docs/data (digits: 11
   candidates x 3 seeds at 80/240 steps; Fashion-MNIST: 10 x 3 at 93/279, cooldown). For plans shaped like
   the searches that were run, the power ``experiments.power`` predicts (vectorised, its own draws) against
   the power achieved by ``--sims`` searches drawn from the same model with other random numbers and
   decided by the search's own functions on synthetic result rows (``experiments.analysis``: summarize,
   pick_best, judge with the pooled test, contenders for racing; ``strategies.Halving.survivors`` for the
   cut), as ``grid_search`` calls them.
2. **Cost model.** Fitted on the quiet Fashion-MNIST fidelity study (``fidelity-fmnist-continued``: 10
   candidates x 3 seeds at 93 and 279 steps, 2 workers, 2-core Xeon), it predicts every trial of the
   searches run on that machine (race A/B, two-seed C, preset A/B: 126 trials); median relative error of
   a trial's wall time, and of each run's summed trial time. Also shown, not part of the acceptance: the
   same fit on the AMD EPYC runs (another machine), and digits fitted on its 80-step trials predicting its
   240-step ones.

Also shown, not part of the acceptance: the same plans against searches whose candidates and residuals are
resampled from the studies themselves (the normal model's shape checked, not only its parameters), and the
power predicted from probe-sized subsets of the studies (B0 + 4 candidates x 2 seeds), at their estimates and
over their uncertainty: how far one small probe can be from the truth.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import power, probe, stats  # noqa: E402

DATA = os.path.join(ROOT, "docs", "data")
PREFIX = "cpu-2026-12-07-"
# (files, chance, validation images): the noise models the calibration draws from
MODELS = {
    "digits": (["fidelity-digits-cooldown-80-240.csv"], 0.1, 360),
    "fashion_mnist": (["fidelity-fmnist-cooldown.csv", "fidelity-fmnist-cooldown-seed2.csv"], 0.1, 2000),
}
# plans shaped like the searches run (grid points, paper, B0): (name, model, Spec-like kwargs, low, top)
PLANS = [
    ("digits default: 9 grid, rung 0 80 steps x 1 seed, keep 3, 240 x 2", "digits",
     dict(grid=9, rung0_seeds=1, keep=3, top_seeds=2), 80, 240),
    ("digits exhaustive: 80 steps x 4 seeds", "digits", dict(grid=9, top_seeds=4), None, 80),
    ("fmnist preset + racing: 8 grid, 93 x 2, keep 3, 279 x 2, race 1", "fashion_mnist",
     dict(grid=8, rung0_seeds=2, keep=3, top_seeds=2, race=1), 93, 279),
    ("fmnist exhaustive: 279 steps x 3 seeds", "fashion_mnist", dict(grid=8, top_seeds=3), None, 279),
]
COST_FIT = ["fidelity-fmnist-continued.csv"]
COST_PREDICT = ["fmnist-race-runA-results.csv", "fmnist-race-runB-results.csv", "fmnist-2seeds-runC-results.csv",
                "fmnist-preset-runA-results.csv", "fmnist-preset-runB-results.csv"]
COST_OTHER_MACHINE = ["fmnist-cooldown-runA-results.csv", "fmnist-cooldown-runB-results.csv",
                      "fmnist-cooldown-runC-results.csv"]


# ------------------------------------------------------------------------------------------------ data

def load(name: str) -> list[dict[str, Any]]:
    """A docs/data results CSV as rows: numbers as numbers, ``budget_steps`` always there."""
    with open(os.path.join(DATA, PREFIX + name)) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in list(r.items()):
            if k in ("trial_id", "label", "status", "reason", "dataset", "state"):
                r[k] = v or ""
                continue
            try:
                r[k] = float(v) if v not in ("", None) else None
            except ValueError:
                pass
        r["seed"] = int(r["seed"])
        r["budget_steps"] = int(r.get("budget_steps") or r["steps"])
    return rows


def mode_of(rows: Sequence[dict[str, Any]]) -> str:
    """The rung mode a study ran in, from its trial keys' tag (``strategies.RUNG_MODES``)."""
    key = rows[0]["trial_id"]
    return "cooldown" if key.endswith("-cd") else "independent" if key.endswith("-own") else "continued"


def noise_model(name: str) -> probe.NoiseModel:
    files, chance, n_val = MODELS[name]
    return probe.fit_noise([r for f in files for r in load(f)], chance, n_val)


def latency_first(result_csv: str) -> bool:
    """Whether the run timed its networks before rung 0 (their rung-0 programs then load from the cache)."""
    path = os.path.join(DATA, PREFIX + result_csv.replace("-results.csv", "-best.json"))
    with open(path) as f:
        return bool(json.load(f)["config"]["search"].get("measure_latency"))


# ------------------------------------------------------------------------------- the real decisions

def reference(shape: power.Shape, d: power.Draws, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(contender-set size, the true best in it) of each drawn search, decided by the search's own functions on
    synthetic result rows: ``analysis.summarize`` -> ``strategies.Halving.survivors`` (the cut, when keep =
    ceil(grid / eta) for a whole eta), racing with ``analysis.contenders`` as ``grid_search.race`` does, then
    ``analysis.pick_best`` and ``analysis.judge`` (pooled test, formula constraint that admits the paper's point)."""
    import ml_collections

    from experiments import analysis, strategies
    from experiments.constraints import constraint_for
    from experiments.trials import Candidate

    metric = "val_top1"
    search = ml_collections.ConfigDict({"constraint": "formula", "target": 2.0, "tolerance": 0.1, "test": stats.POOLED,
                                        "alpha_level": alpha, "halving_eta": 2})
    constraint = constraint_for(search)
    grid = [Candidate(round(2.0 / ((1 + i / 100) ** 2 * 1.05 ** 2), 4), 1 + i / 100, 1.05) for i in range(shape.grid)]
    cands = (grid + [Candidate(1.2, 1.1, 1.15 + i / 100, "paper") for i in range(shape.paper)]
             + [Candidate(1.0, 1.0, 1.0 + i / 100, "baseline") for i in range(shape.pool)])
    index = {c.name: j for j, c in enumerate(cands)}
    eta = next((e for e in range(2, shape.grid + 1) if math.ceil(shape.grid / e) == shape.keep), None)
    search.halving_eta = eta or 2
    halving = strategies.Halving(search)
    judged = range(shape.grid + shape.paper)

    def row(j: int, rung: int, seed: int, y: float) -> dict[str, Any]:
        c = cands[j]
        return {"alpha": c.alpha, "beta": c.beta, "gamma": c.gamma, "label": c.label, "product": c.product,
                "rung": rung, "seed": seed, "status": "ok", metric: y, "wall_time_s": 1.0}

    def summary(rows: list[dict[str, Any]]) -> list[Any]:
        return analysis.summarize(rows, metric, test=stats.POOLED, constraint=constraint)

    counts, holds = [], []
    for i in range(d.mu.shape[0]):
        alive = list(range(len(cands)))
        rows: list[dict[str, Any]] = []
        if d.y0 is not None:
            low = [row(j, 0, s, float(d.y0[i, j, s])) for j in alive for s in range(shape.rung0_seeds)]
            if eta is not None:
                kept = set(halving.survivors(summary(low), cands, 0))
                alive = [j for j, c in enumerate(cands) if c in kept]
            else:
                order = np.argsort(-d.y0[i, :shape.grid].mean(axis=1), kind="stable")[:shape.keep]
                alive = sorted(int(j) for j in order) + list(range(shape.grid, len(cands)))
            rows += low
        top = 1 if d.y0 is not None else 0
        rows += [row(j, top, s, float(d.y[i, j, s])) for j in alive for s in range(shape.top_seeds)]
        for r in range(shape.race):
            racing = analysis.contenders(summary(rows), search, [cands[j] for j in alive])
            if not racing:
                break
            rows += [row(index[c.name], top, shape.top_seeds + r, float(d.y[i, index[c.name], shape.top_seeds + r]))
                     for c in racing]
        final = summary(rows)
        chosen = [index[k] for k in analysis.judge(final, analysis.pick_best(final, search), search)["contenders"]]
        counts.append(len(chosen))
        best_mu = max(d.mu[i, j] for j in judged)
        holds.append(any(d.mu[i, j] >= best_mu for j in chosen))
    return np.array(counts), np.array(holds)


def resampled(name: str, shape: power.Shape, low: int | None, top: int, sims: int, seed: int) -> power.Draws:
    """Searches drawn from the study's own numbers rather than the normal model: each slot's true means (at rung
    0's budget and the deciding one) are one measured candidate's (resampled; B0 left out), its effects shrunk
    so that their spread is the fitted tau; every run's noise is a resampled two-way residual of that budget
    (scaled to the residual variance), and the seed effects are the measured ones, resampled."""
    files, _, _ = MODELS[name]
    rows = [r for f in files for r in load(f)]
    fit = noise_model(name)
    rng = np.random.default_rng(seed)
    tables = {}
    for b in [x for x in (low, top) if x]:
        by: dict[str, dict[int, float]] = {}
        for r in rows:
            if r["budget_steps"] == b:
                by.setdefault(probe.cand_key(r), {})[r["seed"]] = r["val_top1"]
        seeds = sorted(set.intersection(*(set(v) for v in by.values())))
        keys = sorted(by)
        y = np.array([[by[k][s] for s in seeds] for k in keys])
        k, n = y.shape
        res = (y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + y.mean()) * math.sqrt(
            k * n / ((k - 1) * (n - 1)))
        judged = np.array([not k_.endswith(probe.BASELINE) for k_ in keys])
        eff = y.mean(1)[judged] - y.mean(1)[judged].mean()
        sd = eff.std()
        tables[b] = (eff * (fit.budgets[b].tau / sd if sd > 0 else 0.0), res.ravel(), y.mean(0) - y.mean())
    nc = shape.grid + shape.paper + shape.pool
    pick = rng.integers(0, len(tables[top][0]), size=(sims, nc))

    def scores(b: int, seeds: int) -> tuple[np.ndarray, np.ndarray]:
        eff, res, col = tables[b]
        mu = eff[pick]
        return mu, mu[:, :, None] + rng.choice(col, (sims, 1, seeds)) + rng.choice(res, (sims, nc, seeds))

    mu, y = scores(top, shape.top_seeds + shape.race)
    y0 = scores(low, shape.rung0_seeds)[1] if low else None
    return power.Draws(mu, y0, y)


def calibration(sims: int = 2000, seed: int = 1) -> list[dict[str, Any]]:
    """Predicted power (``power.simulate``, seed 0) against the power achieved by ``sims`` searches drawn with
    ``seed`` and decided by ``reference``, for every plan in ``PLANS``."""
    models = {name: noise_model(name) for name in MODELS}
    out = []
    for label, model, kw, low, top in PLANS:
        m = models[model]
        shape = power.Shape(**kw)
        lo = m.budgets[low].noise() if low else None
        rho = m.rho.get((low, top)) if low else None
        args = (shape, m.budgets[top].noise(), lo, 0.0 if rho is None else rho)
        predicted = power.simulate(*args, sims=sims, seed=0)
        counts, holds = reference(shape, power.draw(*args, sims=sims, seed=seed))
        achieved = float((counts <= shape.judged / 2).mean())
        resampled_power = power.decide(shape, resampled(model, shape, low, top, sims, seed + 1)).power
        probes = [probe_sized(model, shape, low, top, sims, seed=s) for s in range(PROBE_DRAWS)]
        point, unsure = np.array(probes).T
        out.append({"plan": label, "model": model, "predicted": predicted.power, "achieved": achieved,
                    "error": abs(predicted.power - achieved), "holds_predicted": predicted.holds,
                    "holds_achieved": float(holds.mean()), "sims": sims, "resampled": resampled_power,
                    "probe_sized": [float(np.min(point)), float(np.median(point)), float(np.max(point))],
                    "probe_sized_uncertain": [float(np.min(unsure)), float(np.median(unsure)), float(np.max(unsure))]})
    return out


PROBE_DRAWS = 10


def probe_sized(name: str, shape: power.Shape, low: int | None, top: int, sims: int, seed: int
                ) -> tuple[float, float]:
    """The power predicted from a probe-sized subset of the study (B0 and 4 random other candidates, 2 random
    seeds, both budgets), at its point estimates and over their uncertainty (``BudgetNoise.draws``): what one
    probe would say (the spread of these over subsets is what a probe cannot know)."""
    files, chance, n_val = MODELS[name]
    rows = [r for f in files for r in load(f)]
    rng = np.random.default_rng(100 + seed)
    keys = sorted({probe.cand_key(r) for r in rows if r["label"] != "baseline"})
    picked = set(rng.choice(keys, 4, replace=False)) | {probe.cand_key(r) for r in rows if r["label"] == "baseline"}
    seeds = set(rng.choice(sorted({r["seed"] for r in rows}), 2, replace=False).tolist())
    m = probe.fit_noise([r for r in rows if probe.cand_key(r) in picked and r["seed"] in seeds], chance, n_val,
                        resamples=0)
    rho = m.rho.get((low, top)) if low else None
    point = power.simulate(shape, m.budgets[top].noise(), m.budgets[low].noise() if low else None, rho or 0.0,
                           sims=sims, seed=0).power
    unsure = power.simulate(shape, m.budgets[top].draws(sims, 1), m.budgets[low].draws(sims, 2) if low else None,
                            rho or 0.0, sims=sims, seed=0).power
    return point, unsure


# ----------------------------------------------------------------------------------------------- cost

def predict_run(cost: probe.CostModel, rows: list[dict[str, Any]], warm_rung0: bool) -> list[float]:
    """Each trial's predicted seconds, in the run's own order: the first trial of a network at a budget compiles
    (unless the run timed its networks first: then rung 0's programs were compiled)."""
    rows = sorted(rows, key=lambda r: r.get("trial_number") or 0)
    starts = probe.start_steps(rows, mode_of(rows))
    low = min(r["budget_steps"] for r in rows)
    seen, out = set(), []
    for r, s in zip(rows, starts):
        key = (probe.cand_key(r), r["budget_steps"])
        cold = key not in seen and not (warm_rung0 and r["budget_steps"] == low)
        seen.add(key)
        out.append(cost.trial_s(r["macs"], r["blocks"], r["budget_steps"] - s, cold))
    return out


def cost_errors(fit: Sequence[str], predict: Sequence[str]) -> dict[str, Any]:
    """Fit on ``fit``'s trials, predict ``predict``'s: the median relative error per trial and per run's total."""
    fit_rows = [r for f in fit for r in load(f)]
    cost = probe.fit_cost(fit_rows, workers=2, mode=mode_of(fit_rows))
    trial_err, runs = [], {}
    for name in predict:
        rows = sorted(load(name), key=lambda r: r.get("trial_number") or 0)
        pred = predict_run(cost, rows, latency_first(name))
        actual = [r["wall_time_s"] for r in rows]
        trial_err += [abs(p - a) / a for p, a in zip(pred, actual)]
        runs[name] = {"trials": len(rows), "predicted_s": sum(pred), "actual_s": sum(actual),
                      "error": abs(sum(pred) - sum(actual)) / sum(actual)}
    return {"fit": list(fit), "trials": len(trial_err), "median_trial_error": statistics.median(trial_err),
            "median_run_error": statistics.median(r["error"] for r in runs.values()), "runs": runs,
            "model": cost.describe()}


def digits_cost() -> dict[str, Any]:
    """Digits: fitted on the fidelity study's 80-step trials, predicting its 240-step ones (longer budgets)."""
    rows = load("fidelity-digits-cooldown-80-240.csv")
    rows.sort(key=lambda r: (r["budget_steps"], r["seed"]))
    starts = probe.start_steps(rows, "cooldown")
    short = [r for r in rows if r["budget_steps"] == 80]
    cost = probe.fit_cost(short, workers=2, mode="cooldown")
    flags = probe.cold_flags(rows)  # which trials compiled, as measured: the study's order is not in its CSV
    err = [abs(cost.trial_s(r["macs"], r["blocks"], r["budget_steps"] - s, c) - r["wall_time_s"]) / r["wall_time_s"]
           for r, s, c in zip(rows, starts, flags) if r["budget_steps"] == 240]
    return {"trials": len(err), "median_trial_error": statistics.median(err)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sims", type=int, default=2000)
    args = ap.parse_args(argv)
    cal = calibration(args.sims)
    print(f"power calibration: predicted (experiments.power) vs achieved ({args.sims} searches decided by "
          "analysis.judge / Halving.survivors / racing), noise models from docs/data fidelity studies")
    for c in cal:
        print(f"  {c['plan']:<66} predicted {c['predicted']:.3f} achieved {c['achieved']:.3f} "
              f"|error| {c['error']:.3f}   (holds {c['holds_predicted']:.2f} vs {c['holds_achieved']:.2f})")
    for model in MODELS:
        print(f"  {model}: largest |error| {max(c['error'] for c in cal if c['model'] == model):.3f} (bound 0.05)")
    print("  (not acceptance) the same plans against searches whose candidates and residuals are resampled from the "
          "studies (not normal), and the power predicted from probe-sized subsets (B0 + 4 candidates x 2 seeds; "
          f"min/median/max of {PROBE_DRAWS}):")
    for c in cal:
        lo, mid, hi = c["probe_sized"]
        ulo, umid, uhi = c["probe_sized_uncertain"]
        print(f"  {c['plan']:<66} resampled {c['resampled']:.3f}; from a probe {lo:.2f}/{mid:.2f}/{hi:.2f}, "
              f"over its uncertainty {ulo:.2f}/{umid:.2f}/{uhi:.2f}")
    cost = cost_errors(COST_FIT, COST_PREDICT)
    print(f"cost model: fitted on {', '.join(COST_FIT)}; {cost['trials']} trials of {len(COST_PREDICT)} searches on "
          f"the same machine: median relative error per trial {cost['median_trial_error']:.3f} (bound 0.15), per "
          f"run's summed trial time {cost['median_run_error']:.3f}")
    for name, r in cost["runs"].items():
        print(f"  {name:<34} {r['trials']:>3} trials predicted {r['predicted_s']:>6.0f} s actual {r['actual_s']:>6.0f}"
              f" s ({r['error']:.1%})")
    other = cost_errors(COST_FIT, COST_OTHER_MACHINE)
    dig = digits_cost()
    print(f"  (not acceptance) same fit on the AMD EPYC runs: per trial {other['median_trial_error']:.3f}, per run "
          f"{other['median_run_error']:.3f}; digits fitted on 80-step trials, predicting {dig['trials']} 240-step "
          f"ones: {dig['median_trial_error']:.3f}")
    return {"calibration": cal, "cost": cost, "cost_other_machine": other, "digits_cost": dig}


if __name__ == "__main__":
    main()
