"""Measured cost on the device at hand: a network's train-step or inference time relative to another's.

FLOPs and MACs do not predict the time of memory-bound depthwise convolutions and squeeze-excite,
so a search that must respect a budget on *this* hardware measures it: every network is built as
the trainer builds it (``programs.build_program``, one fixed synthetic batch), compiled once, then
timed in rounds that visit every network in turn (interleaved: noise from other work on the machine
hits all of them alike), and each network's time is the median over rounds. The spread is the
relative interquartile range of its per-round ratio to the reference, which is what a tolerance
on the ratio has to cover.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from effnet_jax.provenance import cpu_model

KINDS = ("train", "infer")


@dataclasses.dataclass(frozen=True)
class Cost:
    """One network's measured cost against the reference: the median ratio and its spread."""

    ratio: float  # median over rounds of (this network's step time / the reference's, same round)
    spread: float  # interquartile range of those ratios, relative to the median
    seconds: float  # median seconds per step

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def device_key() -> str:
    """What measured times belong to: the backend, device kind and count, and on a CPU its model and cores."""
    d = jax.devices()[0]
    key = f"{jax.default_backend()}:{d.device_kind}x{jax.device_count()}"
    if jax.default_backend() == "cpu":
        key += f":{cpu_model()}:{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}"
    return key


def step_runner(config: ml_collections.ConfigDict, num_classes: int, kind: str, steps_per_epoch: int = 1000
                ) -> Callable[[int], None]:
    """``run(n)``: n train steps (the trainer's own jitted, state-donating step) or n inference steps (its
    evaluation step) of ``config``'s network on one synthetic batch, waiting for the device.

    Built with the run's length (``num_train_steps``) and ``steps_per_epoch`` as the trainer builds it, the
    program is the trial's own, so the persistent compilation cache hands the trial this compile.
    """
    from effnet_jax.configs import to_steps
    from effnet_jax.model import scaling
    from effnet_jax.training import programs, recipe

    if kind not in KINDS:
        raise ValueError(f"latency kind must be one of {', '.join(KINDS)}, got {kind!r}")
    spec = scaling.model_spec(config.model)
    total = max(1, to_steps(config.num_train_steps, config.num_epochs, steps_per_epoch))
    program = programs.build_program(config, spec, num_classes, layers=recipe.model_layers(config),
                                     dtype=scaling.compute_dtype(config.model.dtype), steps_per_epoch=steps_per_epoch,
                                     total_steps=total)
    rng = np.random.default_rng(0)
    n = config.batch_size
    batch = {"image": jnp.asarray(rng.normal(size=(n, spec.resolution, spec.resolution, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, num_classes, n), jnp.int32), "mask": jnp.ones(n, jnp.float32)}
    batch = jax.device_put(batch, program.data_sharding)
    state = [program.state]

    def run(steps: int) -> None:
        out: Any = None
        for _ in range(steps):
            if kind == "train":
                state[0], out = program.train_step(state[0], {"image": batch["image"], "label": batch["label"]})
            else:
                out = program.eval_step(state[0].weights, batch)
        jax.block_until_ready(out)

    run(1)  # compile (or load from the persistent cache) and warm up
    return run


def interleaved(runs: Mapping[str, Callable[[int], None]], reference: str, rounds: int = 5, steps: int = 2
                ) -> dict[str, Cost]:
    """Time every run ``rounds`` times, visiting all of them in each round; costs relative to ``reference``."""
    per_round: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run(steps)
            per_round[name].append((time.perf_counter() - t0) / steps)
    out = {}
    for name, times in per_round.items():
        ratios = sorted(t / r for t, r in zip(times, per_round[reference]))
        median = statistics.median(ratios)
        q1, q3 = np.percentile(ratios, [25, 75])
        out[name] = Cost(ratio=float(median), spread=float((q3 - q1) / median), seconds=statistics.median(times))
    return out


def measure(configs: Mapping[str, ml_collections.ConfigDict], num_classes: int, reference: str,
            kinds: tuple[str, ...] = KINDS, rounds: int = 5, steps: int = 2,
            log: Callable[[str], Any] = lambda m: None, steps_per_epoch: int = 1000, group: int = 6
            ) -> dict[str, dict[str, dict[str, float]]]:
    """{name: {kind: Cost as a dict}} for every trainer config in ``configs``, against ``configs[reference]``.

    Networks are timed ``group`` at a time beside the reference (each ratio is taken within one round, so
    groups need not share a round) and each group's programs are released before the next is built: a
    grid's worth of compiled programs at once exhausts host memory (LLVM's section allocator fails first).
    """
    if reference not in configs:
        raise ValueError(f"reference {reference!r} is not among the networks to time")
    others = [name for name in configs if name != reference]
    groups = [others[i:i + max(1, group)] for i in range(0, len(others), max(1, group))] or [[]]
    out: dict[str, dict[str, dict[str, float]]] = {name: {} for name in configs}
    for kind in kinds:
        reference_costs = []
        for members in groups:
            runs = {}
            for name in [reference, *members]:
                t0 = time.perf_counter()
                runs[name] = step_runner(configs[name], num_classes, kind, steps_per_epoch)
                log(f"latency: built {kind} step of {name} in {time.perf_counter() - t0:.1f} s")
            costs = interleaved(runs, reference, rounds, steps)
            del runs
            gc.collect()
            reference_costs.append(costs.pop(reference))
            for name, cost in costs.items():
                out[name][kind] = cost.as_dict()
        seconds = statistics.median(c.seconds for c in reference_costs)
        out[reference][kind] = Cost(ratio=1.0, spread=0.0, seconds=seconds).as_dict()
    return out
