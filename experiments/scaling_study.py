"""Scaling study: compound vs width-, depth- and resolution-only scaling at matched MACs.

    python -m experiments.scaling_study                          # embedded digits, 2-core CPU, ~7 min
    python -m experiments.scaling_study --config.study.constants=runs/grid/best.json --workdir=runs/study

From unscaled B0 (the shared 1x point), each family is scaled along its own axis
until its MACs match a budget (``study.budgets`` x the baseline's MACs):

* width only      Candidate(alpha=1, beta=w, gamma=1) at phi = 1
* depth only      Candidate(alpha=d, beta=1, gamma=1) at phi = 1
* resolution only Candidate(alpha=1, beta=1, gamma=r) at phi = 1
* compound        Candidate(alpha, beta, gamma) of ``study.constants`` (default the paper's) at
                  the phi that matches the budget (phi is solved, not log2(budget), so that
                  every family is matched the same way; the FLOPs-growth check reports the
                  formula's (alpha*beta^2*gamma^2)^phi prediction beside the measured MACs).

Matching: the coefficient runs on a grid of 1e-4; MACs of the model the trainer would
build (official rounding of channels, repeats and resolution, counted by
``cost.count_macs``) are non-decreasing in it, so bisection finds the first grid point at
or above the target; that model and the one just below compete, the closer one wins, and
its achieved MACs must be within ``study.tolerance`` of the target (else a UserError).
Every model is a trial config (``trials.trial_config``), trained with the
same budget for all through the one trial queue (``experiments.queue``) as an Optuna study
(``study.journal`` in the workdir, or ``--storage``): a rerun skips finished trials and
resumes an interrupted one; several processes on one storage share the trials.

Outputs in --workdir: study.journal, study.csv (one row per trial), summary.json (mean and
95% interval per model, compound-vs-best-single-axis verdicts by Welch's t-test),
accuracy_vs_macs.png (one line per strategy, the shape of the paper's Figure 8) and
flops_growth.json.

Default sizing (B0, digits, 32 px, batch 16): 9 models x 2 seeds = 18 trials of 120 steps
each (docs/results/scaling-study.md has the measured run). Compiling each new model is a large share; the second
seed of a model reuses the first's compiled program (nothing seed-dependent is compiled into
the train step) through jax's persistent compilation cache (train.compile_cache_dir), so it
costs only its training. Smaller runs: --config.study.seeds='(0,)', --config.study.budgets='(1,2)', or
--config.train.model.network=tiny. A rerun in the same workdir skips finished trials.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from effnet_jax.errors import UserError, exit_on_user_error
from effnet_jax.model import scaling
from effnet_jax.training import recipe
from experiments import queue, report, stats, trials, workers
from experiments.study import Study, identity, open_study, storage_for
from experiments.trials import BASELINE, Candidate

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "scaling_study.py")
FAMILIES = ("width", "depth", "resolution", "compound")
STEP = 1e-4  # grid of the searched coefficient (w, d, gamma or phi)
MAX_COEFFICIENT = 64.0  # a budget no family reaches below this is refused
CSV_FIELDS = ("trial_id", "family", "budget", "coefficient", "alpha", "beta", "gamma", "phi", "seed",
              "target_macs", "macs_ratio", "latency_ratio", "trial_number", "state", *queue.RESULT_FIELDS)


@dataclasses.dataclass(frozen=True)
class Point:
    """One model of the study: a family scaled to a budget, with what its MACs came out as."""

    family: str  # one of FAMILIES, or "baseline"
    budget: float  # target MACs / baseline MACs
    candidate: Candidate
    phi: float
    coefficient: float  # the searched multiplier: w, d, gamma, or phi for compound
    width: float
    depth: float
    resolution: int
    blocks: int
    params: int
    macs: int
    ratio: float  # achieved MACs / baseline MACs
    latency: float | None = None  # measured time / baseline's on this device (study.match = "latency")

    @property
    def key(self) -> str:
        """Names the model, so a rerun with other constants or budgets never reuses a stale row."""
        if self.family == "baseline":
            return "baseline"
        return f"{self.family}-{self.budget:g}x-w{self.width:.4f}-d{self.depth:.4f}-r{self.resolution}"

    def trial_id(self, seed: int) -> str:
        return f"{self.key}-s{seed}"


def family_candidate(family: str, coefficient: float, constants: dict[str, float]) -> tuple[Candidate, float]:
    """The candidate and phi of ``family`` scaled by ``coefficient``."""
    if family == "width":
        return Candidate(1.0, coefficient, 1.0, label=family), 1.0
    if family == "depth":
        return Candidate(coefficient, 1.0, 1.0, label=family), 1.0
    if family == "resolution":
        return Candidate(1.0, 1.0, coefficient, label=family), 1.0
    if family == "compound":
        return Candidate(constants["alpha"], constants["beta"], constants["gamma"], label=family), coefficient
    raise UserError(f"unknown family {family!r}; expected some of {', '.join(FAMILIES)}")


def origin(family: str) -> float:
    """The coefficient of the unscaled baseline: multiplier 1, or phi = 0 for compound."""
    return 0.0 if family == "compound" else 1.0


def _first_reaching(at: Callable[[int], float], value: float, hi: int) -> int:
    """Smallest grid index k in [0, hi] with at(k) >= value, given at(hi) >= value (MACs only rise)."""
    lo = -1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid >= 0 and at(mid) >= value:
            hi = mid
        else:
            lo = mid
    return hi


def match_budget(family: str, budget: float, base_macs: int, macs_at: Callable[[float], int],
                 tolerance: float) -> tuple[float, int]:
    """The coefficient (on the STEP grid) whose rounded model's MACs are closest to budget x base.

    ``macs_at`` is non-decreasing in the coefficient (channels, repeats and resolution are
    rounded monotonically), so bisection over grid indices finds the first model at or above
    the target; the model just below it is the only other contender.
    """
    target = budget * base_macs
    start = origin(family)
    at = lambda k: macs_at(start + k * STEP)  # noqa: E731
    hi = 1
    while at(hi) < target:
        hi *= 2
        if start + hi * STEP > MAX_COEFFICIENT:
            raise UserError(f"{family}-only scaling does not reach {budget:g}x the baseline MACs below a "
                            f"coefficient of {MAX_COEFFICIENT:g}")
    hi = _first_reaching(at, target, hi)
    options = [hi]
    if hi > 0:  # the model just below the target: its first grid index
        options.append(_first_reaching(at, at(hi - 1), hi - 1))
    k = min(options, key=lambda i: (abs(at(i) / target - 1), at(i)))
    macs = at(k)
    if abs(macs / target - 1) > tolerance:
        near = ", ".join(f"{at(i) / base_macs:.2f}x" for i in sorted(options))
        raise UserError(f"{family}-only scaling cannot get within {tolerance:.0%} of {budget:g}x the baseline "
                        f"MACs (the nearest models cost {near}); change study.budgets or study.tolerance")
    return round(start + k * STEP, 6), macs


def match_latency(family: str, budget: float, base_macs: int, macs_at: Callable[[float], int],
                  latency_at: Callable[[float], float], tolerance: float, tries: int = 4) -> tuple[float, float]:
    """The coefficient whose model's measured time is closest to ``budget`` x the baseline's, and that ratio.

    Each probe compiles a network, so instead of bisecting on time the MACs match is used as a
    secant: start at the model matching ``budget`` in MACs, and while its time ratio r misses, aim
    the MACs at budget * (budget / r) of the previous aim (time is near-proportional to MACs
    locally, not globally); at most ``tries`` distinct models are measured.
    """
    aim, seen = budget, {}
    for _ in range(tries):
        coef, _ = match_budget(family, aim, base_macs, macs_at, math.inf)
        if coef in seen:
            break
        seen[coef] = latency_at(coef)
        if abs(seen[coef] / budget - 1) <= tolerance / 4:
            break
        aim *= budget / seen[coef]
    coef = min(seen, key=lambda k: abs(seen[k] / budget - 1))
    if abs(seen[coef] / budget - 1) > tolerance:
        near = ", ".join(f"{r:.2f}x" for r in sorted(seen.values()))
        raise UserError(f"{family}-only scaling cannot get within {tolerance:.0%} of {budget:g}x the baseline's "
                        f"measured time (the models tried cost {near}); change study.budgets or study.tolerance")
    return coef, seen[coef]


def plan(config: ml_collections.ConfigDict, constants: dict[str, float], num_classes: int,
         latency_of: Callable[[Candidate, float], float] | None = None) -> list[Point]:
    """The baseline, then every (family, budget) model above it, each matched to its budget: in MACs, or
    (``study.match = "latency"``) in the measured time ``latency_of(candidate, phi)`` returns."""
    s = config.study
    rc = config.train
    base = trials.figures(rc, BASELINE, 0.0, num_classes)
    points = [Point("baseline", 1.0, BASELINE, 0.0, 1.0, **base, ratio=1.0,
                    latency=1.0 if latency_of is not None else None)]
    for family in s.families:
        for budget in s.budgets:
            def macs_at(coef: float, family: str = family) -> int:
                return trials.figures(rc, *family_candidate(family, coef, constants), num_classes)["macs"]

            measured = None
            if latency_of is None:
                coef, _ = match_budget(family, float(budget), base["macs"], macs_at, float(s.tolerance))
            else:
                coef, measured = match_latency(family, float(budget), base["macs"], macs_at,
                                               lambda k, f=family: latency_of(*family_candidate(f, k, constants)),
                                               float(s.tolerance))
            if coef == origin(family):  # unscaled: the shared baseline
                continue
            c, phi = family_candidate(family, coef, constants)
            m = trials.figures(rc, c, phi, num_classes)
            points.append(Point(family, float(budget), c, phi, coef, **m, ratio=m["macs"] / base["macs"],
                                latency=measured))
    return points


def latency_meter(config: ml_collections.ConfigDict, prepared: recipe.Prepared, study_: Study,
                  log: Callable[[str], Any]) -> Callable[[Candidate, float], float]:
    """``latency_of(candidate, phi)``: the model's ``study.latency_kind`` time over unscaled B0's on this device,
    from the study (kept per device kind, so workers and reruns plan the same models) or measured now,
    interleaved with B0 (``effnet_jax.training.latency``) and stored."""
    from effnet_jax.training import latency

    s, device, runs = config.study, latency.device_key(), {}
    seed, num_classes = int(s.seeds[0]), prepared.source.num_classes

    def runner_of(c: Candidate, phi: float) -> Callable[[int], None]:
        cfg = trials.trial_config(config.train, c, phi, seed=seed, schedule_steps=0)
        return latency.step_runner(cfg, num_classes, s.latency_kind, prepared.steps_per_epoch)

    def latency_of(c: Candidate, phi: float) -> float:
        key = trials.network_key(config.train, c, phi)
        mine = study_.latencies(device)
        if s.latency_kind not in mine.get(key, {}):
            if "base" not in runs:
                runs["base"] = runner_of(BASELINE, 0.0)
            cost = latency.interleaved({"base": runs["base"], key: runner_of(c, phi)}, "base", s.latency_rounds)[key]
            log(f"latency: {trials.candidate_name(dataclasses.asdict(c))} at phi={phi:g} costs {cost.ratio:.2f}x "
                f"unscaled B0's {s.latency_kind} time on {device}")
            mine[key] = {**mine.get(key, {}), s.latency_kind: cost.as_dict()}
            study_.store_latencies(device, mine)
        return mine[key][s.latency_kind]["ratio"]

    return latency_of


def check_config(config: ml_collections.ConfigDict) -> dict[str, float]:
    """Validate the study section (UserError on a mistake); returns the compound constants."""
    s = config.study
    families = list(s.families)
    if not families or any(f not in FAMILIES for f in families) or len(set(families)) != len(families):
        raise UserError(f"study.families must be distinct names from {', '.join(FAMILIES)}, got {tuple(families)}")
    budgets = list(s.budgets)
    if not budgets or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b < 1
                          for b in budgets):
        raise UserError(f"study.budgets must be numbers >= 1 (multiples of the baseline's MACs), got {tuple(budgets)}")
    trials.check_seeds(s.seeds, "study.seeds")
    if not s.tolerance > 0:
        raise UserError(f"study.tolerance must be > 0, got {s.tolerance}")
    trials.check_metric(s.metric, "study.metric")
    if config.train.model.resolution > 0:
        raise UserError("train.model.resolution must be 0 (resolutions come from base_resolution and the scaling)")
    if s.match not in ("macs", "latency"):
        raise UserError(f"study.match must be macs or latency, got {s.match!r}")
    if s.match == "latency":
        from effnet_jax.training.latency import KINDS

        if s.latency_kind not in KINDS:
            raise UserError(f"study.latency_kind must be {' or '.join(KINDS)}, got {s.latency_kind!r}")
        if isinstance(s.latency_rounds, bool) or not isinstance(s.latency_rounds, int) or s.latency_rounds < 1:
            raise UserError(f"study.latency_rounds must be a positive integer, got {s.latency_rounds!r}")
    if s.constants:
        return scaling.load_constants(os.path.expanduser(s.constants))
    return dict(scaling.PAPER_CONSTANTS)


# --------------------------------------------------------------------- summary

def _interval(values: Sequence[float]) -> dict[str, Any]:
    ci = stats.interval(values) if values else {}
    return {"mean": ci.get("mean"), "std": ci.get("std"), "half": ci.get("half")}


def summarize(rows: Sequence[dict[str, Any]], points: Sequence[Point], metric: str) -> list[dict[str, Any]]:
    """One entry per planned model: mean +- std of ``metric`` over its finished seeds."""
    out = []
    for p in points:
        group = [r for r in rows if r.get("point") == p.key]
        ok = [r for r in group if r.get("status") == "ok" and r.get(metric) is not None]
        values = [r[metric] for r in ok]
        out.append({
            "family": p.family, "budget": p.budget, "coefficient": p.coefficient, "phi": p.phi,
            "alpha": p.candidate.alpha, "beta": p.candidate.beta, "gamma": p.candidate.gamma,
            "width": p.width, "depth": p.depth, "resolution": p.resolution, "blocks": p.blocks,
            "params": p.params, "macs": p.macs, "ratio": p.ratio, "latency": p.latency,
            "seeds": len(group), "ok": len(ok), "status": "ok" if ok else (group[0]["status"] if group else "missing"),
            "values": values, **_interval(values),
            "wall_time_s": sum(r.get("wall_time_s") or 0.0 for r in group),
        })
    return out


def verdicts(summary: Sequence[dict[str, Any]], alpha: float = 0.05) -> list[dict[str, Any]]:
    """Per budget: compound against the best single-axis family, by Welch's t-test over seeds."""
    out = []
    for budget in sorted({s["budget"] for s in summary if s["family"] == "compound"}):
        comp = next(s for s in summary if s["family"] == "compound" and s["budget"] == budget)
        others = [s for s in summary if s["family"] not in ("compound", "baseline") and s["budget"] == budget
                  and s["mean"] is not None]
        if comp["mean"] is None or not others:
            continue
        best = max(others, key=lambda s: s["mean"])
        test = stats.compare(comp["values"], best["values"])
        gap = comp["mean"] - best["mean"]
        if test["p_value"] is None:
            word = "one seed: no spread to judge against"
        elif test["p_value"] < alpha:
            word = "compound better" if gap > 0 else "compound worse"
        else:
            word = "no clear difference"
        sentence = (f"{budget:g}x: compound {report.score_text(comp['mean'], comp.get('half'))} vs {best['family']} "
                    f"{report.score_text(best['mean'], best.get('half'))}: gap {gap:+.4f}"
                    + ("" if test["p_value"] is None else f", Welch's t-test p = {test['p_value']:.3f}")
                    + f" -> {word}")
        out.append({"budget": budget, "compound": comp["mean"], "compound_half": comp["half"],
                    "best_other": best["family"], "best_other_mean": best["mean"], "best_other_half": best["half"],
                    "gap": gap, "p_value": test["p_value"], "verdict": word, "sentence": sentence})
    return out


