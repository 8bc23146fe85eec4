"""Which scaling constants a search may pick: the grid, and the constraint as an object.

A constraint says what a candidate costs and which costs it admits. ``formula`` is the
paper's rule, |alpha*beta^2*gamma^2 - target| <= tolerance; ``macs`` measures the rounded
network instead: its MACs over unscaled B0's within ``macs_tolerance`` (relative) of
target**phi. At small inputs rounding makes the two disagree (4-6x instead of 2x at 32 px),
which is why the second exists. A new constraint is one ``Constraint`` subclass and one line
in ``CONSTRAINTS``; ``search.constraint`` names it. The constraint also costs the trained candidates
(``trained_cost``): the search's summary carries that cost, and the winner is admitted by it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import ml_collections

from effnet_jax.errors import UserError
from effnet_jax.model import cost
from experiments import trials
from experiments.trials import BASELINE, PAPER, Candidate

if TYPE_CHECKING:
    from experiments.analysis import CandidateSummary

EPS = 1e-9  # float drift of a product or a ratio computed from rounded grid values


def grid_values(bounds: Sequence[float], step: float) -> list[float]:
    """Inclusive grid lo, lo + step, ..., hi (rounded to kill float drift)."""
    lo, hi = float(bounds[0]), float(bounds[1])
    if lo < 1 or hi < lo or step <= 0:
        raise UserError(f"a range must satisfy 1 <= lo <= hi with step > 0, got ({lo}, {hi}) step {step}")
    n = int(math.floor((hi - lo) / step + 1e-9))
    return [round(lo + i * step, 6) for i in range(n + 1)]


def grid_points(search: ml_collections.ConfigDict) -> list[Candidate]:
    """Every (alpha, beta, gamma) of the search's ranges on its step, alpha slowest."""
    points = [Candidate(a, b, g) for a in grid_values(search.alpha, search.step)
              for b in grid_values(search.beta, search.step) for g in grid_values(search.gamma, search.step)]
    if not points:
        raise UserError("the search ranges hold no grid point")
    return points


class Constraint:
    """What a candidate costs (``cost``), which costs are allowed (``admits``), and which candidates
    are the same trial (``twin``). Built from the search section; ``train_config`` and
    ``num_classes`` are there for constraints that measure the network (``needs_network``)."""

    name: ClassVar[str]
    abbrev: ClassVar[str] = "?"  # its letter in tables of which constraints admit a network (latency_table)
    title: ClassVar[str] = ""  # what it constrains, in a few words (tables' notes)
    needs_network: ClassVar[bool] = False  # True: cost() builds the network, so candidates wait for the data
    surface: ClassVar[bool] = False  # True: it admits the surface alpha*beta^2*gamma^2 = target, all that the
    # sampling proposers (strategies.OnTheSurface) propose on

    def __init__(self, search: ml_collections.ConfigDict, train_config: ml_collections.ConfigDict | None = None,
                 num_classes: int | None = None) -> None:
        self.search, self.train_config, self.num_classes = search, train_config, num_classes

    def check(self) -> None:
        """A UserError for a bad field of the search section this constraint reads."""

    def to_measure(self, points: Sequence[Candidate]) -> list[Candidate]:
        """Candidates whose networks must be timed on this device before ``admit`` (one per network)."""
        return []

    def meter(self) -> MeasuredLatency | None:
        """What must time networks on this device before ``admit`` (``to_measure``'s): the constraint itself
        where its cost is a measured time, else None."""
        return None

    def cost(self, c: Candidate) -> float:
        raise NotImplementedError

    def trained_cost(self, c: Candidate) -> float | None:
        """The cost of a trained candidate, as the search's summary carries it for choosing the winner
        (None: not known)."""
        return self.cost(c)

    def admits(self, cost: float) -> bool:
        raise NotImplementedError

    def twin(self, c: Candidate) -> Hashable:
        """Candidates with one twin are one trial (the one whose product is closest to the target)."""
        return Candidate(c.alpha, c.beta, c.gamma).key

    def refusal(self, closest: Candidate, cost: float) -> str:
        """Why no grid point is admitted, naming the closest one."""
        raise NotImplementedError

    def describe(self, cands: Sequence[Candidate]) -> str | None:
        """A line for the log about what the constraint kept, or None."""
        return None

    def warnings(self, summary: Sequence[CandidateSummary]) -> list[str]:
        """Lines for the end of a search about how the trained networks sit against the constraint."""
        return []

    def admit(self, points: Sequence[Candidate]) -> list[Candidate]:
        """The admitted points, one per twin, in grid order; a UserError naming the closest if none is."""
        costs = [(c, self.cost(c)) for c in points]
        groups: dict[Hashable, list[Candidate]] = {}
        for c, value in costs:
            if self.admits(value):
                groups.setdefault(self.twin(c), []).append(c)
        if not groups:
            c, value = min(costs, key=lambda cv: self.distance(cv[1]))
            raise UserError(self.refusal(c, value))
        return [min(group, key=lambda c: abs(c.product - self.search.target)) for group in groups.values()]

    def distance(self, cost: float) -> float:
        """How far a cost is from the constraint's aim (for naming the closest point)."""
        raise NotImplementedError

    def satisfies(self, entry: CandidateSummary) -> bool:
        """Whether a summary entry may win: not the baseline, and its cost (``trained_cost``) admitted."""
        return entry.label != "baseline" and entry.cost is not None and self.admits(entry.cost)


