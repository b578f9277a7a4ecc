"""--augment_impl=keras_cv: the augmentation sets from keras-cv layers (clae_tf/augment_kerascv.py).

keras-cv's views are stateful and not torchvision's, so these tests check what the module does
promise: shape, dtype and range, in eager and inside tf.data; views that differ; the flip, crop
and grayscale rates of each set (against the set's numbers, with binomial margins); the error
when keras-cv is missing.
"""

import sys

import numpy as np
import pytest
import tensorflow as tf

from clae_tf import ClaeError
from clae_tf.data import augment, augment_kerascv, sources, streams

from conftest import tiny_config

pytest.importorskip("keras_cv")

SETS = sorted(augment.AUGMENTATIONS)


def _images(n, size=16, seed=0):
    """Random colour images (no pixel is gray), float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    return tf.constant(rng.uniform(0.1, 0.9, (n, size, size, 3)).astype(np.float32))


def _check_view(v, n, size):
    assert v.shape == (n, size, size, 3)
    assert v.dtype == tf.float32
    v = v.numpy()
    assert np.isfinite(v).all() and v.min() >= 0.0 and v.max() <= 1.0


@pytest.mark.parametrize("name", SETS)
def test_views_eager_and_in_tf_data(name):
    views = augment.AUGMENTATIONS[name]
    view = augment_kerascv.view_fn(0, 12, views)
    x = _images(8)  # 16 px images, cropped and resized to 12
    v1, v2 = view(x), view(x)
    _check_view(v1, 8, 12)
    _check_view(v2, 8, 12)
    # The two views of one image differ (independent draws from the layers' state).
    assert np.abs(v1.numpy() - v2.numpy()).mean() > 0.01
    ds = tf.data.Dataset.from_tensors(x).repeat(2).map(
        lambda b: (view(b, None, 12, **views), view(b, None, 12, **views)),
        num_parallel_calls=tf.data.AUTOTUNE)
    batches = [(a.numpy(), b.numpy()) for a, b in ds]
    assert len(batches) == 2
    for a, b in batches:
        _check_view(tf.constant(a), 8, 12)
        assert np.abs(a - b).mean() > 0.01
    # The state moves on: the same batch gives other views the second time.
    assert np.abs(batches[0][0] - batches[1][0]).mean() > 0.01


def test_views_differ_from_input():
    x = _images(8)
    v = augment_kerascv.view_fn(1, 16, augment.AUGMENTATIONS["simclr"])(x).numpy()
    per_image = np.abs(v - x.numpy()).mean(axis=(1, 2, 3))
    assert (per_image > 0.01).all()


def _ramp(n, size=32):
    """Channel 0 = column / (size - 1), channel 1 = row / (size - 1), channel 2 = 0.5."""
    col = np.tile(np.linspace(0, 1, size, dtype=np.float32)[None, :], (size, 1))
    img = np.stack([col, col.T, np.full_like(col, 0.5)], axis=-1)
    return tf.constant(np.repeat(img[None], n, axis=0))


@pytest.mark.parametrize("name", ["simclr", "uel"])
def test_crop_area_matches_the_set_scale(name):
    """The crop's area (read off the coordinate ramps) against keras-cv's documented sampling:
    area a ~ U(scale), ratio r ~ U(3/4, 4/3), sides sqrt(a r) and sqrt(a / r) clipped to 1."""
    scale = augment.AUGMENTATIONS[name]["crop_scale"]
    crop = augment_kerascv.layers(32, 0, **augment.AUGMENTATIONS[name])[0]
    out = crop(_ramp(400)).numpy()
    width = out[..., 0].max(axis=(1, 2)) - out[..., 0].min(axis=(1, 2))
    height = out[..., 1].max(axis=(1, 2)) - out[..., 1].min(axis=(1, 2))
    area = width * height
    rng = np.random.default_rng(0)
    a = rng.uniform(*scale, 200_000)
    r = rng.uniform(3 / 4, 4 / 3, 200_000)
    expected = np.minimum(1, np.sqrt(a * r)) * np.minimum(1, np.sqrt(a / r))
    # Mean of 400 draws: standard error ~ 0.27 / 20 = 0.014 (simclr); margin 0.05.
    assert abs(area.mean() - expected.mean()) < 0.05
    assert area.min() > scale[0] - 0.02 and area.max() <= 1.0 + 1e-5
    assert (area < 0.99).mean() > 0.8  # visibly cropped, nearly always


def test_flip_rate_is_half():
    flip = augment_kerascv.layers(32, 0)[1]
    out = flip(_ramp(400)).numpy()
    flipped = out[:, 0, 0, 0] > out[:, 0, -1, 0]  # column ramp now decreasing
    unchanged = np.isclose(out, _ramp(400).numpy()).all(axis=(1, 2, 3))
    assert (flipped | unchanged).all()
    assert abs(flipped.mean() - 0.5) < 0.1  # binomial sd 0.025


@pytest.mark.parametrize("name", SETS)
def test_grayscale_rate(name):
    views = augment.AUGMENTATIONS[name]
    x = _images(300, size=8)
    v = augment_kerascv.view_fn(2, 8, views)(x).numpy()
    gray = (np.abs(v - v[..., :1]).max(axis=(1, 2, 3)) < 1e-4)
    # p 0.2 over 300 images: sd 0.023, margin 0.08. Colour jitter alone never makes these
    # colour-noise images gray (its smallest saturation factor is 0.2).
    assert abs(gray.mean() - views["gray_prob"]) < 0.08


def _assert_two_views(x1, x2, shape):
    """Both views float32 of `shape`, in [0, 1] once the "half" normalisation is undone, and
    different from each other."""
    for v in (x1, x2):
        assert v.shape == shape and v.dtype == tf.float32
        v = augment.denormalize(v.numpy(), "half")
        assert v.min() >= -1e-6 and v.max() <= 1 + 1e-6
    assert np.abs(x1.numpy() - x2.numpy()).mean() > 0.01


def test_pretrain_dataset_keras_cv_views():
    cfg = tiny_config(augment_impl="keras_cv", batch_size=8, image_size=12, augment="uel",
                      normalize="half")
    source = sources.load(cfg)
    ds = streams.pretrain_dataset(source.train, cfg, epoch=0).take(2)
    for x1, x2 in ds:
        _assert_two_views(x1, x2, (8, 12, 12, 3))


def test_missing_keras_cv_is_a_flag_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_cv", None)  # import keras_cv -> ImportError
    with pytest.raises(ClaeError, match=r'--augment_impl: keras_cv needs keras-cv \(pip install'):
        augment_kerascv.view_fn(0, 32, augment.AUGMENTATIONS["simclr"])
    cfg = tiny_config(augment_impl="keras_cv", batch_size=8)
    with pytest.raises(ClaeError, match="--augment_impl"):
        streams.pretrain_dataset(sources.load(cfg).train, cfg, epoch=0)


def test_keras_cv_square_images_use_the_one_stream():
    """Images already --image_size square (digits at 8 px, CIFAR at 32) take the one pipeline of
    the run (streams.pretrain_stream), as the default does, instead of one pipeline per epoch
    (which cost ~11 s per epoch to build on CIFAR); its batches cross epoch boundaries."""
    cfg = tiny_config(augment_impl="keras_cv", batch_size=8, image_size=8, augment="simclr",
                      normalize="half")
    source = sources.load(cfg)
    spe = source.train.num_examples // cfg.batch_size
    stream = streams.pretrain_stream(source.train, cfg, spe - 1, spe + 1)
    assert stream is not None
    batches = list(stream)
    assert len(batches) == 2  # the last batch of epoch 0 and the first of epoch 1
    for x1, x2 in batches:
        _assert_two_views(x1, x2, (8, 8, 8, 3))
    # Images that need resizing (digits at 12 px) keep the per-epoch pipeline.
    cfg12 = tiny_config(augment_impl="keras_cv", batch_size=8, image_size=12)
    assert streams.pretrain_stream(sources.load(cfg12).train, cfg12, 0, 2) is None
