"""python -m experiments.fidelity --config=experiments/configs/fidelity.py:fashion_mnist

Result (cooldown mode, budgets 3x and 9x, seeds 0-2; 2-core Xeon, 2026-12-07): seeds rank the preset's 10 candidates
alike at 279 steps (ceiling tau 0.70 [0.40, 0.93]) and its 93-step rung is limited by seed noise, not by the proxy
(tau 0.60); on digits even 240 steps rank nothing (ceiling -0.15) (docs/results/fidelity.md).

The fidelity study's default: the grid search's candidates at 1x, 3x and 9x its trial budget.

    python -m experiments.fidelity                     # this config, on the grid search's default
    python -m experiments.fidelity --config.fidelity.mode=independent

``train`` and ``search`` are those of a grid-search config (experiments/configs/grid_search.py, or
the preset named after the colon): the same candidates, the same trial recipe; the study trains
every candidate at each budget. With ``fashion_mnist`` the trial budget is a third of the preset's
rung 0, so 3x is its rung 0 (94 steps) and 9x its top rung (282 steps): the study measures whether
the preset's cheap rung ranks all of its candidates as its deciding budget does.
"""

import ml_collections

from experiments.configs import fashion_mnist, grid_search

PRESETS = {"grid_search": grid_search, "fashion_mnist": fashion_mnist}


def get_config(preset: str = "grid_search") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown fidelity preset {preset!r}: {' or '.join(PRESETS)}")
    c = PRESETS[preset].get_config()
    c.fidelity = f = ml_collections.ConfigDict()
    f.budgets = (1, 3, 9)  # multiples of the trial budget (train.num_epochs / num_train_steps)
    # how each budget is scored: one of experiments.strategies.RUNG_MODES (each class's docstring says how)
    f.mode = "continued"
    f.seeds = (0,)
    if preset == "fashion_mnist":
        c.train.num_train_steps = 31
    return c
