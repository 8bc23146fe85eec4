"""Grid search over EfficientNet's compound-scaling constants (alpha, beta, gamma).

    python -m experiments.grid_search                      # embedded digits, a laptop CPU, minutes
    python -m experiments.grid_search --workdir=runs/grid --storage=postgresql://user:pw@db/effnet
    python -m experiments.grid_search --then_scale=1,2,3  # scale the winner, print params/MACs

Candidates satisfy |alpha * beta**2 * gamma**2 - target| <= tolerance on a grid; the
paper's (1.2, 1.1, 1.15) and the unscaled B0 ride along as labelled references. Each
trial is B0 scaled at phi = 1 by a candidate, trained through the one trainer and scored
on a validation split.

The search is an Optuna study worked by ``experiments.queue`` (a journal file in the
workdir by default, or ``--storage``): every process that runs the same command on the same
storage shares the queue, each trial runs once, a killed worker's trial resumes from its
checkpoint. ``--local_workers`` starts several worker processes on this machine.

Successive halving (``search.strategy = "halving"``, the default) runs in synchronous
rungs: every candidate trains ``b`` steps with ``search.seeds``; the best 1/eta (rounded up) of the grid
points (and the two references) go on to eta·b steps with ``search.final_seeds``.
``search.rung_mode`` says how a rung is scored and what a promoted run continues from (one of
``experiments.strategies.RUNG_MODES``; by default every rung's learning-rate schedule spans the top
rung's length, so a promoted run *continues* its shorter run's checkpoint).
The winner is decided at the largest budget with every final seed; with ``search.max_seeds``
the top rung *races*: one more seed at a time for the leader and every candidate still tied
with it (``analysis.judge``'s verdicts), until none is or each has ``max_seeds`` seeds.
Synchronous rungs rather than Optuna's asynchronous pruners because the survivors are then a
function of the config alone (the same on every rerun and worker count), and because a
pruner stops a trial part-way while here the cost that dominates, compiling each network,
is paid before the first step either way.

The answer: before any verdict each candidate and the baseline are tested against chance (the
validation split's majority-class rate); when the baseline or every candidate is not above it, the
trials did not learn at this budget: best.json says ``"answer": false`` with the reason (scale_up and
``model.constants`` refuse it) and the search exits 2 with one ``error:`` line naming what to raise
(``search.require_learning = False``: exit 0). Otherwise the winner and its contender set: every
candidate not separated from it by ``search.test`` (one of ``experiments.stats.TESTS``; by default seed
noise estimated over every candidate at the top rung, comparisons paired by seed) at
``search.alpha_level``. The analysis is ``experiments.analysis``, its table and files
``experiments.search_report``. Each cheap rung's Kendall tau against the top rung carries a bootstrap
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
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from effnet_jax.data import input_pipeline
from effnet_jax.errors import UserError, exit_on_user_error
from effnet_jax.model import cost
from effnet_jax.training import recipe
from experiments import planned, queue, report, search_report, stats, trials, workers
from experiments.analysis import (
    CandidateSummary,
    ceiling_line,
    contenders,
    judge,
    learning_check,
    noise_ceiling,
    pick_best,
    rung_agreement,
    summarize,
    training_share,
)
from experiments.constraints import MeasuredLatency, candidates, constraint_for, grid_points
from experiments.strategies import check_search, proposer_for, rung_mode_for, schedule_for
from experiments.study import Study, identity, open_study, storage_for
from experiments.trials import BASELINE, Candidate

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "grid_search.py")


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
              num_classes: int, seeds: Sequence[int] | None = None) -> list[queue.TrialPlan]:
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
               ) -> queue.TrialPlan:
    """One trial of ``c``: rung ``rung``'s budget, scored and continued as ``search.rung_mode`` says."""
    mode = rung_mode_for(config.search)
    cfg = mode.config(config.train, c, config.search.phi, seed, steps, rung)
    attrs = {**trials.candidate_attrs(c), "phi": cfg.model.phi, "seed": seed, "rung": rung,
             "budget_steps": steps[rung]}
    return queue.TrialPlan(mode.key(c, seed, steps, rung), cfg, attrs,
                           directory=mode.directory(c, seed, steps, rung), keep_checkpoint=mode.keeps(steps, rung))


# ------------------------------------------------------------------------ driver

