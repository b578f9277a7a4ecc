"""Tests of clae_tf.attacks.fgsm with the tiny dual-BN model (PAPER.md, "The CLAE step", step 3)."""

import numpy as np
import pytest
import tensorflow as tf

from clae_tf import attacks, builders, losses
from conftest import tiny_config

T = 0.5


@pytest.fixture(scope="module")
def cfg():
    return tiny_config(adversarial=True)


@pytest.fixture(scope="module")
def model(cfg):
    tf.keras.utils.set_random_seed(0)
    return builders.build_model(cfg)


@pytest.fixture(scope="module")
def x1(cfg):
    rng = np.random.default_rng(0)
    # Normalised inputs in [-1, 1], as after augment.normalize.
    return tf.constant(rng.uniform(-1, 1, (8, cfg.image_size, cfg.image_size, 3)), tf.float32)


def _embed_adv(model):
    return lambda x: model(x, training=True, adversarial=True)[1]


def _batch_loss(za, zb):
    return losses.nt_xent(za, zb, T)[0]


def _adv_bn_stats(model):
    return [v for v in model.variables if "bn_adv" in v.path and "moving" in v.path]


def _snapshot(variables):
    return [v.numpy().copy() for v in variables]


def _restore(variables, values):
    for v, val in zip(variables, values):
        v.assign(val)


def _input_grad(embed, x):
    """dL(sg z(x), z(x_adv))/dx_adv at x_adv = x: the quantity whose sign FGSM takes."""
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        z = embed(x)
        loss = _batch_loss(tf.stop_gradient(z), z)
    return tape.gradient(loss, x)


def test_step_is_eps_where_gradient_nonzero_and_zero_elsewhere(model, x1):
    # Mask out part of the input inside the embedding so that its gradient is EXACTLY zero there
    # (channel 2 everywhere, and the top-left 4x4 corner of every channel); elsewhere a training-mode
    # BN network makes every input pixel matter.
    mask = np.ones(x1.shape, np.float32)
    mask[..., 2] = 0.0
    mask[:, :4, :4, :] = 0.0
    mask = tf.constant(mask)
    base = _embed_adv(model)

    def embed(x):
        return base(x * mask)

    stats = _adv_bn_stats(model)
    saved = _snapshot(stats)
    eps = 0.03
    x_adv = attacks.fgsm(embed, _batch_loss, x1, eps).numpy()
    grad = _input_grad(embed, x1).numpy()
    _restore(stats, saved)

    delta = np.abs(x_adv - x1.numpy())
    zero = grad == 0
    assert zero.sum() == (mask.numpy() == 0).sum()  # exactly the masked entries
    assert (~zero).mean() > 0.5
    np.testing.assert_array_equal(delta[zero], 0.0)
    np.testing.assert_allclose(delta[~zero], eps, rtol=0, atol=1e-6)
    assert x_adv.shape == tuple(x1.shape) and x_adv.dtype == np.float32


def test_eps_zero_is_identity(model, x1):
    stats = _adv_bn_stats(model)
    saved = _snapshot(stats)
    x_adv = attacks.fgsm(_embed_adv(model), _batch_loss, x1, 0.0)
    _restore(stats, saved)
    np.testing.assert_array_equal(x_adv.numpy(), x1.numpy())


@pytest.mark.parametrize("eps", [1e-3, 0.03])
def test_attack_increases_the_loss_it_attacks(model, x1, eps):
    # The attacked objective is x -> L(sg z_adv(x1), z_adv(x)) with the adversarial BNs in TRAINING
    # mode, i.e. each forward normalises with its own batch's statistics (FGSM differentiates through
    # those statistics). So both loss evaluations below use training mode too: at x1 the second
    # forward sees the batch x1, at x_adv the batch x_adv, exactly the function whose gradient the
    # attack followed. (Inference mode would evaluate a different function, with the near-initial
    # moving statistics.) The anchor is the training-mode embedding of x1, as in the attack.
    # The adversarial BN moving statistics are restored afterwards so other tests see the same state.
    stats = _adv_bn_stats(model)
    saved = _snapshot(stats)
    embed = _embed_adv(model)
    x_adv = attacks.fgsm(embed, _batch_loss, x1, eps)
    anchor = embed(x1)
    loss_clean = float(_batch_loss(anchor, embed(x1)))
    loss_adv = float(_batch_loss(anchor, embed(x_adv)))
    # A random step of the same size as a control: the signed-gradient step must beat it.
    rng = np.random.default_rng(1)
    x_rand = x1 + eps * tf.constant(rng.choice([-1.0, 1.0], x1.shape), tf.float32)
    loss_rand = float(_batch_loss(anchor, embed(x_rand)))
    _restore(stats, saved)
    assert loss_adv > loss_clean
    assert loss_adv - loss_clean > 2 * abs(loss_rand - loss_clean)


