"""IDX (MNIST-format) source: parsing, splits, subsets, one-line errors, the real Fashion-MNIST, the trainer.

Small IDX files are written to tmp here (plain and gzip); no TensorFlow is imported.
"""

import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from effnet_jax.configs.digits import get_config
from effnet_jax.data import idx_source, input_pipeline, sources
from effnet_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 16
N_TRAIN, N_TEST, CLASSES, SIDE = 200, 40, 5, 8


def idx_bytes(array: np.ndarray, type_byte: int = 0x08) -> bytes:
    header = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path, data: bytes, gz: bool = False):
    path = str(path) + (".gz" if gz else "")
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)
    return path


def make_dir(root, gz: bool = False, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 0):
    """An IDX folder whose label is readable from the image (class c: mean brightness ~ c)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % CLASSES).astype(np.uint8)
        rng.shuffle(labels)
        images = np.clip(labels[:, None, None] * 50 + rng.integers(0, 20, (n, SIDE, SIDE)), 0, 255).astype(np.uint8)
        write(os.path.join(root, f"{prefix}-images-idx3-ubyte"), idx_bytes(images), gz)
        write(os.path.join(root, f"{prefix}-labels-idx1-ubyte"), idx_bytes(labels), gz)
    return str(root)


def data_config(name, **overrides):
    d = get_config().data
    d.eval_split = "test"
    d.name = name
    d.update(overrides)
    return d


def source(data, batch=16, seed=0, res=RES, **kw):
    return sources.create_source(data, res, batch, seed, **kw)


@pytest.mark.parametrize("gz", [False, True])
def test_loads_plain_and_gzip(tmp_path, gz):
    root = make_dir(tmp_path / "d", gz=gz)
    src = source(data_config(f"idx:{root}"))
    assert isinstance(src, input_pipeline.ArraySource)
    assert src.num_train == N_TRAIN and src.num_eval == N_TEST and src.num_classes == CLASSES
    assert src.train_images.shape == (N_TRAIN, RES, RES, 3) and src.train_images.dtype == np.float32
    assert src.eval_images.shape == (N_TEST, RES, RES, 3)
    assert np.array_equal(src.train_images[..., 0], src.train_images[..., 2]), "grey repeated to RGB"
    assert abs(float(src.train_images.mean())) < 0.05 and abs(float(src.train_images.std()) - 1) < 0.05
    labels = idx_source.read_idx(os.path.join(root, "train-labels-idx1-ubyte" + (".gz" if gz else "")))
    assert np.array_equal(src.train_labels, labels) and src.train_labels.dtype == np.int32
    # the brightest class is brightest after standardising and resizing
    means = [src.train_images[src.train_labels == c].mean() for c in range(CLASSES)]
    assert means == sorted(means)
    batch = next(src.train_batches(0))
    assert batch["image"].shape == (16, RES, RES, 3) and batch["label"].shape == (16,)
    evals = list(src.eval_batches())
    assert sum(float(b["mask"].sum()) for b in evals) == N_TEST


def test_plain_and_gzip_identical(tmp_path):
    a = source(data_config(f"idx:{make_dir(tmp_path / 'a')}"))
    b = source(data_config(f"idx:{make_dir(tmp_path / 'b', gz=True)}"))
    assert np.array_equal(a.train_images, b.train_images) and np.array_equal(a.eval_labels, b.eval_labels)


def test_read_idx_multibyte_types(tmp_path):
    x = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    assert np.array_equal(idx_source.read_idx(write(tmp_path / "i32", idx_bytes(x, 0x0C))), x)
    f = np.linspace(0, 1, 5).astype(np.float32)
    assert np.array_equal(idx_source.read_idx(write(tmp_path / "f32", idx_bytes(f, 0x0D))), f)


def test_holdout_disjoint_stratified_deterministic(tmp_path):
    root = make_dir(tmp_path / "d")
    data = data_config(f"idx:{root}", holdout_fraction=0.25, eval_split="validation")
    src = source(data, seed=0)
    assert src.num_train == 150 and src.num_eval == 50
    assert np.bincount(src.eval_labels).tolist() == [10] * CLASSES, "the holdout is stratified"
    train_rows = {img.tobytes() for img in src.train_images}
    assert not train_rows & {img.tobytes() for img in src.eval_images}, "validation images are also in train"
    other = source(data, seed=7)  # the split is fixed: it does not move with the run's seed
    assert np.array_equal(src.eval_images, other.eval_images) and np.array_equal(src.train_labels, other.train_labels)
    assert np.array_equal(src.eval_labels, source(data).eval_labels)
    # with a holdout, eval_split="test" still scores on t10k, training on the same images
    test = source(data_config(f"idx:{root}", holdout_fraction=0.25, eval_split="test"))
    assert test.num_eval == N_TEST and np.array_equal(test.train_labels, src.train_labels)


def test_train_subset(tmp_path):
    root = make_dir(tmp_path / "d")
    sub = source(data_config(f"idx:{root}", holdout_fraction=0.25, eval_split="validation", train_subset=50))
    full = source(data_config(f"idx:{root}", holdout_fraction=0.25, eval_split="validation"))
    assert sub.num_train == 50 and sub.num_eval == 50
    assert np.bincount(sub.train_labels).tolist() == [10] * CLASSES, "a prefix of the permutation is balanced"
    assert np.array_equal(sub.eval_labels, full.eval_labels), "the subset leaves the validation split alone"
    assert np.array_equal(sub.train_labels, full.train_labels[:50])
    no_holdout = source(data_config(f"idx:{root}", train_subset=30))
    assert no_holdout.num_train == 30 and no_holdout.num_eval == N_TEST
    with pytest.raises(UserError, match="train_subset 500 is larger than the 150"):
        source(data_config(f"idx:{root}", holdout_fraction=0.25, eval_split="validation", train_subset=500))


def test_config_without_new_fields(tmp_path):
    """A data section without train_subset / num_classes / holdout_fraction still works."""
    import ml_collections

    root = make_dir(tmp_path / "d")
    data = ml_collections.ConfigDict({"name": f"idx:{root}", "train_split": "train", "eval_split": "test",
                                      "augment": True})
    assert source(data).num_train == N_TRAIN


def test_fashion_mnist_alias_resolves():
    assert idx_source.resolve_dir("fashion_mnist") == "/usr/share/datasets/fashion-mnist"
    assert idx_source.is_idx_name("fashion_mnist") and idx_source.is_idx_name("idx:/x")
    assert not idx_source.is_idx_name("mnist")


def one_line_error(data, match, **kw):
    with pytest.raises(UserError) as e:
        source(data, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert match in msg, msg
    return msg


def corrupt(tmp_path, stem, data: bytes, gz=False, **cfg):
    root = make_dir(tmp_path / "d")
    os.remove(os.path.join(root, stem))
    write(os.path.join(root, stem), data, gz)
    return data_config(f"idx:{root}", **cfg)


IMAGES = np.zeros((N_TRAIN, SIDE, SIDE), np.uint8)
LABELS = (np.arange(N_TRAIN) % CLASSES).astype(np.uint8)


@pytest.mark.parametrize("stem, data, match", [
    ("train-images-idx3-ubyte", b"\x01\x02\x08\x03" + bytes(100), "bad magic number"),
    ("train-images-idx3-ubyte", b"\x00\x00\x07\x03" + bytes(100), "unsupported type byte 0x07"),
    ("train-images-idx3-ubyte", idx_bytes(IMAGES)[:-10], "truncated"),
    ("train-images-idx3-ubyte", idx_bytes(IMAGES) + b"\x00", "truncated or corrupt"),
    ("train-images-idx3-ubyte", b"\x00\x00", "truncated"),
    ("train-images-idx3-ubyte", b"\x00\x00\x08\x03\x00\x00", "truncated"),
    ("train-images-idx3-ubyte", idx_bytes(IMAGES.astype(np.float32), 0x0D), "must hold uint8 images"),
    ("train-images-idx3-ubyte", idx_bytes(IMAGES[:, 0]), "must hold uint8 images of 3 dimensions"),
    ("train-labels-idx1-ubyte", idx_bytes(LABELS[:-1]), "200 images in train-images-idx3-ubyte but 199 labels"),
    ("train-labels-idx1-ubyte", idx_bytes(LABELS.reshape(20, 10)), "integer labels of 1 dimension"),
])
def test_bad_files_one_line_errors(tmp_path, stem, data, match):
    msg = one_line_error(corrupt(tmp_path, stem, data), match)
    assert stem in msg or "split" in msg


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not gzip"])
def test_corrupt_gzip(tmp_path, damage):
    root = make_dir(tmp_path / "d", gz=True)
    path = os.path.join(root, "train-images-idx3-ubyte.gz")
    raw = open(path, "rb").read()
    data = {"truncated": raw[: len(raw) // 2], "garbage": raw[:10] + b"garbage!" * 8,
            "not gzip": b"not gzip at all"}[damage]
    write(path, data)
    msg = one_line_error(data_config(f"idx:{root}"), "corrupt gzip file")
    assert "train-images-idx3-ubyte.gz" in msg


def test_labels_out_of_range(tmp_path):
    labels = (np.arange(N_TEST) % CLASSES).astype(np.uint8)
    labels[3] = CLASSES + 2  # a test class never seen in train
    data = corrupt(tmp_path, "t10k-labels-idx1-ubyte", idx_bytes(labels))
    one_line_error(data, "test labels out of range: 7 is not in [0, 5)")
    data.num_classes = 4
    one_line_error(data, "train labels out of range: 4 is not in [0, 4)")


def test_missing_dir_and_files(tmp_path):
    one_line_error(data_config(f"idx:{tmp_path / 'nope'}"), f"directory {tmp_path / 'nope'} not found")
    root = make_dir(tmp_path / "d")
    os.remove(os.path.join(root, "t10k-labels-idx1-ubyte"))
    one_line_error(data_config(f"idx:{root}"), "t10k-labels-idx1-ubyte[.gz] not found in")
    assert source(data_config(f"idx:{root}", holdout_fraction=0.2, eval_split="validation")).num_eval == 40, \
        "validating on a holdout does not need the test files"
    one_line_error(data_config("idx:"), "needs a directory")


def test_bad_splits_and_fractions(tmp_path):
    root = make_dir(tmp_path / "d")
    one_line_error(data_config(f"idx:{root}", eval_split="validation"), "holdout_fraction > 0 adds 'validation'")
    one_line_error(data_config(f"idx:{root}", train_split="test"), "train on 'train'")
    one_line_error(data_config(f"idx:{root}", holdout_fraction=1.0), "holdout_fraction must be in [0, 1)")
    one_line_error(data_config(f"idx:{root}", holdout_fraction=1e-5, eval_split="validation"), "empty")
    one_line_error(data_config(f"idx:{root}", train_subset=-1), "train_subset must be >= 0")
    one_line_error(data_config(f"idx:{root}"), "batch size 500 is larger", batch=500)


def test_fashion_mnist_alias_missing_says_apt_get(monkeypatch, tmp_path):
    monkeypatch.setattr(idx_source, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    one_line_error(data_config("fashion_mnist"), "apt-get install dataset-fashion-mnist")


@pytest.mark.slow
def test_no_tensorflow_imported(tmp_path):
    root = make_dir(tmp_path / "d", gz=True)
    script = (
        "import sys\n"
        "from effnet_jax.data import sources\n"
        "from effnet_jax.configs.digits import get_config\n"
        f"d = get_config().data; d.name = 'idx:{root}'; d.eval_split = 'test'\n"
        "src = sources.create_source(d, 16, 8, 0)\n"
        "assert src.num_train == 200, src.num_train\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "print('OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(FASHION),
                    reason="dataset-fashion-mnist not installed: apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist():
    x_train, y_train = idx_source.load_split(FASHION, "train")
    x_test, y_test = idx_source.load_split(FASHION, "test")
    assert x_train.shape == (60_000, 28, 28) and x_test.shape == (10_000, 28, 28)
    assert np.bincount(y_train).tolist() == [6000] * 10 and np.bincount(y_test).tolist() == [1000] * 10
    data = data_config("fashion_mnist", holdout_fraction=0.1, eval_split="validation", train_subset=2000)
    src = source(data, batch=32, res=32)
    assert src.num_classes == 10 and src.num_train == 2000 and src.num_eval == 6000
    assert np.bincount(src.train_labels).tolist() == [200] * 10 and np.bincount(src.eval_labels).tolist() == [600] * 10
    assert src.train_images.shape == (2000, 32, 32, 3) and src.name == "fashion_mnist"


@pytest.mark.slow
def test_trainer_runs_on_idx_folder(tmp_path):
    root = make_dir(tmp_path / "d", gz=True)
    wd = tmp_path / "wd"
    cmd = [sys.executable, "-m", "effnet_jax.train", "--config=effnet_jax/configs/digits.py", f"--workdir={wd}",
           f"--config.data.name=idx:{root}", "--config.data.eval_split=test", "--config.model.network=tiny",
           "--config.num_train_steps=2", "--config.progress_bar=False"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((wd / "result.json").read_text())
    assert result["status"] == "ok" and result["steps"] == 2
    assert result["num_classes"] == CLASSES and result["dataset"] == f"idx:{root}"
