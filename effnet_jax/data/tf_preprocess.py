"""The official EfficientNet preprocessing and RandAugment as TensorFlow image ops.

Train: ``inception_crop`` (area 0.08-1, aspect 3/4-4/3, the centre crop when no box is found),
then a bicubic ``resize`` (the source adds a horizontal flip and, optionally, ``randaugment``);
eval: ``center_crop`` of resolution / (resolution + 32) of the shorter side, then ``resize``.
Every random op is stateless, seeded by a key, so a stream is a pure function of its seed.
Imported by ``tfds_source`` (which quiets TensorFlow's logging before it loads).
"""

from __future__ import annotations

import math

import tensorflow as tf

CROP_PADDING = 32


def to_rgb(image: tf.Tensor) -> tf.Tensor:
    """uint8 (H, W, C) with C in 1..4 -> (H, W, 3): grey repeated, alpha dropped."""
    image = tf.cond(tf.shape(image)[-1] < 3, lambda: tf.tile(image[..., :1], [1, 1, 3]), lambda: image[..., :3])
    image.set_shape([None, None, 3])
    return image


def resize(image: tf.Tensor, resolution: int) -> tf.Tensor:
    """Bicubic resize to a float32 (resolution, resolution, 3) image in [0, 255]."""
    out = tf.image.resize(tf.cast(image, tf.float32), [resolution, resolution], method="bicubic")
    out = tf.clip_by_value(out, 0.0, 255.0)
    out.set_shape([resolution, resolution, 3])
    return out


def center_crop(image: tf.Tensor, resolution: int) -> tf.Tensor:
    """The official eval crop: resolution / (resolution + 32) of the shorter side, centred."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    size = tf.cast(resolution / (resolution + CROP_PADDING) * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
    size = tf.maximum(size, 1)
    return tf.image.crop_to_bounding_box(image, (h - size + 1) // 2, (w - size + 1) // 2, size, size)


def inception_crop(image: tf.Tensor, key: tf.Tensor, resolution: int) -> tf.Tensor:
    """Random area 8-100 %, aspect 3/4-4/3; the centre crop when no box fits in 10 tries (as the official code)."""
    shape = tf.shape(image)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=key, min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    failed = tf.reduce_all(tf.equal(size[:2], shape[:2]))
    return tf.cond(failed, lambda: center_crop(image, resolution), lambda: tf.slice(image, begin, size))


# --------------------------------------------------------------------------- RandAugment
# A compact RandAugment (Cubuk et al. 2019) on float images in [0, 255]: each of `layers`
# rounds applies one op drawn uniformly from 14, at `magnitude` (0..10, 10 = strongest),
# geometric ops with a random sign, empty pixels filled with grey 128 as the official code.


def _blend(a: tf.Tensor, b: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(a + factor * (b - a), 0.0, 255.0)


def _grey(image: tf.Tensor) -> tf.Tensor:
    return tf.image.rgb_to_grayscale(image) * tf.ones([1, 1, 3])


def _affine(image: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """Warp with a 3x3 output->input matrix in pixel coordinates (bilinear, grey fill)."""
    flat = tf.reshape(matrix, [9])[:8] / matrix[2, 2]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=flat[None], output_shape=tf.shape(image)[:2], fill_value=128.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")
    return out[0]


def _about_center(image: tf.Tensor, m: tf.Tensor) -> tf.Tensor:
    """Conjugate a linear map so it acts about the image centre."""
    shape = tf.cast(tf.shape(image), tf.float32)
    cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    to = tf.convert_to_tensor([[1.0, 0.0, cx], [0.0, 1.0, cy], [0.0, 0.0, 1.0]])
    back = tf.convert_to_tensor([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]])
    return _affine(image, to @ m @ back)


def _equalize(image: tf.Tensor) -> tf.Tensor:
    """PIL's ImageOps.equalize, per channel."""

    def channel(c: tf.Tensor) -> tf.Tensor:
        c = tf.cast(c, tf.int32)
        hist = tf.math.bincount(c, minlength=256, maxlength=256)
        last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
        step = (tf.reduce_sum(hist) - last) // 255
        lut = (tf.cumsum(hist) + step // 2) // tf.maximum(step, 1)
        lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
        return tf.cast(tf.where(step == 0, c, tf.gather(lut, c)), tf.float32)

    return tf.stack([channel(image[..., i]) for i in range(3)], -1)


def _autocontrast(image: tf.Tensor) -> tf.Tensor:
    lo = tf.reduce_min(image, [0, 1], keepdims=True)
    hi = tf.reduce_max(image, [0, 1], keepdims=True)
    scaled = (image - lo) * 255.0 / tf.maximum(hi - lo, 1e-3)
    return tf.where(hi > lo, scaled, image)


def _sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "SAME")[0]
    return _blend(smooth, image, factor)