def flops_growth(rc: ml_collections.ConfigDict, constants: dict[str, float], phis: Sequence[float],
                 num_classes: int) -> dict[str, Any]:
    """Measured MACs of compound models against the paper's (alpha*beta^2*gamma^2)^phi."""
    base = trials.figures(rc, BASELINE, 0.0, num_classes)["macs"]
    product = constants["alpha"] * constants["beta"] ** 2 * constants["gamma"] ** 2
    rows = []
    for phi in sorted(set(phis)):
        m = trials.figures(rc, Candidate(**constants, label="compound"), phi, num_classes)
        predicted = product**phi
        rows.append({"phi": phi, **m, "measured_ratio": m["macs"] / base, "predicted_ratio": predicted,
                     "measured_over_predicted": m["macs"] / base / predicted})
    return {**constants, "product": product, "baseline_macs": base, "rows": rows}


def format_table(summary: Sequence[dict[str, Any]], metric: str) -> str:
    timed = any(s.get("latency") is not None for s in summary)
    head = (f"{'family':<10} {'budget':>6} {'coef':>7} {'width':>6} {'depth':>6} {'res':>4} {'blocks':>6} "
            f"{'params':>10} {'MMACs':>8} {'x base':>6}" + (f" {'x time':>6}" if timed else "")
            + f" {metric:>16} {'seeds':>5} {'time s':>7}")
    lines = [head, "-" * len(head)]
    for s in summary:
        score = report.score_text(s.get("mean"), s.get("half"))
        lines.append(
            f"{s['family']:<10} {s['budget']:>5g}x {s['coefficient']:>7.4f} {s['width']:>6.3f} {s['depth']:>6.3f} "
            f"{s['resolution']:>4} {s['blocks']:>6} {s['params']:>10,} {s['macs'] / 1e6:>8.2f} {s['ratio']:>6.2f} "
            + (f"{s['latency']:>6.2f} " if timed else "")
            + f"{score:>16} {s['ok']:>2}/{s['seeds']:<2} {s['wall_time_s']:>7.1f}")
    lines.append("coef: w (width), d (depth), gamma (resolution) at phi = 1, or phi (compound); "
                 "x base: achieved MACs / baseline MACs" + ("; x time: measured time / baseline's on this device "
                                                           "(what the budgets were matched on)" if timed else ""))
    return "\n".join(lines)


