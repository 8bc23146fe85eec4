"""Convolution kernels whose fastest form depends on the backend.

A depthwise conv through ``feature_group_count`` is fast on GPU/TPU but slow on
XLA:CPU (grouped convs run single-threaded there); written as k*k shifted
multiply-adds it is several times faster on CPU. Both compute TensorFlow 'SAME'
padding (extra padding at the end for even totals), so they agree to float
rounding, which tests/test_ops.py checks forward and backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

DEPTHWISE_IMPLS = ("auto", "xla", "shift")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) of one spatial dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def resolve_depthwise_impl(impl: str) -> str:
    """'auto' -> 'shift' on CPU, 'xla' elsewhere (measured: docs/benchmarks.md)."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "shift" if jax.default_backend() == "cpu" else "xla"
    return impl


def depthwise_conv_xla(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Depthwise conv as one grouped XLA convolution. kernel: (k, k, 1, C)."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def depthwise_conv_shift(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Depthwise conv as a sum of k*k strided slices times per-channel weights."""
    k = kernel.shape[0]
    _, h, w, c = x.shape
    (ph0, ph1), (pw0, pw1) = same_padding(h, k, stride), same_padding(w, k, stride)
    xp = jnp.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
    oh, ow = -(-h // stride), -(-w // stride)
    weights = kernel.reshape(k, k, c)
    out = None
    for i in range(k):
        for j in range(k):
            window = xp[:, i : i + (oh - 1) * stride + 1 : stride, j : j + (ow - 1) * stride + 1 : stride]
            term = window * weights[i, j]
            out = term if out is None else out + term
    return out


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, impl: str = "auto") -> jax.Array:
    """Depthwise 'SAME' conv of NHWC ``x`` with a (k, k, 1, C) kernel."""
    if resolve_depthwise_impl(impl) == "shift":
        return depthwise_conv_shift(x, kernel, stride)
    return depthwise_conv_xla(x, kernel, stride)
