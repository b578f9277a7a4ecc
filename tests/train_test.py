"""The optimised CLAE train step and optimizer against literal references.

train_step.make_train_step runs the attack as ONE forward pass of the adversarial branch with an
input-only gradient (attacks.fgsm), and BN as one fused op (models.py). Here the whole train step
(x_adv, the three losses, the weights after the optimizer step) is compared with a straightforward
version: two forward passes of the adversarial branch, L(model_adv(x1), model_adv(x_adv)),
differentiated with the parameters recorded, through Keras' own BatchNormalization layers; then
  - SimCLR: Keras' Adam at the paper's constant 3e-4, no weight decay;
  - Plain / UEL: PyTorch's SGD written out (momentum 0.9, coupled weight decay 5e-4) and the
    reference's adjust_learning_rate (x0.1 / x0.05 / x0.01 from epochs 120 / 160 / 200).
(tests/attacks_test.py checks fgsm alone.)
"""

import dataclasses
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from clae_tf.method import builders, contrastive, losses, models, optim, train_step

from conftest import tiny_config
from subprocs import Program


def code_under_test(cfg, model=None, steps_per_epoch=1, total_steps=1, compiled=False):
    """The ONE place that calls optim.build_optimizer / train_step.make_train_step.

    Returns (step, optimizer): step(x1, x2) -> (metrics, images, keys), or None without a model.
    """
    optimizer = optim.build_optimizer(cfg, steps_per_epoch, total_steps)
    if model is None:
        return None, optimizer
    optimizer.build(model.trainable_variables)
    step = train_step.make_train_step(model, optimizer, cfg, 1, contrastive.build(cfg, model))
    return (tf.function(step) if compiled else step), optimizer


# ------------------------------------------------------------------ literal references


def _keras_bn(model, x, training, adversarial):
    """The model's forward with every DualBatchNorm going through the plain Keras BN layer."""
    original = models._can_fuse
    models._can_fuse = lambda bn, x: False
    try:
        return model(x, training=training, adversarial=adversarial)
    finally:
        models._can_fuse = original


def reference_gradients(model, cfg, x1, x2, keras_bn=True):
    """docs/method.md "The CLAE step" steps 1-4 literally (no shortcut; Keras' own BN layers unless
    keras_bn=False), up to the parameter gradients of L. Returns (metrics, x_adv, grad_x, grads).
    """
    base = losses.PAIR_LOSSES[cfg.method]
    forward = _keras_bn if keras_bn else (
        lambda model, x, training, adv: model(x, training=training, adversarial=adv))
    # Step 3: x_adv starts at x1; both arguments through the adversarial branch in training
    # mode; the tape records the parameters too; one signed-gradient step w.r.t. x_adv only.
    x_adv = tf.identity(x1)
    with tf.GradientTape() as tape:
        tape.watch(x_adv)
        _, z_a = forward(model, x1, True, True)
        _, z_b = forward(model, x_adv, True, True)
        attack_loss, _, _ = base(z_a, z_b, cfg.temperature)
    grad_x, _unused_param_grads = tape.gradient(attack_loss, [x_adv, model.trainable_variables])
    x_adv = tf.stop_gradient(x1 + cfg.eps * tf.sign(grad_x))
    # Steps 2 and 4.
    with tf.GradientTape() as tape:
        _, z1 = forward(model, x1, True, False)
        _, z2 = forward(model, x2, True, False)
        clean_loss, _, _ = base(z1, z2, cfg.temperature)
        _, z_adv = forward(model, x_adv, True, True)
        adv_loss, _, _ = base(z1, z_adv, cfg.temperature)
        loss = clean_loss + cfg.alpha * adv_loss
    grads = tape.gradient(loss, model.trainable_variables)
    metrics = {"loss": loss, "clean_loss": clean_loss, "adv_loss": adv_loss}
    return metrics, x_adv, grad_x, grads


# The reference's Plain/UEL optimizer (Plain/main.py, UEL/main.py): SGD(lr 0.03, momentum 0.9,
# weight_decay 5e-4) and adjust_learning_rate(epoch) at the start of every (0-based) epoch.
PAPER_SGD = dict(learning_rate=0.03, momentum=0.9, weight_decay=5e-4)
PAPER_SCHEDULE = ((120, 0.1), (160, 0.05), (200, 0.01))


