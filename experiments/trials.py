"""The words every experiment uses for its trials, defined once.

A trial is B0 scaled by a ``Candidate`` (alpha, beta, gamma) at some phi, trained by the one
trainer with a seed and a step budget: ``trial_config`` turns those into the trainer config,
``network`` / ``figures`` say what that config builds and what it costs (the same config path
the trainer takes, so the numbers are the trained network's). The checks of the fields every
experiment shares (seeds, the metric, a name from a registry) and the default workdir live here
too, so that no experiment imports another.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

from effnet_jax.configs import to_steps
from effnet_jax.errors import UserError
from effnet_jax.model import cost, scaling
from effnet_jax.model.arch import Architecture
from effnet_jax.model.scaling import PAPER_CONSTANTS

METRICS = ("val_top1", "ema_val_top1", "val_top5", "ema_val_top5")  # what the trainer's result scores


@dataclasses.dataclass(frozen=True)
class Candidate:
    """Scaling constants to try; ``label`` marks the references ("paper", "baseline") among grid points."""

    alpha: float
    beta: float
    gamma: float
    label: str = ""

    @property
    def product(self) -> float:
        """alpha * beta**2 * gamma**2: the FLOPs multiplier per unit of phi that the paper's rule constrains."""
        return self.alpha * self.beta**2 * self.gamma**2

    @property
    def name(self) -> str:
        """'(1.2, 1.1, 1.15) (paper)': how tables, verdicts and plots name the candidate."""
        tag = {"paper": " (paper)", "baseline": " (baseline)"}.get(self.label, "")
        return f"({self.alpha:g}, {self.beta:g}, {self.gamma:g}){tag}"

    @property
    def key(self) -> str:
        """A name for directories and trial keys; the baseline (trained at phi = 0) is marked apart."""
        return f"a{self.alpha:.3f}-b{self.beta:.3f}-g{self.gamma:.3f}" + ("-phi0" if self.label == "baseline" else "")


PAPER = Candidate(**PAPER_CONSTANTS, label="paper")
BASELINE = Candidate(1.0, 1.0, 1.0, label="baseline")  # unscaled B0: trained at phi = 0


def candidate_name(entry: Mapping[str, Any]) -> str:
    """A row's candidate's ``Candidate.name``."""
    return Candidate(entry["alpha"], entry["beta"], entry["gamma"], entry["label"]).name


def candidate_attrs(c: Candidate) -> dict[str, Any]:
    """The candidate's fields as a trial records them (results.csv, the study's user attrs)."""
    return {"label": c.label, "alpha": c.alpha, "beta": c.beta, "gamma": c.gamma, "product": c.product}


def trial_config(train_config: ml_collections.ConfigDict, c: Candidate, phi: float = 1.0, *,
                 seed: int | None = None, steps: int = 0, schedule_steps: int | None = None,
                 metric: str | None = None) -> ml_collections.ConfigDict:
    """The trainer config that trains B0 scaled by ``c`` at ``phi`` (the baseline at phi = 0).

    The constants go in by value (``model.name = "formula"``), the resolution from
    ``base_resolution * gamma**phi``. ``seed`` / ``steps`` / ``schedule_steps`` replace the train
    config's when given (``steps = 0`` keeps its budget); a ``schedule_steps`` longer than the
    budget stretches the learning-rate schedule, so a longer run continues a shorter one. A ``metric``
    the trial is ranked on that is not an EMA score skips evaluating the EMA weights (half the evaluation).
    """
    cfg = copy.deepcopy(train_config)
    cfg.unlock()
    m = cfg.model
    m.name, m.constants, m.resolution = "formula", "", 0
    m.alpha, m.beta, m.gamma = c.alpha, c.beta, c.gamma
    m.phi = 0.0 if c.label == "baseline" else float(phi)
    if seed is not None:
        cfg.seed = int(seed)
    if steps:
        cfg.num_train_steps = int(steps)
    if schedule_steps is not None:
        cfg.schedule_steps = int(schedule_steps)
    if metric is not None:
        cfg.eval_ema = metric.startswith("ema_")
    return cfg


def network(train_config: ml_collections.ConfigDict, c: Candidate, phi: float = 1.0
            ) -> tuple[scaling.ScalingSpec, Architecture]:
    """The spec and the rounded architecture that a trial of ``c`` at ``phi`` trains."""
    cfg = trial_config(train_config, c, phi)
    spec = scaling.model_spec(cfg.model)
    return spec, scaling.build_architecture(spec, scaling.network(cfg.model), cfg.model.drop_path_rate)


def network_key(train_config: ml_collections.ConfigDict, c: Candidate, phi: float = 1.0) -> str:
    """A short name of the rounded network a trial of ``c`` at ``phi`` trains: what measured times are kept by."""
    spec, arch = network(train_config, c, phi)
    return network_name(arch, spec.resolution)


def network_name(arch: Architecture, resolution: int) -> str:
    return hashlib.sha1(repr((arch, resolution)).encode()).hexdigest()[:12]


def figures(train_config: ml_collections.ConfigDict, c: Candidate, phi: float, num_classes: int) -> dict[str, Any]:
    """Width, depth, resolution, blocks, params and MACs of the network a trial of ``c`` trains."""
    return cost.figures(*network(train_config, c, phi), num_classes)


def check_trials(configs: Iterable[tuple[str, ml_collections.ConfigDict]], steps_per_epoch: int) -> None:
    """Every planned trial's schedule is valid (``recipe.check_schedule``) before any trains: a budget whose
    cooldown falls inside the warmup, say, is one error line naming the trial, not a failure mid-run."""
    from effnet_jax.training import recipe

    for name, cfg in configs:
        try:
            recipe.check_schedule(cfg, steps_per_epoch)
        except UserError as e:
            raise UserError(f"trial {name}: train.{e}") from None


def budget_steps(train_config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """The trial budget in steps: ``num_train_steps``, else ``num_epochs`` of the training split."""
    return max(1, to_steps(train_config.num_train_steps, train_config.num_epochs, steps_per_epoch))


def check_seeds(seeds: Iterable[Any], field: str, empty_ok: bool = False) -> list[int]:
    """The seeds as ints; a UserError naming ``field`` unless they are distinct integers (and some, by default)."""
    values = list(seeds) if isinstance(seeds, (tuple, list)) else None  # a scalar: no iterating it
    if values is None or any(isinstance(x, bool) or not isinstance(x, int) for x in values) \
            or len(set(values)) != len(values) or not (values or empty_ok):
        some = "a tuple of " if empty_ok else "a non-empty tuple of "
        raise UserError(f"{field} must be {some}distinct integers, got {seeds if values is None else tuple(values)!r}")
    return [int(x) for x in values]


def check_metric(metric: str, field: str) -> None:
    """A UserError naming ``field`` unless ``metric`` is a score the trainer reports."""
    if metric not in METRICS:
        raise UserError(f"{field} must be one of {', '.join(METRICS)}, got {metric!r}")


def choose(registry: Mapping[str, Any], name: str, field: str) -> Any:
    """``registry[name]``; a UserError naming ``field`` and the registered names otherwise."""
    if name not in registry:
        names = sorted(registry)
        either = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        raise UserError(f"{field} must be {either}, got {name!r}")
    return registry[name]


def default_workdir(experiment: str) -> str:
    """runs/<experiment>-<YYYYmmdd-HHMMSS>: a fresh workdir when --workdir is not given."""
    return os.path.join("runs", f"{experiment}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
