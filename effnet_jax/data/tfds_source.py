"""TFDS datasets and image folders as a :class:`effnet_jax.data.input_pipeline.Source`.

With ``tf_preprocess`` (the crops, resizing and RandAugment it applies), the only module that
imports TensorFlow; ``sources.create_source`` imports it lazily, so training on the embedded
digits never pays for (or needs) TensorFlow. This module opens and checks datasets and turns
them into batches.

* ``data.name``: any TFDS image-classification dataset (``cifar10``, ``imagenette``,
  ``imagenet2012`` ...; a version as ``name:1.2.3``), read from ``data.data_dir``
  ("" = the TFDS default), or ``folder:/root`` for ``root/split/label/x.png`` read
  with ``tfds.folder_dataset.ImageFolder``.
* Nothing is ever downloaded: a dataset that is not prepared fails at once with the
  command that prepares it (TFDS would otherwise retry downloads for minutes).
* ``data.holdout_fraction`` = f > 0: the eval split is the last round(n * f) examples of
  ``data.train_split`` (absolute indices, ``train[:k]`` / ``train[k:]``) and
  ``data.eval_split`` is ignored. TFDS shuffles records when it prepares a dataset and
  ImageFolder shuffles its file list with a fixed seed, so the tail is a random subset.
* Each process reads its own part of each split (``tfds.split_for_jax_process``; folders:
  ``Dataset.shard``) and serves ``global_batch // process_count`` examples per batch.
* Training: epoch e of this process is its shard shuffled with a seed from (seed,
  process, e); example i of epoch e is augmented with stateless random ops seeded by
  (seed, process, e, i), so the stream is a pure function of the seed. Resuming at step
  s starts at epoch s * local_batch // n and skips the remainder of that epoch: at most
  one epoch of *encoded* records is read again (images are decoded after the skip).
* Preprocessing: the official EfficientNet recipe (``tf_preprocess``) plus a horizontal
  flip in training, then normalised with ``data.mean_rgb`` / ``data.std_rgb`` (0..1 scale,
  ImageNet's by default). Grey images are repeated to RGB, alpha is dropped.
* Image folders are checked before training, so that a mistake fails in seconds with the
  file's name instead of as a TensorFlow error deep into a run: fewer than two classes is
  refused; every image of the splits in use is opened with PIL (PNG: chunk structure and
  checksums; JPEG: a 1/8-scale decode, which reads the whole stream; seconds for thousands of
  images, docs/benchmarks.md). An unreadable image is *refused*,
  naming it, rather than skipped: a silently smaller dataset would make runs incomparable.
  A training class with fewer than ``MIN_CLASS_IMAGES`` images gets a one-line ``warning:``.
* TensorFlow's own logging (C++ banners, oneDNN notice, Python warnings) is silenced before
  it is imported: the CLI's errors are one line.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import difflib
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

# Before TensorFlow loads: its C++ logs ("All log messages before absl::InitializeLog() ...")
# and the oneDNN notice (printed whatever the log level) would precede the CLI's one-line errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from effnet_jax.data import tf_preprocess  # noqa: E402
from effnet_jax.data.input_pipeline import Batch  # noqa: E402
from effnet_jax.errors import UserError  # noqa: E402

tf.get_logger().setLevel(logging.ERROR)
absl_logging.set_verbosity(absl_logging.ERROR)  # tfds logs through absl

try:  # checks image folders before training (image_problem); optional
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # big is not broken
    _IMAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError, EOFError,
                                                       Image.DecompressionBombError, tf.errors.OpError)
except ImportError:
    Image = None
    _IMAGE_ERRORS = (OSError, tf.errors.OpError)

try:  # JAX owns the accelerators: TF (if it is a GPU build) must not grab their memory
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):
    pass

FOLDER_PREFIX = "folder:"
FOLDER_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # what tfds.folder_dataset.ImageFolder reads
MIN_CLASS_IMAGES = 5  # fewer training images in a class: warn
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUTOTUNE = tf.data.AUTOTUNE
# Our pipeline functions use tf.cond / tf.where, never Python control flow on tensors: skipping
# autograph's source-to-source conversion makes building a pipeline several times faster.
_plain = tf.autograph.experimental.do_not_convert


@dataclasses.dataclass
class _Split:
    """One split as this process reads it: records (encoded image, int label) in a fixed order."""

    records: tf.data.Dataset
    num_local: int  # examples in this process's part
    num_total: int  # examples over all processes


@dataclasses.dataclass
class TfdsSource:
    """Per-process numpy batches of a TFDS dataset or image folder (see the module docstring)."""

    name: str
    num_classes: int
    train: _Split
    eval: _Split
    decode: Callable[[tf.Tensor], tf.Tensor]  # encoded bytes -> uint8 (H, W, 3)
    resolution: int
    global_batch: int
    seed: int = 0
    augment: bool = True
    randaugment_layers: int = 0
    randaugment_magnitude: float = 10.0
    shuffle_buffer: int = 16_384
    mean_rgb: tuple[float, ...] = IMAGENET_MEAN
    std_rgb: tuple[float, ...] = IMAGENET_STD
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self) -> None:
        self.local_batch = self.global_batch // self.process_count
        if self.global_batch > self.num_train:
            raise UserError(f"batch size {self.global_batch} is larger than the {self.name} training split "
                            f"({self.num_train} examples)")
        if self.train.num_local == 0:
            raise UserError(f"process {self.process_index} got no {self.name} training examples")

    @property
    def num_train(self) -> int:
        return self.train.num_total

    @property
    def num_eval(self) -> int:
        return self.eval.num_total

    def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
        return iter(tfds.as_numpy(self.train_dataset(start_step)))

    def eval_label_counts(self) -> np.ndarray:
        """Examples per class in this process's part of the eval split: the labels alone, images never decoded."""
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for labels in tfds.as_numpy(self.eval.records.map(_plain(lambda image, label: label)).batch(8192)):
            counts += np.bincount(labels, minlength=self.num_classes)[: self.num_classes]
        return counts

    def eval_batches(self) -> Iterator[Batch]:
        return iter(tfds.as_numpy(self.eval_dataset()))

    def train_dataset(self, start_step: int = 0) -> tf.data.Dataset:
        """The endless training stream from ``start_step`` on, batched for this process."""
        n = self.train.num_local
        epoch0, offset = divmod(start_step * self.local_batch, n)
        records, buffer = self.train.records, max(1, min(self.shuffle_buffer, n))
        process_key = tf.constant([self.seed, self.process_index], tf.int64)

        def epoch(e: tf.Tensor) -> tf.data.Dataset:
            key = tf.random.experimental.stateless_fold_in(process_key, e)
            shuffled = records.shuffle(buffer, seed=key[0], reshuffle_each_iteration=False)
            fold = tf.random.experimental.stateless_fold_in
            return shuffled.enumerate().map(_plain(lambda i, ex: (fold(key, i), ex)))

        ds = tf.data.Dataset.range(epoch0, 1 << 62).flat_map(_plain(epoch)).skip(offset)
        ds = ds.map(_plain(lambda key, ex: self._train_example(key, *ex)), num_parallel_calls=AUTOTUNE)
        return ds.batch(self.local_batch, drop_remainder=True).prefetch(AUTOTUNE)

    def eval_dataset(self) -> tf.data.Dataset:
        """One pass, ceil(num_eval / global_batch) batches on every process, padding masked out."""
        num_batches = math.ceil(self.num_eval / self.global_batch)
        ds = self.eval.records.map(
            _plain(lambda image, label: {"image": self._normalize(self._eval_image(self.decode(image))),
                                         "label": label, "mask": tf.constant(1.0)}),
            num_parallel_calls=AUTOTUNE)
        pad = {"image": tf.zeros((self.resolution, self.resolution, 3)), "label": tf.constant(0, tf.int32),
               "mask": tf.constant(0.0)}
        ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
        return ds.batch(self.local_batch, drop_remainder=True).take(num_batches).prefetch(AUTOTUNE)

    def _train_example(self, key: tf.Tensor, encoded: tf.Tensor, label: tf.Tensor) -> dict[str, tf.Tensor]:
        image = self.decode(encoded)
        if not self.augment:
            return {"image": self._normalize(self._eval_image(image)), "label": label}
        crop_key, flip_key, ra_key = tf.unstack(tf.random.experimental.stateless_split(key, 3))
        image = tf_preprocess.resize(tf_preprocess.inception_crop(image, crop_key, self.resolution), self.resolution)
        image = tf.image.stateless_random_flip_left_right(image, flip_key)
        if self.randaugment_layers > 0:
            image = tf_preprocess.randaugment(image, ra_key, self.randaugment_layers, self.randaugment_magnitude)
        return {"image": self._normalize(image), "label": label}

    def _eval_image(self, image: tf.Tensor) -> tf.Tensor:
        return tf_preprocess.resize(tf_preprocess.center_crop(image, self.resolution), self.resolution)

    def _normalize(self, image: tf.Tensor) -> tf.Tensor:
        mean = tf.constant(self.mean_rgb, tf.float32) * 255.0
        std = tf.constant(self.std_rgb, tf.float32) * 255.0
        return (image - mean) / std


