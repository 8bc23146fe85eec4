"""Image folders through Grain and PIL: the stream, resume, processes, bad input, the recipe, fingerprints.

Nothing here imports TensorFlow (a subprocess checks that a folder run works with TensorFlow made
unimportable); folders of small PNGs and JPEGs are written to tmp.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from effnet_jax.configs.default import get_config
from effnet_jax.data import fingerprint, folder, grain_source, pil_preprocess, sources
from effnet_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 16


def data_config(root, **overrides):
    d = get_config().data
    d.update({"name": f"folder:{root}", "train_split": "train", "eval_split": "val", **overrides})
    return d


def write_folder(root, counts=None, seed=0):
    """root/SPLIT/LABEL/i.(png|jpg): random sizes; grey PNGs, RGB JPEGs and RGBA PNGs in turn."""
    counts = counts or {"train": {"cat": 6, "dog": 6}, "val": {"cat": 3, "dog": 3}}
    rng = np.random.default_rng(seed)
    for split, labels in counts.items():
        for label, n in labels.items():
            os.makedirs(root / split / label, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(20, 48, size=2))
                kind = i % 3
                mode, shape, ext = [("L", (h, w), "png"), ("RGB", (h, w, 3), "jpg"), ("RGBA", (h, w, 4), "png")][kind]
                pixels = rng.integers(0, 255, shape, dtype=np.uint8)
                Image.fromarray(pixels, mode).save(root / split / label / f"{i}.{ext}")
    return root


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def take(it, n):
    return [next(it) for _ in range(n)]


def make(root, batch=4, seed=0, p=0, n=1, **overrides):
    return sources.create_source(data_config(root, **overrides), RES, batch, seed, process_index=p, process_count=n)


def one_line_error(root, **overrides) -> str:
    with pytest.raises(UserError) as e:
        make(root, **overrides)
    assert "\n" not in str(e.value)
    return str(e.value)


# --------------------------------------------------------------------------- the stream


@pytest.mark.parametrize("randaugment", [0, 2])
def test_folder_stream_is_a_pure_function_of_seed_process_and_step(tmp_path, randaugment):
    write_folder(tmp_path)
    src = make(tmp_path, randaugment_layers=randaugment)
    assert isinstance(src, grain_source.GrainSource)
    assert (src.num_classes, src.num_train, src.num_eval) == (2, 12, 6)
    first = take(src.train_batches(0), 7)
    assert all(same(a, b) for a, b in zip(first, take(make(tmp_path, randaugment_layers=randaugment)
                                                       .train_batches(0), 7)))
    # resumed at step 5: exactly the batches of the uninterrupted stream, nothing read before
    assert all(same(a, b) for a, b in zip(take(src.train_batches(5), 2), first[5:]))
    assert src.train_dataset()[6] is not None and same(src.train_dataset()[6], first[6])
    b = first[0]
    assert b["image"].shape == (4, RES, RES, 3) and b["image"].dtype == np.float32 and np.isfinite(b["image"]).all()
    assert b["label"].dtype == np.int32 and set(b["label"].tolist()) <= {0, 1}
    assert not same(first[0], first[3]), "epoch 2 is shuffled and augmented anew"
    assert not same(first[0], next(make(tmp_path, seed=1, randaugment_layers=randaugment).train_batches(0)))
    # two processes: their local batches are the halves of the one-process global batch, pixel for pixel
    halves = [take(make(tmp_path, p=p, n=2, randaugment_layers=randaugment).train_batches(2), 2) for p in range(2)]
    for step in range(2):
        joined = {k: np.concatenate([halves[0][step][k], halves[1][step][k]]) for k in first[0]}
        assert same(joined, first[2 + step])


def test_each_epoch_reads_every_training_image_once(tmp_path):
    write_folder(tmp_path, {"train": {"cat": 5, "dog": 7}, "val": {"cat": 1, "dog": 1}})
    src = make(tmp_path, augment=False)
    batches = take(src.train_batches(0), 6)  # two epochs of 12
    for epoch in (batches[:3], batches[3:]):
        labels = np.concatenate([b["label"] for b in epoch])
        assert np.bincount(labels).tolist() == [5, 7]
        images = np.concatenate([b["image"] for b in epoch])
        assert len({im.tobytes() for im in images}) == 12  # 12 different images, none twice


def test_eval_counts_every_image_once_on_any_number_of_processes(tmp_path):
    write_folder(tmp_path, {"train": {"cat": 6, "dog": 6}, "val": {"cat": 4, "dog": 3}})
    one = list(make(tmp_path).eval_batches())
    assert len(one) == 2 and [b["mask"].tolist() for b in one] == [[1.0] * 4, [1.0] * 3 + [0.0]]
    assert np.concatenate([b["label"] for b in one])[:7].tolist() == [0] * 4 + [1] * 3
    parts = [list(make(tmp_path, p=p, n=2).eval_batches()) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == 2, "every process runs the same number of eval steps"
    assert sum(float(b["mask"].sum()) for part in parts for b in part) == 7
    for i in range(2):  # the two halves are the one-process batch
        assert same({k: np.concatenate([parts[0][i][k], parts[1][i][k]]) for k in one[i]}, one[i])
    assert make(tmp_path).eval_label_counts().tolist() == [4, 3]


def test_holdout_is_fixed_and_stratified(tmp_path):
    write_folder(tmp_path, {"train": {"cat": 10, "dog": 10}})
    a = make(tmp_path, eval_split="nope", holdout_fraction=0.2)
    b = make(tmp_path, eval_split="nope", holdout_fraction=0.2, seed=7)
    assert (a.num_train, a.num_eval) == (16, 4) and a.eval.paths == b.eval.paths
    assert a.eval_label_counts().tolist() == [2, 2]
    assert not set(a.eval.paths) & set(a.train.paths)
    assert set(a.fingerprint) == {"train"}


@pytest.mark.slow
def without_tensorflow(tmp_path) -> str:
    """Python code that makes this interpreter one without TensorFlow installed: site-packages swapped for a
    folder of links to everything in it except tensorflow* (so that ``find_spec('tensorflow')`` is None too)."""
    import site

    shadow = tmp_path / "site-without-tf"
    shadow.mkdir()
    real = [p for p in site.getsitepackages() if os.path.isdir(p)]
    for path in real:
        for name in os.listdir(path):
            if not name.lower().startswith("tensorflow") and not (shadow / name).exists():
                os.symlink(os.path.join(path, name), shadow / name)
    return ("import sys, site\n"
            f"sys.path[:] = [p for p in sys.path if p not in {real!r}]\n"
            f"site.addsitedir({str(shadow)!r})\n"
            "import importlib.util\n"
            "assert importlib.util.find_spec('tensorflow') is None\n")


@pytest.mark.slow  # starts a Python process
def test_no_tensorflow_on_the_folder_path(tmp_path):
    """TensorFlow not installed (as without the [data] extra): a folder is read and served all the same."""
    write_folder(tmp_path / "images")
    code = without_tensorflow(tmp_path) + (
        "from effnet_jax.data import sources\n"
        "from effnet_jax.configs.default import get_config\n"
        "d = get_config().data\n"
        f"d.name, d.train_split, d.eval_split = 'folder:{tmp_path / 'images'}', 'train', 'val'\n"
        "d.randaugment_layers = 2\n"
        "src = sources.create_source(d, 16, 4, 0)\n"
        "next(src.train_batches(3)); list(src.eval_batches())\n"
        "assert not [m for m in sys.modules if m.startswith('tensorflow')], 'tensorflow was imported'\n"
        "print('OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# --------------------------------------------------------------------------- bad input: one line, nothing lost


def _truncated_jpeg(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _png_bad_crc(path):
    Image.new("RGB", (20, 20), (10, 20, 30)).save(path)
    data = bytearray(path.read_bytes())
    data[33 + 12] ^= 0xFF  # a byte of the first chunk after IHDR (its CRC no longer matches)
    path.write_bytes(bytes(data))


def _symlink_loop(path):
    os.symlink(path.name, path)  # x.png -> x.png


@pytest.mark.parametrize("name, damage, why", [
    ("3.jpg", _truncated_jpeg, "truncated"),
    ("3.png", _png_bad_crc, "bad header checksum"),
    ("3.png", lambda p: p.write_bytes(b""), "cannot identify image file"),
    ("3.png", lambda p: p.write_bytes(b"not an image at all"), "cannot identify image file"),
    ("3.png", _symlink_loop, "too many levels of symbolic links"),
])
def test_an_unreadable_image_is_refused_naming_it(tmp_path, name, damage, why):
    root = write_folder(tmp_path / "images")
    for old in (root / "train" / "dog").glob("3.*"):
        old.unlink()
    damage(root / "train" / "dog" / name)
    before = sorted(str(p) for p in root.rglob("*"))
    message = one_line_error(root)
    assert message.startswith(f"image folder {str(root)!r}: train/dog/{name} is not a readable image (")
    assert why in message.lower() and message.endswith("remove or replace it"), message
    assert sorted(str(p) for p in root.rglob("*")) == before, "nothing written or removed"


def test_a_directory_symlink_loop_is_not_followed(tmp_path):
    """Only root/SPLIT/LABEL/file is read: a link back up inside a label folder is no image and no hang."""
    write_folder(tmp_path)
    os.symlink("..", tmp_path / "train" / "cat" / "up")
    os.symlink(".", tmp_path / "train" / "dog" / "again")
    src = make(tmp_path)
    assert (src.num_classes, src.num_train, src.fingerprint["train"]["files"]) == (2, 12, 12)


def test_a_single_class_is_refused(tmp_path):
    write_folder(tmp_path, {"train": {"cat": 6}, "val": {"cat": 3}})
    assert one_line_error(tmp_path).startswith(f"image folder {str(tmp_path)!r} has a single class ('cat')")


def test_other_files_are_ignored_and_odd_images_decoded(tmp_path):
    """Non-image files are no images; 16-bit PNGs, CMYK JPEGs, palette and grey+alpha images all read as RGB."""
    write_folder(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "dog" / ".DS_Store").write_bytes(b"\0\1\2")
    (tmp_path / "README").write_text("a file at the top")
    Image.fromarray(np.full((30, 20), 65535, np.uint16)).save(tmp_path / "train" / "cat" / "wide.png")
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(tmp_path / "train" / "dog" / "cmyk.jpg")
    Image.new("P", (24, 24), 3).save(tmp_path / "train" / "dog" / "palette.png")
    Image.new("LA", (24, 24), (200, 10)).save(tmp_path / "train" / "cat" / "la.png")
    src = make(tmp_path)
    assert src.num_train == 16 and src.fingerprint["train"]["files"] == 16
    white = pil_preprocess.eval_image(str(tmp_path / "train" / "cat" / "wide.png"), 8)
    assert white.shape == (8, 8, 3) and white.dtype == np.uint8 and white.min() >= 254
    red = pil_preprocess.eval_image(str(tmp_path / "train" / "dog" / "cmyk.jpg"), 8).astype(int)
    assert (red[..., 0] > 200).all() and (red[..., 1:] < 60).all()
    grey = pil_preprocess.eval_image(str(tmp_path / "train" / "cat" / "la.png"), 8)
    assert (np.abs(grey.astype(int) - 200) <= 1).all()  # alpha dropped, grey repeated
    for _ in range(5):
        next(src.train_batches(0))


def test_missing_folder_and_unknown_split(tmp_path):
    assert "does not exist" in one_line_error(tmp_path / "nope")
    write_folder(tmp_path)
    assert "has splits train, val; got 'test'" in one_line_error(tmp_path, eval_split="test")


# --------------------------------------------------------------------------- the recipe


def test_center_box_is_the_official_crop():
    size = int(224 / (224 + 32) * 300)  # 262: resolution / (resolution + 32) of the shorter side
    assert pil_preprocess.center_box(400, 300, 224) == (69, 19, 69 + size, 19 + size)


def test_inception_box_stays_inside_and_covers_a_tenth():
    rng = np.random.default_rng(0)
    for w, h in [(400, 300), (50, 500), (17, 23), (1, 1)]:
        for _ in range(200):
            left, top, right, bottom = pil_preprocess.inception_box(w, h, 32, rng)
            assert 0 <= left < right <= w and 0 <= top < bottom <= h
            assert (right - left) * (bottom - top) >= 0.1 * w * h or \
                (left, top, right, bottom) == pil_preprocess.center_box(w, h, 32)


def test_train_image_is_deterministic_in_its_generator(tmp_path):
    path = tmp_path / "x.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(path)
    a = pil_preprocess.train_image(str(path), 32, np.random.default_rng(5), 2, 10)
    b = pil_preprocess.train_image(str(path), 32, np.random.default_rng(5), 2, 10)
    c = pil_preprocess.train_image(str(path), 32, np.random.default_rng(6), 2, 10)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("op", range(len(pil_preprocess.RANDAUGMENT_OPS)))
def test_randaugment_ops(op):
    name = pil_preprocess.RANDAUGMENT_OPS[op]
    pixels = np.random.default_rng(op).integers(0, 255, (RES, RES, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    for sign in (-1.0, 1.0):
        out = np.asarray(pil_preprocess.randaugment_op(image, op, 0.9, sign))
        assert out.shape == (RES, RES, 3) and out.dtype == np.uint8, name
        if name in ("rotate", "shear_x", "translate_y", "solarize", "posterize", "color", "contrast"):
            assert not np.array_equal(out, pixels), name
    assert np.array_equal(np.asarray(pil_preprocess.randaugment_op(image, op, 0.0)), pixels) or \
        name in ("autocontrast", "equalize"), f"{name} at level 0 is the identity"


# --------------------------------------------------------------------------- fingerprints


def test_the_fingerprint_sees_added_removed_and_resized_files(tmp_path):
    write_folder(tmp_path)
    before = make(tmp_path).fingerprint
    assert set(before) == {"train", "val"} and before["train"]["files"] == 12
    assert before == make(tmp_path, seed=3).fingerprint
    Image.new("RGB", (30, 30)).save(tmp_path / "train" / "dog" / "new.png")
    after = make(tmp_path).fingerprint
    line = fingerprint.describe_change(before, after)
    assert line.startswith("train: 12 -> 13 images, ") and "class 'dog' 6 -> 7" in line and "val" not in line
    os.remove(tmp_path / "train" / "dog" / "new.png")
    assert fingerprint.describe_change(before, make(tmp_path).fingerprint) is None
    path = tmp_path / "val" / "cat" / "0.png"
    path.write_bytes(path.read_bytes() + b"\0")  # one byte longer (still a readable PNG)
    line = fingerprint.describe_change(before, make(tmp_path).fingerprint)
    assert line.startswith("val: ") and "B ->" in line and "train" not in line
    os.rename(tmp_path / "train" / "cat" / "0.png", tmp_path / "train" / "cat" / "zz.png")
    line = fingerprint.describe_change(before, make(tmp_path).fingerprint)
    assert "train: other file names, sizes or contents (same totals)" in line
    assert fingerprint.digest(before) != fingerprint.digest(make(tmp_path).fingerprint)


def test_idx_and_digits_fingerprints(tmp_path):
    from test_idx_source import data_config as idx_config
    from test_idx_source import make_dir

    root = make_dir(tmp_path / "idx")
    a = sources.create_source(idx_config(f"idx:{root}"), RES, 8, 0).fingerprint
    assert set(a) == {"train", "test"} and set(a["train"]["files"]) == {"train-images-idx3-ubyte",
                                                                       "train-labels-idx1-ubyte"}
    make_dir(tmp_path / "idx", seed=1)  # other pixels and labels, same sizes
    b = sources.create_source(idx_config(f"idx:{root}"), RES, 8, 0).fingerprint
    line = fingerprint.describe_change(a, b)
    assert "train: train-images-idx3-ubyte, train-labels-idx1-ubyte changed" in line
    held = sources.create_source(idx_config(f"idx:{root}", eval_split="validation", holdout_fraction=0.2),
                                 RES, 8, 0).fingerprint
    assert set(held) == {"train"}
    d = get_config().data
    d.name, d.train_split, d.eval_split = "digits", "train", "validation"
    digits = sources.create_source(d, 8, 8, 0).fingerprint
    assert set(digits) == {"train", "validation"} and digits["train"]["examples"] == 1078


def test_folder_helpers_keep_their_messages(tmp_path):
    write_folder(tmp_path, {"train": {"cat": 6, "dog": 2, "emu": 0}, "val": {"cat": 2, "dog": 2, "emu": 2}})
    files = folder.list_folder(str(tmp_path))
    assert folder.class_names(str(tmp_path), files) == ["cat", "dog", "emu"]
    with pytest.raises(UserError, match="has no images"):
        folder.class_names(str(tmp_path), {"train": {"a": [], "b": []}})
