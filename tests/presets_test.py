"""Every preset in flags/ parses into a valid Config with the paper's settings.

The presets hold only what differs from `--method=X` and the flags' defaults, so the expectations
below are written out in full (literal values, not Config's or METHOD_DEFAULTS'): a changed default
that would silently change a preset fails here.
"""

import dataclasses
import glob
import os

import pytest

from clae_tf.runtime import config

from conftest import REPO, parse_flags

PRESETS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "flags", "*.cfg")))

# Every flag's default that is not a method setting (python run.py with no flags).
DEFAULTS = dict(
    mode="train", workdir="", seed=0, adversarial=False, eps=0.03, alpha=1.0, arch="resnet18",
    stem="cifar", width=0.25, proj_hidden=0, queue_size=4096, key_momentum=0.999,
    bn_momentum=0.1, bn_adv_momentum=0.01, sync_bn=True, precision="float32", jit_compile=False,
    dataset="digits",
    data_dir=None, image_size=32, train_examples=0, examples_per_class=0, batch_size=256,
    epochs=30, max_steps=0, momentum=0.9, ckpt_every=500, log_every=10, steps_per_loop=50,
    image_every=200, export=True, knn_k=200, knn_sigma=0.0, linear_epochs=100, linear_lr=3e-4,
    eval_batch_size=500, attack="fgsm", attack_steps=3, attack_step_size=0.0,
    attack_random_start=False, robust_eps="1,2,4,8", robust_examples=1000, strategy="auto",
    robust_attacks="quick", robust_l2_eps="0.25,0.5", robust_apgd_steps=0,
    robust_targets=0, robust_square_queries=0, robust_checks=True,
    virtual_cpus=0, eval_every_epochs=0, online_eval_examples=1000, projector_examples=1000,
    projector_features="z", augment_impl="tf",
    # --mode=finetune (ALF, AFF): 0 / empty stand for the benchmark recipe's values.
    finetune="alf,aff", finetune_epochs=0, finetune_lr=0.0, finetune_lr_boundaries=(),
    finetune_batch_size=0, finetune_weight_decay=2e-4, finetune_eps=8.0, finetune_step_size=2.0,
    finetune_attack_steps=10, trades_beta=6.0, finetune_restart=False)
# The method settings (docs/method.md, "Reference hyper-parameters"; MoCo v2 at CIFAR scale).
SIMCLR = dict(method="simclr", temperature=0.5, head="mlp", proj_dim=64, augment="simclr",
              normalize="half", optimizer="adam", learning_rate=3e-4, weight_decay=0.0,
              lr_schedule="constant", lr_boundaries=(), lr_factors=(), probe="h",
              linear_batch_size=256)
PLAIN = dict(method="plain", temperature=0.1, head="linear", proj_dim=128, augment="uel",
             normalize="cifar", optimizer="sgd", learning_rate=0.03, weight_decay=5e-4,
             lr_schedule="step", lr_boundaries=(120, 160, 200), lr_factors=(0.1, 0.05, 0.01),
             probe="z", linear_batch_size=128)  # the probe batch of the reference's eval.py
UEL = dict(PLAIN, method="uel")
MOCO = dict(method="moco", temperature=0.2, head="mlp", proj_dim=128, augment="moco",
            normalize="cifar", optimizer="sgd", learning_rate=0.06, weight_decay=5e-4,
            lr_schedule="cosine", lr_boundaries=(), lr_factors=(), probe="h",
            linear_batch_size=256)
CLAE = dict(adversarial=True)

# The paper-scale runs: full width, 1000-epoch probe, fewer logs.
PAPER_SIMCLR = dict(SIMCLR, dataset="cifar10", width=1.0, proj_hidden=512, epochs=100,
                    linear_epochs=1000, ckpt_every=1000, log_every=50, image_every=500,
                    eval_every_epochs=10)
PAPER_PLAIN = dict(PLAIN, dataset="cifar10", width=1.0, batch_size=128, epochs=301,
                   knn_sigma=0.1, linear_epochs=1000, ckpt_every=2000, log_every=50,
                   image_every=1000, eval_every_epochs=10)
PAPER_UEL = dict(PAPER_PLAIN, method="uel")
PAPER_MOCO = dict(MOCO, dataset="cifar10", width=1.0, proj_hidden=512, epochs=200,
                  knn_sigma=0.2, linear_epochs=1000, ckpt_every=2000, log_every=50,
                  image_every=1000, eval_every_epochs=10)
SMALL = dict(dataset="cifar10", examples_per_class=500, epochs=15, linear_epochs=500,
             eval_every_epochs=3, robust_attacks="pgd20,fast")

