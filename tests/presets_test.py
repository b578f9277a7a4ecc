"""Every preset in flags/ parses into a valid Config with the paper's settings."""

import glob
import os

import pytest
from absl import flags

from clae_tf import config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "flags", "*.cfg")))
# The fields that make a method what it is (PAPER.md, "Reference hyper-parameters").
METHOD_FIELDS = ("temperature", "head", "proj_dim", "augment", "normalize", "optimizer",
                 "learning_rate", "weight_decay", "lr_schedule", "lr_boundaries", "lr_factors",
                 "probe")


def _parse(monkeypatch, *args):
    """run.py's parsing of `args` (flagfile paths are relative to the repository root)."""
    monkeypatch.chdir(REPO)
    config.define_flags()
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["run.py", *args])
        return config.from_flags()
    finally:
        flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_parses_to_what_its_name_says(monkeypatch, preset):
    cfg = _parse(monkeypatch, f"--flagfile=flags/{preset}")
    name = preset[:-len(".cfg")]
    method = next((m for m in config.METHODS if f"_{m}" in name), "simclr")
    assert cfg.method == method
    if name != "smoke":  # the smoke test is a CLAE run
        assert cfg.adversarial == name.endswith("clae")
    if cfg.adversarial:
        assert (cfg.eps, cfg.alpha, cfg.bn_adv_momentum) == (0.03, 1.0, 0.01)


@pytest.mark.parametrize("method", ["plain", "uel"])
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_plain_and_uel_presets_are_the_paper_settings(monkeypatch, method, dataset):
    cfg = _parse(monkeypatch, f"--flagfile=flags/{dataset}_{method}_clae.cfg")
    assert (cfg.dataset, cfg.batch_size, cfg.epochs, cfg.temperature, cfg.sigma) == (
        dataset, 128, 301, 0.1, 0.1)
    assert (cfg.optimizer, cfg.learning_rate, cfg.momentum, cfg.weight_decay) == (
        "sgd", 0.03, 0.9, 5e-4)
    assert (cfg.lr_boundaries, cfg.lr_factors) == ((120, 160, 200), (0.1, 0.05, 0.01))
    assert (cfg.head, cfg.proj_dim, cfg.augment, cfg.normalize, cfg.probe) == (
        "linear", 128, "uel", "cifar", "z")
    # --method alone gives the same method settings as the preset spells out.
    auto = config.Config(method=method)
    assert all(getattr(cfg, f) == getattr(auto, f) for f in METHOD_FIELDS)


def test_moco_presets(monkeypatch):
    cfg = _parse(monkeypatch, "--flagfile=flags/cifar100_moco_clae.cfg")
    assert (cfg.dataset, cfg.temperature, cfg.queue_size, cfg.key_momentum, cfg.head) == (
        "cifar100", 0.2, 4096, 0.999, "mlp")
    assert cfg.sync_bn and cfg.adversarial
    auto = config.Config(method="moco")
    assert all(getattr(cfg, f) == getattr(auto, f) for f in METHOD_FIELDS)


def test_small_simclr_preset_is_issue_5_protocol(monkeypatch):
    cfg = _parse(monkeypatch, "--flagfile=flags/cifar10_small_clae.cfg")
    expected = dict(dataset="/tmp/cifar10", examples_per_class=500, arch="resnet18",
                    stem="cifar", width=0.25, head="mlp", proj_hidden=0, proj_dim=64,
                    temperature=0.5, batch_size=256, epochs=15, optimizer="adam",
                    learning_rate=3e-4, weight_decay=0.0, lr_schedule="constant", knn_k=200,
                    knn_sigma=0.5, linear_epochs=500, augment="simclr", normalize="half",
                    probe="h", adversarial=True, eps=0.03, alpha=1.0, bn_adv_momentum=0.01)
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_small_common_preset_takes_each_methods_settings(monkeypatch):
    for method in config.METHODS:
        cfg = _parse(monkeypatch, "--flagfile=flags/cifar10_small_common.cfg",
                     f"--method={method}")
        auto = config.Config(method=method)
        assert all(getattr(cfg, f) == getattr(auto, f) for f in METHOD_FIELDS), method
        assert (cfg.width, cfg.epochs, cfg.batch_size) == (0.25, 15, 256)
