"""Optimizer, the CLAE train step, and the train loop (checkpoints, TensorBoard, progress)."""

import math
import os
import time

import keras
import tensorflow as tf

from clae_tf import ClaeError, attacks, augment, data, distribute, losses, models
from clae_tf.moco import MoCo
from clae_tf.config import Config
from clae_tf.distribute import gather
from clae_tf.progress import Progress

SCALARS = ("loss", "clean_loss", "adv_loss", "contrast_acc")


def build_optimizer(cfg: Config, steps_per_epoch: int, total_steps: int):
    lr = cfg.learning_rate
    if cfg.lr_schedule == "step":
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            [b * steps_per_epoch for b in cfg.lr_boundaries],
            [cfg.learning_rate] + [cfg.learning_rate * f for f in cfg.lr_factors])
    elif cfg.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, max(1, total_steps))
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(lr)
    return keras.optimizers.SGD(lr, momentum=cfg.momentum)


def make_train_step(model, optimizer, cfg: Config, num_replicas: int, moco=None):
    """The per-replica CLAE step (PAPER.md, "The CLAE step"). Call it under strategy.run.

    x1, x2 are this replica's slices of the two normalised views. Embeddings are gathered over
    replicas, so the loss (and the attack) see the whole global batch; every replica computes
    that same loss, and the gather's gradient sums it over replicas, so the loss is divided by
    num_replicas for the optimizer, which sums gradients across replicas.

    `batch_loss(z1, z)` is the method's loss with z in the place the adversarial view takes:
      - SimCLR, Plain, UEL: L(z1, z) with z the embeddings of x2 (clean) or x_adv (CLAE), so
        x_adv is the positive of its own view 1 and, for the others, a negative (Plain: a
        classifier weight);
      - MoCo (`moco` given): z are queries against keys from the momentum encoder and the
        queue; z1 is not used. The clean query of x1 has the key of x2 as its positive. x_adv's
        positive is the key of its own source view x1, as SimCLR pairs x_adv with x1 (PAPER.md,
        steps 3 and 4); only x2's keys enter the queue.
    The attack maximises the same batch loss (attacks.fgsm), so it accounts for the whole batch
    and, for MoCo, the queue. Returns (metrics, images, new_keys); new_keys are the gathered keys
    for the queue (MoCo) or empty.
    """

    def step(x1, x2):
        if moco is not None:
            keys = gather(moco.keys(x2))  # the whole global batch of keys
            adv_keys = gather(moco.keys(x1)) if cfg.adversarial else keys

            def batch_loss(z1, z):
                del z1  # MoCo is one-directional: queries (here x_adv's) against keys
                return losses.moco(gather(z), adv_keys, moco.queue, cfg.temperature)
        else:
            keys = tf.zeros([0, cfg.proj_dim])
            pair_loss = losses.PAIR_LOSSES[cfg.method]

            def batch_loss(z1, z):
                return pair_loss(gather(z1), gather(z), cfg.temperature)

        with tf.GradientTape() as tape:
            x_adv = x1
            if cfg.adversarial:
                # The attack is not part of the training graph: the outer tape stops recording,
                # and the nested tape inside fgsm differentiates w.r.t. the input only.
                with tape.stop_recording():
                    x_adv = attacks.fgsm(
                        lambda x: model(x, training=True, adversarial=True)[1],
                        lambda za, zb: batch_loss(za, zb)[0], x1, cfg.eps)
            _, z1 = model(x1, training=True)
            if moco is not None:  # the query of view 1 against the keys of view 2
                clean_loss, logits, labels = losses.moco(gather(z1), keys, moco.queue,
                                                         cfg.temperature)
            else:
                _, z2 = model(x2, training=True)
                clean_loss, logits, labels = batch_loss(z1, z2)
            loss, adv_loss = clean_loss, tf.constant(0.0)
            if cfg.adversarial:
                _, z_adv = model(x_adv, training=True, adversarial=True)
                adv_loss, _, _ = batch_loss(z1, z_adv)
                loss = clean_loss + cfg.alpha * adv_loss
            scaled_loss = loss / num_replicas
        variables = model.trainable_variables
        grads = tape.gradient(scaled_loss, variables)
        if cfg.weight_decay:
            # PyTorch-style (coupled) L2, as the reference's SGD/Adam weight_decay; divided by
            # the replicas because the optimizer sums gradients across them.
            grads = [g + (cfg.weight_decay / num_replicas) * v for g, v in zip(grads, variables)]
        optimizer.apply_gradients(zip(grads, variables))
        metrics = {"loss": loss, "clean_loss": clean_loss, "adv_loss": adv_loss,
                   "contrast_acc": losses.contrast_accuracy(logits, labels)}
        return metrics, {"x": x1[:4], "x_adv": x_adv[:4]}, keys

    return step


