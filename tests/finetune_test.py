"""ALF and AFF (clae_tf/evaluation/finetune.py, --mode=finetune in job/finetuning.py): the
recipe, the crops, TRADES' loss against a literal reference, what each fine-tune trains and on
what, resume, the results beside SLF's, the exported classifier, and the flags' checks."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from clae_tf import ClaeError
from clae_tf.evaluation import finetune
from clae_tf.job import app, checkpoints, portable
from clae_tf.method import builders
from clae_tf.runtime import config, distribute, signals, workdir
from clae_tf.runtime.config import Config

from conftest import one_line_error, run_cli, tiny_config


def _encoder(cfg):
    return portable.build_encoder(builders.build_model(cfg), cfg.image_size, cfg.normalize)


def _data(n=24, size=16, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8),
            (np.arange(n) % classes).astype(np.int32))


def _recipe(kind, **overrides):
    values = dict(finetune_epochs=2, finetune_batch_size=8, finetune_attack_steps=2)
    cfg = tiny_config(**{**values, **overrides})
    return finetune.Recipe.from_config(cfg, kind)


# ------------------------------------------------------------------------------- the recipe

def test_the_recipes_are_the_benchmarks_and_scale_their_schedule():
    alf, aff = (finetune.Recipe.from_config(Config(), k) for k in ("alf", "aff"))
    assert (alf.epochs, alf.lr, alf.batch_size, alf.lr_boundaries) == (25, 0.01, 512, (10, 20))
    assert (aff.epochs, aff.lr, aff.batch_size, aff.lr_boundaries) == (25, 0.1, 128, (15, 20))
    for r in (alf, aff):
        assert (r.weight_decay, r.eps, r.step_size, r.attack_steps) == (2e-4, 8.0, 2.0, 10)
    assert (alf.beta, aff.beta) == (None, 6.0)
    # MultiStepLR stepped after each epoch: the 11th epoch (index 10) is the first at lr / 10.
    assert [alf.lr_at(e) for e in (0, 9, 10, 19, 20, 24)] == pytest.approx(
        [0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4])
    # Fewer epochs: the boundaries at the recipe's fractions; given ones as they are.
    assert finetune.Recipe.from_config(Config(finetune_epochs=5), "alf").lr_boundaries == (2, 4)
    assert finetune.Recipe.from_config(Config(finetune_epochs=5), "aff").lr_boundaries == (3, 4)
    assert finetune.Recipe.from_config(Config(finetune_epochs=2), "aff").lr_boundaries == (1, 2)
    assert finetune.Recipe.from_config(Config(finetune_lr_boundaries=(7,)), "aff").lr_boundaries \
        == (7,)
    assert alf.steps_per_epoch(1000) == 2 and aff.steps_per_epoch(1000) == 8  # last one partial


def test_padded_crop_flip_is_a_shifted_window_of_the_padded_image():
    x = np.random.default_rng(0).uniform(0, 1, (16, 6, 6, 3)).astype(np.float32)
    out = finetune.padded_crop_flip(tf.constant(x), tf.constant([3, 4])).numpy()
    padded = np.pad(x, [(0, 0), (4, 4), (4, 4), (0, 0)])
    found = set()
    for i in range(len(x)):
        matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (0, 1)
                   if np.array_equal(out[i], (lambda w: w[:, ::-1] if flip else w)(
                       padded[i, dy:dy + 6, dx:dx + 6]))]
        assert matches, i
        found |= set(matches)
    assert len(found) > 8 and {m[2] for m in found} == {0, 1}  # offsets and flips vary
    again = finetune.padded_crop_flip(tf.constant(x), tf.constant([3, 4])).numpy()
    np.testing.assert_array_equal(out, again)  # stateless
    assert not np.array_equal(out, finetune.padded_crop_flip(tf.constant(x),
                                                             tf.constant([3, 5])).numpy())


# --------------------------------------------------------------------------------------- TRADES

def test_trades_loss_against_a_literal_reference():
    """softmax([0, ln 3]) = (1/4, 3/4) and softmax([0, 0]) = (1/2, 1/2): TRADES' KL is
    KL(p(x) || p(x_adv)) = 1/4 ln(1/2) + 3/4 ln(3/2) (the other direction would be
    1/2 ln 2 + 1/2 ln(2/3))."""
    nat = tf.constant([[0.0, np.log(3.0)], [0.0, np.log(3.0)]])
    adv = tf.constant([[0.0, 0.0], [0.0, 0.0]])
    y = tf.constant([1, 0])
    kl = 0.25 * np.log(0.5) + 0.75 * np.log(1.5)
    assert kl != pytest.approx(0.5 * np.log(2) + 0.5 * np.log(2 / 3))
    np.testing.assert_allclose(finetune.trades_kl(nat, adv).numpy(), [kl, kl], rtol=1e-6)
    ce = (-np.log(0.75) - np.log(0.25)) / 2
    assert float(finetune.trades_loss(nat, adv, y, 6.0)) == pytest.approx(ce + 6 * kl, rel=1e-6)


def test_trades_loss_against_numpy_on_random_logits():
    rng = np.random.default_rng(1)
    nat, adv = rng.normal(size=(2, 7, 5)) * 3
    y = rng.integers(0, 5, 7)

    def softmax(v):
        e = np.exp(v - v.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    p, q = softmax(nat), softmax(adv)
    want = np.mean(-np.log(p[np.arange(7), y])) + 2.5 * np.mean(np.sum(p * np.log(p / q), -1))
    got = finetune.trades_loss(tf.constant(nat, tf.float32), tf.constant(adv, tf.float32),
                               tf.constant(y), 2.5)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # Gradients flow through both logits (TRADES does not detach softmax(f(x))).
    nat_t, adv_t = tf.Variable(nat, dtype=tf.float32), tf.Variable(adv, dtype=tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        kl = tf.reduce_mean(finetune.trades_kl(nat_t, adv_t))
    assert np.abs(tape.gradient(kl, nat_t).numpy()).max() > 0
    assert np.abs(tape.gradient(kl, adv_t).numpy()).max() > 0


# ------------------------------------------------------------------------------ the fine-tunes

def test_alf_trains_the_head_on_adversarial_inputs_and_leaves_the_encoder(tmp_path):
    cfg = tiny_config()
    encoder = _encoder(cfg)
    before = [w.copy() for w in encoder.get_weights()]
    recipe = _recipe("alf", finetune_batch_size=24)
    images, labels = _data()
    tuner = finetune.Tuner(recipe, encoder, 3, str(tmp_path / "alf"))
    assert tuner.encoder is encoder and len(tuner.variables) == 2  # the head's kernel and bias
    x, x_adv = (v.numpy() for v in tuner.inputs(tf.constant(images), tf.constant(labels)))
    eps = 8 / 255
    assert 0 < np.abs(x_adv - x).max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    # The first step from the zero head: kernel = -lr * dCE/dkernel at the ADVERSARIAL features.
    tuner._train_step = tuner._build_step(images.shape[1:])
    tuner._train_step(tf.constant(images), tf.constant(labels), tf.constant(0.01))
    assert int(tuner.step.numpy()) == 1
    for a, b in zip(before, encoder.get_weights()):
        np.testing.assert_array_equal(a, b)  # the encoder, BN statistics included, unchanged

    def first_kernel(inputs):
        h = encoder(inputs, training=False)["h"].numpy().astype(np.float64)
        residual = np.full((24, 3), 1 / 3) - np.eye(3)[labels]  # softmax(0) - onehot
        return -0.01 * h.T @ residual / 24
    kernel = tuner.head.kernel.numpy()
    off_adv = np.abs(kernel - first_kernel(x_adv)).max()
    off_clean = np.abs(kernel - first_kernel(x)).max()
    assert off_adv < 1e-3 * np.abs(kernel).max() and off_clean > 100 * off_adv, (off_adv,
                                                                                 off_clean)


@pytest.mark.slow  # tracing the TRADES step alone takes 5-10 s on 2 shared cores
def test_aff_trains_a_copy_of_the_encoder_with_trades(tmp_path):
    cfg = tiny_config()
    encoder = _encoder(cfg)
    before = [w.copy() for w in encoder.get_weights()]
    recipe = _recipe("aff", finetune_batch_size=24)
    images, labels = _data()
    tuner = finetune.Tuner(recipe, encoder, 3, str(tmp_path / "aff"))
    assert tuner.encoder is not encoder
    # Conv kernels and BN gammas/betas of the encoder the features depend on, then the head.
    names = [v.path for v in tuner.variables]
    assert names[-2:] == ["head/kernel", "head/bias"] and "stem_conv/kernel" in names
    assert not any(n.startswith("proj_") for n in names)  # the head reads h, not z
    x, x_adv = tuner.inputs(tf.constant(images), tf.constant(labels))
    delta = np.abs((x_adv - x).numpy())
    assert 0 < delta.max() <= 8 / 255 + 1e-6
    # Its loss is TRADES' of the train-mode logits of x and x_adv.
    want = finetune.trades_loss(tuner.logits(x, training=True), tuner.logits(x_adv, training=True),
                                tf.constant(labels), 6.0)
    tuner._train_step = tuner._build_step(images.shape[1:])
    got = tuner._train_step(tf.constant(images), tf.constant(labels), tf.constant(0.1))
    assert float(got) == pytest.approx(float(want), rel=1e-4)
    for a, b in zip(before, encoder.get_weights()):
        np.testing.assert_array_equal(a, b)  # the caller's encoder is the pretrained one
    changed = [not np.array_equal(a, b) for a, b in zip(before, tuner.encoder.get_weights())]
    assert sum(changed) > len(changed) // 2


@pytest.mark.slow  # three fine-tunes, each traced: ~5 s
def test_a_stopped_fine_tune_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Stopped at step 3 of 6 (a stop request taken between batches), it saves, says how to
    resume, and a new process ends with the weights of a fine-tune that never stopped."""
    cfg = tiny_config()
    encoder = _encoder(cfg)
    recipe = _recipe("alf", finetune_epochs=3)  # 24 images in batches of 8: 3 steps an epoch
    images, labels = _data()
    whole = finetune.Tuner(recipe, encoder, 3, str(tmp_path / "whole"))
    whole.train(images, labels, log=lambda line: None)
    assert int(whole.step.numpy()) == 9

    stopped = finetune.Tuner(recipe, encoder, 3, str(tmp_path / "stopped"))
    check = signals.check

    def stop_at_4():  # as a Ctrl-C that came during step 4 (once)
        if int(stopped.step.numpy()) == 4 and not stops:
            stops.append(4)
            raise signals.Interrupted(2)
        check()
    stops = []
    monkeypatch.setattr(signals, "check", stop_at_4)
    with signals.handling():
        with pytest.raises(ClaeError, match=r"^interrupted at ALF step 4 of 9 \(epoch 2 of 3\); "
                                            r"checkpoint saved in .*stopped; run the same"):
            stopped.train(images, labels, log=lambda line: None)
    monkeypatch.setattr(signals, "check", check)
    resumed = finetune.Tuner(recipe, encoder, 3, str(tmp_path / "stopped"))
    assert resumed.restore() == 4
    resumed.train(images, labels, log=lambda line: None)
    for a, b in zip(whole.head.get_weights() + [v.numpy() for v in whole.buffers],
                    resumed.head.get_weights() + [v.numpy() for v in resumed.buffers]):
        np.testing.assert_allclose(a, b, atol=1e-7)


