"""Plan a search from a probe's measured noise and trial times: its budgets, seeds, cut and racing, or a refusal.

    noise = probe.fit_noise(probe_rows, chance, n_val)        # experiments/probe.py
    cost = probe.fit_cost(probe_rows, workers=2, mode="cooldown")
    out = planner.choose(noise, cost, cands, seconds_left=1500, limits=planner.Limits())
    print(out.table() if isinstance(out, planner.Plan) else out.line())

A plan is at most two rungs: rung 0 trains every candidate at a cheap budget of the probe's ladder with
a few seeds, the best ``keep`` grid points and the references go on to the deciding budget with more
seeds (a cooldown fork continues each rung-0 run of the same seed), and racing may add seeds there.
The chooser enumerates plans, predicts each one's wall time with the cost model (a rung's trials
longest first over the workers; rungs in sequence; racing at its 90th percentile), and, among those that
fit the time left, takes the one of highest predicted power (``experiments.power``: the probability that
the contender set holds at most half of the candidates judged, by simulation with the search's own test),
the cheapest among those within two points (or a Monte Carlo standard error) of it. It refuses, with what it would
take, when B0 is at chance at every probed budget or when no plan reaches ``Limits.min_power``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from experiments import power
from experiments.probe import CostModel, NoiseModel, makespan, resume_step


@dataclasses.dataclass(frozen=True)
class Cand:
    """A candidate as the plan sees it: ``role`` "grid" (cut at rung 0), "paper" (a judged reference) or
    "baseline" (in the seed-noise pool only); ``macs`` and ``blocks`` price its trials."""

    name: str
    macs: float
    blocks: int
    role: str = "grid"


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the chooser may choose from. ``integer_ratio``: the deciding budget a whole multiple of rung 0's
    (``search.halving_eta``); ``min_holds``: the least chance that the true best stays in the set;
    ``min_learned``: a deciding budget's B0 margin over chance, at least this share of the longest probed one's;
    ``power_tolerance``: plans this close to the best power count as good as it (the cheapest of them wins);
    ``uncertain``: simulate over the probe's uncertainty about tau and sigma (``BudgetNoise.draws``), not at its
    estimates."""

    min_power: float = 0.5
    max_seeds: int = 6
    max_rung0_seeds: int = 3
    cuts: tuple[float, ...] = (1 / 2, 1 / 3, 1 / 4)
    race: tuple[int, ...] = (0, 1, 2)
    integer_ratio: bool = True
    min_holds: float = 0.0
    min_learned: float = 0.9
    power_tolerance: float = 0.02
    uncertain: bool = False
    alpha: float = 0.05
    sims: int = 2000
    mode: str = "cooldown"
    cooldown_fraction: float = 0.2
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Spec:
    """One plan's choices: rung 0 (``low`` steps, ``low_seeds``; None: one rung), ``keep`` grid points past
    the cut, the deciding rung (``top`` steps, ``top_seeds``) and the seeds racing may add (``race``)."""

    top: int
    top_seeds: int
    low: int | None = None
    low_seeds: int = 0
    keep: int = 0
    race: int = 0

    def shape(self, cands: Sequence[Cand]) -> power.Shape:
        roles = [c.role for c in cands]
        return power.Shape(grid=roles.count("grid"), top_seeds=self.top_seeds, rung0_seeds=self.low_seeds if self.low
                           else 0, keep=self.keep, race=self.race, paper=roles.count("paper"),
                           pool=roles.count("baseline"))