def format_growth(growth: dict[str, Any]) -> str:
    lines = [f"FLOPs growth, alpha={growth['alpha']:g} beta={growth['beta']:g} gamma={growth['gamma']:g} "
             f"(alpha*beta^2*gamma^2 = {growth['product']:.4f}):",
             f"{'phi':>7} {'res':>4} {'MMACs':>8} {'measured':>9} {'predicted':>9} {'ratio':>6}"]
    for r in growth["rows"]:
        lines.append(f"{r['phi']:>7.4f} {r['resolution']:>4} {r['macs'] / 1e6:>8.2f} {r['measured_ratio']:>8.3f}x "
                     f"{r['predicted_ratio']:>8.3f}x {r['measured_over_predicted']:>6.3f}")
    return "\n".join(lines)


def write_outputs(workdir: str, config: ml_collections.ConfigDict, rows: Sequence[dict[str, Any]],
                  summary: Sequence[dict[str, Any]], growth: dict[str, Any]) -> None:
    """study.csv, summary.json, flops_growth.json and accuracy_vs_macs.png (each replaced whole)."""
    report.write_csv(os.path.join(workdir, "study.csv"), rows, CSV_FIELDS)
    report.write_json(os.path.join(workdir, "summary.json"), {
        "metric": config.study.metric, "models": list(summary), "verdicts": verdicts(summary),
        "config": config.to_dict(), "created": report.now()})
    report.write_json(os.path.join(workdir, "flops_growth.json"), growth)
    from experiments import plots

    plots.scaling_study_plot(summary, config.study.metric, workdir)


