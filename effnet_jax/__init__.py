"""effnet_jax: EfficientNet compound scaling in JAX / Flax NNX.

The core (model, scaling, cost, training step) imports without TensorFlow;
only the tfds input path imports it, lazily.
"""

from effnet_jax import signals  # noqa: F401  first: a command line records Ctrl-C / SIGTERM from here on
from effnet_jax.errors import UserError
from effnet_jax.model.arch import B0, Architecture, BlockSpec, NetworkSpec, StageSpec
from effnet_jax.model.cost import count_macs, count_params
from effnet_jax.model.efficientnet import EfficientNet, create_model, eval_view, train_view
from effnet_jax.model.scaling import (
    OFFICIAL,
    PAPER_CONSTANTS,
    ScalingSpec,
    build_architecture,
    from_constants,
    load_constants,
    resolve,
    round_filters,
    round_repeats,
)

__version__ = "0.1.0"

__all__ = [
    "B0", "OFFICIAL", "PAPER_CONSTANTS", "Architecture", "BlockSpec", "EfficientNet",
    "NetworkSpec", "ScalingSpec", "StageSpec", "UserError", "build_architecture",
    "count_macs", "count_params", "create_model", "eval_view", "from_constants",
    "load_constants", "resolve", "round_filters", "round_repeats", "train_view",
]
