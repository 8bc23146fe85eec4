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

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from effnet_jax import cost, trainer
from effnet_jax.errors import UserError, exit_on_user_error
from experiments import report, runner, stats, trials
from experiments.constraints import MeasuredLatency, candidates, constraint_for, grid_points
from experiments.strategies import check_search, proposer_for, schedule_for
from experiments.trials import BASELINE, Candidate

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "grid_search.py")
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


def plan_rung(config: ml_collections.ConfigDict, cands: Sequence[Candidate], rung: int, steps: Sequence[int],
              num_classes: int) -> list[runner.TrialPlan]:
    """The trials of one rung, longest first.

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
    cfg = trials.trial_config(config.train, c, config.search.phi, seed=seed, steps=steps[rung],
                              schedule_steps=steps[-1] if rungs > 1 else 0)
    attrs = {**trials.candidate_attrs(c), "phi": cfg.model.phi, "seed": seed, "rung": rung,
             "budget_steps": steps[rung]}
    return runner.TrialPlan(f"{c.key}-s{seed}-n{steps[rung]}", cfg, attrs, directory=f"{c.key}-s{seed}",
                            keep_checkpoint=rung < rungs - 1)


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
    """Verdicts at the top rung: each candidate against the winner (Welch's t-test over seeds)."""
    constraint = constraint_for(search)
    top = max((s["rung"] for s in summary), default=0)
    pool = [s for s in summary if s["rung"] == top and s["mean"] is not None
            and (s is best or s["label"] == "paper" or constraint.satisfies(s))]
    if best is None or not pool:
        return {"verdicts": {}, "sentence": "no constraint-satisfying candidate finished: nothing to judge"}
    name = {id(s): trials.candidate_name(s) for s in pool}
    ranked = [best] + [s for s in pool if s is not best]
    return stats.verdicts([{"key": name[id(s)], "values": s["values"]} for s in ranked], alpha=search.alpha_level,
                          reference=next((name[id(s)] for s in pool if s["label"] == "paper"), None))


def format_table(summary: Sequence[dict[str, Any]], metric: str, verdicts: dict[str, str] | None = None) -> str:
    """The search's table: one row per candidate, best first, with its interval and verdict."""
    verdicts = verdicts or {}
    columns: list[report.Column] = [
        ("", 1, lambda s: {"paper": "P", "baseline": "B"}.get(s["label"], "")),
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
        "measured train-step / inference time / unscaled B0's on this device; "
        "±95%: t interval over seeds with the validation sample's binomial error"])


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


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
            **{k: best[k] for k in (*cost.FIGURES, "macs_ratio", "latency_train", "latency_infer")},
            "verdict": verdict, **extra, "config": config.to_dict(), "created": report.now()})
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
    _refuse_old_workdir(workdir, storage)
    proposer = proposer_for(s)
    study = runner.open_study(runner.storage_for(storage, workdir), study_name, runner.identity(config.train),
                              storage or workdir, sampler=proposer.sampler())
    meter = constraint if isinstance(constraint, MeasuredLatency) else (
        MeasuredLatency(s, config.train, num_classes) if s.measure_latency else None)
    if meter is constraint:
        meter.measurements = measured(config, study, meter, meter.to_measure(grid_points(s)), num_classes, log)
    cands = candidates(s, config.train, num_classes, constraint)
    if meter is not None and meter is not constraint:
        meter.measurements = measured(config, study, meter, meter.to_measure(cands), num_classes, log)
    line = constraint.describe(cands)
    if line:
        log(line)
    return _Setup(prepared, constraint, meter, cands, rung_steps(config, prepared.steps_per_epoch), study, proposer)