def test_prepare_resumes_refuses_other_flags_and_restarts(tmp_path):
    directory = str(tmp_path / "finetune_alf")
    recipe = _recipe("alf")
    assert finetune.prepare(directory, recipe, 7, restart=False) is None
    open(os.path.join(directory, "ckpt-1.index"), "w").close()
    assert finetune.prepare(directory, recipe, 7, restart=False) is None  # resumes: kept
    assert os.path.exists(os.path.join(directory, "ckpt-1.index"))
    with pytest.raises(ClaeError, match=r"^--finetune_lr: .* made with --finetune_lr=0.01 "
                                        r"\(now 0.5\); .* --finetune_restart to start over$"):
        finetune.prepare(directory, dataclasses.replace(recipe, lr=0.5), 7, restart=False)
    note = finetune.prepare(directory, recipe, 9, restart=False)  # the run trained on since
    assert "encoder of step 7, not 9" in note
    assert not os.path.exists(os.path.join(directory, "ckpt-1.index"))
    open(os.path.join(directory, "ckpt-1.index"), "w").close()
    finetune.prepare(directory, dataclasses.replace(recipe, lr=0.5), 9, restart=True)
    assert os.listdir(directory) == ["recipe.json"]


# ------------------------------------------------------------------------- --mode=finetune

