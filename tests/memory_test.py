"""memory.py: the order of a split held in memory, a stateless permutation per (seed, epoch)."""

import numpy as np
import tensorflow as tf

from clae_tf.data import memory


def test_each_epoch_is_a_permutation_of_its_own():
    n = 1437
    orders = [memory.permuted(seed, epoch, tf.range(n, dtype=tf.int64), n).numpy()
              for seed, epoch in ((0, 0), (0, 1), (1, 0))]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(n))  # every image once
    assert np.mean(orders[0] == orders[1]) < 0.01 and np.mean(orders[0] == orders[2]) < 0.01
