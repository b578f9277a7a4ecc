"""Flags and the frozen Config built from them.

This is the ONLY module that imports absl.flags: every other module takes a Config (or plain
arguments), so everything can be built in a test without parsing argv.

Each flag is declared once, as a field of Config: its default, its --help text, its allowed
values (an enum flag) and whether its default means "the method's value" (auto) all sit on that
field (`_flag` below); define_flags, from_flags and the method defaults are derived from them.
"""

import dataclasses
import difflib
import functools
import os
import typing
from typing import Optional, Tuple

from absl import flags

from clae_tf import ClaeError

METHODS = ("simclr", "plain", "uel", "moco")
ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50")

# Flags that decide the shape of what a checkpoint holds: resuming with other values is an error.
CHECKPOINT_FLAGS = ("method", "adversarial", "arch", "stem", "width", "head", "proj_hidden",
                    "proj_dim", "optimizer", "image_size", "sync_bn", "precision", "queue_size")
# Flags that decide which batches a run trains on: resuming training with other values would
# silently continue on other data (--mode=eval may evaluate on another dataset).
RESUME_DATA_FLAGS = ("dataset", "train_examples", "examples_per_class", "batch_size", "seed")
# Flags that say which data an evaluation runs on: --mode=eval with any of them other than in
# the run's flags.cfg evaluates on other data, and its results and probe go to files named after
# that data (workdir.py), never over the run's own.
DATA_FLAGS = ("dataset", "data_dir", "train_examples", "examples_per_class")
# What an evaluation records with its results (results*.json "eval_flags"): its data and its own
# settings. Evaluating (or exporting) never rewrites flags.cfg, the record of the training.
EVAL_FLAGS = DATA_FLAGS + ("knn_k", "knn_sigma", "probe", "linear_epochs", "linear_lr",
                           "linear_batch_size", "robust_attacks", "robust_eps", "robust_l2_eps",
                           "robust_examples", "robust_apgd_steps", "robust_targets",
                           "robust_square_queries", "robust_checks")

