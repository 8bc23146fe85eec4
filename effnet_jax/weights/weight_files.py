"""Our weight files: a model's parameters and BatchNorm statistics in a safetensors file.

``save_weights`` / ``load_weights``: keyed by our flat state paths
(``blocks.3.dw_conv.kernel``) with JSON metadata (the expanded architecture, the scaling spec,
class count, dropout) that rebuilds the model, so a file needs nothing else to load;
``load_weights_into`` fills an existing model (the trainer's ``config.model.init_from``).
Both ``model.kernels`` layer sets hold the same variables under the same paths, so one file
serves either. ``assign`` (filling a model from path-keyed arrays) is shared with the timm
conversion.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effnet_jax.errors import UserError
from effnet_jax.model.arch import Architecture, BlockSpec
from effnet_jax.model.efficientnet import EfficientNet, layers_for
from effnet_jax.model.scaling import OFFICIAL, ScalingSpec, resolve
from effnet_jax.model.spec_inference import spec_for_arch

FORMAT = "effnet_jax.weights"
FORMAT_VERSION = 1
METADATA_KEY = "effnet_jax"


# ---------------------------------------------------------------------------
# Filling a model.


def param_state(model: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
    return list(nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))


def path_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def assign(model: nnx.Module, values: Mapping[tuple, np.ndarray], skip: tuple[str, ...] = ()) -> None:
    """Write ``values`` (our layout, keyed by path) into the model's parameters and stats."""
    new = []
    for path, var in param_state(model):
        if path[0] in skip:
            continue
        value = values[path]
        if tuple(value.shape) != tuple(var.shape):  # pragma: no cover - checked against the layout first
            raise UserError(f"{path_key(path)} has shape {tuple(value.shape)}, expected {tuple(var.shape)}")
        # np.array copies: a torch tensor's .numpy() shares memory, and JAX may not copy on CPU.
        new.append((path, var.replace(jnp.asarray(np.array(value, dtype=var.get_value().dtype)))))
    nnx.update(model, nnx.from_flat_state(new))


# ---------------------------------------------------------------------------
# The file format.


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
    for p, var in param_state(model):
        a = np.asarray(jax.device_get(var.get_value()))
        if a.dtype not in (np.float16, np.float32, np.float64):
            a = a.astype(np.float32)
        tensors[path_key(p)] = np.ascontiguousarray(a)
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
    wanted = {path_key(p): (p, tuple(v.shape)) for p, v in param_state(model) if p[0] not in skip}
    for key, (_, shape) in wanted.items():
        if key not in tensors:
            raise UserError(f"{path} does not fit its architecture: missing key {key}")
        if tuple(tensors[key].shape) != shape:
            raise UserError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
    skipped = [k for k in tensors if k not in wanted]
    extra = [k for k in skipped if not (skip and k.startswith("classifier."))]
    if extra:
        raise UserError(f"{path} does not fit its architecture: unexpected key {extra[0]}")
    assign(model, {p: tensors[k] for k, (p, _) in wanted.items()}, skip=skip)
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
