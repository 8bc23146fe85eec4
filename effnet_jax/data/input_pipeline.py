"""Input pipelines: the ``Source`` protocol, in-memory array sources and the embedded digits dataset.

Every source serves *per-process* numpy batches of a global batch:

* ``train_batches(start_step)``: endless, deterministic in (seed, step), so a run
  resumed at step s sees exactly the batches an uninterrupted run sees from s on;
* ``eval_batches()``: one pass over the eval split, the last batch padded and
  flagged with ``mask`` = 0 so every example counts exactly once;
* ``fingerprint``: what each split holds ({split: summary}, ``effnet_jax.data.fingerprint``),
  which the trainer keeps in the workdir so that a rerun on changed data is refused.

Because a batch is a pure function of (seed, process, step) with random access, the step a
checkpoint holds is the whole loader state: a resumed run reads nothing twice and saves no
iterator state. Array sources are served through Grain (a background thread prepares the next
batch while the device trains on this one).

The embedded default needs no network and no TensorFlow: scikit-learn's bundled
digits (1797 real 8x8 images, 10 classes), resized once to the model resolution,
with a fixed stratified 60/20/20 train/validation/test split.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from effnet_jax.data import fingerprint
from effnet_jax.errors import UserError

Batch = dict[str, np.ndarray]
EMBEDDED = ("digits",)


class Source(Protocol):
    name: str
    num_classes: int
    num_train: int
    num_eval: int
    fingerprint: dict[str, dict[str, Any]]

    def train_batches(self, start_step: int = 0) -> Iterator[Batch]: ...

    def eval_batches(self) -> Iterator[Batch]: ...


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation the official checkpoints were trained with
IMAGENET_STD = (0.229, 0.224, 0.225)


def local_batch(name: str, global_batch: int, num_train: int, process_count: int) -> int:
    """This process's share of a global batch; a UserError when the batch is larger than the training split."""
    if global_batch > num_train:
        raise UserError(f"batch size {global_batch} is larger than the {name} training split ({num_train} examples)")
    return global_batch // process_count


@dataclasses.dataclass(kw_only=True)
class ImageStream:
    """What every image source (a folder through Grain, TFDS through tf.data) makes of its examples: the
    resolution, the batch and its share per process, the augmentation, the normalisation and the fingerprint
    of what it reads."""

    resolution: int
    global_batch: int
    seed: int = 0
    augment: bool = True
    randaugment_layers: int = 0
    randaugment_magnitude: float = 10.0
    mean_rgb: tuple[float, ...] = IMAGENET_MEAN
    std_rgb: tuple[float, ...] = IMAGENET_STD
    process_index: int = 0
    process_count: int = 1
    fingerprint: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ArraySource:
    """In-memory images (N, H, W, 3) float32, already resized and normalised."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray
    num_classes: int
    global_batch: int
    seed: int = 0
    augment: bool = True
    max_shift: int = 0  # random translation in pixels (digits must not be flipped)
    process_index: int = 0
    process_count: int = 1
    fingerprint: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.local_batch = local_batch(self.name, self.global_batch, len(self.train_labels), self.process_count)

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def num_eval(self) -> int:
        return len(self.eval_labels)

    def eval_label_counts(self) -> np.ndarray:
        """Examples per class in the eval split (what ``majority_rate`` reads)."""
        return np.bincount(np.asarray(self.eval_labels, dtype=np.int64), minlength=self.num_classes)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_train // self.global_batch

    def _local(self, rows: np.ndarray) -> np.ndarray:
        lo = self.process_index * self.local_batch
        return rows[lo : lo + self.local_batch]

    def batch_at(self, step: int) -> Batch:
        """This process's batch of ``step``: a pure function of (seed, process, step)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_train)
        rows = self._local(order[i * self.global_batch : (i + 1) * self.global_batch])
        images = self.train_images[rows]
        if self.augment and self.max_shift:
            images = _random_shift(images, self.max_shift, np.random.default_rng([self.seed, 1 << 20, step,
                                                                                  self.process_index]))
        return {"image": images, "label": self.train_labels[rows]}

    def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
        import grain  # imports JAX: not at module import (the core imports this module)

        steps = grain.MapDataset.range(start_step, sys.maxsize).map(self.batch_at)
        return iter(steps.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))

    def eval_batches(self) -> Iterator[Batch]:
        n = self.num_eval
        for start in range(0, n, self.global_batch):
            rows = np.arange(start, start + self.global_batch)
            mask = (rows < n).astype(np.float32)
            rows = np.minimum(rows, n - 1)
            rows, mask = self._local(rows), self._local(mask)
            yield {"image": self.eval_images[rows], "label": self.eval_labels[rows], "mask": mask}


def majority_rate(source: Any) -> float | None:
    """The share of the eval split's largest class: the accuracy of always answering it, so the score a
    trial that learned nothing about the images reaches at most (by chance, within sampling noise).
    None when the source cannot count its eval labels."""
    counts = getattr(source, "eval_label_counts", None)
    if counts is None:
        return None
    c = np.asarray(counts())
    return float(c.max() / c.sum()) if c.sum() else None


def _random_shift(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Translate each image by up to ``max_shift`` pixels, filling with the edge value."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
    return np.stack([padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def resize_images(images: np.ndarray, resolution: int) -> np.ndarray:
    """Bicubic resize of NHWC float images to resolution x resolution (on the host CPU)."""
    import jax

    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        out = jax.image.resize(images, (images.shape[0], resolution, resolution, images.shape[3]), "bicubic")
    return np.asarray(out, np.float32)


def load_digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits as {split: (images (N, 8, 8) in [0, 1], labels)}, fixed 60/20/20."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=0)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=0)
    return {"train": (x_train, y_train), "validation": (x_val, y_val), "test": (x_test, y_test)}


def digits_source(data: Any, resolution: int, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> ArraySource:
    """The embedded default: digits resized to ``resolution``, grey repeated to RGB, standardised."""
    splits = load_digits_splits()
    for split in (data.train_split, data.eval_split):
        if split not in splits:
            raise UserError(f"digits has splits {', '.join(splits)}; got {split!r}")
    (xt, yt), (xe, ye) = splits[data.train_split], splits[data.eval_split]
    mean, std = float(xt.mean()), float(xt.std())
    prints = {split: {"examples": len(splits[split][1]), "sha256": fingerprint.array_digest(*splits[split])}
              for split in (data.train_split, data.eval_split)}

    def prep(x: np.ndarray) -> np.ndarray:
        x = resize_images(((x - mean) / std)[..., None], resolution)
        return np.repeat(x, 3, axis=-1)

    return ArraySource(
        name="digits", train_images=prep(xt), train_labels=yt, eval_images=prep(xe), eval_labels=ye,
        num_classes=10, global_batch=global_batch, seed=seed, augment=data.augment,
        max_shift=max(0, round(resolution * data.get("max_shift_fraction", 0.0))),
        process_index=process_index, process_count=process_count, fingerprint=prints,
    )
