"""Proxy fidelity: does the search's cheap budget rank the candidates as a longer one does?

    python -m experiments.fidelity                                     # the grid search's default grid
    python -m experiments.fidelity --config.fidelity.budgets='(1,3,9)' --workdir=runs/fidelity

Trains the grid search's candidates (``search`` section, the same config as
``experiments.grid_search``) at budgets b, 3b, 9b (``fidelity.budgets`` times the trial
budget) and reports, for each budget, the rank correlation (Kendall tau, Spearman rho) of
its ranking with the largest budget's and whether the winner changes; ``fidelity.png``
plots each candidate's score against the budget and tau against the budget.

``fidelity.mode`` is one of the grid search's rung modes (``experiments.strategies.RUNG_MODES``):
``continued`` (default) stretches every run's learning-rate schedule over the largest budget,
so a budget-b score is the first b steps of the long run, and the budgets cost 9b per
candidate, not 13b. ``cooldown`` holds the learning rate constant after the warmup and scores
each budget after a decay to zero over its last ``search.cooldown_fraction``; the next budget
continues from before that decay (9b plus the cooldowns). ``independent`` gives every budget
its own full schedule: the proxy of an exhaustive search with short trials. Trials go through
the one trial queue (``experiments.queue``), resumable.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from effnet_jax import provenance
from effnet_jax.errors import UserError, exit_on_user_error
from effnet_jax.training import recipe
from experiments import queue, report, stats, trials, workers
from experiments.constraints import candidates
from experiments.strategies import check_search, rung_mode_for
from experiments.study import identity, open_study, storage_for
from experiments.trials import BASELINE, Candidate

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "fidelity.py")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validate the fidelity section, then the search section it shares with the grid search."""
    f = config.fidelity
    budgets = list(f.budgets)
    if len(budgets) < 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in budgets) \
            or sorted(set(budgets)) != budgets:
        raise UserError(f"fidelity.budgets must be >= 2 increasing integers >= 1 (multiples of the trial budget), "
                        f"got {tuple(budgets)}")
    rung_mode_for(config.search, f.mode, "fidelity.mode")
    trials.check_seeds(f.seeds, "fidelity.seeds")
    config.search.strategy = "exhaustive"  # one rung per budget here; the search's own check does the rest
    check_search(config)


def plans(config: ml_collections.ConfigDict, cands: Sequence[Candidate], base_steps: int
          ) -> list[queue.TrialPlan]:
    """Every (budget, candidate, seed), short budgets first, scored and continued as ``fidelity.mode`` says
    (in ``continued`` and ``cooldown`` one directory per (candidate, seed): each budget continues the one before)."""
    f = config.fidelity
    mode = rung_mode_for(config.search, f.mode, "fidelity.mode")
    steps = [base_steps * b for b in f.budgets]
    out = []
    for i, (b, n) in enumerate(zip(f.budgets, steps)):
        for c in cands:
            for seed in f.seeds:
                cfg = mode.config(config.train, c, config.search.phi, seed, steps, i)
                attrs = {**trials.candidate_attrs(c), "phi": cfg.model.phi, "seed": seed, "budget": b,
                         "budget_steps": n}
                out.append(queue.TrialPlan(mode.key(c, seed, steps, i), cfg, attrs,
                                            directory=mode.directory(c, seed, steps, i),
                                            keep_checkpoint=mode.keeps(steps, i)))
    return out


