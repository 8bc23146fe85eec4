"""ImageNet with the paper's recipe for an official model.

    python -m effnet_jax.train --config=effnet_jax/configs/imagenet.py:b3 --workdir=runs/b3
"""

import ml_collections

from effnet_jax.configs import default


def get_config(model: str = "b0") -> ml_collections.ConfigDict:
    c = default.get_config()
    c.model.name = model
    c.data.name = "imagenet2012"
    c.data.randaugment_layers = 2
    c.data.randaugment_magnitude = 10 if model in ("b0", "b1", "b2", "b3", "b4") else 15
    c.batch_size = 4096  # TPU v3-32 scale; lr scales with it (0.016 per 256)
    c.num_epochs = 350.0
    return c