@dataclasses.dataclass(frozen=True)
class Plan:
    """A chosen plan with its predictions: ``rungs`` [{rung, candidates, seeds, steps, seconds}] (racing as a
    last row), ``seconds`` in all, and ``result`` (``power.Result``: power, holds, mean set size)."""

    spec: Spec
    rungs: list[dict[str, Any]]
    seconds: float
    result: power.Result
    noise: dict[str, Any]

    @property
    def power(self) -> float:
        return self.result.power

    def table(self) -> str:
        """The plan as printed before rung 0: rung, candidates, seeds, steps, predicted minutes, and its power."""
        lines = [f"{'rung':>5} {'candidates':>10} {'seeds':>6} {'steps':>6} {'minutes':>8}"]
        for r in self.rungs:
            lines.append(f"{r['rung']!s:>5} {r['candidates']!s:>10} {r['seeds']!s:>6} {r['steps']:>6} "
                         f"{r['seconds'] / 60:>8.1f}")
        res = self.result
        lines.append(f"{'all':>5} {'':>10} {'':>6} {'':>6} {self.seconds / 60:>8.1f}")
        lines.append(f"predicted power {res.power:.2f} (the contender set holds at most {res.judged // 2} of the "
                     f"{res.judged} candidates judged; {res.sims} simulated searches, +-{res.se:.2f}); the true best "
                     f"stays in the set with {res.holds:.2f}; mean set size {res.contenders:.1f}")
        return "\n".join(lines)

    def against(self, seconds: Sequence[float], contenders: int | None) -> str:
        """Plan against actual, after the run: each rung's predicted and measured minutes (``seconds``, in the
        order of ``rungs``; fewer when the run stopped early) and the contender set's size against the mean
        the simulation predicted."""
        parts = [f"rung {r['rung']} {r['seconds'] / 60:.1f} -> {s / 60:.1f} min" for r, s in zip(self.rungs, seconds)]
        parts.append(f"all {self.seconds / 60:.1f} -> {sum(seconds) / 60:.1f} min")
        size = "none" if contenders is None else f"{contenders} of {self.result.judged}"
        return (f"plan against actual: {', '.join(parts)}; contender set {size} (predicted "
                f"{self.result.contenders:.1f} on average, at most {self.result.judged // 2} with probability "
                f"{self.power:.2f})")

    def describe(self) -> dict[str, Any]:
        """JSON-ready, for best.json."""
        return {"spec": dataclasses.asdict(self.spec), "rungs": self.rungs, "seconds": self.seconds,
                **self.result.describe(), "noise": self.noise}

    def overrides(self, seeds_from: int = 0) -> dict[str, Any]:
        """The config fields that run this plan with today's machinery (seeds numbered from ``seeds_from``);
        ``search.keep`` is the cut, which today is ceil(grid / halving_eta)."""
        s = self.spec
        top = list(range(seeds_from, seeds_from + s.top_seeds))
        out: dict[str, Any] = {"train.num_train_steps": s.low or s.top, "search.final_seeds": top,
                               "search.max_seeds": s.top_seeds + s.race if s.race else 0}
        if s.low:
            out.update({"search.strategy": "halving", "search.halving_rungs": 2, "search.halving_eta": s.top // s.low,
                        "search.seeds": top[:s.low_seeds], "search.keep": s.keep})
        else:
            out.update({"search.strategy": "exhaustive", "search.seeds": top})
        return out


@dataclasses.dataclass(frozen=True)
class Refusal:
    """No plan: ``kind`` "chance" (B0 not above chance at any probed budget), "power" (no plan reaches
    ``min_power`` in the time) or "time" (no plan fits at all); ``needs``: what it would take (steps or seconds,
    with a range from the probe's uncertainty); ``best``: the best plan that fits, if any."""

    kind: str
    reason: str
    needs: dict[str, Any]
    best: Plan | None = None

    def line(self) -> str:
        return self.reason


# ------------------------------------------------------------------------------------------------ time

