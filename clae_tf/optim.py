"""The pretraining optimizer and learning-rate schedule, as the reference's PyTorch computes them."""

import keras

from clae_tf.config import Config


class TorchSGD(keras.optimizers.Optimizer):
    """PyTorch's SGD with momentum: b = m * b + g; w -= lr * b.

    Keras' SGD keeps the learning rate inside its momentum (v = m * v - lr * g; w += v). The two
    agree while lr is constant, but after a step-schedule drop Keras goes on applying the old
    lr's momentum for ~1/(1 - m) steps, where PyTorch scales the whole buffer by the new lr.
    Weight decay is added to g by the train step (coupled L2, as PyTorch's weight_decay).
    """

    def __init__(self, learning_rate, momentum=0.9, name="torch_sgd", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = momentum

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = [self.add_variable_from_reference(v, "momentum") for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        lr = keras.ops.cast(learning_rate, variable.dtype)
        g = keras.ops.cast(gradient, variable.dtype)
        b = self.momentums[self._get_variable_index(variable)]
        self.assign(b, self.momentum * b + g)
        self.assign_sub(variable, lr * b)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum}


def build_optimizer(cfg: Config, steps_per_epoch: int, total_steps: int):
    """Adam or (PyTorch) SGD with the --lr_schedule of cfg.

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