class Formula(Constraint):
    """The paper's rule: alpha*beta^2*gamma^2 within ``tolerance`` of ``target``."""

    name, abbrev, title = "formula", "F", "formula"
    surface = True

    def check(self) -> None:
        tol = self.search.tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
            raise UserError(f"search.tolerance must be a number >= 0, got {tol!r}")

    def cost(self, c: Candidate) -> float:
        return c.product

    def admits(self, cost: float) -> bool:
        return abs(cost - self.search.target) <= self.search.tolerance + EPS

    def distance(self, cost: float) -> float:
        return abs(cost - self.search.target)

    def refusal(self, closest: Candidate, cost: float) -> str:
        s = self.search
        return (f"no candidate satisfies |alpha*beta^2*gamma^2 - {s.target}| <= {s.tolerance}; the closest is "
                f"alpha={closest.alpha}, beta={closest.beta}, gamma={closest.gamma} (product {cost:.4f}): widen the "
                "ranges or the tolerance")

    def warnings(self, summary: Sequence[CandidateSummary]) -> list[str]:
        """One line when rounding makes the real networks' MACs disagree with alpha*beta^2*gamma^2."""
        s = self.search
        off = [e for e in summary if e.label != "baseline" and e.macs_ratio is not None
               and abs(e.macs_ratio - e.product) > max(s.tolerance, 0.1 * e.product)]
        if not off:
            return []
        ratios = [e.macs_ratio for e in off]
        return [f"{len(off)} candidates' rounded networks cost {min(ratios):.2f}-{max(ratios):.2f}x the baseline's "
                f"MACs where alpha*beta^2*gamma^2 says ~{s.target:g}x (column xMACs): at this base resolution the "
                "constraint does not hold in real cost (search.constraint=macs constrains the real networks)"]


class RealMacs(Constraint):
    """The rounded network's MACs over unscaled B0's within ``macs_tolerance`` (relative) of target**phi.

    The classifier is part of the cost, so this needs the trial config and the class count;
    grid points that round to one network are one candidate.
    """

    name, abbrev, title = "macs", "M", "real MACs"
    needs_network = True

    def __init__(self, search: ml_collections.ConfigDict, train_config: ml_collections.ConfigDict | None = None,
                 num_classes: int | None = None) -> None:
        super().__init__(search, train_config, num_classes)
        self.goal = search.target**search.phi
        self._networks: dict[Candidate, Hashable] = {}
        self._base: int | None = None

    def check(self) -> None:
        tol = self.search.macs_tolerance
        if not (isinstance(tol, float) and 0 < tol < 1):
            raise UserError(f"search.macs_tolerance must be in (0, 1) (relative), got {tol!r}")

    def _network(self, c: Candidate) -> tuple[Any, int]:
        if self.train_config is None or self.num_classes is None:
            raise ValueError("search.constraint = 'macs' needs the trial config and the class count")
        if c not in self._networks:
            spec, arch = trials.network(self.train_config, c, self.search.phi)
            self._networks[c] = (arch, spec.resolution)
        return self._networks[c]

    def _macs(self, c: Candidate) -> int:
        return cost.count_macs(*self._network(c), self.num_classes)

    def cost(self, c: Candidate) -> float:
        if self._base is None:
            self._base = self._macs(BASELINE)
        return self._macs(c) / self._base

    tolerance: ClassVar[str] = "macs_tolerance"  # the search field bounding |cost / goal - 1|

    def admits(self, cost: float) -> bool:
        return abs(cost / self.goal - 1) <= self.search[self.tolerance] + EPS

    def distance(self, cost: float) -> float:
        return abs(cost - self.goal)

    def twin(self, c: Candidate) -> Hashable:
        return self._network(c)

    def what(self) -> str:
        """The cost this constraint compares, as its messages name it."""
        return "real MACs"

    def remedy(self) -> str:
        return "widen the ranges or search.macs_tolerance, or change train.model.base_resolution"

    def refusal(self, closest: Candidate, cost: float) -> str:
        return (f"no grid point's rounded network costs {self.goal:g}x the baseline's {self.what()} within "
                f"{self.search[self.tolerance]:.0%}; the closest is alpha={closest.alpha}, beta={closest.beta}, "
                f"gamma={closest.gamma} at {cost:.2f}x: {self.remedy()}")

    def describe(self, cands: Sequence[Candidate]) -> str | None:
        return (f"constraint on {self.what()}: {sum(not c.label for c in cands)} distinct networks (and the "
                f"references) within {self.search[self.tolerance]:.0%} of {self.goal:g}x the baseline's at "
                f"{self.train_config.model.base_resolution} px")


