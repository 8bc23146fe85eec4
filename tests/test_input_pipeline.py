"""Input pipelines: determinism, resume, eval coverage, per-process shards, fast failures.

The digits tests need no TensorFlow, nor do the image folder checks through ``sources.create_source``
(the Grain path; tests/test_grain_source.py has the rest). The TFDS tests use offline data only: a tiny
dataset prepared into tmp (tfds' own DummyMnist), ``tfds.testing.mock_data`` on cifar10, and an image
folder of PNGs written here, read through tf.data (``tfds_source``, the benchmark's baseline).
"""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from effnet_jax.configs.default import get_config
from effnet_jax.data import sources
from effnet_jax.errors import UserError

RES = 16


def data_config(**overrides):
    d = get_config().data
    d.update(overrides)
    return d


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def take(it, n):
    return [next(it) for _ in range(n)]


def check_source(make, num_eval: int, steps: int = 6):
    """Determinism, resume at step 5, eval covering each example once, two processes = one global batch."""
    src = make(0, 1)
    first = take(src.train_batches(0), steps)
    assert all(same(a, b) for a, b in zip(first, take(make(0, 1).train_batches(0), steps)))
    assert same(next(src.train_batches(steps - 1)), first[-1])
    assert not same(first[0], first[1])
    evals = list(src.eval_batches())
    assert sum(float(b["mask"].sum()) for b in evals) == num_eval == src.num_eval
    assert all(b["mask"].dtype == np.float32 and b["image"].shape[0] == len(b["mask"]) for b in evals)
    parts = [make(p, 2) for p in range(2)]
    evals2 = [list(p.eval_batches()) for p in parts]
    assert len(evals2[0]) == len(evals2[1]) == len(evals), "every process must run the same number of eval steps"
    assert sum(float(b["mask"].sum()) for e in evals2 for b in e) == num_eval
    return src, first, parts


# --------------------------------------------------------------------------- digits (numpy, no TF)


def test_digits_deterministic_resumable_sharded():
    data = data_config(name="digits", train_split="train", eval_split="validation", max_shift_fraction=0.1)

    def make(p, n):
        return sources.create_source(data, RES, 10, seed=3, process_index=p, process_count=n)

    src, first, parts = check_source(make, num_eval=359)
    assert first[0]["image"].shape == (10, RES, RES, 3) and first[0]["image"].dtype == np.float32
    local = [next(p.train_batches(2)) for p in parts]
    assert local[0]["image"].shape[0] == 5
    assert np.array_equal(np.concatenate([b["label"] for b in local]), first[2]["label"])
    data.max_shift_fraction = 0.0  # the shift's random stream is per process: compare images without it
    local = [next(make(p, 2).train_batches(2)) for p in range(2)]
    assert same({k: np.concatenate([b[k] for b in local]) for k in local[0]}, next(make(0, 1).train_batches(2)))
    assert sources.create_source(data, RES, 10, seed=4).train_batches(0).__next__()["label"].tolist() != \
        first[0]["label"].tolist()


