"""clae-tf: Contrastive Learning with Adversarial Examples (Ho & Vasconcelos, NeurIPS 2020) in TF/Keras."""

__version__ = "0.1.0"


class ClaeError(Exception):
    """A problem the user can fix (bad flag, missing file, offline dataset...).

    run.py prints its message as one line and exits non-zero, without a traceback.
    """
