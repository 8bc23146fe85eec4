"""EfficientNet in Flax NNX, built from an ``Architecture`` (see arch.py).

Layer names follow the paper's block anatomy (expand -> depthwise -> squeeze-excite
-> project); ``pretrained.py`` maps them to timm's names. NHWC, TensorFlow 'SAME'
padding, BatchNorm momentum 0.99 / epsilon 1e-3, SiLU everywhere. ``dtype`` is
the compute dtype; parameters stay float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import normalization as _bn_lib

from effnet_jax import ops
from effnet_jax.arch import B0, Architecture, BlockSpec, NetworkSpec
from effnet_jax.scaling import ScalingSpec, build_architecture, resolve

BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3


def _fan_out_init(scale: float, distribution: str, fan_out: Callable[[tuple[int, ...]], int]) -> nnx.Initializer:
    """Variance scaling over fan-out, sampled with numpy on the host.

    Sampling with jax.random would compile one XLA program per parameter shape:
    about 20 s on a 2-core CPU for each new architecture, which a grid search pays
    per trial. numpy, seeded from the jax key, costs milliseconds. Under tracing
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


class PointwiseConv(nnx.Conv):
    """A 1x1 stride-1 ``nnx.Conv`` (same variables) computed as a matrix product (ops.pointwise_conv)."""

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        if out_sharding is not None:
            return super().__call__(inputs, out_sharding)
        x, kernel = (a.astype(self.dtype or a.dtype) for a in (inputs, self.kernel[...]))
        y = ops.pointwise_conv(x, kernel)
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


