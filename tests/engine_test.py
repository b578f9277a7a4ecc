"""The refill engine (clae_tf/method/attacks/engine.py) and the per-image random streams
(common.image_uniform): an image's result does not depend on its batch, every model call works
on a full batch while images wait, and the streams are uniform, normal and independent."""

import numpy as np
import pytest
import tensorflow as tf

from clae_tf.method import attacks
from clae_tf.method.attacks import common
from tests.attacks_test import _in_ball, _predict

SEED = tf.constant([3, 7])


def test_image_uniform_is_uniform_independent_and_keyed_by_the_image():
    u = common.image_uniform(SEED, tf.range(400), [8, 8, 3]).numpy().reshape(400, -1)
    assert u.min() >= 0.0 and u.max() < 1.0
    n = u.size  # moments against U(0, 1)'s, within 5 standard errors
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / n)
    counts = np.histogram(u, bins=64, range=(0, 1))[0]
    chi2 = np.sum((counts - n / 64) ** 2 / (n / 64))
    assert chi2 < 63 + 5 * np.sqrt(2 * 63)  # chi-square, 63 degrees of freedom
    for a, b in ((u[:, :-1], u[:, 1:]), (u[:-1], u[1:])):  # neighbouring entries and images
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 5 / np.sqrt(a.size)
    other = common.image_uniform(SEED, tf.range(400), [8, 8, 3], stream=1).numpy()
    assert abs(np.corrcoef(u.ravel(), other.ravel())[0, 1]) < 5 / np.sqrt(n)
    # Image i's numbers are a function of (seed, id, stream) alone: not of the batch.
    some = common.image_uniform(SEED, tf.constant([17, 3, 250]), [8, 8, 3]).numpy()
    np.testing.assert_array_equal(some.reshape(3, -1), u[[17, 3, 250]])
    assert not np.array_equal(common.image_uniform([3, 8], tf.range(4), [5]).numpy(),
                              common.image_uniform([3, 7], tf.range(4), [5]).numpy())
    per_image = common.image_uniform(SEED, tf.range(3), [4], stream=tf.constant([0, 1, 0]))
    np.testing.assert_array_equal(per_image.numpy()[[0, 2]], u[[0, 2], :4])


def test_image_normal_has_normal_moments():
    g = common.image_normal(SEED, tf.range(200), [500]).numpy().ravel()
    n = g.size
    assert abs(g.mean()) < 5 / np.sqrt(n)
    assert abs(g.var() - 1.0) < 5 * np.sqrt(2 / n)
    assert abs(np.mean(g ** 4) - 3.0) < 5 * np.sqrt(96 / n)
    assert abs(np.mean(g > 1.0) - 0.158655) < 5 * np.sqrt(0.16 * 0.84 / n)


def _rowwise_net(seed=0, size=6, classes=4, hidden=16):
    """_small_net's function with products and sums per row instead of matmuls: its outputs
    and input gradients do not depend on the batch bit for bit (a matmul's blocking does with
    the batch size, and a sign() of the gradient amplifies that round-off), so attacks can be
    compared exactly across batches."""
    rng = np.random.default_rng(seed)
    w1 = tf.constant(rng.normal(size=(size * size * 3, hidden)) / 4, tf.float32)
    w2 = tf.constant(rng.normal(size=(hidden, classes)), tf.float32)

    def net(v):
        flat = tf.reshape(v, [tf.shape(v)[0], -1, 1])
        h = tf.nn.relu(tf.reduce_sum(flat * w1, axis=1) - 1.0)
        return tf.reduce_sum(h[:, :, None] * w2, axis=1)
    return net


def _images(n=24, seed=5):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, 6, 6, 3)).astype(np.float32)
    net = _rowwise_net()
    return net, x, _predict(net, x).astype(np.int32)


ATTACKS = {  # each: (net, x, y, eps, batch, ids) -> (x_adv, fooled)
    "apgd-ce": lambda net, x, y, eps, batch, ids: attacks.apgd(
        net, x, y, eps, 20, SEED, batch=batch, ids=ids),
    "apgd-dlr-l2": lambda net, x, y, eps, batch, ids: attacks.apgd(
        net, x, y, 6 * eps, 20, SEED, norm="l2", loss="dlr", batch=batch, ids=ids),
    "apgd-t": lambda net, x, y, eps, batch, ids: attacks.apgd(
        net, x, y, eps, 20, SEED, loss="dlr_targeted", batch=batch, ids=ids,
        target=attacks.top_targets(net(x), y, 1)[:, 0]),
    "square": lambda net, x, y, eps, batch, ids: attacks.square_linf(
        net, x, y, eps, 60, SEED, batch=batch, ids=ids)[:2],
    "fab-t": lambda net, x, y, eps, batch, ids: attacks.fab_t(
        net, x, y, eps, steps=10, n_targets=2, batch=batch, minimal=False),
    "pgd": lambda net, x, y, eps, batch, ids: attacks.pgd_until_fooled(
        net, x, y, eps, 10, eps / 4, True, SEED, 0.0, 1.0, batch=batch, ids=ids),
}


