"""Divergence checks of the train loop: cheap on the device, one verdict per loop call.

Every step records three numbers on the device (no host round trip): the loss, the global norm
of the trainable weights after the update, and the mean norm of the clean embedding z1 (unit
norm unless the projection's raw output was zero, which l2_normalize maps to 0 -- the
"collapsed" embedding of a run whose weights exploded). The compiled loop stops at the first
unhealthy step and the host turns it into one error line naming the step; nothing is
checkpointed or exported after it.
"""

import math

import tensorflow as tf

# A weight norm this many times its value at the start of the process is an explosion: a
# healthy run grows its weights by a small factor (Adam without decay: ~2-10x over a run).
MAX_WEIGHT_GROWTH = 1e4
# Unit-norm embeddings have norm 1; below this most of the batch maps to z = 0.
MIN_Z_NORM = 0.5


def weight_norm(variables):
    """Global L2 norm of `variables` (float32), on the device."""
    return tf.linalg.global_norm([tf.cast(v, tf.float32) for v in variables])


def is_healthy(loss, w_norm, z_norm, w_norm0):
    """Graph-side verdict of one step (a bool tensor)."""
    return (tf.math.is_finite(loss) & tf.math.is_finite(w_norm)
            & (w_norm <= MAX_WEIGHT_GROWTH * w_norm0) & (z_norm >= MIN_Z_NORM))


def describe(step, loss, w_norm, z_norm, w_norm0):
    """Host-side: why step `step` is unhealthy, as one line (or None if it is healthy)."""
    if not math.isfinite(loss):
        what = f"the loss became {loss}"
    elif not math.isfinite(w_norm):
        what = f"the weights became {w_norm}"
    elif w_norm > MAX_WEIGHT_GROWTH * w_norm0:
        what = (f"the weights exploded (global norm {w_norm:.3g}, {w_norm / w_norm0:.3g}x its "
                f"value at the start)")
    elif z_norm < MIN_Z_NORM:
        what = (f"the embedding collapsed (mean |z| {z_norm:.3g}: the projection outputs zeros, "
                f"the loss sits at its chance value)")
    else:
        return None
    return f"training diverged at step {step}: {what}"