class MeasuredLatency(RealMacs):
    """The rounded network's measured step time over unscaled B0's (``search.latency_kind``: train or infer)
    within ``latency_tolerance`` (relative) of target**phi, on the device the search runs on.

    Each network is compiled to be timed, so only those whose MACs lie within ``latency_window``
    (relative) of the goal are measured; ``measurements`` ({network key: {kind: cost}}, see
    ``effnet_jax.training.latency``) is filled by the search from its study before ``admit``.
    """

    name, abbrev, title = "latency", "L", "measured time (t / i: train / inference)"
    tolerance = "latency_tolerance"

    def __init__(self, search: ml_collections.ConfigDict, train_config: ml_collections.ConfigDict | None = None,
                 num_classes: int | None = None) -> None:
        super().__init__(search, train_config, num_classes)
        self.measurements: dict[str, dict[str, dict[str, float]]] = {}

    def check(self) -> None:
        from effnet_jax.training.latency import KINDS

        s = self.search
        if s.latency_kind not in KINDS:
            raise UserError(f"search.latency_kind must be {' or '.join(KINDS)}, got {s.latency_kind!r}")
        if not (isinstance(s.latency_tolerance, float) and s.latency_tolerance > 0):
            raise UserError(f"search.latency_tolerance must be > 0 (relative), got {s.latency_tolerance!r}")
        if not (isinstance(s.latency_window, float) and 0 < s.latency_window < 1):
            raise UserError(f"search.latency_window must be in (0, 1) (relative), got {s.latency_window!r}")

    def meter(self) -> MeasuredLatency:
        return self

    def network_key(self, c: Candidate) -> str:
        return trials.network_name(*self._network(c))

    def to_measure(self, points: Sequence[Candidate]) -> list[Candidate]:
        window = [c for c in points if abs(RealMacs.cost(self, c) / self.goal - 1) <= self.search.latency_window]
        refs = [PAPER] if self.search.include_paper else []
        return self.one_per_network([BASELINE, *window, *refs])

    def one_per_network(self, points: Sequence[Candidate]) -> list[Candidate]:
        """The first of ``points`` for each distinct rounded network (the others would time the same program)."""
        return list({self.network_key(c): c for c in points}.values())

    def cost(self, c: Candidate) -> float:
        measured = self.measurements.get(self.network_key(c))
        if measured is None:
            raise ValueError(f"{c.key}'s network was not measured")
        return measured[self.search.latency_kind]["ratio"]

    def admit(self, points: Sequence[Candidate]) -> list[Candidate]:
        measured = [c for c in points if self.network_key(c) in self.measurements]
        if not measured:
            raise UserError(f"no grid point's network costs within {self.search.latency_window:.0%} of {self.goal:g}x "
                            "the baseline's MACs, so none was measured: widen search.latency_window or the ranges")
        return super().admit(measured)

    def trained_cost(self, c: Candidate) -> float | None:
        measured = self.measurements.get(self.network_key(c))
        return None if measured is None else measured[self.search.latency_kind]["ratio"]

    def what(self) -> str:
        return f"measured {self.search.latency_kind} time"

    def remedy(self) -> str:
        return "widen search.latency_tolerance or search.latency_window, or the ranges"


CONSTRAINTS: dict[str, type[Constraint]] = {c.name: c for c in (Formula, RealMacs, MeasuredLatency)}


def constraint_for(search: ml_collections.ConfigDict, train_config: ml_collections.ConfigDict | None = None,
                   num_classes: int | None = None) -> Constraint:
    """The constraint ``search.constraint`` names (a UserError for an unknown name)."""
    return trials.choose(CONSTRAINTS, search.constraint, "search.constraint")(search, train_config, num_classes)


def candidates(search: ml_collections.ConfigDict, train_config: ml_collections.ConfigDict | None = None,
               num_classes: int | None = None, constraint: Constraint | None = None) -> list[Candidate]:
    """The grid points the constraint admits, then the labelled references.

    The paper's point stands for the grid point it is a twin of (the same point, or with
    ``macs`` the same rounded network); unscaled B0 comes last.
    """
    constraint = constraint or constraint_for(search, train_config, num_classes)
    kept = constraint.admit(grid_points(search))
    if search.include_paper:
        twin = constraint.twin(PAPER)
        kept = [c for c in kept if constraint.twin(c) != twin] + [PAPER]
    if search.include_baseline:
        kept.append(BASELINE)
    return kept