def create_source(data: Any, resolution: int, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> TfdsSource:
    """Open ``data.name`` (TFDS name or ``folder:ROOT``) without downloading anything."""
    if data.name.startswith(FOLDER_PREFIX):
        opened = _open_folder(data, process_index, process_count)
    else:
        opened = _open_tfds(data, process_index, process_count)
    name, num_classes, train, eval_, decode = opened
    return TfdsSource(
        name=name, num_classes=num_classes, train=train, eval=eval_, decode=decode, resolution=resolution,
        global_batch=global_batch, seed=seed, augment=bool(data.augment),
        randaugment_layers=int(data.get("randaugment_layers", 0)),
        randaugment_magnitude=float(data.get("randaugment_magnitude", 10)),
        shuffle_buffer=int(data.get("shuffle_buffer", 16_384)),
        mean_rgb=tuple(data.get("mean_rgb", IMAGENET_MEAN)), std_rgb=tuple(data.get("std_rgb", IMAGENET_STD)),
        process_index=process_index, process_count=process_count,
    )


# --------------------------------------------------------------------------- opening


def _builder(name: str, data_dir: str) -> Any:
    """``tfds.builder`` with one-line errors, refusing community namespaces (they query the network)."""
    if ":" in name and not name.split(":", 1)[1][:1].isdigit():
        raise UserError(f"unknown dataset {name!r}: community datasets ('namespace:name') are not supported; "
                        "use a TFDS dataset name or 'folder:/path/root'")
    try:
        return tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        close = difflib.get_close_matches(name, tfds.list_builders(with_community_datasets=False), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown dataset {name!r}: not 'digits', a TFDS dataset or 'folder:/path/root'"
                        f"{hint}") from None
    except ValueError as e:
        raise UserError(f"unknown dataset {name!r}: {' '.join(str(e).split())[:200]}") from None


def _open_tfds(data: Any, process_index: int, process_count: int) -> tuple:
    name = data.name
    builder = _builder(name, data.data_dir)
    # not builder.is_prepared(): that logs a warning, and the CLI's error must stay one line
    if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")) or not builder.info.splits:
        root = data.data_dir or str(builder.data_dir_root)
        how = (f"it needs a manual download first (see https://www.tensorflow.org/datasets/catalog/"
               f"{builder.name}), then `tfds build {name} --data_dir={root} --manual_dir=DIR`"
               if builder.MANUAL_DOWNLOAD_INSTRUCTIONS else f"run `tfds build {name} --data_dir={root}` on a "
               "machine with network access and copy the directory here")
        raise UserError(f"dataset {name!r} is not prepared in {root} and is never downloaded during training: {how}")
    image_key, label_key = _keys(builder.info)
    splits = builder.info.splits

    def count(split: Any) -> int:
        try:
            return splits[split].num_examples
        except (KeyError, ValueError, AssertionError) as e:
            raise UserError(f"{name} has splits {', '.join(splits)}; cannot read {split!r} "
                            f"({' '.join(str(e).split())[:150]})") from None

    train_split, eval_split = _holdout(data, count)

    def part(split: str) -> _Split:
        count(split)
        local = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)
        records = builder.as_dataset(split=local, shuffle_files=False,
                                     decoders={image_key: tfds.decode.SkipDecoding()})
        records = records.map(_plain(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32))))
        return _Split(records, count(local), count(split))

    image_feature = builder.info.features[image_key]
    return (name, builder.info.features[label_key].num_classes, part(train_split), part(eval_split),
            lambda encoded: tf_preprocess.to_rgb(image_feature.decode_example(encoded)))


