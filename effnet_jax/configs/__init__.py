"""Plain-Python ml_collections configs: each file has get_config(arg).

``to_steps`` is the one rule that turns a config's durations into steps: a field in steps wins
when it is positive, else the one in epochs counts (``num_train_steps`` / ``num_epochs``,
``eval_every_steps`` / one epoch, ``warmup_epochs``, ``decay_epochs``).
"""

from __future__ import annotations

import math
from collections.abc import Callable


def to_steps(steps: float, epochs: float, steps_per_epoch: int,
             rounding: Callable[[float], int] = math.ceil) -> int:
    """``steps`` when > 0, else ``epochs`` x ``steps_per_epoch`` rounded by ``rounding`` (up: a run
    trains at least what it asks for; the schedule's warmup and decay round down, as TF's code)."""
    return int(steps) if steps and steps > 0 else int(rounding(float(epochs) * steps_per_epoch))
