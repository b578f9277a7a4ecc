"""The method of the paper (docs/method.md maps each equation to its line here):

    models.py        ResNet encoder with dual batch norms (clean and adversarial), projection head
    losses.py        the batch-wide contrastive losses (NT-Xent, Plain, UEL, MoCo's InfoNCE)
    contrastive/     SimCLR, Plain, UEL and MoCo v2 behind one interface (contrastive/base.py)
    attacks/         pure attack functions: the training FGSM/PGD on the batch-wide loss, and
                     the evaluation attacks (PGD, APGD, Square) on a classifier
    train_step.py    the CLAE step: x_adv against the batch-wide loss, then clean + alpha * adv
    builders.py, optim.py   the model and optimizer of a Config

Imports runtime/ only: no data pipeline, no files.
"""