@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A workdir with a (step 3) checkpoint and SLF's results, fine-tuned by ALF and AFF."""
    tmp = tmp_path_factory.mktemp("finetune")
    cfg = tiny_config(tmp, train_examples=48, finetune_epochs=1, finetune_batch_size=16,
                      finetune_attack_steps=1, robust_examples=8, robust_attacks="fgsm")
    workdir.write_flagfile(cfg)
    checkpoints.State(cfg, distribute.make_strategy(cfg), 4, 4).manager.save(checkpoint_number=3)
    slf = {"linear_top1": 0.5, "knn_top1": 0.25, "step": 3, "robust_clean_top1": 0.5,
           "robust_top1": {"worst": {"8": 0.125}}}
    workdir.update_results(cfg.run_dir, slf)
    cfg = dataclasses.replace(cfg, mode="finetune")
    return cfg, slf, app.run(cfg)


@pytest.mark.slow  # ALF and AFF of a checkpoint, each evaluated and exported: ~20-30 s
def test_finetune_mode_writes_beside_slf_exports_and_skips_when_done(finetuned, capsys):
    cfg, slf, out = finetuned
    results = json.load(open(os.path.join(cfg.run_dir, "results.json")))
    assert {k: results[k] for k in slf} == slf  # SLF's entries as they were
    for kind in ("alf", "aff"):
        r = results[kind]
        assert r == out["finetune"][kind]
        assert r["encoder_step"] == 3 and r["recipe"]["kind"] == kind and r["test_examples"] == 360
        assert 0 <= r["top1"] <= 1 and r["robust_examples"] == 8
        assert set(r["robust_top1"]) == {"fgsm", "worst"}
        assert r["eval_flags"]["robust_attacks"] == "fgsm"
    app.print_summary(out)
    printed = capsys.readouterr().out
    assert "ALF top-1:    " in printed and "AFF top-1:    " in printed
    assert f"Classifier:   {os.path.join(cfg.run_dir, 'aff_saved_model')}" in printed
    # Done: the same command skips both; another robust suite evaluates again, without training.
    again = app.run(cfg)
    assert again["finetune"] == out["finetune"]
    assert "ALF of the encoder of step 3 is done" in capsys.readouterr().out
    other = app.run(dataclasses.replace(cfg, robust_attacks="", finetune="alf"))
    assert "robust_top1" not in other["finetune"]["alf"]
    assert other["finetune"]["alf"]["train_seconds_this_process"] < 1  # nothing left to train
    assert json.load(open(os.path.join(cfg.run_dir, "results.json")))["aff"] == out["finetune"][
        "aff"]