@pytest.mark.slow
def test_core_imports_do_not_import_tensorflow():
    code = ("import sys, effnet_jax, effnet_jax.train, effnet_jax.training.trainer, effnet_jax.model.efficientnet\n"
            "from effnet_jax.data import sources\n"
            "from effnet_jax.configs.default import get_config\n"
            "d = get_config().data; d.name = 'digits'; d.train_split = 'train'\n"
            "next(sources.create_source(d, 8, 8, 0).train_batches(0))\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------- TFDS / image folders

try:  # conftest has imported torch first (TensorFlow then triton segfaults)
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from effnet_jax.data import tf_preprocess, tfds_source
except ImportError:  # the optional '[data]' extra is not installed
    tf = tfds = tfds_source = tf_preprocess = None

needs_tfds = pytest.mark.skipif(tfds_source is None, reason="tensorflow-datasets is not installed")


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    """tfds' DummyMnist (20 train + 20 test grey 28x28 images) really prepared on disk, offline."""
    from tensorflow_datasets.testing import test_utils

    root = tmp_path_factory.mktemp("tfds")
    test_utils.DummyMnist(data_dir=str(root)).download_and_prepare()
    return str(root)


@needs_tfds
def test_prepared_tfds_dataset(prepared_dir):
    data = data_config(name="dummy_mnist", data_dir=prepared_dir, train_split="train", eval_split="test")

    def make(p, n):
        return tfds_source.create_source(data, RES, 8, seed=1, process_index=p, process_count=n)

    src, first, parts = check_source(make, num_eval=20)  # step 5 = examples 40..47: the third epoch
    assert (src.name, src.num_classes, src.num_train) == ("dummy_mnist", 10, 20)
    for b in first:
        assert b["image"].shape == (8, RES, RES, 3) and b["image"].dtype == np.float32  # grey -> RGB
        assert b["label"].dtype == np.int32 and 0 <= b["label"].min() and b["label"].max() < 10
    assert next(parts[0].train_batches(0))["image"].shape == (4, RES, RES, 3)
    # DummyMnist's images are all 1/255: normalised, every pixel is (1/255 - mean) / std
    expected = (1 / 255 - np.array(tfds_source.IMAGENET_MEAN)) / np.array(tfds_source.IMAGENET_STD)
    eval_batch = next(src.eval_batches())
    np.testing.assert_allclose(eval_batch["image"][0], np.broadcast_to(expected, (RES, RES, 3)), atol=1e-4)
    # each epoch sees every training example once
    labels = np.concatenate([b["label"] for b in first[:5]])[:20]
    assert sorted(labels.tolist()) == sorted([i % 10 for i in range(20)])


@needs_tfds
def test_holdout_and_randaugment(prepared_dir):
    data = data_config(name="dummy_mnist", data_dir=prepared_dir, train_split="train", eval_split="no_such",
                       holdout_fraction=0.25, randaugment_layers=2, randaugment_magnitude=9)
    src = tfds_source.create_source(data, RES, 4, seed=0)
    assert (src.num_train, src.num_eval) == (15, 5)
    assert sum(float(b["mask"].sum()) for b in src.eval_batches()) == 5
    a, b = next(src.train_batches(2)), take(src.train_batches(0), 3)[2]
    assert same(a, b) and np.isfinite(a["image"]).all()
    with pytest.raises(UserError, match="splits train, test"):
        tfds_source.create_source(data_config(name="dummy_mnist", data_dir=prepared_dir), RES, 4, seed=0)


@needs_tfds
@pytest.mark.parametrize("op", range(len(tf_preprocess.RANDAUGMENT_OPS) if tf_preprocess else 1))
def test_randaugment_ops(op):
    image = tf.random.stateless_uniform([RES, RES, 3], [0, op], 0, 255)
    for sign in (-1.0, 1.0):
        out = tf_preprocess.randaugment_op(image, op, 0.9, sign).numpy()
        assert out.shape == (RES, RES, 3) and np.isfinite(out).all()
        assert out.min() >= 0 and out.max() <= 255, tf_preprocess.RANDAUGMENT_OPS[op]
    if tf_preprocess.RANDAUGMENT_OPS[op] in ("rotate", "shear_x", "translate_y", "solarize", "posterize"):
        assert not np.allclose(out, image.numpy())


@needs_tfds
def test_mock_cifar10(tmp_path):
    """Mocked records, real cifar10 metadata (the split sizes written to tmp_path)."""
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    builder.info.set_splits(tfds.core.SplitDict(
        [tfds.core.SplitInfo(name=n, shard_lengths=[k], num_bytes=0) for n, k in (("train", 24), ("test", 10))]))
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)
    data = data_config(name="cifar10", train_split="train", eval_split="test")
    with tfds.testing.mock_data(num_examples=10, data_dir=str(tmp_path)):
        src = tfds_source.create_source(data, 24, 8, seed=0)
        batch = next(src.train_batches(0))
        evals = list(src.eval_batches())
    assert (src.num_classes, src.num_train, src.num_eval) == (10, 24, 10)
    assert batch["image"].shape == (8, 24, 24, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and set(batch["label"].tolist()) <= set(range(10))
    assert [b["mask"].tolist() for b in evals] == [[1.0] * 8, [1.0] * 2 + [0.0] * 6]


def write_image_folder(root, counts=None):
    """root/SPLIT/LABEL/i.png, random sizes, grey and RGB alternating; ``counts``: {split: {label: n}}."""
    from PIL import Image

    counts = counts or {split: {"cat": n, "dog": n} for split, n in (("train", 6), ("val", 3))}
    rng = np.random.default_rng(0)
    for split, labels in counts.items():
        for label, n in labels.items():
            os.makedirs(root / split / label)
            for i in range(n):
                h, w = rng.integers(20, 40, size=2)
                mode, shape = ("L", (h, w)) if i % 2 else ("RGB", (h, w, 3))
                image = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode)
                image.save(root / split / label / f"{i}.png")
    return root


