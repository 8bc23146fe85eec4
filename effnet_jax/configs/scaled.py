"""A model scaled by the formula from constants (a grid search's best.json) and phi.

    python -m effnet_jax.train --config=effnet_jax/configs/scaled.py \
        --config.model.constants=runs/grid/best.json --config.model.phi=2 --workdir=runs/phi2
"""

import ml_collections

from effnet_jax.configs import default


def get_config(dataset: str = "imagenet2012") -> ml_collections.ConfigDict:
    c = default.get_config()
    c.model.name = "formula"
    c.model.phi = 1.0
    c.data.name = dataset
    return c