def make_distributed_step(strategy, replica_step, moco=None, compiled=True):
    """The global step: strategy.run of the replica step, plus MoCo's updates, which run in
    cross-replica context (moco.py explains the order). compiled=False: eager (tests)."""

    def distributed_step(x1, x2):
        if moco is not None:
            moco.momentum_update()
        metrics, images, keys = strategy.run(replica_step, args=(x1, x2))
        metrics = {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                   for k, v in metrics.items()}
        images = {k: strategy.experimental_local_results(v)[0] for k, v in images.items()}
        if moco is not None:  # every replica holds the same gathered keys: take the first's
            moco.enqueue(strategy.experimental_local_results(keys)[0])
        return metrics, images

    return tf.function(distributed_step) if compiled else distributed_step


class State:
    """Model, optimizer and checkpoint manager of a workdir; restores the latest checkpoint."""

    def __init__(self, cfg: Config, strategy, steps_per_epoch: int, total_steps: int):
        with strategy.scope():
            self.model = models.build_model(cfg)
            self.optimizer = build_optimizer(cfg, steps_per_epoch, total_steps)
            # Keras 3 optimizers must be built in the scope before a distributed step.
            self.optimizer.build(self.model.trainable_variables)
            self.moco = MoCo(cfg, self.model) if cfg.method == "moco" else None
        # Every model variable by path: tf.train.Checkpoint does not follow Keras 3's tracked
        # lists (model.blocks, a block's convs/bns), so `model=` alone misses the blocks' BN
        # moving statistics (their trainable weights are reached only through the optimizer).
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer,
            variables={v.path: v for v in self.model.variables},
            **(self.moco.checkpoint_items() if self.moco else {}))
        self.directory = os.path.join(cfg.run_dir, "checkpoints")
        # Multi-worker: saving is collective, so every worker saves; only the chief's copy lands
        # in the workdir, the others go to a temporary directory that is removed after each save.
        self.strategy = strategy
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, distribute.worker_dir(strategy, self.directory), max_to_keep=3)
        self.saved_step = None  # the same on every worker (decides collective saves)

    @property
    def latest_checkpoint(self):
        return tf.train.latest_checkpoint(self.directory)  # every worker restores the chief's

    def save(self, step: int):
        self.manager.save(checkpoint_number=step)
        distribute.remove_worker_dir(self.strategy, self.manager.directory)
        self.saved_step = step

    def restore(self, model_only=False):
        path = self.latest_checkpoint
        if path is None:
            return False
        try:
            status = self.checkpoint.restore(path)
            if model_only:
                status.expect_partial()
            else:
                status.assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as e:
            raise ClaeError(f"--workdir: checkpoint {path} does not fit these flags "
                            f"({str(e).splitlines()[0][:160]}); use another --workdir")
        self.saved_step = self.step
        return True

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())