def _open_folder(data: Any, process_index: int, process_count: int) -> tuple:
    root = os.path.expanduser(data.name[len(FOLDER_PREFIX):])
    if not tf.io.gfile.isdir(root):
        raise UserError(f"image folder {root!r} does not exist (expected {root}/SPLIT/LABEL/IMAGE.png)")
    files = list_folder(root)
    builder = tfds.folder_dataset.ImageFolder(root)
    splits = {k: v.num_examples for k, v in builder.info.splits.items() if v.num_examples}
    num_classes = builder.info.features["label"].num_classes
    if not splits or not num_classes:
        raise UserError(f"image folder {root!r} has no images: expected {root}/SPLIT/LABEL/IMAGE.(png|jpg)")
    if num_classes < 2:
        label = builder.info.features["label"].names[0]
        raise UserError(f"image folder {root!r} has a single class ({label!r}): a classifier needs at least two, "
                        f"as {root}/SPLIT/LABEL/IMAGE.png with two or more LABEL folders")

    def count(split: str) -> int:
        if split not in splits:
            raise UserError(f"image folder {root!r} has splits {', '.join(splits)}; got {split!r} "
                            "(folders take plain split names)")
        return splits[split]

    train_split, eval_split = _holdout(data, count)
    train_base, eval_base = _parse_range(train_split)[0], _parse_range(eval_split)[0]
    in_use = [train_base] + ([eval_base] if eval_base != train_base else [])
    check_images(root, [p for split in in_use for ps in files[split].values() for p in ps])
    small = {label: len(files[train_base].get(label, [])) for label in builder.info.features["label"].names}
    small = {label: n for label, n in small.items() if n < MIN_CLASS_IMAGES}
    if small and process_index == 0:
        named = ", ".join(f"{label!r} ({n})" for label, n in sorted(small.items(), key=lambda kv: kv[1])[:5])
        named += f" and {len(small) - 5} more" if len(small) > 5 else ""
        print(f"warning: image folder {root!r}: {'class' if len(small) == 1 else 'classes'} {named} "
              f"{'has' if len(small) == 1 else 'have'} fewer than {MIN_CLASS_IMAGES} images in {train_base!r}; "
              "accuracy on them is noise", file=sys.stderr, flush=True)

    def part(split: str) -> _Split:
        base, lo, hi = _parse_range(split)
        hi = splits[base] if hi is None else hi
        records = builder.as_dataset(split=base, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
        records = records.skip(lo).take(hi - lo).shard(process_count, process_index)
        records = records.map(_plain(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32))))
        n = hi - lo
        return _Split(records, len(range(process_index, n, process_count)), n)

    return (data.name, num_classes, part(train_split), part(eval_split),
            lambda encoded: tf_preprocess.to_rgb(tf.io.decode_image(encoded, channels=3, expand_animations=False)))


