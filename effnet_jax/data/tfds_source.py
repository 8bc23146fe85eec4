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
* Image folders are checked before training as on the Grain path (``folder``: fewer than two
  classes refused, every image of the splits in use opened with PIL, an unreadable one refused by
  name). ``sources.create_source`` sends only remote folders (``folder:gs://...``) here; local ones
  go through ``grain_source``, without TensorFlow. ``create_source`` here still reads a local folder
  (the benchmark's tf.data baseline, ``scripts/bench_input.py``).
* ``fingerprint`` (``effnet_jax.data.fingerprint``): a folder's file list with sizes; a TFDS split's version,
  example count, bytes and shard lengths as recorded when it was prepared.
* TensorFlow's own logging (C++ banners, oneDNN notice, Python warnings) is silenced before
  it is imported: the CLI's errors are one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
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

from effnet_jax.data import fingerprint, folder, tf_preprocess  # noqa: E402
from effnet_jax.data.folder import FOLDER_IMAGE_EXTENSIONS, FOLDER_PREFIX, MIN_CLASS_IMAGES  # noqa: E402, F401
from effnet_jax.data.input_pipeline import IMAGENET_MEAN, IMAGENET_STD, Batch, ImageStream, local_batch  # noqa: E402
from effnet_jax.errors import UserError  # noqa: E402

tf.get_logger().setLevel(logging.ERROR)
absl_logging.set_verbosity(absl_logging.ERROR)  # tfds logs through absl

try:  # JAX owns the accelerators: TF (if it is a GPU build) must not grab their memory
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):
    pass

# Remote folders (gs://...) are listed, sized and opened through TensorFlow's file system.
GFILE = folder.FileSystem(listdir=tf.io.gfile.listdir, isdir=tf.io.gfile.isdir,
                          open=lambda path: tf.io.gfile.GFile(path, "rb"),
                          size=lambda path: tf.io.gfile.stat(path).length, errors=(tf.errors.OpError,), local=False)
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
class TfdsSource(ImageStream):
    """Per-process numpy batches of a TFDS dataset or image folder (see the module docstring)."""

    name: str
    num_classes: int
    train: _Split
    eval: _Split
    decode: Callable[[tf.Tensor], tf.Tensor]  # encoded bytes -> uint8 (H, W, 3)
    shuffle_buffer: int = 16_384

    def __post_init__(self) -> None:
        self.local_batch = local_batch(self.name, self.global_batch, self.num_train, self.process_count)
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
    name, num_classes, train, eval_, decode, prints = opened
    return TfdsSource(
        name=name, num_classes=num_classes, train=train, eval=eval_, decode=decode, resolution=resolution,
        global_batch=global_batch, seed=seed, augment=bool(data.augment),
        randaugment_layers=int(data.get("randaugment_layers", 0)),
        randaugment_magnitude=float(data.get("randaugment_magnitude", 10)),
        shuffle_buffer=int(data.get("shuffle_buffer", 16_384)),
        mean_rgb=tuple(data.get("mean_rgb", IMAGENET_MEAN)), std_rgb=tuple(data.get("std_rgb", IMAGENET_STD)),
        process_index=process_index, process_count=process_count, fingerprint=prints,
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

    train_split, eval_split = folder.holdout(data, count)

    def part(split: str) -> _Split:
        count(split)
        local = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)
        records = builder.as_dataset(split=local, shuffle_files=False,
                                     decoders={image_key: tfds.decode.SkipDecoding()})
        records = records.map(_plain(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32))))
        return _Split(records, count(local), count(split))

    image_feature = builder.info.features[image_key]
    bases = {folder.parse_range(split)[0] for split in (train_split, eval_split)}
    prints = {base: _split_print(builder, base) for base in sorted(bases)}
    return (name, builder.info.features[label_key].num_classes, part(train_split), part(eval_split),
            lambda encoded: tf_preprocess.to_rgb(image_feature.decode_example(encoded)), prints)


def _split_print(builder: Any, split: str) -> dict[str, Any]:
    """A prepared split's fingerprint, from what TFDS recorded when it prepared it (no file is read)."""
    info = builder.info.splits[split]
    return {"dataset": f"{builder.name}:{builder.version}", "examples": int(info.num_examples),
            "bytes": int(info.num_bytes), "shard_lengths": [int(n) for n in info.shard_lengths]}


def _open_folder(data: Any, process_index: int, process_count: int) -> tuple:
    root = os.path.expanduser(data.name[len(FOLDER_PREFIX):])
    fs = GFILE if "://" in root else folder.LOCAL
    root = folder.folder_root(data.name, fs)
    files = folder.list_folder(root, fs)
    names = folder.class_names(root, files)
    builder = tfds.folder_dataset.ImageFolder(root)
    splits = {k: v.num_examples for k, v in builder.info.splits.items() if v.num_examples}
    num_classes = builder.info.features["label"].num_classes

    train_split, eval_split, in_use = folder.splits_in_use(root, data, splits)
    folder.check_images(root, [p for split in in_use for ps in files[split].values() for p in ps], fs)
    if process_index == 0:
        folder.warn_small_classes(root, in_use[0], files[in_use[0]], names)

    def part(split: str) -> _Split:
        base, lo, hi = folder.parse_range(split)
        hi = splits[base] if hi is None else hi
        records = builder.as_dataset(split=base, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
        records = records.skip(lo).take(hi - lo).shard(process_count, process_index)
        records = records.map(_plain(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32))))
        n = hi - lo
        return _Split(records, len(range(process_index, n, process_count)), n)

    prints = {split: fingerprint.listing(root, files[split], fs.size) for split in in_use}
    return (data.name, num_classes, part(train_split), part(eval_split),
            lambda encoded: tf_preprocess.to_rgb(tf.io.decode_image(encoded, channels=3, expand_animations=False)),
            prints)


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
