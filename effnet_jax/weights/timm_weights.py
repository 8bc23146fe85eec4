"""timm EfficientNet checkpoints in and out of our model.

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
* ``to_timm_state_dict`` goes back to timm's layout.

Both ``model.kernels`` layer sets hold the same variables under the same paths and shapes
(one parameter layout, model.py), so the conversion serves either; ``kernels`` picks the
set a loader builds. The core does not need torch: it is imported lazily, only to read
``.pth`` files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effnet_jax.errors import UserError
from effnet_jax.model.arch import B0, Architecture, BlockSpec
from effnet_jax.model.efficientnet import EfficientNet, layers_for
from effnet_jax.model.scaling import ScalingSpec, build_architecture, resolve
from effnet_jax.model.spec_inference import Counts, fit_spec
from effnet_jax.weights.weight_files import assign, param_state

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
# The scaling of a checkpoint, and whether it fits.


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
    counts = Counts(
        stem=_shape(state, "conv_stem.weight", 4)[0],
        outs=tuple(_shape(state, k, 4)[0] for k in out_keys),
        head=_shape(state, "conv_head.weight", 4)[0],
        repeats=tuple(repeats[s] for s in range(n_stages)),
    )
    labels = Counts("conv_stem.weight", tuple(out_keys), "conv_head.weight",
                     tuple(f"blocks.{s}" for s in range(n_stages)))
    return fit_spec(counts, labels)


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
# Loading and exporting.


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
    assign(model, {e.path: _to_ours(e.kind, state[e.timm_key]) for e in layout},
            skip=() if has_head else ("classifier",))
    return model


def to_timm_state_dict(model: EfficientNet) -> dict[str, np.ndarray]:
    """The model's weights and statistics as a timm state dict of numpy arrays.

    Includes ``num_batches_tracked`` (zero) so ``timm_model.load_state_dict`` works
    with ``strict=True`` after ``torch.from_numpy`` on each value.
    """
    ours = {path: np.asarray(jax.device_get(var.get_value())) for path, var in param_state(model)}
    out: dict[str, np.ndarray] = {}
    for e in _layout(model.arch, model.classifier.out_features):
        out[e.timm_key] = np.ascontiguousarray(_to_timm(e.kind, ours[e.path]).astype(np.float32))
        if e.timm_key.endswith(".running_var"):
            out[e.timm_key.removesuffix("running_var") + "num_batches_tracked"] = np.array(0, dtype=np.int64)
    return out