RANDAUGMENT_OPS = ("identity", "autocontrast", "equalize", "rotate", "solarize", "color", "posterize",
                   "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")


def randaugment(image: tf.Tensor, key: tf.Tensor, layers: int, magnitude: float) -> tf.Tensor:
    """Apply ``layers`` ops drawn from RANDAUGMENT_OPS, deterministic in ``key``."""
    level = tf.constant(min(max(float(magnitude), 0.0), 10.0) / 10.0)
    for k in tf.unstack(tf.random.experimental.stateless_split(key, layers)):
        out = _randaugment_layer(image, tf.cast(k, tf.int64), level)
        out.set_shape(image.shape)
        image = out
    return image


@tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.float32), tf.TensorSpec([2], tf.int64),
                              tf.TensorSpec([], tf.float32)], autograph=False)
def _randaugment_layer(image: tf.Tensor, key: tf.Tensor, level: tf.Tensor) -> tf.Tensor:
    """One layer; a tf.function so its 14 branches are traced once per process, not per pipeline."""
    op_key, sign_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    op = tf.random.stateless_uniform([], op_key, 0, len(RANDAUGMENT_OPS), tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], sign_key) < 0.5, -1.0, 1.0)
    return randaugment_op(image, op, level, sign)


def randaugment_op(image: tf.Tensor, op: tf.Tensor | int, level: tf.Tensor | float,
                   sign: tf.Tensor | float = 1.0) -> tf.Tensor:
    """RANDAUGMENT_OPS[op] at ``level`` in [0, 1]; ``sign`` (+-1) flips the geometric / enhance direction."""
    level = tf.convert_to_tensor(level, tf.float32)
    factor = 1.0 + sign * 0.9 * level  # enhance ops: 0.1 .. 1.9
    angle = sign * level * 30.0 * math.pi / 180.0
    shear, shift = sign * 0.3 * level, sign * 0.45 * level * tf.cast(tf.shape(image)[0], tf.float32)
    cos, sin = tf.cos(angle), tf.sin(angle)
    bits = tf.pow(2.0, tf.round(4.0 * level))  # posterize keeps 8 - round(4 * level) bits

    def matrix(rows: list) -> tf.Tensor:
        return tf.convert_to_tensor(rows[:2] + [[0.0, 0.0, 1.0]])

    branches = [
        lambda: image,
        lambda: _autocontrast(image),
        lambda: _equalize(image),
        lambda: _about_center(image, matrix([[cos, -sin, 0.0], [sin, cos, 0.0]])),
        lambda: tf.where(image < 256.0 * (1.0 - level), image, 255.0 - image),
        lambda: _blend(_grey(image), image, factor),
        lambda: tf.floor(image / bits) * bits,
        lambda: _blend(tf.reduce_mean(_grey(image)) * tf.ones_like(image), image, factor),
        lambda: _blend(tf.zeros_like(image), image, factor),
        lambda: _sharpness(image, factor),
        lambda: _affine(image, matrix([[1.0, shear, 0.0], [0.0, 1.0, 0.0]])),
        lambda: _affine(image, matrix([[1.0, 0.0, 0.0], [shear, 1.0, 0.0]])),
        lambda: _affine(image, matrix([[1.0, 0.0, shift], [0.0, 1.0, 0.0]])),
        lambda: _affine(image, matrix([[1.0, 0.0, 0.0], [0.0, 1.0, shift]])),
    ]
    out = tf.switch_case(tf.convert_to_tensor(op, tf.int32), branches)
    out.set_shape(image.shape)
    return out
