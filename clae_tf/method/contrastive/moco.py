"""MoCo v2 (He et al. 2020; Chen et al. 2020) as a Method: momentum key encoder, queue of keys.

The query encoder is the trained model (with CLAE's adversarial BNs); the key encoder is a copy
of it without them, following it by momentum. The queue holds the keys of past global batches.
The loss is InfoNCE (losses.moco): a query against its positive key and the queue.

Where CLAE goes: the clean query of x1 has the key of x2 as its positive; x_adv (an FGSM step
on x1) is a query whose positive is the key of its own source view x1, as SimCLR pairs x_adv
with x1 (docs/method.md, steps 3 and 4), against the same queue. Only x2's keys enter the queue.
(Pairing x_adv with the key of x2 instead, a cross-view positive, cost 6.5 kNN points on the
small CIFAR-10 protocol: docs/results/methods.md.)

Under a distribution strategy both updates run in CROSS-replica context, between steps, from
values that are the same on every replica (the query parameters after an optimizer step, the
keys gathered over all replicas), so every replica's copy stays identical:
  - before a step: key = m * key + (1 - m) * query (MoCo's order: the keys of this step come
    from the key encoder updated with the query parameters of the previous step);
  - after a step: the step's gathered keys replace the oldest queue entries.

BN information leak: MoCo's queries and their positive keys come from the same images; with
per-replica BN statistics, a key's batch statistics can carry the image identity (He et al.,
"Shuffling BN"). clae-tf uses synchronized BN (the --sync_bn default) for both encoders instead of
shuffling: the statistics then span the whole global batch, as in SimCLR, the same on every
replica; results do not depend on the number of replicas (shuffling BN does nothing on one device
and its effect changes with the replica count), and the synchronized path is the one tested equal
to a single device.
"""

import tensorflow as tf

from clae_tf.method import builders, losses
from clae_tf.method.contrastive.base import Method
from clae_tf.runtime.config import Config
from clae_tf.runtime.distribute import gather


class MoCo(Method):
    """Key encoder and queue for `model`; create it inside strategy.scope()."""

    def __init__(self, cfg: Config, model):
        self.momentum = cfg.key_momentum
        self.temperature = cfg.temperature
        self.adversarial = cfg.adversarial
        # Keys come from the clean path only: no adversarial BN twins in the key encoder.
        self.key_model = builders.build_model(cfg, name="moco_key_model", adversarial=False)
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

    def keys(self, x):
        """Unit keys of x from the key encoder (clean BNs in training mode, no gradient)."""
        _, k = self.key_model(x, training=True)
        return tf.stop_gradient(k)

    # --- Method ---

    def prepare(self, x1, x2):
        k2 = gather(self.keys(x2))  # the whole global batch of keys
        # x_adv's positives: the keys of its source view x1 (one more key-encoder forward).
        k1 = gather(self.keys(x1)) if self.adversarial else k2
        return {"k1": k1, "k2": k2}

    def clean_loss(self, model, consts, x1, x2):
        del x2  # only through its keys
        _, z1 = model(x1, training=True)  # the query of view 1 against the keys of view 2
        return losses.moco(gather(z1), consts["k2"], self.queue, self.temperature), z1

    def adversarial_loss(self, consts, anchor, z):
        del anchor  # MoCo is one-directional: the query z (x_adv's) against the keys of x1
        return losses.moco(gather(z), consts["k1"], self.queue, self.temperature)

    def step_outputs(self, consts):
        return consts["k2"]  # the gathered keys, the same on every replica

    def before_step(self):
        self.momentum_update()

    def after_step(self, outputs):
        self.enqueue(outputs)

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