def rung_seconds(spec: Spec, cands: Sequence[Cand], cost: CostModel, limits: Limits,
                 done: Iterable[tuple[str, int, int]] = (), compiled: Iterable[tuple[str, int]] = ()
                 ) -> list[dict[str, Any]]:
    """Each rung's predicted wall time (racing not included). ``done``: (candidate, seed, steps) trials the probe
    ran (free, and a later run continues them); ``compiled``: (candidate, steps) programs already compiled.
    The deciding rung is priced with the dearest ``keep`` grid points: the cut is not known yet."""
    done, compiled = set(done), set(compiled)
    runs: dict[tuple[str, int], list[int]] = {}
    for name, seed, steps in done:
        runs.setdefault((name, seed), []).append(steps)

    def times(steps: int, who: Sequence[Cand], seeds: int) -> list[float]:
        out, warm = [], set(compiled)
        for c in who:
            for seed in range(seeds):
                if (c.name, seed, steps) in done:
                    continue
                start = resume_step(steps, runs.get((c.name, seed), []), limits.mode, limits.cooldown_fraction)
                out.append(cost.trial_s(c.macs, c.blocks, steps - start, (c.name, steps) not in warm))
                warm.add((c.name, steps))
                runs.setdefault((c.name, seed), []).append(steps)
        return out

    rungs = []
    top_cands = list(cands)
    if spec.low:
        t = times(spec.low, cands, spec.low_seeds)
        rungs.append({"rung": 0, "candidates": len(cands), "seeds": spec.low_seeds, "steps": spec.low,
                      "seconds": makespan(t, cost.workers) + cost.between_rungs_s})
        grid = sorted((c for c in cands if c.role == "grid"), key=lambda c: -c.macs * 1e3 - c.blocks)
        top_cands = grid[:spec.keep] + [c for c in cands if c.role != "grid"]
    t = times(spec.top, top_cands, spec.top_seeds)
    rungs.append({"rung": len(rungs), "candidates": len(top_cands), "seeds": spec.top_seeds, "steps": spec.top,
                  "seconds": makespan(t, cost.workers) + cost.between_rungs_s})
    return rungs


def race_seconds(result: power.Result, spec: Spec, cands: Sequence[Cand], cost: CostModel, q: float = 0.9) -> float:
    """Racing's predicted wall time: its rounds' trials (each a new seed from scratch at the deciding budget, the
    dearest candidate's time) over the workers, at the ``q`` quantile of the simulated searches."""
    if not spec.race or result.race_trials.size == 0:
        return 0.0
    dear = max(cands, key=lambda c: c.macs)
    per = cost.trial_s(dear.macs, dear.blocks, spec.top, False)
    rounds = np.asarray(result.race_trials)  # (sims, rounds)
    waves = np.ceil(rounds / max(cost.workers, 1)).sum(axis=1)
    busy = (rounds > 0).sum(axis=1)
    return float(np.quantile(waves * per + busy * cost.between_rungs_s, q))


# ----------------------------------------------------------------------------------------------- choose

def specs(noise: NoiseModel, cands: Sequence[Cand], limits: Limits) -> list[Spec]:
    """Every plan the limits allow over the budgets the probe can decide at."""
    grid = sum(c.role == "grid" for c in cands)
    keeps = sorted({math.ceil(grid * f) for f in limits.cuts if 1 <= math.ceil(grid * f) < grid})
    out = []
    for top in noise.plannable(limits.min_learned):
        for n in range(2, limits.max_seeds + 1):
            for race in limits.race:
                if n + race > limits.max_seeds:
                    continue
                out.append(Spec(top, n, race=race))
                for low in noise.ladder:
                    if low >= top or (limits.integer_ratio and top % low) or noise.budgets[low].sigma is None:
                        continue
                    for n0 in range(1, min(n, limits.max_rung0_seeds) + 1):
                        out.extend(Spec(top, n, low, n0, keep, race) for keep in keeps)
    return out