class _FirstRung:
    """What the proposer may do at rung 0: plan and run trials on this search's study."""

    def __init__(self, config: ml_collections.ConfigDict, study: Study, workdir: str, steps: Sequence[int],
                 num_classes: int, log: Callable[[str], Any], worker: queue.Worker) -> None:
        self.config, self.study, self.workdir, self.steps, self.num_classes, self.log, self.worker = (
            config, study, workdir, steps, num_classes, log, worker)

    def plan(self, cands: Sequence[Candidate]) -> list[queue.TrialPlan]:
        return plan_rung(self.config, cands, 0, self.steps, self.num_classes)

    def plan_one(self, c: Candidate) -> queue.TrialPlan:
        return trial_plan(self.config, c, rung_seeds(self.config, 0, len(self.steps))[0], 0, self.steps)

    def train(self, plans: Sequence[queue.TrialPlan]) -> dict[Any, dict[str, Any]]:
        return self.worker.work(self.study, plans, self.workdir, self.config.search.metric, self.log)

    def train_sampled(self, n_trials: int, propose: Callable[[Any], queue.TrialPlan | None]) -> list[dict[str, Any]]:
        return self.worker.work_sampled(self.study, n_trials, propose, self.workdir, self.config.search.metric,
                                        self.log)


@dataclasses.dataclass
class Setup:
    """A search's data, constraint, candidates and study, before any trial."""

    prepared: recipe.Prepared
    constraint: Any
    meter: MeasuredLatency | None  # what measures latency on this device (None: not measured)
    cands: list[Candidate]
    steps: list[int]
    study: Study
    proposer: Any


def setup(config: ml_collections.ConfigDict, workdir: str, storage: str | None = None,
          study_name: str = "grid_search", log: Callable[[str], Any] = print) -> Setup:
    """Open the data and the study, time the networks that need it on this device (once per device kind,
    kept in the study), and admit the candidates. Writes nothing but the study."""
    s = config.search
    check_search(config)
    base = trials.trial_config(config.train, BASELINE, seed=int(s.seeds[0]), schedule_steps=0)
    prepared = recipe.prepare(base)  # validates the train config and opens the data: writes nothing
    num_classes = prepared.source.num_classes
    constraint = constraint_for(s, config.train, num_classes)
    steps = rung_steps(config, prepared.steps_per_epoch)
    trials.check_trials(((p.key, p.config) for p in (trial_plan(config, BASELINE, int(s.seeds[0]), r, steps)
                                                     for r in range(len(steps)))), prepared.steps_per_epoch)
    _refuse_old_workdir(workdir, storage)
    proposer = proposer_for(s)
    study = open_study(storage_for(storage, workdir), study_name, identity(config.train), storage or workdir,
                       sampler=proposer.sampler())
    study.check_data(getattr(prepared.source, "fingerprint", None), storage or workdir)
    meter = constraint.meter()  # a constraint on measured time times its networks before it admits any
    if meter is not None:
        meter.measurements = measured(config, study, meter, meter.to_measure(grid_points(s)), prepared, steps, log)
    elif s.measure_latency:
        meter = MeasuredLatency(s, config.train, num_classes)
    cands = candidates(s, config.train, num_classes, constraint)
    if meter is not None and meter is not constraint:
        meter.measurements = measured(config, study, meter, meter.one_per_network([BASELINE, *cands]), prepared,
                                      steps, log)
    line = constraint.describe(cands)
    if line:
        log(line)
    return Setup(prepared, constraint, meter, cands, steps, study, proposer)


def measured(config: ml_collections.ConfigDict, study: Study, meter: MeasuredLatency, cands: Sequence[Candidate],
             prepared: recipe.Prepared, steps: Sequence[int], log: Callable[[str], Any]
             ) -> dict[str, dict[str, dict[str, float]]]:
    """{network key: {kind: cost}} of ``cands``' networks on this device: the study's, measuring (and storing)
    the networks it lacks, against unscaled B0 in the same interleaved rounds. Each is timed as its rung-0
    trial's own program, which that trial then loads from the compilation cache."""
    from effnet_jax.training import latency

    device = latency.device_key()
    mine = study.latencies(device)
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
        study.store_latencies(device, mine)
    return {k: mine[k] for k in keys}