def list_folder(root: str) -> dict[str, dict[str, list[str]]]:
    """{split: {label: [image paths]}} by ImageFolder's rules: root/SPLIT/LABEL/*.(jpg|jpeg|png)."""

    def dirs(path: str) -> list[str]:
        return sorted(d.rstrip("/") for d in tf.io.gfile.listdir(path) if tf.io.gfile.isdir(os.path.join(path, d)))

    out: dict[str, dict[str, list[str]]] = {}
    for split in dirs(root):
        out[split] = {}
        for label in dirs(os.path.join(root, split)):
            folder = os.path.join(root, split, label)
            out[split][label] = sorted(os.path.join(folder, f) for f in tf.io.gfile.listdir(folder)
                                       if f.lower().endswith(FOLDER_IMAGE_EXTENSIONS))
    return out


def image_problem(path: str) -> str | None:
    """Why TensorFlow could not decode ``path`` (None: it can), found without a full decode.

    With PIL: PNG chunk structure and checksums (no decompression); JPEG and the rest a
    1/8-scale decode, which still reads the whole entropy-coded stream (truncation).
    Without PIL: the file must start with a JPEG, PNG, GIF, BMP or WebP signature.
    """
    head = b""
    try:
        if Image is None:
            with tf.io.gfile.GFile(path, "rb") as f:
                head = f.read(12)
        else:
            with contextlib.ExitStack() as stack:
                source = stack.enter_context(tf.io.gfile.GFile(path, "rb")) if "://" in path else path
                im = stack.enter_context(Image.open(source))
                if im.format == "PNG":
                    im.verify()
                else:
                    im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                    im.load()
            return None
    except _IMAGE_ERRORS as e:
        if Image is not None and isinstance(e, Image.DecompressionBombError):
            return None  # huge, not broken: TensorFlow decodes it
        return " ".join(str(e).replace(f"'{path}'", "").split()).rstrip(" :")[:120] or type(e).__name__
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"BM")) or (
            head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    return "empty file" if not head else "not a JPEG, PNG, GIF, BMP or WebP file"


def check_images(root: str, paths: list[str]) -> None:
    """Refuse (UserError naming the first) any of ``paths`` that is not a readable image."""
    workers = min(16, 2 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        problems = [(p, why) for p, why in zip(paths, pool.map(image_problem, paths)) if why]
    if problems:
        path, why = problems[0]
        more = f" ({len(problems)} of {len(paths)} images are unreadable)" if len(problems) > 1 else ""
        raise UserError(f"image folder {root!r}: {os.path.relpath(path, root)} is not a readable image ({why}); "
                        f"remove or replace it{more}")


def _holdout(data: Any, count: Callable[[str], int]) -> tuple[str, str]:
    """(train, eval) split strings; with holdout_fraction f the eval split is the last round(n * f) of train."""
    f = float(data.get("holdout_fraction", 0.0))
    if f <= 0:
        count(data.train_split)
        count(data.eval_split)
        return data.train_split, data.eval_split
    if f >= 1:
        raise UserError(f"data.holdout_fraction must be in [0, 1), got {f}")
    if not data.train_split.isidentifier():
        raise UserError(f"data.holdout_fraction needs a plain split name as data.train_split, got {data.train_split!r}")
    n = count(data.train_split)
    k = n - round(n * f)
    if not 0 < k < n:
        raise UserError(f"data.holdout_fraction {f} of {n} examples leaves an empty train or eval split")
    return f"{data.train_split}[:{k}]", f"{data.train_split}[{k}:]"


def _parse_range(split: str) -> tuple[str, int, int | None]:
    """'train' -> ('train', 0, None) ; 'train[:k]' / 'train[k:]' (our holdout) -> absolute bounds."""
    if "[" not in split:
        return split, 0, None
    base, rng = split[:-1].split("[")
    lo, hi = rng.split(":")
    return base, int(lo or 0), int(hi) if hi else None


def _keys(info: Any) -> tuple[str, str]:
    """(image, label) feature names: the supervised keys, else 'image' / 'label'."""
    keys = info.supervised_keys
    image_key, label_key = keys if isinstance(keys, tuple) and len(keys) == 2 and all(
        isinstance(k, str) for k in keys) else ("image", "label")
    features = info.features
    if not (image_key in features and isinstance(features[image_key], tfds.features.Image)
            and label_key in features and isinstance(features[label_key], tfds.features.ClassLabel)):
        raise UserError(f"{info.name} is not an image classification dataset (features: {', '.join(features)})")
    return image_key, label_key
