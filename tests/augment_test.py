"""Tests of clae_tf.data.augment: stateless SimCLR views and their building blocks."""

import numpy as np
import pytest
import tensorflow as tf

from clae_tf.data import augment

SIZE = 16


def _images(n=8, size=SIZE, seed=0):
    return tf.constant(np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)), tf.float32)


def _seed(a, b=0):
    return tf.constant([a, b], tf.int64)


def test_simclr_view_deterministic_for_a_seed_and_seed_dependent():
    x = _images()
    a = augment.simclr_view(x, _seed(1), SIZE).numpy()
    b = augment.simclr_view(x, _seed(1), SIZE).numpy()
    c = augment.simclr_view(x, _seed(2), SIZE).numpy()
    d = augment.simclr_view(x, _seed(1, 1), SIZE).numpy()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.1
    assert np.abs(a - d).max() > 0.1
    # Not just a global change: (nearly) every image of the batch gets its own different view.
    per_image = np.abs(a - c).reshape(len(a), -1).max(axis=1)
    assert (per_image > 1e-3).mean() >= 0.75


@pytest.mark.parametrize("size", [SIZE, 12, 24])
def test_simclr_view_shape_dtype_range(size):
    x = _images(16)
    v = augment.simclr_view(x, _seed(3), size)
    assert v.shape == (16, size, size, 3) and v.dtype == tf.float32
    v = v.numpy()
    assert v.min() >= 0.0 and v.max() <= 1.0
    assert not np.allclose(v[:, :SIZE, :SIZE] if size >= SIZE else v, 0.0)


def test_simclr_view_eager_function_and_dataset_agree():
    x = _images(8)
    seed = _seed(11, 4)
    eager = augment.simclr_view(x, seed, 12).numpy()
    graph = tf.function(lambda im, s: augment.simclr_view(im, s, 12))(x, seed).numpy()
    ds = tf.data.Dataset.from_tensors((x, seed)).repeat(2).map(
        lambda im, s: augment.simclr_view(im, s, 12), num_parallel_calls=2)
    from_data = [b.numpy() for b in ds]
    assert len(from_data) == 2
    # The tf.data map (what training uses) is bit-identical to eager execution, every time.
    for b in from_data:
        np.testing.assert_array_equal(b, eager)
    # Under tf.function, grappler's arithmetic rewrites change the crop boxes by an ulp, so pixels
    # may differ by ~1e-6 (bit-identical with the meta-optimizer disabled). Every random decision
    # (crop, flip, jitter factors and order, grayscale) is the same: any of those would differ by
    # far more than 1e-5.
    np.testing.assert_allclose(graph, eager, rtol=0, atol=1e-5)