def measured(config: ml_collections.ConfigDict, study: Any, meter: MeasuredLatency, cands: Sequence[Candidate],
             num_classes: int, log: Callable[[str], Any]) -> dict[str, dict[str, dict[str, float]]]:
    """{network key: {kind: cost}} of ``cands``' networks on this device: the study's, measuring (and storing)
    the networks it lacks, against unscaled B0 in the same interleaved rounds."""
    from effnet_jax import latency

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
        configs = {k: trials.trial_config(config.train, c, 0.0 if c.label == "baseline" else s.phi,
                                          seed=int(s.seeds[0]), schedule_steps=0) for k, c in todo.items()}
        mine.update(latency.measure(configs, num_classes, reference, rounds=s.latency_rounds, log=log))
        study.study.set_user_attr("latency", {**stored, device: mine})
    return {k: mine[k] for k in keys}


def search(config: ml_collections.ConfigDict, workdir: str, storage: str | None = None,
           study_name: str = "grid_search", log: Callable[[str], Any] = print, write: bool = True
           ) -> dict[str, Any]:
    """Run (or join, or resume) the search; returns {"rows", "summary", "best", "verdict", ...}.

    Several processes may call this at once on one storage: they share the trials.
    """
    s = config.search
    run = setup(config, workdir, storage, study_name, log)
    prepared, cands, steps, study = run.prepared, run.cands, run.steps, run.study
    num_classes, num_eval = prepared.source.num_classes, prepared.source.num_eval
    schedule = schedule_for(s)
    t0 = time.time()
    alive, rows = run.proposer.first_rung(cands, _FirstRung(config, study, workdir, steps, num_classes, log))
    for rung in range(1, len(steps)):
        alive = schedule.survivors(summarize(list(rows.values()), s.metric), alive, rung - 1)
        for c in cands:  # the rest never continues: its checkpoints go
            if c not in alive:
                for seed in rung_seeds(config, rung - 1, len(steps)):
                    runner.drop_checkpoints(os.path.join(workdir, "trials", f"{c.key}-s{seed}"))
        log(f"rung {rung}: {len(alive)} candidates go on to {steps[rung]} steps with seeds "
            f"{rung_seeds(config, rung, len(steps))}")
        rows.update(runner.run(study, plan_rung(config, alive, rung, steps, num_classes), workdir,
                               trainer.train_and_evaluate, s.metric, log))
    rows_list = list(rows.values())
    if run.meter is not None:
        _with_latency(rows_list, run.meter)
    base_macs = trials.figures(config.train, BASELINE, 0.0, num_classes)["macs"]
    summary = summarize(rows_list, s.metric, base_macs, num_eval)
    best = pick_best(summary, s)
    verdict = judge(summary, best, s)
    extra = {"num_classes": num_classes, "num_eval": num_eval, "dataset": prepared.source.name,
             "rung_steps": steps, "rung_agreement": rung_agreement(rows_list, s.metric),
             "macs_warnings": run.constraint.warnings(summary), "training_share": training_share(rows_list, t0)}
    if write:
        write_outputs(workdir, config, rows_list, summary, best, verdict, extra)
    return {"rows": rows_list, "summary": summary, "best": best, "verdict": verdict, **extra}


def _with_latency(rows: Sequence[dict[str, Any]], meter: MeasuredLatency) -> None:
    """Each row's network's measured train and inference cost over unscaled B0's (``latency_train`` /
    ``latency_infer``), where it was measured."""
    from effnet_jax.latency import KINDS

    for r in rows:
        cost = meter.measurements.get(meter.network_key(Candidate(r["alpha"], r["beta"], r["gamma"], r["label"])))
        for kind in KINDS:
            r[f"latency_{kind}"] = cost[kind]["ratio"] if cost else None


def training_share(rows: Sequence[dict[str, Any]], t0: float) -> float | None:
    """Share of the trials' wall time spent in timed training steps (the rest: compile, eval, data, saves)."""
    train_s = sum(r["steps"] * r["batch_size"] / r["train_img_per_s"] for r in rows
                  if r.get("train_img_per_s") and r.get("steps") and r.get("batch_size"))
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
    phases = runner.phase_line(out["rows"])
    if phases:
        print(phases)


def _num(x: float | None) -> str:
    return "n/a (constant scores)" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
