"""timm EfficientNet checkpoints in, our own weight files in and out.

Why: ImageNet-trained EfficientNets are public as timm checkpoints (the
``tf_efficientnet_*`` ones are ports of the official TensorFlow weights), and
fine-tuning or checking the paper's numbers starts from them.

* ``load_timm(source)`` builds our ``EfficientNet`` from a timm state dict (an
  in-memory dict, a ``.safetensors`` file, or a ``.pth``/``.bin`` file read with
  ``torch.load(weights_only=True)``), inferring the architecture and class count
  from the tensor shapes. Only timm's ``tf_`` variants (TF 'SAME' padding, BatchNorm
  epsilon 1e-3) compute exactly what our model computes; the PyTorch-native
  ``efficientnet_b*`` ones have the same tensors but symmetric padding and epsilon
  1e-5, so they load but their outputs differ slightly.
* ``save_weights`` / ``load_weights``: our format, a safetensors file keyed by our
  flat state paths (``blocks.3.dw_conv.kernel``; parameters and BatchNorm running
  statistics) with JSON metadata that rebuilds the model (``config.init_from``).
* ``to_timm_state_dict`` goes back to timm's layout.

Both ``model.kernels`` layer sets (``"fast"``, ``"reference"``) hold the same variables
under the same paths and shapes (one parameter layout, model.py), so every function here
serves either without conversion; ``kernels`` picks the set a loader builds. So does
``model.scan_blocks``: the stacked layout of a scan over blocks exists only inside the forward.

The core does not need torch: it is imported lazily, only to read ``.pth`` files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effnet_jax.arch import B0, Architecture, BlockSpec
from effnet_jax.errors import UserError
from effnet_jax.model import EfficientNet, layers_for
from effnet_jax.scaling import (
    OFFICIAL,
    PAPER_CONSTANTS,
    ScalingSpec,
    build_architecture,
    formula_dropout,
    resolve,
    round_filters,
    round_repeats,
    round_resolution,
)

FORMAT = "effnet_jax.weights"
FORMAT_VERSION = 1
METADATA_KEY = "effnet_jax"
TORCH_SUFFIXES = (".pth", ".pt", ".bin")

_BN_NAMES = (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var"))
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


# ---------------------------------------------------------------------------
# Layout: which timm tensor is which of our variables.


class _Entry(NamedTuple):
    timm_key: str
    path: tuple[str | int, ...]  # our flat state path
    kind: str  # conv | dw | se | dense | vec: how the tensor is laid out
    shape: tuple[int, ...]  # ours


def _timm_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind in ("conv", "dw"):  # HWIO -> OIHW; depthwise (k, k, 1, C) -> (C, 1, k, k)
        return (shape[3], shape[2], shape[0], shape[1])
    if kind == "se":  # Linear (in, out) -> 1x1 conv (out, in, 1, 1)
        return (shape[1], shape[0], 1, 1)
    if kind == "dense":
        return (shape[1], shape[0])
    return shape


def _to_ours(kind: str, a: np.ndarray) -> np.ndarray:
    if kind in ("conv", "dw"):
        return a.transpose(2, 3, 1, 0)
    if kind == "se":
        return a[:, :, 0, 0].T
    if kind == "dense":
        return a.T
    return a


def _to_timm(kind: str, a: np.ndarray) -> np.ndarray:
    if kind in ("conv", "dw"):
        return a.transpose(3, 2, 0, 1)
    if kind == "se":
        return a.T[:, :, None, None]
    if kind == "dense":
        return a.T
    return a


def _layout(arch: Architecture, num_classes: int | None) -> list[_Entry]:
    """Every timm tensor of ``arch`` in timm's order (no classifier if num_classes is None)."""
    out: list[_Entry] = []

    def conv(key: str, path: tuple, cin: int, cout: int, k: int) -> None:
        out.append(_Entry(f"{key}.weight", (*path, "kernel"), "conv", (k, k, cin, cout)))

    def bn(key: str, path: tuple, c: int) -> None:
        out.extend(_Entry(f"{key}.{theirs}", (*path, ours), "vec", (c,)) for ours, theirs in _BN_NAMES)

    def dw_se(key: str, path: tuple, b: BlockSpec, bn_name: str) -> None:
        mid = b.mid_channels
        out.append(_Entry(f"{key}.conv_dw.weight", (*path, "dw_conv", "kernel"), "dw", (b.kernel, b.kernel, 1, mid)))
        bn(f"{key}.{bn_name}", (*path, "dw_bn"), mid)
        if b.se_channels:
            se, r = (*path, "se"), b.se_channels
            out.append(_Entry(f"{key}.se.conv_reduce.weight", (*se, "reduce", "kernel"), "se", (mid, r)))
            out.append(_Entry(f"{key}.se.conv_reduce.bias", (*se, "reduce", "bias"), "vec", (r,)))
            out.append(_Entry(f"{key}.se.conv_expand.weight", (*se, "expand", "kernel"), "se", (r, mid)))
            out.append(_Entry(f"{key}.se.conv_expand.bias", (*se, "expand", "bias"), "vec", (mid,)))

    conv("conv_stem", ("stem_conv",), 3, arch.stem_channels, 3)
    bn("bn1", ("stem_bn",), arch.stem_channels)
    for i, b in enumerate(arch.blocks):
        key, path = f"blocks.{b.stage}.{b.index}", ("blocks", i)
        if b.expand == 1:  # timm DepthwiseSeparableConv
            dw_se(key, path, b, "bn1")
            conv(f"{key}.conv_pw", (*path, "project_conv"), b.mid_channels, b.out_channels, 1)
            bn(f"{key}.bn2", (*path, "project_bn"), b.out_channels)
        else:  # timm InvertedResidual
            conv(f"{key}.conv_pw", (*path, "expand_conv"), b.in_channels, b.mid_channels, 1)
            bn(f"{key}.bn1", (*path, "expand_bn"), b.mid_channels)
            dw_se(key, path, b, "bn2")
            conv(f"{key}.conv_pwl", (*path, "project_conv"), b.mid_channels, b.out_channels, 1)
            bn(f"{key}.bn3", (*path, "project_bn"), b.out_channels)
    conv("conv_head", ("head_conv",), arch.blocks[-1].out_channels, arch.head_channels, 1)
    bn("bn2", ("head_bn",), arch.head_channels)
    if num_classes is not None:
        out.append(_Entry("classifier.weight", ("classifier", "kernel"), "dense", (arch.head_channels, num_classes)))
        out.append(_Entry("classifier.bias", ("classifier", "bias"), "vec", (num_classes,)))
    return out


