"""MNIST-format IDX files (MNIST, Fashion-MNIST, ...) as an in-memory source, without TensorFlow.

* ``data.name = "idx:/dir"``: ``dir`` holds ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``,
  each plain or gzip-compressed (``.gz``; a plain file is preferred when both exist).
  ``data.name = "fashion_mnist"`` is ``idx:/usr/share/datasets/fashion-mnist``, where
  Debian's ``dataset-fashion-mnist`` package puts Fashion-MNIST.
* Splits: ``train`` and ``test`` (the t10k files). ``data.holdout_fraction`` f > 0 adds
  ``validation``: the last round(n * f) examples of a *fixed* (seed 0, not ``config.seed``)
  class-stratified permutation of train, so every run and seed of a search scores on the
  same validation images and none on test (``data.eval_split = "test"`` still scores on t10k:
  the final check of a winner trained on the same images). The permutation interleaves the classes in
  proportion, so its tail and any prefix have (almost exactly) the class frequencies of train.
* ``data.train_subset`` N > 0: train on the first N examples of that permutation's
  training part only (a few thousand images for a quick search), again the same for every seed.
* ``data.num_classes`` (optional, 0 = infer: 10 for fashion_mnist, else max train label + 1).
* Served like the embedded digits (``input_pipeline.digits_source``): bicubic resize to the
  model resolution on the host CPU (in chunks, only the images actually used), grey repeated
  to RGB, standardised with the mean/std of the training images used.

IDX: big-endian; two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64), the number of dimensions, one 4-byte size per dimension, the data.
Images must be uint8 and labels integers. Any malformed file is a one-line ``UserError``.
The source's ``fingerprint`` holds the sha256 of each file it reads.
"""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Any

import numpy as np

from effnet_jax.data import fingerprint
from effnet_jax.data.input_pipeline import ArraySource, resize_images
from effnet_jax.errors import UserError

PREFIX = "idx:"
FASHION_MNIST = "fashion_mnist"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
HOLDOUT_SEED = 0  # fixed: the validation split must not move with config.seed
RESIZE_CHUNK = 4096  # images per resize call: bounded memory, one compiled shape


def is_idx_name(name: str) -> bool:
    """Whether ``data.name`` names an IDX source ('idx:DIR' or the 'fashion_mnist' alias)."""
    return name == FASHION_MNIST or name.startswith(PREFIX)


def resolve_dir(name: str) -> str:
    """The directory of an IDX ``data.name``."""
    if name == FASHION_MNIST:
        return FASHION_MNIST_DIR
    path = os.path.expanduser(name[len(PREFIX):])
    if not path:
        raise UserError("data.name 'idx:' needs a directory: idx:/path/to/dir")
    return path


def _hint(name: str) -> str:
    return " (apt-get install dataset-fashion-mnist)" if name == FASHION_MNIST else ""


def find_file(directory: str, stem: str, name: str = "") -> str:
    """``directory/stem`` or ``directory/stem.gz``; a UserError naming the file when neither exists."""
    if not os.path.isdir(directory):
        raise UserError(f"IDX dataset directory {directory} not found{_hint(name)}")
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    raise UserError(f"IDX file {stem}[.gz] not found in {directory}{_hint(name)}")


def read_idx(path: str) -> np.ndarray:
    """The array in an IDX file (gzip-compressed or plain), in native byte order."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"cannot read IDX file {path}: {e.strerror or e}") from None
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"corrupt gzip file {path}: {e}") from None
    elif path.endswith(".gz"):
        raise UserError(f"corrupt gzip file {path}: no gzip header")
    if len(raw) < 4:
        raise UserError(f"IDX file {path} is truncated: {len(raw)} bytes, shorter than the 4-byte header")
    if raw[0] or raw[1]:
        raise UserError(f"IDX file {path} has a bad magic number 0x{raw[:4].hex()}: "
                        "expected two zero bytes, a type byte and a dimension count")
    type_byte, ndim = raw[2], raw[3]
    if type_byte not in TYPES:
        raise UserError(f"IDX file {path} has unsupported type byte 0x{type_byte:02x} "
                        f"(supported: {', '.join(f'0x{t:02x}' for t in TYPES)})")
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise UserError(f"IDX file {path} is truncated: header of {ndim} dimensions but {len(raw)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(TYPES[type_byte])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        shape = "x".join(map(str, dims))
        raise UserError(f"IDX file {path} is truncated or corrupt: its header says {shape} "
                        f"({expected} data bytes) but it holds {len(raw) - header}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def load_split(directory: str, split: str, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W) uint8, labels (N,) int32) of one split ('train' or 't10k' files for 'test')."""
    image_path, label_path = (find_file(directory, stem, name) for stem in FILES[split])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise UserError(f"IDX file {image_path} must hold uint8 images of 3 dimensions (N, H, W), "
                        f"got {images.dtype} of shape {images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise UserError(f"IDX file {label_path} must hold integer labels of 1 dimension (N,), "
                        f"got {labels.dtype} of shape {labels.shape}")
    if len(images) != len(labels):
        raise UserError(f"IDX {split} split: {len(images)} images in {os.path.basename(image_path)} "
                        f"but {len(labels)} labels in {os.path.basename(label_path)}")
    if not len(labels):
        raise UserError(f"IDX {split} split in {directory} is empty")
    return images, labels.astype(np.int32)


