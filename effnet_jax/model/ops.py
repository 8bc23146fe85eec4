"""Kernels with a hand-written form that XLA runs faster than the obvious one.

BatchNorm's training forward and backward (``batch_norm_train``) are written out so
that the backward is two per-channel sums and one elementwise pass.

A depthwise conv through ``feature_group_count`` is fast on GPU/TPU but slow on
XLA:CPU (grouped convs run single-threaded there); written as k*k shifted
multiply-adds, with a hand-written backward, it is several times faster on CPU.
``hybrid`` keeps XLA's conv and input gradient and takes the kernel gradient from
the shifted form (for backends whose depthwise backward-filter conv is slow; not
yet measured to win anywhere). All compute TensorFlow 'SAME' padding (extra
padding at the end for even totals), so they agree to float rounding, which
tests/test_ops.py checks forward and backward. 1x1 convs run as matrix products
(``pointwise_conv``) everywhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

DEPTHWISE_IMPLS = ("auto", "xla", "shift", "hybrid")


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


def _window(xp: jax.Array, i: int, j: int, stride: int, oh: int, ow: int) -> jax.Array:
    """The (oh, ow) strided window of padded ``xp`` that kernel tap (i, j) sees."""
    n, _, _, c = xp.shape
    return lax.slice(xp, (0, i, j, 0), (n, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
                     (1, stride, stride, 1))


def _correlate(xp: jax.Array, weights: jax.Array, stride: int, oh: int, ow: int) -> jax.Array:
    """'VALID' depthwise correlation of padded ``xp`` with (k, k, C) weights: one fused loop.

    Written in lax primitives: jnp's indexing and broadcasting operators are slow to trace,
    and a B0 train step has many of them here (docs/benchmarks.md).
    """
    k, c = weights.shape[0], weights.shape[-1]
    taps = weights.astype(xp.dtype).reshape(k * k, c)
    out = None
    for i in range(k):
        for j in range(k):
            window = _window(xp, i, j, stride, oh, ow)
            w = lax.broadcast_in_dim(lax.index_in_dim(taps, i * k + j, keepdims=False), window.shape, (3,))
            term = lax.mul(window, w)
            out = term if out is None else lax.add(out, term)
    return out


def _pad_same(x: jax.Array, k: int, stride: int) -> jax.Array:
    """``x`` zero-padded by TensorFlow 'SAME' rules for a k x k kernel at ``stride``."""
    _, h, w, _ = x.shape
    return jnp.pad(x, ((0, 0), same_padding(h, k, stride), same_padding(w, k, stride), (0, 0)))


def _shift_forward(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    k = kernel.shape[0]
    _, h, w, c = x.shape
    return _correlate(_pad_same(x, k, stride), kernel.reshape(k, k, c), stride, -(-h // stride), -(-w // stride))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv_shift(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Depthwise conv as a sum of k*k strided slices times per-channel weights.

    The custom VJP matters as much as the forward: differentiated naively, XLA
    keeps every shifted slice alive for the weight gradient (k*k copies of the
    activation, materialised one by one) and the input gradient becomes k*k
    separate pad + add passes. Here the backward saves only ``x`` and computes
    the input gradient as one more shifted correlation (of the zero-dilated
    output gradient with the flipped kernel, the transposed convolution) and the
    weight gradient as one k*k-output reduction of shifted input times output gradient.
    """
    return _shift_forward(x, kernel, stride)


def _shift_fwd(x: jax.Array, kernel: jax.Array, stride: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _shift_forward(x, kernel, stride), (x, kernel)


def _shift_input_grad(x: jax.Array, kernel: jax.Array, stride: int, g: jax.Array) -> jax.Array:
    """The transposed conv: correlate ``g``, dilated by the stride and padded by k-1-pad, with the flipped kernel."""
    k = kernel.shape[0]
    _, h, w, c = x.shape
    _, oh, ow, _ = g.shape
    (ph0, _), (pw0, _) = same_padding(h, k, stride), same_padding(w, k, stride)

    def edge(size: int, out: int, before: int) -> tuple[int, int, int]:
        lo, dilated = k - 1 - before, (out - 1) * stride + 1
        return lo, size + k - 1 - lo - dilated, stride - 1

    gp = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), edge(h, oh, ph0), edge(w, ow, pw0), (0, 0, 0)))
    return _correlate(gp, kernel.reshape(k, k, c)[::-1, ::-1], 1, h, w).astype(x.dtype)