@needs_tfds
def test_image_folder(tmp_path, capsys):
    write_image_folder(tmp_path)
    data = data_config(name=f"folder:{tmp_path}", train_split="train", eval_split="val")

    def make(p, n):
        return tfds_source.create_source(data, RES, 4, seed=0, process_index=p, process_count=n)

    src, first, _ = check_source(make, num_eval=6)
    assert (src.num_classes, src.num_train) == (2, 12)
    assert first[0]["image"].shape == (4, RES, RES, 3) and set(first[0]["label"].tolist()) <= {0, 1}
    held = tfds_source.create_source(data_config(name=f"folder:{tmp_path}", train_split="train",
                                                 holdout_fraction=0.25), RES, 4, seed=0)
    assert (held.num_train, held.num_eval) == (9, 3)
    assert sum(float(b["mask"].sum()) for b in held.eval_batches()) == 3
    with pytest.raises(UserError, match="does not exist"):
        tfds_source.create_source(data_config(name=f"folder:{tmp_path}/nope"), RES, 4, seed=0)
    assert capsys.readouterr().err == ""  # no warning: every class has enough images


def folder_error(data) -> str:
    """The one-line UserError that opening ``data`` raises."""
    with pytest.raises(UserError) as e:
        sources.create_source(data, RES, 4, seed=0)
    assert "\n" not in str(e.value)
    return str(e.value)


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage, why", [  # through sources.create_source: the Grain path, no TensorFlow
    (lambda p: truncate(p), "truncated"),
    (lambda p: p.write_bytes(b"not an image at all"), "cannot identify image file"),
    (lambda p: p.write_bytes(b""), "cannot identify image file"),
])
def test_image_folder_refuses_an_unreadable_image_naming_it(tmp_path, damage, why):
    """Before training, not as a TensorFlow error mid-run, naming the first bad file and the count."""
    root = write_image_folder(tmp_path / "images")
    damage(root / "train" / "dog" / "3.png")
    truncate(root / "val" / "cat" / "1.png")
    data = data_config(name=f"folder:{root}", train_split="train", eval_split="val")
    message = folder_error(data)
    assert message.startswith(f"image folder {str(root)!r}: train/dog/3.png is not a readable image (")
    assert why in message.lower() and "(2 of 18 images are unreadable)" in message
    # Only the splits in use are read: with a holdout, val is not.
    held = data_config(name=f"folder:{root}", train_split="train", holdout_fraction=0.25)
    assert "(2 of" not in folder_error(held)


def test_image_folder_needs_two_classes(tmp_path):
    root = write_image_folder(tmp_path, {"train": {"cat": 6}, "val": {"cat": 3}})
    message = folder_error(data_config(name=f"folder:{root}", train_split="train", eval_split="val"))
    assert message.startswith(f"image folder {str(root)!r} has a single class ('cat')")


@needs_tfds
def test_image_folder_warns_on_a_class_with_few_images(tmp_path, capsys):
    counts = {"train": {"cat": 6, "dog": 2, "emu": 0}, "val": {"cat": 2, "dog": 2, "emu": 2}}
    root = write_image_folder(tmp_path, counts)
    src = tfds_source.create_source(data_config(name=f"folder:{root}", train_split="train", eval_split="val"),
                                    RES, 4, seed=0)
    assert src.num_classes == 3
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: image folder {str(root)!r}: classes 'emu' (0), 'dog' (2) have fewer than 5 images in "
                   "'train'; accuracy on them is noise"]


def one_line_error(data) -> str:
    start = time.perf_counter()
    with pytest.raises(UserError) as e:
        sources.create_source(data, RES, 8, seed=0)
    assert time.perf_counter() - start < 10, "must fail fast, not retry downloads"
    message = str(e.value)
    assert "\n" not in message
    return message


@needs_tfds
def test_unprepared_dataset_fails_fast(tmp_path):
    message = one_line_error(data_config(name="cifar10", data_dir=str(tmp_path)))
    assert "not prepared" in message and f"tfds build cifar10 --data_dir={tmp_path}" in message
    message = one_line_error(data_config(name="imagenet2012", data_dir=str(tmp_path)))
    assert "manual download" in message


@needs_tfds
@pytest.mark.parametrize("name", ["no_such_dataset_xyz", "cifar_10", "huggingface:no_such_xyz"])
def test_unknown_dataset(name):
    message = one_line_error(data_config(name=name))
    assert f"unknown dataset '{name}'" in message
