"""Adversarial examples as pure functions (no flags, no distribution strategy): the CLAE training
attack and robust evaluation. train.training_attack picks and seeds the training one from the flags.

Map of the attacks, their modules and sources:

  - gradient.py, `fgsm` / `pgd`: the CLAE training attack (docs/method.md, "The CLAE step",
    step 3): signed gradient steps on view 1 against the batch-wide contrastive loss of an
    embedding function. `fgsm_classifier` (Goodfellow et al., ICLR 2015) and `pgd_classifier`
    (Madry et al., ICLR 2018), L-inf or L2, on a classifier's cross-entropy.
  - auto_pgd.py, `apgd`: Auto-PGD, Algorithm 1 of Croce & Hein, "Reliable evaluation of
    adversarial robustness with an ensemble of diverse parameter-free attacks" (ICML 2020),
    L-inf or L2, on `ce_loss`, `dlr_loss` or `dlr_targeted_loss` (logit_losses.py, the same
    paper, Sec. 4); `top_targets` picks APGD-T's target classes. AutoAttack = APGD-CE, APGD-T,
    (FAB-T,) Square, each on the survivors.
  - fab.py, `fab_t`: FAB-T, the targeted Fast Adaptive Boundary attack, L-inf or L2: Algorithm 1
    of Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary
    attack" (ICML 2020), with its projection onto a hyperplane within the box, aimed at the
    top_targets classes in turn as AutoAttack's FAB-T; a minimal-distortion attack, counted
    within a radius eps.
  - square.py, `square_linf`: the L-inf Square attack, Andriushchenko et al., "Square Attack: a
    query-efficient black-box adversarial attack via random search" (ECCV 2020), Algorithm 1
    and its L-inf proposal; score-based, never a gradient.
  - engine.py: the refill engine the evaluation attacks (`apgd`, `fab_t`, `square_linf`,
    `pgd_until_fooled`) run on: per-image state machines in a fixed number of slots, a
    finished image's slot taken by the next waiting one, every random number from the image's
    own stream (common.image_uniform), so an image's result does not depend on its batch.
  - common.py: the balls, random starts, per-image random streams and per-example
    bookkeeping they share.

The evaluation attacks loop with tf.while_loop: one trace per call site, whatever the number of
iterations, and no host round trip inside the loop.
Callers use the names below (`attacks.apgd`, ...), not the modules.
"""

from clae_tf.method.attacks.auto_pgd import APGD_LOSSES, apgd, apgd_checkpoints, top_targets
from clae_tf.method.attacks.common import NORMS, uniform_start
from clae_tf.method.attacks.fab import (
                                      FAB_ALPHA_MAX,
                                      FAB_BETA,
                                      FAB_ETA,
                                      FAB_STEPS,
                                      FAB_TARGETS,
                                      fab_t,
)
from clae_tf.method.attacks.gradient import (
                                      auto_step_size,
                                      classifier_objective,
                                      fgsm,
                                      fgsm_classifier,
                                      linf_pgd,
                                      pgd,
                                      pgd_classifier,
                                      pgd_until_fooled,
)
from clae_tf.method.attacks.logit_losses import ce_loss, dlr_loss, dlr_targeted_loss, margin
from clae_tf.method.attacks.square import SQUARE_DRAWS, SQUARE_HALVINGS, square_linf, square_p

__all__ = ["APGD_LOSSES", "FAB_ALPHA_MAX", "FAB_BETA", "FAB_ETA", "FAB_STEPS", "FAB_TARGETS",
           "NORMS", "SQUARE_DRAWS", "SQUARE_HALVINGS", "apgd", "apgd_checkpoints",
           "auto_step_size", "ce_loss", "classifier_objective", "dlr_loss", "dlr_targeted_loss",
           "fab_t", "fgsm", "fgsm_classifier", "linf_pgd", "margin", "pgd", "pgd_classifier",
           "pgd_until_fooled", "square_linf", "square_p", "top_targets", "uniform_start"]
