"""Accelerator options, checked for correctness on the CPU: --jit_compile (XLA) and
--precision=fp16 (mixed_float16 with dynamic loss scaling), each against the float32 step."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from clae_tf.data import sources, streams
from clae_tf.job import checkpoints
from clae_tf.method import attacks, builders, losses, train_step

from conftest import tiny_config

ONE_DEVICE = tf.distribute.OneDeviceStrategy("/cpu:0")
T = 0.5


@contextlib.contextmanager
def policy(name):
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _one_step(cfg, batch, weights=None):
    """Loss of one train step and the weights after it, from the seed's (or given) weights."""
    keras.utils.set_random_seed(cfg.seed)
    state = checkpoints.State(cfg, ONE_DEVICE, 10, 10)
    if weights is not None:
        state.model.set_weights(weights)
    step = train_step.make_train_step(state.model, state.optimizer, cfg, 1, state.method)
    metrics, _, _ = step(*batch)
    return float(metrics["loss"]), [v.numpy().astype(np.float64) for v in state.model.weights]


@pytest.fixture(scope="module")
def batch():
    cfg = tiny_config()
    return next(iter(streams.pretrain_dataset(sources.load(cfg).train, cfg, epoch=0)))


def _update_error(weights0, ref, other):
    """|other update - ref update| / |ref update| over all weights (the step's change)."""
    num = sum(np.sum((o - r) ** 2) for r, o in zip(ref, other))
    den = sum(np.sum((r - w) ** 2) for w, r in zip(weights0, ref))
    return np.sqrt(num / den)


@pytest.fixture(scope="module")
def float32_step(batch):
    cfg = tiny_config(optimizer="sgd", learning_rate=0.05, weight_decay=5e-4)
    keras.utils.set_random_seed(cfg.seed)
    weights0 = [w.astype(np.float64) for w in
                checkpoints.State(cfg, ONE_DEVICE, 10, 10).model.get_weights()]
    return cfg, weights0, _one_step(cfg, batch)


@pytest.mark.slow  # > 10 s on the 2 shared cores
def test_jit_step_equals_the_default_step(batch, float32_step):
    """XLA reorders float32 arithmetic only: the same loss to 1e-5, the same update to 1e-3."""
    cfg, weights0, (loss, weights) = float32_step
    jit_loss, jit_weights = _one_step(tiny_config(optimizer="sgd", learning_rate=0.05,
                                                  weight_decay=5e-4, jit_compile=True), batch)
    assert jit_loss == pytest.approx(loss, rel=1e-5)
    assert _update_error(weights0, weights, jit_weights) < 1e-3


def test_fp16_step_is_the_float32_step_within_half_precision(batch, float32_step):
    """Same weights and batch: loss within 1%, the update (SGD + weight decay, unscaled by the
    LossScaleOptimizer) within 5% of the float32 update's norm."""
    cfg, weights0, (loss, weights) = float32_step
    with policy("mixed_float16"):
        fp16 = tiny_config(optimizer="sgd", learning_rate=0.05, weight_decay=5e-4,
                           precision="fp16")
        fp16_loss, fp16_weights = _one_step(fp16, batch,
                                            [w.astype(np.float32) for w in weights0])
    assert fp16_loss == pytest.approx(loss, rel=1e-2)
    assert _update_error(weights0, weights, fp16_weights) < 0.05


# --------------------------------------------------------------------------------------------
# The attack under float16: its input gradient comes from a scaled loss.


@pytest.fixture(scope="module")
def models():
    """The same tiny dual-BN model in float32 and in mixed_float16 (weights copied)."""
    cfg = tiny_config(adversarial=True)
    keras.utils.set_random_seed(0)
    model32 = builders.build_model(cfg)
    with policy("mixed_float16"):
        model16 = builders.build_model(cfg)
    model16.set_weights(model32.get_weights())
    return model32, model16


@pytest.fixture(scope="module")
def x1():
    rng = np.random.default_rng(0)
    return tf.constant(rng.uniform(-1, 1, (8, 16, 16, 3)), tf.float32)


def _embed(model):
    return lambda x: model(x, training=True, adversarial=True)[1]


def _input_grad(model, x, loss_factor=1.0):
    with tf.GradientTape() as tape:
        tape.watch(x)
        z = _embed(model)(x)
        loss = loss_factor * losses.nt_xent(tf.stop_gradient(z), z, T)[0]
    return tape.gradient(loss, x).numpy()


def test_fp16_attack_steps_eps_wherever_the_float32_gradient_is_nonzero(models, x1):
    model32, model16 = models
    eps = 0.03
    g32 = _input_grad(model32, x1)
    x_adv = attacks.fgsm(_embed(model16), lambda za, zb: losses.nt_xent(za, zb, T)[0], x1, eps,
                         loss_scale=2.0 ** 15).numpy()
    delta = x_adv - x1.numpy()
    nonzero = g32 != 0
    assert nonzero.mean() > 0.99
    np.testing.assert_allclose(np.abs(delta[nonzero]), eps, rtol=1e-5)
    # Off ties (|g| in the top 90% of magnitudes) float16 and float32 agree on the direction.
    off_ties = np.abs(g32) > np.quantile(np.abs(g32), 0.1)
    assert np.mean(np.sign(delta[off_ties]) == np.sign(g32[off_ties])) > 0.97


def test_fp16_attack_needs_the_scale_a_tiny_loss_underflows_without_it(models, x1):
    """A loss 1e-8 times smaller: its float16 gradient underflows to 0 (sign(0) = 0, no
    attack) unless the loss is scaled; the scaled attack steps eps where float32 sees a
    gradient."""
    model32, model16 = models
    tiny = 1e-8

    def loss(za, zb):
        return tiny * losses.nt_xent(za, zb, T)[0]

    g32 = _input_grad(model32, x1, tiny)
    assert np.mean(g32 != 0) > 0.99  # float32 still sees it
    unscaled = attacks.fgsm(_embed(model16), loss, x1, 0.03).numpy() - x1.numpy()
    assert np.mean(unscaled == 0) > 0.9
    scaled = attacks.fgsm(_embed(model16), loss, x1, 0.03, loss_scale=2.0 ** 24).numpy() \
        - x1.numpy()
    np.testing.assert_allclose(np.abs(scaled[g32 != 0]), 0.03, rtol=1e-5)


def test_an_overflowed_scale_gives_no_nan_image(models, x1):
    """A scale so large that the float16 gradient overflows: no NaN reaches x_adv."""
    _, model16 = models
    x_adv = attacks.fgsm(_embed(model16), lambda za, zb: losses.nt_xent(za, zb, T)[0], x1, 0.03,
                         loss_scale=2.0 ** 60).numpy()
    assert np.all(np.isfinite(x_adv))
    assert np.all(np.abs(x_adv - x1.numpy()) <= 0.03 + 1e-6)
