"""streams.py: the two-view pretraining batches as a function of (seed, epoch, batch), the
run-long stream, and the evaluation images."""

import os

import numpy as np
import pytest
import tensorflow as tf

from clae_tf.data import sources, streams

from conftest import pretrain_batches, tiny_config


@pytest.fixture(scope="module")
def digits():
    return sources.load(tiny_config())


def test_pretrain_dataset_views(digits):
    cfg = tiny_config()
    batches = pretrain_batches(digits.train, cfg, epoch=0, n=2)
    assert len(batches) == 2
    for x1, x2 in batches:
        for x in (x1, x2):
            assert x.shape == (16, 16, 16, 3)
            assert x.dtype == np.float32
            assert x.min() >= -1.0 and x.max() <= 1.0
            assert x.max() - x.min() > 0.5  # not a blank image: actually normalised to [-1, 1]
        assert not np.allclose(x1, x2)
        # Each image's two views differ (independent augmentations per view).
        assert all(not np.allclose(x1[i], x2[i]) for i in range(len(x1)))
    assert not np.allclose(batches[0][0], batches[1][0])
    # drop_remainder: steps_per_epoch full batches.
    n = sum(1 for _ in streams.pretrain_dataset(digits.train, cfg, 0).map(lambda a, b: 0))
    assert n == digits.train.num_examples // cfg.batch_size


def test_pretrain_dataset_is_a_function_of_seed_epoch_and_batch(digits):
    cfg = tiny_config()
    full = pretrain_batches(digits.train, cfg, epoch=1, n=4)
    again = pretrain_batches(digits.train, cfg, epoch=1, n=4)
    for (a1, a2), (b1, b2) in zip(full, again):
        np.testing.assert_array_equal(a1, b1)
        np.testing.assert_array_equal(a2, b2)
    # Resuming at batch k gives the k-th batch of a full pass, and the ones after it.
    resumed = pretrain_batches(digits.train, cfg, epoch=1, start_batch=2, n=2)
    for (a1, a2), (b1, b2) in zip(full[2:], resumed):
        np.testing.assert_array_equal(a1, b1)
        np.testing.assert_array_equal(a2, b2)
    # Another epoch or another seed: other batches.
    other_epoch = pretrain_batches(digits.train, cfg, epoch=2, n=1)[0]
    other_seed = pretrain_batches(digits.train, tiny_config(seed=1), epoch=1, n=1)[0]
    assert not np.allclose(other_epoch[0], full[0][0])
    assert not np.allclose(other_seed[0], full[0][0])


def test_the_run_long_stream_is_the_epochs_one_after_another(digits):
    """The train loop reads one stream across epochs; it must be the batches of each epoch's
    pretrain_dataset in turn (what resuming and the tests above rely on)."""
    cfg = tiny_config()
    spe = digits.train.num_examples // cfg.batch_size
    stream = [(a.numpy(), b.numpy()) for a, b in
              streams.pretrain_stream(digits.train, cfg, spe - 1, spe + 1)]
    want = (pretrain_batches(digits.train, cfg, 0, spe - 1, n=1)
            + pretrain_batches(digits.train, cfg, 1, n=1))
    assert len(stream) == 2
    for (a1, a2), (b1, b2) in zip(stream, want):
        np.testing.assert_array_equal(a1, b1)
        np.testing.assert_array_equal(a2, b2)


# ---------------------------------------------------------------------------------------------
# Evaluation images: the reference's test transform.


def test_eval_images_are_the_reference_test_transform(tmp_path):
    """torchvision Resize((S, S)) on the PIL image, ToTensor, Normalize(ImageNet mean/std)."""
    from PIL import Image
    root = tmp_path / "photos"
    rng = np.random.default_rng(1)
    originals = {}
    for c, (h, w) in enumerate([(30, 50), (120, 90)]):  # upsampled and downsampled
        image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        for split in ("train", "test"):
            path = os.path.join(root, split, f"c{c}", "0.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tf.io.write_file(path, tf.io.encode_png(image))
        originals[c] = image
    source = sources.load(tiny_config(dataset=str(root), image_size=40, batch_size=2))
    (x, y), = list(streams.eval_dataset(source.test, 2, "imagenet"))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for image, label in zip(x.numpy(), y.numpy()):
        pil = Image.fromarray(originals[int(label)]).resize((40, 40), Image.BILINEAR)
        want = (np.asarray(pil, np.float64) / 255.0 - mean) / std
        np.testing.assert_allclose(image, want, atol=1.01 / 255 / 0.224)
