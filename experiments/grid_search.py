"""Grid search over EfficientNet's compound-scaling constants (alpha, beta, gamma).

    python -m experiments.grid_search                      # embedded digits, a laptop CPU, minutes
    python -m experiments.grid_search --workdir=runs/grid --storage=postgresql://user:pw@db/effnet
    python -m experiments.grid_search --then_scale=1,2,3  # scale the winner, print params/MACs

Candidates satisfy |alpha * beta**2 * gamma**2 - target| <= tolerance on a grid; the
paper's (1.2, 1.1, 1.15) and the unscaled B0 ride along as labelled references. Each
trial is B0 scaled at phi = 1 by a candidate, trained through the one trainer and scored
on a validation split.

The search is an Optuna study worked by ``experiments.runner`` (a journal file in the
workdir by default, or ``--storage``): every process that runs the same command on the same
storage shares the queue, each trial runs once, a killed worker's trial resumes from its
checkpoint. ``--local_workers`` starts several worker processes on this machine.

Successive halving (``search.strategy = "halving"``, the default) runs in synchronous
rungs: every candidate trains ``b`` steps with ``search.seeds``; the best 1/eta of the grid
points (and the two references) go on to eta·b steps with ``search.final_seeds``. Every
rung's learning-rate schedule spans the top rung's length (``schedule_steps``), so a
promoted run *continues* its shorter run's checkpoint instead of training again from
scratch, and the winner is decided at the largest budget with every final seed.
Synchronous rungs rather than Optuna's asynchronous pruners because the survivors are then a
function of the config alone (the same on every rerun and worker count), and because a
pruner stops a trial part-way while here the cost that dominates, compiling each network,
is paid before the first step either way.

Outputs in --workdir: study.journal (the study), results.csv (one row per trial), best.json
(alpha, beta, gamma, the interval, the verdict and the whole search config: what
``experiments.scale_up`` and ``config.model.constants`` read), grid.png,
accuracy_vs_macs.png, TensorBoard hparams. ``optuna-dashboard`` opens the study file.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from effnet_jax import cli, cost, rundir, scaling, trainer
from effnet_jax.arch import Architecture
from effnet_jax.configs import to_steps
from effnet_jax.errors import UserError, exit_on_user_error
from effnet_jax.scaling import PAPER_CONSTANTS
from experiments import report, runner, stats

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "grid_search.py")
METRICS = ("val_top1", "ema_val_top1", "val_top5", "ema_val_top5")
CSV_FIELDS = ("trial_id", "trial_number", "state", "label", "alpha", "beta", "gamma", "product", "phi", "seed",
              "rung", *runner.RESULT_FIELDS)


@dataclasses.dataclass(frozen=True)
class Candidate:
    alpha: float
    beta: float
    gamma: float
    label: str = ""  # "paper", "baseline" or ""

    @property
    def product(self) -> float:
        return self.alpha * self.beta**2 * self.gamma**2

    @property
    def key(self) -> str:
        return f"a{self.alpha:.3f}-b{self.beta:.3f}-g{self.gamma:.3f}" + ("-phi0" if self.label == "baseline" else "")


def grid_values(bounds: Sequence[float], step: float) -> list[float]:
    """Inclusive grid lo, lo + step, ..., hi (rounded to kill float drift)."""
    lo, hi = float(bounds[0]), float(bounds[1])
    if lo < 1 or hi < lo or step <= 0:
        raise UserError(f"a range must satisfy 1 <= lo <= hi with step > 0, got ({lo}, {hi}) step {step}")
    n = int(math.floor((hi - lo) / step + 1e-9))
    return [round(lo + i * step, 6) for i in range(n + 1)]


def candidates(search: ml_collections.ConfigDict, train_config: ml_collections.ConfigDict | None = None,
               num_classes: int | None = None) -> list[Candidate]:
    """Grid points meeting the constraint, then the labelled references.

    ``search.constraint = "formula"`` (the paper's rule): |alpha*beta^2*gamma^2 - target| <= tolerance.
    ``"macs"``: the rounded network's real MACs over unscaled B0's within ``macs_tolerance`` (relative) of
    target**phi; this needs the trial config and class count (the classifier is part of the cost), and grid
    points that round to the same network are one candidate, the one whose product is closest to target.
    """
    points = [Candidate(a, b, g) for a in grid_values(search.alpha, search.step)
              for b in grid_values(search.beta, search.step) for g in grid_values(search.gamma, search.step)]
    if not points:
        raise UserError("the search ranges hold no grid point")
    if search.constraint == "macs":
        if train_config is None or num_classes is None:
            raise ValueError("search.constraint = 'macs' needs the trial config and the class count")
        kept = _within_real_macs(points, search, train_config, num_classes)
    else:
        kept = [c for c in points if abs(c.product - search.target) <= search.tolerance]
    if not kept:
        near = min(points, key=lambda c: abs(c.product - search.target))
        raise UserError(
            f"no candidate satisfies |alpha*beta^2*gamma^2 - {search.target}| <= {search.tolerance}; the closest "
            f"is alpha={near.alpha}, beta={near.beta}, gamma={near.gamma} (product {near.product:.4f}): "
            "widen the ranges or the tolerance")
    if search.include_paper:
        paper = Candidate(**PAPER_CONSTANTS, label="paper")
        if search.constraint == "macs":  # the paper's point stands for the grid point of its rounded network
            same = _network(train_config, paper, search.phi)
            kept = [c for c in kept if _network(train_config, c, search.phi) != same]
        kept = [c for c in kept if c.key != paper.key] + [paper]
    if search.include_baseline:
        kept.append(Candidate(1.0, 1.0, 1.0, label="baseline"))
    return kept


def _within_real_macs(points: Sequence[Candidate], search: ml_collections.ConfigDict,
                      train_config: ml_collections.ConfigDict, num_classes: int) -> list[Candidate]:
    """The grid points whose rounded networks cost target**phi times unscaled B0's MACs, one per network."""
    base = _macs(train_config, Candidate(1.0, 1.0, 1.0, "baseline"), num_classes)
    goal = search.target**search.phi
    networks: dict[tuple[Architecture, int], list[Candidate]] = {}
    closest: tuple[float, Candidate] | None = None
    for c in points:
        arch, resolution = network = _network(train_config, c, search.phi)
        ratio = cost.count_macs(arch, resolution, num_classes) / base
        if closest is None or abs(ratio - goal) < abs(closest[0] - goal):
            closest = (ratio, c)
        if abs(ratio / goal - 1) <= search.macs_tolerance + 1e-9:
            networks.setdefault(network, []).append(c)
    if not networks:
        ratio, c = closest
        raise UserError(
            f"no grid point's rounded network costs {goal:g}x the baseline's MACs within {search.macs_tolerance:.0%}; "
            f"the closest is alpha={c.alpha}, beta={c.beta}, gamma={c.gamma} at {ratio:.2f}x: widen the ranges or "
            "search.macs_tolerance, or change train.model.base_resolution")
    return [min(group, key=lambda c: abs(c.product - search.target)) for group in networks.values()]


def satisfies(entry: dict[str, Any], search: ml_collections.ConfigDict) -> bool:
    """Whether a summary entry may win: not the baseline, and on the constraint (formula, or real MACs)."""
    if entry["label"] == "baseline":
        return False
    if search.constraint == "macs":
        ratio = entry.get("macs_ratio")
        return ratio is not None and abs(ratio / search.target**search.phi - 1) <= search.macs_tolerance + 1e-9
    return abs(entry["product"] - search.target) <= search.tolerance + 1e-9


def trial_config(train_config: ml_collections.ConfigDict, c: Candidate, seed: int, phi: float = 1.0,
                 steps: int = 0, schedule_steps: int = 0) -> ml_collections.ConfigDict:
    """The trainer config of one trial: B0 scaled by the candidate at ``phi``, this seed, ``steps`` steps.

    ``steps`` = 0 keeps the train config's own budget; ``schedule_steps`` > 0 stretches the
    learning-rate schedule over that many steps, so that a longer run continues a shorter one.
    """
    cfg = copy.deepcopy(train_config)
    cfg.unlock()
    m = cfg.model
    m.name, m.constants = "formula", ""
    m.alpha, m.beta, m.gamma = c.alpha, c.beta, c.gamma
    m.phi = 0.0 if c.label == "baseline" else float(phi)
    cfg.seed = int(seed)
    if steps:
        cfg.num_train_steps = int(steps)
    cfg.schedule_steps = int(schedule_steps)
    return cfg


def trial_network(train_config: ml_collections.ConfigDict, c: Candidate, phi: float = 1.0
                ) -> tuple[scaling.ScalingSpec, Architecture]:
    """The spec and rounded architecture a trial of ``c`` trains (the trainer's own config path)."""
    cfg = trial_config(train_config, c, 0, phi)
    spec = scaling.model_spec(cfg.model)
    return spec, scaling.build_architecture(spec, scaling.network(cfg.model), cfg.model.drop_path_rate)


def _network(train_config: ml_collections.ConfigDict, c: Candidate, phi: float = 1.0) -> tuple[Architecture, int]:
    """What a trial of ``c`` really trains: the rounded architecture and the input resolution."""
    spec, arch = trial_network(train_config, c, phi)
    return arch, spec.resolution


def _macs(train_config: ml_collections.ConfigDict, c: Candidate, num_classes: int, phi: float = 1.0) -> int:
    return cost.count_macs(*_network(train_config, c, phi), num_classes)


# ---------------------------------------------------------------------- the plan

def check_search(config: ml_collections.ConfigDict) -> None:
    """Validate the whole search section before the first trial (before the data is opened)."""
    s = config.search
    if s.strategy not in ("exhaustive", "halving"):
        raise UserError(f"search.strategy must be exhaustive or halving, got {s.strategy!r}")
    if s.metric not in METRICS:
        raise UserError(f"search.metric must be one of {', '.join(METRICS)}, got {s.metric!r}")
    if s.strategy == "halving":
        if isinstance(s.halving_eta, bool) or not isinstance(s.halving_eta, int) or s.halving_eta < 2:
            raise UserError(f"search.halving_eta must be an integer >= 2, got {s.halving_eta!r}")
        if isinstance(s.halving_rungs, bool) or not isinstance(s.halving_rungs, int) or s.halving_rungs < 1:
            raise UserError(f"search.halving_rungs must be an integer >= 1, got {s.halving_rungs!r}")
    for name in ("seeds", "final_seeds"):
        seeds = list(s[name])
        if any(isinstance(x, bool) or not isinstance(x, int) for x in seeds) or len(set(seeds)) != len(seeds):
            raise UserError(f"search.{name} must be distinct integers, got {tuple(seeds)}")
    if not list(s.seeds):
        raise UserError("search.seeds is empty")
    if s.sampler not in ("grid", "tpe"):
        raise UserError(f"search.sampler must be grid or tpe, got {s.sampler!r}")
    if s.sampler == "tpe" and (isinstance(s.n_trials, bool) or not isinstance(s.n_trials, int) or s.n_trials < 1):
        raise UserError(f"search.n_trials must be a positive integer with search.sampler=tpe, got {s.n_trials!r}")
    if not (isinstance(s.alpha_level, float) and 0 < s.alpha_level < 1):
        raise UserError(f"search.alpha_level must be in (0, 1), got {s.alpha_level!r}")
    if s.constraint not in ("formula", "macs"):
        raise UserError(f"search.constraint must be formula or macs, got {s.constraint!r}")
    if s.constraint == "macs":
        if not (isinstance(s.macs_tolerance, float) and 0 < s.macs_tolerance < 1):
            raise UserError(f"search.macs_tolerance must be in (0, 1) (relative), got {s.macs_tolerance!r}")
        if s.sampler == "tpe":
            raise UserError("search.constraint=macs works with search.sampler=grid (TPE proposes points on the "
                            "formula's surface)")
    if config.train.model.resolution > 0:
        raise UserError("train.model.resolution must be 0 (each trial's resolution is base_resolution * gamma)")
    if s.constraint == "formula":
        candidates(s)  # an empty grid fails here; real MACs need the class count, known once the data is open


def rung_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> list[int]:
    """Training steps of each rung: the train config's budget, times eta per rung when halving."""
    t, s = config.train, config.search
    base = max(1, to_steps(t.num_train_steps, t.num_epochs, steps_per_epoch))
    rungs = s.halving_rungs if s.strategy == "halving" else 1
    return [base * s.halving_eta**r for r in range(rungs)]


def rung_seeds(config: ml_collections.ConfigDict, rung: int, rungs: int) -> list[int]:
    s = config.search
    last = rung == rungs - 1
    return [int(x) for x in (s.final_seeds if last and list(s.final_seeds) else s.seeds)]


def plan_rung(config: ml_collections.ConfigDict, cands: Sequence[Candidate], rung: int, steps: Sequence[int],
              num_classes: int) -> list[runner.TrialPlan]:
    """The trials of one rung, longest first.

    Estimated cost, from measured CPU trials: a trial compiles its network (about half of a
    phi = 1 trial at the old budgets) unless another trial of the same rounded network came
    before it (the persistent compilation cache), then trains for a time that grows with
    MACs. Claimed in this order by every worker, the longest trials start first and the cheap
    repeats fill the gaps at the end (greedy list scheduling).
    """
    plans, cost_of, seen = [], {}, set()
    shapes = {c: trial_network(config.train, c) for c in cands}
    macs = {c: cost.count_macs(a, sp.resolution, num_classes) for c, (sp, a) in shapes.items()}
    top = max(macs.values())
    for c in cands:
        spec, arch = shapes[c]
        for seed in rung_seeds(config, rung, len(steps)):
            plan = trial_plan(config, c, seed, rung, steps)
            plans.append(plan)
            cost_of[plan.key] = macs[c] / top * steps[rung] / steps[0] + (0.0 if (arch, spec.resolution) in seen
                                                                          else 1.0)
            seen.add((arch, spec.resolution))
    return sorted(plans, key=lambda p: -cost_of[p.key])  # stable: ties keep the config's order


def trial_plan(config: ml_collections.ConfigDict, c: Candidate, seed: int, rung: int, steps: Sequence[int]
               ) -> runner.TrialPlan:
    """One trial of ``c``: rung ``rung``'s budget, the schedule spanning the top rung, one directory per
    (candidate, seed) so that a promoted run continues its shorter run's checkpoint."""
    rungs = len(steps)
    cfg = trial_config(config.train, c, seed, config.search.phi, steps[rung], steps[-1] if rungs > 1 else 0)
    attrs = {"label": c.label, "alpha": c.alpha, "beta": c.beta, "gamma": c.gamma, "product": c.product,
             "phi": cfg.model.phi, "seed": seed, "rung": rung, "budget_steps": steps[rung]}
    return runner.TrialPlan(f"{c.key}-s{seed}-n{steps[rung]}", cfg, attrs, directory=f"{c.key}-s{seed}",
                            keep_checkpoint=rung < rungs - 1)


def proposer(config: ml_collections.ConfigDict, steps: Sequence[int]) -> Callable[[Any], runner.TrialPlan | None]:
    """For ``search.sampler = "tpe"``: a point on the constraint surface from an Optuna trial.

    The sampler chooses alpha and u in [0, 1]; beta is u of the way through the betas that
    keep gamma = sqrt(target / (alpha * beta^2)) inside the gamma range, so every proposal
    satisfies alpha * beta^2 * gamma^2 = target exactly (rounded to 3 decimals) and none is
    wasted off the surface. An alpha with no feasible beta is pruned untrained.
    """
    s = config.search
    rungs = len(steps)

    def propose(trial: Any) -> runner.TrialPlan | None:
        a = trial.suggest_float("alpha", float(s.alpha[0]), float(s.alpha[1]))
        u = trial.suggest_float("u", 0.0, 1.0)
        lo = max(float(s.beta[0]), math.sqrt(s.target / (a * float(s.gamma[1]) ** 2)))
        hi = min(float(s.beta[1]), math.sqrt(s.target / (a * float(s.gamma[0]) ** 2)))
        if lo > hi:
            return None
        b = lo + u * (hi - lo)
        c = Candidate(round(a, 3), round(b, 3), round(math.sqrt(s.target / (a * b * b)), 3))
        return trial_plan(config, c, rung_seeds(config, 0, rungs)[0], 0, steps)

    return propose


# ---------------------------------------------------------------------- summary

def summarize(rows: Sequence[dict[str, Any]], metric: str, base_macs: int | None = None,
              num_eval: int | None = None) -> list[dict[str, Any]]:
    """One entry per candidate at the highest rung it reached: mean, 95% interval, MACs / baseline."""
    by_cand: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        by_cand.setdefault((r["alpha"], r["beta"], r["gamma"], r["label"]), []).append(r)
    out = []
    for group in by_cand.values():
        top = max(r["rung"] for r in group)
        group = [r for r in group if r["rung"] == top]
        ok = [r for r in group if r["status"] == "ok" and r.get(metric) is not None]
        values = [r[metric] for r in ok]
        first = ok[0] if ok else group[0]
        ci = stats.interval(values, n_val=num_eval) if values else {}
        out.append({
            "label": first["label"], "alpha": first["alpha"], "beta": first["beta"], "gamma": first["gamma"],
            "product": first["product"], "rung": top, "seeds": len(group), "ok": len(ok),
            "status": "ok" if ok else group[0]["status"], "values": values,
            "mean": ci.get("mean"), "std": ci.get("std"), "half": ci.get("half"),
            **{k: first.get(k) for k in ("resolution", "width", "depth", "blocks", "params", "macs")},
            "macs_ratio": (first["macs"] / base_macs) if base_macs and first.get("macs") else None,
            "wall_time_s": sum(r.get("wall_time_s") or 0.0 for r in group),
            "train_img_per_s": first.get("train_img_per_s"),
        })
    return sorted(out, key=lambda s: (-s["rung"], s["mean"] is None, -(s["mean"] or 0.0), s["macs"] or 0))


def survivors(summary: Sequence[dict[str, Any]], cands: Sequence[Candidate], rung: int, eta: int
              ) -> list[Candidate]:
    """Successive halving: the best 1/eta (at least one) of rung ``rung``'s grid points, plus the references."""
    ranked = [s for s in summary if s["rung"] == rung and s["mean"] is not None and not s["label"]]
    keep = {(s["alpha"], s["beta"], s["gamma"]) for s in ranked[: max(1, len(ranked) // eta)]}
    return [c for c in cands if c.label or (c.alpha, c.beta, c.gamma) in keep]


def pick_best(summary: Sequence[dict[str, Any]], search: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The best constraint-satisfying candidate of the highest rung; ties go to fewer MACs."""
    top = max((s["rung"] for s in summary), default=0)
    eligible = [s for s in summary if s["mean"] is not None and s["rung"] == top
                and satisfies(s, search)]
    if not eligible:
        return None
    return max(eligible, key=lambda s: (s["mean"], -(s["macs"] or 0)))


def judge(summary: Sequence[dict[str, Any]], best: dict[str, Any] | None, search: ml_collections.ConfigDict
          ) -> dict[str, Any]:
    """Verdicts at the top rung: each candidate against the winner (Welch's t-test over seeds)."""
    top = max((s["rung"] for s in summary), default=0)
    pool = [s for s in summary if s["rung"] == top and s["mean"] is not None
            and (s is best or s["label"] == "paper"
                 or satisfies(s, search))]
    if best is None or not pool:
        return {"verdicts": {}, "sentence": "no constraint-satisfying candidate finished: nothing to judge"}
    name = {id(s): _name(s) for s in pool}
    ranked = [best] + [s for s in pool if s is not best]
    out = stats.verdicts([{"key": name[id(s)], "values": s["values"]} for s in ranked], alpha=search.alpha_level,
                         reference=next((name[id(s)] for s in pool if s["label"] == "paper"), None))
    return out


def _name(s: dict[str, Any]) -> str:
    tag = {"paper": " (paper)", "baseline": " (baseline)"}.get(s["label"], "")
    return f"({s['alpha']:g}, {s['beta']:g}, {s['gamma']:g}){tag}"


def format_table(summary: Sequence[dict[str, Any]], metric: str, verdicts: dict[str, str] | None = None) -> str:
    verdicts = verdicts or {}
    columns: list[report.Column] = [
        ("", 1, lambda s: {"paper": "P", "baseline": "B"}.get(s["label"], "")),
        ("alpha", 5, lambda s: f"{s['alpha']:.2f}"), ("beta", 5, lambda s: f"{s['beta']:.2f}"),
        ("gamma", 5, lambda s: f"{s['gamma']:.2f}"), ("a*b2*g2", 7, lambda s: f"{s['product']:.3f}"),
        ("res", 4, lambda s: str(s["resolution"] or 0)), ("blocks", 6, lambda s: str(s["blocks"] or 0)),
        ("params", 10, lambda s: f"{s['params'] or 0:,}"), ("MMACs", 6, lambda s: f"{(s['macs'] or 0) / 1e6:.1f}"),
        ("xMACs", 5, lambda s: "-" if s.get("macs_ratio") is None else f"{s['macs_ratio']:.2f}"),
        (f"{metric} ±95%", 16, report.score_text), ("seeds", 5, lambda s: f"{s['ok']}/{s['seeds']}"),
        ("rung", 4, lambda s: str(s["rung"])), ("time s", 7, lambda s: f"{s['wall_time_s']:.1f}"),
        ("verdict", 14, lambda s: verdicts.get(_name(s), s["status"] if s["status"] != "ok" else "")),
    ]
    return report.format_table(summary, columns, [
        "P = the paper's constants, B = unscaled B0 (phi = 0); xMACs = MACs / unscaled B0's; "
        "±95%: t interval over seeds with the validation sample's binomial error"])


def macs_warnings(summary: Sequence[dict[str, Any]], search: ml_collections.ConfigDict) -> list[str]:
    """One line when rounding makes the real networks' MACs disagree with the formula's alpha*beta^2*gamma^2."""
    if search.constraint == "macs":  # the constraint is on the real MACs already
        return []
    off = [s for s in summary if s["label"] != "baseline" and s.get("macs_ratio") is not None
           and abs(s["macs_ratio"] - s["product"]) > max(search.tolerance, 0.1 * s["product"])]
    if not off:
        return []
    ratios = [s["macs_ratio"] for s in off]
    return [f"{len(off)} candidates' rounded networks cost {min(ratios):.2f}-{max(ratios):.2f}x the baseline's MACs "
            f"where alpha*beta^2*gamma^2 says ~{search.target:g}x (column xMACs): at this base resolution the "
            "constraint does not hold in real cost (search.constraint=macs constrains the real networks)"]


def rung_agreement(summary_rows: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Rank agreement (Kendall tau, Spearman) of each rung's scores with the top rung's, over the candidates
    that reached the top rung: does the cheap proxy rank them as the long budget does?"""
    by_rung: dict[int, dict[str, list[float]]] = {}
    for r in summary_rows:
        if r["status"] == "ok" and r.get(metric) is not None:
            key = f"{r['alpha']}-{r['beta']}-{r['gamma']}-{r['label']}"
            by_rung.setdefault(r["rung"], {}).setdefault(key, []).append(r[metric])
    if len(by_rung) < 2:
        return []
    top = max(by_rung)
    final = {k: sum(v) / len(v) for k, v in by_rung[top].items()}
    out = []
    for rung in sorted(by_rung):
        if rung == top:
            continue
        scores = {k: sum(v) / len(v) for k, v in by_rung[rung].items() if k in final}
        if len(scores) >= 2:
            out.append({"rung": rung, "top_rung": top, **stats.rank_agreement(scores, final)})
    return out


def write_outputs(workdir: str, config: ml_collections.ConfigDict, rows: Sequence[dict[str, Any]],
                  summary: Sequence[dict[str, Any]], best: dict[str, Any] | None, verdict: dict[str, Any],
                  extra: dict[str, Any]) -> None:
    """results.csv, best.json, plots and TensorBoard hparams (each file replaced whole)."""
    report.write_csv(os.path.join(workdir, "results.csv"), rows, CSV_FIELDS)
    if best is not None:
        metric = config.search.metric
        report.write_json(os.path.join(workdir, "best.json"), {
            "alpha": best["alpha"], "beta": best["beta"], "gamma": best["gamma"], "product": best["product"],
            metric: best["mean"], f"{metric}_std": best["std"], f"{metric}_ci95_half": best["half"],
            f"{metric}_values": best["values"], "seeds": best["ok"], "rung": best["rung"],
            **{k: best[k] for k in ("resolution", "width", "depth", "blocks", "params", "macs", "macs_ratio")},
            "verdict": verdict, **extra, "config": config.to_dict(), "created": report.now()})
    from experiments import plots

    top = max((s["rung"] for s in summary), default=0)
    plots.grid_plots([s for s in summary if s["rung"] == top], config.search.metric, workdir)
    report.write_hparams(workdir, rows, ("alpha", "beta", "gamma", "product", "seed", "rung", "label"),
                         (config.search.metric, "params", "macs", "wall_time_s"))


# ------------------------------------------------------------------------ driver

def search(config: ml_collections.ConfigDict, workdir: str, storage: str | None = None,
           study_name: str = "grid_search", log: Callable[[str], Any] = print, write: bool = True
           ) -> dict[str, Any]:
    """Run (or join, or resume) the search; returns {"rows", "summary", "best", "verdict", ...}.

    Several processes may call this at once on one storage: they share the trials.
    """
    s = config.search
    check_search(config)
    base = trial_config(config.train, Candidate(1.0, 1.0, 1.0, "baseline"), int(s.seeds[0]))
    prepared = trainer.prepare(base)  # validates the train config and opens the data: writes nothing
    num_classes, num_eval = prepared.source.num_classes, prepared.source.num_eval
    cands = candidates(s, config.train, num_classes)
    if s.constraint == "macs":
        log(f"constraint on real MACs: {sum(not c.label for c in cands)} distinct networks (and the references) "
            f"within {s.macs_tolerance:.0%} of {s.target**s.phi:g}x the baseline's MACs at "
            f"{config.train.model.base_resolution} px")
    steps = rung_steps(config, prepared.steps_per_epoch)
    _refuse_old_workdir(workdir, storage)
    sampler = None
    if s.sampler == "tpe":
        import optuna

        # unseeded: workers sharing the study must not propose the same startup points
        sampler = optuna.samplers.TPESampler(n_startup_trials=max(2, s.n_trials // 3))
    study = runner.open_study(runner.storage_for(storage, workdir), study_name, runner.identity(config.train),
                              storage or workdir, sampler=sampler)
    t0 = time.time()
    alive, rows = list(cands), {}
    for rung in range(len(steps)):
        if rung == 0 and s.sampler == "tpe":  # the references as planned trials, the rest proposed by TPE
            alive = [c for c in cands if c.label]
            rows.update(runner.run(study, plan_rung(config, alive, 0, steps, num_classes), workdir,
                                   trainer.train_and_evaluate, s.metric, log))
            sampled = runner.run_sampled(study, s.n_trials, proposer(config, steps), workdir,
                                         trainer.train_and_evaluate, s.metric, log)
            rows.update({r["trial_id"]: r for r in sampled})
            alive += list(dict.fromkeys(Candidate(r["alpha"], r["beta"], r["gamma"]) for r in sampled))
            continue
        if rung > 0:
            prev = summarize(list(rows.values()), s.metric)
            alive = survivors(prev, alive, rung - 1, s.halving_eta)
            for c in cands:  # the rest never continues: its checkpoints go
                if c not in alive:
                    for seed in rung_seeds(config, rung - 1, len(steps)):
                        runner.drop_checkpoints(os.path.join(workdir, "trials", f"{c.key}-s{seed}"))
            log(f"rung {rung}: {len(alive)} candidates go on to {steps[rung]} steps with seeds "
                f"{rung_seeds(config, rung, len(steps))}")
        plans = plan_rung(config, alive, rung, steps, num_classes)
        rows.update(runner.run(study, plans, workdir, trainer.train_and_evaluate, s.metric, log))
    rows_list = list(rows.values())
    base_macs = _macs(config.train, Candidate(1.0, 1.0, 1.0, "baseline"), num_classes)
    summary = summarize(rows_list, s.metric, base_macs, num_eval)
    best = pick_best(summary, s)
    verdict = judge(summary, best, s)
    extra = {"num_classes": num_classes, "num_eval": num_eval, "dataset": prepared.source.name,
             "rung_steps": steps, "rung_agreement": rung_agreement(rows_list, s.metric),
             "macs_warnings": macs_warnings(summary, s), "training_share": training_share(rows_list, t0)}
    if write:
        write_outputs(workdir, config, rows_list, summary, best, verdict, extra)
    return {"rows": rows_list, "summary": summary, "best": best, "verdict": verdict, **extra}


def training_share(rows: Sequence[dict[str, Any]], t0: float) -> float | None:
    """Share of the trials' wall time spent in timed training steps (the rest: compile, eval, data, saves)."""
    train_s = sum(r["steps"] * r["batch_size"] / r["train_img_per_s"] for r in rows
                  if r.get("train_img_per_s") and r.get("steps") and r.get("batch_size"))
    wall = sum(r.get("wall_time_s") or 0.0 for r in rows)
    return train_s / wall if wall > 0 and train_s > 0 else None


def _refuse_old_workdir(workdir: str, storage: str | None) -> None:
    if not storage and os.path.exists(os.path.join(workdir, "results.jsonl")) and \
            not os.path.exists(os.path.join(workdir, "study.journal")):
        raise UserError(f"{workdir} holds a results.jsonl from a grid search before Optuna studies: it cannot be "
                        "resumed. Its results.csv and best.json stay readable; start this search in a new --workdir")


# --------------------------------------------------------------------------- CLI

def _define_flags(fv: Any) -> None:
    from absl import flags

    runner.define_flags(fv, "grid_search")
    flags.DEFINE_string("then_scale", "", "comma-separated phi values to scale the winner to", flag_values=fv)
    flags.DEFINE_bool("then_train", False, "also train the --then_scale models with the trial config",
                      flag_values=fv)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    argv_list = list(sys.argv if argv is None else argv)
    config, fv = cli.parse_config_flags(argv_list, DEFAULT_CONFIG, _define_flags)
    cli.enable_compile_cache(config.train.compile_cache_dir)
    workdir = fv.workdir or os.path.join("runs", "grid_search-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    phis = report.parse_floats(fv.then_scale, "--then_scale")
    check_search(config)  # a bad search config fails here, once, before any worker starts
    rundir.check_workdir(workdir)
    _refuse_old_workdir(workdir, fv.storage)
    if not fv.worker:
        print(f"workdir: {workdir}", flush=True)
    t0 = time.time()
    out = runner.serve(fv, argv_list, "experiments.grid_search", workdir, runner.identity(config.train),
                       lambda log, write: search(config, workdir, fv.storage, fv.study_name, log, write=write))
    if fv.worker:
        return out
    _print_summary(out, config, workdir, time.time() - t0)
    best = out["best"]
    if phis and best is not None:
        from experiments import scale_up

        scale_up.scale_up(os.path.join(workdir, "best.json"), phis,
                          os.path.join(workdir, "scale_up") if fv.then_train else None)
    return out


def _print_summary(out: dict[str, Any], config: ml_collections.ConfigDict, workdir: str, took: float) -> None:
    metric = config.search.metric
    print(format_table(out["summary"], metric, out["verdict"].get("verdicts", {})))
    for w in out["macs_warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    for a in out["rung_agreement"]:
        print(f"rung {a['rung']} vs rung {a['top_rung']} ranking over {a['n']} candidates: Kendall tau "
              f"{_num(a['kendall_tau'])}, Spearman {_num(a['spearman_rho'])}"
              + ("" if a["same_winner"] else " (the winner changed)"))
    best = out["best"]
    if best is None:
        print("no constraint-satisfying candidate finished; nothing written to best.json")
    else:
        print(f"winner: alpha={best['alpha']} beta={best['beta']} gamma={best['gamma']} "
              f"({metric} {report.score_text(best)}, {best['ok']} seeds) -> {os.path.join(workdir, 'best.json')}")
    print(out["verdict"]["sentence"])
    share = out["training_share"]
    print(f"grid search took {took:.0f} s" + (f" ({share:.0%} of trial time in training steps)" if share else "")
          + f"; results in {workdir}")


def _num(x: float | None) -> str:
    return "n/a (constant scores)" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