def evaluate(spec: Spec, noise: NoiseModel, cands: Sequence[Cand], cost: CostModel, limits: Limits,
             done: Iterable[tuple[str, int, int]] = (), compiled: Iterable[tuple[str, int]] = (),
             taus: dict[int, float] | None = None) -> Plan:
    """One plan's predicted time and power (``taus``: {steps: spread} in place of the measured, for what-ifs)."""
    taus = taus or {}
    top = noise.budgets[spec.top]
    low = noise.budgets[spec.low] if spec.low else None
    rho = noise.rho.get((spec.low, spec.top)) if spec.low else None
    if limits.uncertain and not taus:
        top_n, low_n = top.draws(limits.sims, limits.seed + 1), low.draws(limits.sims, limits.seed + 2) if low else None
    else:
        top_n, low_n = top.noise(taus.get(spec.top)), low.noise(taus.get(spec.low)) if low else None
    res = power.simulate(spec.shape(cands), top_n, low_n, 0.0 if rho is None else rho, sims=limits.sims,
                         alpha=limits.alpha, seed=limits.seed)
    rungs = rung_seconds(spec, cands, cost, limits, done, compiled)
    if spec.race:
        rungs.append({"rung": "race", "candidates": f"<={res.judged}", "seeds": f"+{spec.race}", "steps": spec.top,
                      "seconds": race_seconds(res, spec, cands, cost)})
    info = {"tau": taus.get(spec.top, top.tau), "tau_ci": list(top.tau_ci), "sigma": top.sigma, "rho": rho,
            **({"tau_low": taus.get(spec.low, low.tau), "sigma_low": low.sigma} if low else {})}
    return Plan(spec, rungs, sum(r["seconds"] for r in rungs), res, info)


def choose(noise: NoiseModel, cost: CostModel, cands: Sequence[Cand], seconds_left: float,
           limits: Limits | None = None, done: Iterable[tuple[str, int, int]] = (),
           compiled: Iterable[tuple[str, int]] = (), explain: bool = True) -> Plan | Refusal:
    """The plan of highest predicted power that fits ``seconds_left``, or a ``Refusal`` saying what it would take.

    ``done`` / ``compiled``: the probe's trials (candidate name, seed, steps) and compiled programs (name, steps),
    which a plan reuses; ``explain`` False skips the what-ifs of a refusal (its ``needs``)."""
    limits = limits or Limits()
    done, compiled = list(done), list(compiled)
    if not any(b.learned for b in noise.budgets.values()):
        return _at_chance(noise, cands, cost)
    if not noise.plannable(limits.min_learned):
        return Refusal("chance", "error: no probed budget can decide: B0 is above chance only where fewer than two "
                       "seeds were probed", {})
    best = _best(noise, cands, cost, limits, seconds_left, done, compiled)
    if best is not None and best.power >= limits.min_power:
        return best
    needs = needed(noise, cands, cost, limits, seconds_left, done, compiled, best) if explain else {}
    if best is None:
        cheapest = min(sum(r["seconds"] for r in rung_seconds(s, cands, cost, limits, done, compiled))
                       for s in specs(noise, cands, limits))
        return Refusal("time", f"error: no plan fits the {seconds_left / 60:.0f} min left: the cheapest takes "
                       f"{cheapest / 60:.0f} min" + _needs_text(needs, limits, None), {"cheapest_seconds": cheapest,
                                                                                     **needs})
    top = noise.budgets[best.spec.top]
    text = (f"error: no plan that fits the {seconds_left / 60:.0f} min left reaches power {limits.min_power:g}: the "
            f"best ({describe(best.spec)}) has {best.power:.2f}; at {best.spec.top} steps the candidates' spread is "
            f"tau {top.tau:.4f} (95% [{top.tau_ci[0]:.4f}, {_f(top.tau_ci[1])}]) against seed noise sd {top.sigma:.4f}")
    return Refusal("power", text + _needs_text(needs, limits, best), needs, best)


def describe(spec: Spec) -> str:
    """A plan in words: 'rung 0 93 steps x 2 seeds, keep 3, 279 x 2, racing +1'."""
    head = f"rung 0 {spec.low} steps x {spec.low_seeds}, keep {spec.keep}, then " if spec.low else "one rung, "
    return head + f"{spec.top} steps x {spec.top_seeds} seeds" + (f", racing +{spec.race}" if spec.race else "")