def test_random_resized_crop_full_scale_square_ratio_is_identity():
    x = _images(6)
    out = augment.random_resized_crop(x, _seed(5), SIZE, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(out.numpy(), x.numpy(), atol=1e-6)


def test_random_resized_crop_crops():
    """The default scale range actually zooms in: a small crop is smoother than the original."""
    x = _images(32)
    out = augment.random_resized_crop(x, _seed(6), SIZE).numpy()
    assert out.shape == (32, SIZE, SIZE, 3)
    assert out.min() >= 0 and out.max() <= 1
    # Upsampled crops of iid noise have smaller neighbour differences than the noise itself.
    def roughness(a):
        return np.abs(np.diff(a, axis=2)).mean(axis=(1, 2, 3))
    assert (roughness(out) < 0.9 * roughness(x.numpy())).mean() > 0.5


def test_color_jitter_zero_is_identity():
    x = _images(8)
    out = augment.color_jitter(x, _seed(7), 0.0, 0.0, 0.0, 0.0)
    np.testing.assert_allclose(out.numpy(), x.numpy(), atol=1e-5)


def test_color_jitter_changes_images_and_stays_in_range():
    x = _images(8)
    out = augment.color_jitter(x, _seed(7), 0.8, 0.8, 0.8, 0.2).numpy()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert (np.abs(out - x.numpy()).reshape(8, -1).max(axis=1) > 1e-2).all()


def test_color_jitter_brightness_only_scales():
    """torchvision brightness: multiply by a factor in [1 - b, 1 + b], then clip (not additive)."""
    x = (_images(16) * 0.5 + 0.1).numpy()  # in [0.1, 0.6]: no clipping for factors <= 1.5
    out = augment.color_jitter(tf.constant(x), _seed(8), 0.5, 0.0, 0.0, 0.0).numpy()
    # One factor per image, estimated by least squares, explains every pixel.
    factor = (out * x).sum(axis=(1, 2, 3)) / (x * x).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(out, factor[:, None, None, None] * x, atol=1e-5)
    assert (factor >= 0.5 - 1e-6).all() and (factor <= 1.5 + 1e-6).all()
    assert factor.std() > 0.05


def test_grayscale_probability_one_gives_equal_channels():
    x = _images(8)
    out = augment.simclr_view(x, _seed(9), SIZE, crop_scale=(1.0, 1.0), jitter_prob=0.0,
                              gray_prob=1.0).numpy()
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    # torchvision's luma weights, up to the horizontal flip.
    gray = (x.numpy() * np.array([0.299, 0.587, 0.114])).sum(-1)
    for o, g in zip(out[..., 0], gray):
        assert np.allclose(o, g, atol=1e-5) or np.allclose(o, g[:, ::-1], atol=1e-5)


def test_grayscale_probability_zero_keeps_colour():
    x = _images(8)
    out = augment.simclr_view(x, _seed(9), SIZE, jitter_prob=0.0, gray_prob=0.0).numpy()
    assert (np.abs(out[..., 0] - out[..., 1]).reshape(8, -1).max(axis=1) > 1e-2).all()


def test_flip_is_about_half():
    n = 2000
    x = _images(n, size=8, seed=1)
    # With scale (1, 1) the crop is the whole image; no jitter, no grayscale: only the flip acts.
    out = augment.simclr_view(x, _seed(10), 8, crop_scale=(1.0, 1.0), jitter_prob=0.0,
                              gray_prob=0.0).numpy()
    xn = x.numpy()
    same = np.all(np.abs(out - xn) < 1e-5, axis=(1, 2, 3))
    flipped = np.all(np.abs(out - xn[:, :, ::-1]) < 1e-5, axis=(1, 2, 3))
    assert np.all(same ^ flipped)  # each image is exactly one of the two
    assert 0.45 < flipped.mean() < 0.55  # 50% +- 4.5 standard deviations


def test_apply_probabilities_roughly_as_asked():
    n = 2000
    x = _images(n, size=8, seed=2)
    out = augment.simclr_view(x, _seed(12), 8, crop_scale=(1.0, 1.0), jitter_prob=0.0,
                              gray_prob=0.2).numpy()
    gray = np.all(out[..., 0] == out[..., 1], axis=(1, 2)) & np.all(out[..., 1] == out[..., 2],
                                                                    axis=(1, 2))
    assert 0.16 < gray.mean() < 0.24


@pytest.mark.parametrize("kind", ["half", "cifar", "imagenet"])
def test_normalize_round_trip(kind):
    x = _images(4)
    mean, std = (np.array(v, np.float32) for v in augment.NORMALIZATIONS[kind])
    y = augment.normalize(x, kind)
    np.testing.assert_allclose(augment.denormalize(y, kind).numpy(), x.numpy(), atol=1e-6)
    np.testing.assert_allclose(y.numpy(), (x.numpy() - mean) / std, atol=1e-5)


def test_cifar_normalisation_is_per_channel():
    gray = tf.fill([1, 1, 1, 3], 0.5)  # the same value in every channel
    y = augment.normalize(gray, "cifar").numpy().ravel()
    np.testing.assert_allclose(y, [(0.5 - 0.4914) / 0.2023, (0.5 - 0.4822) / 0.1994,
                                   (0.5 - 0.4465) / 0.2010], rtol=1e-5)


def test_normalize_default_maps_to_minus_one_one():
    ends = tf.constant([[0.0] * 3, [0.5] * 3, [1.0] * 3])  # (3 pixels, RGB)
    np.testing.assert_allclose(augment.normalize(ends).numpy()[:, 0], [-1.0, 0.0, 1.0])
    np.testing.assert_allclose(augment.denormalize(tf.constant([[-1.0] * 3, [1.0] * 3])).numpy(),
                               [[0.0] * 3, [1.0] * 3])


def test_imagenet_normalisation_is_the_reference_mean_and_std():
    # torchvision Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]).
    x = np.random.default_rng(0).uniform(0, 1, (2, 3, 3, 3)).astype(np.float32)
    y = augment.normalize(tf.constant(x), "imagenet").numpy()
    want = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(y, want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The crop from an image of any size (ImageNet-size data): torchvision's get_params and
# resized_crop, checked against its fallback rule and PIL's resize.


def test_crop_boxes_stay_inside_and_keep_the_allowed_aspect_ratio():
    h, w, n = 60, 120, 500
    y0, x0, ch, cw = (v.numpy() for v in augment.crop_boxes(h, w, _seed(3), n, (0.2, 1.0)))
    assert np.all((y0 >= 0) & (x0 >= 0) & (y0 + ch <= h) & (x0 + cw <= w) & (ch > 0) & (cw > 0))
    assert np.all(y0 == np.floor(y0)) and np.all(cw == np.round(cw))  # integer boxes
    # Aspect ratio and area in the original pixels (up to rounding to whole pixels).
    assert np.all((cw / ch > 3 / 4 * 0.95) & (cw / ch < 4 / 3 * 1.05))
    area = cw * ch / (h * w)
    assert np.all((area > 0.2 * 0.9) & (area < 1.0 + 1e-6))
    # Not always the centre or the whole image.
    assert np.std(x0) > 5 and np.std(cw) > 5


@pytest.mark.parametrize("h, w", [(10, 100), (100, 10)])
def test_crop_boxes_fallback_is_torchvisions_centre_crop(h, w):
    # scale >= 0.5 of a 10 x 100 image cannot fit at ratio 3/4..4/3: every try fails and
    # torchvision takes the centre crop at the nearest allowed ratio.
    y0, x0, ch, cw = (v.numpy() for v in augment.crop_boxes(h, w, _seed(4), 3, (0.5, 1.0)))
    if w > h:
        want_h, want_w = h, round(h * 4 / 3)
    else:
        want_w, want_h = w, round(w / (3 / 4))
    np.testing.assert_array_equal(ch, want_h)
    np.testing.assert_array_equal(cw, want_w)
    np.testing.assert_array_equal(y0, (h - want_h) // 2)
    np.testing.assert_array_equal(x0, (w - want_w) // 2)


@pytest.mark.parametrize("h, w, size", [(20, 30, 40), (64, 64, 224), (90, 120, 16), (50, 37, 24)])
def test_random_resized_crop_image_is_pil_crop_and_bilinear_resize(h, w, size):
    """Crop of the image as it is, resized as torchvision's resized_crop does on a PIL image
    (up- and downsampling; PIL rounds to uint8, hence the 1/255 tolerance)."""
    from PIL import Image
    image = np.random.default_rng(h).integers(0, 256, (h, w, 3)).astype(np.uint8)
    for k in range(3):
        y0, x0, ch, cw = (int(v[0]) for v in augment.crop_boxes(h, w, _seed(k, 7), 1, (0.08, 1.0)))
        out = augment.random_resized_crop_image(tf.constant(image, tf.float32) / 255.0,
                                                _seed(k, 7), size, (0.08, 1.0)).numpy()
        pil = Image.fromarray(image).crop((x0, y0, x0 + cw, y0 + ch)).resize(
            (size, size), Image.BILINEAR)
        assert out.shape == (size, size, 3)
        np.testing.assert_allclose(out, np.asarray(pil, np.float64) / 255.0, atol=1.01 / 255)
