"""The official EfficientNet preprocessing and RandAugment on PIL images: what the loader workers run.

The same recipe as ``tf_preprocess`` (the TensorFlow path, kept for TFDS), without TensorFlow:

* train: ``inception_box`` (area 8-100 %, aspect 3/4-4/3, at least 10 % of the image covered, 10 tries,
  else the centre crop; a draw that is the whole image also gives the centre crop, as the official
  code), a bicubic resize to resolution x resolution, a horizontal flip with probability 1/2 and,
  optionally, ``randaugment``;
* eval: ``center_box`` (resolution / (resolution + 32) of the shorter side, centred), then the resize.

Every random choice comes from the ``np.random.Generator`` the caller passes (the loader seeds it
from the seed and the example's position in the stream), so a stream is a pure function of its seed.

Differences from the TensorFlow path, all deliberate: the crop and the resize are one PIL call
(``Image.resize(box=...)``, antialiased when it shrinks, where ``tf.image.resize`` aliases); a JPEG is
decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still leaves the crop at least ``resolution``
pixels on each side (``draft``: what ``decode_and_crop_jpeg`` saves, and more); RandAugment works on
uint8 pixels (PIL's ops, as the original RandAugment code) rather than on floats.
"""

from __future__ import annotations

import math
import warnings
from typing import IO

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # big is not broken

CROP_PADDING = 32
FILL = (128, 128, 128)  # what geometric RandAugment ops leave in the pixels they uncover (official code)
Box = tuple[float, float, float, float]  # (left, top, right, bottom) in pixels


def center_box(width: int, height: int, resolution: int) -> Box:
    """The official eval crop: resolution / (resolution + 32) of the shorter side, centred."""
    size = max(1, int(resolution / (resolution + CROP_PADDING) * min(width, height)))
    top, left = (height - size + 1) // 2, (width - size + 1) // 2
    return (left, top, left + size, top + size)


def inception_box(width: int, height: int, resolution: int, rng: np.random.Generator,
                  area_range: tuple[float, float] = (0.08, 1.0), aspect_range: tuple[float, float] = (3 / 4, 4 / 3),
                  min_covered: float = 0.1, attempts: int = 10) -> Box:
    """A random crop as the official ``distorted_bounding_box_crop``; the centre crop when none fits."""
    area = width * height
    for _ in range(attempts):
        target = area * rng.uniform(*area_range)
        aspect = rng.uniform(*aspect_range)
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height and w * h >= min_covered * area:
            if (w, h) == (width, height):
                break  # the official code takes the whole image as "no crop found"
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return (left, top, left + w, top + h)
    return center_box(width, height, resolution)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: grey repeated, alpha dropped (not composited), 16-bit scaled to 8, CMYK converted."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":  # 16-bit (I;16*) or 32-bit integer grey
        grey = np.clip(np.asarray(image, np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), "RGB")
    if image.mode in ("P", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def crop_resize(source: str | IO[bytes], resolution: int, rng: np.random.Generator | None) -> Image.Image:
    """Decode, crop (random with ``rng``, centred without) and resize to a resolution x resolution RGB image."""
    with Image.open(source) as image:
        width, height = image.size
        box = center_box(width, height, resolution) if rng is None else inception_box(width, height, resolution, rng)
        crop_w, crop_h = box[2] - box[0], box[3] - box[1]
        drafted = image.draft(None, (max(1, math.ceil(width * resolution / crop_w)),
                                     max(1, math.ceil(height * resolution / crop_h))))
        if drafted is not None:  # a JPEG decoded at 1/s scale: the box in its pixels
            s = width / drafted[1][2]
            box = (box[0] / s, box[1] / s, box[2] / s, box[3] / s)
        rgb = to_rgb(image)
        return rgb.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)


def train_image(source: str | IO[bytes], resolution: int, rng: np.random.Generator, randaugment_layers: int = 0,
                randaugment_magnitude: float = 10.0) -> np.ndarray:
    """The training recipe: inception crop, resize, flip, RandAugment; uint8 (resolution, resolution, 3)."""
    image = crop_resize(source, resolution, rng)
    if rng.random() < 0.5:  # in PIL: a reversed numpy view would make the batch's copy several times slower
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if randaugment_layers > 0:
        image = randaugment(image, rng, randaugment_layers, randaugment_magnitude)
    return np.asarray(image)


def eval_image(source: str | IO[bytes], resolution: int) -> np.ndarray:
    """The eval recipe: centre crop and resize; uint8 (resolution, resolution, 3)."""
    return np.asarray(crop_resize(source, resolution, None))


# --------------------------------------------------------------------------- RandAugment
# RandAugment (Cubuk et al. 2019) as tf_preprocess parameterises it: each of ``layers`` rounds applies
# one op drawn uniformly from the 14, at ``magnitude`` (0..10, 10 = strongest), with a random sign
# for the geometric ops and the enhancements (factor 1 -+ 0.9 * level).

RANDAUGMENT_OPS = ("identity", "autocontrast", "equalize", "rotate", "solarize", "color", "posterize",
                   "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")


def randaugment(image: Image.Image, rng: np.random.Generator, layers: int, magnitude: float) -> Image.Image:
    """Apply ``layers`` ops drawn from RANDAUGMENT_OPS, each with a random sign, all from ``rng``."""
    level = min(max(float(magnitude), 0.0), 10.0) / 10.0
    for _ in range(layers):
        op = int(rng.integers(len(RANDAUGMENT_OPS)))
        sign = -1.0 if rng.random() < 0.5 else 1.0
        image = randaugment_op(image, op, level, sign)
    return image


def randaugment_op(image: Image.Image, op: int, level: float, sign: float = 1.0) -> Image.Image:
    """RANDAUGMENT_OPS[op] at ``level`` in [0, 1] on an RGB image; ``sign`` (+-1) flips the direction."""
    name = RANDAUGMENT_OPS[op]
    factor = 1.0 + sign * 0.9 * level  # enhancements: 0.1 .. 1.9
    shear, shift = sign * 0.3 * level, sign * 0.45 * level * image.height

    def affine(matrix: tuple[float, ...]) -> Image.Image:  # output -> input pixel map, as tf_preprocess._affine
        return image.transform(image.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR, fillcolor=FILL)

    if name == "identity":
        return image
    if name == "autocontrast":
        return ImageOps.autocontrast(image)
    if name == "equalize":
        return ImageOps.equalize(image)
    if name == "rotate":
        return image.rotate(sign * level * 30.0, Image.Resampling.BILINEAR, fillcolor=FILL)
    if name == "solarize":
        return ImageOps.solarize(image, math.ceil(256 * (1.0 - level)))  # inverts p >= threshold
    if name == "color":
        return ImageEnhance.Color(image).enhance(factor)
    if name == "posterize":
        return ImageOps.posterize(image, 8 - round(4 * level))
    if name == "contrast":
        return ImageEnhance.Contrast(image).enhance(factor)
    if name == "brightness":
        return ImageEnhance.Brightness(image).enhance(factor)
    if name == "sharpness":
        return ImageEnhance.Sharpness(image).enhance(factor)
    if name == "shear_x":
        return affine((1.0, shear, 0.0, 0.0, 1.0, 0.0))
    if name == "shear_y":
        return affine((1.0, 0.0, 0.0, shear, 1.0, 0.0))
    if name == "translate_x":
        return affine((1.0, 0.0, shift, 0.0, 1.0, 0.0))
    return affine((1.0, 0.0, 0.0, 0.0, 1.0, shift))  # translate_y
