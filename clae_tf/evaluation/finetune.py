"""Adversarial fine-tuning of a pretrained encoder into a classifier: ALF and AFF, beside SLF.

The three ways of the RobustSSL benchmark (Xu et al., "Enhancing adversarial contrastive
learning via adversarial invariant regularization", NeurIPS 2023, and its benchmark code) to
judge a self-supervised encoder by the robust classifier made from it:

  SLF  standard linear fine-tuning: a linear head on the frozen encoder, clean images. In clae-tf
       this is the linear probe of evaluate.py (results.json linear_top1 and robust_*), not
       repeated here.
  ALF  adversarial linear fine-tuning: a linear head on the frozen encoder (inference-mode BNs),
       trained on PGD examples of the whole classifier (encoder + head), in pixel space.
  AFF  adversarial full fine-tuning: encoder and head trained with TRADES (Zhang et al., ICML
       2019), from the pretrained weights.

Recipe followed: GodXuxilie/RobustSSL_Benchmark, Finetuning_Methods/Vanilla_Finetuning/
(vanilla_finetuning.py's defaults; utils.py: setup_hyperparameter's CIFAR-10 values for DynACL,
train_loop, pgd_attack, trades_loss), itself "modified from the code of DynACL"
(PKU-ML/DYNACL test_LF.py and test_AFF.py, the same values):

  both  SGD, momentum 0.9, weight decay 2e-4 added to the gradient (PyTorch's SGD, written out
        here: buffer b = 0.9 b + g + wd w, w -= lr b); lr x 0.1 at each boundary epoch
        (MultiStepLR); 25 epochs; the head (nn.Linear) zero-initialised; training images
        RandomCrop(32, padding=4) + RandomHorizontalFlip in [0, 1]; attacks in pixel space,
        L-inf eps 8/255, step 2/255, 10 steps, clipped to [0, 1]; the final model is evaluated
        (no selection on test).
  ALF   lr 0.01, batch 512, boundaries 10, 20; the encoder frozen in eval mode (running BN
        statistics); each batch replaced by PGD-10 on the cross-entropy of the current
        classifier from a uniform random start in the ball (pgd_attack).
  AFF   lr 0.1, batch 128, boundaries 15, 20; TRADES with beta 6:
          loss = CE(f(x), y) + beta * (1/B) sum_i KL(softmax f(x_i) || softmax f(x_adv_i)),
        the direction of TRADES' code (nn.KLDivLoss(log_softmax(f(x_adv)), softmax(f(x))),
        summed, over the batch size); f in train mode (batch statistics; x and x_adv in two
        forward passes), gradients through both terms; x_adv from x + 0.001 N(0, 1) by 10
        signed-gradient steps on the summed KL with f in eval mode and the clean softmax
        fixed (trades_loss, the benchmark's single-BN variant).

Differences, all deliberate: the head reads the run's --probe features (h, the pooled
representation as in the benchmark, for SimCLR and MoCo; z for Plain and UEL), so ALF and AFF
sit on the same features as SLF; the fine-tuning runs on the portable float32 copy of the clean
encoder (job/portable.py), whatever --precision, and AFF fine-tunes its clean BNs for both x and
x_adv (the benchmark's trades_loss_dual, for encoders pretrained with dual BNs, would keep a
second BN set for x_adv and export that one); TRADES' start is clipped to [0, 1]; the data are
the run's training split (--train_examples / --examples_per_class), the last partial batch
included as PyTorch's DataLoader does, in a stateless order of (seed, epoch) and with crops and
attack starts of (seed, step), so a resumed fine-tune sees the batches of one that never
stopped. The numbers: clean top-1 on every test image (top1), and robust.robust_accuracy with
the run's --robust_* suite on the --robust_examples subset, the very attacks SLF is judged by.

The CPU presets (flags/cifar10_small_alf.cfg, flags/cifar10_small_aff.cfg) scale the epochs and
the attack down; the flags --finetune_* and --trades_beta change any value of the recipe.
"""

import dataclasses
import json
import os
import time
import zlib
from typing import Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from clae_tf import ClaeError
from clae_tf.data import sources
from clae_tf.evaluation import robust
from clae_tf.evaluation.evaluate import epoch_order
from clae_tf.method import attacks
from clae_tf.runtime import files, signals
from clae_tf.runtime.config import Config

