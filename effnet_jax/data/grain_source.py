"""Image folders through Grain: decoding and augmentation with PIL in the loader's workers, no TensorFlow.

* ``data.name = "folder:/root"`` reads ``root/SPLIT/LABEL/IMAGE.(png|jpg|jpeg)`` (``folder``: the
  listing and the checks before training). Labels are the sorted label folders of all splits.
* ``data.holdout_fraction`` f > 0: the eval split is the last round(n * f) images of a fixed
  (seed 0, not ``config.seed``), class-stratified permutation of ``data.train_split``, so every seed of a
  search scores on the same held-out images, in the classes' proportions.
* Training: a Grain pipeline, ``MapDataset.source(split).seed(seed).shuffle().repeat().random_map(recipe)``:
  a global shuffle per epoch and the recipe's random numbers, both from (seed, the example's position
  in the global stream). The local batch of process p at step s is the positions
  ``s * global_batch + p * local_batch + j``: a pure function of (seed, process, step) with random
  access, so a run resumed at step s is served exactly the batches an uninterrupted run is, without
  reading anything twice or saving the loader's state (the step the checkpoint holds is that state).
  With one process or many, the global batch of a step holds the same images, augmented alike.
* Recipe (``pil_preprocess``): the official inception crop, bicubic resize and flip, optionally
  RandAugment (``data.randaugment_layers`` / ``data.randaugment_magnitude``), normalised with
  ``data.mean_rgb`` / ``data.std_rgb`` (0..1 scale, ImageNet's by default). Eval: the centre crop.
* Parallelism: whole batches are the unit of work, ``threads`` of them in flight (PIL releases the GIL
  while it decodes and resizes), or ``workers`` processes (Grain's ``mp_prefetch``); the stream is the same.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from effnet_jax.data import fingerprint, folder, pil_preprocess
from effnet_jax.data.input_pipeline import IMAGENET_MEAN, IMAGENET_STD, Batch, ImageStream, local_batch


@dataclasses.dataclass(frozen=True)
class Records:
    """One split as a Grain random-access source: (what PIL opens, label) by index."""

    paths: tuple[str, ...]
    labels: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.paths[i], int(self.labels[i])

    def take(self, rows: Sequence[int]) -> Records:
        return Records(tuple(self.paths[i] for i in rows), self.labels[np.asarray(rows, dtype=np.int64)])


@dataclasses.dataclass(frozen=True)
class _Padded:
    """A split padded to ``length`` (a whole number of global batches) with ("", -1): eval's last batch.

    Not None: Grain takes a None element for a filtered-out one."""

    records: Records
    length: int

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.records[i] if i < len(self.records) else ("", -1)


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """The per-example work of a loader worker: decode, crop, resize (augment in training)."""

    resolution: int
    augment: bool
    randaugment_layers: int
    randaugment_magnitude: float

    def train(self, record: tuple[str, int], rng: np.random.Generator) -> tuple[np.ndarray, int, float]:
        path, label = record
        if not self.augment:
            return pil_preprocess.eval_image(path, self.resolution), label, 1.0
        return pil_preprocess.train_image(path, self.resolution, rng, self.randaugment_layers,
                                          self.randaugment_magnitude), label, 1.0

    def eval(self, record: tuple[str, int]) -> tuple[np.ndarray, int, float]:
        path, label = record
        if label < 0:  # padding: counted by nobody (mask 0)
            return np.zeros((self.resolution, self.resolution, 3), np.uint8), 0, 0.0
        return pil_preprocess.eval_image(path, self.resolution), label, 1.0


@dataclasses.dataclass(frozen=True)
class _Collate:
    """Examples -> a batch: uint8 images stacked and normalised to float32, int32 labels (and eval's mask)."""

    scale: np.ndarray  # 1 / (255 * std)
    shift: np.ndarray  # -mean / std
    masked: bool

    def __call__(self, examples: Sequence[tuple[np.ndarray, int, float]]) -> Batch:
        h, w, c = examples[0][0].shape
        images = np.empty((len(examples), h, w, c), np.float32)
        # rows of w * c values against the per-channel constants tiled to match: broadcasting the 3 channels
        # directly gives numpy an inner loop of length 3, four times slower (0.8 against 0.2 ms per 224 px image)
        rows, scale, shift = images.reshape(len(examples), h, w * c), np.tile(self.scale, w), np.tile(self.shift, w)
        for i, (image, _, _) in enumerate(examples):
            np.multiply(image.reshape(h, w * c), scale, out=rows[i])
        rows += shift
        out = {"image": images, "label": np.array([label for _, label, _ in examples], np.int32)}
        if self.masked:
            out["mask"] = np.array([mask for _, _, mask in examples], np.float32)
        return out


@dataclasses.dataclass
class GrainSource(ImageStream):
    """Per-process numpy batches of an image folder through Grain (see the module docstring)."""

    name: str
    num_classes: int
    train: Records
    eval: Records
    threads: int = 0  # batches decoded in parallel by threads (0: the CPU count, at least 4, at most 8)
    workers: int = 0  # > 0: that many processes instead (Grain's mp_prefetch)

    def __post_init__(self) -> None:
        self.num_train, self.num_eval = len(self.train), len(self.eval)
        self.local_batch = local_batch(self.name, self.global_batch, self.num_train, self.process_count)
        # at least 4: on a machine busy with other work, 2 threads got a smaller share of 2 cores than tf.data
        self.threads = self.threads or min(8, max(4, os.cpu_count() or 1))
        std = np.asarray(self.std_rgb, np.float32)
        self._scale, self._shift = 1.0 / (255.0 * std), -np.asarray(self.mean_rgb, np.float32) / std
        self._recipe = _Recipe(self.resolution, self.augment, self.randaugment_layers, self.randaugment_magnitude)

    def eval_label_counts(self) -> np.ndarray:
        """Examples per class in the eval split (what ``majority_rate`` reads): labels only, nothing decoded."""
        return np.bincount(self.eval.labels.astype(np.int64), minlength=self.num_classes)

    def train_examples(self) -> grain.MapDataset:
        """The global training stream by position: shuffled per epoch, augmented, endless."""
        ds = grain.MapDataset.source(self.train).seed(self.seed).shuffle().repeat()
        return ds.random_map(self._recipe.train)

    def train_dataset(self) -> grain.MapDataset:
        """This process's training batches by step: ``train_dataset()[s]`` is the batch of step s.

        Global batch s is local batches s * process_count + p of the stream, p = 0 .. process_count - 1."""
        batches = self.train_examples().batch(self.local_batch, drop_remainder=True,
                                              batch_fn=_Collate(self._scale, self._shift, masked=False))
        return batches[self.process_index :: self.process_count]

    def eval_dataset(self) -> grain.MapDataset:
        """One pass: ceil(num_eval / global_batch) batches on every process, padding masked out."""
        padded = _Padded(self.eval, -(-self.num_eval // self.global_batch) * self.global_batch)
        batches = grain.MapDataset.source(padded).map(self._recipe.eval).batch(
            self.local_batch, batch_fn=_Collate(self._scale, self._shift, masked=True))
        return batches[self.process_index :: self.process_count]

    def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
        """The endless stream from ``start_step`` on: the step is the whole loader state (exact resume)."""
        return self._iterate(self.train_dataset()[start_step:])

    def eval_batches(self) -> Iterator[Batch]:
        """One pass over the eval split, the padding of the last batch flagged ``mask`` = 0."""
        return self._iterate(self.eval_dataset())

    def _iterate(self, batches: grain.MapDataset) -> Iterator[Batch]:
        """Batches decoded ahead: ``threads`` in flight in this process, or ``workers`` processes."""
        if self.workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # Grain's worker processes read its absl flags (their defaults here)
                flags.FLAGS.mark_as_parsed()
            ds = batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)).mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self.workers, per_worker_buffer_size=2))
        else:
            ds = batches.to_iter_dataset(grain.ReadOptions(num_threads=self.threads,
                                                           prefetch_buffer_size=self.threads + 1))
        return iter(ds)