def analyse(rows: Sequence[dict[str, Any]], metric: str, dataset: str = "digits",
            resamples: int = stats.BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """Mean score per (budget, candidate); each budget's rank agreement with the largest budget's (Kendall tau
    with a bootstrap interval over candidates); at every budget with two or more seeds, the noise ceiling
    (seed-to-seed tau, ``stats.noise_ceiling``), and one line on what limits the cheap budgets."""
    scores: dict[int, dict[str, list[float]]] = {}
    by_seed: dict[int, dict[str, dict[Any, float]]] = {}
    for r in rows:
        if r["status"] == "ok" and r.get(metric) is not None:
            name = trials.candidate_name(r)
            scores.setdefault(r["budget"], {}).setdefault(name, []).append(r[metric])
            by_seed.setdefault(r["budget"], {}).setdefault(name, {})[r.get("seed")] = r[metric]
    means = {b: {k: sum(v) / len(v) for k, v in by.items()} for b, by in sorted(scores.items())}
    if not means:
        return {"means": {}, "agreement": [], "ceilings": {}, "ceiling_line": None}
    top = max(means)
    agreement = []
    for b, m in means.items():
        if b != top and len(set(m) & set(means[top])) >= 2:
            agreement.append({"budget": b, "top_budget": top,
                              **stats.rank_agreement(m, means[top], resamples=resamples),
                              "winner": max(m, key=m.get), "top_winner": max(means[top], key=means[top].get)})
    ceilings = {b: stats.noise_ceiling(by, resamples=resamples) for b, by in sorted(by_seed.items())}
    line = stats.limit_line(
        [{"name": f"{a['budget']}x", "tau": a["kendall_tau"], "ci": a.get("kendall_ci")} for a in agreement],
        ceilings[top], f"{top}x the trial budget",
        "raise the budgets (fidelity.budgets or train.num_train_steps)" + (
            " or use the fashion_mnist preset (--config=experiments/configs/fidelity.py:fashion_mnist)"
            if dataset == "digits" else " or the seeds (fidelity.seeds)"))
    return {"means": means, "agreement": agreement, "ceilings": ceilings, "ceiling_line": line}


def fidelity(config: ml_collections.ConfigDict, workdir: str, storage: str | None = None,
             study_name: str = "fidelity", log: Callable[[str], Any] = print, write: bool = True,
             worker: queue.Worker | None = None) -> dict[str, Any]:
    """Run (or join, or resume) the fidelity study; returns {"rows", "means", "agreement"}. ``write``: the
    output files (a local worker leaves them to the process that reports). ``worker``: this process's
    (``workers.begin``'s; default a new one)."""
    worker = queue.Worker() if worker is None else worker
    check_config(config)
    base = trials.trial_config(config.train, BASELINE, seed=0, schedule_steps=0)
    prepared = recipe.prepare(base)  # validates the train config; writes nothing
    cands = candidates(config.search, config.train, prepared.source.num_classes)
    base_steps = trials.budget_steps(config.train, prepared.steps_per_epoch)
    planned = plans(config, cands, base_steps)
    trials.check_trials(((p.key, p.config) for p in planned), prepared.steps_per_epoch)
    study = open_study(storage_for(storage, workdir), study_name, identity(config.train), storage or workdir)
    study.check_data(getattr(prepared.source, "fingerprint", None), storage or workdir)
    rows = list(worker.work(study, planned, workdir, config.search.metric, log).values())
    out = {"rows": rows, **analyse(rows, config.search.metric, config.train.data.name), "base_steps": base_steps}
    if not write:
        return out
    report.write_csv(os.path.join(workdir, "fidelity.csv"), rows,
                     ("trial_id", "label", "alpha", "beta", "gamma", "seed", "budget", "budget_steps",
                      *queue.RESULT_FIELDS))
    report.write_json(os.path.join(workdir, "fidelity.json"), {
        **analysis_json(out, config.search.metric), "mode": config.fidelity.mode,
        "provenance": provenance.provenance(), "config": config.to_dict(), "created": report.now()})
    from experiments import plots

    plots.fidelity_plot(out, config.search.metric, workdir)
    return out


def analysis_json(out: dict[str, Any], metric: str) -> dict[str, Any]:
    """``analyse``'s result (with ``base_steps``) as fidelity.json holds it: budgets as string keys."""
    return {"metric": metric, "base_steps": out["base_steps"],
            "means": {str(b): m for b, m in out["means"].items()}, "agreement": out["agreement"],
            "ceilings": {str(b): c for b, c in out["ceilings"].items()}, "ceiling_line": out["ceiling_line"]}


def format_agreement(out: dict[str, Any]) -> str:
    """Each budget's tau (with its bootstrap interval) against the largest budget, the seed-to-seed ceiling
    at each budget that ran two or more seeds, and the line on what limits the cheap budgets."""
    lines = [f"{'budget':>6} {'steps':>6} {'Kendall tau [95%]':>20} {'Spearman':>8} {'n':>3}  winner"]
    for a in out["agreement"]:
        changed = "same winner" if a["same_winner"] else f"{a['winner']} (at {a['top_budget']}x: {a['top_winner']})"
        rho = f"{a['spearman_rho']:.3f}" if a["spearman_rho"] is not None else "n/a"
        steps = a["budget"] * out["base_steps"]
        lines.append(f"{a['budget']:>5}x {steps:>6} {_tau_text(a['kendall_tau'], a.get('kendall_ci')):>20} {rho:>8} "
                     f"{a['n']:>3}  {changed}")
    for b, c in (out.get("ceilings") or {}).items():
        if c["tau"] is not None:
            lines.append(f"noise ceiling at {b}x ({b * out['base_steps']} steps, seeds {c['seeds']}): seed-to-seed "
                         f"Kendall tau {_tau_text(c['tau'], c['ci'])} over {c['n']} candidates")
    if out.get("ceiling_line"):
        lines.append(out["ceiling_line"])
    return "\n".join(lines)


def _tau_text(tau: float | None, ci: Sequence[float] | None) -> str:
    if tau is None:
        return "n/a"
    return f"{tau:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    exp = workers.begin(argv, "experiments.fidelity", DEFAULT_CONFIG, check_config)
    fv, t0 = exp.flags, time.time()
    out = exp.serve(lambda log, write: fidelity(exp.config, exp.workdir, fv.storage, fv.study_name, log, write,
                                                exp.worker))
    if fv.worker:
        return out
    print(format_agreement(out))
    print(f"fidelity study took {time.time() - t0:.0f} s; results in {exp.workdir}")
    return out


if __name__ == "__main__":
    main()