def _best(noise: NoiseModel, cands: Sequence[Cand], cost: CostModel, limits: Limits, seconds: float,
          done: list, compiled: list, taus: dict[int, float] | None = None) -> Plan | None:
    """The plan of highest power that fits; of those within ``power_tolerance`` (or one standard error) of it, the
    cheapest. Power grows with the deciding rung's seeds, so each family of plans (everything else fixed) is
    simulated at the most seeds that fit, and then from two seeds up to the first within tolerance of that."""
    groups: dict[tuple[Any, ...], list[Spec]] = {}
    for s in specs(noise, cands, limits):
        groups.setdefault((s.top, s.low, s.low_seeds, s.keep, s.race), []).append(s)

    def priced(s: Spec) -> Plan | None:
        if sum(r["seconds"] for r in rung_seconds(s, cands, cost, limits, done, compiled)) > seconds:
            return None
        p = evaluate(s, noise, cands, cost, limits, done, compiled, taus)
        return p if p.seconds <= seconds and p.result.holds >= limits.min_holds else None

    plans = []
    for group in groups.values():
        group = sorted(group, key=lambda s: s.top_seeds)
        most = next((p for p in map(priced, reversed(group)) if p is not None), None)
        if most is None:
            continue
        plans.append(most)
        for s in group:
            if s.top_seeds >= most.spec.top_seeds:
                break
            p = priced(s)
            if p is not None and p.power >= most.power - max(most.result.se, limits.power_tolerance):
                plans.append(p)
                break
    if not plans:
        return None
    top = max(p.power for p in plans)
    near = [p for p in plans if p.power >= top - max(p.result.se, limits.power_tolerance)]
    return min(near, key=lambda p: (p.seconds, -p.power))


def needed(noise: NoiseModel, cands: Sequence[Cand], cost: CostModel, limits: Limits, seconds: float,
           done: list | None = None, compiled: list | None = None, best: Plan | None = None) -> dict[str, Any]:
    """What a plan reaching ``min_power`` would take: the least predicted time of any plan with up to 12 seeds
    (no racing) that reaches it, at the measured spread and at both ends of its 95% interval (None: none does),
    and the spread that would let ``best``'s shape reach it at its deciding budget (``separable_tau``)."""
    wide = dataclasses.replace(limits, max_seeds=max(limits.max_seeds, 12), sims=min(limits.sims, 500), race=(0,),
                               max_rung0_seeds=min(limits.max_rung0_seeds, 2))
    groups: dict[tuple[Any, ...], list[Spec]] = {}
    for s in specs(noise, cands, wide):
        groups.setdefault((s.top, s.low, s.low_seeds, s.keep), []).append(s)
    out: dict[str, Any] = {}
    for name, end in (("seconds", None), ("seconds_if_spread_low", 0), ("seconds_if_spread_high", 1)):
        taus = None if end is None else {b: n.tau_ci[end] for b, n in noise.budgets.items()}
        found = []
        for group in groups.values():  # power grows with the deciding rung's seeds: the first that reaches it
            for s in sorted(group, key=lambda s: s.top_seeds):
                p = evaluate(s, noise, cands, cost, wide, done or [], compiled or [], taus)
                if p.power >= limits.min_power:
                    found.append(p)
                    break
        quick = min(found, key=lambda p: p.seconds, default=None)
        out[name] = quick.seconds if quick else None
        out[name.replace("seconds", "plan")] = describe(quick.spec) if quick else None
    if best is not None:
        out["separable_tau"] = separable_tau(best.spec, noise, cands, limits)
    return out


def separable_tau(spec: Spec, noise: NoiseModel, cands: Sequence[Cand], limits: Limits) -> float | None:
    """The least spread of true means at ``spec``'s deciding budget that gives it ``min_power`` (bisection over
    simulated power; rung 0 keeps its measured spread). None: not even at 10 seed-noise sds."""
    top = noise.budgets[spec.top]
    low = noise.budgets[spec.low] if spec.low else None
    rho = noise.rho.get((spec.low, spec.top)) if spec.low else None

    def pw(tau: float) -> float:
        return power.simulate(spec.shape(cands), top.noise(tau), low.noise() if low else None, rho or 0.0,
                              sims=500, alpha=limits.alpha, seed=limits.seed).power

    lo, hi = 0.0, 10 * (top.sigma or 0.0)
    if hi <= 0 or pw(hi) < limits.min_power:
        return None
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if pw(mid) >= limits.min_power else (mid, hi)
    return hi


