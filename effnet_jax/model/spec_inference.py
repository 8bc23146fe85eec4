"""The scaling spec that reproduces a network's channel counts and repeats on B0's block table.

Checkpoints record tensors, not the width and depth multipliers that made them: ``fit_spec``
finds the official spec, else the (width, depth) with the fewest decimals, whose official
rounding gives the counts; ``spec_for_arch`` does it for an ``Architecture``. Loading timm
checkpoints and writing our weight files both name a network this way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from effnet_jax.errors import UserError
from effnet_jax.model.arch import B0, Architecture
from effnet_jax.model.scaling import (
    OFFICIAL,
    PAPER_CONSTANTS,
    ScalingSpec,
    build_architecture,
    formula_dropout,
    round_filters,
    round_repeats,
    round_resolution,
)


@dataclasses.dataclass(frozen=True)
class Counts:
    """What a checkpoint fixes about a B0-structured network."""

    stem: int
    outs: tuple[int, ...]
    head: int
    repeats: tuple[int, ...]


def arch_counts(arch: Architecture) -> Counts:
    """What ``arch`` fixes: stem, per-stage output and head channels, blocks per stage."""
    stages = sorted({b.stage for b in arch.blocks})
    return Counts(
        stem=arch.stem_channels,
        outs=tuple(next(b.out_channels for b in arch.blocks if b.stage == s) for s in stages),
        head=arch.head_channels,
        repeats=tuple(sum(b.stage == s for b in arch.blocks) for s in stages),
    )


def _width_range(base: int, channels: int) -> tuple[float, float] | None:
    """[lo, hi) of widths w with round_filters(base, w) == channels (it is monotone in w)."""

    def first_width(pred: Any) -> float:
        lo, hi = 0.0, 64.0
        for _ in range(80):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if pred(mid) else (mid, hi)
        return hi

    lo = first_width(lambda w: round_filters(base, w) >= channels)
    hi = first_width(lambda w: round_filters(base, w) > channels)
    return (lo, hi) if round_filters(base, lo) == channels and lo < hi else None


def _nice_value(lo: float, hi: float, ok: Any) -> float | None:
    """The value in [lo, hi] with the fewest decimals that ``ok`` accepts."""
    for digits in range(1, 8):
        step = 10.0**-digits
        v = math.ceil(lo / step - 1e-9) * step
        while v <= hi + 1e-12:
            v = round(v, digits)
            if ok(v):
                return v
            v += step
    return None


def fit_spec(counts: Counts, labels: Counts | None = None) -> ScalingSpec:
    """An official spec, else a (width, depth) spec, that reproduces ``counts`` on B0.

    ``labels`` holds, field by field, the names to blame in errors (timm keys).
    """
    names = labels or Counts("stem", tuple(f"stage {s}" for s in range(len(counts.outs))), "head",
                              tuple(f"stage {s}" for s in range(len(counts.repeats))))
    if len(counts.outs) != len(B0.stages):
        raise UserError(f"expected {len(B0.stages)} stages, found {len(counts.outs)}")
    for spec in OFFICIAL.values():
        if arch_counts(build_architecture(spec)) == counts:
            return spec
    # Width: each channel count pins w to an interval; blame the first that leaves none.
    lo, hi = 0.0, math.inf
    bases = [(B0.stem_channels, counts.stem, names.stem)]
    bases += [(s.out_channels, c, n) for s, c, n in zip(B0.stages, counts.outs, names.outs, strict=True)]
    bases += [(B0.head_channels, counts.head, names.head)]
    for base, channels, name in bases:
        r = _width_range(base, channels)
        if r is None or r[0] >= hi or r[1] <= lo:
            raise UserError(
                f"{name}: {channels} channels fit no EfficientNet width multiplier together with the "
                "channel counts before it; pass arch= explicitly"
            )
        lo, hi = max(lo, r[0]), min(hi, r[1])
    width = _nice_value(lo, hi, lambda w: all(round_filters(b, w) == c for b, c, _ in bases))
    # Depth: ceil(d * r) == n  <=>  (n - 1) / r < d <= n / r.
    dlo, dhi = 0.0, math.inf
    for stage, n, name in zip(B0.stages, counts.repeats, names.repeats, strict=True):
        a, b = (n - 1) / stage.repeats, n / stage.repeats
        if n < 1 or a >= dhi or b <= dlo:
            raise UserError(
                f"{name}: {n} blocks fit no EfficientNet depth multiplier together with the stages "
                "before it; pass arch= explicitly"
            )
        dlo, dhi = max(dlo, a), min(dhi, b)
    depth = _nice_value(dlo, dhi, lambda d: all(
        round_repeats(s.repeats, d) == n for s, n in zip(B0.stages, counts.repeats, strict=True)))
    if width is None or depth is None:  # pragma: no cover - the intervals above are non-empty
        raise UserError("cannot infer width and depth from the checkpoint; pass arch= explicitly")
    # Resolution and dropout are not in a checkpoint: guess them from the paper's constants.
    phi = max(0.0, (math.log(width) / math.log(PAPER_CONSTANTS["beta"])
                    + math.log(depth) / math.log(PAPER_CONSTANTS["alpha"])) / 2)
    spec = ScalingSpec(f"w{width:g}-d{depth:g}", width, depth,
                       round_resolution(224 * PAPER_CONSTANTS["gamma"] ** phi), formula_dropout(phi))
    assert arch_counts(build_architecture(spec)) == counts
    return spec


def spec_for_arch(arch: Architecture) -> ScalingSpec | None:
    """The official or (width, depth) spec whose B0 scaling gives ``arch``; None if none does."""
    try:
        spec = fit_spec(arch_counts(arch))
    except UserError:
        return None
    built = build_architecture(spec)
    same = [dataclasses.replace(b, drop_path=0.0) for b in built.blocks] == [
        dataclasses.replace(b, drop_path=0.0) for b in arch.blocks]
    return spec if same and built.stem_stride == arch.stem_stride else None
