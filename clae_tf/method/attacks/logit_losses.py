"""Losses on logits, per example and in float32: the margin, cross-entropy and the DLR losses of
Croce & Hein (ICML 2020, Sec. 4), which the evaluation attacks maximise."""

import tensorflow as tf


def _need_classes(logits, needed, what):
    classes = logits.shape[-1]
    if classes is not None and classes < needed:
        raise ValueError(f"{what} needs at least {needed} classes, got {classes}")


def _is_label(logits, y):
    """(N, C) bool: column == y."""
    return tf.equal(tf.range(tf.shape(logits)[-1])[None, :], tf.cast(y, tf.int32)[:, None])


def _true_and_other(logits, y):
    """(z_y, max_{i != y} z_i), each (N,)."""
    z_y = tf.gather(logits, tf.cast(y, tf.int32), batch_dims=1)
    other = tf.reduce_max(tf.where(_is_label(logits, y), -float("inf"), logits), axis=-1)
    return z_y, other


def margin(logits, y):
    """(N,) z_y - max_{i != y} z_i in float32: > 0 iff the example is classified correctly."""
    z_y, other = _true_and_other(tf.cast(logits, tf.float32), y)
    return z_y - other


def ce_loss(logits, y):
    """(N,) cross-entropy of each example, on float32 logits."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int32),
                                                          logits=tf.cast(logits, tf.float32))


def dlr_loss(logits, y):
    """(N,) the untargeted DLR loss: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12).

    pi sorts the logits decreasingly. Invariant to shifting and (positive) scaling the logits, so
    a saturated softmax cannot hide its gradient. Needs >= 3 classes (ValueError otherwise).
    """
    logits = tf.cast(logits, tf.float32)
    _need_classes(logits, 3, "the DLR loss (z_pi1 - z_pi3)")
    z_y, other = _true_and_other(logits, y)
    top = tf.math.top_k(logits, k=3).values
    return -(z_y - other) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(logits, y, target):
    """(N,) the targeted DLR loss: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12).

    Needs >= 4 classes (z_pi4, as AutoAttack's APGD-T, which indexes the 4th largest logit):
    ValueError otherwise. On 3 classes use `dlr_loss`, whose one other class is the target.
    """
    logits = tf.cast(logits, tf.float32)
    _need_classes(logits, 4, "the targeted DLR loss (z_pi1 - (z_pi3 + z_pi4) / 2)")
    z_y = tf.gather(logits, tf.cast(y, tf.int32), batch_dims=1)
    z_t = tf.gather(logits, tf.cast(target, tf.int32), batch_dims=1)
    top = tf.math.top_k(logits, k=4).values
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)
