"""How a search spends its trials: a proposer picks rung 0's candidates, a schedule the rungs after.

``search.sampler`` names the proposer (one of ``PROPOSERS``): ``Grid`` trains every candidate the
constraint admits (the paper's method); the ``OnTheSurface`` ones let an Optuna sampler propose
``search.n_trials`` points on the surface alpha*beta^2*gamma^2 = target (the references are trained as
planned). ``search.strategy`` names the schedule (one of ``SCHEDULES``): ``Halving`` (synchronous successive
halving: the best 1/eta of a rung's grid points, rounded up, and the references go on eta times longer) or
``Exhaustive`` (one rung); ``search.rung_mode`` how a rung is scored (one of ``RUNG_MODES``). A new one is
one class here and one line in its registry; ``check_search`` is where the whole search section is checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import ml_collections

from effnet_jax.errors import UserError
from experiments import stats, trials
from experiments.constraints import candidates, constraint_for
from experiments.trials import Candidate

if TYPE_CHECKING:
    from experiments.analysis import CandidateSummary

Rows = dict[Any, dict[str, Any]]


class FirstRung(Protocol):
    """What a proposer may do with the study at rung 0 (the search driver provides it)."""

    def plan(self, cands: Sequence[Candidate]) -> list[Any]:
        """Rung 0's trials of ``cands``: every rung-0 seed, longest first."""

    def plan_one(self, c: Candidate) -> Any:
        """One rung-0 trial of ``c`` with the first seed."""

    def train(self, plans: Sequence[Any]) -> Rows:
        """Train the plans (shared with every worker on the study); {key: row}."""

    def train_sampled(self, n_trials: int, propose: Callable[[Any], Any]) -> list[dict[str, Any]]:
        """``n_trials`` trials that ``propose(optuna_trial)`` turns into plans (None: infeasible); their rows."""


# ------------------------------------------------------------------- proposers

class Proposer:
    """Where rung 0's candidates come from."""

    name: ClassVar[str]
    on_surface: ClassVar[bool] = False  # True: it proposes points on alpha*beta^2*gamma^2 = target only

    def __init__(self, search: ml_collections.ConfigDict) -> None:
        self.search = search

    def check(self) -> None:
        """A UserError for a bad field of the search section this proposer reads."""

    def sampler(self) -> Any:
        """The Optuna sampler the study is opened with (None: Optuna's default, unused)."""
        return None

    def first_rung(self, cands: Sequence[Candidate], rung: FirstRung) -> tuple[list[Candidate], Rows]:
        """Train rung 0; returns the candidates it trained and their rows."""
        raise NotImplementedError


class Grid(Proposer):
    """Every candidate the constraint admits, and the references."""

    name = "grid"

    def first_rung(self, cands: Sequence[Candidate], rung: FirstRung) -> tuple[list[Candidate], Rows]:
        return list(cands), rung.train(rung.plan(cands))


class OnTheSurface(Proposer):
    """``search.n_trials`` points an Optuna sampler proposes on alpha*beta^2*gamma^2 = target.

    The sampler chooses alpha and u in [0, 1]; beta is u of the way through the betas that keep
    gamma = sqrt(target / (alpha * beta^2)) inside the gamma range, so every proposal satisfies
    the formula exactly (rounded to 3 decimals) and none is wasted off the surface. An alpha with
    no feasible beta is pruned untrained. The references are trained as planned trials.
    """

    on_surface = True

    def check(self) -> None:
        s = self.search
        if isinstance(s.n_trials, bool) or not isinstance(s.n_trials, int) or s.n_trials < 1:
            raise UserError(f"search.n_trials must be a positive integer with search.sampler={self.name}, "
                            f"got {s.n_trials!r}")
        if not constraint_for(s).surface:
            anywhere = " or ".join(sorted(n for n, p in PROPOSERS.items() if not p.on_surface))
            raise UserError(f"search.constraint={s.constraint} works with search.sampler={anywhere} (search.sampler="
                            f"{self.name} proposes points on the formula's surface)")

    def point(self, trial: Any) -> Candidate | None:
        """The candidate an Optuna trial's (alpha, u) stands for; None where no beta is feasible."""
        s = self.search
        a = trial.suggest_float("alpha", float(s.alpha[0]), float(s.alpha[1]))
        u = trial.suggest_float("u", 0.0, 1.0)
        lo = max(float(s.beta[0]), math.sqrt(s.target / (a * float(s.gamma[1]) ** 2)))
        hi = min(float(s.beta[1]), math.sqrt(s.target / (a * float(s.gamma[0]) ** 2)))
        if lo > hi:
            return None
        b = lo + u * (hi - lo)
        return Candidate(round(a, 3), round(b, 3), round(math.sqrt(s.target / (a * b * b)), 3))

    def first_rung(self, cands: Sequence[Candidate], rung: FirstRung) -> tuple[list[Candidate], Rows]:
        refs = [c for c in cands if c.label]
        rows = rung.train(rung.plan(refs))

        def propose(trial: Any) -> Any:
            c = self.point(trial)
            return None if c is None else rung.plan_one(c)

        sampled = rung.train_sampled(self.search.n_trials, propose)
        rows.update({r["trial_id"]: r for r in sampled})
        return refs + list(dict.fromkeys(Candidate(r["alpha"], r["beta"], r["gamma"]) for r in sampled)), rows


