"""Flags and the frozen Config built from them.

This is the ONLY module that imports absl.flags: every other module takes a Config (or plain
arguments), so everything can be built in a test without parsing argv.
"""

import dataclasses
import os
from typing import Optional, Tuple

from absl import flags

from clae_tf import ClaeError

METHODS = ("simclr", "plain", "uel", "moco")
ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50")

# Flags that decide the shape of what a checkpoint holds: resuming with other values is an error.
CHECKPOINT_FLAGS = ("method", "adversarial", "arch", "stem", "width", "head", "proj_hidden",
                    "proj_dim", "optimizer", "image_size", "sync_bn", "precision", "queue_size")

# Each method's paper settings (PAPER.md, "Reference hyper-parameters"; MoCo v2 at CIFAR scale).
# A flag left at its "auto" value (auto, 0, or -1 for weight_decay) takes the method's value, so
# `--method=uel` alone trains UEL as published; any flag given explicitly wins.
_STEP = dict(lr_schedule="step", lr_boundaries=(120, 160, 200), lr_factors=(0.1, 0.05, 0.01))
METHOD_DEFAULTS = {
    # NT-Xent; MLP head 512-512-64 (x width); Adam 3e-4; inputs in [-1, 1].
    "simclr": dict(temperature=0.5, head="mlp", proj_dim=64, augment="simclr", normalize="half",
                   optimizer="adam", learning_rate=3e-4, weight_decay=0.0, lr_schedule="constant",
                   probe="h"),
    # Batch instance classification and UEL: a linear 128-d head, CIFAR mean/std, SGD with steps,
    # and both kNN and the linear probe on the 128-d embedding.
    "plain": dict(temperature=0.1, head="linear", proj_dim=128, augment="uel", normalize="cifar",
                  optimizer="sgd", learning_rate=0.03, weight_decay=5e-4, probe="z", **_STEP),
    "uel": dict(temperature=0.1, head="linear", proj_dim=128, augment="uel", normalize="cifar",
                optimizer="sgd", learning_rate=0.03, weight_decay=5e-4, probe="z", **_STEP),
    # MoCo v2 (Chen et al. 2020) at CIFAR scale: MLP head to 128, temperature 0.2, its
    # augmentations without the blur (32-pixel images), SGD 0.06 + cosine, wd 5e-4.
    "moco": dict(temperature=0.2, head="mlp", proj_dim=128, augment="moco", normalize="cifar",
                 optimizer="sgd", learning_rate=0.06, weight_decay=5e-4, lr_schedule="cosine",
                 probe="h"),
}
_AUTO = {"temperature": 0.0, "head": "auto", "proj_dim": 0, "augment": "auto", "normalize": "auto",
         "optimizer": "auto", "learning_rate": 0.0, "weight_decay": -1.0, "lr_schedule": "auto",
         "probe": "auto"}


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs. Defaults are the small offline run of `python run.py`."""
    mode: str = "train"
    workdir: str = ""  # "" -> runs/<dataset>_<method>[_clae]_seed<seed>
    seed: int = 0
    # Method.
    method: str = "simclr"
    adversarial: bool = False
    temperature: float = 0.0  # 0 -> the method's (SimCLR 0.5, Plain/UEL 0.1, MoCo 0.2).
    eps: float = 0.03  # FGSM step, in normalised-input units (see --normalize).
    alpha: float = 1.0  # weight of the adversarial loss.
    # Model.
    arch: str = "resnet18"
    stem: str = "cifar"
    width: float = 0.25
    head: str = "auto"  # mlp (hidden layer + ReLU) or linear.
    proj_hidden: int = 0  # 0 -> the representation's width (512 for ResNet-18 x1).
    proj_dim: int = 0
    queue_size: int = 4096  # MoCo: negatives kept from past batches.
    key_momentum: float = 0.999  # MoCo: key encoder = m * key + (1 - m) * query.
    bn_momentum: float = 0.1  # PyTorch convention: new = (1 - m) * old + m * batch.
    bn_adv_momentum: float = 0.01
    sync_bn: bool = True  # synchronise BN statistics across replicas (only matters with > 1).
    precision: str = "float32"
    # Data.
    dataset: str = "digits"
    data_dir: Optional[str] = None
    image_size: int = 32
    train_examples: int = 0  # 0 -> all.
    examples_per_class: int = 0  # 0 -> all.
    augment: str = "auto"  # simclr, uel or moco augmentation set (augment.AUGMENTATIONS).
    normalize: str = "auto"  # half (mean = std = 0.5) or cifar (CIFAR mean/std).
    # Optimisation.
    batch_size: int = 256  # global batch, over all replicas.
    epochs: int = 30
    max_steps: int = 0  # 0 -> epochs * steps_per_epoch; else stop early (smoke tests).
    optimizer: str = "auto"
    learning_rate: float = 0.0
    momentum: float = 0.9
    weight_decay: float = -1.0
    lr_schedule: str = "auto"
    lr_boundaries: Tuple[int, ...] = ()  # epochs, for lr_schedule=step.
    lr_factors: Tuple[float, ...] = ()  # multipliers of learning_rate after each boundary.
    # Bookkeeping.
    ckpt_every: int = 500
    log_every: int = 10
    image_every: int = 200
    export: bool = True
    # Evaluation.
    knn_k: int = 200
    knn_sigma: float = 0.0  # 0 -> temperature.
    probe: str = "auto"  # features of the linear probe: h (representation) or z (embedding).
    linear_epochs: int = 100
    linear_lr: float = 3e-4
    linear_batch_size: int = 256
    eval_batch_size: int = 500
    # Distribution.
    strategy: str = "auto"
    virtual_cpus: int = 0
    # --- Robustness (issue 11) -------------------------------------------------------------
    # Robust evaluation: PGD-20 and FGSM on the frozen encoder + linear probe, in pixel space.
    robust_eps: str = "1,2,4,8"  # comma-separated, in units of 1/255; "" -> off.
    robust_examples: int = 1000  # a fixed class-balanced subset of the test split; 0 -> all.
    # The training attack (used by the train step once it takes PGD; FGSM is the paper's).
    attack: str = "fgsm"  # fgsm or pgd.
    attack_steps: int = 3  # pgd only.
    attack_step_size: float = 0.0  # pgd only, normalised-input units; 0 -> 2.5 * eps / steps.
    attack_random_start: bool = False  # pgd only: start uniformly in the eps-ball.
    # --- end robustness ----------------------------------------------------------------------

    def __post_init__(self):
        self._resolve_method_defaults()
        self.validate()

    def _resolve_method_defaults(self):
        """Fills every flag left at its "auto" value with the method's paper setting."""
        defaults = METHOD_DEFAULTS.get(self.method)
        if defaults is None:
            return  # validate() names the bad method
        for name, auto in _AUTO.items():
            if getattr(self, name) == auto:
                object.__setattr__(self, name, defaults[name])  # frozen dataclass
        if self.lr_schedule == "step" and not self.lr_boundaries and "lr_boundaries" in defaults:
            object.__setattr__(self, "lr_boundaries", defaults["lr_boundaries"])
            object.__setattr__(self, "lr_factors", defaults["lr_factors"])

    def validate(self):
        def bad(flag, why):
            raise ClaeError(f"--{flag}: {why}")
        if self.method not in METHODS:
            bad("method", f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.arch not in ARCHS:
            bad("arch", f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.eps < 0:
            bad("eps", f"must be >= 0, got {self.eps}")
        if self.alpha < 0:
            bad("alpha", f"must be >= 0, got {self.alpha}")
        if self.batch_size < 2:
            bad("batch_size", f"must be >= 2 (contrastive learning needs negatives), got {self.batch_size}")
        if self.temperature <= 0:
            bad("temperature", f"must be > 0, got {self.temperature}")
        if self.width <= 0:
            bad("width", f"must be > 0, got {self.width}")
        if self.image_size < 8:
            bad("image_size", f"must be >= 8, got {self.image_size}")
        if self.epochs < 1:
            bad("epochs", f"must be >= 1, got {self.epochs}")
        if not 0 < self.bn_momentum <= 1 or not 0 < self.bn_adv_momentum <= 1:
            bad("bn_momentum" if not 0 < self.bn_momentum <= 1 else "bn_adv_momentum",
                "must be in (0, 1] (PyTorch convention)")
        if self.lr_schedule == "step" and len(self.lr_boundaries) != len(self.lr_factors):
            bad("lr_factors", "needs one factor per --lr_boundaries entry")
        if self.knn_k < 1:
            bad("knn_k", f"must be >= 1, got {self.knn_k}")
        if self.learning_rate <= 0:
            bad("learning_rate", f"must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            bad("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.proj_dim < 1:
            bad("proj_dim", f"must be >= 1, got {self.proj_dim}")
        if self.method == "moco":
            if self.queue_size < self.batch_size:
                bad("queue_size", f"must be >= --batch_size ({self.batch_size}): each step "
                                  f"enqueues the whole batch of keys, got {self.queue_size}")
            if not 0 <= self.key_momentum < 1:
                bad("key_momentum", f"must be in [0, 1), got {self.key_momentum}")
        # --- Robustness (issue 11) ---------------------------------------------------------
        for item in self.robust_eps.split(",") if self.robust_eps.strip() else []:
            try:
                value = float(item)
            except ValueError:
                bad("robust_eps", f"expected comma-separated numbers (in 1/255), got "
                                  f"{self.robust_eps!r}")
            if not value >= 0:  # also rejects nan
                bad("robust_eps", f"must be >= 0 (in 1/255), got {item.strip()}")
        if self.robust_examples < 0:
            bad("robust_examples", f"must be >= 0 (0: all test images), got {self.robust_examples}")
        if self.attack not in ("fgsm", "pgd"):
            bad("attack", f"unknown attack {self.attack!r}; choose fgsm or pgd")
        if self.attack_steps < 1:
            bad("attack_steps", f"must be >= 1, got {self.attack_steps}")
        if self.attack_step_size < 0:
            bad("attack_step_size", f"must be > 0 (or 0: 2.5 * eps / steps), got "
                                    f"{self.attack_step_size}")
        # --- end robustness ------------------------------------------------------------------

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

    def to_flagfile(self) -> str:
        """The flags of this run as an absl flagfile (`--flagfile=` reproduces it)."""
        lines = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("mode", "virtual_cpus"):
                continue
            if v is None:
                continue
            if isinstance(v, bool):
                lines.append(f"--{f.name}" if v else f"--no{f.name}")
            elif isinstance(v, tuple):
                lines.append(f"--{f.name}={','.join(str(x) for x in v)}")
            else:
                lines.append(f"--{f.name}={v}")
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
        v = getattr(self, name)
        return ",".join(str(x) for x in v) if isinstance(v, tuple) else str(v)


_BOOL_FIELDS = {f.name for f in dataclasses.fields(Config) if f.type in (bool, "bool")}
_HELP = {
    "mode": "train (then evaluate and export), eval or export (of the run in --workdir).",
    "workdir": "Where checkpoints, TensorBoard events, results.json and the SavedModel go. "
               "Re-running the same command on the same workdir resumes. Default runs/<name>.",
    "seed": "Seed for weights, shuffling and augmentation.",
    "method": "Contrastive method.",
    "adversarial": "Add CLAE: an FGSM adversarial view as an extra positive, with its own BNs.",
    "temperature": "Contrastive loss temperature; 0: the method's.",
    "eps": "FGSM step size in normalised-input units (0.03 ~ 3.8/255 with --normalize=half, "
           "~1.5/255 with cifar).",
    "alpha": "Weight of the adversarial loss: L = L_clean + alpha * L_adv.",
    "arch": "Encoder (resnet10 is a small one for tests).",
    "stem": "cifar: 3x3 conv, no max-pool; imagenet: 7x7/2 conv and 3x3/2 max-pool.",
    "width": "Channel width multiplier (0.25 -> 16-32-64-128 for ResNet-18).",
    "head": "Projection head: mlp (h -> hidden -> ReLU -> z) or linear (h -> z); auto: the method's.",
    "proj_hidden": "Projection head hidden units; 0 -> the representation's width.",
    "proj_dim": "Projection (z) dimension; 0: the method's (SimCLR 64, others 128).",
    "queue_size": "MoCo: number of past keys kept as negatives.",
    "key_momentum": "MoCo: momentum of the key encoder's parameter update.",
    "bn_momentum": "Clean BN momentum, PyTorch convention (0.1).",
    "bn_adv_momentum": "Adversarial BN momentum, PyTorch convention (0.01).",
    "sync_bn": "Synchronise batch-norm statistics across replicas.",
    "precision": "float32, or bf16 (Keras mixed_bfloat16; losses and the attack gradient stay float32).",
    "dataset": "A TFDS name (cifar10, cifar100, ...), a folder root/{train,test}/<label>/<image>, "
               "or 'digits' (scikit-learn's 8x8 digits, offline).",
    "data_dir": "TFDS data directory.",
    "image_size": "Images are resized to this size.",
    "train_examples": "Use only the first N training images (0: all).",
    "examples_per_class": "Use only the first N training images of each class (0: all).",
    "augment": "Augmentation set: simclr, uel (Plain/UEL's) or moco (MoCo v2's); auto: the method's.",
    "normalize": "Input normalisation: half (mean = std = 0.5, inputs in [-1, 1]) or cifar "
                 "(CIFAR-10 mean/std); auto: the method's. --eps is in these units.",
    "batch_size": "Global batch size (over all replicas).",
    "epochs": "Pretraining epochs.",
    "max_steps": "Stop after this many steps (0: epochs x steps per epoch).",
    "optimizer": "adam or sgd; auto: the method's.",
    "learning_rate": "Base learning rate; 0: the method's.",
    "momentum": "SGD momentum.",
    "weight_decay": "L2 weight decay added to the gradient (PyTorch convention); -1: the method's.",
    "lr_schedule": "constant, step (--lr_boundaries/--lr_factors) or cosine; auto: the method's.",
    "lr_boundaries": "Epochs at which the step schedule changes the learning rate.",
    "lr_factors": "Learning-rate multipliers applied from each boundary on.",
    "ckpt_every": "Save a checkpoint every N steps (and at the end).",
    "log_every": "Write TensorBoard scalars every N steps.",
    "image_every": "Write x, x_adv and the perturbation to TensorBoard every N steps.",
    "export": "Export a SavedModel at the end of training.",
    "knn_k": "Neighbours of the weighted kNN evaluation.",
    "knn_sigma": "kNN weight temperature; 0 -> --temperature.",
    "probe": "Linear probe features: h (representation) or z (embedding); auto: the method's.",
    "linear_epochs": "Epochs of the linear probe on the frozen features (--probe).",
    "linear_lr": "Linear probe learning rate (Adam).",
    "linear_batch_size": "Linear probe batch size.",
    "eval_batch_size": "Batch size for feature extraction.",
    "strategy": "auto (mirrored when >1 GPU), mirrored, multiworker (TF_CONFIG; "
                "docs/distributed.md) or one_device.",
    "virtual_cpus": "Split the CPU into N virtual devices and mirror over them (testing).",
    # --- Robustness (issue 11) -------------------------------------------------------------
    "robust_eps": "Robust evaluation radii, comma-separated, in units of 1/255 of the [0, 1] pixel "
                  "range: PGD-20 (step eps/4, random start) and FGSM on encoder + linear probe. "
                  "Empty: no robust evaluation.",
    "robust_examples": "Test images of the robust evaluation: a fixed class-balanced subset "
                       "(0: all).",
    "attack": "Training attack: fgsm (the paper's: one step of --eps) or pgd.",
    "attack_steps": "--attack=pgd: number of steps.",
    "attack_step_size": "--attack=pgd: step size in normalised-input units (as --eps); "
                        "0: 2.5 * eps / steps (Madry et al.).",
    "attack_random_start": "--attack=pgd: start from a uniform random point of the eps-ball.",
    # --- end robustness ----------------------------------------------------------------------
}
_ENUMS = {"mode": ("train", "eval", "export"), "method": METHODS, "arch": ARCHS,
          "stem": ("cifar", "imagenet"), "precision": ("float32", "bf16"),
          "head": ("auto", "mlp", "linear"), "augment": ("auto", "simclr", "uel", "moco"),
          "normalize": ("auto", "half", "cifar"), "probe": ("auto", "h", "z"),
          "optimizer": ("auto", "adam", "sgd"), "lr_schedule": ("auto", "constant", "step", "cosine"),
          "strategy": ("auto", "mirrored", "multiworker", "one_device")}


def define_flags():
    """Defines one absl flag per Config field (idempotent)."""
    for f in dataclasses.fields(Config):
        if f.name in flags.FLAGS:
            continue
        # The field's own default, not Config()'s: "auto" values must stay auto until the
        # method is known.
        default, helptext = f.default, _HELP[f.name]
        if f.name in _ENUMS:
            flags.DEFINE_enum(f.name, default, _ENUMS[f.name], helptext)
        elif isinstance(default, bool):
            flags.DEFINE_bool(f.name, default, helptext)
        elif f.name == "lr_boundaries":
            flags.DEFINE_list(f.name, [], helptext)
        elif f.name == "lr_factors":
            flags.DEFINE_list(f.name, [], helptext)
        elif isinstance(default, int):
            flags.DEFINE_integer(f.name, default, helptext)
        elif isinstance(default, float):
            flags.DEFINE_float(f.name, default, helptext)
        else:
            flags.DEFINE_string(f.name, default, helptext)


def from_flags() -> Config:
    """Builds the Config from parsed absl flags."""
    values = {}
    for f in dataclasses.fields(Config):
        v = flags.FLAGS[f.name].value
        if f.name == "lr_boundaries":
            v = tuple(_parse_numbers(f.name, v, int))
        elif f.name == "lr_factors":
            v = tuple(_parse_numbers(f.name, v, float))
        values[f.name] = v
    return Config(**values)


def _parse_numbers(name, items, kind):
    try:
        return [kind(x) for x in items]
    except ValueError:
        raise ClaeError(f"--{name}: expected a comma-separated list of numbers, got {items}")