def reference_lr(iteration, steps_per_epoch, base_lr=0.03, schedule=PAPER_SCHEDULE):
    """adjust_learning_rate: base_lr times the factor of the last boundary epoch reached."""
    epoch = iteration // steps_per_epoch
    lr = base_lr
    for boundary, factor in schedule:
        if epoch >= boundary:
            lr = base_lr * factor
    return lr


class ReferenceSGD:
    """torch.optim.SGD(momentum=m, weight_decay=wd), dampening 0, no Nesterov, written out:
    d = g + wd * w;  b = m * b + d (b = d on the first step);  w -= lr * b."""

    def __init__(self, variables, steps_per_epoch, schedule=PAPER_SCHEDULE, **hparams):
        self.variables = variables
        self.steps_per_epoch, self.schedule = steps_per_epoch, schedule
        self.lr0, self.m, self.wd = hparams["learning_rate"], hparams["momentum"], \
            hparams["weight_decay"]
        self.buffers = [None] * len(variables)
        self.iteration = 0

    def step(self, grads):
        lr = reference_lr(self.iteration, self.steps_per_epoch, self.lr0, self.schedule)
        for i, (g, w) in enumerate(zip(grads, self.variables)):
            d = g.numpy().astype(np.float64) + self.wd * w.numpy()
            b = d if self.buffers[i] is None else self.m * self.buffers[i] + d
            self.buffers[i] = b
            w.assign((w.numpy() - lr * b).astype(np.float32))
        self.iteration += 1


# ------------------------------------------------------------------ helpers


def _model(cfg):
    keras.utils.set_random_seed(cfg.seed)
    return builders.build_model(cfg)


def _twin_models(cfg):
    fast, ref = _model(cfg), _model(cfg)
    for a, b in zip(fast.variables, ref.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    return fast, ref


def _views(cfg, seed):
    shape = [cfg.batch_size, cfg.image_size, cfg.image_size, 3]
    return (tf.random.stateless_uniform(shape, [seed, 1], -1.0, 1.0),
            tf.random.stateless_uniform(shape, [seed, 2], -1.0, 1.0))


def _clean_bn_stats(model):
    return [v for v in model.variables if "/bn/moving_" in v.path]


def _check_x_adv_and_losses(cfg, metrics, images, ref_metrics, ref_x_adv, grad_x, x1):
    for k in ("loss", "clean_loss", "adv_loss"):
        np.testing.assert_allclose(float(metrics[k]), float(ref_metrics[k]), rtol=1e-5)
    # x_adv = x1 +- eps everywhere; the same sign wherever the gradient is not ~0 (the two
    # ways of computing it round differently in the last bits).
    got, want = images["x_adv"].numpy(), ref_x_adv[:4].numpy()
    np.testing.assert_allclose(np.abs(got - x1[:4].numpy()), cfg.eps, rtol=1e-4)
    g = np.abs(grad_x[:4].numpy())
    clear = g > 1e-3 * g.max()
    np.testing.assert_array_equal(got[clear], want[clear])
    assert np.mean(got != want) < 1e-3


# ------------------------------------------------------------------ SimCLR + Adam


@pytest.mark.slow  # ~30 s with the machine shared, ~10 s alone: tracing the optimized step
def test_optimized_step_matches_literal_paper_step():
    cfg = tiny_config(batch_size=8)  # SimCLR: Adam 3e-4, constant, no weight decay
    assert (cfg.optimizer, cfg.learning_rate, cfg.weight_decay, cfg.lr_schedule) == (
        "adam", 3e-4, 0.0, "constant")
    fast_model, ref_model = _twin_models(cfg)
    fast_step, _ = code_under_test(cfg, fast_model, compiled=True)
    ref_opt = keras.optimizers.Adam(3e-4)
    ref_opt.build(ref_model.trainable_variables)
    for step in range(2):  # the second step starts from updated weights and statistics
        x1, x2 = _views(cfg, step)
        metrics, images, _ = fast_step(x1, x2)
        ref_metrics, ref_x_adv, grad_x, grads = reference_gradients(ref_model, cfg, x1, x2)
        ref_opt.apply_gradients(zip(grads, ref_model.trainable_variables))
        _check_x_adv_and_losses(cfg, metrics, images, ref_metrics, ref_x_adv, grad_x, x1)
        # Adam moves every weight by ~lr * sign(g) on the first steps, so where |g| is near
        # Adam's epsilon, last-bit differences of g show: compare at a few % of the lr.
        atol = 0.03 * cfg.learning_rate
        for a, b in zip(fast_model.trainable_variables, ref_model.trainable_variables):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=atol, err_msg=a.path)
        for a, b in zip(_clean_bn_stats(fast_model), _clean_bn_stats(ref_model)):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)


