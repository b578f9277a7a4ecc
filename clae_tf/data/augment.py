"""The augmentation sets (SimCLR's, Plain/UEL's, MoCo v2's), vectorised over a batch, with
torchvision's semantics.

Images are float32 in [0, 1] here; `normalize` maps them to the model's input range
((x - 0.5) / 0.5 for SimCLR, the CIFAR mean/std for Plain, UEL and MoCo, the ImageNet mean/std
for Tiny-ImageNet and other ImageNet-size images; eps is in those units).

Why these ops by default rather than the keras-cv (or Keras 3) layers (which
--augment_impl=keras_cv offers, augment_kerascv.py): (1) their colour jitter does not follow
torchvision's ColorJitter (additive brightness, other factor ranges, fixed order), which the
paper uses; (2) their random generators are stateful, so a parallel tf.data map is not
reproducible and a resumed run would not see the same views. Every op here is a stateless
function of a per-batch seed, so a given (seed, epoch, batch) always gives the same views, in
any pipeline and after a resume.
"""

import math

import tensorflow as tf

from clae_tf.runtime import config

# torchvision's rgb_to_grayscale weights. A tuple, not a tf.constant: a tensor made at import
# would initialise TF before run.py can set up --virtual_cpus or MultiWorkerMirroredStrategy.
_GRAY = (0.299, 0.587, 0.114)


def _split(seed, n):
    return tf.unstack(tf.random.experimental.stateless_split(seed, n))


def _grayscale(x):
    return tf.reduce_sum(x * _GRAY, axis=-1, keepdims=True)  # (B, H, W, 1)


def _per_image(v):
    return tf.reshape(v, [-1, 1, 1, 1])


