"""Contrastive methods behind one interface (methods/base.py): SimCLR, Plain, UEL, MoCo v2."""

from clae_tf.method import losses
from clae_tf.method.contrastive.base import Method
from clae_tf.method.contrastive.moco import MoCo
from clae_tf.method.contrastive.pair import PairMethod
from clae_tf.runtime.config import Config

# --method -> builder(cfg, model). Methods with state (MoCo) are built inside strategy.scope().
BUILDERS = {
    **{name: (lambda cfg, model, pair_loss=pair_loss: PairMethod(pair_loss, cfg.temperature))
       for name, pair_loss in losses.PAIR_LOSSES.items()},  # SimCLR, Plain, UEL
    "moco": MoCo,
}


def build(cfg: Config, model) -> Method:
    """The Method of --method for the trained `model`."""
    return BUILDERS[cfg.method](cfg, model)
