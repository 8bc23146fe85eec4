"""The EfficientNet architecture as data.

A network is a stem, a table of stages and a head. Each stage is a row of the
paper's Table 1; the builder (``scaling.build_architecture``) expands rows into
per-block specs, and ``model.EfficientNet`` turns those into layers. Change the
table, not the code, to try another architecture.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One row of the block table: ``repeats`` MBConv blocks with the same shape."""

    kernel: int
    stride: int  # applies to the first block of the stage only
    expand: int  # expansion ratio of the inverted bottleneck
    out_channels: int
    repeats: int
    se_ratio: float = 0.25  # of the block's *input* channels


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """Stem, stage table and head of an unscaled network."""

    stages: tuple[StageSpec, ...]
    stem_channels: int = 32
    head_channels: int = 1280
    stem_stride: int = 2


# EfficientNet-B0 (Tan & Le 2019, Table 1).
B0 = NetworkSpec(
    stages=(
        StageSpec(kernel=3, stride=1, expand=1, out_channels=16, repeats=1),
        StageSpec(kernel=3, stride=2, expand=6, out_channels=24, repeats=2),
        StageSpec(kernel=5, stride=2, expand=6, out_channels=40, repeats=2),
        StageSpec(kernel=3, stride=2, expand=6, out_channels=80, repeats=3),
        StageSpec(kernel=5, stride=1, expand=6, out_channels=112, repeats=3),
        StageSpec(kernel=5, stride=2, expand=6, out_channels=192, repeats=4),
        StageSpec(kernel=3, stride=1, expand=6, out_channels=320, repeats=1),
    ),
)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One concrete MBConv block after scaling: every number the layers need."""

    stage: int
    index: int  # position inside its stage
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    expand: int
    se_channels: int  # 0 means no squeeze-excite
    drop_path: float  # stochastic-depth drop rate of this block

    @property
    def mid_channels(self) -> int:
        return self.in_channels * self.expand

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A fully expanded network: what the model builder and cost counter read."""

    stem_channels: int
    blocks: tuple[BlockSpec, ...]
    head_channels: int
    stem_stride: int = 2

    @property
    def total_stride(self) -> int:
        stride = self.stem_stride
        for block in self.blocks:
            stride *= block.stride
        return stride


# A three-stage toy network for tests and quick CPU experiments: same block anatomy,
# a fraction of the compile time. Not an EfficientNet from the paper.
TINY = NetworkSpec(
    stages=(
        StageSpec(kernel=3, stride=1, expand=1, out_channels=8, repeats=1),
        StageSpec(kernel=3, stride=2, expand=4, out_channels=16, repeats=2),
        StageSpec(kernel=5, stride=2, expand=4, out_channels=24, repeats=1),
    ),
    stem_channels=8,
    head_channels=64,
)

NETWORKS = {"b0": B0, "tiny": TINY}