def crop_boxes(h, w, seed, n, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """torchvision RandomResizedCrop.get_params for n images of h x w pixels.

    Up to 10 tries of (area, log-ratio); if none fits, torchvision's fallback: a centre crop of
    the whole image at the nearest allowed aspect ratio (the whole image when it is square).

    Args:
      h, w: image height and width (scalars).
      seed: shape-(2,) int seed.
      n: number of boxes.
    Returns:
      (y0, x0, ch, cw): float32 (n,) top-left corner and size of each integer crop.
    """
    h = tf.cast(h, tf.float32)
    w = tf.cast(w, tf.float32)
    s_area, s_ratio, s_y, s_x = _split(seed, 4)
    area = tf.random.stateless_uniform([n, attempts], s_area, scale[0], scale[1]) * h * w
    log_r = tf.random.stateless_uniform([n, attempts], s_ratio, math.log(ratio[0]),
                                        math.log(ratio[1]))
    r = tf.exp(log_r)
    cw = tf.round(tf.sqrt(area * r))
    ch = tf.round(tf.sqrt(area / r))
    ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first = tf.argmax(tf.cast(ok, tf.int32), axis=1)  # first valid attempt (0 if none)
    any_ok = tf.reduce_any(ok, axis=1)
    in_ratio = w / h
    fallback_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
    fallback_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
    cw = tf.where(any_ok, tf.gather(cw, first, batch_dims=1), fallback_w)
    ch = tf.where(any_ok, tf.gather(ch, first, batch_dims=1), fallback_h)
    y0 = tf.floor(tf.random.stateless_uniform([n], s_y) * (h - ch + 1))
    x0 = tf.floor(tf.random.stateless_uniform([n], s_x) * (w - cw + 1))
    y0 = tf.where(any_ok, y0, tf.floor((h - ch) / 2))
    x0 = tf.where(any_ok, x0, tf.floor((w - cw) / 2))
    return y0, x0, ch, cw


def random_resized_crop(x, seed, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """torchvision RandomResizedCrop on a batch of equal-size images (crop_boxes per image)."""
    b = tf.shape(x)[0]
    h = tf.cast(tf.shape(x)[1], tf.float32)
    w = tf.cast(tf.shape(x)[2], tf.float32)
    y0, x0, ch, cw = crop_boxes(h, w, seed, b, scale, ratio, attempts)
    # crop_and_resize boxes are in [0, 1] image coordinates of pixel corners/centres; this maps
    # the integer crop [y0, y0 + ch) onto the output grid.
    boxes = tf.stack([y0 / (h - 1), x0 / (w - 1), (y0 + ch - 1) / (h - 1),
                      (x0 + cw - 1) / (w - 1)], axis=1)
    return tf.image.crop_and_resize(x, boxes, tf.range(b), [size, size])


def random_resized_crop_image(image, seed, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop of one image of any size, taken from the image as it is.

    As torchvision's resized_crop on a PIL image: the integer box is cut out, then resized to
    size x size bilinearly (antialiased when shrinking, as PIL does).

    Args:
      image: (H, W, C) float32, any H and W.
      seed: shape-(2,) int seed.
    Returns:
      (size, size, C) float32.
    """
    shape = tf.shape(image)
    y0, x0, ch, cw = (tf.cast(v[0], tf.int32) for v in crop_boxes(
        shape[0], shape[1], seed, 1, scale, ratio))
    crop = image[y0:y0 + ch, x0:x0 + cw]
    out = tf.image.resize(crop, [size, size], method="bilinear", antialias=True)
    return tf.reshape(out, [size, size, image.shape[-1] or shape[-1]])


def _blend(a, b, factor):
    return tf.clip_by_value(b + _per_image(factor) * (a - b), 0.0, 1.0)


def _adjust_hue(x, delta):
    hsv = tf.image.rgb_to_hsv(x)
    hue = tf.math.floormod(hsv[..., :1] + _per_image(delta), 1.0)
    return tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], axis=-1))


def color_jitter(x, seed, brightness, contrast, saturation, hue):
    """torchvision ColorJitter: the four adjustments in a random order per image."""
    b = tf.shape(x)[0]
    seeds = _split(seed, 5)

    def factor(s, amount):
        return tf.random.stateless_uniform([b], s, max(0.0, 1 - amount), 1 + amount)

    fb, fc, fs = (factor(seeds[0], brightness), factor(seeds[1], contrast),
                  factor(seeds[2], saturation))
    dh = tf.random.stateless_uniform([b], seeds[3], -hue, hue)
    # Each op takes a sub-batch and the per-image parameters of those images.
    ops = [
        lambda v, i: tf.clip_by_value(v * _per_image(tf.gather(fb, i)), 0.0, 1.0),
        lambda v, i: _blend(v, tf.reduce_mean(_grayscale(v), axis=[1, 2, 3], keepdims=True),
                            tf.gather(fc, i)),
        lambda v, i: _blend(v, _grayscale(v), tf.gather(fs, i)),
        lambda v, i: _adjust_hue(v, tf.gather(dh, i)),
    ]
    # A random permutation of the 4 ops per image: argsort of uniform noise.
    order = tf.argsort(tf.random.stateless_uniform([b, 4], seeds[4]), axis=1)  # (B, 4)
    index = tf.range(b)
    for position in range(4):
        # Split the batch by the op each image applies at this position, apply each op to its
        # images only, and put the batch back together: every op runs once per image (running
        # all 4 on the whole batch and selecting cost 4x, mostly in the hue conversion).
        which = order[:, position]
        parts = tf.dynamic_partition(x, which, 4)
        indices = tf.dynamic_partition(index, which, 4)
        x = tf.dynamic_stitch(indices, [op(v, i) for op, v, i in zip(ops, parts, indices)])
    return x


def _apply_with_prob(x, y, p, seed):
    keep = tf.random.stateless_uniform([tf.shape(x)[0]], seed) < p
    return tf.where(_per_image(keep), y, x)


def simclr_view(x, seed, size, crop_scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2),
                jitter_prob=0.8, gray_prob=0.2, crop=None):
    """One view of a batch with an --augment set (SimCLR's by default): crop-resize, h-flip,
    colour jitter (p), grayscale (p).

    Args:
      x: (B, H, W, 3) float32 in [0, 1].
      seed: shape-(2,) int seed; the view is a pure function of (x, seed).
      crop: optional (B,) bool: crop-resize only these images; the others are already cropped
        (random_resized_crop_image) to size x size.
    Returns:
      (B, size, size, 3) float32 in [0, 1].
    """
    s_crop, s_flip, s_jit, s_jit_p, s_gray = _split(seed, 5)
    if crop is None:
        x = random_resized_crop(x, s_crop, size, scale=crop_scale)
    else:
        x = tf.cond(tf.reduce_any(crop), lambda: tf.where(
            _per_image(crop), random_resized_crop(x, s_crop, size, scale=crop_scale), x),
            lambda: x)
    flip = tf.random.stateless_uniform([tf.shape(x)[0]], s_flip) < 0.5
    x = tf.where(_per_image(flip), tf.reverse(x, axis=[2]), x)
    x = _apply_with_prob(x, color_jitter(x, s_jit, *jitter), jitter_prob, s_jit_p)
    gray = tf.tile(_grayscale(x), [1, 1, 1, 3])
    return _apply_with_prob(x, gray, gray_prob, s_gray)


# The augmentation sets of --augment: keyword arguments of simclr_view.
AUGMENTATIONS = {
    # SimCLR (docs/method.md): crop scale 0.08-1, ColorJitter(0.8, 0.8, 0.8, 0.2) with p = 0.8.
    "simclr": dict(crop_scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), jitter_prob=0.8,
                   gray_prob=0.2),
    # Plain / UEL (docs/method.md): crop scale 0.2-1, ColorJitter(0.4 x 4) always.
    "uel": dict(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), jitter_prob=1.0,
                gray_prob=0.2),
    # MoCo v2: crop scale 0.2-1, ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8; its Gaussian blur
    # is left out, as in MoCo's own CIFAR recipes (it erases 32-pixel images).
    "moco": dict(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.8,
                 gray_prob=0.2),
}

# --normalize's (mean, std) per RGB channel: config.NORMALIZATIONS (validation needs them
# without TensorFlow).
NORMALIZATIONS = config.NORMALIZATIONS


def normalize(x, kind="half"):
    """[0, 1] images -> model inputs, with the --normalize mean/std."""
    mean, std = NORMALIZATIONS[kind]
    return (x - mean) / std


def denormalize(x, kind="half"):
    mean, std = NORMALIZATIONS[kind]
    return x * std + mean
