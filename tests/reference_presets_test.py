"""The Tiny-ImageNet presets and the linear-probe settings follow the reference's scripts.

Literal values from chihhuiho/CLAE: SimCLR/run_tinyImagenet.sh (batch 128), SimCLR/main.py
(100 epochs), SimCLR/eval_lr.py (probe 1000 epochs, batch 256, ImageNet mean/std);
{Plain,UEL}/main_imagenet.py (100 epochs, ImageNet mean/std), {Plain,UEL}/eval_imagenet.py (probe
200 epochs, batch 128), {Plain,UEL}/eval.py (CIFAR probe 1000 epochs, batch 128).
"""

import pytest
from presets_test import _parse

IMAGENET = dict(dataset="/path/to/tiny-imagenet", image_size=224, stem="imagenet",
                normalize="imagenet", batch_size=128, epochs=100)


@pytest.mark.parametrize("preset, method, linear", [
    ("tinyimagenet_simclr", "simclr", (1000, 256)),
    ("tinyimagenet_clae", "simclr", (1000, 256)),
    ("tinyimagenet_plain", "plain", (200, 128)),
    ("tinyimagenet_plain_clae", "plain", (200, 128)),
    ("tinyimagenet_uel", "uel", (200, 128)),
    ("tinyimagenet_uel_clae", "uel", (200, 128)),
])
def test_tinyimagenet_presets_are_the_reference_runs(monkeypatch, preset, method, linear):
    cfg = _parse(monkeypatch, f"--flagfile=flags/{preset}.cfg")
    assert cfg.method == method
    assert {k: getattr(cfg, k) for k in IMAGENET} == IMAGENET
    assert (cfg.linear_epochs, cfg.linear_batch_size, cfg.linear_lr) == (*linear, 3e-4)
    assert cfg.adversarial == preset.endswith("clae")
    # The rest is the CIFAR preset's method settings.
    expected = ((0.5, "mlp", 64, "simclr", "adam", "h") if method == "simclr" else
                (0.1, "linear", 128, "uel", "sgd", "z"))
    assert (cfg.temperature, cfg.head, cfg.proj_dim, cfg.augment, cfg.optimizer,
            cfg.probe) == expected


@pytest.mark.parametrize("method", ["plain", "uel"])
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_plain_and_uel_probe_is_the_reference_eval(monkeypatch, method, dataset):
    cfg = _parse(monkeypatch, f"--flagfile=flags/{dataset}_{method}.cfg")
    assert (cfg.linear_epochs, cfg.linear_batch_size, cfg.linear_lr) == (1000, 128, 3e-4)
