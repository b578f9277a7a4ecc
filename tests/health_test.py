"""health.py: the divergence verdict of one step on the device, and its message on the host."""

import pytest
import tensorflow as tf

from clae_tf.job import health


@pytest.mark.parametrize("loss, w_norm, z_norm, healthy", [
    (3.0, 20.0, 1.0, True),
    (float("nan"), 20.0, 1.0, False),
    (3.0, float("inf"), 1.0, False),
    (3.0, 10.0 * health.MAX_WEIGHT_GROWTH + 1.0, 1.0, False),  # w_norm0 = 10
    (3.0, 20.0, 0.1, False),  # most of the batch at z = 0
])
def test_health_verdict_and_its_message(loss, w_norm, z_norm, healthy):
    verdict = health.is_healthy(tf.constant(loss), tf.constant(w_norm), tf.constant(z_norm),
                                tf.constant(10.0))
    assert bool(verdict) == healthy
    message = health.describe(7, loss, w_norm, z_norm, 10.0)
    assert (message is None) == healthy
    if not healthy:
        assert message.startswith("training diverged at step 7: ")
