"""clae-tf: Contrastive Learning with Adversarial Examples (Ho & Vasconcelos, NeurIPS 2020) in
TF/Keras.

The package is in layers; a module imports only from its own layer and the layers below it
(tests/layers_test.py holds the code to this):

    job/         running a job: the phases of run.py (app), the train loop, checkpoints, exports
    evaluation/  kNN, linear probe, robust suite, gradient-masking checks, online monitoring
    method/      the paper: encoder with dual BNs, losses, contrastive methods, attacks, the
                 CLAE train step (method/train_step.py)
    data/        image sources, augmentations (the views), the input streams
    runtime/     flags (config), the workdir and its files, signals, progress, devices

data/ and method/ stand side by side: neither imports the other.
"""

__version__ = "0.1.0"


class ClaeError(Exception):
    """A problem the user can fix (bad flag, missing file, offline dataset...).

    run.py prints its message as one line and exits non-zero, without a traceback.
    """