@pytest.mark.slow  # shares the fixture above
@pytest.mark.parametrize("kind", ["alf", "aff"])
def test_the_exported_classifier_is_the_fine_tuned_one_with_the_probes_checks(finetuned, kind):
    cfg, _, out = finetuned
    path = out["finetune_exports"][kind]
    assert path == workdir.finetune_paths(cfg.run_dir, kind)["export"]
    loaded = tf.saved_model.load(path)
    info = json.load(open(os.path.join(path, "finetune.json")))
    assert (info["kind"], info["encoder_step"], info["top1"]) == (
        kind, 3, out["finetune"][kind]["top1"])
    images, _ = _data(4)
    recipe = finetune.Recipe.from_config(cfg, kind)
    state = checkpoints.State(cfg, distribute.make_strategy(cfg))
    state.restore(model_only=True)
    tuner = finetune.Tuner(recipe, portable.build_encoder(state.model, 16, cfg.normalize), 10,
                           workdir.finetune_paths(cfg.run_dir, kind)["checkpoints"])
    assert tuner.restore() == 3  # 48 images in batches of 16, one epoch
    want = tuner.logits(tf.constant(images / 255.0, tf.float32)).numpy()
    np.testing.assert_allclose(loaded.serve_uint8(images).numpy(), want, atol=1e-4)
    np.testing.assert_allclose(loaded.serve(tf.constant(images / 255.0, tf.float32)).numpy(),
                               want, atol=1e-4)
    for bad, says in ((images.astype(np.float32), "got values from"),
                      (images[0], "takes images of shape (N, H, W, 3)"),
                      (images / 255.0 * np.nan, "NaN or infinite values")):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)serve: .*" + says.replace(
                "(", r"\(").replace(")", r"\)")):
            loaded.serve(tf.constant(bad, tf.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="serve_uint8: takes uint8 images"):
        loaded.serve_uint8(tf.constant(images, tf.float32))


def test_finetune_mode_needs_a_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, mode="finetune", finetune="alf")
    workdir.write_flagfile(cfg)
    with pytest.raises(ClaeError, match="^--workdir: no checkpoint in .* to fine-tune$"):
        app.run(cfg)