# The benchmark's per-fine-tune values (RobustSSL_Benchmark setup_hyperparameter, DynACL on
# CIFAR-10); each a flag's value when the flag is 0 / empty.
RECIPES = {"alf": dict(epochs=25, lr=0.01, batch_size=512, lr_boundaries=(10, 20)),
           "aff": dict(epochs=25, lr=0.1, batch_size=128, lr_boundaries=(15, 20))}
MOMENTUM = 0.9
LR_DROP = 0.1  # MultiStepLR's gamma
CROP_PAD = 4  # RandomCrop(size, padding=4)
TRADES_START_STD = 0.001  # x_adv = x + 0.001 N(0, 1), then the ascent
RECIPE_FILE = "recipe.json"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What one fine-tune does (the module docstring); from_config resolves the flags.

    eps and step_size are in 1/255 of the [0, 1] pixel range; beta is TRADES' (AFF only);
    feature is what the head reads (--probe); seed draws the order, crops and attack starts.
    """
    kind: str
    epochs: int
    lr: float
    lr_boundaries: Tuple[int, ...]
    batch_size: int
    weight_decay: float
    eps: float
    step_size: float
    attack_steps: int
    beta: Optional[float]
    feature: str
    seed: int

    @classmethod
    def from_config(cls, cfg: Config, kind: str) -> "Recipe":
        """The flags, 0 / empty ones replaced by RECIPES[kind]. Boundaries left empty with
        --finetune_epochs given fall at the recipe's fractions of the epochs (10 and 20 of 25 ->
        2 and 4 of 5)."""
        base = RECIPES[kind]
        epochs = cfg.finetune_epochs or base["epochs"]
        boundaries = tuple(cfg.finetune_lr_boundaries)
        if not boundaries:
            boundaries = tuple(sorted({max(1, round(b * epochs / base["epochs"]))
                                       for b in base["lr_boundaries"]}))
        return cls(kind=kind, epochs=epochs, lr=cfg.finetune_lr or base["lr"],
                   lr_boundaries=boundaries,
                   batch_size=cfg.finetune_batch_size or base["batch_size"],
                   weight_decay=cfg.finetune_weight_decay, eps=cfg.finetune_eps,
                   step_size=cfg.finetune_step_size, attack_steps=cfg.finetune_attack_steps,
                   beta=cfg.trades_beta if kind == "aff" else None, feature=cfg.probe,
                   seed=cfg.seed)

    def record(self) -> dict:
        """The recipe as JSON values (recipe.json, results.json <kind>.recipe)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def lr_at(self, epoch: int) -> float:
        """The learning rate of 0-based `epoch`: lr x 0.1 per boundary passed (MultiStepLR,
        stepped after each epoch: boundary 10 makes the 11th epoch, index 10, the first at
        lr / 10)."""
        return self.lr * LR_DROP ** sum(1 for b in self.lr_boundaries if epoch >= b)

    def steps_per_epoch(self, n: int) -> int:
        """Batches per epoch of n images, the last one partial (drop_last=False)."""
        return -(-n // self.batch_size)


def padded_crop_flip(x, seed, pad=CROP_PAD):
    """torchvision's RandomCrop(size, padding=pad) + RandomHorizontalFlip on a batch: each image
    zero-padded by `pad`, cropped back to its size at a uniform offset, flipped with p = 1/2.
    Stateless: a pure function of the shape-[2] `seed`.

    Args:
      x: float32 (B, S, S, C) images.
    """
    offset_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    b, size = tf.shape(x)[0], tf.shape(x)[1]
    padded = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    offsets = tf.random.stateless_uniform([b, 2], offset_seed, 0, 2 * pad + 1, tf.int32)
    rows = offsets[:, :1] + tf.range(size)[None]  # (B, S) rows of each padded image
    cols = offsets[:, 1:] + tf.range(size)[None]
    out = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)
    flip = tf.random.stateless_uniform([b], flip_seed) < 0.5
    return tf.where(flip[:, None, None, None], tf.reverse(out, [2]), out)


def trades_kl(logits_nat, logits_adv):
    """(B,) KL(softmax(logits_nat) || softmax(logits_adv)) per example, float32: TRADES'
    nn.KLDivLoss(log_softmax(adv), softmax(nat)), sum_c p_nat (log p_nat - log p_adv)."""
    log_nat = tf.nn.log_softmax(tf.cast(logits_nat, tf.float32))
    log_adv = tf.nn.log_softmax(tf.cast(logits_adv, tf.float32))
    return tf.reduce_sum(tf.exp(log_nat) * (log_nat - log_adv), axis=-1)