def _shift_kernel_grad(x: jax.Array, kernel: jax.Array, stride: int, g: jax.Array) -> jax.Array:
    """dw[i, j, c] = sum over n, y, x of xp[n, i + y*s, j + x*s, c] * g[n, y, x, c].

    All k*k taps in one variadic reduction: one streaming pass over x and g, one
    kernel. (One reduction per tap was k*k kernels, slower at 5x5; stacking
    the taps into a single array made XLA materialise k*k shifted copies of x.)
    """
    k = kernel.shape[0]
    _, oh, ow, _ = g.shape
    xp = _pad_same(x, k, stride)
    g = g.astype(x.dtype)
    taps = [lax.convert_element_type(lax.mul(_window(xp, i, j, stride, oh, ow), g), jnp.float32)
            for i in range(k) for j in range(k)]
    zeros = [jnp.zeros((), jnp.float32)] * len(taps)
    dw = lax.reduce(taps, zeros, lambda a, b: tuple(p + q for p, q in zip(a, b)), (0, 1, 2))
    return jnp.stack(dw).reshape(kernel.shape).astype(kernel.dtype)


def _shift_bwd(stride: int, res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = res
    return _shift_input_grad(x, kernel, stride, g), _shift_kernel_grad(x, kernel, stride, g)


depthwise_conv_shift.defvjp(_shift_fwd, _shift_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv_hybrid(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """XLA's grouped conv forward and input gradient, the shift reduction for the kernel gradient.

    For backends whose grouped convolution is fast forward but whose depthwise
    kernel gradient (a grouped backward-filter convolution) is not.
    """
    return depthwise_conv_xla(x, kernel, stride)


def _hybrid_fwd(x: jax.Array, kernel: jax.Array, stride: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return depthwise_conv_xla(x, kernel, stride), (x, kernel)


def _hybrid_bwd(stride: int, res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = res
    (dx,) = jax.vjp(lambda x: depthwise_conv_xla(x, kernel, stride), x)[1](g)
    return dx, _shift_kernel_grad(x, kernel, stride, g)


depthwise_conv_hybrid.defvjp(_hybrid_fwd, _hybrid_bwd)


def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """1x1 stride-1 conv of NHWC ``x`` with a (1, 1, Cin, Cout) kernel, as one matrix product.

    Same numbers as the convolution, but XLA:CPU runs a dot and its transposes
    (both gradients are dots too) much faster than a conv and its backward
    convolutions, which also need layout transposes (measured: docs/benchmarks.md).
    """
    n, h, w, cin = x.shape
    y = jnp.dot(x.reshape(n * h * w, cin), kernel.reshape(cin, kernel.shape[-1]))
    return y.reshape(n, h, w, kernel.shape[-1])


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, impl: str = "auto") -> jax.Array:
    """Depthwise 'SAME' conv of NHWC ``x`` with a (k, k, 1, C) kernel."""
    impl = resolve_depthwise_impl(impl)
    if impl == "shift":
        return depthwise_conv_shift(x, kernel, stride)
    if impl == "hybrid":
        return depthwise_conv_hybrid(x, kernel, stride)
    return depthwise_conv_xla(x, kernel, stride)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """BatchNorm over all axes but the last, on batch statistics: (y, mean, biased var).

    Same numbers as flax's BatchNorm (float32 statistics from E[x^2] - E[x]^2, clipped at
    0; y in x's dtype). The point is the backward: differentiated automatically, the
    normalisation's gradient took several reductions and elementwise passes over the
    activation; written out, dx = scale/std * (g - mean(g) - xhat * mean(g * xhat)) is two
    per-channel sums and one elementwise pass (faster on XLA:CPU: docs/benchmarks.md). The
    two sums stay two reductions: XLA:CPU runs each as a fast library reduction, and one
    two-output ``lax.reduce`` was slower. Gradients through the returned statistics are kept, so the function is exact
    to differentiate whichever outputs are used.
    """
    return _bn_forward(x, scale, bias, epsilon)[0]


def _bn_forward(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axes)
    var = jnp.maximum(jnp.mean(xf * xf, axes) - mean * mean, 0.0)
    rstd = lax.rsqrt(var + epsilon)
    y = (xf - mean) * (rstd * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
    return (y.astype(x.dtype), mean, var), (x, mean, rstd, scale)


def _bn_bwd(epsilon: float, res: tuple, cts: tuple) -> tuple[jax.Array, jax.Array, jax.Array]:
    x, mean, rstd, scale = res
    gy, gmean, gvar = cts
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    centered = x.astype(jnp.float32) - mean
    xhat = centered * rstd
    g = gy.astype(jnp.float32)
    dbias, dscale = jnp.sum(g, axes), jnp.sum(g * xhat, axes)
    dx = (scale.astype(jnp.float32) * rstd) * (g - (dbias + xhat * dscale) / count)
    dx = dx + (gmean + 2.0 * gvar * centered) / count  # through the returned statistics (zero when unused)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm_train.defvjp(_bn_forward, _bn_bwd)