def test_bf16_step_close_to_float32_and_x_adv_on_the_eps_sphere():
    cfg = tiny_config(batch_size=16)
    x1, x2 = _views(cfg, 3)
    out = {}
    for precision, policy in (("float32", "float32"), ("bf16", "mixed_bfloat16")):
        keras.mixed_precision.set_global_policy(policy)
        try:
            pcfg = dataclasses.replace(cfg, precision=precision)
            # Eagerly: tracing costs more than the step here (the compiled step is tested above).
            step, _ = code_under_test(pcfg, _model(pcfg))
            metrics, images, _ = step(x1, x2)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        assert metrics["loss"].dtype == tf.float32 and images["x_adv"].dtype == tf.float32
        out[precision] = metrics, images
        delta = np.abs(images["x_adv"].numpy() - images["x"].numpy())
        np.testing.assert_allclose(delta, cfg.eps, rtol=1e-3)  # no sign(0) from an underflow
    for k in ("loss", "clean_loss", "adv_loss"):
        np.testing.assert_allclose(float(out["bf16"][0][k]), float(out["float32"][0][k]),
                                   rtol=0.02)


# ------------------------------------------------------------------ Plain / UEL + SGD


def _sgd_steps_match(cfg, steps, steps_per_epoch, schedule):
    """The SGD path on top of the literal step. BN here is the model's own (fused) op: the
    Keras-BN comparison is the Adam test's, and for UEL on the third step it drifts (gradients
    of stage 3-4 up to 5% apart through Keras' BN, 3e-6 through the same op, while the losses
    agree to 1e-7), which would hide the optimizer's effects measured here."""
    fast_model, ref_model = _twin_models(cfg)
    fast_step, _ = code_under_test(cfg, fast_model, steps_per_epoch, steps)
    ref_opt = ReferenceSGD(ref_model.trainable_variables, steps_per_epoch, schedule, **PAPER_SGD)
    for step in range(steps):
        x1, x2 = _views(cfg, step)
        metrics, images, _ = fast_step(x1, x2)
        ref_metrics, ref_x_adv, grad_x, grads = reference_gradients(ref_model, cfg, x1, x2,
                                                                     keras_bn=False)
        ref_opt.step(grads)
        _check_x_adv_and_losses(cfg, metrics, images, ref_metrics, ref_x_adv, grad_x, x1)
        # The two gradients agree to ~3e-6 (relative); leaving out the weight decay moves
        # weights by 1.5e-5 on the first step already (up to lr * 5e-4 * |w|), and the
        # momentum buffer's share grows from the second step on.
        for a, b in zip(fast_model.trainable_variables, ref_model.trainable_variables):
            # atol 1e-6: Keras' SGD rounds differently (v = m v - lr g; w += v), 1.7e-7 seen;
            # still 15x below the weight decay's share of the first step.
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {step}: {a.path}")
        for a, b in zip(_clean_bn_stats(fast_model), _clean_bn_stats(ref_model)):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["plain", "uel"])
def test_sgd_step_matches_literal_pytorch_sgd(method):
    """Three CLAE steps in the first epochs: momentum buffer and coupled weight decay."""
    cfg = tiny_config(method=method, batch_size=16)
    assert (cfg.optimizer, cfg.learning_rate, cfg.momentum, cfg.weight_decay) == (
        "sgd", 0.03, 0.9, 5e-4)
    _sgd_steps_match(cfg, steps=3, steps_per_epoch=1, schedule=PAPER_SCHEDULE)