# {preset: every field of its resolved Config}, as the presets resolved before they were cut
# down to their differences from the method defaults.
EXPECTED = {
    "cifar10_simclr.cfg": PAPER_SIMCLR,
    "cifar10_clae.cfg": dict(PAPER_SIMCLR, **CLAE),
    "cifar100_simclr.cfg": dict(PAPER_SIMCLR, dataset="cifar100"),
    "cifar100_clae.cfg": dict(PAPER_SIMCLR, dataset="cifar100", **CLAE),
    "cifar10_plain.cfg": PAPER_PLAIN,
    "cifar10_plain_clae.cfg": dict(PAPER_PLAIN, **CLAE),
    "cifar100_plain.cfg": dict(PAPER_PLAIN, dataset="cifar100"),
    "cifar100_plain_clae.cfg": dict(PAPER_PLAIN, dataset="cifar100", **CLAE),
    "cifar10_uel.cfg": PAPER_UEL,
    "cifar10_uel_clae.cfg": dict(PAPER_UEL, **CLAE),
    "cifar100_uel.cfg": dict(PAPER_UEL, dataset="cifar100"),
    "cifar100_uel_clae.cfg": dict(PAPER_UEL, dataset="cifar100", **CLAE),
    "cifar10_moco.cfg": PAPER_MOCO,
    "cifar10_moco_clae.cfg": dict(PAPER_MOCO, **CLAE),
    "cifar100_moco.cfg": dict(PAPER_MOCO, dataset="cifar100"),
    "cifar100_moco_clae.cfg": dict(PAPER_MOCO, dataset="cifar100", **CLAE),
    "cifar10_small_common.cfg": dict(SIMCLR, **SMALL),
    "cifar10_small_simclr.cfg": dict(SIMCLR, knn_sigma=0.5, **SMALL),
    "cifar10_small_clae.cfg": dict(SIMCLR, knn_sigma=0.5, **SMALL, **CLAE),
    "cifar10_small_clae_pgd.cfg": dict(SIMCLR, knn_sigma=0.5, **SMALL, **CLAE, attack="pgd"),
    "smoke.cfg": dict(SIMCLR, adversarial=True, arch="resnet10", width=0.125, image_size=16,
                      batch_size=64, epochs=2, linear_epochs=20, workdir="runs/smoke",
                      eval_every_epochs=1, robust_attacks="pgd20,fast",
                      robust_examples=100, robust_apgd_steps=5,
                      robust_targets=2, robust_square_queries=20),
    # Fine-tunes of a finished small run (its method comes from its flags.cfg at run time).
    "cifar10_small_alf.cfg": dict(SIMCLR, mode="finetune", finetune="alf", finetune_epochs=10,
                                  finetune_batch_size=128, finetune_attack_steps=5),
    "cifar10_small_aff.cfg": dict(SIMCLR, mode="finetune", finetune="aff", finetune_epochs=6,
                                  finetune_attack_steps=5),
}
# Edited elsewhere (Tiny-ImageNet's own settings); only the name check below covers them.
NOT_PINNED = ("tinyimagenet_",)


def _parse(monkeypatch, *args):
    """run.py's parsing of `args` (flagfile paths are relative to the repository root)."""
    monkeypatch.chdir(REPO)
    return parse_flags(*args)


def _assert_config(cfg, expected):
    expected = dict(DEFAULTS, **expected)
    got = dataclasses.asdict(cfg)
    assert set(got) == set(expected), "a new flag: add its default to DEFAULTS"
    diff = {k: (got[k], expected[k]) for k in got if got[k] != expected[k]}
    assert not diff, f"(got, expected): {diff}"


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_parses_to_what_its_name_says(monkeypatch, preset):
    cfg = _parse(monkeypatch, f"--flagfile=flags/{preset}")
    name = preset[:-len(".cfg")]
    method = next((m for m in config.METHODS if f"_{m}" in name), "simclr")
    assert cfg.method == method
    if name != "smoke":  # the smoke test is a CLAE run
        assert cfg.adversarial == ("clae" in name.split("_"))
    assert (cfg.attack == "pgd") == name.endswith("_pgd")
    if cfg.adversarial:
        assert (cfg.eps, cfg.alpha, cfg.bn_adv_momentum) == (0.03, 1.0, 0.01)


def test_every_preset_is_pinned():
    pinned = set(EXPECTED) | {p for p in PRESETS if p.startswith(NOT_PINNED)}
    assert set(PRESETS) == pinned


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_resolves_to_the_recorded_config(monkeypatch, preset):
    _assert_config(_parse(monkeypatch, f"--flagfile=flags/{preset}"), EXPECTED[preset])