# L2 APGD and FAB-T sum over each image (norms, projections), and TF's reduction kernels split
# that work by the tensor's shape: their round-off depends on the batch, and an iterate near a
# tie can then go another way. The L-inf attacks' iterates are exact on _rowwise_net.
SUMS_OVER_IMAGES = ("apgd-dlr-l2", "fab-t")


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_an_images_result_does_not_depend_on_its_batch(name):
    """All at once, in 5 slots, and in 5 slots over the pool in reverse order (ids reversed with
    it): the same fooled images and adversarial images, bit for bit on a model whose rows do
    not share kernels (_rowwise_net), all but 2 of 24 images to 1e-4 for SUMS_OVER_IMAGES.
    The radius leaves some images standing and fools others at different iterations, so slots
    refill at different times."""
    net, x, y = _images()
    eps = 0.03
    attack = tf.function(lambda x, y, batch, ids: ATTACKS[name](net, x, y, eps, batch, ids))
    ids = np.arange(len(y), dtype=np.int32)
    x_all, f_all = (v.numpy() for v in attack(x, y, None, ids))
    assert 0.1 < f_all.mean() < 0.9, f_all.mean()
    x_5, f_5 = (v.numpy() for v in attack(x, y, 5, ids))
    back = ids[::-1]
    x_rev, f_rev = (v.numpy()[::-1] for v in attack(x[back], y[back], 5, back))
    for x_b, f_b in ((x_5, f_5), (x_rev, f_rev)):
        if name in SUMS_OVER_IMAGES:
            same = (f_b == f_all) & np.all(np.abs(x_b - x_all) <= 1e-4, axis=(1, 2, 3))
            assert np.sum(~same) <= 2, np.flatnonzero(~same)
        else:
            np.testing.assert_array_equal(f_b, f_all)
            np.testing.assert_array_equal(x_b, x_all)
    norm_eps = (6 * eps, "l2") if name == "apgd-dlr-l2" else (eps, "linf")
    _in_ball(x_5, x, norm_eps[0], norm_eps[1])
    np.testing.assert_array_equal(_predict(net, x_5)[f_5] != y[f_5], True)


def test_slots_stay_full_while_images_wait():
    """Square on 30 images in 8 slots: every row the model sees is a query of an image still
    standing (the rows of all calls add up to the images' query counts), and a call sees fewer
    than 8 images only once the pool has run out (at most the last image's queries)."""
    net, x, y = _images(n=30)
    sizes = tf.Variable(tf.zeros([9], tf.int32))

    def counted(v):
        sizes.scatter_nd_add([[tf.shape(v)[0]]], [1])
        return net(v)

    _, fooled, n_queries = tf.function(lambda: attacks.square_linf(
        counted, x, y, 0.06, 40, SEED, batch=8))()
    fooled, n_queries, sizes = fooled.numpy(), n_queries.numpy(), sizes.numpy()
    assert 0.1 < fooled.mean() < 0.9 and n_queries.min() < 40 and n_queries.max() == 40
    assert np.sum(sizes * np.arange(9)) == n_queries.sum()
    assert sizes[:8].sum() <= n_queries.max()
    assert sizes[8] >= (n_queries.sum() - 8 * n_queries.max()) / 8


def test_pgd_until_fooled_follows_pgd_classifier_and_checks_every_iterate():
    """Same seed, same starts and steps: an image pgd_classifier's x_adv fools is fooled, one
    it leaves standing that no iterate fooled has pgd_classifier's x_adv exactly; FGSM (one
    step of eps from x) likewise."""
    net, x, y = _images(n=40, seed=6)
    for steps, step, start in ((10, 0.015, True), (1, 0.06, False)):
        x_pgd = attacks.pgd_classifier(net, x, y, 0.06, steps, step, start, SEED, 0.0,
                                       1.0).numpy()
        x_adv, fooled = (v.numpy() for v in attacks.pgd_until_fooled(
            net, x, y, 0.06, steps, step, start, SEED, 0.0, 1.0, batch=7))
        wrong = _predict(net, x_pgd) != y
        assert 0.1 < wrong.mean() < 0.9
        assert np.all(fooled[wrong])
        np.testing.assert_allclose(x_adv[~fooled], x_pgd[~fooled], atol=1e-6)
        assert np.all(_predict(net, x_adv[fooled]) != y[fooled])
        _in_ball(x_adv, x, 0.06, "linf")


def test_an_empty_pool_and_a_pool_smaller_than_the_batch():
    net, x, y = _images(n=3)
    x_adv, fooled = attacks.apgd(net, x[:0], y[:0], 0.06, 5, SEED, batch=8)
    assert x_adv.shape == (0, 6, 6, 3) and fooled.shape == (0,)
    x_adv, fooled = attacks.apgd(net, x, y, 0.06, 5, SEED, batch=8)
    x_one, fooled_one = attacks.apgd(net, x, y, 0.06, 5, SEED, batch=1)
    np.testing.assert_array_equal(fooled.numpy(), fooled_one.numpy())
    np.testing.assert_allclose(x_adv.numpy(), x_one.numpy(), atol=1e-6)