def _needs_text(needs: dict[str, Any], limits: Limits, best: Plan | None) -> str:
    mid, lo, hi = needs.get("seconds"), needs.get("seconds_if_spread_low"), needs.get("seconds_if_spread_high")
    if not needs:
        return ""
    if mid is not None:
        text = (f"; power {limits.min_power:g} would take about {_min(mid)} ({needs['plan']}; {_min(hi)} to "
                f"{_min(lo)} across the spread's 95% interval)")
    else:
        text = (f"; at the measured spread the candidates are within seed noise at every budget the probe reached: no "
                f"plan with up to 12 seeds reaches power {limits.min_power:g}"
                + (f" (it would take {_min(hi)} if the spread were at the top of its interval)" if hi else ""))
    tau = needs.get("separable_tau")
    if tau is not None and best is not None:
        text += (f"; what would separate them: a spread of true means of at least {tau:.4f} at {best.spec.top} steps "
                 f"(a longer budget, candidates further apart), or less seed noise (a larger validation split)")
    return text


def _min(s: float | None) -> str:
    return "no plan within the limits" if s is None else f"{s / 60:.0f} min"


def _f(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) else "inf"


def _at_chance(noise: NoiseModel, cands: Sequence[Cand], cost: CostModel) -> Refusal:
    """B0 at chance at every probed budget: the budget where it would clear chance by two binomial standard errors,
    extrapolated from its scores' log-linear growth over the ladder (the slope +- one standard error gives the
    range)."""
    pts = [(b, n.chance["mean"]) for b, n in sorted(noise.budgets.items()) if n.chance.get("mean") is not None]
    need = noise.chance + 2 * math.sqrt(noise.chance * (1 - noise.chance) / max(noise.n_val, 1))
    base = next((c for c in cands if c.role == "baseline"), cands[0] if cands else None)
    needs: dict[str, Any] = {"target": need, "steps": None, "steps_range": None}
    text = ""
    if len(pts) >= 2:
        x, y = np.log([b for b, _ in pts]), np.array([m for _, m in pts])
        slope, icpt = np.polyfit(x, y, 1)
        resid = y - (icpt + slope * x)
        se = math.sqrt(max(float((resid ** 2).sum()) / max(len(x) - 2, 1), 1e-12) / float(((x - x.mean()) ** 2).sum()))

        def at(b: float) -> float | None:
            if b <= 0:
                return None
            log_steps = x.mean() + (need - y.mean()) / b
            return float(math.exp(log_steps)) if log_steps < 40 else None  # a flat slope: no bound in sight

        mid, fast, slow = at(slope), at(slope + se), at(slope - se)
        needs.update(steps=mid, steps_range=[fast, slow])
        if mid is None:
            text = ("; its score does not grow with the budget over the ladder "
                    f"({', '.join(f'{m:.3f} at {b}' for b, m in pts)}): check the labels and the learning rate")
        elif base is not None:
            secs = cost.trial_s(base.macs, base.blocks, int(mid), True)
            needs["seconds_per_trial"] = secs
            text = (f"; extrapolated from its scores over the ladder it would need about {mid:,.0f} steps "
                    f"({_steps(fast)} to {_steps(slow)}), about {secs / 60:.0f} min for each trial at that budget here")
    ladder = "/".join(str(b) for b in noise.ladder)
    return Refusal("chance", f"error: unscaled B0 is not above chance {noise.chance:.3f} at any probed budget "
                   f"({ladder} steps){text}", needs)


def _steps(s: float | None) -> str:
    return "no bound" if s is None else f"{s:,.0f}"