def stratified_permutation(labels: np.ndarray, seed: int = HOLDOUT_SEED) -> np.ndarray:
    """A random permutation in which every class is spread evenly, so any prefix or tail is stratified.

    Each example of a class with c members gets the key (its shuffled rank in the class + u) / c,
    u uniform in [0, 1); sorting by key interleaves the classes in proportion.
    """
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels))
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        keys[idx] = (rng.permutation(len(idx)) + rng.random(len(idx))) / len(idx)
    return np.argsort(keys, kind="stable")


def select(data: Any, num_train: int, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(train rows, validation rows or None) of the train files from holdout_fraction and train_subset."""
    f = float(data.get("holdout_fraction", 0.0))
    subset = int(data.get("train_subset", 0) or 0)
    if not 0 <= f < 1:
        raise UserError(f"data.holdout_fraction must be in [0, 1), got {f}")
    if subset < 0:
        raise UserError(f"data.train_subset must be >= 0 (0 = all), got {subset}")
    if f == 0 and subset == 0:
        return np.arange(num_train), None
    order = stratified_permutation(labels)
    k = num_train - round(num_train * f)
    if f > 0 and not 0 < k < num_train:
        raise UserError(f"data.holdout_fraction {f} of {num_train} examples leaves an empty train or eval split")
    train, val = order[:k], (order[k:] if f > 0 else None)
    if subset:
        if subset > len(train):
            raise UserError(f"data.train_subset {subset} is larger than the {len(train)} training examples")
        train = train[:subset]
    return train, val


def _mean_std(images: np.ndarray) -> tuple[float, float]:
    """Mean and std of uint8 images on the 0..1 scale, from a histogram (no float copy of 60,000 images)."""
    counts = np.bincount(images.ravel(), minlength=256).astype(np.float64)
    values = np.arange(256) / 255.0
    n = counts.sum()
    mean = float(counts @ values / n)
    std = float(np.sqrt(max(counts @ values**2 / n - mean**2, 0.0)))
    return mean, std or 1.0


def _prep(images: np.ndarray, mean: float, std: float, resolution: int) -> np.ndarray:
    """uint8 (N, H, W) -> standardised float32 (N, resolution, resolution, 3), resized in chunks."""
    out = np.empty((len(images), resolution, resolution, 1), np.float32)
    for lo in range(0, len(images), RESIZE_CHUNK):
        x = ((images[lo : lo + RESIZE_CHUNK].astype(np.float32) / 255.0 - mean) / std)[..., None]
        out[lo : lo + len(x)] = x if x.shape[1:3] == (resolution, resolution) else resize_images(x, resolution)
    return np.repeat(out, 3, axis=-1)


def idx_source(data: Any, resolution: int, global_batch: int, seed: int,
               process_index: int = 0, process_count: int = 1) -> ArraySource:
    """The IDX dataset of ``data.name`` served like the embedded digits (see the module docstring)."""
    directory = resolve_dir(data.name)
    if not os.path.isdir(directory):
        raise UserError(f"IDX dataset directory {directory} not found{_hint(data.name)}")
    splits = ("train", "validation", "test") if float(data.get("holdout_fraction", 0.0)) > 0 else ("train", "test")
    if data.train_split != "train":
        raise UserError(f"IDX datasets train on 'train'; got data.train_split={data.train_split!r}")
    if data.eval_split not in splits:
        extra = "" if "validation" in splits else "; data.holdout_fraction > 0 adds 'validation'"
        raise UserError(f"IDX dataset {data.name} has eval splits {', '.join(splits[1:])}; "
                        f"got data.eval_split={data.eval_split!r}{extra}")
    xt, yt = load_split(directory, "train", data.name)
    train_rows, val_rows = select(data, len(yt), yt)
    if data.eval_split == "test":
        xe, ye = load_split(directory, "test", data.name)
        if xe.shape[1:] != xt.shape[1:]:
            raise UserError(f"IDX test images are {xe.shape[1]}x{xe.shape[2]} but train images "
                            f"{xt.shape[1]}x{xt.shape[2]} in {directory}")
    else:
        xe, ye = xt[val_rows], yt[val_rows]
    num_classes = int(data.get("num_classes", 0) or 0) or (10 if data.name == FASHION_MNIST else 0)
    inferred = not num_classes
    num_classes = num_classes or int(yt.max()) + 1  # from all train labels, not just the subset's
    for split, y in (("train", yt), (data.eval_split, ye)):
        bad = (y < 0) | (y >= num_classes)
        if bad.any():
            raise UserError(f"IDX {split} labels out of range: {int(y[bad][0])} is not in [0, {num_classes})"
                            + (" (classes inferred from the train labels; set data.num_classes)" if inferred else ""))
    xt, yt = xt[train_rows], yt[train_rows]
    mean, std = _mean_std(xt)
    read = ("train", "test") if data.eval_split == "test" else ("train",)  # validation: rows of the train files
    prints = {split: fingerprint.file_digests(find_file(directory, stem, data.name) for stem in FILES[split])
              for split in read}
    return ArraySource(
        name=data.name, train_images=_prep(xt, mean, std, resolution), train_labels=yt,
        eval_images=_prep(xe, mean, std, resolution), eval_labels=ye,
        num_classes=num_classes, global_batch=global_batch, seed=seed, augment=data.augment,
        max_shift=max(0, round(resolution * data.get("max_shift_fraction", 0.0))),
        process_index=process_index, process_count=process_count, fingerprint=prints,
    )
