"""Power of a planned search, by simulating it many times with the search's own decision rules, vectorised.

A simulated search draws every candidate's true mean score at the cheap and at the deciding budget
(normal, spread ``tau``, correlated ``rho`` across the two budgets), draws scores from the two-way
candidate + seed model that ``experiments.stats`` fits (a seed effect shared by every candidate, a
residual per run), and then decides as ``experiments.grid_search`` does:

* the cut (``strategies.Halving.survivors``): the best ``keep`` grid points by their mean at rung 0
  go on, the references always do;
* the verdicts (``grid_search.judge`` -> ``stats.verdicts`` with the pooled test): the seed noise is the
  residual mean square of the two-way model over every candidate at the deciding rung on the seeds they
  all share (``stats.fit_seed_model``); the winner is the judged candidate with the highest mean over its
  own seeds; a candidate is "below" when its seed-paired difference from the winner has p < alpha
  (``stats.compare_pooled``); the contender set is every judged candidate not below;
* racing (``grid_search.race`` / ``contenders``): while two or more judged candidates are not separated
  from the leader, each of them gets one more seed.

``contenders`` is that decision on given score arrays, so tests check it against the real functions
draw by draw; ``simulate`` wraps it in the draws. 2,000 searches of ten candidates take well under a
second: everything is numpy over the simulated searches at once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Noise:
    """The two-way model at one budget: candidate spread ``tau``, residual sd (what a seed-paired difference
    sees) and the seed effect's sd (shared by every candidate: it cancels from every comparison). Each may be
    an array of one value per simulated search (the probe's uncertainty about them, ``probe.BudgetNoise.draws``)."""

    tau: float | np.ndarray
    sigma: float | np.ndarray
    seed_sd: float | np.ndarray = 0.0

    def col(self, name: str) -> np.ndarray:
        """The field as a (sims or 1, 1) column: one value per simulated search."""
        return np.asarray(getattr(self, name), dtype=float).reshape(-1, 1)


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the simulation needs of a plan. Candidates: ``grid`` grid points (cut at rung 0), ``paper``
    judged references (always go on) and ``pool`` references only in the seed-noise pool (unscaled B0: it
    does not satisfy the constraint, so it is not judged). ``rung0_seeds`` 0: one rung, no cut."""

    grid: int
    top_seeds: int
    rung0_seeds: int = 0
    keep: int = 0  # grid points that go on past rung 0 (ignored with one rung)
    race: int = 0  # seeds racing may add at the deciding rung
    paper: int = 1
    pool: int = 1

    @property
    def judged(self) -> int:
        """Candidates the verdicts are over: the grid points at the deciding rung and the judged references."""
        return (self.keep if self.rung0_seeds else self.grid) + self.paper


@dataclasses.dataclass(frozen=True)
class Result:
    """``power``: P(contender set <= half the judged candidates); ``holds``: P(the true best of every candidate
    (within ``tie``) is in the set); ``contenders``: the mean set size; ``race_trials``: racing's trials per
    simulated search and round (sims, rounds), whose quantiles size the time racing may take; ``se``: the
    power's Monte Carlo standard error."""

    power: float
    holds: float
    contenders: float
    judged: int
    race_trials: np.ndarray
    se: float
    sims: int

    def describe(self) -> dict[str, Any]:
        return {"power": self.power, "holds": self.holds, "mean_contenders": self.contenders, "judged": self.judged,
                "race_trials_p90": float(np.quantile(self.race_trials.sum(axis=1), 0.9)) if self.race_trials.size
                else 0.0,
                "power_se": self.se, "sims": self.sims}


def t_crit(dof: np.ndarray | float, alpha: float) -> np.ndarray:
    """Two-sided critical t: p < alpha <=> |t| > t_crit (dof <= 0: infinite, nothing can be separated)."""
    from scipy import stats as st

    dof = np.asarray(dof, dtype=float)
    with np.errstate(invalid="ignore"):
        out = st.t.ppf(1 - alpha / 2, np.where(dof > 0, dof, 1.0))
    return np.where(dof > 0, out, np.inf)


def _residual_var(y: np.ndarray, has: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``stats.fit_seed_model``'s residual variance and dof per simulated search: the two-way model over every
    candidate on the seeds that all of them have. y, has: (sims, candidates, seeds)."""
    shared = has.all(axis=1)  # (sims, seeds)
    k, m = y.shape[1], shared.sum(axis=1)
    w = shared[:, None, :].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        rows = (y * w).sum(axis=2, keepdims=True) / np.maximum(m, 1)[:, None, None]
        cols = y.mean(axis=1, keepdims=True)
        grand = (cols[:, 0, :] * shared).sum(axis=1) / np.maximum(m, 1)
        resid = (y - rows - cols + grand[:, None, None]) * w
        dof = (k - 1) * (m - 1)
        var = (resid ** 2).sum(axis=(1, 2)) / np.where(dof > 0, dof, 1)
    return np.where(dof > 0, var, np.nan), dof


def verdicts(y: np.ndarray, has: np.ndarray, judged: np.ndarray, alpha: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pooled test's verdicts per simulated search: (winner index, separated from the winner, below it).

    y, has: (sims, candidates, seeds) scores and which exist; judged: (candidates,) or (sims, candidates).
    The winner is the judged candidate with the best mean over its own seeds (``grid_search.pick_best``);
    every judged candidate is compared with it paired over the seeds both have (``stats.compare_pooled``)."""
    sims, k, _ = y.shape
    judged = np.broadcast_to(judged, (sims, k))
    n = has.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, (y * has).sum(axis=2) / np.maximum(n, 1), -np.inf)
    winner = np.where(judged, mean, -np.inf).argmax(axis=1)
    idx = np.arange(sims)
    var, dof = _residual_var(y, has)
    yw, hw = y[idx, winner][:, None, :], has[idx, winner][:, None, :]
    both = has & hw
    nb = both.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = ((yw - y) * both).sum(axis=2) / nb
        t = diff / np.sqrt(var[:, None] * 2 / nb)
    sep = judged & (nb > 0) & (np.abs(t) > t_crit(dof, alpha)[:, None]) & np.isfinite(t)
    sep[idx, winner] = False
    return winner, sep, sep & (diff > 0)


def contenders(y: np.ndarray, has: np.ndarray, judged: np.ndarray, alpha: float, race: int = 0
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The deciding rung with racing: (contender mask, has after racing, racing trials per search and round).

    ``has[..., :s]`` are the deciding rung's seeds; the last ``race`` seed columns are filled in one per
    round for the judged candidates not separated from the leader, while there are two or more of them
    (``grid_search.race``)."""
    has = has.copy()
    top = has.shape[2] - race
    trials = np.zeros((y.shape[0], race), dtype=int)
    for r in range(race):
        _, sep, _ = verdicts(y, has, judged, alpha)
        racing = np.broadcast_to(judged, sep.shape) & ~sep
        go = racing.sum(axis=1) >= 2
        has[:, :, top + r] |= racing & go[:, None]
        trials[:, r] = np.where(go, racing.sum(axis=1), 0)
    _, _, below = verdicts(y, has, judged, alpha)
    return np.broadcast_to(judged, below.shape) & ~below, has, trials


@dataclasses.dataclass(frozen=True)
class Draws:
    """One batch of simulated searches: true means at the deciding budget ``mu`` (sims, candidates), rung 0's
    scores ``y0`` (sims, candidates, rung-0 seeds; None with one rung) and the deciding rung's ``y`` (sims,
    candidates, top seeds + racing seeds) for every candidate, cut or not. Candidates in order: the grid
    points, the judged references, the pool-only references."""

    mu: np.ndarray
    y0: np.ndarray | None
    y: np.ndarray


def draw(shape: Shape, top: Noise, low: Noise | None = None, rho: float = 1.0, sims: int = 2000, seed: int = 0
         ) -> Draws:
    """``sims`` searches' truths and scores under the model. Seeded: common random numbers across plans, so
    that two plans compare on the same draws."""
    rng = np.random.default_rng(seed)
    nc = shape.grid + shape.paper + shape.pool
    z1, z0 = rng.standard_normal((sims, nc)), rng.standard_normal((sims, nc))
    mu = top.col("tau") * z1
    y0 = None
    if shape.rung0_seeds:
        if low is None:
            raise ValueError("a two-rung plan needs rung 0's noise")
        r = float(np.clip(rho, -1.0, 1.0))
        mu0 = low.col("tau") * (r * z1 + math.sqrt(1 - r * r) * z0)
        y0 = (mu0[:, :, None] + low.col("seed_sd")[:, :, None] * rng.standard_normal((sims, 1, shape.rung0_seeds))
              + low.col("sigma")[:, :, None] * rng.standard_normal((sims, nc, shape.rung0_seeds)))
    seeds = shape.top_seeds + shape.race
    y = (mu[:, :, None] + top.col("seed_sd")[:, :, None] * rng.standard_normal((sims, 1, seeds))
         + top.col("sigma")[:, :, None] * rng.standard_normal((sims, nc, seeds)))
    return Draws(mu, y0, y)


def survivors(shape: Shape, d: Draws) -> np.ndarray:
    """Indices (sims, alive) of the candidates at the deciding rung: the best ``keep`` grid points by their
    rung-0 mean (``strategies.Halving.survivors``) and every reference; everyone with one rung."""
    nc = d.mu.shape[1]
    sims = d.mu.shape[0]
    if d.y0 is None:
        return np.broadcast_to(np.arange(nc), (sims, nc))
    order = np.argsort(-d.y0[:, :shape.grid].mean(axis=2), axis=1, kind="stable")[:, :shape.keep]
    return np.concatenate([np.sort(order, axis=1), np.broadcast_to(np.arange(shape.grid, nc),
                                                                    (sims, nc - shape.grid))], axis=1)


def decide(shape: Shape, d: Draws, alpha: float = 0.05, tie: float = 0.0) -> Result:
    """The search's decisions on the draws: the cut, the verdicts, racing; what came out of them."""
    if shape.top_seeds < 2:
        raise ValueError("the deciding rung needs two or more seeds: with one the pooled test separates nothing")
    alive = survivors(shape, d)
    y = np.take_along_axis(d.y, alive[:, :, None], axis=1)
    mu_a = np.take_along_axis(d.mu, alive, axis=1)
    has = np.zeros(y.shape, dtype=bool)
    has[:, :, :shape.top_seeds] = True
    judged = alive < shape.grid + shape.paper
    chosen, _, race_trials = contenders(y, has, judged, alpha, shape.race)
    count = chosen.sum(axis=1)
    power = count <= shape.judged / 2
    eligible = np.arange(d.mu.shape[1]) < shape.grid + shape.paper  # grid and paper: what pick_best may pick
    best = np.where(eligible, d.mu, -np.inf).max(axis=1)
    holds = (chosen & (mu_a >= best[:, None] - tie)).any(axis=1)
    p, sims = float(power.mean()), len(count)
    return Result(p, float(holds.mean()), float(count.mean()), shape.judged, race_trials,
                  math.sqrt(max(p * (1 - p), 1e-12) / sims), sims)


def simulate(shape: Shape, top: Noise, low: Noise | None = None, rho: float = 1.0, sims: int = 2000,
             alpha: float = 0.05, seed: int = 0, tie: float = 0.0) -> Result:
    """``sims`` searches of ``shape`` under the model (``low``: rung 0's noise; ``rho``: the correlation of the
    candidates' true means between rung 0's budget and the deciding one), decided as the search decides."""
    return decide(shape, draw(shape, top, low, rho, sims, seed), alpha, tie)
