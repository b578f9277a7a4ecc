"""Flags and the frozen Config built from them.

This is the ONLY module that imports absl.flags: every other module takes a Config (or plain
arguments), so everything can be built in a test without parsing argv.
"""

import dataclasses
import os
from typing import Optional, Tuple

from absl import flags

from clae_tf import ClaeError

METHODS = ("simclr",)
ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50")

# Flags that decide the shape of what a checkpoint holds: resuming with other values is an error.
CHECKPOINT_FLAGS = ("method", "adversarial", "arch", "stem", "width", "proj_hidden", "proj_dim",
                    "optimizer", "image_size", "sync_bn", "precision")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs. Defaults are the small offline run of `python run.py`."""
    mode: str = "train"
    workdir: str = ""  # "" -> runs/<dataset>_<method>[_clae]_seed<seed>
    seed: int = 0
    # Method.
    method: str = "simclr"
    adversarial: bool = False
    temperature: float = 0.5
    eps: float = 0.03  # FGSM step, in normalised-input units (inputs normalised by mean 0.5, std 0.5).
    alpha: float = 1.0  # weight of the adversarial loss.
    # Model.
    arch: str = "resnet18"
    stem: str = "cifar"
    width: float = 0.25
    proj_hidden: int = 0  # 0 -> the representation's width (512 for ResNet-18 x1).
    proj_dim: int = 64
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
    # Optimisation.
    batch_size: int = 256  # global batch, over all replicas.
    epochs: int = 30
    max_steps: int = 0  # 0 -> epochs * steps_per_epoch; else stop early (smoke tests).
    optimizer: str = "adam"
    learning_rate: float = 3e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
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
    linear_epochs: int = 100
    linear_lr: float = 3e-4
    linear_batch_size: int = 256
    eval_batch_size: int = 500
    # Distribution.
    strategy: str = "auto"
    virtual_cpus: int = 0

    def __post_init__(self):
        self.validate()

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
_DEFAULTS = Config()
_HELP = {
    "mode": "train (then evaluate and export), eval or export (of the run in --workdir).",
    "workdir": "Where checkpoints, TensorBoard events, results.json and the SavedModel go. "
               "Re-running the same command on the same workdir resumes. Default runs/<name>.",
    "seed": "Seed for weights, shuffling and augmentation.",
    "method": "Contrastive method.",
    "adversarial": "Add CLAE: an FGSM adversarial view as an extra positive, with its own BNs.",
    "temperature": "Contrastive loss temperature.",
    "eps": "FGSM step size in normalised-input units (0.03 ~ 3.8/255 with mean/std 0.5).",
    "alpha": "Weight of the adversarial loss: L = L_clean + alpha * L_adv.",
    "arch": "Encoder (resnet10 is a small one for tests).",
    "stem": "cifar: 3x3 conv, no max-pool; imagenet: 7x7/2 conv and 3x3/2 max-pool.",
    "width": "Channel width multiplier (0.25 -> 16-32-64-128 for ResNet-18).",
    "proj_hidden": "Projection head hidden units; 0 -> the representation's width.",
    "proj_dim": "Projection (z) dimension.",
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
    "batch_size": "Global batch size (over all replicas).",
    "epochs": "Pretraining epochs.",
    "max_steps": "Stop after this many steps (0: epochs x steps per epoch).",
    "optimizer": "adam or sgd.",
    "learning_rate": "Base learning rate.",
    "momentum": "SGD momentum.",
    "weight_decay": "L2 weight decay added to the gradient (PyTorch convention).",
    "lr_schedule": "constant, step (--lr_boundaries/--lr_factors) or cosine.",
    "lr_boundaries": "Epochs at which the step schedule changes the learning rate.",
    "lr_factors": "Learning-rate multipliers applied from each boundary on.",
    "ckpt_every": "Save a checkpoint every N steps (and at the end).",
    "log_every": "Write TensorBoard scalars every N steps.",
    "image_every": "Write x, x_adv and the perturbation to TensorBoard every N steps.",
    "export": "Export a SavedModel at the end of training.",
    "knn_k": "Neighbours of the weighted kNN evaluation.",
    "knn_sigma": "kNN weight temperature; 0 -> --temperature.",
    "linear_epochs": "Epochs of the linear probe on frozen h.",
    "linear_lr": "Linear probe learning rate (Adam).",
    "linear_batch_size": "Linear probe batch size.",
    "eval_batch_size": "Batch size for feature extraction.",
    "strategy": "auto (mirrored when >1 GPU), mirrored, multiworker (TF_CONFIG; "
                "docs/distributed.md) or one_device.",
    "virtual_cpus": "Split the CPU into N virtual devices and mirror over them (testing).",
}
_ENUMS = {"mode": ("train", "eval", "export"), "method": METHODS, "arch": ARCHS,
          "stem": ("cifar", "imagenet"), "precision": ("float32", "bf16"),
          "optimizer": ("adam", "sgd"), "lr_schedule": ("constant", "step", "cosine"),
          "strategy": ("auto", "mirrored", "multiworker", "one_device")}


def define_flags():
    """Defines one absl flag per Config field (idempotent)."""
    for f in dataclasses.fields(Config):
        if f.name in flags.FLAGS:
            continue
        default, helptext = getattr(_DEFAULTS, f.name), _HELP[f.name]
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
