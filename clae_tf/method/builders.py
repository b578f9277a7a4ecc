"""Builds models from a Config (models.py itself takes plain arguments only)."""

from typing import Optional

import tensorflow as tf

from clae_tf.method.models import ContrastiveModel
from clae_tf.runtime.config import Config


def build_model(cfg: Config, name: str = "clae_model", adversarial: Optional[bool] = None,
                sync_bn: Optional[bool] = None) -> ContrastiveModel:
    """The model of `cfg`, with its variables created (both BN paths when adversarial).

    adversarial / sync_bn override cfg's (the MoCo key encoder and the export have no
    adversarial BNs; the export is single-device).
    """
    adversarial = cfg.adversarial if adversarial is None else adversarial
    model = ContrastiveModel(arch=cfg.arch, stem=cfg.stem, width=cfg.width, head=cfg.head,
                             proj_hidden=cfg.proj_hidden, proj_dim=cfg.proj_dim,
                             bn_momentum=cfg.bn_momentum, bn_adv_momentum=cfg.bn_adv_momentum,
                             dual_bn=adversarial,
                             sync_bn=cfg.sync_bn if sync_bn is None else sync_bn, name=name)
    dummy = tf.zeros([2, cfg.image_size, cfg.image_size, 3])
    model(dummy, training=False)
    if adversarial:
        model(dummy, training=False, adversarial=True)
    return model
