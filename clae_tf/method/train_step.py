"""The CLAE train step (docs/method.md, "The CLAE step"): views -> x_adv -> clean loss ->
adversarial loss -> apply, per replica, and the global step around it."""

import keras
import tensorflow as tf

from clae_tf.method import attacks, losses
from clae_tf.runtime.config import Config

# What every step reports (means over a loop call in TensorBoard: train/<name>).
METRICS = ("loss", "clean_loss", "adv_loss", "contrast_acc", "z_norm")


# One body in the order of docs/method.md, so that the step reads as the paper's algorithm.
def make_train_step(model, optimizer, cfg: Config, num_replicas: int, method):
    """The per-replica CLAE step (docs/method.md, "The CLAE step"). Call it under strategy.run.

    Reads as the paper: views -> x_adv -> clean loss -> adversarial loss -> scale -> apply.
    x1, x2 are this replica's slices of the two normalised views. `method` (methods/base.py,
    checkpoints.State.method) gives the batch-wide losses over the GLOBAL batch: every
    replica computes the same loss, and the gather's gradient sums it over replicas, so the loss
    is divided by num_replicas for the optimizer, which sums gradients across replicas.
    Returns (metrics, images, method outputs for method.after_step).
    """
    attack = training_attack(cfg, lambda: optimizer.iterations)
    # float16: the parameter gradients are taken of loss * scale (the dynamic scale of the
    # LossScaleOptimizer, which divides them back), and so is the attack's input gradient.
    loss_scale = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def embed_adv(x):  # through the ADVERSARIAL BNs, training mode
        return model(x, training=True, adversarial=True)[1]

    def step(x1, x2):
        consts = method.prepare(x1, x2)  # no gradient (e.g. a momentum encoder's keys)
        with tf.GradientTape() as tape:
            x_adv = x1
            if cfg.adversarial:
                # The attack is not part of the training graph: the outer tape stops recording,
                # and the nested tape inside the attack differentiates w.r.t. the input only.
                with tape.stop_recording():
                    x_adv = attack(
                        embed_adv,
                        lambda z_anchor, z: method.adversarial_loss(consts, z_anchor, z)[0],
                        x1, optimizer.dynamic_scale if loss_scale else None)
            (clean_loss, logits, labels), anchor = method.clean_loss(model, consts, x1, x2)
            loss, adv_loss = clean_loss, tf.constant(0.0)
            if cfg.adversarial:
                _, z_adv = model(x_adv, training=True, adversarial=True)
                adv_loss, _, _ = method.adversarial_loss(consts, anchor, z_adv)
                loss = clean_loss + cfg.alpha * adv_loss
            scaled_loss = loss / num_replicas
            if loss_scale:
                scaled_loss = optimizer.scale_loss(scaled_loss)
        variables = model.trainable_variables
        grads = tape.gradient(scaled_loss, variables)
        if cfg.weight_decay:
            # PyTorch-style (coupled) L2, as the reference's SGD/Adam weight_decay; divided by
            # the replicas because the optimizer sums gradients across them (and scaled as the
            # loss under float16, because the optimizer unscales the sum).
            decay = cfg.weight_decay / num_replicas
            if loss_scale:
                decay = decay * optimizer.dynamic_scale
            grads = [g + decay * v for g, v in zip(grads, variables)]
        optimizer.apply_gradients(zip(grads, variables))
        metrics = {"loss": loss, "clean_loss": clean_loss, "adv_loss": adv_loss,
                   "contrast_acc": losses.contrast_accuracy(logits, labels),
                   # mean |z1|: 1 unless the projection collapsed to 0 (health.py)
                   "z_norm": tf.reduce_mean(tf.norm(tf.cast(anchor, tf.float32), axis=-1))}
        return metrics, {"x": x1[:4], "x_adv": x_adv[:4]}, method.step_outputs(consts)

    if cfg.jit_compile:
        # XLA compiles this per-replica step; the loop around it (tf.range, the data
        # iterator, the health check) stays a plain tf.function: an iterator cannot live
        # inside an XLA cluster.
        return tf.function(step, jit_compile=True)
    return step


def training_attack(cfg: Config, step_counter):
    """The attack of the CLAE train step: (embed_adv, batch_loss, x1, loss_scale=None) -> x_adv.

    The flags and the replica context around the pure attacks of attacks/. --attack=fgsm (the
    paper): one step of --eps. --attack=pgd: --attack_steps steps of --attack_step_size (0:
    attacks.auto_step_size) in the --eps ball, against the same batch-wide loss through the
    adversarial BNs, optionally from a random start seeded by (--seed, the step number, the
    replica), so a run is reproducible (the start noise of N replicas differs from one device's:
    a different, equally distributed draw). No clipping (as the reference).

    Args:
      cfg: the run's Config.
      step_counter: () -> the optimizer's step counter (seeds the random start).
    """
    if cfg.attack == "fgsm":
        return lambda embed_adv, batch_loss, x1, loss_scale=None: attacks.fgsm(
            embed_adv, batch_loss, x1, cfg.eps, loss_scale)
    step_size = cfg.attack_step_size or attacks.auto_step_size(cfg.eps, cfg.attack_steps)

    def attack(embed_adv, batch_loss, x1, loss_scale=None):
        seed = None
        if cfg.attack_random_start:
            ctx = tf.distribute.get_replica_context()
            replica = ctx.replica_id_in_sync_group if ctx is not None else 0
            seed = tf.stack([tf.cast(cfg.seed, tf.int64) * 1024 + tf.cast(replica, tf.int64),
                             tf.cast(step_counter(), tf.int64)])
        return attacks.pgd(embed_adv, batch_loss, x1, cfg.eps, cfg.attack_steps, step_size,
                           random_start=cfg.attack_random_start, seed=seed,
                           loss_scale=loss_scale)

    return attack


def make_distributed_step(strategy, replica_step, method, compiled=True):
    """The global step: the method's cross-replica hooks around strategy.run of the replica
    step (methods/base.py). compiled=False: eager (tests)."""

    def distributed_step(x1, x2):
        method.before_step()
        metrics, images, outputs = strategy.run(replica_step, args=(x1, x2))
        metrics = {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                   for k, v in metrics.items()}

        def first(v):  # every replica holds the same value: take the first's
            return strategy.experimental_local_results(v)[0]

        images = {k: first(v) for k, v in images.items()}
        method.after_step(tf.nest.map_structure(first, outputs))
        return metrics, images

    return tf.function(distributed_step) if compiled else distributed_step