# --------------------------------------------------------------------------- opening a folder


def folder_source(data: Any, resolution: int, global_batch: int, seed: int, process_index: int = 0,
                  process_count: int = 1, threads: int = 0, workers: int = 0) -> GrainSource:
    """Open, list and check ``folder:ROOT`` (see ``folder``) and serve it through Grain."""
    root = folder.folder_root(data.name)
    files = folder.list_folder(root)
    names = folder.class_names(root, files)
    counts = {split: sum(map(len, labels.values())) for split, labels in files.items()}
    counts = {split: n for split, n in counts.items() if n}

    train_split, eval_split, in_use = folder.splits_in_use(root, data, counts)
    (train_base, _, k), (eval_base, _, _) = folder.parse_range(train_split), folder.parse_range(eval_split)
    folder.check_images(root, [p for split in in_use for paths in files[split].values() for p in paths])
    if process_index == 0:
        folder.warn_small_classes(root, train_base, files[train_base], names)
    index = {label: i for i, label in enumerate(names)}

    def records(split: str) -> Records:
        pairs = [(p, index[label]) for label, paths in sorted(files[split].items()) for p in paths]
        return Records(tuple(p for p, _ in pairs), np.array([y for _, y in pairs], np.int32))

    train, eval_ = records(train_base), records(eval_base)
    if k is not None:  # holdout: a fixed stratified permutation of train, its tail held out
        from effnet_jax.data.idx_source import stratified_permutation

        order = stratified_permutation(train.labels)
        train, eval_ = train.take(order[:k]), train.take(order[k:])
    return GrainSource(
        name=data.name, num_classes=len(names), train=train, eval=eval_, resolution=resolution,
        global_batch=global_batch, seed=seed, augment=bool(data.augment),
        randaugment_layers=int(data.get("randaugment_layers", 0)),
        randaugment_magnitude=float(data.get("randaugment_magnitude", 10)),
        mean_rgb=tuple(data.get("mean_rgb", IMAGENET_MEAN)), std_rgb=tuple(data.get("std_rgb", IMAGENET_STD)),
        process_index=process_index, process_count=process_count,
        fingerprint={split: fingerprint.listing(root, files[split]) for split in in_use},
        threads=threads, workers=workers,
    )
