"""EfficientNet in Flax NNX, built from an ``Architecture`` (see arch.py).

Layer names follow the paper's block anatomy (expand -> depthwise -> squeeze-excite
-> project); ``timm_weights.py`` maps them to timm's names. NHWC, TensorFlow 'SAME'
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

``scan_blocks`` (config ``model.scan_blocks``) runs each stage's repeated blocks (every block after
the stage's first has the same shapes) as one ``nnx.scan`` over their stacked variables, so the
compiler sees each distinct block once. The stacking happens inside the forward: the model keeps
one variable set per block, so weight files, timm conversion, parameter counts, the train state
and checkpoints, and a seed's initial values and dropout masks, are the unscanned model's. The
stacking is one copy per step of the scanned blocks' parameters (its cost: docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from effnet_jax.model.arch import B0, Architecture, BlockSpec, NetworkSpec
from effnet_jax.model.layers import BN_MOMENTUM, Layers, conv_init, head_init_fn, reference_layers, resolve_kernels
from effnet_jax.model.scaling import ScalingSpec, build_architecture, resolve


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
    from effnet_jax.model.fast_layers import fast_layers

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

    def __call__(self, x: jax.Array, keep_prob: jax.Array | None = None) -> jax.Array:
        """``keep_prob``: this block's stochastic-depth survival probability as a (traced) value, which
        a scan over blocks passes per block; None uses the block's own rate."""
        y = x
        if self.expand_conv is not None:
            y = nnx.silu(self.expand_bn(self.expand_conv(y)))
        y = nnx.silu(self.dw_bn(self.dw_conv(y)))
        if self.se is not None:
            y = self.se(y)
        y = self.project_bn(self.project_conv(y))
        if self.has_skip:
            y = (self.drop_path(y) if keep_prob is None else _drop_path(self.drop_path, y, keep_prob)) + x
        return y


def _drop_path(dropout: nnx.Dropout, y: jax.Array, keep_prob: jax.Array) -> jax.Array:
    """``dropout`` (one mask value per example) at a survival probability given as a value, not a
    constant: what ``nnx.Dropout.__call__`` computes, from the same key of the block's own stream."""
    if dropout.deterministic:
        return y
    mask = jax.random.bernoulli(dropout.rngs(), keep_prob, (y.shape[0],) + (1,) * (y.ndim - 1))
    # Times the reciprocal: what XLA makes of flax's division by a constant (bit-identical on CPU).
    return jax.lax.select(jnp.broadcast_to(mask, y.shape), y * (1 / keep_prob).astype(y.dtype), jnp.zeros_like(y))


def block_groups(arch: Architecture) -> list[tuple[int, ...]]:
    """Indices of ``arch.blocks`` in runs that one scan can run: each stage's blocks after its first have one
    shape (stride 1, input channels = output channels), so those (when at least two) form one run; every
    other block is a run of its own."""
    def shape(b: BlockSpec) -> BlockSpec:
        return dataclasses.replace(b, index=0, drop_path=0.0)

    groups: list[tuple[int, ...]] = []
    for i, b in enumerate(arch.blocks):
        if groups and b.index >= 2 and shape(b) == shape(arch.blocks[groups[-1][-1]]):
            groups[-1] += (i,)
        else:
            groups.append((i,))
    return groups


def _scan(blocks: list[MBConv], x: jax.Array) -> jax.Array:
    """``blocks`` (of one shape) applied in order as one ``nnx.scan`` over their stacked variables.

    The stacked layout exists only here: the blocks' own variables stay per block (weight files,
    timm conversion, checkpoints and a seed's initial values are those of the unscanned model).
    Each block's survival probability is a scanned input; the running statistics and dropout
    counters the scan updates are written back to each block.
    """
    graphdef, _ = nnx.split(blocks[0])
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *(nnx.state(b) for b in blocks))
    stack = nnx.merge(graphdef, stacked)
    keep = jnp.asarray([1.0 - b.drop_path.rate for b in blocks], jnp.float32)

    @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
    def run(x: jax.Array, block: MBConv, keep_prob: jax.Array) -> jax.Array:
        return block(x, keep_prob)

    x = run(x, stack, keep)
    updated = nnx.state(stack, nnx.Not(nnx.Param))
    for j, b in enumerate(blocks):
        nnx.update(b, jax.tree.map(lambda a, j=j: a[j], updated))
    return x


