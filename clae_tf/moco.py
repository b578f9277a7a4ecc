"""MoCo v2's momentum key encoder and queue of negative keys (He et al. 2020; Chen et al. 2020).

The query encoder is the trained model (with CLAE's adversarial BNs); the key encoder is a copy
of it without them, following it by momentum. The queue holds the keys of past global batches.

Under a distribution strategy both updates run in CROSS-replica context, between steps, from
values that are the same on every replica (the query parameters after an optimizer step, the
keys gathered over all replicas), so every replica's copy stays identical:
  - at the start of a step: key = m * key + (1 - m) * query (MoCo's order: the keys of this
    step come from the key encoder updated with the query parameters of the previous step);
  - at the end of a step: the step's gathered keys replace the oldest queue entries.

BN information leak: MoCo's queries and their positive keys come from the same images; with
per-replica BN statistics, a key's batch statistics can carry the image identity (He et al.,
"Shuffling BN"). clae-tf uses synchronized BN (the --sync_bn default) for both encoders instead of
shuffling: the statistics then span the whole global batch, as in SimCLR, the same on every
replica; results do not depend on the number of replicas (shuffling BN does nothing on one device
and its effect changes with the replica count), and the synchronized path is the one tested equal
to a single device.
"""

import dataclasses

import tensorflow as tf

from clae_tf import models
from clae_tf.config import Config


class MoCo:
    """Key encoder and queue for `model`; create it inside strategy.scope()."""

    def __init__(self, cfg: Config, model):
        self.momentum = cfg.key_momentum
        # Keys come from the clean path only: no adversarial BN twins in the key encoder.
        self.key_model = models.build_model(dataclasses.replace(cfg, adversarial=False),
                                            name="moco_key_model")
        query = {_local_path(v): v for v in model.trainable_variables}
        self.pairs = [(k, query[_local_path(k)]) for k in self.key_model.trainable_variables]
        for k, q in self.pairs:  # MoCo starts the key encoder as a copy of the query encoder
            k.assign(q)
        # Random unit keys until real ones arrive (as MoCo); a pure function of the seed.
        init = tf.random.stateless_normal([cfg.queue_size, cfg.proj_dim], [cfg.seed, 0x3C0])
        # ONLY_FIRST_REPLICA: an assignment keeps replica 0's value (all replicas agree anyway).
        agg = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.queue = tf.Variable(tf.math.l2_normalize(init, axis=1), trainable=False,
                                 aggregation=agg, name="moco_queue")
        self.queue_ptr = tf.Variable(0, dtype=tf.int64, trainable=False, aggregation=agg,
                                     name="moco_queue_ptr")

    def keys(self, x2):
        """Unit keys of x2 from the key encoder (clean BNs in training mode, no gradient)."""
        _, k = self.key_model(x2, training=True)
        return tf.stop_gradient(k)

    def momentum_update(self):
        """key = m * key + (1 - m) * query for every parameter. Cross-replica context."""
        m = self.momentum
        for k, q in self.pairs:
            k.assign(m * k + (1.0 - m) * q)

    def enqueue(self, keys):
        """Replaces the oldest entries with `keys` (N, D): a ring buffer. Cross-replica context."""
        n = tf.shape(keys, out_type=tf.int64)[0]
        size = tf.shape(self.queue, out_type=tf.int64)[0]
        index = (self.queue_ptr + tf.range(n, dtype=tf.int64)) % size
        # A whole-variable assign (not scatter_nd_update): mirrored variables support it
        # everywhere, and a 4096 x 128 copy per step costs nothing next to the encoder.
        self.queue.assign(tf.tensor_scatter_nd_update(
            self.queue, index[:, None], tf.cast(keys, self.queue.dtype)))
        self.queue_ptr.assign((self.queue_ptr + n) % size)

    def checkpoint_items(self):
        return {"moco_key_model": {v.path: v for v in self.key_model.variables},
                "moco_queue": self.queue, "moco_queue_ptr": self.queue_ptr}


def _local_path(variable):
    """A variable's path inside its model ("stem_conv/kernel"), the same for both encoders."""
    return variable.path.split("/", 1)[1]