# ------------------------------------------------------------------------------------ the flags

@pytest.mark.parametrize("flags, flag, words", [
    (dict(finetune="alf,sff"), "finetune", "unknown fine-tune 'sff'"),
    (dict(finetune="slf"), "finetune", "SLF is the linear probe of --mode=eval"),
    (dict(finetune="alf,"), "finetune", "a comma too many?"),
    (dict(finetune="", mode="finetune"), "finetune", "nothing to fine-tune"),
    (dict(finetune_epochs=-1), "finetune_epochs", "or 0 for the recipe's"),
    (dict(finetune_batch_size=-8), "finetune_batch_size", "or 0 for the recipe's"),
    (dict(finetune_lr=-0.1), "finetune_lr", "must be > 0"),
    (dict(finetune_lr=float("nan")), "finetune_lr", "finite number"),
    (dict(finetune_lr_boundaries=(20, 10)), "finetune_lr_boundaries", "increasing"),
    (dict(finetune_lr_boundaries=(0,)), "finetune_lr_boundaries", ">= 1"),
    (dict(finetune_weight_decay=-1e-4), "finetune_weight_decay", ">= 0"),
    (dict(finetune_eps=0.0), "finetune_eps", "(0, 255]"),
    (dict(finetune_eps=300.0), "finetune_eps", "(0, 255]"),
    (dict(finetune_step_size=-2.0), "finetune_step_size", "(0, 255]"),
    (dict(finetune_attack_steps=0), "finetune_attack_steps", ">= 1"),
    (dict(trades_beta=-1.0), "trades_beta", ">= 0"),
    (dict(trades_beta=float("inf")), "trades_beta", "finite number"),
])
def test_bad_finetune_flags_name_the_flag(flags, flag, words):
    with pytest.raises(ClaeError) as e:
        Config(**flags)
    assert str(e.value).startswith(f"--{flag}: ") and words in str(e.value)
    assert "\n" not in str(e.value)
    Config(**{k: v for k, v in flags.items() if k == "mode"})  # the defaults pass


def test_finetune_flags_stay_out_of_the_runs_flags_cfg():
    """They say what --mode=finetune does with a run, not what the run is: recorded with the
    results (results.json <kind>.recipe), never in flags.cfg."""
    names = {f.name for f in dataclasses.fields(Config)
             if f.name.startswith(("finetune", "trades_"))}
    assert names == set(config.FINETUNE_FLAGS)
    text = Config(finetune="aff", trades_beta=3.0, finetune_restart=True).to_flagfile()
    assert not [line for line in text.splitlines()
                if line.lstrip("-").removeprefix("no").startswith(("finetune", "trades_"))]


@pytest.mark.parametrize("args, flag", [
    (["--mode=finetune", "--finetune=alf,sff"], "--finetune"),
    (["--mode=finetune", "--trades_beta=-1"], "--trades_beta"),
])
def test_bad_finetune_values_fail_before_tensorflow(tmp_path, args, flag):
    proc = run_cli([f"--workdir={tmp_path / 'run'}"] + args, tmp_path, tensorflow=False)
    one_line_error(proc, flag)
    assert not (tmp_path / "run").exists()