def trades_loss(logits_nat, logits_adv, labels, beta):
    """TRADES' outer loss: mean CE(logits_nat, y) + beta * mean KL(p_nat || p_adv); gradients
    flow through both logits (as TRADES' code, where softmax(f(x)) is not detached)."""
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels,
                                                        logits=tf.cast(logits_nat, tf.float32))
    return tf.reduce_mean(ce) + beta * tf.reduce_mean(trades_kl(logits_nat, logits_adv))


def trades_attack(logits_fn, x, eps, steps, step_size, seed):
    """TRADES' inner maximisation: from x + 0.001 N(0, 1), `steps` signed-gradient steps on
    sum_i KL(p(x_i) || p(x_adv_i)), p(x) fixed, projected into the L-inf ball and [0, 1]
    (attacks.linf_pgd; its input gradient in float32). eps and step_size in [0, 1] units.

    Args:
      logits_fn: images -> logits, inference mode (stateless).
      x: float32 (B, ...) clean images in [0, 1]; seed: shape-[2] seed of the start.
    """
    p_nat = tf.stop_gradient(tf.cast(logits_fn(x), tf.float32))
    start = x + TRADES_START_STD * tf.random.stateless_normal(tf.shape(x), seed, dtype=x.dtype)
    return attacks.linf_pgd(lambda x_adv: tf.reduce_sum(trades_kl(p_nat, logits_fn(x_adv))),
                            x, eps, steps, step_size, x_start=start, clip_min=0.0,
                            clip_max=1.0, unroll=False)


def _clone(encoder):
    """A copy of the functional encoder with its weights (AFF trains the copy: the caller's
    encoder stays the pretrained one)."""
    copy = keras.models.clone_model(encoder)
    copy.set_weights(encoder.get_weights())
    return copy