# ---------------------------------------------------------------------------
# Reading checkpoints.


def _as_numpy(key: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bf16/fp16 widen to float32
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    a = np.asarray(value)
    if a.dtype.kind not in "fiub":
        raise UserError(f"checkpoint entry {key!r} is not a numeric array (got {type(value).__name__})")
    return a


def _read_torch(path: str) -> Mapping[str, Any]:
    try:
        import torch
    except ImportError:
        raise UserError(
            f"reading {path} needs PyTorch (torch.load with weights_only=True); install torch "
            "or pass a .safetensors file"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types; weights_only refusals included
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {path} with torch.load(weights_only=True): {first}") from None


def read_checkpoint(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, np.ndarray]:
    """A timm state dict as numpy arrays, from a dict, ``.safetensors`` or ``.pth``/``.bin`` file.

    Unwraps timm training checkpoints (``{"state_dict": ...}``), strips a DataParallel
    ``module.`` prefix and drops ``num_batches_tracked``. Never unpickles code.
    """
    if isinstance(source, Mapping):
        state: Mapping[str, Any] = source
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise UserError(f"checkpoint not found: {path}")
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            try:
                state = load_file(path)
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise UserError(f"cannot read safetensors file {path}: {e}") from None
        elif path.endswith(TORCH_SUFFIXES):
            state = _read_torch(path)
        else:
            raise UserError(f"unknown checkpoint type {path}: expected .safetensors, .pth, .pt or .bin")
    else:
        raise UserError(f"checkpoint must be a dict of arrays or a file path, got {type(source).__name__}")
    if not isinstance(state, Mapping):
        raise UserError(f"checkpoint holds a {type(state).__name__}, not a dict of arrays")
    if "conv_stem.weight" not in state:
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                break
    keys = list(state)
    if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return {str(k): _as_numpy(str(k), v) for k, v in state.items() if not str(k).endswith("num_batches_tracked")}


# ---------------------------------------------------------------------------
# Inferring the scaling from channel counts and repeats.


@dataclasses.dataclass(frozen=True)
class _Counts:
    """What a checkpoint fixes about a B0-structured network."""

    stem: int
    outs: tuple[int, ...]
    head: int
    repeats: tuple[int, ...]


def _counts(arch: Architecture) -> _Counts:
    stages = sorted({b.stage for b in arch.blocks})
    return _Counts(
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


def _fit_spec(counts: _Counts, labels: _Counts | None = None) -> ScalingSpec:
    """An official spec, else a (width, depth) spec, that reproduces ``counts`` on B0.

    ``labels`` holds, field by field, the names to blame in errors (timm keys).
    """
    names = labels or _Counts("stem", tuple(f"stage {s}" for s in range(len(counts.outs))), "head",
                              tuple(f"stage {s}" for s in range(len(counts.repeats))))
    if len(counts.outs) != len(B0.stages):
        raise UserError(f"expected {len(B0.stages)} stages, found {len(counts.outs)}")
    for spec in OFFICIAL.values():
        if _counts(build_architecture(spec)) == counts:
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
    assert _counts(build_architecture(spec)) == counts
    return spec


def spec_for_arch(arch: Architecture) -> ScalingSpec | None:
    """The official or (width, depth) spec whose B0 scaling gives ``arch``; None if none does."""
    try:
        spec = _fit_spec(_counts(arch))
    except UserError:
        return None
    built = build_architecture(spec)
    same = [dataclasses.replace(b, drop_path=0.0) for b in built.blocks] == [
        dataclasses.replace(b, drop_path=0.0) for b in arch.blocks]
    return spec if same and built.stem_stride == arch.stem_stride else None


def _shape(state: Mapping[str, np.ndarray], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise UserError(f"checkpoint is not a timm EfficientNet: missing key {key}")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise UserError(f"checkpoint is not a timm EfficientNet: {key} has shape {shape}, expected {ndim} dims")
    return shape


def infer_spec(state: Mapping[str, np.ndarray]) -> ScalingSpec:
    """The scaling of a timm EfficientNet state dict, from its channel counts and block keys.

    Official b0..b8/l2 are recognised by name; anything else that B0's block table
    scaled by some width and depth reproduces gets a ``w<width>-d<depth>`` spec (with a
    guessed resolution and dropout, which checkpoints do not record).
    """
    repeats: dict[int, int] = {}
    for key in state:
        m = _BLOCK_KEY.match(key)
        if m:
            s, i = int(m.group(1)), int(m.group(2))
            repeats[s] = max(repeats.get(s, 0), i + 1)
    n_stages = len(B0.stages)
    for s in range(n_stages):
        if s not in repeats:
            raise UserError(f"checkpoint is not a timm EfficientNet: missing key blocks.{s}.0.conv_dw.weight")
    out_keys = ["blocks.0.0.conv_pw.weight"] + [f"blocks.{s}.0.conv_pwl.weight" for s in range(1, n_stages)]
    counts = _Counts(
        stem=_shape(state, "conv_stem.weight", 4)[0],
        outs=tuple(_shape(state, k, 4)[0] for k in out_keys),
        head=_shape(state, "conv_head.weight", 4)[0],
        repeats=tuple(repeats[s] for s in range(n_stages)),
    )
    labels = _Counts("conv_stem.weight", tuple(out_keys), "conv_head.weight",
                     tuple(f"blocks.{s}" for s in range(n_stages)))
    return _fit_spec(counts, labels)


def _check_layout(state: Mapping[str, np.ndarray], layout: list[_Entry], what: str) -> None:
    """One-line UserError for the first missing, misshapen or unexpected tensor."""
    for e in layout:
        if e.timm_key not in state:
            raise UserError(f"checkpoint does not fit {what}: missing key {e.timm_key}")
        got, want = tuple(state[e.timm_key].shape), _timm_shape(e.kind, e.shape)
        if got != want:
            raise UserError(f"checkpoint does not fit {what}: {e.timm_key} has shape {got}, expected {want}")
    expected = {e.timm_key for e in layout}
    extra = [k for k in state if k not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise UserError(f"checkpoint does not fit {what}: unexpected key {extra[0]}{more}")


# ---------------------------------------------------------------------------
# Filling a model.


def _param_state(model: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
    return list(nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))


def _path_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _assign(model: nnx.Module, values: Mapping[tuple, np.ndarray], skip: tuple[str, ...] = ()) -> None:
    """Write ``values`` (our layout, keyed by path) into the model's parameters and stats."""
    new = []
    for path, var in _param_state(model):
        if path[0] in skip:
            continue
        value = values[path]
        if tuple(value.shape) != tuple(var.shape):  # pragma: no cover - checked against the layout first
            raise UserError(f"{_path_key(path)} has shape {tuple(value.shape)}, expected {tuple(var.shape)}")
        # np.array copies: a torch tensor's .numpy() shares memory, and JAX may not copy on CPU.
        new.append((path, var.replace(jnp.asarray(np.array(value, dtype=var.get_value().dtype)))))
    nnx.update(model, nnx.from_flat_state(new))


def _arch_from(arch: str | ScalingSpec | Architecture) -> tuple[Architecture, ScalingSpec | None]:
    if isinstance(arch, Architecture):
        return arch, None
    if isinstance(arch, str):
        arch = re.sub(r"^(tf_)?efficientnet_", "", arch.strip().lower()).split(".")[0]
    spec = resolve(arch)
    return build_architecture(spec), spec


def load_timm(
    source: Mapping[str, Any] | str | os.PathLike,
    arch: str | ScalingSpec | Architecture | None = None,
    num_classes: int | None = None,
    *,
    dtype: Any = jnp.float32,
    kernels: str = "auto",
    depthwise_impl: str = "auto",
    scan_blocks: bool = False,
) -> EfficientNet:
    """Our EfficientNet with a timm checkpoint's weights and BatchNorm running statistics.

    ``source``: a state dict (numpy arrays or torch tensors), a ``.safetensors`` path,
    or a ``.pth``/``.bin`` path (needs torch; read with ``weights_only=True``).
    ``arch``: "b0".."b8", "l2", "tf_efficientnet_b3", a ScalingSpec or an Architecture;
    inferred from the tensor shapes when None, as is ``num_classes``. A checkpoint
    without a classifier (timm ``num_classes=0``) needs ``num_classes`` and gets a
    freshly initialised one. Any tensor that does not fit raises a one-line UserError
    naming it. ``kernels`` / ``depthwise_impl`` pick the layer set (``model.layers_for``),
    ``scan_blocks`` how the forward runs repeated blocks (same weights either way).
    The model comes back in training mode, like ``create_model``: use
    ``eval_view(model)`` for inference.
    """
    state = read_checkpoint(source)
    if arch is None:
        spec = infer_spec(state)
        architecture = build_architecture(spec)
        what = f"inferred architecture {spec.name}"
    else:
        architecture, spec = _arch_from(arch)
        what = f"architecture {spec.name}" if spec else "the given Architecture"
    has_head = "classifier.weight" in state or "classifier.bias" in state
    if has_head:
        ckpt_classes = _shape(state, "classifier.weight", 2)[0]
        if num_classes is not None and num_classes != ckpt_classes:
            raise UserError(
                f"classifier.weight has {ckpt_classes} classes, not num_classes={num_classes}; to fine-tune with "
                "a new head, convert it (scripts/convert_timm.py) and use load_weights(..., reset_classifier=True)"
            )
        num_classes = ckpt_classes
    elif num_classes is None:
        raise UserError("checkpoint has no classifier (missing key classifier.weight): pass num_classes")
    layout = _layout(architecture, num_classes if has_head else None)
    _check_layout(state, layout, what)
    model = EfficientNet(architecture, num_classes, dropout=spec.dropout if spec else 0.2,
                         layers=layers_for(kernels, depthwise_impl=depthwise_impl), dtype=dtype,
                         scan_blocks=scan_blocks, rngs=nnx.Rngs(0))
    _assign(model, {e.path: _to_ours(e.kind, state[e.timm_key]) for e in layout},
            skip=() if has_head else ("classifier",))
    return model


def to_timm_state_dict(model: EfficientNet) -> dict[str, np.ndarray]:
    """The model's weights and statistics as a timm state dict of numpy arrays.

    Includes ``num_batches_tracked`` (zero) so ``timm_model.load_state_dict`` works
    with ``strict=True`` after ``torch.from_numpy`` on each value.
    """
    ours = {path: np.asarray(jax.device_get(var.get_value())) for path, var in _param_state(model)}
    out: dict[str, np.ndarray] = {}
    for e in _layout(model.arch, model.classifier.out_features):
        out[e.timm_key] = np.ascontiguousarray(_to_timm(e.kind, ours[e.path]).astype(np.float32))
        if e.timm_key.endswith(".running_var"):
            out[e.timm_key.removesuffix("running_var") + "num_batches_tracked"] = np.array(0, dtype=np.int64)
    return out


# ---------------------------------------------------------------------------
# Our own weight files.


def _arch_to_json(arch: Architecture) -> dict[str, Any]:
    return {
        "stem_channels": arch.stem_channels,
        "head_channels": arch.head_channels,
        "stem_stride": arch.stem_stride,
        "blocks": [dataclasses.asdict(b) for b in arch.blocks],
    }


def _arch_from_json(data: dict[str, Any]) -> Architecture:
    return Architecture(
        stem_channels=int(data["stem_channels"]),
        blocks=tuple(BlockSpec(**b) for b in data["blocks"]),
        head_channels=int(data["head_channels"]),
        stem_stride=int(data["stem_stride"]),
    )


def save_weights(model: EfficientNet, path: str | os.PathLike, spec: str | ScalingSpec | None = None) -> None:
    """Write parameters and BatchNorm statistics to a safetensors file that rebuilds the model.

    Keys are our flat state paths; the metadata holds the expanded architecture, the
    ScalingSpec (given, or recognised from the architecture), class count and dropout,
    so ``load_weights`` needs nothing else. Written atomically (temp file + rename).
    """
    from safetensors.numpy import save_file

    from effnet_jax import __version__

    spec = resolve(spec) if spec is not None else spec_for_arch(model.arch)
    official = next((n for n, s in OFFICIAL.items() if s == spec), None)
    tensors = {}
    for p, var in _param_state(model):
        a = np.asarray(jax.device_get(var.get_value()))
        if a.dtype not in (np.float16, np.float32, np.float64):
            a = a.astype(np.float32)
        tensors[_path_key(p)] = np.ascontiguousarray(a)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "effnet_jax_version": __version__,
        "official": official,
        "spec": dataclasses.asdict(spec) if spec else None,
        "num_classes": int(model.classifier.out_features),
        "dropout": float(model.dropout.rate),
        "arch": _arch_to_json(model.arch),
    }
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _saved_layout(path: str | os.PathLike) -> tuple[dict[str, Any], Architecture, int]:
    """A weight file's metadata, the architecture it holds and its class count."""
    meta = read_metadata(path)
    try:
        return meta, _arch_from_json(meta["arch"]), int(meta["num_classes"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: corrupt metadata ({e!r})") from None


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a ``save_weights`` file (spec, num_classes, arch, version)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"weights file not found: {path}")
    try:
        with safe_open(path, framework="numpy") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise UserError(f"cannot read weights file {path}: {e}") from None
    if raw is None:
        hint = " (a timm checkpoint: use load_timm or scripts/convert_timm.py)" if "conv_stem.weight" in keys else ""
        raise UserError(f"{path} is not an effnet_jax weights file{hint}")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: corrupt metadata: {e}") from None
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise UserError(f"{path}: unsupported weights format {meta.get('format')!r} v{meta.get('format_version')}")
    return meta


def _arch_difference(saved: Architecture, model: Architecture) -> str | None:
    """The first way two architectures differ (stochastic depth aside), or None."""
    for field in ("stem_channels", "stem_stride", "head_channels"):
        if getattr(saved, field) != getattr(model, field):
            return f"{field} is {getattr(saved, field)} in the file, {getattr(model, field)} in the model"
    if len(saved.blocks) != len(model.blocks):
        return f"the file has {len(saved.blocks)} blocks, the model {len(model.blocks)}"
    for i, (a, b) in enumerate(zip(saved.blocks, model.blocks, strict=True)):
        if dataclasses.replace(a, drop_path=0.0) != dataclasses.replace(b, drop_path=0.0):
            return f"block {i} differs (file {a}, model {b})"
    return None


def load_weights_into(
    model: EfficientNet, path: str | os.PathLike, *, reset_classifier: bool | None = None
) -> list[str]:
    """Copy a ``save_weights`` file into an existing model (the trainer's ``init_from``).

    The architectures must match (stochastic depth may differ). ``reset_classifier``:
    True keeps the model's own classifier (fine-tuning), False demands the file's fit,
    None (default) keeps the model's only when the class counts differ. Returns the
    keys that were not loaded, so the caller can log them.
    """
    from safetensors.numpy import load_file

    meta, saved_arch, saved_classes = _saved_layout(path)
    diff = _arch_difference(saved_arch, model.arch)
    if diff:
        name = (meta.get("spec") or {}).get("name", "another architecture")
        raise UserError(f"{path} holds {name}, which does not fit the model: {diff}")
    model_classes = int(model.classifier.out_features)
    if reset_classifier is None:
        reset_classifier = model_classes != saved_classes
    elif not reset_classifier and model_classes != saved_classes:
        raise UserError(
            f"{path} has a {saved_classes}-class classifier, the model {model_classes} classes; "
            "pass reset_classifier=True to start a fresh classifier (fine-tuning)"
        )
    tensors = load_file(os.fspath(path))
    skip = ("classifier",) if reset_classifier else ()
    wanted = {_path_key(p): (p, tuple(v.shape)) for p, v in _param_state(model) if p[0] not in skip}
    for key, (_, shape) in wanted.items():
        if key not in tensors:
            raise UserError(f"{path} does not fit its architecture: missing key {key}")
        if tuple(tensors[key].shape) != shape:
            raise UserError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
    skipped = [k for k in tensors if k not in wanted]
    extra = [k for k in skipped if not (skip and k.startswith("classifier."))]
    if extra:
        raise UserError(f"{path} does not fit its architecture: unexpected key {extra[0]}")
    _assign(model, {p: tensors[k] for k, (p, _) in wanted.items()}, skip=skip)
    return skipped


def load_weights(
    path: str | os.PathLike,
    num_classes: int | None = None,
    *,
    reset_classifier: bool = False,
    seed: int = 0,
    dtype: Any = jnp.float32,
    kernels: str = "auto",
    depthwise_impl: str = "auto",
    dropout: float | None = None,
    drop_path_rate: float | None = None,
    scan_blocks: bool = False,
) -> EfficientNet:
    """Rebuild a model saved by ``save_weights``, in training mode.

    ``num_classes`` defaults to the file's. A different class count needs
    ``reset_classifier=True``, which keeps every weight but the classifier and starts
    that fresh from ``seed`` (fine-tuning). ``dropout`` defaults to the file's;
    ``drop_path_rate`` re-spreads stochastic depth linearly over the blocks; ``kernels`` /
    ``depthwise_impl`` pick the layer set (``model.layers_for``), ``scan_blocks`` how the forward runs
    repeated blocks.
    """
    meta, arch, saved_classes = _saved_layout(path)
    if drop_path_rate is not None:
        n = len(arch.blocks)
        arch = dataclasses.replace(arch, blocks=tuple(
            dataclasses.replace(b, drop_path=drop_path_rate * i / n) for i, b in enumerate(arch.blocks)))
    model = EfficientNet(arch, saved_classes if num_classes is None else num_classes,
                         dropout=meta.get("dropout", 0.2) if dropout is None else dropout,
                         layers=layers_for(kernels, depthwise_impl=depthwise_impl), dtype=dtype,
                         scan_blocks=scan_blocks, rngs=nnx.Rngs(seed))
    load_weights_into(model, path, reset_classifier=reset_classifier)
    return model