def test_paper_presets_spot_check(monkeypatch):
    # The headline numbers, spelled out once more against docs/method.md.
    cfg = _parse(monkeypatch, "--flagfile=flags/cifar10_simclr.cfg")
    assert (cfg.temperature, cfg.proj_dim, cfg.batch_size, cfg.epochs, cfg.optimizer,
            cfg.learning_rate, cfg.width, cfg.sigma) == (0.5, 64, 256, 100, "adam", 3e-4, 1.0, 0.5)
    cfg = _parse(monkeypatch, "--flagfile=flags/cifar100_uel_clae.cfg")
    assert (cfg.temperature, cfg.proj_dim, cfg.batch_size, cfg.epochs, cfg.optimizer,
            cfg.learning_rate, cfg.momentum, cfg.weight_decay, cfg.sigma) == (
        0.1, 128, 128, 301, "sgd", 0.03, 0.9, 5e-4, 0.1)


@pytest.mark.parametrize("method, settings", [("simclr", SIMCLR), ("plain", PLAIN),
                                              ("uel", UEL), ("moco", MOCO)])
def test_small_common_preset_takes_each_methods_settings(monkeypatch, method, settings):
    cfg = _parse(monkeypatch, "--flagfile=flags/cifar10_small_common.cfg", f"--method={method}")
    _assert_config(cfg, dict(settings, **SMALL))
    _assert_config(config.Config(method=method), settings)


# ---- The larger CPU protocols: all of CIFAR-10 and the small Tiny-ImageNet protocol.
FULL = dict(dataset="cifar10", epochs=10, precision="bf16", linear_epochs=1000,
            ckpt_every=195, eval_every_epochs=5, robust_attacks="pgd20,fast")
TINY_SMALL = dict(dataset="/path/to/tiny-imagenet", examples_per_class=100, stem="imagenet",
                  normalize="imagenet", image_size=64, epochs=25, precision="bf16",
                  linear_epochs=1000, ckpt_every=78, eval_every_epochs=5,
                  online_eval_examples=2000, robust_attacks="pgd20,fast")
LARGER = {
    "cifar10_full_common.cfg": dict(SIMCLR, **FULL),
    "cifar10_full_simclr.cfg": dict(SIMCLR, **FULL),
    "cifar10_full_clae.cfg": dict(SIMCLR, **FULL, **CLAE),
    "tinyimagenet_small_common.cfg": dict(SIMCLR, **TINY_SMALL),
    "tinyimagenet_small_simclr.cfg": dict(SIMCLR, **TINY_SMALL),
    "tinyimagenet_small_clae.cfg": dict(SIMCLR, **TINY_SMALL, **CLAE),
}
EXPECTED.update(LARGER)  # test_every_preset_is_pinned reads EXPECTED when it runs
# Training images of each protocol (CIFAR-10: all 50,000; Tiny-ImageNet: 100 of 200 classes).
TRAIN_IMAGES = {"cifar10_full": 50000, "tinyimagenet_small": 200 * 100}


@pytest.mark.parametrize("preset", sorted(LARGER))
def test_larger_protocol_presets_resolve_to_the_recorded_config(monkeypatch, preset):
    _assert_config(_parse(monkeypatch, f"--flagfile=flags/{preset}"), LARGER[preset])


@pytest.mark.parametrize("preset", sorted(p for p in LARGER if "_common" not in p))
def test_larger_protocols_checkpoint_each_epoch_and_end_on_an_online_point(monkeypatch, preset):
    # What the presets' comments promise: a checkpoint per epoch (steps = images // batch, the
    # last partial batch dropped) and the last online kNN on the final model.
    cfg = _parse(monkeypatch, f"--flagfile=flags/{preset}")
    images = TRAIN_IMAGES[preset.rsplit("_", 1)[0]]
    assert cfg.ckpt_every == images // cfg.batch_size
    assert cfg.epochs % cfg.eval_every_epochs == 0
    assert (cfg.train_examples, cfg.robust_examples, cfg.robust_eps, cfg.robust_l2_eps) == (
        0, 1000, "1,2,4,8", "0.25,0.5")


@pytest.mark.parametrize("method, settings", [("plain", PLAIN), ("uel", UEL), ("moco", MOCO)])
def test_full_common_preset_takes_each_methods_settings(monkeypatch, method, settings):
    cfg = _parse(monkeypatch, "--flagfile=flags/cifar10_full_common.cfg", f"--method={method}")
    _assert_config(cfg, dict(settings, **FULL))


@pytest.mark.parametrize("preset", ["cifar10_small_common.cfg", "cifar10_full_common.cfg",
                                    "tinyimagenet_small_common.cfg"])
def test_cpu_presets_run_the_suite_they_ran_before_fab_t(monkeypatch, preset):
    """The CPU protocols' robust evaluation: PGD-20, APGD-CE, APGD-T with 3 targets and Square
    with 1,000 queries, as when autoattack meant that (their kept results): the fast suite, not
    the standard AutoAttack that autoattack now is."""
    cfg = _parse(monkeypatch, f"--flagfile=flags/{preset}")
    assert cfg.robust_attack_list == ("pgd20", "apgd-ce", "apgd-t", "square")
    assert cfg.robust_budgets == dict(robust_apgd_steps=100, robust_targets=3,
                                      robust_square_queries=1000)
