"""Adversarial examples for contrastive learning (PAPER.md, "The CLAE step", step 3)."""

import tensorflow as tf


def fgsm(embed_adv, batch_loss, x1, eps, loss_scale=None):
    """One FGSM step on view 1 against the batch-wide contrastive loss.

    The reference computes L(model_adv(x1), model_adv(x_adv)) with x_adv = x1, i.e. runs the
    adversarial branch forward twice and back-propagates into every parameter. Both embeddings
    are the same forward pass at x_adv = x1, and the gradient w.r.t. x_adv only flows through the
    second argument, so here the branch runs once and the first argument is stop-gradient-ed;
    the tape watches only the input (no parameter gradients are ever formed). Same x_adv.

    Args:
      embed_adv: x -> z through the ADVERSARIAL BNs in training mode (this updates their
        running statistics once; clean BNs and weights are untouched).
      batch_loss: (z_anchor, z) -> scalar base loss over the whole (global) batch.
      x1: (N, H, W, C) normalised view 1.
      eps: step size in normalised-input units. No random start, no clipping (as the reference).
      loss_scale: float16 training: the gradient is taken of loss * loss_scale (the optimizer's
        dynamic scale), else the float16 back-propagation underflows to 0 and sign(0) = 0 leaves
        x1 unperturbed. sign() is scale-invariant; a NaN entry (an overflowed scale) gives no
        step on that pixel instead of a NaN image.

    Returns:
      x_adv = x1 + eps * sign(dL/dx_adv), with its gradient stopped.
    """
    x1 = tf.convert_to_tensor(x1)
    # Inner tape: differentiates w.r.t. the INPUT only.
    with tf.GradientTape(watch_accessed_variables=False) as input_tape:
        input_tape.watch(x1)
        z = embed_adv(x1)
        loss = batch_loss(tf.stop_gradient(z), z)
        if loss_scale is not None:
            loss = loss * tf.cast(loss_scale, loss.dtype)
    grad = input_tape.gradient(loss, x1)
    # Kept in float32 even under mixed precision: an underflowed gradient gives sign(0) = 0.
    grad = tf.cast(grad, tf.float32)
    if loss_scale is not None:
        grad = tf.where(tf.math.is_nan(grad), tf.zeros_like(grad), grad)
    return tf.stop_gradient(x1 + tf.cast(eps, x1.dtype) * tf.sign(tf.cast(grad, x1.dtype)))


def training_attack(cfg):
    """The attack of the CLAE train step, (embed_adv, batch_loss, x1, loss_scale=None) -> x_adv:
    --eps FGSM."""
    return lambda embed_adv, batch_loss, x1, loss_scale=None: fgsm(
        embed_adv, batch_loss, x1, cfg.eps, loss_scale)
