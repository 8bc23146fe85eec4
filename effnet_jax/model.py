"""EfficientNet in Flax NNX, built from an ``Architecture`` (see arch.py).

Layer names follow the paper's block anatomy (expand -> depthwise -> squeeze-excite
-> project); ``pretrained.py`` maps them to timm's names. NHWC, TensorFlow 'SAME'
padding, BatchNorm momentum 0.99 / epsilon 1e-3, SiLU everywhere. ``dtype`` is
the compute dtype; parameters stay float32.

The BatchNorms and convolutions come from a ``Layers`` record (timm-builder style),
chosen by the ``kernels`` switch (config ``model.kernels``): ``"reference"`` is plain
``nnx.BatchNorm`` / ``nnx.Conv`` (depthwise through ``feature_group_count``), ``"fast"``
(what ``"auto"`` means) the CPU speed tricks of ``fast_layers.py`` / ``ops.py``. Both build
one parameter layout (same variable paths, shapes and initial values from a seed), so
pretrained weights and ``weights.safetensors`` fit either without conversion (a checkpoint
holds the train state in its packing, flat or per leaf, so it fits the kernels it was saved
with); they differ in float rounding only. This module imports neither ops.py nor fast_layers.py
unless the fast layers are asked for; what both sets share is in layers.py.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from effnet_jax.arch import B0, Architecture, BlockSpec, NetworkSpec
from effnet_jax.layers import BN_MOMENTUM, Layers, conv_init, head_init_fn, reference_layers, resolve_kernels
from effnet_jax.scaling import ScalingSpec, build_architecture, resolve


def layers_for(kernels: str = "auto", *, depthwise_impl: str = "auto", bn_momentum: float = BN_MOMENTUM) -> Layers:
    """The layer set ``kernels`` names; ``depthwise_impl`` (ops.DEPTHWISE_IMPLS) only applies to the fast set.

    ValueError on an unknown name, or a ``depthwise_impl`` other than "auto" with the
    reference layers (whose depthwise conv is ``nnx.Conv``'s grouped convolution).
    """
    kernels = resolve_kernels(kernels)
    if kernels == "reference":
        if depthwise_impl != "auto":
            raise ValueError(f"depthwise_impl {depthwise_impl!r} applies to the fast kernels only; the reference "
                             "depthwise conv is nnx.Conv's grouped convolution")
        return reference_layers(bn_momentum)
    from effnet_jax.fast_layers import fast_layers

    return fast_layers(depthwise_impl, bn_momentum)


def is_bn_param(path: tuple[Any, ...], value: Any) -> bool:
    """A BatchNorm scale or offset (an ``nnx.Param`` under a ``*_bn`` layer): weight decay skips these."""
    return isinstance(value, nnx.Param) and any(str(getattr(k, "key", k)).endswith("_bn") for k in path)


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

    def __init__(self, spec: BlockSpec, *, layers: Layers, dtype: Any, rngs: nnx.Rngs):
        mid, f = spec.mid_channels, {"dtype": dtype, "rngs": rngs}
        self.expand_conv = layers.conv(spec.in_channels, mid, 1, 1, **f) if spec.expand != 1 else None
        self.expand_bn = layers.norm(mid, **f) if spec.expand != 1 else None
        self.dw_conv = layers.depthwise(mid, spec.kernel, spec.stride, **f)
        self.dw_bn = layers.norm(mid, **f)
        self.se = SqueezeExcite(mid, spec.se_channels, dtype=dtype, rngs=rngs) if spec.se_channels else None
        self.project_conv = layers.conv(mid, spec.out_channels, 1, 1, **f)
        self.project_bn = layers.norm(spec.out_channels, **f)
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
                 layers: Layers | None = None, head_init: str | float = "paper", dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        """``layers``: the BatchNorm / conv factories (default ``layers_for("auto")``, the fast set)."""
        layers = layers_for("auto") if layers is None else layers
        classifier_init = head_init_fn(head_init)
        self.arch = arch
        self.kernels = layers.kernels
        self.dtype = dtype
        f = {"dtype": dtype, "rngs": rngs}
        self.stem_conv = layers.conv(3, arch.stem_channels, 3, arch.stem_stride, **f)
        self.stem_bn = layers.norm(arch.stem_channels, **f)
        self.blocks = nnx.List([MBConv(b, layers=layers, **f) for b in arch.blocks])
        last = arch.blocks[-1].out_channels
        self.head_conv = layers.conv(last, arch.head_channels, 1, 1, **f)
        self.head_bn = layers.norm(arch.head_channels, **f)
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
    kernels: str | Layers = "auto",
    depthwise_impl: str = "auto",
    bn_momentum: float = BN_MOMENTUM,
    head_init: str | float = "paper",
) -> EfficientNet:
    """An EfficientNet for ``"b0".."b8"``, ``"l2"`` or a ScalingSpec, in training mode.

    ``dropout`` defaults to the spec's; ``kernels`` is ``"auto"`` / ``"fast"`` /
    ``"reference"`` or a ``Layers`` record of one's own (then ``depthwise_impl`` and
    ``bn_momentum`` are that record's business); ``head_init`` is the classifier
    kernel's initialisation (``head_init_fn``). ``nnx.view(model, deterministic=True,
    use_running_average=True)`` (or ``eval_view``) gives the inference view.
    """
    spec = resolve(spec_or_name)
    arch = build_architecture(spec, network, drop_path_rate)
    if not isinstance(kernels, Layers):
        kernels = layers_for(kernels, depthwise_impl=depthwise_impl, bn_momentum=bn_momentum)
    return EfficientNet(
        arch, num_classes,
        dropout=spec.dropout if dropout is None else dropout,
        layers=kernels, head_init=head_init, dtype=dtype, rngs=nnx.Rngs(seed),
    )


def eval_view(model: EfficientNet) -> EfficientNet:
    """The same weights with BatchNorm on running statistics and no dropout."""
    return nnx.view(model, deterministic=True, use_running_average=True)


def train_view(model: EfficientNet) -> EfficientNet:
    """The same weights with batch statistics and active dropout / drop path."""
    return nnx.view(model, deterministic=False, use_running_average=False)


def seed_free(rest: nnx.State) -> nnx.State:
    """The dropout streams' state with every key one fixed key and every counter zero.

    The streams' keys become constants of the compiled step; the trainer reseeds every
    dropout stream from its state, so the seed-derived keys are replaced by one fixed
    key: trials that differ only in seed then share one compiled program.
    """
    return jax.tree.map(lambda v: jax.random.key(0) if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)
                        else jnp.zeros_like(v), rest)
