"""What a grid search's trials say: one typed summary per candidate, the winner, the verdicts, and how far
the cheap rungs and the seeds can be trusted. Pure functions of the trials' rows (no training, no files),
so the search, racing and the tests all judge the same way.

A row is one trial's result dict (the runner's, one per line of results.csv); ``summarize`` folds them into
``CandidateSummary`` entries, one per candidate at the highest rung it reached. Each entry carries its cost
as the search's constraint computes it (``Constraint.trained_cost``), which is what ``pick_best`` and
``judge`` admit: a new constraint adds no field here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections

from effnet_jax.model import cost as cost_model
from experiments import stats
from experiments.constraints import Constraint, constraint_for
from experiments.trials import Candidate

CONTENDER_WORDS = ("best", "tied with best", "above best")  # judge's verdicts of the contender set
SEPARATED = ("below", "above best")  # judge's verdicts of a candidate separated from the leader


@dataclasses.dataclass
class CandidateSummary:
    """One candidate at the highest rung it reached: its seeds' scores, interval, figures and cost.

    ``cost`` is the search's constraint's (``Constraint.trained_cost``), None where none was given or it is
    not known; ``macs_ratio`` (MACs over unscaled B0's) and the latencies are what the table and best.json show.
    """

    label: str
    alpha: float
    beta: float
    gamma: float
    product: float
    rung: int = 0
    seeds: int = 0  # trials at that rung
    ok: int = 0  # of which finished with a score
    status: str = "ok"
    values: list[float] = dataclasses.field(default_factory=list)  # the finished trials' scores, by seed
    seed_ids: list[Any] = dataclasses.field(default_factory=list)
    mean: float | None = None
    std: float | None = None
    half: float | None = None  # 95% interval half-width
    width: float | None = None  # cost.FIGURES, from the first finished trial
    depth: float | None = None
    resolution: int | None = None
    blocks: int | None = None
    params: int | None = None
    macs: int | None = None
    macs_ratio: float | None = None
    wall_time_s: float = 0.0  # every trial of the candidate at that rung
    train_img_per_s: float | None = None
    latency_train: float | None = None
    latency_infer: float | None = None
    cost: float | None = None

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.alpha, self.beta, self.gamma, self.label)

    @property
    def name(self) -> str:
        """How tables, verdicts and plots name the candidate (``trials.candidate_name``)."""
        return self.candidate.name

    def paired_seeds(self) -> list[Any]:
        """The seed of each of ``values`` (positions where unknown): what the pooled test pairs by."""
        return list(self.seed_ids or range(len(self.values)))


def _group_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return r["alpha"], r["beta"], r["gamma"], r["label"]


def seed_models(rows: Sequence[dict[str, Any]], metric: str) -> dict[int, stats.SeedModel]:
    """{rung: the seed noise over every candidate's finished trials at that rung} (the pooled test's)."""
    groups: dict[int, dict[tuple[Any, ...], dict[Any, float]]] = {}
    for r in rows:
        if r["status"] == "ok" and r.get(metric) is not None:
            by = groups.setdefault(r["rung"], {}).setdefault(_group_key(r), {})
            by[r.get("seed", len(by))] = r[metric]
    return {rung: stats.fit_seed_model(list(g.values())) for rung, g in groups.items()}


def summarize(rows: Sequence[dict[str, Any]], metric: str, base_macs: int | None = None,
              num_eval: int | None = None, test: str = stats.POOLED, constraint: Constraint | None = None
              ) -> list[CandidateSummary]:
    """One entry per candidate at the highest rung it reached: mean, 95% interval, MACs / baseline, and
    ``constraint``'s cost of it; best first.

    ``test``: ``pooled`` intervals use the seed noise of every candidate at that rung (``stats.interval``
    with ``seed_models``); ``welch`` each candidate's own seeds plus the validation sample's binomial error.
    """
    by_cand: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        by_cand.setdefault(_group_key(r), []).append(r)
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
        entry = CandidateSummary(
            label=first["label"], alpha=first["alpha"], beta=first["beta"], gamma=first["gamma"],
            product=first["product"], rung=top, seeds=len(group), ok=len(ok),
            status="ok" if ok else group[0]["status"], values=values,
            seed_ids=[r.get("seed", i) for i, r in enumerate(ok)],
            mean=ci.get("mean"), std=ci.get("std"), half=ci.get("half"),
            **{k: first.get(k) for k in cost_model.FIGURES},
            macs_ratio=(first["macs"] / base_macs) if base_macs and first.get("macs") else None,
            wall_time_s=sum(r.get("wall_time_s") or 0.0 for r in group),
            train_img_per_s=first.get("train_img_per_s"),
            latency_train=first.get("latency_train"), latency_infer=first.get("latency_infer"))
        if constraint is not None:
            entry.cost = constraint.trained_cost(entry.candidate)
        out.append(entry)
    return sorted(out, key=lambda s: (-s.rung, s.mean is None, -(s.mean or 0.0), s.macs or 0))


def pick_best(summary: Sequence[CandidateSummary], search: ml_collections.ConfigDict) -> CandidateSummary | None:
    """The best constraint-satisfying candidate of the highest rung; ties go to fewer MACs.

    Each entry's ``cost`` is the constraint's own; admitting it needs only the search's settings.
    """
    constraint = constraint_for(search)
    top = max((s.rung for s in summary), default=0)
    eligible = [s for s in summary if s.mean is not None and s.rung == top and constraint.satisfies(s)]
    if not eligible:
        return None
    return max(eligible, key=lambda s: (s.mean, -(s.macs or 0)))


def judge(summary: Sequence[CandidateSummary], best: CandidateSummary | None, search: ml_collections.ConfigDict
          ) -> dict[str, Any]:
    """Verdicts at the top rung: each candidate against the winner (``search.test``), and the contender set.

    The pooled test's seed noise comes from every candidate at the top rung (the baseline too), as the
    intervals' does; ``contender_set`` lists the winner and every candidate not separated from it.
    """
    constraint = constraint_for(search)
    top = max((s.rung for s in summary), default=0)
    pool = [s for s in summary if s.rung == top and s.mean is not None
            and (s is best or s.label == "paper" or constraint.satisfies(s))]
    test = search.get("test", stats.POOLED)
    if best is None or not pool:
        return {"verdicts": {}, "contenders": [], "contender_set": [], "test": stats.TESTS[test],
                "sentence": "no constraint-satisfying candidate finished: nothing to judge"}
    ranked = [best] + [s for s in pool if s is not best]
    everyone = [dict(zip(s.paired_seeds(), s.values)) for s in summary if s.rung == top and s.values]
    out = stats.verdicts([{"key": s.name, "values": s.values, "seeds": s.paired_seeds()} for s in ranked],
                         alpha=search.alpha_level, test=test, pool=everyone,
                         reference=next((s.name for s in pool if s.label == "paper"), None))
    chosen = set(out["contenders"])
    out["contender_set"] = [{"alpha": s.alpha, "beta": s.beta, "gamma": s.gamma, "label": s.label, "mean": s.mean}
                            for s in ranked if s.name in chosen]
    out["seeds"] = sorted({x for s in ranked for x in s.paired_seeds()}, key=str)
    cut = [s for s in summary if s.rung < top and s.mean is not None
           and (s.label == "paper" or constraint.satisfies(s))]
    out["cut"] = len(cut)
    if cut:  # two runs with other seeds can promote other candidates: the set cannot speak for these
        out["sentence"] += (f" The set is drawn from the {len(pool)} candidates at the deciding rung; {len(cut)} "
                            "others were cut at a cheaper rung and are not judged in it.")
    return out


def contenders(summary: Sequence[CandidateSummary], search: ml_collections.ConfigDict, alive: Sequence[Candidate]
               ) -> list[Candidate]:
    """The candidates of ``alive`` that racing gives one more seed: the leader and every candidate ``judge``
    does not separate from it; none once nothing is tied with the leader."""
    verdicts = judge(summary, pick_best(summary, search), search)["verdicts"]
    racing = {name for name, v in verdicts.items() if v not in SEPARATED}
    if len(racing) < 2:
        return []
    return [c for c in alive if c.name in racing]


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
    # on digits the fidelity study measured a longer budget not to help (docs/results/fidelity.md): name the
    # preset that does
    remedy = ("use a preset whose candidates differ by more than seed noise (--config=experiments/configs/"
              "fashion_mnist.py): on digits' 360 validation images even 240 steps do not rank them "
              "(docs/results/fidelity.md)"
              if dataset == "digits" else
              "raise the top rung's budget (train.num_train_steps or search.halving_eta) or its seeds")
    proxies = [{"name": f"rung {a['rung']}", "tau": a["kendall_tau"], "ci": a.get("kendall_ci")} for a in agreement]
    return stats.limit_line(proxies, ceiling, budget, remedy)


def learning_check(summary: Sequence[CandidateSummary], rows: Sequence[dict[str, Any]], chance: float | None,
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
    tests = {e.name: (e, stats.above_chance(e.values, chance, num_eval, models.get(e.rung), s.alpha_level))
             for e in summary if e.values}
    out["above"] = {k: t["above"] for k, (_, t) in tests.items()}
    base = next(((k, e, t) for k, (e, t) in tests.items() if e.label == "baseline"), None)
    others = [(k, e, t) for k, (e, t) in tests.items() if e.label != "baseline"]
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


def training_share(rows: Sequence[dict[str, Any]], t0: float = 0.0) -> float | None:
    """Share of the trials' wall time spent in timed training steps (the rest: compile, eval, data, saves): the
    trainer's ``timings.train_s``, the steps this trial ran. (``steps`` is where a run ended, so a trial that
    continued another's checkpoint would count the steps it did not train.)"""
    train_s = sum(r["timings"]["train_s"] for r in rows
                  if isinstance(r.get("timings"), dict) and isinstance(r["timings"].get("train_s"), (int, float)))
    wall = sum(r.get("wall_time_s") or 0.0 for r in rows)
    return train_s / wall if wall > 0 and train_s > 0 else None
