"""The layer sets a model is built from, and what every set shares: BatchNorm constants, the
official initialisers, the classifier's init, and plain flax's own layers (``"reference"``).

``fast_layers.py`` builds the other set on these; ``model.layers_for`` picks one by name.
Kept apart from model.py so that neither layer set imports the model (no import cycle).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3


def _fan_out_init(scale: float, distribution: str, fan_out: Callable[[tuple[int, ...]], int]) -> nnx.Initializer:
    """Variance scaling over fan-out, sampled with numpy on the host.

    Sampling with jax.random would compile one XLA program per parameter shape, for
    each new architecture, which a grid search pays per trial (docs/benchmarks.md);
    numpy, seeded from the jax key, does not compile. Under tracing
    (``nnx.eval_shape``) it falls back to jax.random, which gives the same shapes.
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        std = math.sqrt(scale / fan_out(shape))
        try:
            seed = np.asarray(jax.random.key_data(key)).ravel()
        except jax.errors.TracerArrayConversionError:  # under tracing
            return jax.random.normal(key, shape, dtype) * std
        rng = np.random.default_rng(seed)
        if distribution == "normal":
            x = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        else:
            limit = math.sqrt(3.0) * std
            x = rng.uniform(-limit, limit, shape).astype(np.float32)
        return jnp.asarray(x, dtype)

    return init


# The official initialisers: He-normal over fan-out for convs (a depthwise kernel's
# fan-out is k*k), uniform(+-1/sqrt(fan-out)) for the classifier.
conv_init = _fan_out_init(2.0, "normal", lambda s: s[-1] * math.prod(s[:-2]))
depthwise_init = _fan_out_init(2.0, "normal", lambda s: math.prod(s[:-2]))
dense_init = _fan_out_init(1.0 / 3.0, "uniform", lambda s: s[-1])


def head_init_fn(head_init: str | float = "paper") -> nnx.Initializer:
    """The classifier kernel's initialiser: ``"paper"`` (dense_init), ``"zero"``, or a scale s
    (a float or its string) for uniform(+-s/sqrt(num_classes)).

    The paper's range is sized for 1000 classes: at 10 it starts the loss near 10
    instead of ln 10, which costs a short run most of its budget (docs/trial-recipe.md).
    """
    if head_init == "paper":
        return dense_init
    if head_init == "zero":
        return nnx.initializers.zeros_init()
    try:
        scale = float(head_init)
    except (TypeError, ValueError):
        raise ValueError(f'head_init must be "paper", "zero" or a non-negative scale, got {head_init!r}') from None
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f'head_init must be "paper", "zero" or a non-negative scale, got {head_init!r}')
    if scale == 0:
        return nnx.initializers.zeros_init()
    return _fan_out_init(scale * scale / 3.0, "uniform", lambda s: s[-1])


KERNELS = ("auto", "fast", "reference")


def resolve_kernels(kernels: str) -> str:
    """``"auto"`` -> ``"fast"`` (on every backend: the H200 A/B in docs/benchmarks.md found the
    fast layers within 2% of flax's there); ValueError on an unknown name."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    return "fast" if kernels == "auto" else kernels


@dataclasses.dataclass(frozen=True)
class Layers:
    """The factories the model builds its BatchNorms and convolutions with.

    ``norm(channels, *, dtype, rngs)``; ``conv(cin, cout, kernel, stride, *, dtype, rngs)``
    ('SAME', no bias); ``depthwise(channels, kernel, stride, *, dtype, rngs)`` ('SAME', no bias).
    Every set must create the variables ``nnx.BatchNorm`` / ``nnx.Conv`` create, under the
    same names, from the same keys: one parameter layout for every set (see the module docstring).
    """

    kernels: str  # the resolved name: "fast" or "reference"
    norm: Callable[..., nnx.Module]
    conv: Callable[..., nnx.Module]
    depthwise: Callable[..., nnx.Module]


def _reference_norm(channels: int, *, momentum: float, dtype: Any, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(channels, momentum=momentum, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs)


def _reference_conv(cin: int, cout: int, kernel: int, stride: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding="SAME", use_bias=False,
                    kernel_init=conv_init, dtype=dtype, rngs=rngs)


def _reference_depthwise(channels: int, kernel: int, stride: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(channels, channels, (kernel, kernel), strides=stride, padding="SAME",
                    feature_group_count=channels, use_bias=False, kernel_init=depthwise_init, dtype=dtype, rngs=rngs)


def reference_layers(bn_momentum: float = BN_MOMENTUM) -> Layers:
    """Flax's own layers, differentiated by autodiff: the baseline the fast layers are checked against."""
    return Layers("reference", norm=functools.partial(_reference_norm, momentum=bn_momentum),
                  conv=_reference_conv, depthwise=_reference_depthwise)