# ------------------------------------------------------------------------ driver

def trial_plans(config: ml_collections.ConfigDict, points: Sequence[Point], seeds: Sequence[int]
                ) -> list[queue.TrialPlan]:
    """Every (model, seed) as a queue plan; the seeds of one model share its directory's name prefix."""
    base_macs = points[0].macs
    plans = []
    for p in points:
        for seed in seeds:
            cfg = trials.trial_config(config.train, p.candidate, p.phi, seed=seed, schedule_steps=0,
                                      metric=config.study.metric)
            attrs = {"point": p.key, "family": p.family, "budget": p.budget, "coefficient": p.coefficient,
                     "label": p.candidate.label, "alpha": p.candidate.alpha, "beta": p.candidate.beta,
                     "gamma": p.candidate.gamma, "phi": p.phi, "seed": seed, "target_macs": p.budget * base_macs,
                     "macs_ratio": p.ratio, "latency_ratio": p.latency}
            plans.append(queue.TrialPlan(p.trial_id(seed), cfg, attrs))
    return plans


def study(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], Any] = print,
          storage: str | None = None, study_name: str = "scaling_study", write: bool = True,
          worker: queue.Worker | None = None) -> dict[str, Any]:
    """Run (or join, or resume) the study; returns {"points", "rows", "summary", "growth"}. ``write``: the
    output files (a local worker leaves them to the process that reports). ``worker``: this process's
    (``workers.begin``'s; default a new one)."""
    worker = queue.Worker() if worker is None else worker
    seeds = [int(x) for x in config.study.seeds]
    study_, points, num_classes = setup(config, workdir, log, storage, study_name)
    base_macs = points[0].macs
    phis = [p.phi for p in points if p.family == "compound"]
    top = max(1, math.ceil(math.log(max(config.study.budgets)) / math.log(2)))
    growth = flops_growth(config.train, check_config(config), [*range(0, top + 1), *phis], num_classes)
    log(f"matched budgets in {'measured time' if config.study.match == 'latency' else 'MACs'} "
        f"(baseline {base_macs / 1e6:.2f} MMACs at {points[0].resolution} px):")
    for p in points[1:]:
        log(f"  {p.family:<10} {p.budget:>4g}x: coefficient {p.coefficient:.4f} -> width {p.width:.3f}, "
            f"depth {p.depth:.3f}, {p.resolution} px, {p.macs / 1e6:.2f} MMACs = {p.ratio:.3f}x"
            + ("" if p.latency is None else f", {p.latency:.2f}x time"))
    rows = list(worker.work(study_, trial_plans(config, points, seeds), workdir, config.study.metric, log).values())
    summary = summarize(rows, points, config.study.metric)
    if write:
        write_outputs(workdir, config, rows, summary, growth)
    return {"points": points, "rows": rows, "summary": summary, "growth": growth}