@pytest.mark.xfail(strict=True, reason=(
    "Keras' SGD keeps lr inside its momentum (v = m v - lr g; w += v), so after a drop the old "
    "lr's momentum decays over ~1/(1-m) steps; PyTorch scales the whole buffer by the new lr "
    "(w -= lr (m b + g)). optim.py says why it stays for now."))
@pytest.mark.slow
def test_sgd_steps_across_lr_boundaries_match_literal_pytorch_sgd():
    # One step per epoch, boundaries at epochs 1, 2, 3: every step runs at a new lr.
    schedule = ((1, 0.1), (2, 0.05), (3, 0.01))
    cfg = tiny_config(method="plain", batch_size=8, lr_boundaries=tuple(b for b, _ in schedule),
                      lr_factors=tuple(f for _, f in schedule))
    _sgd_steps_match(cfg, steps=4, steps_per_epoch=1, schedule=schedule)


# ------------------------------------------------------------------ the step schedule


def _keras_lr(optimizer, iteration):
    optimizer.iterations.assign(iteration)
    return float(tf.convert_to_tensor(optimizer.learning_rate))


@pytest.mark.parametrize("method", ["plain", "uel"])
def test_step_schedule_within_epochs(method):
    """The paper's x0.1/x0.05/x0.01 at 120/160/200 on every step but each boundary epoch's
    first (next test), with a tiny steps_per_epoch."""
    spe = 3
    _, optimizer = code_under_test(tiny_config(method=method), steps_per_epoch=spe,
                                   total_steps=301 * spe)
    iterations = [0, 1, 119 * spe + 2, 120 * spe + 1, 120 * spe + 2, 159 * spe + 2,
                  160 * spe + 1, 199 * spe + 2, 200 * spe + 1, 301 * spe - 1]
    for i in iterations:
        assert _keras_lr(optimizer, i) == pytest.approx(reference_lr(i, spe), rel=1e-6), i


def test_step_schedule_first_step_of_boundary_epochs():
    spe = 3
    _, optimizer = code_under_test(tiny_config(method="plain"), steps_per_epoch=spe,
                                   total_steps=301 * spe)
    for boundary, factor in PAPER_SCHEDULE:
        assert _keras_lr(optimizer, boundary * spe) == pytest.approx(0.03 * factor, rel=1e-6)


# CLAE train steps through the real loop (train.train) at odd batch sizes, in this child process:
# a crash there fails the test, not pytest. Eight steps each (one per compiled call): the heap
# corruption this guards against does not show at every step (measured with the strided 1x1
# conv put back: a crash in 2 of 3 one-step runs of batch 3, in 4 of 4 eight-step runs).
_ODD_BATCH_SCRIPT = """
import sys
sys.path.insert(0, "tests")
from conftest import tiny_config
from clae_tf.data import sources
from clae_tf.job import train
from clae_tf.runtime import distribute
for batch in (3, 5):
    cfg = tiny_config(workdir=f"{sys.argv[1]}/batch{batch}", batch_size=batch, max_steps=8,
                      projector_examples=0, adversarial=True, strategy="one_device")
    summary = train.train(cfg, distribute.make_strategy(cfg), sources.load(cfg))
    print(f"batch {batch}: step {summary.step}", flush=True)
"""


@pytest.mark.slow  # 30-60 s: one child process, two tiny runs
def test_odd_batch_sizes_train(tmp_path):
    """Odd batches (3, 5) with oneDNN on, as by default: the strided 1x1 shortcut conv's oneDNN
    filter gradient used to corrupt the heap there. The kernel sees the batch of one replica,
    so one device covers an odd batch per replica under MirroredStrategy too (whose 2-replica
    run would cost twice the two runs here in tracing alone)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    with Program(["-c", _ODD_BATCH_SCRIPT, str(tmp_path)], env=env) as child:
        code, out, err = child.finish()
    assert code == 0, f"exit {code}:\n{out}\n{err[-3000:]}"
    assert [line for line in out.splitlines() if line.startswith("batch ")] == [
        "batch 3: step 8", "batch 5: step 8"], out
