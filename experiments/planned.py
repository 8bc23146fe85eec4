"""A search with a time budget (``search.time_budget``): probe, plan or refuse, then keep to the deadline.

The probe trains unscaled B0, the paper's point and the grid's star directions (its most depth-, width- and
resolution-heavy points and the one nearest the centre) with two seeds, as warmup-stable-decay runs forked
at a geometric ladder of budgets (each budget one cooldown fork of the same run), up the ladder while the
next budget is predicted to fit in a quarter of the time. From those trials ``experiments.probe`` fits the
noise model (chance test, seed noise, the candidates' spread at every budget) and the cost model (a trial's
seconds from its MACs, blocks and steps), and ``experiments.planner`` chooses the plan of highest predicted
power that fits the time left, or refuses with what it would take. The plan is kept in the study, so every
worker, the parent's report and a rerun run the same plan; its trials are the probe's wherever they coincide
(same candidate, seed and budget: the queue trains each key once).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ml_collections

from effnet_jax.data import input_pipeline
from effnet_jax.errors import UserError
from effnet_jax.model import cost
from experiments import planner, probe, queue, trials
from experiments.trials import Candidate

PROBE_SHARE = 0.25  # of the time budget, at most
PROBE_SEEDS = (0, 1)
LADDER_RATIO = 3  # each probed budget this many times the one before
PLAN_ATTR = "plan"  # the study's user attribute that holds the plan (or the refusal)
_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_budget(text: str) -> float:
    """'90s', '30m', '2h' or '1.5h' as seconds; a UserError for anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh])\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"search.time_budget must be a positive duration such as 30m, 2h or 900s, got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def probe_candidates(cands: Sequence[Candidate]) -> list[Candidate]:
    """The references and up to four grid points spread over the grid: the star directions and its centre."""
    grid = [c for c in cands if not c.label]
    refs = [c for c in cands if c.label]
    if not grid:
        return refs
    centre = [sum(getattr(c, a) for c in grid) / len(grid) for a in ("alpha", "beta", "gamma")]
    picks = [max(grid, key=lambda c: (c.alpha, -c.beta, -c.gamma)), max(grid, key=lambda c: (c.beta, -c.alpha)),
             max(grid, key=lambda c: (c.gamma, -c.alpha)),
             min(grid, key=lambda c: sum((getattr(c, a) - x) ** 2 for a, x in zip(("alpha", "beta", "gamma"), centre)))]
    return refs + list(dict.fromkeys(picks))


def plan_cands(train: ml_collections.ConfigDict, cands: Sequence[Candidate], num_classes: int) -> list[planner.Cand]:
    """The candidates as the planner prices and simulates them (names as ``probe.cand_key`` reads rows)."""
    out = []
    for c in cands:
        spec, arch = trials.network(train, c)
        role = "baseline" if c.label == trials.BASELINE.label else "paper" if c.label else "grid"
        out.append(planner.Cand(probe.cand_key(trials.candidate_attrs(c) | {"label": c.label}),
                                cost.count_macs(arch, spec.resolution, num_classes) / 1e6, len(arch.blocks), role))
    return out


def trained(rows: Iterable[dict[str, Any]]) -> list[tuple[str, Any, int]]:
    """Trials as the planner prices them (candidate, seed, steps): a plan does not train them again."""
    return [(probe.cand_key(r), r["seed"], probe.budget_of(r)) for r in rows]


