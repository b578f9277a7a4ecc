"""The pretraining optimizer and learning-rate schedule, as close to the reference's PyTorch as
Keras allows."""

import keras

from clae_tf.runtime.config import Config


def build_optimizer(cfg: Config, steps_per_epoch: int, total_steps: int):
    """Adam or SGD with the --lr_schedule of cfg (float16: with dynamic loss scaling).

    KNOWN DIFFERENCE (docs/method.md, "Differences from the reference code"): Keras' SGD keeps the
    learning rate inside its momentum (v = m v - lr g; w += v), PyTorch's applies it to the
    buffer (b = m b + g; w -= lr b). They agree while lr is constant; after a step-schedule drop
    Keras goes on applying the old lr's share of the momentum for ~1/(1 - m) steps
    (tests/train_test.py, a strict xfail). Keras' SGD stays: a PyTorch-style SGD subclass
    matches the literal step on one device but fails the 2 -> 1 -> 2 replica restore test
    (tests/distributed_test.py), which Keras' own optimizers pass; the cause is not known.

    Keras calls the schedule with the number of steps done, i.e. the 0-based index of the
    step about to run. The reference's step schedule changes lr at the START of epoch b, so
    the step with index b * steps_per_epoch already runs at the new rate:
    PiecewiseConstantDecay switches for index > boundary, hence boundary = b * spe - 1.
    """
    lr = cfg.learning_rate
    if cfg.lr_schedule == "step":
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            [b * steps_per_epoch - 1 for b in cfg.lr_boundaries],
            [cfg.learning_rate] + [cfg.learning_rate * f for f in cfg.lr_factors])
    elif cfg.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, max(1, total_steps))
    optimizer = (keras.optimizers.Adam(lr) if cfg.optimizer == "adam" else
                 keras.optimizers.SGD(lr, momentum=cfg.momentum))
    if cfg.precision == "fp16":
        # Dynamic loss scaling: float16 gradients underflow without it. A step whose scaled
        # gradients overflow is skipped and the scale halved (--precision is a checkpoint flag:
        # the scale and its counter are in the checkpoint).
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
