"""Image folders (``root/SPLIT/LABEL/IMAGE.png``): listing, the checks before training, holdout splits.

No TensorFlow: the Grain path (``grain_source``) reads local folders with these, and ``tfds_source``
(remote folders, ``gs://``) passes TensorFlow's file functions as its ``FileSystem``.

Folders are checked before training, so that a mistake fails in seconds with the file's name instead
of as an error deep into a run: fewer than two classes is refused; every image of the splits in use is
opened with PIL (PNG: chunk structure and checksums; JPEG: a 1/8-scale decode, which reads the whole
stream). An unreadable image is *refused*, naming it, rather than skipped: a silently smaller dataset
would make runs incomparable. A training class with fewer than ``MIN_CLASS_IMAGES`` images gets a
one-line ``warning:``. Files of other extensions (``.txt``, ``.DS_Store``) are not images and ignored.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable
from typing import IO, Any

from PIL import Image

from effnet_jax.errors import UserError

FOLDER_PREFIX = "folder:"
FOLDER_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # what tfds.folder_dataset.ImageFolder reads too
MIN_CLASS_IMAGES = 5  # fewer training images in a class: warn


def _open_binary(path: str) -> IO[bytes]:
    return open(path, "rb")


@dataclasses.dataclass(frozen=True)
class FileSystem:
    """The file functions a folder is read with: local by default (``tfds_source`` passes tf.io.gfile's)."""

    listdir: Callable[[str], list[str]] = os.listdir
    isdir: Callable[[str], bool] = os.path.isdir
    open: Callable[[str], IO[bytes]] = _open_binary
    size: Callable[[str], int] = os.path.getsize
    errors: tuple[type[BaseException], ...] = ()  # what these raise besides OSError
    local: bool = True  # PIL may open paths itself


LOCAL = FileSystem()
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def folder_root(name: str, fs: FileSystem = LOCAL) -> str:
    """The root directory of a ``folder:ROOT`` name; a one-line UserError if it is not a directory."""
    root = os.path.expanduser(name[len(FOLDER_PREFIX):])
    if not root or not fs.isdir(root):
        raise UserError(f"image folder {root!r} does not exist (expected {root}/SPLIT/LABEL/IMAGE.png)")
    return root


def list_folder(root: str, fs: FileSystem = LOCAL) -> dict[str, dict[str, list[str]]]:
    """{split: {label: [image paths]}} by ImageFolder's rules: root/SPLIT/LABEL/*.(jpg|jpeg|png), sorted.

    A directory that cannot be listed (a symlink loop, no permission) is a one-line UserError naming it."""

    def listdir(path: str) -> list[str]:
        try:
            return sorted(d.rstrip("/") for d in fs.listdir(path))
        except (OSError, *fs.errors) as e:
            why = getattr(e, "strerror", None) or " ".join(str(e).split())[:100]
            raise UserError(f"image folder {root!r}: cannot list {os.path.relpath(path, root)} ({why})") from None

    def dirs(path: str) -> list[str]:
        return [d for d in listdir(path) if fs.isdir(os.path.join(path, d))]

    out: dict[str, dict[str, list[str]]] = {}
    for split in dirs(root):
        out[split] = {}
        for label in dirs(os.path.join(root, split)):
            folder = os.path.join(root, split, label)
            out[split][label] = [os.path.join(folder, f) for f in listdir(folder)
                                 if f.lower().endswith(FOLDER_IMAGE_EXTENSIONS)]
    return out


def class_names(root: str, files: dict[str, dict[str, list[str]]]) -> list[str]:
    """The labels of all splits, sorted (label i is the i-th); UserError with none or a single one."""
    names = sorted({label for labels in files.values() for label in labels})
    if not any(paths for labels in files.values() for paths in labels.values()):
        raise UserError(f"image folder {root!r} has no images: expected {root}/SPLIT/LABEL/IMAGE.(png|jpg)")
    if len(names) < 2:
        raise UserError(f"image folder {root!r} has a single class ({names[0]!r}): a classifier needs at least two, "
                        f"as {root}/SPLIT/LABEL/IMAGE.png with two or more LABEL folders")
    return names


def warn_small_classes(root: str, split: str, files: dict[str, list[str]], names: list[str]) -> None:
    """One ``warning:`` line naming the training classes with fewer than MIN_CLASS_IMAGES images."""
    small = {label: len(files.get(label, [])) for label in names}
    small = {label: n for label, n in small.items() if n < MIN_CLASS_IMAGES}
    if not small:
        return
    named = ", ".join(f"{label!r} ({n})" for label, n in sorted(small.items(), key=lambda kv: kv[1])[:5])
    named += f" and {len(small) - 5} more" if len(small) > 5 else ""
    print(f"warning: image folder {root!r}: {'class' if len(small) == 1 else 'classes'} {named} "
          f"{'has' if len(small) == 1 else 'have'} fewer than {MIN_CLASS_IMAGES} images in {split!r}; "
          "accuracy on them is noise", file=sys.stderr, flush=True)


def image_problem(path: str, fs: FileSystem = LOCAL) -> str | None:
    """Why ``path`` cannot be decoded (None: it can), found without a full decode.

    PNG: chunk structure and checksums (no decompression); JPEG and the rest: a 1/8-scale decode, which
    still reads the whole entropy-coded stream (truncation)."""
    try:
        with contextlib.ExitStack() as stack:
            source = path if fs.local else stack.enter_context(fs.open(path))
            im = stack.enter_context(Image.open(source))
            if im.format == "PNG":
                im.verify()
            else:
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
        return None
    except Image.DecompressionBombError:
        return None  # huge, not broken
    except (*_IMAGE_ERRORS, *fs.errors) as e:
        return " ".join(str(e).replace(f"'{path}'", "").split()).rstrip(" :")[:120] or type(e).__name__


def check_images(root: str, paths: list[str], fs: FileSystem = LOCAL) -> None:
    """Refuse (UserError naming the first) any of ``paths`` that is not a readable image."""
    workers = min(16, 2 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        problems = [(p, why) for p, why in zip(paths, pool.map(lambda p: image_problem(p, fs), paths)) if why]
    if problems:
        path, why = problems[0]
        more = f" ({len(problems)} of {len(paths)} images are unreadable)" if len(problems) > 1 else ""
        raise UserError(f"image folder {root!r}: {os.path.relpath(path, root)} is not a readable image ({why}); "
                        f"remove or replace it{more}")


def holdout(data: Any, count: Callable[[str], int]) -> tuple[str, str]:
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


def parse_range(split: str) -> tuple[str, int, int | None]:
    """'train' -> ('train', 0, None) ; 'train[:k]' / 'train[k:]' (our holdout) -> absolute bounds."""
    if "[" not in split:
        return split, 0, None
    base, rng = split[:-1].split("[")
    lo, hi = rng.split(":")
    return base, int(lo or 0), int(hi) if hi else None


def splits_in_use(root: str, data: Any, counts: dict[str, int]) -> tuple[str, str, list[str]]:
    """The train and eval splits a config asks of a folder whose splits hold ``counts`` images (a holdout
    range of train where asked), and the folder splits they read; a UserError naming the splits there are."""

    def count(split: str) -> int:
        if split not in counts:
            raise UserError(f"image folder {root!r} has splits {', '.join(counts)}; got {split!r} "
                            "(folders take plain split names)")
        return counts[split]

    train_split, eval_split = holdout(data, count)
    train_base, eval_base = parse_range(train_split)[0], parse_range(eval_split)[0]
    return train_split, eval_split, [train_base] + ([eval_base] if eval_base != train_base else [])