def train(cfg: Config, strategy, source: data.Source) -> dict:
    """Pretrains (or resumes) in cfg.run_dir. Returns a summary for results.json."""
    steps_per_epoch = source.train.num_examples // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    state = State(cfg, strategy, steps_per_epoch, total_steps)
    if state.restore():
        print(f"Resuming from {state.latest_checkpoint} at step {state.step}.")
    model, optimizer = state.model, state.optimizer

    replica_step = make_train_step(model, optimizer, cfg, strategy.num_replicas_in_sync,
                                   state.moco)
    distributed_step = make_distributed_step(strategy, replica_step, state.moco)

    writer = (tf.summary.create_file_writer(os.path.join(cfg.run_dir, "tensorboard"))
              if distribute.is_chief(strategy) else tf.summary.create_noop_writer())
    step = start = state.step
    progress = Progress(start, total_steps, every=cfg.log_every)
    window_start, window_steps, train_time = time.time(), 0, 0.0
    batches = _batches(strategy, source, cfg, start, steps_per_epoch)
    try:
        while step < total_steps:
            x1, x2 = next(batches)
            t = time.time()
            metrics, images = distributed_step(x1, x2)
            metrics = {k: float(v) for k, v in metrics.items()}
            if not math.isfinite(metrics["loss"]):
                raise ClaeError(f"the loss became {metrics['loss']} at step {step + 1}; the last "
                                f"finite checkpoint is {state.latest_checkpoint} (try a "
                                f"lower --learning_rate)")
            train_time += time.time() - t
            step += 1
            window_steps += 1
            progress.update(step, {k: metrics[k] for k in ("loss", "contrast_acc")})
            if step % cfg.log_every == 0 or step == total_steps:
                elapsed = time.time() - window_start
                # convert_to_tensor: float() of a Keras variable fails when it is mirrored.
                lr = float(tf.convert_to_tensor(optimizer.learning_rate))
                _log_scalars(writer, step, metrics, lr,
                             window_steps * cfg.batch_size / max(elapsed, 1e-9))
                window_start, window_steps = time.time(), 0
            if cfg.adversarial and (step % cfg.image_every == 0 or step == start + 1):
                _log_images(writer, step, images, cfg.eps, cfg.normalize)
            if step % cfg.ckpt_every == 0:
                state.save(step)
    except KeyboardInterrupt:
        # Keep what this process has done: the same command resumes from here.
        state.save(state.step)
        raise ClaeError(f"interrupted at step {state.step}; checkpoint saved in "
                        f"{state.directory}; run the same command to resume")
    if state.saved_step != step:
        state.save(step)
    writer.flush()
    return {"model": model, "step": step, "steps_per_epoch": steps_per_epoch,
            "epochs": step / steps_per_epoch, "train_seconds_this_process": train_time}


def _batches(strategy, source, cfg, step, steps_per_epoch):
    """Distributed (x1, x2) batches from global step `step` on, epoch after epoch."""
    while True:
        epoch, offset = divmod(step, steps_per_epoch)
        batches = iter(distribute.distribute_batches(
            strategy, data.pretrain_dataset(source.train, cfg, epoch, offset)))
        for _ in range(offset, steps_per_epoch):
            try:
                yield next(batches)
            except tf.errors.InvalidArgumentError as e:  # a decode error deep in tf.data
                data.raise_if_unreadable(source.train, e)
            step += 1


def _log_scalars(writer, step, metrics, lr, images_per_sec):
    with writer.as_default(step=step):
        for k, v in metrics.items():
            tf.summary.scalar(f"train/{k}", v)
        tf.summary.scalar("train/learning_rate", lr)
        tf.summary.scalar("train/images_per_sec", images_per_sec)


def _log_images(writer, step, images, eps, normalize):
    """A few x, x_adv and the perturbation amplified to the full range (+eps white, -eps black)."""
    x = tf.clip_by_value(augment.denormalize(images["x"], normalize), 0.0, 1.0)
    x_adv = tf.clip_by_value(augment.denormalize(images["x_adv"], normalize), 0.0, 1.0)
    delta = (images["x_adv"] - images["x"]) / (2.0 * max(eps, 1e-12)) + 0.5
    with writer.as_default(step=step):
        tf.summary.image("adversarial/x", x, max_outputs=4)
        tf.summary.image("adversarial/x_adv", x_adv, max_outputs=4)
        tf.summary.image("adversarial/perturbation_amplified",
                         tf.clip_by_value(delta, 0.0, 1.0), max_outputs=4)
