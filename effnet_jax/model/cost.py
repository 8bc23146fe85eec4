"""Exact parameter counts and analytic multiply-add (MAC) counts.

Counted per image, from the expanded ``Architecture`` at a given resolution:
convolutions (stem, expand, depthwise, project, head), the squeeze-excite dense
layers and the classifier. Not counted: BatchNorm, activations, the SE gating
product, residual adds and pooling (elementwise work, under 1% of the total).
Parameters are the trainable ones (conv/dense kernels and biases, BatchNorm scale
and offset), as timm counts them; BatchNorm running statistics are not parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from effnet_jax.model.arch import Architecture

if TYPE_CHECKING:
    from effnet_jax.model.scaling import ScalingSpec

FIGURES = ("width", "depth", "resolution", "blocks", "params", "macs")  # what figures() reports, in order


def _out(size: int, stride: int) -> int:
    return -(-size // stride)  # 'SAME' padding


def count_params(arch: Architecture, num_classes: int = 1000) -> int:
    """Trainable parameters of the model built from ``arch``."""
    n = 3 * 3 * 3 * arch.stem_channels + 2 * arch.stem_channels
    for b in arch.blocks:
        mid = b.mid_channels
        if b.expand != 1:
            n += b.in_channels * mid + 2 * mid
        n += b.kernel * b.kernel * mid + 2 * mid
        if b.se_channels:
            n += mid * b.se_channels + b.se_channels + b.se_channels * mid + mid
        n += mid * b.out_channels + 2 * b.out_channels
    last = arch.blocks[-1].out_channels
    n += last * arch.head_channels + 2 * arch.head_channels
    n += arch.head_channels * num_classes + num_classes
    return n


def count_macs(arch: Architecture, resolution: int, num_classes: int = 1000) -> int:
    """Multiply-adds of one forward pass on a ``resolution`` x ``resolution`` image."""
    size = _out(resolution, arch.stem_stride)
    macs = size * size * 3 * 3 * 3 * arch.stem_channels
    for b in arch.blocks:
        mid = b.mid_channels
        if b.expand != 1:
            macs += size * size * b.in_channels * mid
        size = _out(size, b.stride)
        macs += size * size * b.kernel * b.kernel * mid
        if b.se_channels:
            macs += 2 * mid * b.se_channels
        macs += size * size * mid * b.out_channels
    last = arch.blocks[-1].out_channels
    macs += size * size * last * arch.head_channels
    macs += arch.head_channels * num_classes
    return macs


def figures(spec: ScalingSpec, arch: Architecture, num_classes: int) -> dict[str, Any]:
    """A network's size and cost: the spec's width and depth multipliers and input resolution, the
    rounded architecture's block count, its parameters and MACs (``FIGURES``, in that order).

    The one place these are put together, so a search table, a scaling study, ``size_table`` and a
    trainer's result.json report a network the same way.
    """
    return {"width": spec.width, "depth": spec.depth, "resolution": spec.resolution, "blocks": len(arch.blocks),
            "params": count_params(arch, num_classes), "macs": count_macs(arch, spec.resolution, num_classes)}
