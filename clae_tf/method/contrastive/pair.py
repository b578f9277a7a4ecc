"""SimCLR, Plain and UEL: both views go through the trained encoder and the loss is L(z1, z2).

CLAE puts z(x_adv) where z2 goes: L(z1, z(x_adv)) (docs/method.md, "The CLAE step", steps 3-4), so
x_adv is the positive of its own view 1 and, for every other image, a negative (Plain: a
classifier weight).
"""

from clae_tf.method.contrastive.base import Method
from clae_tf.runtime.distribute import gather


class PairMethod(Method):
    """A method whose whole loss is `pair_loss(z1, z2, temperature)` over the global batch."""

    def __init__(self, pair_loss, temperature):
        self.pair_loss = pair_loss
        self.temperature = temperature

    def clean_loss(self, model, consts, x1, x2):
        del consts
        _, z1 = model(x1, training=True)
        _, z2 = model(x2, training=True)
        return self._loss(z1, z2), z1

    def adversarial_loss(self, consts, anchor, z):
        del consts
        return self._loss(anchor, z)

    def _loss(self, z1, z2):
        return self.pair_loss(gather(z1), gather(z2), self.temperature)  # the global batch
