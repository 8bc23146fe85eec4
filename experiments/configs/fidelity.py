"""The fidelity study's default: the grid search's candidates at 1x, 3x and 9x its trial budget.

    python -m experiments.fidelity                     # this config
    python -m experiments.fidelity --config.fidelity.mode=independent

``train`` and ``search`` are the grid search's (experiments/configs/grid_search.py): the same
candidates, the same trial recipe; the study trains every candidate at each budget.
"""

import ml_collections

from experiments.configs import grid_search


def get_config() -> ml_collections.ConfigDict:
    c = grid_search.get_config()
    c.fidelity = f = ml_collections.ConfigDict()
    f.budgets = (1, 3, 9)  # multiples of the trial budget (train.num_epochs / num_train_steps)
    f.mode = "continued"  # or "independent" (every budget its own full learning-rate schedule)
    f.seeds = (0,)
    return c