def search(config: ml_collections.ConfigDict, workdir: str, storage: str | None = None,
           study_name: str = "grid_search", log: Callable[[str], Any] = print, write: bool = True,
           worker: queue.Worker | None = None, workers: int = 1) -> dict[str, Any]:
    """Run (or join, or resume) the search; returns {"rows", "summary", "best", "verdict", "learning",
    "rung_agreement", "noise_ceiling", "ceiling_line", ...} (``learning["learned"]`` False: no answer).

    Several processes may call this at once on one storage: they share the trials. ``worker``: this process's
    (``workers.begin``'s; default a new one), whose programs every rung's trials share; ``workers``: how many
    processes work the study (a time budget's plan is priced for them).
    """
    s = config.search
    worker = queue.Worker() if worker is None else worker
    ready = setup(config, workdir, storage, study_name, log)
    prepared, cands, steps, study = ready.prepared, ready.cands, ready.steps, ready.study
    num_classes, num_eval = prepared.source.num_classes, prepared.source.num_eval
    planned_json = None
    if planned.seconds_of(s.get("time_budget", "")) is not None:
        worker = dataclasses.replace(worker, deadline=time.time() + planned.seconds_of(s.time_budget))
        config, planned_json = plan_by_time(config, ready, workdir, worker, workers, log)
        s, steps = config.search, rung_steps(config, prepared.steps_per_epoch)
    schedule = schedule_for(s)
    t0 = time.time()
    mode = rung_mode_for(s)
    alive, rows = ready.proposer.first_rung(cands, _FirstRung(config, study, workdir, steps, num_classes, log, worker))
    for rung in range(1, len(steps)):
        alive = schedule.survivors(summarize(list(rows.values()), s.metric), alive, rung - 1)
        for c in cands:  # the rest never continues: its checkpoints go
            if c not in alive:
                for seed in rung_seeds(config, rung - 1, len(steps)):
                    queue.drop_checkpoints(os.path.join(workdir, "trials", mode.directory(c, seed, steps, rung - 1)))
        log(f"rung {rung}: {len(alive)} candidates go on to {steps[rung]} steps with seeds "
            f"{rung_seeds(config, rung, len(steps))}")
        rows.update(worker.work(study, plan_rung(config, alive, rung, steps, num_classes), workdir, s.metric, log))
    base_macs = trials.figures(config.train, BASELINE, 0.0, num_classes)["macs"]
    test = s.get("test", stats.POOLED)
    race(config, study, workdir, alive, rows, steps, num_classes,
         lambda r: summarize(r, s.metric, base_macs, num_eval, test=test, constraint=ready.constraint), log, worker)
    rows_list = list(rows.values())
    if ready.meter is not None:
        _with_latency(rows_list, ready.meter)
    summary = summarize(rows_list, s.metric, base_macs, num_eval, test=test, constraint=ready.constraint)
    best = pick_best(summary, s)
    learning = learning_check(summary, rows_list, input_pipeline.majority_rate(prepared.source), num_eval, config,
                              steps)
    verdict = judge(summary, best, s)
    agreement = rung_agreement(rows_list, s.metric)
    ceiling = noise_ceiling(rows_list, s.metric)
    extra = {"num_classes": num_classes, "num_eval": num_eval, "dataset": prepared.source.name,
             "rung_steps": steps, "rung_agreement": agreement, "noise_ceiling": ceiling,
             "ceiling_line": ceiling_line(agreement, ceiling, steps, config.train.data.name), "learning": learning,
             "macs_warnings": ready.constraint.warnings(summary), "training_share": training_share(rows_list, t0),
             **({"planner": planned_json, "wall_s": time.time() - t0} if planned_json else {})}
    if write:
        search_report.write_outputs(workdir, config, rows_list, summary, best, verdict, extra)
    return {"rows": rows_list, "summary": summary, "best": best, "verdict": verdict, **extra}