class Tuner:
    """One fine-tune's state: the encoder it trains (AFF: a copy) or reads (ALF), the head, the
    SGD momentum buffers, the step, and their checkpoint in `directory`.

    Args:
      recipe: the Recipe; encoder: images in [0, 1] -> {"h", "z"} (portable.build_encoder, float32;
        left unchanged); num_classes: the head's outputs; directory: the checkpoints' folder.
    """

    def __init__(self, recipe: Recipe, encoder, num_classes: int, directory: str):
        self.recipe, self.directory = recipe, directory
        self.encoder = _clone(encoder) if recipe.kind == "aff" else encoder
        size = encoder.input_shape[1:]
        dim = encoder.output[recipe.feature].shape[-1]
        self.head = keras.layers.Dense(num_classes, dtype="float32", name="head",
                                       kernel_initializer="zeros", bias_initializer="zeros")
        self.head.build((None, dim))
        self.variables = list(self.head.trainable_variables)
        if recipe.kind == "aff":  # the encoder's weights the features depend on
            with tf.GradientTape() as tape:
                out = self.encoder(tf.zeros((2,) + tuple(size)), training=False)[recipe.feature]
            grads = tape.gradient(out, self.encoder.trainable_variables)
            self.variables = [v for v, g in zip(self.encoder.trainable_variables, grads)
                              if g is not None] + self.variables
        self.buffers = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.variables]
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        saved = {v.path: v for v in self.head.variables}
        if recipe.kind == "aff":  # every encoder variable: BN statistics too
            saved.update({f"encoder/{v.path}": v for v in self.encoder.variables})
        self.checkpoint = tf.train.Checkpoint(
            variables=saved, momentum={v.path: b for v, b in zip(self.variables, self.buffers)},
            step=self.step)
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=2)
        self._train_step = None

    def logits(self, images01, training=False):
        """images in [0, 1] -> float32 logits (inference mode unless `training`)."""
        features = self.encoder(images01, training=training)[self.recipe.feature]
        return tf.cast(self.head(tf.cast(features, tf.float32)), tf.float32)

    def restore(self) -> int:
        """The newest checkpoint in the directory, if any; returns the step reached."""
        path = self.manager.latest_checkpoint
        if path is not None:
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except (AssertionError, ValueError, tf.errors.OpError) as e:
                raise ClaeError(f"--workdir: the {self.recipe.kind.upper()} checkpoint {path} "
                                f"cannot be restored ({str(e).splitlines()[0][:120]}); "
                                f"--finetune_restart starts it over") from None
        return int(self.step.numpy())

    def save(self):
        """ckpt-<step>, whole: a stop request waits for it (signals.held)."""
        step = int(self.step.numpy())
        with signals.held(), files.writing(os.path.join(self.directory, f"ckpt-{step}"),
                                           f"the {self.recipe.kind.upper()} checkpoint"):
            self.manager.save(checkpoint_number=step)

    def _sgd(self, grads, lr):
        """PyTorch's SGD with momentum and coupled weight decay, for self.variables."""
        for v, g, b in zip(self.variables, grads, self.buffers):
            g = tf.cast(g, tf.float32) + self.recipe.weight_decay * v
            b.assign(MOMENTUM * b + g)
            v.assign_sub(lr * b)

    def inputs(self, images, labels):
        """The batch at the current step as trained on: (x, x_adv), float32 in [0, 1].

        x is the padded crop and flip of the uint8 `images`; x_adv the recipe's attack on x
        against the classifier as it is now (ALF: PGD on the cross-entropy from a random start;
        AFF: trades_attack), eps and step in pixel units. The draws are of (seed, kind, step).
        """
        r = self.recipe
        base = tf.constant([r.seed, zlib.crc32(r.kind.encode()) & 0x7FFFFFFF], tf.int64)
        seed = tf.random.experimental.stateless_fold_in(base, self.step)
        crop_seed, attack_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        x = padded_crop_flip(tf.cast(images, tf.float32) / 255.0, crop_seed)
        eps, step_size = r.eps / 255.0, r.step_size / 255.0
        if r.kind == "alf":
            x_adv = attacks.pgd_classifier(self.logits, x, labels, eps, r.attack_steps,
                                           step_size, random_start=True, seed=attack_seed,
                                           clip_min=0.0, clip_max=1.0)
        else:
            x_adv = trades_attack(self.logits, x, eps, r.attack_steps, step_size, attack_seed)
        return x, x_adv

    def _build_step(self, image_shape):
        r = self.recipe

        def train_step(images, labels, lr):
            x, x_adv = self.inputs(images, labels)
            with tf.GradientTape() as tape:
                if r.kind == "alf":  # the frozen encoder: no gradient through it
                    features = tf.stop_gradient(self.encoder(x_adv, training=False)[r.feature])
                    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                        labels=labels, logits=self.head(tf.cast(features, tf.float32))))
                else:
                    loss = trades_loss(self.logits(x, training=True),
                                       self.logits(x_adv, training=True), labels, r.beta)
            self._sgd(tape.gradient(loss, self.variables), lr)
            self.step.assign_add(1)
            return loss

        return tf.function(train_step, input_signature=[
            tf.TensorSpec((None,) + tuple(image_shape), tf.uint8),
            tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.float32)])

    def train(self, images: np.ndarray, labels: np.ndarray, log=print,
              resume: str = "run the same command to resume") -> dict:
        """Fine-tunes from the step reached to the recipe's end, one compiled call per batch,
        a checkpoint at each epoch's end.

        A stop request (Ctrl-C, SIGTERM) is taken between batches (signals.check, as the
        pretraining loop: once the first call, which traces, has run, the watchdog waits for the
        next batch's end, signals.patient): the step reached is saved and a ClaeError says where
        and how to resume.

        Args:
          images: uint8 (N, S, S, 3) training images; labels: int (N,).
          log: takes a line per epoch; resume: how to resume, the end of a stop's error.
        Returns:
          {"seconds", "steps", "final_loss"} of this process's training.
        """
        r, n = self.recipe, len(images)
        per_epoch = r.steps_per_epoch(n)
        total = per_epoch * r.epochs
        if self._train_step is None:
            self._train_step = self._build_step(images.shape[1:])
        labels = np.asarray(labels, np.int32)
        start, t0, loss = int(self.step.numpy()), time.time(), None
        name = r.kind.upper()
        try:
            with signals.loop_of_calls() as first_call_done:
                while int(self.step.numpy()) < total:
                    signals.check()
                    step = int(self.step.numpy())
                    epoch, index = divmod(step, per_epoch)
                    order = epoch_order(n, r.seed, epoch).numpy()
                    rows = order[index * r.batch_size:(index + 1) * r.batch_size]
                    # The update and its step count are one compiled call: a stop between calls
                    # always finds them together.
                    loss = self._train_step(tf.constant(images[rows]), tf.constant(labels[rows]),
                                            tf.constant(r.lr_at(epoch), tf.float32))
                    first_call_done()
                    if index == per_epoch - 1:
                        self.save()
                        log(f"{name} epoch {epoch + 1}/{r.epochs}: loss {float(loss):.4f}, lr "
                            f"{r.lr_at(epoch):g} ({time.time() - t0:.0f} s)")
        except KeyboardInterrupt as e:
            signals.stopping()
            self.save()
            step = int(self.step.numpy())
            raise ClaeError(f"{signals.describe(e)} at {name} step {step} of {total} (epoch "
                            f"{step // per_epoch + 1} of {r.epochs}); checkpoint saved in "
                            f"{self.directory}; {resume}") from None
        return {"seconds": time.time() - t0, "steps": int(self.step.numpy()) - start,
                "final_loss": None if loss is None else float(loss)}

    def probe(self) -> dict:
        """The head as a probe for export.export_probe: {"kernel", "bias", "feature"}."""
        kernel, bias = (np.asarray(w, np.float32) for w in self.head.get_weights())
        return {"kernel": kernel, "bias": bias, "feature": self.recipe.feature}


