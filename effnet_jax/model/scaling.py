"""Compound scaling as pure functions over the block table.

Two ways to get a scaling spec:

* the official table (``OFFICIAL["b3"]``): hand-rounded coefficients from the
  reference TensorFlow code, which are *not* ``alpha**phi`` etc.;
* the formula (``from_constants(alpha, beta, gamma, phi)``): depth ``alpha**phi``,
  width ``beta**phi``, resolution ``base * gamma**phi``, which is what a grid search
  over (alpha, beta, gamma) hands on.

``build_architecture`` then applies a spec to a ``NetworkSpec`` with the official
rounding rules (``round_filters``, ``round_repeats``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from effnet_jax.errors import UserError
from effnet_jax.model.arch import B0, NETWORKS, Architecture, BlockSpec, NetworkSpec

PAPER_CONSTANTS = {"alpha": 1.2, "beta": 1.1, "gamma": 1.15}
# Bounds on a formula spec: far past any model that fits a machine (L2 is 4.3x wide, 5.3x deep,
# 800 px), low enough that a typo in phi (1e6 for 1.6) fails with its name, not an OverflowError.
MAX_MULTIPLIER = 1000.0
MAX_RESOLUTION = 10_000


@dataclasses.dataclass(frozen=True)
class ScalingSpec:
    """How much wider, deeper and larger-input a model is than the baseline."""

    name: str
    width: float
    depth: float
    resolution: int
    dropout: float


# name: (width, depth, resolution, dropout), tensorflow/tpu efficientnet_builder.py
OFFICIAL: dict[str, ScalingSpec] = {
    name: ScalingSpec(name, w, d, r, p)
    for name, (w, d, r, p) in {
        "b0": (1.0, 1.0, 224, 0.2),
        "b1": (1.0, 1.1, 240, 0.2),
        "b2": (1.1, 1.2, 260, 0.3),
        "b3": (1.2, 1.4, 300, 0.3),
        "b4": (1.4, 1.8, 380, 0.4),
        "b5": (1.6, 2.2, 456, 0.4),
        "b6": (1.8, 2.6, 528, 0.5),
        "b7": (2.0, 3.1, 600, 0.5),
        "b8": (2.2, 3.6, 672, 0.5),
        "l2": (4.3, 5.3, 800, 0.5),
    }.items()
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by ``width``, rounded to a multiple of ``divisor``.

    As the official code: round half up to the divisor, never below it, and add one
    more divisor if rounding lost more than 10% of the scaled channels.
    """
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """Blocks in a stage scaled by ``depth``, rounded up (the official rule)."""
    return int(math.ceil(depth * repeats))


def round_resolution(resolution: float, multiple: int = 8) -> int:
    """Nearest multiple of ``multiple`` (at least one multiple).

    Multiples of 8 keep feature maps aligned for accelerators; a grid search at tiny
    base resolutions (e.g. 32 px) passes ``multiple=1`` so gamma steps stay distinct.
    """
    return max(multiple, int(round(resolution / multiple)) * multiple)


def formula_dropout(phi: float, base: float = 0.2) -> float:
    """Dropout that follows the official table's pattern: +0.1 every 2 phi, max 0.5."""
    return min(0.5, base + 0.1 * math.floor(max(phi, 0.0) / 2))


def from_constants(
    alpha: float,
    beta: float,
    gamma: float,
    phi: float,
    base_resolution: int = 224,
    resolution_multiple: int = 8,
    name: str | None = None,
) -> ScalingSpec:
    """The paper's formula: depth alpha**phi, width beta**phi, resolution gamma**phi."""
    check_constants({"alpha": alpha, "beta": beta, "gamma": gamma})
    if not math.isfinite(phi) or phi < 0:
        raise UserError(f"phi must be a finite number >= 0, got {phi!r}")
    if base_resolution < 1:
        raise UserError(f"base resolution must be positive, got {base_resolution!r}")
    # In logs: alpha**1e6 itself would raise OverflowError.
    too_big = [f"{what} multiplier {base:g}**{phi:g}" for what, base in (("depth", alpha), ("width", beta))
               if phi * math.log(base) > math.log(MAX_MULTIPLIER)]
    if too_big:
        raise UserError(f"phi {phi:g} is too large: the {' and '.join(too_big)} would exceed "
                        f"{MAX_MULTIPLIER:g}")
    if math.log(base_resolution) + phi * math.log(gamma) > math.log(MAX_RESOLUTION):
        raise UserError(f"phi {phi:g} is too large: the resolution {base_resolution} * {gamma:g}**{phi:g} "
                        f"would exceed {MAX_RESOLUTION} px")
    return ScalingSpec(
        name=name or f"a{alpha:g}-b{beta:g}-g{gamma:g}-phi{phi:g}",
        width=beta**phi,
        depth=alpha**phi,
        resolution=round_resolution(base_resolution * gamma**phi, resolution_multiple),
        dropout=formula_dropout(phi),
    )


