"""The interface between a contrastive method and the CLAE train step (train.make_train_step).

A method answers four questions for the step, and may keep state between steps:

  prepare(x1, x2)                    -> consts   per replica, outside the tape: what the losses
                                                 need that receives no gradient (MoCo: the keys)
  clean_loss(model, consts, x1, x2)  -> ((loss, logits, labels), anchor)
                                                 per replica, inside the tape: the method's loss
                                                 on the two clean views, and the embedding the
                                                 adversarial view is paired with (SimCLR: z1)
  adversarial_loss(consts, anchor, z) -> (loss, logits, labels)
                                                 the same batch-wide loss with z in the place the
                                                 adversarial view takes; the attack maximises it
                                                 (with anchor from the adversarial BN path) and the
                                                 step adds alpha times it (with the clean anchor)
  step_outputs(consts) -> nest of tensors        what after_step needs from the replicas

and two hooks in CROSS-replica context, around strategy.run of the replica step:

  before_step()                                  (MoCo: momentum update of the key encoder)
  after_step(outputs)                            outputs: step_outputs of the first replica
                                                 (MoCo: enqueue the gathered keys)

checkpoint_items() names the variables the method adds to a checkpoint (MoCo: key encoder,
queue). Losses see the whole global batch: a method gathers embeddings over replicas
(distribute.gather) itself, so every replica computes the same loss.

Adding a method: one module in this package implementing Method and one entry in
methods.BUILDERS (a loss of the two views alone needs neither: a function in losses.py and an
entry in losses.PAIR_LOSSES, which BUILDERS turns into a PairMethod); then its name in
config.METHODS (the --method choices), one row of config.METHOD_DEFAULTS, one preset in flags/,
and its loss and where x_adv goes in docs/method.md.
"""


class Method:
    """Base class: a method with no state and no hooks (override what you need)."""

    def prepare(self, x1, x2):
        del x1, x2
        return {}

    def clean_loss(self, model, consts, x1, x2):
        raise NotImplementedError

    def adversarial_loss(self, consts, anchor, z):
        raise NotImplementedError

    def step_outputs(self, consts):
        del consts
        return {}

    def before_step(self):
        pass

    def after_step(self, outputs):
        del outputs

    def checkpoint_items(self):
        return {}