def plan_by_time(config: ml_collections.ConfigDict, ready: Setup, workdir: str, worker: queue.Worker, workers: int,
                 log: Callable[[str], Any]) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """``search.time_budget``: probe, then the plan the study keeps (the first process to choose one stores it;
    every other worker, the parent's report and a rerun read it). Returns the config that runs the plan and the
    plan's JSON (``worker`` carries the deadline); raises ``planned.Refused`` (exit 2, best.json "answer": false)
    when the planner refuses and ``search.accept_underpowered`` is off."""
    s = config.search
    seconds = planned.seconds_of(s.time_budget)
    t0 = time.time()
    stored = ready.study.user_attr(planned.PLAN_ATTR)
    if stored is None:
        cooled = planned.apply(config, {})
        base = trials.budget_steps(config.train, ready.prepared.steps_per_epoch)
        rows, ladder = planned.run_probe(cooled, ready.cands, ready.study, workdir, worker,
                                         ready.prepared.source.num_classes, base, seconds, workers, plan_rung, log)
        choice = planned.choose_plan(cooled, rows, ready.cands, ready.prepared.source,
                                     ready.prepared.source.num_classes, worker.deadline - time.time(), workers)
        choice["probe"].update(ladder=ladder, probe_s=time.time() - t0)
        if ready.study.user_attr(planned.PLAN_ATTR) is None:
            ready.study.set_user_attr(planned.PLAN_ATTR, choice)
        stored = ready.study.user_attr(planned.PLAN_ATTR)
    if not stored["answer"]:
        if not (s.accept_underpowered and stored.get("overrides")):
            raise planned.Refused(stored)
        log(f"{stored['line']}\nsearch.accept_underpowered: running the best plan anyway")
    log("plan (" + ("accepted underpowered" if not stored["answer"] else "predicted") + "):\n" + stored["table"])
    return planned.apply(config, stored["overrides"]), stored


def race(config: ml_collections.ConfigDict, study: Study, workdir: str, alive: Sequence[Candidate],
         rows: dict[Any, dict[str, Any]], steps: Sequence[int], num_classes: int,
         summarize_rows: Callable[[list[dict[str, Any]]], list[CandidateSummary]], log: Callable[[str], Any],
         worker: queue.Worker | None = None) -> None:
    """Racing at the top rung (F-race): a seed at a time (``race_seeds``) for the ``contenders`` only, until
    none is left or the seeds are spent; ``rows`` gains the new trials' rows.

    Each round is decided from the finished rows of the rounds before it, so every worker, and a rerun
    after a crash, plans the same trials (the queue runs each key once).
    """
    top = len(steps) - 1
    worker = queue.Worker() if worker is None else worker
    for seed in race_seeds(config, len(steps)):
        racing = contenders(summarize_rows(list(rows.values())), config.search, alive)
        if not racing:
            log("racing: nothing is tied with the leader any more")
            return
        log(f"racing: seed {seed} for the {len(racing)} candidates not separated from the leader")
        rows.update(worker.work(study, plan_rung(config, racing, top, steps, num_classes, seeds=[seed]), workdir,
                                config.search.metric, log))


def _with_latency(rows: Sequence[dict[str, Any]], meter: MeasuredLatency) -> None:
    """Each row's network's measured train and inference cost over unscaled B0's (``latency_train`` /
    ``latency_infer``), where it was measured."""
    from effnet_jax.training.latency import KINDS

    for r in rows:
        cost = meter.measurements.get(meter.network_key(Candidate(r["alpha"], r["beta"], r["gamma"], r["label"])))
        for kind in KINDS:
            r[f"latency_{kind}"] = cost[kind]["ratio"] if cost else None


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
    exp = workers.begin(argv, "experiments.grid_search", DEFAULT_CONFIG, check_search, _define_flags)
    config, fv, workdir = exp.config, exp.flags, exp.workdir
    phis = report.parse_floats(fv.then_scale, "--then_scale")
    _refuse_old_workdir(workdir, fv.storage)
    t0 = time.time()
    n = workers.count(fv)
    try:
        out = exp.serve(lambda log, write: search(config, workdir, fv.storage, fv.study_name, log, write=write,
                                                  worker=exp.worker, workers=n),
                        prepare=lambda log: setup(config, workdir, fv.storage, fv.study_name, log))
    except planned.Refused as e:
        if not fv.worker:
            planned.write_refusal(workdir, config, e.plan)
        raise UserError(e.plan["line"].removeprefix("error: ")) from None
    if fv.worker:
        return out
    search_report.print_summary(out, config, workdir, time.time() - t0)
    best = out["best"]
    if out["learning"].get("learned") is False and config.search.get("require_learning", True):
        raise UserError(out["learning"]["reason"])  # best.json says it is no answer; scale_up refuses it
    if phis and best is not None and out["learning"].get("learned") is not False:
        from experiments import scale_up

        scale_up.scale_up(os.path.join(workdir, "best.json"), phis,
                          os.path.join(workdir, "scale_up") if fv.then_train else None)
    return out


if __name__ == "__main__":
    main()