def prepare(directory: str, recipe: Recipe, encoder_step: int, restart: bool):
    """Readies `directory` for a fine-tune of `recipe` on the encoder of `encoder_step`: a
    checkpoint of this recipe and encoder resumes; --finetune_restart, or one of another encoder
    step (the run trained on since), starts over; one of other flags is refused (ClaeError
    naming them). Returns a note (one line) on what was discarded, or None."""
    path = os.path.join(directory, RECIPE_FILE)
    saved = files.read_json(path) if os.path.isdir(directory) else None
    note = None
    if saved is not None and not restart:
        was, now = saved.get("recipe", {}), recipe.record()
        if saved.get("encoder_step") != encoder_step:
            note = (f"note: started {recipe.kind.upper()} over: {directory} held a fine-tune of "
                    f"the encoder of step {saved.get('encoder_step')}, not {encoder_step}")
            restart = True
        else:
            changed = [f"{_flag_of(k)}={_text(was.get(k))} (now {_text(v)})"
                       for k, v in now.items() if was.get(k) != v]
            if changed:
                raise ClaeError(f"{changed[0].split('=')[0]}: {directory} holds an "
                                f"{recipe.kind.upper()} fine-tune made with "
                                f"{', '.join(changed)}; use the same values to resume it, or "
                                f"--finetune_restart to start over")
    if restart and os.path.isdir(directory):
        with signals.held():
            files.remove_path(directory)
    if not os.path.exists(path):
        os.makedirs(directory, exist_ok=True)
        files.write_atomic(path, json.dumps({"encoder_step": encoder_step,
                                             "recipe": recipe.record()}, indent=2),
                           f"the {recipe.kind.upper()} recipe")
    return note


def _flag_of(field: str) -> str:
    """The flag that sets a Recipe field."""
    return {"beta": "--trades_beta", "seed": "--seed", "feature": "--probe"}.get(
        field, f"--finetune_{field}")


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def top1(logits_fn, images: np.ndarray, labels: np.ndarray, batch_size: int) -> float:
    """Clean accuracy of logits_fn on uint8 images, in batches (a safe point between them)."""
    fn = tf.function(logits_fn, input_signature=[
        tf.TensorSpec((None,) + images.shape[1:], tf.float32)])
    correct = 0
    for i in range(0, len(images), batch_size):
        signals.check()
        x = tf.constant(images[i:i + batch_size].astype(np.float32) / 255.0)
        correct += int(np.sum(np.argmax(fn(x).numpy(), -1) == labels[i:i + batch_size]))
    return correct / max(len(images), 1)


def evaluate(cfg: Config, logits_fn, test: sources.Split, num_classes: int) -> dict:
    """The fine-tuned classifier's numbers: top1 on every test image, and robust.robust_accuracy
    (the run's --robust_* suite, as SLF's) on the --robust_examples subset, under the same
    results.json names as SLF's robust entries (robust_clean_top1, robust_top1, ...)."""
    t = time.time()
    images, labels = sources.read_images(test)
    out = {"top1": top1(logits_fn, images, labels.astype(np.int32), cfg.eval_batch_size),
           "test_examples": int(len(labels))}
    if robust.Suite.from_config(cfg).runs():
        out.update(robust.evaluate_classifier(cfg, logits_fn, test, num_classes))
    out["eval_seconds"] = time.time() - t
    return out