# Each method's paper settings (docs/method.md, "Reference hyper-parameters"; MoCo v2 at CIFAR
# scale): one row per method, one entry per auto flag. A flag left at its auto default (auto, 0,
# or -1 for weight_decay) takes the method's value, so `--method=uel` alone trains UEL as
# published; any flag given explicitly wins. lr_boundaries/lr_factors come only with a step
# schedule.
_STEP = dict(lr_schedule="step", lr_boundaries=(120, 160, 200), lr_factors=(0.1, 0.05, 0.01))
METHOD_DEFAULTS = {
    # NT-Xent; MLP head 512-512-64 (x width); Adam 3e-4; inputs in [-1, 1].
    "simclr": dict(temperature=0.5, head="mlp", proj_dim=64, augment="simclr", normalize="half",
                   optimizer="adam", learning_rate=3e-4, weight_decay=0.0, lr_schedule="constant",
                   probe="h", linear_batch_size=256),
    # Batch instance classification and UEL: a linear 128-d head, CIFAR mean/std, SGD with steps,
    # and both kNN and the linear probe on the 128-d embedding.
    "plain": dict(temperature=0.1, head="linear", proj_dim=128, augment="uel", normalize="cifar",
                  optimizer="sgd", learning_rate=0.03, weight_decay=5e-4, probe="z",
                  linear_batch_size=128, **_STEP),
    "uel": dict(temperature=0.1, head="linear", proj_dim=128, augment="uel", normalize="cifar",
                optimizer="sgd", learning_rate=0.03, weight_decay=5e-4, probe="z",
                linear_batch_size=128, **_STEP),
    # MoCo v2 (Chen et al. 2020) at CIFAR scale: MLP head to 128, temperature 0.2, its
    # augmentations without the blur (32-pixel images), SGD 0.06 + cosine, wd 5e-4.
    "moco": dict(temperature=0.2, head="mlp", proj_dim=128, augment="moco", normalize="cifar",
                 optimizer="sgd", learning_rate=0.06, weight_decay=5e-4, lr_schedule="cosine",
                 probe="h", linear_batch_size=256),
}
# The step schedule's boundaries and factors: taken from the method's row together, or not at all.
_STEP_PAIR = ("lr_boundaries", "lr_factors")
# Robust evaluation (robust.py): the attacks --robust_attacks names, and its suites, which expand
# in place (docs/robustness.md). autoattack is AutoAttack's version='standard' (Croce & Hein
# 2020), as fra31/auto-attack's autoattack/autoattack.py sets it (AutoAttack.__init__ and
# set_version('standard'), L-inf and L2): apgd-ce (1 restart, 100 iterations), apgd-t (9 target
# classes, 1 restart, 100 iterations each), fab-t (9 target classes, 1 restart, 100 iterations
# each), square (5,000 queries, p_init 0.8), in that order. fast is the same minus FAB-T at the
# budget flags' (smaller) defaults: AutoAttack's attacks, not AutoAttack's numbers.
ROBUST_ATTACKS = ("pgd20", "fgsm", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
ROBUST_SUITES = {"autoattack": ("apgd-ce", "apgd-t", "fab-t", "square"),
                 "fast": ("apgd-ce", "apgd-t", "square"), "quick": ("pgd20", "fgsm")}
# What the budget flags stand for at 0, their default: {flag: (autoattack's, every other
# chain's)}. autoattack's are fixed: another explicit value is refused (_check_robust), so that
# a chain with autoattack in it always runs AutoAttack's standard budget. The others are a third
# of the targets and a fifth of the queries, so that a CPU evaluates 1,000 images in minutes,
# not hours (docs/robustness.md says what the smaller budget costs).
ROBUST_BUDGETS = {"robust_apgd_steps": (100, 100), "robust_targets": (9, 3),
                  "robust_square_queries": (5000, 1000)}
# The most --robust_square_queries accepted: 20x AutoAttack's standard 5,000. Square's cost
# grows linearly with its queries (one forward pass of every standing image per query), and on a
# robust model most images use the whole budget: 100,000 queries on 1,000 images are 10^8
# forward passes, hours on a GPU and days on a CPU. A bound refuses a typo (10^9) at once, where
# an estimate of the time would first need a timing of the model; a larger budget adds little
# (docs/robustness.md: 5,000 queries found nothing that 1,000 missed).
MAX_SQUARE_QUERIES = 100_000
# --finetune: the adversarial fine-tunes of --mode=finetune (evaluation/finetune.py), and the
# flags of their recipe (recorded with their results, results.json "alf" / "aff", not in flags.cfg).
FINETUNE_KINDS = ("alf", "aff")
FINETUNE_FLAGS = ("finetune", "finetune_epochs", "finetune_lr", "finetune_lr_boundaries",
                  "finetune_batch_size", "finetune_weight_decay", "finetune_eps",
                  "finetune_step_size", "finetune_attack_steps", "trades_beta", "finetune_restart")
# Not written to a run's flags.cfg: they say what to do with the run, not what the run is.
_NOT_RECORDED = ("mode", "virtual_cpus") + FINETUNE_FLAGS


# --normalize: (mean, std) per RGB channel; --eps is in the units these produce. The one table
# (augment.normalize applies it); here because validation must not import TensorFlow.
NORMALIZATIONS = {
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # SimCLR reference: inputs in [-1, 1]
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),  # Plain/UEL reference
    # Every method of the reference on Tiny-ImageNet (training and test transforms).
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _flag(default, help, choices=None, auto=False):
    """One flag, declared as a Config field.

    Args:
      default: the flag's default (also Config's).
      help: its --help text.
      choices: the allowed values (an enum flag), or None.
      auto: True if the default stands for the method's value (METHOD_DEFAULTS).
    Returns:
      A dataclasses.field carrying help, choices and auto in its metadata.
    """
    return dataclasses.field(default=default,
                             metadata={"help": help, "choices": choices, "auto": auto})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs. Defaults are the small offline run of `python run.py`."""
    mode: str = _flag("train", "train (then evaluate and export), eval, export or finetune "
                      "(--finetune, of the run in --workdir).",
                      choices=("train", "eval", "export", "finetune"))
    workdir: str = _flag("", "Where checkpoints, TensorBoard events, results.json and the "
                         "SavedModel go. Re-running the same command on the same workdir resumes. "
                         "Default runs/<dataset>_<method>[_clae]_seed<seed>.")
    seed: int = _flag(0, "Seed for weights, shuffling and augmentation.")
    # Method.
    method: str = _flag("simclr", "Contrastive method.", choices=METHODS)
    adversarial: bool = _flag(False, "Add CLAE: an FGSM adversarial view as an extra positive, "
                              "with its own BNs.")
    temperature: float = _flag(0.0, "Contrastive loss temperature.", auto=True)
    eps: float = _flag(0.03, "FGSM step size in normalised-input units (0.03 ~ 3.8/255 with "
                       "--normalize=half, ~1.5/255 with cifar).")
    alpha: float = _flag(1.0, "Weight of the adversarial loss: L = L_clean + alpha * L_adv.")
    attack: str = _flag("fgsm", "Training attack: fgsm (the paper's: one step of --eps) or pgd "
                        "(--attack_steps steps of --attack_step_size in the --eps ball, against "
                        "the same batch-wide loss through the adversarial BNs).",
                        choices=("fgsm", "pgd"))
    attack_steps: int = _flag(3, "--attack=pgd: number of steps.")
    attack_step_size: float = _flag(0.0, "--attack=pgd: step size in normalised-input units (as "
                                    "--eps); 0: 2.5 * eps / steps (Madry et al.).")
    attack_random_start: bool = _flag(False, "--attack=pgd: start from a uniform random point of "
                                      "the eps-ball.")
    # Model.
    arch: str = _flag("resnet18", "Encoder (resnet10 is a small one for tests).", choices=ARCHS)
    stem: str = _flag("cifar", "cifar: 3x3 conv, no max-pool; imagenet: 7x7/2 conv and 3x3/2 "
                      "max-pool.", choices=("cifar", "imagenet"))
    width: float = _flag(0.25, "Channel width multiplier (0.25 -> 16-32-64-128 for ResNet-18).")
    head: str = _flag("auto", "Projection head: mlp (h -> hidden -> ReLU -> z) or linear (h -> z).",
                      choices=("auto", "mlp", "linear"), auto=True)
    proj_hidden: int = _flag(0, "Projection head hidden units; 0 -> the representation's width "
                             "(512 for ResNet-18 x1).")
    proj_dim: int = _flag(0, "Projection (z) dimension.", auto=True)
    queue_size: int = _flag(4096, "MoCo: number of past keys kept as negatives.")
    key_momentum: float = _flag(0.999, "MoCo: momentum of the key encoder's parameter update "
                                "(key = m * key + (1 - m) * query).")
    bn_momentum: float = _flag(0.1, "Clean BN momentum, PyTorch convention "
                               "(new = (1 - m) * old + m * batch).")
    bn_adv_momentum: float = _flag(0.01, "Adversarial BN momentum, PyTorch convention.")
    sync_bn: bool = _flag(True, "Synchronise batch-norm statistics across replicas (only matters "
                          "with more than one).")
    precision: str = _flag("float32", "float32, bf16 (Keras mixed_bfloat16) or fp16 (mixed_float16 "
                           "with dynamic loss scaling, for GPUs without bfloat16); losses, BN "
                           "statistics and the attack gradient stay float32.",
                           choices=("float32", "bf16", "fp16"))
    jit_compile: bool = _flag(False, "Compile the train step with XLA (the loop and its data "
                              "iterator stay outside XLA). For accelerators; on a CPU it is "
                              "checked for correctness, not speed (docs/performance.md).")
    # Data.
    dataset: str = _flag("digits", "A TFDS name (cifar10, cifar100, ...), a folder "
                         "root/{train,test}/<label>/<image>, or 'digits' (scikit-learn's 8x8 "
                         "digits, offline).")
    data_dir: Optional[str] = _flag(None, "TFDS data directory.")
    image_size: int = _flag(32, "Images are resized to this size.")
    train_examples: int = _flag(0, "Use only the first N training images (0: all).")
    examples_per_class: int = _flag(0, "Use only the first N training images of each class "
                                    "(0: all).")
    augment: str = _flag("auto", "Augmentation set: simclr, uel (Plain/UEL's) or moco (MoCo v2's).",
                         choices=("auto", "simclr", "uel", "moco"), auto=True)
    augment_impl: str = _flag("tf", "tf: augment.py, torchvision's semantics, stateless (exact "
                              "resume); keras_cv: the same sets from keras-cv 0.9 layers "
                              "(pip install -e \".[keras-cv]\"), stateful, mapped to keras-cv's "
                              "conventions (README).", choices=("tf", "keras_cv"))
    normalize: str = _flag("auto", "Input normalisation: half (mean = std = 0.5, inputs in "
                           "[-1, 1]), cifar (CIFAR-10 mean/std) or imagenet (ImageNet mean/std). "
                           "--eps is in these units.",
                           choices=("auto",) + tuple(NORMALIZATIONS), auto=True)
    # Optimisation.
    batch_size: int = _flag(256, "Global batch size (over all replicas).")
    epochs: int = _flag(30, "Pretraining epochs.")
    max_steps: int = _flag(0, "Stop after this many steps (0: epochs x steps per epoch).")
    optimizer: str = _flag("auto", "adam or sgd.", choices=("auto", "adam", "sgd"), auto=True)
    learning_rate: float = _flag(0.0, "Base learning rate.", auto=True)
    momentum: float = _flag(0.9, "SGD momentum.")
    weight_decay: float = _flag(-1.0, "L2 weight decay added to the gradient (PyTorch convention).",
                                auto=True)
    lr_schedule: str = _flag("auto", "constant, step (--lr_boundaries/--lr_factors) or cosine.",
                             choices=("auto", "constant", "step", "cosine"), auto=True)
    lr_boundaries: Tuple[int, ...] = _flag((), "Epochs at which the step schedule changes the "
                                           "learning rate.", auto=True)
    lr_factors: Tuple[float, ...] = _flag((), "Learning-rate multipliers applied from each "
                                          "boundary on.", auto=True)
    # Bookkeeping.
    ckpt_every: int = _flag(500, "Save a checkpoint every N steps (and at the end).")
    log_every: int = _flag(10, "Write TensorBoard scalars every N steps.")
    steps_per_loop: int = _flag(50, "Train steps per compiled call (one host round trip per "
                                "call; calls also end at --log_every/--ckpt_every/--image_every "
                                "steps).")
    image_every: int = _flag(200, "Write x, x_adv and the perturbation to TensorBoard every N "
                             "steps.")
    export: bool = _flag(True, "Export a SavedModel at the end of training.")
    # Monitoring (monitor.py): online kNN, nearest-neighbour picture, embedding projector.
    eval_every_epochs: int = _flag(0, "Every N epochs: weighted kNN on z of a fixed "
                                   "class-balanced test subset against the non-augmented "
                                   "training set (eval/knn_top1_online) and the nearest-neighbour "
                                   "picture (0: off; the picture is still written at the end).")
    online_eval_examples: int = _flag(1000, "Test images of the online kNN (the first of each "
                                      "class, class-balanced).")
    projector_examples: int = _flag(1000, "Test embeddings written for TensorBoard's Projector "
                                    "at the end of training, class-balanced (0: none).")
    projector_features: str = _flag("z", "What the Projector shows: z (embedding) or h "
                                    "(representation).", choices=("z", "h"))
    # Evaluation.
    knn_k: int = _flag(200, "Neighbours of the weighted kNN evaluation.")
    knn_sigma: float = _flag(0.0, "kNN weight temperature; 0 -> --temperature.")
    probe: str = _flag("auto", "Linear probe features: h (representation) or z (embedding).",
                       choices=("auto", "h", "z"), auto=True)
    linear_epochs: int = _flag(100, "Epochs of the linear probe on the frozen features (--probe).")
    linear_lr: float = _flag(3e-4, "Linear probe learning rate (Adam).")
    linear_batch_size: int = _flag(0, "Linear probe batch size.", auto=True)
    eval_batch_size: int = _flag(500, "Batch size for feature extraction.")
    # Default "quick": the fast suite costs minutes per 1,000 images on a GPU but 15-60 min on
    # 2 CPU cores, too much for the offline first run; the CPU presets use pgd20,fast, and
    # numbers to compare with AutoAttack's need pgd20,autoattack (docs/robustness.md).
    robust_attacks: str = _flag("quick", "Robust evaluation of encoder + linear "
                                "probe: the attacks, comma-separated, run in this order, each on "
                                "the images the ones before left standing: pgd20 (PGD-20, step "
                                "eps/4, random start), fgsm, apgd-ce and apgd-dlr (APGD on the "
                                "cross-entropy / DLR loss), apgd-t (targeted APGD-DLR, one run "
                                "per target class), fab-t (targeted FAB, one run per target "
                                "class), square (black box, L-inf only), or the suites "
                                "autoattack (standard AutoAttack: apgd-ce,apgd-t,fab-t,square "
                                "at its fixed budget), fast (apgd-ce,apgd-t,square at the "
                                "budget flags'; not AutoAttack) and quick (pgd20,fgsm). Empty: "
                                "no robust evaluation. Numbers to compare with AutoAttack's: "
                                "pgd20,autoattack.")
    robust_eps: str = _flag("1,2,4,8", "L-inf radii of the robust evaluation, comma-separated, in "
                            "units of 1/255 of the [0, 1] pixel range (empty: none).")
    robust_l2_eps: str = _flag("0.25,0.5", "L2 radii of the robust evaluation, comma-separated, "
                               "in [0, 1]-pixel units (empty: none); fgsm and square have no L2 "
                               "version and are left out there.")
    robust_examples: int = _flag(1000, "Test images of the robust evaluation: a fixed "
                                 "class-balanced subset (0: all).")
    # The budgets: 0 stands for the suite's (ROBUST_BUDGETS); with autoattack nothing else.
    robust_apgd_steps: int = _flag(0, "Iterations of each APGD and FAB run (apgd-ce, apgd-dlr, "
                                   "each target of apgd-t and fab-t). 0: the suite's, 100 "
                                   "(AutoAttack's; autoattack takes no other).")
    robust_targets: int = _flag(0, "apgd-t and fab-t: target classes, the most likely other "
                                "classes of the clean image (at most the number of classes - "
                                "1). 0: the suite's, 9 with autoattack (which takes no other), "
                                "3 otherwise.")
    robust_square_queries: int = _flag(0, "square: queries (forward passes) per image, at most "
                                       "100000. 0: the suite's, 5000 with autoattack (which "
                                       "takes no other), 1000 otherwise.")
    robust_checks: bool = _flag(True, "Gradient-masking checks of the robust evaluation "
                                "(results.json robust_checks; a warning line when one fires).")
    # Adversarial fine-tuning (--mode=finetune, evaluation/finetune.py): the RobustSSL
    # benchmark's ALF and AFF. 0 / empty: the recipe's value for each (finetune.RECIPES).
    finetune: str = _flag("alf,aff", "--mode=finetune: which fine-tunes of the run's encoder to "
                          "run, comma-separated: alf (adversarial linear fine-tuning: a linear "
                          "head on the frozen encoder, trained on PGD examples) and aff "
                          "(adversarial full fine-tuning: encoder and head with TRADES).")
    finetune_epochs: int = _flag(0, "Fine-tuning epochs (0: the recipe's, 25).")
    finetune_lr: float = _flag(0.0, "Fine-tuning SGD learning rate (0: the recipe's, ALF 0.01, "
                               "AFF 0.1), times 0.1 at each --finetune_lr_boundaries epoch.")
    finetune_lr_boundaries: Tuple[int, ...] = _flag((), "Epochs at which the fine-tuning "
                                                    "learning rate drops 10x (empty: the "
                                                    "recipe's, ALF 10,20 and AFF 15,20 of 25, "
                                                    "at the same fractions of "
                                                    "--finetune_epochs).")
    finetune_batch_size: int = _flag(0, "Fine-tuning batch size (0: the recipe's, ALF 512, "
                                     "AFF 128).")
    finetune_weight_decay: float = _flag(2e-4, "Fine-tuning L2 weight decay, added to the "
                                         "gradient (PyTorch convention).")
    finetune_eps: float = _flag(8.0, "Fine-tuning attack: L-inf radius in 1/255 of the [0, 1] "
                                "pixel range.")
    finetune_step_size: float = _flag(2.0, "Fine-tuning attack: step size in 1/255.")
    finetune_attack_steps: int = _flag(10, "Fine-tuning attack: steps (ALF: PGD on the "
                                       "cross-entropy from a random start; AFF: TRADES' "
                                       "ascent on the KL divergence).")
    trades_beta: float = _flag(6.0, "AFF: TRADES' beta, the weight of KL(f(x) || f(x_adv)) "
                               "beside the clean cross-entropy.")
    finetune_restart: bool = _flag(False, "--mode=finetune: start the fine-tunes of --finetune "
                                   "over from the pretrained encoder, discarding their "
                                   "checkpoints (else a stopped one resumes and a finished one "
                                   "is skipped).")
    # Distribution.
    strategy: str = _flag("auto", "auto (mirrored when >1 GPU), mirrored, multiworker (TF_CONFIG; "
                          "docs/distributed.md) or one_device.",
                          choices=("auto", "mirrored", "multiworker", "one_device"))
    virtual_cpus: int = _flag(0, "Split the CPU into N virtual devices and mirror over them "
                              "(testing).")

    def __post_init__(self):
        self._resolve_method_defaults()
        self.validate()

    def _resolve_method_defaults(self):
        """Fills every auto flag left at its default with the method's paper setting."""
        row = METHOD_DEFAULTS.get(self.method)
        if row is None:
            return  # validate() names the bad method
        unset = {f.name for f in dataclasses.fields(self)
                 if f.metadata["auto"] and getattr(self, f.name) == f.default}
        schedule = row["lr_schedule"] if "lr_schedule" in unset else self.lr_schedule
        if schedule != "step" or not unset.issuperset(_STEP_PAIR):
            # A step schedule's boundaries and factors belong together: half of the pair given,
            # or another schedule, and the row's pair does not apply.
            unset -= set(_STEP_PAIR)
        for name in unset & row.keys():
            object.__setattr__(self, name, row[name])  # frozen dataclass

    def validate(self):
        """Raises ClaeError(`--flag: why`) for the first bad value.

        The groups of checks run in this order, which decides the message of a value that is bad
        in two ways (an infinite --eps is "a finite number", not "larger than the input range").
        """
        self._check_choices()
        self._check_model_ranges()
        self._check_counts()
        self._check_learning_rate()
        self._check_moco()
        self._check_finite()
        self._check_seed_and_temperatures()
        self._check_eps_range()
        self._check_optimizer()
        self._check_robust()
        self._check_strategy()
        self._check_finetune()

    def _check_choices(self):
        for f in dataclasses.fields(self):
            choices, value = f.metadata["choices"], getattr(self, f.name)
            if choices and value not in choices:
                _bad(f.name, f"unknown value {value!r}; choose one of {', '.join(choices)}")

    def _check_model_ranges(self):
        """The attack, the loss, the model's shape and its BNs."""
        if self.eps < 0:
            _bad("eps", f"must be >= 0, got {self.eps}")
        if self.alpha < 0:
            _bad("alpha", f"must be >= 0, got {self.alpha}")
        if self.batch_size < 2:
            _bad("batch_size", f"must be >= 2 (contrastive learning needs negatives), got "
                               f"{self.batch_size}")
        if self.temperature <= 0:
            _bad("temperature", f"must be > 0, got {self.temperature}")
        if self.width <= 0:
            _bad("width", f"must be > 0, got {self.width}")
        if self.image_size < 8:
            _bad("image_size", f"must be >= 8, got {self.image_size}")
        if not 0 < self.bn_momentum <= 1 or not 0 < self.bn_adv_momentum <= 1:
            _bad("bn_momentum" if not 0 < self.bn_momentum <= 1 else "bn_adv_momentum",
                 "must be in (0, 1] (PyTorch convention)")

    def _check_counts(self):
        for name, (minimum, why) in _AT_LEAST.items():
            if getattr(self, name) < minimum:
                _bad(name, f"must be >= {minimum}{why}, got {getattr(self, name)}")
        for name, zero in _ZERO_MEANS.items():
            if getattr(self, name) < 0:
                _bad(name, f"must be >= 1, or 0 for {zero}, got {getattr(self, name)}")

    def _check_learning_rate(self):
        if self.lr_schedule == "step" and len(self.lr_boundaries) != len(self.lr_factors):
            _bad("lr_factors", "needs one factor per --lr_boundaries entry")
        if self.learning_rate <= 0:
            _bad("learning_rate", f"must be > 0, got {self.learning_rate}")

    def _check_moco(self):
        if self.method != "moco":
            return
        if self.queue_size < self.batch_size:
            _bad("queue_size", f"must be >= --batch_size ({self.batch_size}): each step "
                               f"enqueues the whole batch of keys, got {self.queue_size}")
        if not 0 <= self.key_momentum < 1:
            _bad("key_momentum", f"must be in [0, 1), got {self.key_momentum}")

    def _check_finite(self):
        """Every other numeric flag that can be nonsensical: nan passes every `<` check of the
        groups after this one, inf most of them."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            for x in (v if isinstance(v, tuple) else (v,)):
                if isinstance(x, float) and not abs(x) < float("inf"):
                    _bad(f.name, f"must be a finite number, got {x}")

    def _check_seed_and_temperatures(self):
        if not 0 <= self.seed < 2 ** 32:
            _bad("seed", f"must be in [0, 2^32) (NumPy's seed range), got {self.seed}")
        # Logits are cosine similarities / temperature: below 1e-3 they and their gradients reach
        # 1000s (float32 training diverges; 1/t itself overflows float32 below ~3e-39).
        if self.temperature < 1e-3:
            _bad("temperature", f"must be >= 0.001, got {self.temperature}: logits are cosine "
                                f"similarity / temperature, up to {1 / self.temperature:.2g} "
                                f"here (float32 overflows at 3.4e+38; the methods use 0.1-0.5)")
        if self.knn_sigma != 0 and self.knn_sigma < 1e-3:
            _bad("knn_sigma", f"must be 0 (use --temperature) or >= 0.001 (kNN weights are "
                              f"exp(similarity / sigma)), got {self.knn_sigma}")

    def _check_eps_range(self):
        # --eps is in normalised-input units: one pixel's whole [0, 1] range spans 1 / std of
        # them; the channel with the largest std spans the least.
        std = NORMALIZATIONS[self.normalize][1] if self.normalize in NORMALIZATIONS else None
        input_range = 1 / max(std) if std else float("inf")
        if self.eps > input_range:
            _bad("eps", f"{self.eps} is larger than the whole input range ({input_range:.3g} "
                        f"with --normalize={self.normalize}); eps is in normalised-input units "
                        f"(0.03 ~ {0.03 / input_range * 255:.2g}/255 of a pixel's range)")

    def _check_optimizer(self):
        """The probe's learning rate, SGD's momentum and the step schedule's values."""
        if self.linear_lr <= 0:
            _bad("linear_lr", f"must be > 0, got {self.linear_lr}")
        if not 0 <= self.momentum < 1:
            _bad("momentum", f"must be in [0, 1), got {self.momentum}")
        if any(b < 0 for b in self.lr_boundaries) or list(self.lr_boundaries) != sorted(
                set(self.lr_boundaries)):
            _bad("lr_boundaries", f"must be increasing epochs >= 0, got "
                                  f"{','.join(map(str, self.lr_boundaries))}")
        if any(f <= 0 for f in self.lr_factors):
            _bad("lr_factors", f"must be > 0 (multipliers of --learning_rate), got "
                               f"{','.join(map(str, self.lr_factors))}")

    def _check_robust(self):
        """The robust evaluation's radii and attacks, and the training attack's step size."""
        for radii in ("robust_eps_list", "robust_l2_eps_list"):
            getattr(self, radii)  # parsed here, once (parse_radii refuses a bad radius)
        try:
            _ = self.robust_attack_list  # evaluated only to validate: raises on a bad name
        except ValueError as e:
            _bad("robust_attacks", str(e))
        names = {item.lower() for item in _items(self.robust_attacks)}
        if {"autoattack", "fast"} <= names:
            _bad("robust_attacks", "autoattack and fast are the same attacks at two budgets "
                                   "(standard AutoAttack's and the budget flags'): name one")
        for name, (standard, _) in ROBUST_BUDGETS.items():
            value = getattr(self, name)
            if "autoattack" in names and value not in (0, standard):
                _bad(name, f"{value}, but autoattack is standard AutoAttack, whose budget is "
                           f"fixed ({standard}; leave the flag at 0); for another budget use "
                           f"the suite fast (apgd-ce,apgd-t,square at the budget flags'), "
                           f"which is what autoattack ran before it had FAB-T (an older "
                           f"flags.cfg's --robust_attacks=...,autoattack)")
        if self.robust_square_queries > MAX_SQUARE_QUERIES:
            _bad("robust_square_queries", f"{self.robust_square_queries} is more than "
                                          f"{MAX_SQUARE_QUERIES:,} queries per image, which "
                                          f"takes days on 1,000 images; AutoAttack's standard "
                                          f"budget is 5,000")
        if self.attack_step_size < 0:
            _bad("attack_step_size", f"must be > 0 (or 0: 2.5 * eps / steps), got "
                                     f"{self.attack_step_size}")

    def _check_strategy(self):
        """--virtual_cpus against --strategy: the virtual CPUs are mirrored over in-process."""
        if self.virtual_cpus <= 1:
            return
        if self.strategy == "multiworker":
            _bad("virtual_cpus", "not with --strategy=multiworker (each worker process uses its "
                                 "GPUs, or one CPU device)")
        if self.strategy == "one_device":
            _bad("virtual_cpus", "needs --strategy=auto or mirrored, not one_device")

    def _check_finetune(self):
        """--finetune's names and the fine-tuning recipe's values (0 / empty: the recipe's)."""
        try:
            _ = self.finetune_list  # evaluated only to validate: raises on a bad name
        except ValueError as e:
            _bad("finetune", str(e))
        if self.mode == "finetune" and not self.finetune_list:
            _bad("finetune", f"nothing to fine-tune; choose from {', '.join(FINETUNE_KINDS)}")
        for name in ("finetune_epochs", "finetune_batch_size"):
            if getattr(self, name) < 0:
                _bad(name, f"must be >= 1, or 0 for the recipe's, got {getattr(self, name)}")
        if self.finetune_lr < 0:
            _bad("finetune_lr", f"must be > 0, or 0 for the recipe's, got {self.finetune_lr}")
        if any(b < 1 for b in self.finetune_lr_boundaries) or list(
                self.finetune_lr_boundaries) != sorted(set(self.finetune_lr_boundaries)):
            _bad("finetune_lr_boundaries", f"must be increasing epochs >= 1, got "
                                           f"{','.join(map(str, self.finetune_lr_boundaries))}")
        if self.finetune_weight_decay < 0:
            _bad("finetune_weight_decay", f"must be >= 0, got {self.finetune_weight_decay}")
        if not 0 < self.finetune_eps <= 255:
            _bad("finetune_eps", f"must be in (0, 255] (1/255 of the [0, 1] pixel range), got "
                                 f"{self.finetune_eps}")
        if not 0 < self.finetune_step_size <= 255:
            _bad("finetune_step_size", f"must be in (0, 255] (in 1/255), got "
                                       f"{self.finetune_step_size}")
        if self.finetune_attack_steps < 1:
            _bad("finetune_attack_steps", f"must be >= 1, got {self.finetune_attack_steps}")
        if self.trades_beta < 0:
            _bad("trades_beta", f"must be >= 0, got {self.trades_beta}")

    @property
    def finetune_list(self) -> Tuple[str, ...]:
        """--finetune as names, in FINETUNE_KINDS' order. Raises ValueError naming an unknown
        name or an empty item."""
        names = [item.lower() for item in _items(self.finetune)]
        unknown = [n for n in names if n not in FINETUNE_KINDS]
        if unknown:
            slf = " (SLF is the linear probe of --mode=eval and train)" if "slf" in unknown else ""
            raise ValueError(f"unknown fine-tune {unknown[0]!r}{slf}; choose from "
                             f"{', '.join(FINETUNE_KINDS)} (comma-separated)")
        return tuple(k for k in FINETUNE_KINDS if k in names)

    @property
    def run_dir(self) -> str:
        if self.workdir:
            return self.workdir
        name = os.path.basename(os.path.normpath(self.dataset)) or "data"
        return os.path.join("runs", f"{name}_{self.method}{'_clae' if self.adversarial else ''}"
                                    f"_seed{self.seed}")

    @property
    def sigma(self) -> float:
        return self.knn_sigma or self.temperature

    # Parsed once, by validate(), and kept (the fields are frozen).
    @functools.cached_property
    def robust_eps_list(self) -> Tuple[float, ...]:
        """--robust_eps as numbers, in 1/255 (parse_radii)."""
        return parse_radii("robust_eps", self.robust_eps)

    @functools.cached_property
    def robust_l2_eps_list(self) -> Tuple[float, ...]:
        """--robust_l2_eps as numbers, in [0, 1]-pixel units (parse_radii)."""
        return parse_radii("robust_l2_eps", self.robust_l2_eps)

    @property
    def robust_budgets(self) -> dict:
        """The budget flags with 0 resolved to the suite's (ROBUST_BUDGETS: autoattack's where
        --robust_attacks names it, else the others'): {flag: value}; robust.Suite takes them."""
        standard = "autoattack" in (item.lower() for item in _items(self.robust_attacks))
        return {name: getattr(self, name) or values[0 if standard else 1]
                for name, values in ROBUST_BUDGETS.items()}

    @property
    def robust_attack_list(self) -> Tuple[str, ...]:
        """--robust_attacks with the suites expanded in place and repeats dropped (the first
        place counts). Raises ValueError naming an unknown attack or suite, or an empty item."""
        out = []
        for name in (item.lower() for item in _items(self.robust_attacks)):
            if name not in ROBUST_ATTACKS and name not in ROBUST_SUITES:
                close = difflib.get_close_matches(name, ROBUST_ATTACKS + tuple(ROBUST_SUITES), 1)
                suites = ", ".join(f"{k} ({','.join(v)})" for k, v in ROBUST_SUITES.items())
                raise ValueError(f"unknown attack or suite {name!r}"
                                 f"{f' (did you mean {close[0]}?)' if close else ''}; choose "
                                 f"from {', '.join(ROBUST_ATTACKS)} or the suites {suites}")
            out += [a for a in ROBUST_SUITES.get(name, (name,)) if a not in out]
        return tuple(out)

    def to_flagfile(self) -> str:
        """The flags of this run as an absl flagfile (`--flagfile=` reproduces it)."""
        lines = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in _NOT_RECORDED or v is None:
                continue
            if isinstance(v, bool):
                lines.append(f"--{f.name}" if v else f"--no{f.name}")
            else:
                lines.append(f"--{f.name}={self.value_str(f.name)}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def parse_flagfile(text: str) -> dict:
        """Reads back what to_flagfile wrote, as {name: string value}."""
        out = {}
        for line in text.splitlines():
            line = line.strip()
            if not line.startswith("--"):
                continue
            if "=" in line:
                k, v = line[2:].split("=", 1)
                out[k] = v
            elif line.startswith("--no") and line[4:] in _BOOL_FIELDS:
                out[line[4:]] = "False"
            else:
                out[line[2:]] = "True"
        return out

    def value_str(self, name: str) -> str:
        """A flag's value as the command line spells it (lists comma-separated)."""
        v = getattr(self, name)
        return ",".join(str(x) for x in v) if isinstance(v, tuple) else str(v)


_BOOL_FIELDS = {f.name for f in dataclasses.fields(Config) if f.type is bool}


def _is_list(f) -> bool:
    return typing.get_origin(f.type) is tuple


def _help(f) -> str:
    """The field's help, plus for an auto flag what its default stands for in each method."""
    text = f.metadata["help"]
    if not f.metadata["auto"]:
        return text
    per_method = ", ".join(
        f"{m} {','.join(map(str, v)) if isinstance(v, tuple) else v}"
        for m, row in METHOD_DEFAULTS.items() if (v := row.get(f.name)) is not None)
    default = "empty" if f.default == () else f.default
    return f"{text} {default}: the method's ({per_method})."


def define_flags():
    """Defines one absl flag per Config field (idempotent)."""
    for f in dataclasses.fields(Config):
        if f.name in flags.FLAGS:
            continue
        # The field's own default, not Config()'s: auto values must stay auto until the
        # method is known.
        if f.metadata["choices"]:
            flags.DEFINE_enum(f.name, f.default, f.metadata["choices"], _help(f))
        elif f.type is bool:
            flags.DEFINE_bool(f.name, f.default, _help(f))
        elif _is_list(f):
            flags.DEFINE_list(f.name, list(f.default), _help(f))
        elif f.type is int:
            flags.DEFINE_integer(f.name, f.default, _help(f))
        elif f.type is float:
            flags.DEFINE_float(f.name, f.default, _help(f))
        else:
            flags.DEFINE_string(f.name, f.default, _help(f))


def from_flags() -> Config:
    """Builds the Config from parsed absl flags."""
    values = {}
    for f in dataclasses.fields(Config):
        v = flags.FLAGS[f.name].value
        if _is_list(f):
            v = tuple(_parse_numbers(f.name, v, typing.get_args(f.type)[0]))
        values[f.name] = v
    return Config(**values)


def _bad(flag: str, why: str):
    """The error of a bad flag value: `--flag: why` (exit 2 in run.py)."""
    raise ClaeError(f"--{flag}: {why}")


def _items(text: str):
    """The items of a comma list, stripped ("1, 2" -> ["1", "2"]; "" or blanks -> none).

    Raises ValueError for an empty item ("1,,2", ",,", "1,"): a comma too many is a typo, and
    dropping the item would evaluate something other than what was asked without a word.
    """
    if not text.strip():
        return []
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise ValueError(f"empty item in {text!r} (a comma too many?); an entirely empty value "
                         f"means none")
    return items


def parse_radii(name: str, text: str) -> Tuple[float, ...]:
    """The radii of --robust_eps or --robust_l2_eps (`name`): a comma list ("1,2,4,8"; "" -> none)
    as floats, in the order given. Raises ClaeError(`--name: why`) for an empty item ("1,,2"),
    an item that is not a number, is negative or nan, or (--robust_eps, in 1/255) is more than
    255."""
    unit = " (in 1/255)" if name == "robust_eps" else ""
    try:
        items = _items(text)
    except ValueError as e:
        _bad(name, str(e))
    radii = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            _bad(name, f"expected comma-separated numbers{unit}, got {text!r}")
        if not value >= 0:  # also rejects nan
            _bad(name, f"must be >= 0{unit}, got {item}")
        if name == "robust_eps" and value > 255:
            _bad(name, f"{item} is more than the whole [0, 1] pixel range (255/255); the radii "
                       f"are in 1/255")
        radii.append(value)
    return tuple(radii)


def _parse_numbers(name, items, kind):
    try:
        return [kind(x) for x in items]
    except ValueError:
        raise ClaeError(f"--{name}: expected a comma-separated list of numbers, got {items}")


# Lower bounds of the count-like flags: {flag: (minimum, what the error adds)}.
_AT_LEAST = {
    "epochs": (1, ""), "proj_dim": (1, ""), "knn_k": (1, ""), "eval_batch_size": (1, ""),
    "linear_batch_size": (1, ""), "online_eval_examples": (1, ""), "attack_steps": (1, ""),
    "steps_per_loop": (1, ""), "weight_decay": (0, ""), "virtual_cpus": (0, ""),
    "ckpt_every": (1, " (steps between checkpoints)"),
    "log_every": (1, " (steps between scalar logs)"),
    "image_every": (1, " (steps between image logs)"),
    "linear_epochs": (1, " (an untrained probe's accuracy means nothing)"),
    "eval_every_epochs": (0, " (0: off)"), "projector_examples": (0, " (0: none)"),
    "robust_examples": (0, " (0: all test images)"),
}
# Flags whose 0 means "all" or "the default": {flag: what 0 stands for}.
_ZERO_MEANS = {"proj_hidden": "the representation's width",
               "max_steps": "--epochs x steps per epoch", "train_examples": "all",
               "examples_per_class": "all", "robust_apgd_steps": "the suite's",
               "robust_targets": "the suite's", "robust_square_queries": "the suite's"}