def check_constants(constants: dict[str, Any]) -> dict[str, float]:
    """Return {alpha, beta, gamma} as floats, each finite and >= 1, else UserError."""
    out = {}
    for key in ("alpha", "beta", "gamma"):
        if key not in constants:
            raise UserError(f"scaling constants lack {key!r}")
        value = constants[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 1:
            raise UserError(f"{key} must be a finite number >= 1, got {value!r}")
        out[key] = float(value)
    return out


def load_constants(path: str | os.PathLike) -> dict[str, float]:
    """Read alpha, beta, gamma from a JSON file such as the grid search's best.json."""
    return read_constants_file(path)[0]


def read_constants_file(path: str | os.PathLike) -> tuple[dict[str, float], dict[str, Any]]:
    """(alpha/beta/gamma, the whole JSON object) of a constants file such as best.json, read once."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"constants file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read constants file {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"constants file {path} must hold a JSON object")
    if data.get("answer") is False:  # a search whose trials did not learn marks its best.json so
        raise UserError(f"{path} is no answer: {data.get('reason') or 'its search marked it so'}")
    try:
        return check_constants(data), data
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def resolve(spec_or_name: str | ScalingSpec) -> ScalingSpec:
    """A ScalingSpec from an official name ("b0".."b8", "l2") or a spec itself."""
    if isinstance(spec_or_name, ScalingSpec):
        return spec_or_name
    key = str(spec_or_name).lower().removeprefix("efficientnet-").removeprefix("efficientnet_")
    if key not in OFFICIAL:
        raise UserError(
            f"unknown model {spec_or_name!r}; expected one of {', '.join(OFFICIAL)} "
            "or a ScalingSpec from scaling.from_constants"
        )
    return OFFICIAL[key]


def build_architecture(
    spec: str | ScalingSpec,
    network: NetworkSpec = B0,
    drop_path_rate: float = 0.2,
) -> Architecture:
    """Expand the stage table into concrete blocks, scaled by ``spec``.

    Stochastic depth grows linearly with the block index: block i of n drops with
    probability ``drop_path_rate * i / n`` (the official and timm rule).
    """
    spec = resolve(spec)
    repeats = [round_repeats(s.repeats, spec.depth) for s in network.stages]
    total = sum(repeats)
    blocks: list[BlockSpec] = []
    in_ch = round_filters(network.stem_channels, spec.width)
    for stage_idx, (stage, n) in enumerate(zip(network.stages, repeats)):
        out_ch = round_filters(stage.out_channels, spec.width)
        for i in range(n):
            blocks.append(
                BlockSpec(
                    stage=stage_idx,
                    index=i,
                    in_channels=in_ch,
                    out_channels=out_ch,
                    kernel=stage.kernel,
                    stride=stage.stride if i == 0 else 1,
                    expand=stage.expand,
                    se_channels=max(1, int(in_ch * stage.se_ratio)) if stage.se_ratio else 0,
                    drop_path=drop_path_rate * len(blocks) / total,
                )
            )
            in_ch = out_ch
    return Architecture(
        stem_channels=round_filters(network.stem_channels, spec.width),
        blocks=tuple(blocks),
        head_channels=round_filters(network.head_channels, spec.width),
        stem_stride=network.stem_stride,
    )


# ------------------------------------------------------- from a trainer config

def model_spec(m: Any) -> ScalingSpec:
    """The ScalingSpec a trainer config's ``model`` section asks for: official name, or formula from
    constants (a best.json path, read here once) and phi."""
    if m.name == "formula":
        if m.constants:
            constants = load_constants(os.path.expanduser(m.constants))
        else:
            constants = check_constants({"alpha": m.alpha, "beta": m.beta, "gamma": m.gamma})
        spec = from_constants(**constants, phi=m.phi, base_resolution=m.base_resolution,
                              resolution_multiple=m.resolution_multiple)
    else:
        spec = resolve(m.name)
    if m.resolution > 0:
        spec = dataclasses.replace(spec, resolution=int(m.resolution))
    if m.dropout >= 0:
        spec = dataclasses.replace(spec, dropout=float(m.dropout))
    return spec


def network(m: Any) -> NetworkSpec:
    """The block table a ``model`` section names (arch.NETWORKS)."""
    if m.network not in NETWORKS:
        raise UserError(f"model.network must be one of {', '.join(NETWORKS)}, got {m.network!r}")
    return NETWORKS[m.network]


def compute_dtype(name: str) -> Any:
    """model.dtype as a jax dtype: "auto" is float32 on CPU and bfloat16 on GPU/TPU."""
    import jax
    import jax.numpy as jnp

    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if name not in ("float32", "bfloat16"):
        raise UserError(f"model.dtype must be auto, float32 or bfloat16, got {name!r}")
    return jnp.dtype(name)
