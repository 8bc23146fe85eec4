"""The ``fast`` layers (``model.kernels = "fast"``): flax's layers with the CPU speed tricks of ops.py.

Each class has exactly the variables of the flax layer it stands for (same names,
shapes, dtypes and initial values from the same seed), so a model built with these
and one built with plain ``nnx.BatchNorm`` / ``nnx.Conv`` (``layers.reference_layers``)
share one parameter layout: pretrained loading, ``weights.safetensors`` and
checkpoints need no conversion. Only how the train step computes differs, by float
rounding (tests/test_kernels.py). Imported only when the fast layers are chosen.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from effnet_jax.model import ops
from effnet_jax.model.layers import BN_EPSILON, BN_MOMENTUM, Layers, conv_init, depthwise_init


class PointwiseConv(nnx.Conv):
    """A 1x1 stride-1 ``nnx.Conv`` (same variables) computed as a matrix product (ops.pointwise_conv)."""

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        if out_sharding is not None:
            return super().__call__(inputs, out_sharding)
        x, kernel = (a.astype(self.dtype or a.dtype) for a in (inputs, self.kernel[...]))
        y = ops.pointwise_conv(x, kernel)
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` (same variables, same numbers) whose training step traces and runs fast.

    In training, the normalisation is ``ops.batch_norm_train``, whose hand-written
    backward makes fewer passes over the activation than autodiff of flax's. On
    running statistics (and for any option this does not cover: masks, named axes,
    no scale or bias, a non-last feature axis) it is flax's own ``__call__``.

    Flax writes the running statistics with ``self.mean[...] = ...``, whose
    full-replace check reads ``.sharding`` of a tracer; jax answers that with an
    error message that walks the whole jaxpr traced so far. Over 49 BatchNorms
    that made tracing a B0 train step quadratic (docs/benchmarks.md).
    ``set_value`` without an index skips the check.
    """

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask: Any = None) -> jax.Array:
        use_running_average = self.use_running_average if use_running_average is None else use_running_average
        if (use_running_average is None or use_running_average or mask is not None or self.axis_name is not None
                or self.scale is None or self.bias is None or self.axis not in (-1, x.ndim - 1)
                or not self.use_fast_variance):
            return super().__call__(x, use_running_average, mask=mask)  # or flax's error message for None
        x, _, _, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], self.scale[...], self.bias[...]), dtype=self.dtype)
        y, mean, var = ops.batch_norm_train(x, scale, bias, self.epsilon)
        m = self.momentum
        self.mean.set_value(jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean))
        self.var.set_value(jax.lax.stop_gradient(m * self.var[...] + (1 - m) * var))
        return y


class DepthwiseConv(nnx.Module):
    """k x k depthwise conv, 'SAME' padding, no bias; implementation per backend (ops.depthwise_conv).

    Its one variable, ``kernel`` (k, k, 1, C), is what ``nnx.Conv(C, C, (k, k),
    feature_group_count=C, use_bias=False)`` holds, drawn from the same key.
    """

    def __init__(self, channels: int, kernel: int, stride: int, *, impl: str = "auto",
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.kernel = nnx.Param(depthwise_init(rngs.params(), (kernel, kernel, 1, channels), jnp.float32))
        self.stride = stride
        self.impl = impl
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return ops.depthwise_conv(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride, self.impl)


def _conv(cin: int, cout: int, kernel: int, stride: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.Conv:
    cls = PointwiseConv if kernel == 1 and stride == 1 else nnx.Conv
    return cls(cin, cout, (kernel, kernel), strides=stride, padding="SAME", use_bias=False,
               kernel_init=conv_init, dtype=dtype, rngs=rngs)


def _norm(channels: int, *, momentum: float, dtype: Any, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return BatchNorm(channels, momentum=momentum, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs)


def _depthwise(channels: int, kernel: int, stride: int, *, impl: str, dtype: Any, rngs: nnx.Rngs) -> nnx.Module:
    return DepthwiseConv(channels, kernel, stride, impl=impl, dtype=dtype, rngs=rngs)


def fast_layers(depthwise_impl: str = "auto", bn_momentum: float = BN_MOMENTUM) -> Layers:
    """The fast layer set; ValueError on an unknown ``depthwise_impl`` (ops.DEPTHWISE_IMPLS)."""
    ops.resolve_depthwise_impl(depthwise_impl)  # fail early on a typo
    return Layers("fast", norm=functools.partial(_norm, momentum=bn_momentum), conv=_conv,
                  depthwise=functools.partial(_depthwise, impl=depthwise_impl))