class EfficientNet(nnx.Module):
    """Stem -> MBConv blocks -> 1x1 head -> global average pool -> dropout -> dense."""

    def __init__(self, arch: Architecture, num_classes: int = 1000, *, dropout: float = 0.2,
                 layers: Layers | None = None, head_init: str | float = "paper", dtype: Any = jnp.float32,
                 scan_blocks: bool = False, rngs: nnx.Rngs):
        """``layers``: the BatchNorm / conv factories (default ``layers_for("auto")``, the fast set);
        ``scan_blocks``: run each stage's repeated blocks as one scan (``set_view`` switches it)."""
        layers = layers_for("auto") if layers is None else layers
        classifier_init = head_init_fn(head_init)
        self.arch = arch
        self.kernels = layers.kernels
        self.dtype = dtype
        self.scan_blocks = scan_blocks
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
        for group in block_groups(self.arch) if self.scan_blocks else [(i,) for i in range(len(self.blocks))]:
            x = self.blocks[group[0]](x) if len(group) == 1 else _scan([self.blocks[i] for i in group], x)
        x = nnx.silu(self.head_bn(self.head_conv(x)))
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Float32 logits for NHWC images."""
        return self.classifier(self.dropout(self.features(x))).astype(jnp.float32)

    def set_view(self, scan_blocks: bool | None = None) -> None:
        """``nnx.view(model, scan_blocks=...)``: the same weights, with or without the scan over blocks."""
        if scan_blocks is not None:
            self.scan_blocks = scan_blocks


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
    scan_blocks: bool = False,
) -> EfficientNet:
    """An EfficientNet for ``"b0".."b8"``, ``"l2"`` or a ScalingSpec, in training mode.

    ``dropout`` defaults to the spec's; ``kernels`` is ``"auto"`` / ``"fast"`` /
    ``"reference"`` or a ``Layers`` record of one's own (then ``depthwise_impl`` and
    ``bn_momentum`` are that record's business); ``head_init`` is the classifier
    kernel's initialisation (``head_init_fn``); ``scan_blocks`` compiles each stage's repeated blocks
    once (the module docstring). ``nnx.view(model, deterministic=True,
    use_running_average=True)`` (or ``eval_view``) gives the inference view.
    """
    spec = resolve(spec_or_name)
    arch = build_architecture(spec, network, drop_path_rate)
    if not isinstance(kernels, Layers):
        kernels = layers_for(kernels, depthwise_impl=depthwise_impl, bn_momentum=bn_momentum)
    return EfficientNet(
        arch, num_classes,
        dropout=spec.dropout if dropout is None else dropout,
        layers=kernels, head_init=head_init, dtype=dtype, scan_blocks=scan_blocks, rngs=nnx.Rngs(seed),
    )


def eval_view(model: EfficientNet) -> EfficientNet:
    """The same weights with BatchNorm on running statistics and no dropout."""
    return nnx.view(model, deterministic=True, use_running_average=True)


def train_view(model: EfficientNet) -> EfficientNet:
    """The same weights with batch statistics and active dropout / drop path."""
    return nnx.view(model, deterministic=False, use_running_average=False)


# The tag of the model's dropout and drop-path streams, which is what ``nnx.reseed`` matches: create_model's
# ``nnx.Rngs(seed)`` holds only a default stream, and each ``nnx.Dropout`` forks it (its "dropout" collection
# falls back to "default"). Reseeding "dropout" instead touches nothing and every step reuses one mask.
DROPOUT_STREAM = "default"


def seed_free(rest: nnx.State) -> nnx.State:
    """The dropout streams' state with every key one fixed key and every counter zero.

    The streams' keys become constants of the compiled step; the trainer reseeds every
    dropout stream from its state, so the seed-derived keys are replaced by one fixed
    key: trials that differ only in seed then share one compiled program.
    """
    return jax.tree.map(lambda v: jax.random.key(0) if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)
                        else jnp.zeros_like(v), rest)