def _conv(cin: int, cout: int, kernel: int, stride: int, dtype: Any, rngs: nnx.Rngs) -> nnx.Conv:
    cls = PointwiseConv if kernel == 1 and stride == 1 else nnx.Conv
    return cls(
        cin, cout, (kernel, kernel), strides=stride, padding="SAME", use_bias=False,
        kernel_init=conv_init, dtype=dtype, rngs=rngs,
    )


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` (same variables, same numbers) whose training step traces and runs fast.

    In training, the normalisation is ``ops.batch_norm_train``, whose hand-written
    backward makes fewer passes over the activation than autodiff of flax's.

    Flax writes the running statistics with ``self.mean[...] = ...``, whose
    full-replace check reads ``.sharding`` of a tracer; jax answers that with an
    error message that walks the whole jaxpr traced so far. Over 49 BatchNorms
    that made tracing a B0 train step quadratic (about half of its ~10 s trace).
    ``set_value`` without an index skips the check.
    """

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask: Any = None) -> jax.Array:
        if (mask is not None or self.axis_name is not None or self.scale is None or self.bias is None
                or self.axis not in (-1, x.ndim - 1) or not self.use_fast_variance):
            return super().__call__(x, use_running_average, mask=mask)
        use_running_average = self.use_running_average if use_running_average is None else use_running_average
        if use_running_average is None:
            return super().__call__(x, use_running_average)  # flax's error message
        feature_axes = _bn_lib._canonicalize_axes(x.ndim, self.axis)
        reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
        x, mean, var, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], self.scale[...], self.bias[...]), dtype=self.dtype
        )
        if not use_running_average:
            y, mean, var = ops.batch_norm_train(x, scale, bias, self.epsilon)
            m = self.momentum
            self.mean.set_value(jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean))
            self.var.set_value(jax.lax.stop_gradient(m * self.var[...] + (1 - m) * var))
            return y
        return _bn_lib._normalize(
            x, mean, var, scale, bias, reduction_axes, feature_axes, self.dtype, self.epsilon
        )


def _bn(channels: int, dtype: Any, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return BatchNorm(channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs)


class DepthwiseConv(nnx.Module):
    """k x k depthwise conv, 'SAME' padding, no bias; implementation per backend."""

    def __init__(self, channels: int, kernel: int, stride: int, *, impl: str = "auto",
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.kernel = nnx.Param(depthwise_init(rngs.params(), (kernel, kernel, 1, channels), jnp.float32))
        self.stride = stride
        self.impl = impl
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return ops.depthwise_conv(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride, self.impl)


class SqueezeExcite(nnx.Module):
    """Channel gate: global pool -> reduce -> SiLU -> expand -> sigmoid -> scale."""

    def __init__(self, channels: int, reduced: int, *, dtype: Any, rngs: nnx.Rngs):
        self.reduce = nnx.Linear(channels, reduced, kernel_init=conv_init, dtype=dtype, rngs=rngs)
        self.expand = nnx.Linear(reduced, channels, kernel_init=conv_init, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x, axis=(1, 2))
        s = self.expand(nnx.silu(self.reduce(s)))
        return x * nnx.sigmoid(s)[:, None, None, :]


class MBConv(nnx.Module):
    """Mobile inverted bottleneck with squeeze-excite and stochastic depth."""

    def __init__(self, spec: BlockSpec, *, depthwise_impl: str, dtype: Any, rngs: nnx.Rngs):
        mid = spec.mid_channels
        self.expand_conv = _conv(spec.in_channels, mid, 1, 1, dtype, rngs) if spec.expand != 1 else None
        self.expand_bn = _bn(mid, dtype, rngs) if spec.expand != 1 else None
        self.dw_conv = DepthwiseConv(mid, spec.kernel, spec.stride, impl=depthwise_impl, dtype=dtype, rngs=rngs)
        self.dw_bn = _bn(mid, dtype, rngs)
        self.se = SqueezeExcite(mid, spec.se_channels, dtype=dtype, rngs=rngs) if spec.se_channels else None
        self.project_conv = _conv(mid, spec.out_channels, 1, 1, dtype, rngs)
        self.project_bn = _bn(spec.out_channels, dtype, rngs)
        self.has_skip = spec.has_skip
        # Stochastic depth is dropout with one mask value per example.
        self.drop_path = nnx.Dropout(spec.drop_path, broadcast_dims=(1, 2, 3), rngs=rngs) if self.has_skip else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x
        if self.expand_conv is not None:
            y = nnx.silu(self.expand_bn(self.expand_conv(y)))
        y = nnx.silu(self.dw_bn(self.dw_conv(y)))
        if self.se is not None:
            y = self.se(y)
        y = self.project_bn(self.project_conv(y))
        if self.has_skip:
            y = self.drop_path(y) + x
        return y


class EfficientNet(nnx.Module):
    """Stem -> MBConv blocks -> 1x1 head -> global average pool -> dropout -> dense."""

    def __init__(self, arch: Architecture, num_classes: int = 1000, *, dropout: float = 0.2,
                 depthwise_impl: str = "auto", head_init: str | float = "paper", dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        ops.resolve_depthwise_impl(depthwise_impl)  # fail early on a typo
        classifier_init = head_init_fn(head_init)
        self.arch = arch
        self.dtype = dtype
        self.stem_conv = _conv(3, arch.stem_channels, 3, arch.stem_stride, dtype, rngs)
        self.stem_bn = _bn(arch.stem_channels, dtype, rngs)
        self.blocks = nnx.List(
            [MBConv(b, depthwise_impl=depthwise_impl, dtype=dtype, rngs=rngs) for b in arch.blocks]
        )
        last = arch.blocks[-1].out_channels
        self.head_conv = _conv(last, arch.head_channels, 1, 1, dtype, rngs)
        self.head_bn = _bn(arch.head_channels, dtype, rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.classifier = nnx.Linear(arch.head_channels, num_classes, kernel_init=classifier_init, dtype=dtype,
                                     rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Pooled head features, (N, head_channels)."""
        x = nnx.silu(self.stem_bn(self.stem_conv(x.astype(self.dtype))))
        for block in self.blocks:
            x = block(x)
        x = nnx.silu(self.head_bn(self.head_conv(x)))
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Float32 logits for NHWC images."""
        return self.classifier(self.dropout(self.features(x))).astype(jnp.float32)


def create_model(
    spec_or_name: str | ScalingSpec = "b0",
    num_classes: int = 1000,
    seed: int = 0,
    *,
    dtype: Any = jnp.float32,
    network: NetworkSpec = B0,
    drop_path_rate: float = 0.2,
    dropout: float | None = None,
    depthwise_impl: str = "auto",
    head_init: str | float = "paper",
) -> EfficientNet:
    """An EfficientNet for ``"b0".."b8"``, ``"l2"`` or a ScalingSpec, in training mode.

    ``dropout`` defaults to the spec's; ``head_init`` is the classifier kernel's
    initialisation (``head_init_fn``). ``nnx.view(model, deterministic=True,
    use_running_average=True)`` (or ``eval_view``) gives the inference view.
    """
    spec = resolve(spec_or_name)
    arch = build_architecture(spec, network, drop_path_rate)
    return EfficientNet(
        arch, num_classes,
        dropout=spec.dropout if dropout is None else dropout,
        depthwise_impl=depthwise_impl, head_init=head_init, dtype=dtype, rngs=nnx.Rngs(seed),
    )


def eval_view(model: EfficientNet) -> EfficientNet:
    """The same weights with BatchNorm on running statistics and no dropout."""
    return nnx.view(model, deterministic=True, use_running_average=True)


def train_view(model: EfficientNet) -> EfficientNet:
    """The same weights with batch statistics and active dropout / drop path."""
    return nnx.view(model, deterministic=False, use_running_average=False)