class Tpe(OnTheSurface):
    """Optuna's TPE: a third of the trials (at least 2) at random, then model-based."""

    name = "tpe"

    def sampler(self) -> Any:
        import optuna

        # unseeded: workers sharing the study must not propose the same startup points
        return optuna.samplers.TPESampler(n_startup_trials=max(2, self.search.n_trials // 3))


class Random(OnTheSurface):
    """Uniform in (alpha, u): the baseline a model-based sampler has to beat."""

    name = "random"

    def sampler(self) -> Any:
        import optuna

        return optuna.samplers.RandomSampler()  # unseeded, as TPE's startup


PROPOSERS: dict[str, type[Proposer]] = {p.name: p for p in (Grid, Tpe, Random)}


# ------------------------------------------------------------------- schedules

class Schedule:
    """How many rungs, each one's budget, and who goes on to the next."""

    name: ClassVar[str]

    def __init__(self, search: ml_collections.ConfigDict) -> None:
        self.search = search

    def check(self) -> None:
        """A UserError for a bad field of the search section this schedule reads."""

    def rung_steps(self, base: int) -> list[int]:
        """Training steps of each rung, from the trial budget ``base``."""
        raise NotImplementedError

    def survivors(self, summary: Sequence[CandidateSummary], alive: Sequence[Candidate], rung: int
                  ) -> list[Candidate]:
        """The candidates of ``alive`` that go on from rung ``rung`` (summary: one entry per candidate)."""
        raise NotImplementedError


class Exhaustive(Schedule):
    """One rung: every candidate at the full budget."""

    name = "exhaustive"

    def rung_steps(self, base: int) -> list[int]:
        return [base]

    def survivors(self, summary: Sequence[CandidateSummary], alive: Sequence[Candidate], rung: int
                  ) -> list[Candidate]:
        return list(alive)


class Halving(Schedule):
    """Synchronous successive halving: ``halving_rungs`` rungs, each ``halving_eta`` times longer."""

    name = "halving"

    def check(self) -> None:
        s = self.search
        for field, low in (("halving_eta", 2), ("halving_rungs", 1)):
            v = s[field]
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise UserError(f"search.{field} must be an integer >= {low}, got {v!r}")

    def rung_steps(self, base: int) -> list[int]:
        return [base * self.search.halving_eta**r for r in range(self.search.halving_rungs)]

    def survivors(self, summary: Sequence[CandidateSummary], alive: Sequence[Candidate], rung: int
                  ) -> list[Candidate]:
        """The best ``search.keep`` of rung ``rung``'s grid points (0: the best 1/eta, rounded up: where a cheap
        rung is limited by seed noise, the candidate just past the cut is about as good as the one on it), plus
        the references."""
        ranked = [s for s in summary if s.rung == rung and s.mean is not None and not s.label]
        n = self.search.get("keep", 0) or math.ceil(len(ranked) / self.search.halving_eta)
        keep = {(s.alpha, s.beta, s.gamma) for s in ranked[:n]}
        return [c for c in alive if c.label or (c.alpha, c.beta, c.gamma) in keep]


SCHEDULES: dict[str, type[Schedule]] = {s.name: s for s in (Halving, Exhaustive)}


# ------------------------------------------------------------------- rung modes

class RungMode:
    """How a run at one budget of a ladder (halving's rungs, the fidelity study's budgets) is scored, and what
    a longer run of the same candidate and seed starts from. ``tag`` keeps each mode's trials (keys and
    directories) apart in one study: the mode is no part of the trial identity."""

    name: ClassVar[str]
    tag: ClassVar[str]

    def __init__(self, search: ml_collections.ConfigDict) -> None:
        self.search = search

    def check(self) -> None:
        """A UserError for a bad field of the search section this mode reads."""

    def config(self, train: ml_collections.ConfigDict, c: Candidate, phi: float, seed: int, steps: Sequence[int],
               rung: int) -> ml_collections.ConfigDict:
        """The trainer config of ``c``'s run at budget ``steps[rung]``."""
        return trials.trial_config(train, c, phi, seed=seed, steps=steps[rung], schedule_steps=0,
                                   metric=self.search.metric)

    def key(self, c: Candidate, seed: int, steps: Sequence[int], rung: int) -> str:
        return f"{c.key}-s{seed}-n{steps[rung]}{self.tag}"

    def directory(self, c: Candidate, seed: int, steps: Sequence[int], rung: int) -> str:
        """One per (candidate, seed) where a longer run continues a shorter one's checkpoint."""
        return f"{c.key}-s{seed}{self.tag}"

    def keeps(self, steps: Sequence[int], rung: int) -> bool:
        """Whether the run's checkpoints stay for a longer run to continue."""
        return rung < len(steps) - 1


class Continued(RungMode):
    """Every run's learning-rate schedule spans the largest budget: a shorter budget's score is a snapshot of
    the long run part-way (at a high learning rate), and a longer run continues its checkpoint."""

    name, tag = "continued", ""  # the keys of searches from before the modes

    def config(self, train: ml_collections.ConfigDict, c: Candidate, phi: float, seed: int, steps: Sequence[int],
               rung: int) -> ml_collections.ConfigDict:
        return trials.trial_config(train, c, phi, seed=seed, steps=steps[rung],
                                   schedule_steps=steps[-1] if len(steps) > 1 else 0, metric=self.search.metric)


class Cooldown(RungMode):
    """Warmup-stable-decay (Hagele et al. 2024): a constant learning rate, and each budget's score from a run
    that decays to zero over its last ``search.cooldown_fraction``; a longer run continues from the state
    before that cooldown (the trainer's stable checkpoint), so only the cooldowns are trained twice."""

    name, tag = "cooldown", "-cd"

    def check(self) -> None:
        f = self.search.cooldown_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
            raise UserError(f"search.cooldown_fraction must be in (0, 1) with search.rung_mode={self.name}, "
                            f"got {f!r}")

    def config(self, train: ml_collections.ConfigDict, c: Candidate, phi: float, seed: int, steps: Sequence[int],
               rung: int) -> ml_collections.ConfigDict:
        cfg = super().config(train, c, phi, seed, steps, rung)
        cfg.optimizer.schedule, cfg.optimizer.cooldown_fraction = "wsd", float(self.search.cooldown_fraction)
        return cfg


class Independent(RungMode):
    """Every budget its own full schedule from scratch, in its own directory: an exhaustive search's short
    trial, at the cost of training every budget whole. The top budget's run is then the continued mode's top
    run (one full schedule over the largest budget, from scratch or continued bit-equal): the same trial, so a
    study that has one mode's top rung does not train it again for the other."""

    name, tag = "independent", "-own"

    def _top(self, steps: Sequence[int], rung: int) -> bool:
        return rung == len(steps) - 1

    def config(self, train: ml_collections.ConfigDict, c: Candidate, phi: float, seed: int, steps: Sequence[int],
               rung: int) -> ml_collections.ConfigDict:
        if self._top(steps, rung):
            return Continued(self.search).config(train, c, phi, seed, steps, rung)
        return super().config(train, c, phi, seed, steps, rung)

    def key(self, c: Candidate, seed: int, steps: Sequence[int], rung: int) -> str:
        if self._top(steps, rung):
            return Continued(self.search).key(c, seed, steps, rung)
        return super().key(c, seed, steps, rung)

    def directory(self, c: Candidate, seed: int, steps: Sequence[int], rung: int) -> str:
        if self._top(steps, rung):
            return Continued(self.search).directory(c, seed, steps, rung)
        return self.key(c, seed, steps, rung)

    def keeps(self, steps: Sequence[int], rung: int) -> bool:
        return False


RUNG_MODES: dict[str, type[RungMode]] = {m.name: m for m in (Continued, Cooldown, Independent)}


# ------------------------------------------------------------------- the check

def proposer_for(search: ml_collections.ConfigDict) -> Proposer:
    return trials.choose(PROPOSERS, search.sampler, "search.sampler")(search)


def schedule_for(search: ml_collections.ConfigDict) -> Schedule:
    return trials.choose(SCHEDULES, search.strategy, "search.strategy")(search)


def rung_mode_for(search: ml_collections.ConfigDict, name: str | None = None, field: str = "search.rung_mode"
                  ) -> RungMode:
    """The rung mode ``name`` (default ``search.rung_mode``), checked."""
    mode = trials.choose(RUNG_MODES, search.rung_mode if name is None else name, field)(search)
    mode.check()
    return mode


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_grid(s: ml_collections.ConfigDict) -> None:
    """The grid's fields, their types and ranges, before anything reads them (a scalar where a range belongs
    is one error line, not an IndexError)."""
    for field in ("alpha", "beta", "gamma"):
        v = s[field]
        if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(map(_number, v)) and 1 <= v[0] <= v[1]):
            raise UserError(f"search.{field} must be a range (lo, hi) of two numbers with 1 <= lo <= hi, got {v!r}")
    for field in ("step", "target", "phi"):
        if not (_number(s[field]) and s[field] > 0):
            raise UserError(f"search.{field} must be a number > 0, got {s[field]!r}")
    for field in ("include_paper", "include_baseline", "measure_latency", "require_learning"):
        if not isinstance(s.get(field, True), bool):
            raise UserError(f"search.{field} must be True or False, got {s[field]!r}")


def check_search(config: ml_collections.ConfigDict) -> None:
    """Validate the whole search section before the first trial (and before the data is opened): the one
    place every search field's type, range and name is checked, the registries' classes each checking the
    fields they read (``check``)."""
    s = config.search
    _check_grid(s)
    schedule_for(s).check()
    rung_mode_for(s)
    trials.check_metric(s.metric, "search.metric")
    trials.check_seeds(s.seeds, "search.seeds")
    trials.check_seeds(s.final_seeds, "search.final_seeds", empty_ok=True)
    top = len(s.final_seeds) or len(s.seeds)
    if isinstance(s.max_seeds, bool) or not isinstance(s.max_seeds, int) or (s.max_seeds != 0 and s.max_seeds < top):
        raise UserError(f"search.max_seeds must be 0 (no racing) or at least the top rung's {top} seeds "
                        f"(search.final_seeds, else search.seeds), got {s.max_seeds!r}")
    if s.get("test", stats.POOLED) not in stats.TESTS:
        raise UserError(f"search.test must be {' or '.join(stats.TESTS)}, got {s.test!r}")
    if not (isinstance(s.alpha_level, float) and 0 < s.alpha_level < 1):
        raise UserError(f"search.alpha_level must be in (0, 1), got {s.alpha_level!r}")
    keep = s.get("keep", 0)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise UserError(f"search.keep must be an integer >= 0 (0: the best 1/halving_eta), got {keep!r}")
    _check_budget(s)
    constraint = constraint_for(s)
    constraint.check()
    if constraint.meter() is not None or s.measure_latency:
        r = s.latency_rounds
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise UserError(f"search.latency_rounds must be an integer >= 1, got {r!r}")
    proposer_for(s).check()
    if config.train.model.resolution > 0:
        raise UserError("train.model.resolution must be 0 (each trial's resolution is base_resolution * gamma)")
    if not constraint.needs_network:
        candidates(s)  # an empty grid fails here; a measured cost needs the class count, known once the data is open


def _check_budget(s: ml_collections.ConfigDict) -> None:
    """The time-budget fields: a duration (or ""), a power in (0, 1), a bool."""
    from experiments.planned import seconds_of

    seconds_of(s.get("time_budget", ""))
    p = s.get("min_power", 0.5)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
        raise UserError(f"search.min_power must be in (0, 1), got {p!r}")
    if not isinstance(s.get("accept_underpowered", False), bool):
        raise UserError(f"search.accept_underpowered must be True or False, got {s.accept_underpowered!r}")
