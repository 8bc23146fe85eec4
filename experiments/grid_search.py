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
rungs: every candidate trains ``b`` steps with ``search.seeds``; the best 1/eta (rounded up) of the grid
points (and the two references) go on to eta·b steps with ``search.final_seeds``.
``search.rung_mode`` says how a rung is scored (``experiments.strategies.RUNG_MODES``):
``continued`` (every rung's learning-rate schedule spans the top rung's length, so a promoted
run *continues* its shorter run's checkpoint), ``cooldown`` (warmup-stable-decay: each rung's
score is a run that decays to zero over its last ``search.cooldown_fraction``, and a promoted
run continues from the state before that decay) or ``independent`` (every rung from scratch).
The winner is decided at the largest budget with every final seed; with ``search.max_seeds``
the top rung *races*: one more seed at a time for the leader and every candidate still tied
with it (``judge``'s verdicts), until none is or each has ``max_seeds`` seeds.
Synchronous rungs rather than Optuna's asynchronous pruners because the survivors are then a
function of the config alone (the same on every rerun and worker count), and because a
pruner stops a trial part-way while here the cost that dominates, compiling each network,
is paid before the first step either way.

The answer: before any verdict each candidate and the baseline are tested against chance (the
validation split's majority-class rate); when the baseline or every candidate is not above it, the
trials did not learn at this budget: best.json says ``"answer": false`` with the reason (scale_up and
``model.constants`` refuse it) and the search exits 2 with one ``error:`` line naming what to raise
(``search.require_learning = False``: exit 0). Otherwise the winner and its contender set: every
candidate not separated from it by ``search.test`` (``pooled``: seed noise estimated over every
candidate at the top rung, comparisons paired by seed, ``experiments.stats``; ``welch``) at
``search.alpha_level``. Each cheap rung's Kendall tau against the top rung carries a bootstrap
interval, and the top rung's seed-to-seed tau (the noise ceiling) says what limits it.

Outputs in --workdir: study.journal (the study), results.csv (one row per trial), best.json
(answer, alpha, beta, gamma, the interval, the contenders with the test, alpha level and seeds
behind them, the verdict, tau intervals, the noise ceiling, provenance and the whole search config:
what ``experiments.scale_up`` and ``config.model.constants`` read), grid.png,
accuracy_vs_macs.png, TensorBoard hparams. ``optuna-dashboard`` opens the study file.
"""


from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from effnet_jax import provenance
from effnet_jax.data import input_pipeline
from effnet_jax.errors import UserError, exit_on_user_error
from effnet_jax.model import cost
from effnet_jax.training import trainer
from experiments import report, runner, stats, trials
from experiments.constraints import MeasuredLatency, candidates, constraint_for, grid_points
from experiments.strategies import check_search, proposer_for, rung_mode_for, schedule_for
from experiments.trials import BASELINE, Candidate

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "grid_search.py")
CONTENDER_WORDS = ("best", "tied with best", "above best")
CSV_FIELDS = ("trial_id", "trial_number", "state", "label", "alpha", "beta", "gamma", "product", "phi", "seed",
              "rung", *runner.RESULT_FIELDS, "latency_train", "latency_infer")


# ---------------------------------------------------------------------- the plan

def rung_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> list[int]:
    """Training steps of each rung: the trial budget, then as the schedule (``search.strategy``) grows it."""
    return schedule_for(config.search).rung_steps(trials.budget_steps(config.train, steps_per_epoch))


def rung_seeds(config: ml_collections.ConfigDict, rung: int, rungs: int) -> list[int]:
    """``search.final_seeds`` at the top rung (when given), ``search.seeds`` below it."""
    s = config.search
    last = rung == rungs - 1
    return [int(x) for x in (s.final_seeds if last and list(s.final_seeds) else s.seeds)]


def race_seeds(config: ml_collections.ConfigDict, rungs: int) -> list[int]:
    """The seeds racing adds at the top rung, in order: the integers after the top rung's largest seed, up to
    ``search.max_seeds`` seeds in all (none when 0), so that two runs given disjoint seed ranges race on
    disjoint seeds too."""
    top = rung_seeds(config, rungs - 1, rungs)
    extra = max(0, config.search.max_seeds - len(top))
    return list(range(max(top) + 1, max(top) + 1 + extra))


def plan_rung(config: ml_collections.ConfigDict, cands: Sequence[Candidate], rung: int, steps: Sequence[int],
              num_classes: int, seeds: Sequence[int] | None = None) -> list[runner.TrialPlan]:
    """The trials of one rung (with ``seeds``, default the rung's), longest first.

    A trial compiles its network unless another trial of the same rounded network came before
    it (the persistent compilation cache), then trains for a time that grows with MACs; the
    estimate below counts a compile as one unit and the largest network's training at rung 0 as
    another. Claimed in this order by every worker, the longest trials start first and the
    cheap repeats fill the gaps at the end (greedy list scheduling).
    """
    if not cands:  # a proposer that samples every point may plan no reference
        return []
    plans, cost_of, seen = [], {}, set()
    shapes = {c: trials.network(config.train, c) for c in cands}
    macs = {c: cost.count_macs(a, sp.resolution, num_classes) for c, (sp, a) in shapes.items()}
    top = max(macs.values())
    for c in cands:
        spec, arch = shapes[c]
        for seed in rung_seeds(config, rung, len(steps)) if seeds is None else seeds:
            plan = trial_plan(config, c, seed, rung, steps)
            plans.append(plan)
            cost_of[plan.key] = macs[c] / top * steps[rung] / steps[0] + (0.0 if (arch, spec.resolution) in seen
                                                                          else 1.0)
            seen.add((arch, spec.resolution))
    return sorted(plans, key=lambda p: -cost_of[p.key])  # stable: ties keep the config's order


def trial_plan(config: ml_collections.ConfigDict, c: Candidate, seed: int, rung: int, steps: Sequence[int]
               ) -> runner.TrialPlan:
    """One trial of ``c``: rung ``rung``'s budget, scored and continued as ``search.rung_mode`` says."""
    mode = rung_mode_for(config.search)
    cfg = mode.config(config.train, c, config.search.phi, seed, steps, rung)
    attrs = {**trials.candidate_attrs(c), "phi": cfg.model.phi, "seed": seed, "rung": rung,
             "budget_steps": steps[rung]}
    return runner.TrialPlan(mode.key(c, seed, steps, rung), cfg, attrs,
                            directory=mode.directory(c, seed, steps, rung), keep_checkpoint=mode.keeps(steps, rung))


# ---------------------------------------------------------------------- summary

def seed_models(rows: Sequence[dict[str, Any]], metric: str) -> dict[int, stats.SeedModel]:
    """{rung: the seed noise over every candidate's finished trials at that rung} (the pooled test's)."""
    groups: dict[int, dict[tuple[Any, ...], dict[Any, float]]] = {}
    for r in rows:
        if r["status"] == "ok" and r.get(metric) is not None:
            by = groups.setdefault(r["rung"], {}).setdefault((r["alpha"], r["beta"], r["gamma"], r["label"]), {})
            by[r.get("seed", len(by))] = r[metric]
    return {rung: stats.fit_seed_model(list(g.values())) for rung, g in groups.items()}


def summarize(rows: Sequence[dict[str, Any]], metric: str, base_macs: int | None = None,
              num_eval: int | None = None, test: str = stats.POOLED) -> list[dict[str, Any]]:
    """One entry per candidate at the highest rung it reached: mean, 95% interval, MACs / baseline.

    ``test``: ``pooled`` intervals use the seed noise of every candidate at that rung (``stats.interval``
    with ``seed_models``); ``welch`` each candidate's own seeds plus the validation sample's binomial error.
    """
    by_cand: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        by_cand.setdefault((r["alpha"], r["beta"], r["gamma"], r["label"]), []).append(r)
    models = seed_models(rows, metric) if test == stats.POOLED else {}
    out = []
    for group in by_cand.values():
        top = max(r["rung"] for r in group)
        group = [r for r in group if r["rung"] == top]
        ok = [r for r in group if r["status"] == "ok" and r.get(metric) is not None]
        ok = sorted(ok, key=lambda r: (r.get("seed") is None, r.get("seed") or 0))
        values = [r[metric] for r in ok]
        first = ok[0] if ok else group[0]
        ci = stats.interval(values, n_val=num_eval, model=models.get(top)) if values else {}
        out.append({
            "label": first["label"], "alpha": first["alpha"], "beta": first["beta"], "gamma": first["gamma"],
            "product": first["product"], "rung": top, "seeds": len(group), "ok": len(ok),
            "status": "ok" if ok else group[0]["status"], "values": values,
            "seed_ids": [r.get("seed", i) for i, r in enumerate(ok)],
            "mean": ci.get("mean"), "std": ci.get("std"), "half": ci.get("half"),
            **{k: first.get(k) for k in cost.FIGURES},
            "macs_ratio": (first["macs"] / base_macs) if base_macs and first.get("macs") else None,
            "wall_time_s": sum(r.get("wall_time_s") or 0.0 for r in group),
            "train_img_per_s": first.get("train_img_per_s"),
            "latency_train": first.get("latency_train"), "latency_infer": first.get("latency_infer"),
        })
    return sorted(out, key=lambda s: (-s["rung"], s["mean"] is None, -(s["mean"] or 0.0), s["macs"] or 0))


def pick_best(summary: Sequence[dict[str, Any]], search: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The best constraint-satisfying candidate of the highest rung; ties go to fewer MACs."""
    constraint = constraint_for(search)
    top = max((s["rung"] for s in summary), default=0)
    eligible = [s for s in summary if s["mean"] is not None and s["rung"] == top and constraint.satisfies(s)]
    if not eligible:
        return None
    return max(eligible, key=lambda s: (s["mean"], -(s["macs"] or 0)))


def judge(summary: Sequence[dict[str, Any]], best: dict[str, Any] | None, search: ml_collections.ConfigDict
          ) -> dict[str, Any]:
    """Verdicts at the top rung: each candidate against the winner (``search.test``), and the contender set.

    The pooled test's seed noise comes from every candidate at the top rung (the baseline too), as the
    intervals' does; ``contender_set`` lists the winner and every candidate not separated from it.
    """
    constraint = constraint_for(search)
    top = max((s["rung"] for s in summary), default=0)
    pool = [s for s in summary if s["rung"] == top and s["mean"] is not None
            and (s is best or s["label"] == "paper" or constraint.satisfies(s))]
    test = search.get("test", stats.POOLED)
    if best is None or not pool:
        return {"verdicts": {}, "contenders": [], "contender_set": [], "test": stats.TESTS[test],
                "sentence": "no constraint-satisfying candidate finished: nothing to judge"}
    name = {id(s): trials.candidate_name(s) for s in pool}
    ranked = [best] + [s for s in pool if s is not best]
    everyone = [dict(zip(_seed_ids(s), s["values"])) for s in summary if s["rung"] == top and s["values"]]
    out = stats.verdicts([{"key": name[id(s)], "values": s["values"], "seeds": _seed_ids(s)} for s in ranked],
                         alpha=search.alpha_level, test=test, pool=everyone,
                         reference=next((name[id(s)] for s in pool if s["label"] == "paper"), None))
    chosen = set(out["contenders"])
    out["contender_set"] = [{"alpha": s["alpha"], "beta": s["beta"], "gamma": s["gamma"], "label": s["label"],
                             "mean": s["mean"]} for s in ranked if name[id(s)] in chosen]
    out["seeds"] = sorted({x for s in ranked for x in _seed_ids(s)}, key=str)
    cut = [s for s in summary if s["rung"] < top and s["mean"] is not None
           and (s["label"] == "paper" or constraint.satisfies(s))]
    out["cut"] = len(cut)
    if cut:  # two runs with other seeds can promote other candidates: the set cannot speak for these
        out["sentence"] += (f" The set is drawn from the {len(pool)} candidates at the deciding rung; {len(cut)} "
                            "others were cut at a cheaper rung and are not judged in it.")
    return out


def _seed_ids(s: dict[str, Any]) -> list[Any]:
    return list(s.get("seed_ids") or range(len(s["values"])))


def format_table(summary: Sequence[dict[str, Any]], metric: str, verdicts: dict[str, str] | None = None,
                 test: str = stats.POOLED) -> str:
    """The search's table: one row per candidate, best first, with its interval, verdict and contender mark."""
    verdicts = verdicts or {}
    columns: list[report.Column] = [
        ("", 1, lambda s: {"paper": "P", "baseline": "B"}.get(s["label"], "")),
        ("C", 1, lambda s: "*" if verdicts.get(trials.candidate_name(s)) in CONTENDER_WORDS else ""),
        ("alpha", 5, lambda s: f"{s['alpha']:.2f}"), ("beta", 5, lambda s: f"{s['beta']:.2f}"),
        ("gamma", 5, lambda s: f"{s['gamma']:.2f}"), ("a*b2*g2", 7, lambda s: f"{s['product']:.3f}"),
        ("res", 4, lambda s: str(s["resolution"] or 0)), ("blocks", 6, lambda s: str(s["blocks"] or 0)),
        ("params", 10, lambda s: f"{s['params'] or 0:,}"), ("MMACs", 6, lambda s: f"{(s['macs'] or 0) / 1e6:.1f}"),
        ("xMACs", 5, lambda s: "-" if s.get("macs_ratio") is None else f"{s['macs_ratio']:.2f}"),
        *([("xTrain", 6, lambda s: _ratio(s.get("latency_train"))),
           ("xInfer", 6, lambda s: _ratio(s.get("latency_infer")))]
          if any(s.get("latency_train") is not None for s in summary) else []),
        (f"{metric} ±95%", 16, report.score_text), ("seeds", 5, lambda s: f"{s['ok']}/{s['seeds']}"),
        ("rung", 4, lambda s: str(s["rung"])), ("time s", 7, lambda s: f"{s['wall_time_s']:.1f}"),
        ("verdict", 14, lambda s: verdicts.get(trials.candidate_name(s), s["status"] if s["status"] != "ok" else "")),
    ]
    return report.format_table(summary, columns, [
        "P = the paper's constants, B = unscaled B0 (phi = 0); xMACs = MACs / unscaled B0's; xTrain / xInfer = "
        "measured train-step / inference time / unscaled B0's on this device; C * = the contender set (the winner "
        "and every candidate not separated from it); "
        + ("±95%: t interval with the seed noise pooled over the rung's candidates (on this validation split)"
           if test == stats.POOLED else "±95%: t interval over seeds with the validation sample's binomial error")])


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def rung_agreement(summary_rows: Sequence[dict[str, Any]], metric: str,
                   resamples: int = stats.BOOTSTRAP_RESAMPLES) -> list[dict[str, Any]]:
    """Rank agreement (Kendall tau with a bootstrap interval over candidates, Spearman) of each rung's scores
    with the top rung's, over the candidates that reached the top rung: does the cheap proxy rank them as the
    long budget does?"""
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
            out.append({"rung": rung, "top_rung": top, **stats.rank_agreement(scores, final, resamples=resamples)})
    return out


def noise_ceiling(rows: Sequence[dict[str, Any]], metric: str, resamples: int = stats.BOOTSTRAP_RESAMPLES
                  ) -> dict[str, Any]:
    """Seed-to-seed rank agreement at the top rung (``stats.noise_ceiling``): how far any cheap rung can
    agree with it. tau None when the top rung ran one seed."""
    ok = [r for r in rows if r["status"] == "ok" and r.get(metric) is not None]
    top = max((r["rung"] for r in ok), default=0)
    scores: dict[str, dict[Any, float]] = {}
    for r in ok:
        if r["rung"] == top:
            scores.setdefault(f"{r['alpha']}-{r['beta']}-{r['gamma']}-{r['label']}", {})[r.get("seed")] = r[metric]
    return {"rung": top, **stats.noise_ceiling(scores, resamples=resamples)}


def ceiling_line(agreement: Sequence[dict[str, Any]], ceiling: dict[str, Any], steps: Sequence[int],
                 dataset: str = "digits") -> str:
    """``stats.limit_line`` for the search: each cheap rung against the top rung's noise ceiling."""
    top = ceiling["rung"]
    budget = f"rung {top} ({steps[top]} steps)" if top < len(steps) else f"rung {top}"
    # on digits the fidelity study measured a longer budget not to help (README): name the preset that does
    remedy = ("use a preset whose candidates differ by more than seed noise (--config=experiments/configs/"
              "fashion_mnist.py): on digits' 360 validation images even 240 steps do not rank them (README)"
              if dataset == "digits" else
              "raise the top rung's budget (train.num_train_steps or search.halving_eta) or its seeds")
    proxies = [{"name": f"rung {a['rung']}", "tau": a["kendall_tau"], "ci": a.get("kendall_ci")} for a in agreement]
    return stats.limit_line(proxies, ceiling, budget, remedy)


def learning_check(summary: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], chance: float | None,
                   num_eval: int | None, config: ml_collections.ConfigDict, steps: Sequence[int] = ()
                   ) -> dict[str, Any]:
    """Did the trials learn? Each candidate (at its highest rung) and the baseline against chance, the
    validation split's majority-class rate (``stats.above_chance``), before any verdict is trusted.

    Not learned: the baseline is not above chance, or no other candidate is. Returns {"learned" (None when
    chance is unknown), "chance", "above": {name: bool}, "reason": one line naming what to raise, or None}.
    """
    s = config.search
    out: dict[str, Any] = {"learned": None, "chance": chance, "above": {}, "reason": None}
    if chance is None or not num_eval:
        return out
    models = seed_models(rows, s.metric) if s.get("test", stats.POOLED) == stats.POOLED else {}
    tests = {trials.candidate_name(e): (e, stats.above_chance(e["values"], chance, num_eval, models.get(e["rung"]),
                                                              s.alpha_level))
             for e in summary if e["values"]}
    out["above"] = {k: t["above"] for k, (_, t) in tests.items()}
    base = next(((k, e, t) for k, (e, t) in tests.items() if e["label"] == "baseline"), None)
    others = [(k, e, t) for k, (e, t) in tests.items() if e["label"] != "baseline"]
    out["learned"] = bool(others) and any(t["above"] for _, _, t in others) and (base is None or base[2]["above"])
    if out["learned"]:
        return out
    what = []
    if base is not None and not base[2]["above"]:
        what.append(f"unscaled B0 scored {base[2]['mean']:.4f} (one-sided p = {base[2]['p_value']:.2f})")
    if others and not any(t["above"] for _, _, t in others):
        top = max(others, key=lambda x: x[2]["mean"])
        what.append(f"no candidate is above it (best {top[2]['mean']:.4f}, p = {top[2]['p_value']:.2f})")
    t = config.train
    out["reason"] = (f"the trials did not learn at this budget: against chance {chance:.4f} (the majority class of "
                     f"{t.data.name}'s {num_eval} validation images) " + " and ".join(what or ["no trial finished"])
                     + f"; raise train.num_train_steps (the rungs trained {'/'.join(map(str, steps)) or '?'} steps) or "
                     "train.optimizer.learning_rate "
                     f"(now {t.optimizer.learning_rate:g}), or check the labels")
    return out


def write_outputs(workdir: str, config: ml_collections.ConfigDict, rows: Sequence[dict[str, Any]],
                  summary: Sequence[dict[str, Any]], best: dict[str, Any] | None, verdict: dict[str, Any],
                  extra: dict[str, Any]) -> None:
    """results.csv, best.json, plots and TensorBoard hparams (each file replaced whole)."""
    report.write_csv(os.path.join(workdir, "results.csv"), rows, CSV_FIELDS)
    if best is not None:
        metric = config.search.metric
        learning = extra.get("learning") or {}
        answer = learning.get("learned") is not False
        report.write_json(os.path.join(workdir, "best.json"), {
            "answer": answer, **({} if answer else {"reason": learning.get("reason")}),
            "alpha": best["alpha"], "beta": best["beta"], "gamma": best["gamma"], "product": best["product"],
            metric: best["mean"], f"{metric}_std": best["std"], f"{metric}_ci95_half": best["half"],
            f"{metric}_values": best["values"], "seeds": best["ok"], "rung": best["rung"],
            **{k: best[k] for k in (*cost.FIGURES, "macs_ratio", "latency_train", "latency_infer")},
            "contenders": verdict.get("contender_set", []), "test": verdict.get("test"),
            "alpha_level": config.search.alpha_level, "test_seeds": verdict.get("seeds"),
            "verdict": verdict, **extra, "provenance": provenance.provenance(), "config": config.to_dict(),
            "created": report.now()})
    from experiments import plots

    top = max((s["rung"] for s in summary), default=0)
    plots.grid_plots([s for s in summary if s["rung"] == top], config.search.metric, workdir)
    report.write_hparams(workdir, rows, ("alpha", "beta", "gamma", "product", "seed", "rung", "label"),
                         (config.search.metric, "params", "macs", "wall_time_s"))


# ------------------------------------------------------------------------ driver

class _FirstRung:
    """What the proposer may do at rung 0: plan and run trials on this search's study."""

    def __init__(self, config: ml_collections.ConfigDict, study: Any, workdir: str, steps: Sequence[int],
                 num_classes: int, log: Callable[[str], Any]) -> None:
        self.config, self.study, self.workdir, self.steps, self.num_classes, self.log = (
            config, study, workdir, steps, num_classes, log)

    def plan(self, cands: Sequence[Candidate]) -> list[runner.TrialPlan]:
        return plan_rung(self.config, cands, 0, self.steps, self.num_classes)

    def plan_one(self, c: Candidate) -> runner.TrialPlan:
        return trial_plan(self.config, c, rung_seeds(self.config, 0, len(self.steps))[0], 0, self.steps)

    def run(self, plans: Sequence[runner.TrialPlan]) -> dict[Any, dict[str, Any]]:
        return runner.run(self.study, plans, self.workdir, trainer.train_and_evaluate, self.config.search.metric,
                          self.log)

    def run_sampled(self, n_trials: int, propose: Callable[[Any], runner.TrialPlan | None]) -> list[dict[str, Any]]:
        return runner.run_sampled(self.study, n_trials, propose, self.workdir, trainer.train_and_evaluate,
                                  self.config.search.metric, self.log)


@dataclasses.dataclass
class _Setup:
    """A search's data, constraint, candidates and study, before any trial."""

    prepared: trainer.Run
    constraint: Any
    meter: MeasuredLatency | None  # what measures latency on this device (None: not measured)
    cands: list[Candidate]
    steps: list[int]
    study: Any
    proposer: Any


def setup(config: ml_collections.ConfigDict, workdir: str, storage: str | None = None,
          study_name: str = "grid_search", log: Callable[[str], Any] = print) -> _Setup:
    """Open the data and the study, time the networks that need it on this device (once per device kind,
    kept in the study), and admit the candidates. Writes nothing but the study."""
    s = config.search
    check_search(config)
    base = trials.trial_config(config.train, BASELINE, seed=int(s.seeds[0]), schedule_steps=0)
    prepared = trainer.prepare(base)  # validates the train config and opens the data: writes nothing
    num_classes = prepared.source.num_classes
    constraint = constraint_for(s, config.train, num_classes)
    steps = rung_steps(config, prepared.steps_per_epoch)
    trials.check_trials(((p.key, p.config) for p in (trial_plan(config, BASELINE, int(s.seeds[0]), r, steps)
                                                     for r in range(len(steps)))), prepared.steps_per_epoch)
    _refuse_old_workdir(workdir, storage)
    proposer = proposer_for(s)
    study = runner.open_study(runner.storage_for(storage, workdir), study_name, runner.identity(config.train),
                              storage or workdir, sampler=proposer.sampler())
    meter = constraint if isinstance(constraint, MeasuredLatency) else (
        MeasuredLatency(s, config.train, num_classes) if s.measure_latency else None)
    if meter is constraint:
        meter.measurements = measured(config, study, meter, meter.to_measure(grid_points(s)), prepared, steps, log)
    cands = candidates(s, config.train, num_classes, constraint)
    if meter is not None and meter is not constraint:
        meter.measurements = measured(config, study, meter, meter.one_per_network([BASELINE, *cands]), prepared,
                                      steps, log)
    line = constraint.describe(cands)
    if line:
        log(line)
    return _Setup(prepared, constraint, meter, cands, steps, study, proposer)


def measured(config: ml_collections.ConfigDict, study: Any, meter: MeasuredLatency, cands: Sequence[Candidate],
             prepared: trainer.Run, steps: Sequence[int], log: Callable[[str], Any]
             ) -> dict[str, dict[str, dict[str, float]]]:
    """{network key: {kind: cost}} of ``cands``' networks on this device: the study's, measuring (and storing)
    the networks it lacks, against unscaled B0 in the same interleaved rounds. Each is timed as its rung-0
    trial's own program, which that trial then loads from the compilation cache."""
    from effnet_jax.training import latency

    device = latency.device_key()
    stored = dict(study.study.user_attrs.get("latency") or {})
    mine = dict(stored.get(device) or {})
    keys = {meter.network_key(c): c for c in cands}
    missing = [k for k in keys if k not in mine]
    if missing:
        s = config.search
        reference = meter.network_key(BASELINE)
        todo = {k: keys.get(k, BASELINE) for k in dict.fromkeys([reference, *missing])}
        log(f"measuring {len(set(missing) - {reference})} networks' train-step and inference time against "
            f"unscaled B0 on {device}")
        configs = {k: trial_plan(config, c, int(s.seeds[0]), 0, steps).config for k, c in todo.items()}
        mine.update(latency.measure(configs, prepared.source.num_classes, reference, rounds=s.latency_rounds, log=log,
                                    steps_per_epoch=prepared.steps_per_epoch))
        study.study.set_user_attr("latency", {**stored, device: mine})
    return {k: mine[k] for k in keys}


def search(config: ml_collections.ConfigDict, workdir: str, storage: str | None = None,
           study_name: str = "grid_search", log: Callable[[str], Any] = print, write: bool = True
           ) -> dict[str, Any]:
    """Run (or join, or resume) the search; returns {"rows", "summary", "best", "verdict", "learning",
    "rung_agreement", "noise_ceiling", "ceiling_line", ...} (``learning["learned"]`` False: no answer).

    Several processes may call this at once on one storage: they share the trials.
    """
    s = config.search
    run = setup(config, workdir, storage, study_name, log)
    prepared, cands, steps, study = run.prepared, run.cands, run.steps, run.study
    num_classes, num_eval = prepared.source.num_classes, prepared.source.num_eval
    schedule = schedule_for(s)
    t0 = time.time()
    mode = rung_mode_for(s)
    alive, rows = run.proposer.first_rung(cands, _FirstRung(config, study, workdir, steps, num_classes, log))
    for rung in range(1, len(steps)):
        alive = schedule.survivors(summarize(list(rows.values()), s.metric), alive, rung - 1)
        for c in cands:  # the rest never continues: its checkpoints go
            if c not in alive:
                for seed in rung_seeds(config, rung - 1, len(steps)):
                    runner.drop_checkpoints(os.path.join(workdir, "trials", mode.directory(c, seed, steps, rung - 1)))
        log(f"rung {rung}: {len(alive)} candidates go on to {steps[rung]} steps with seeds "
            f"{rung_seeds(config, rung, len(steps))}")
        rows.update(runner.run(study, plan_rung(config, alive, rung, steps, num_classes), workdir,
                               trainer.train_and_evaluate, s.metric, log))
    base_macs = trials.figures(config.train, BASELINE, 0.0, num_classes)["macs"]
    test = s.get("test", stats.POOLED)
    race(config, study, workdir, alive, rows, steps, num_classes,
         lambda r: summarize(r, s.metric, base_macs, num_eval, test=test), log)
    rows_list = list(rows.values())
    if run.meter is not None:
        _with_latency(rows_list, run.meter)
    summary = summarize(rows_list, s.metric, base_macs, num_eval, test=test)
    best = pick_best(summary, s)
    learning = learning_check(summary, rows_list, input_pipeline.majority_rate(prepared.source), num_eval, config,
                              steps)
    verdict = judge(summary, best, s)
    agreement = rung_agreement(rows_list, s.metric)
    ceiling = noise_ceiling(rows_list, s.metric)
    extra = {"num_classes": num_classes, "num_eval": num_eval, "dataset": prepared.source.name,
             "rung_steps": steps, "rung_agreement": agreement, "noise_ceiling": ceiling,
             "ceiling_line": ceiling_line(agreement, ceiling, steps, config.train.data.name), "learning": learning,
             "macs_warnings": run.constraint.warnings(summary), "training_share": training_share(rows_list, t0)}
    if write:
        write_outputs(workdir, config, rows_list, summary, best, verdict, extra)
    return {"rows": rows_list, "summary": summary, "best": best, "verdict": verdict, **extra}


def contenders(summary: Sequence[dict[str, Any]], search: ml_collections.ConfigDict, alive: Sequence[Candidate]
               ) -> list[Candidate]:
    """The candidates of ``alive`` that racing gives one more seed: the leader and every candidate ``judge``
    does not separate from it; none once nothing is tied with the leader."""
    verdicts = judge(summary, pick_best(summary, search), search)["verdicts"]
    racing = {name for name, v in verdicts.items() if v not in SEPARATED}
    if len(racing) < 2:
        return []
    return [c for c in alive if trials.candidate_name(trials.candidate_attrs(c)) in racing]


SEPARATED = ("below", "above best")  # judge's verdicts of a candidate separated from the leader


def race(config: ml_collections.ConfigDict, study: Any, workdir: str, alive: Sequence[Candidate],
         rows: dict[Any, dict[str, Any]], steps: Sequence[int], num_classes: int,
         summarize_rows: Callable[[list[dict[str, Any]]], list[dict[str, Any]]], log: Callable[[str], Any]) -> None:
    """Racing at the top rung (F-race): a seed at a time (``race_seeds``) for the ``contenders`` only, until
    none is left or the seeds are spent; ``rows`` gains the new trials' rows.

    Each round is decided from the finished rows of the rounds before it, so every worker, and a rerun
    after a crash, plans the same trials (the runner runs each key once).
    """
    top = len(steps) - 1
    for seed in race_seeds(config, len(steps)):
        racing = contenders(summarize_rows(list(rows.values())), config.search, alive)
        if not racing:
            log("racing: nothing is tied with the leader any more")
            return
        log(f"racing: seed {seed} for the {len(racing)} candidates not separated from the leader")
        rows.update(runner.run(study, plan_rung(config, racing, top, steps, num_classes, seeds=[seed]), workdir,
                               trainer.train_and_evaluate, config.search.metric, log))


def _with_latency(rows: Sequence[dict[str, Any]], meter: MeasuredLatency) -> None:
    """Each row's network's measured train and inference cost over unscaled B0's (``latency_train`` /
    ``latency_infer``), where it was measured."""
    from effnet_jax.training.latency import KINDS

    for r in rows:
        cost = meter.measurements.get(meter.network_key(Candidate(r["alpha"], r["beta"], r["gamma"], r["label"])))
        for kind in KINDS:
            r[f"latency_{kind}"] = cost[kind]["ratio"] if cost else None


def training_share(rows: Sequence[dict[str, Any]], t0: float = 0.0) -> float | None:
    """Share of the trials' wall time spent in timed training steps (the rest: compile, eval, data, saves): the
    trainer's ``timings.train_s``, the steps this trial ran. (``steps`` is where a run ended, so a trial that
    continued another's checkpoint would count the steps it did not train.)"""
    train_s = sum(r["timings"]["train_s"] for r in rows
                  if isinstance(r.get("timings"), dict) and isinstance(r["timings"].get("train_s"), (int, float)))
    wall = sum(r.get("wall_time_s") or 0.0 for r in rows)
    return train_s / wall if wall > 0 and train_s > 0 else None


def _refuse_old_workdir(workdir: str, storage: str | None) -> None:
    """A workdir of results.jsonl (no study journal) cannot be resumed: say so instead of starting beside it."""
    if not storage and os.path.exists(os.path.join(workdir, "results.jsonl")) and \
            not os.path.exists(os.path.join(workdir, "study.journal")):
        raise UserError(f"{workdir} holds a results.jsonl from a grid search before Optuna studies: it cannot be "
                        "resumed. Its results.csv and best.json stay readable; start this search in a new --workdir")


# --------------------------------------------------------------------------- CLI

def _define_flags(fv: Any) -> None:
    from absl import flags

    flags.DEFINE_string("then_scale", "", "comma-separated phi values to scale the winner to", flag_values=fv)
    flags.DEFINE_bool("then_train", False, "also train the --then_scale models with the trial config",
                      flag_values=fv)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    run = runner.begin(argv, "experiments.grid_search", DEFAULT_CONFIG, check_search, _define_flags)
    config, fv, workdir = run.config, run.flags, run.workdir
    phis = report.parse_floats(fv.then_scale, "--then_scale")
    _refuse_old_workdir(workdir, fv.storage)
    t0 = time.time()
    out = run.serve(lambda log, write: search(config, workdir, fv.storage, fv.study_name, log, write=write),
                    prepare=lambda log: setup(config, workdir, fv.storage, fv.study_name, log))
    if fv.worker:
        return out
    _print_summary(out, config, workdir, time.time() - t0)
    best = out["best"]
    if out["learning"].get("learned") is False and config.search.get("require_learning", True):
        raise UserError(out["learning"]["reason"])  # best.json says it is no answer; scale_up refuses it
    if phis and best is not None and out["learning"].get("learned") is not False:
        from experiments import scale_up

        scale_up.scale_up(os.path.join(workdir, "best.json"), phis,
                          os.path.join(workdir, "scale_up") if fv.then_train else None)
    return out


def _print_summary(out: dict[str, Any], config: ml_collections.ConfigDict, workdir: str, took: float) -> None:
    metric = config.search.metric
    print(format_table(out["summary"], metric, out["verdict"].get("verdicts", {}),
                       config.search.get("test", stats.POOLED)))
    for w in out["macs_warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    for a in out["rung_agreement"]:
        ci = a.get("kendall_ci")
        print(f"rung {a['rung']} vs rung {a['top_rung']} ranking over {a['n']} candidates: Kendall tau "
              f"{_num(a['kendall_tau'])}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
              + f", Spearman {_num(a['spearman_rho'])}" + ("" if a["same_winner"] else " (the winner changed)"))
    print(out["ceiling_line"])
    best = out["best"]
    if best is None:
        print("no constraint-satisfying candidate finished; nothing written to best.json")
    elif out["learning"].get("learned") is False:
        print(f"no answer ({os.path.join(workdir, 'best.json')} is marked as none): {out['learning']['reason']}")
    else:
        print(f"winner: alpha={best['alpha']} beta={best['beta']} gamma={best['gamma']} "
              f"({metric} {report.score_text(best)}, {best['ok']} seeds) -> {os.path.join(workdir, 'best.json')}")
    if out["learning"].get("learned") is not False:
        print(out["verdict"]["sentence"])
    share = out["training_share"]
    print(f"grid search took {took:.0f} s" + (f" ({share:.0%} of trial time in training steps)" if share else "")
          + f"; results in {workdir}")
    phases = runner.phase_line(out["rows"])
    if phases:
        print(phases)


def _num(x: float | None) -> str:
    return "n/a (constant scores)" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