def setup(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], Any] = print,
          storage: str | None = None, study_name: str = "scaling_study") -> tuple[Study, list[Point], int]:
    """Open the data and the study, and match every family to its budgets (measuring on this device when
    matching on time): (study, points, class count). Writes nothing but the study."""
    constants = check_config(config)
    base_cfg = trials.trial_config(config.train, BASELINE, seed=int(config.study.seeds[0]), schedule_steps=0)
    prepared = recipe.prepare(base_cfg)  # validates the train config, writes nothing
    num_classes = prepared.source.num_classes
    points = plan(config, constants, num_classes) if config.study.match == "macs" else None  # a miss writes nothing
    study_ = open_study(storage_for(storage, workdir), study_name, identity(config.train), storage or workdir)
    study_.check_data(getattr(prepared.source, "fingerprint", None), storage or workdir)
    if points is None:  # matched on time: measured here, kept in the study
        points = plan(config, constants, num_classes, latency_meter(config, prepared, study_, log))
    return study_, points, num_classes


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    exp = workers.begin(argv, "experiments.scaling_study", DEFAULT_CONFIG, check_config)
    fv, t0 = exp.flags, time.time()
    out = exp.serve(lambda log, write: study(exp.config, exp.workdir, log, fv.storage, fv.study_name, write,
                                             exp.worker),
                    prepare=(lambda log: setup(exp.config, exp.workdir, log, fv.storage, fv.study_name))
                    if exp.config.study.match == "latency" else None)
    if fv.worker:
        return out
    print(format_table(out["summary"], exp.config.study.metric))
    print(format_growth(out["growth"]))
    for v in verdicts(out["summary"]):
        print(v["sentence"])
    print(f"scaling study took {time.time() - t0:.0f} s; results in {exp.workdir}")
    return out


if __name__ == "__main__":
    main()