def run_probe(config: ml_collections.ConfigDict, cands: Sequence[Candidate], study: Any, workdir: str,
              worker: queue.Worker, num_classes: int, start_steps: int, seconds: float, workers: int,
              plan_rung: Callable[..., list[queue.TrialPlan]], log: Callable[[str], Any]
              ) -> tuple[list[dict[str, Any]], list[int]]:
    """Train the probe up its ladder while the next budget fits in ``PROBE_SHARE`` of ``seconds``; its rows and
    the ladder it reached."""
    t0, share = time.time(), PROBE_SHARE * seconds
    pcands = probe_candidates(cands)
    priced = plan_cands(config.train, pcands, num_classes)
    limits = planner.Limits(mode="cooldown", cooldown_fraction=float(config.search.cooldown_fraction))
    ladder, rows = [start_steps], {}
    log(f"probe: {len(pcands)} candidates x {len(PROBE_SEEDS)} seeds at {start_steps} steps, then x{LADDER_RATIO} "
        f"while the next budget fits in {share / 60:.1f} min ({PROBE_SHARE:.0%} of the time budget)")
    while True:
        steps = [*ladder, ladder[-1] * LADDER_RATIO]  # one more: every probed run keeps its stable checkpoint
        rows.update(worker.work(study, plan_rung(config, pcands, len(ladder) - 1, steps, num_classes,
                                                 seeds=list(PROBE_SEEDS)), workdir, config.search.metric, log))
        fitted = probe.fit_cost(list(rows.values()), workers, "cooldown", float(config.search.cooldown_fraction))
        done = trained(rows.values())
        nxt = planner.rung_seconds(planner.Spec(top=steps[-1], top_seeds=len(PROBE_SEEDS)), priced, fitted, limits,
                                   done=done)
        if time.time() - t0 + sum(r["seconds"] for r in nxt) > share:
            return list(rows.values()), ladder
        ladder.append(steps[-1])


def choose_plan(config: ml_collections.ConfigDict, rows: Sequence[dict[str, Any]], cands: Sequence[Candidate],
                source: Any, num_classes: int, seconds_left: float, workers: int) -> dict[str, Any]:
    """The plan (or the refusal) from the probe's rows, as the JSON the study keeps: ``answer`` False for a
    refusal, ``line`` what to print, ``overrides`` the config fields that run it, and the probe's figures."""
    s = config.search
    chance = input_pipeline.majority_rate(source) or 1.0 / num_classes
    noise = probe.fit_noise(rows, chance, source.num_eval, s.metric, s.alpha_level)
    fitted = probe.fit_cost(rows, workers, "cooldown", float(s.cooldown_fraction))
    limits = planner.Limits(min_power=float(s.min_power), alpha=float(s.alpha_level), mode="cooldown",
                            cooldown_fraction=float(s.cooldown_fraction))
    done = trained(r for r in rows if r.get("status") == "ok")
    compiled = sorted({(n, b) for n, _, b in done})
    out = planner.choose(noise, fitted, plan_cands(config.train, cands, num_classes), seconds_left, limits,
                         done=done, compiled=compiled)
    probe_figures = {"noise": noise.describe(), "cost": fitted.describe(), "seconds_left": seconds_left,
                     "workers": workers}
    if isinstance(out, planner.Plan):
        return {"answer": True, "table": out.table(), "plan": out.describe(), "overrides": out.overrides(),
                "probe": probe_figures}
    best = out.best
    return {"answer": False, "line": out.line(), "kind": out.kind, "needs": out.needs, "probe": probe_figures,
            **({"table": best.table(), "plan": best.describe(), "overrides": best.overrides()} if best else {})}


def apply(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """``config`` with a plan's fields set (dotted names), in cooldown mode: what today's machinery runs."""
    c = config.copy_and_resolve_references()
    c.search.rung_mode = "cooldown"
    for name, value in overrides.items():
        section, field = name.split(".", 1)
        c[section][field] = tuple(value) if isinstance(value, list) else value
    return c


def seconds_of(text: str) -> float | None:
    """``search.time_budget`` in seconds; None for "" (the fixed plan)."""
    return parse_budget(text) if str(text).strip() else None



class Refused(UserError):
    """The planner refused the search (``plan``: the JSON the study keeps, ``answer`` False); a worker process
    stops on it as on any mistake (exit 2), and the parent writes best.json and says it once."""

    def __init__(self, plan: dict[str, Any]) -> None:
        super().__init__(plan.get("line", "the planner refused the search"))
        self.plan = plan


def write_refusal(workdir: str, config: ml_collections.ConfigDict, plan: dict[str, Any]) -> None:
    """best.json for a refused search: no answer (``scale_up`` refuses it), why, and what the probe measured."""
    import os

    from effnet_jax import provenance
    from experiments import report

    report.write_json(os.path.join(workdir, "best.json"),
                      {"answer": False, "reason": plan.get("line"), "planner": plan,
                       "provenance": provenance.provenance(), "config": config.to_dict(), "created": report.now()})