def test_attack_touches_only_the_adversarial_bn_statistics(model, x1):
    stats = _adv_bn_stats(model)
    assert stats and all("bn_adv" in v.path for v in stats)
    others = [v for v in model.variables if "bn_adv" not in v.path]
    trainable = list(model.trainable_variables)
    assert len(others) > 0 and len(trainable) > 0
    saved_stats, saved_others, saved_trainable = (_snapshot(stats), _snapshot(others),
                                                  _snapshot(trainable))

    x_adv = attacks.fgsm(_embed_adv(model), _batch_loss, x1, 0.03)
    assert np.abs(x_adv.numpy() - x1.numpy()).max() > 0

    for v, before in zip(others, saved_others):  # clean BN stats, conv/dense weights, clean gamma/beta
        np.testing.assert_array_equal(v.numpy(), before, err_msg=v.path)
    for v, before in zip(trainable, saved_trainable):  # includes the adversarial gamma/beta
        np.testing.assert_array_equal(v.numpy(), before, err_msg=v.path)
    # One training-mode forward through the adversarial BNs: every moving mean/variance moved.
    for v, before in zip(stats, saved_stats):
        assert not np.array_equal(v.numpy(), before), v.path
    _restore(stats, saved_stats)


def _reference_x_adv(model, x1, eps):
    """PAPER.md step 3 as the reference runs it: x_adv = x1 (a separate, watched tensor); the
    adversarial branch runs forward twice, loss L(model_adv(x1), model_adv(x_adv)) without any
    stop-gradient, on a tape that also records every parameter; one signed step w.r.t. x_adv."""
    x_adv = tf.identity(x1)
    with tf.GradientTape(persistent=True) as tape:  # records the (trainable) parameters too
        tape.watch(x_adv)
        z_a = model(x1, training=True, adversarial=True)[1]
        z_b = model(x_adv, training=True, adversarial=True)[1]
        loss = losses.nt_xent(z_a, z_b, T)[0]
    grad = tape.gradient(loss, x_adv)
    param_grads = tape.gradient(loss, model.trainable_variables)
    del tape
    assert any(g is not None for g in param_grads)  # the reference tape did see the parameters
    return grad, x1 + eps * tf.sign(grad)


def test_matches_reference_two_forward_formulation(model, x1):
    eps = 0.03
    stats = _adv_bn_stats(model)
    saved = _snapshot(stats)
    x_adv = attacks.fgsm(_embed_adv(model), _batch_loss, x1, eps).numpy()
    after_fgsm = _snapshot(stats)
    # Same state for the reference (training-mode BN output does not depend on the moving stats,
    # but restore them anyway so both computations start identically).
    _restore(stats, saved)
    grad, x_ref = _reference_x_adv(model, x1, eps)
    after_ref = _snapshot(stats)
    _restore(stats, saved)

    grad, x_ref = grad.numpy(), x_ref.numpy()
    # Away from ties (|grad| tiny relative to its scale, where round-off can flip the sign) the two
    # must agree bit-for-bit.
    decided = np.abs(grad) > 1e-4 * np.abs(grad).max()
    assert decided.mean() > 0.95
    np.testing.assert_array_equal(x_adv[decided], x_ref[decided])
    assert np.abs(x_adv - x_ref).max() <= 2 * eps + 1e-6
    # The reference updated the adversarial statistics twice, fgsm once:
    # m1 = a m0 + (1 - a) s and m2 = a m1 + (1 - a) s with the same batch statistic s.
    a = 0.99  # Keras momentum of the adversarial BN (PyTorch 0.01)
    for m0, m1, m2 in zip(saved, after_fgsm, after_ref):
        np.testing.assert_allclose(m2, a * m1 + (1 - a) * (m1 - a * m0) / (1 - a), rtol=1e-4,
                                   atol=1e-6)


def test_works_inside_tf_function(model, x1):
    stats = _adv_bn_stats(model)
    saved = _snapshot(stats)
    eager = attacks.fgsm(_embed_adv(model), _batch_loss, x1, 0.03).numpy()
    _restore(stats, saved)
    graph = tf.function(lambda x: attacks.fgsm(_embed_adv(model), _batch_loss, x, 0.03))(x1)
    _restore(stats, saved)
    grad = _input_grad(_embed_adv(model), x1).numpy()
    _restore(stats, saved)
    decided = np.abs(grad) > 1e-4 * np.abs(grad).max()
    np.testing.assert_array_equal(eager[decided], graph.numpy()[decided])
