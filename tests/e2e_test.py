"""End-to-end runs of a few steps: the workdir is the record of a run, and a run resumes exactly.

Every app.run compiles the train step (the expensive part on CPU), so the runs are few and shared
by module-scoped fixtures.
"""

import contextlib
import dataclasses
import glob
import io
import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags

from clae_tf import ClaeError
from clae_tf.data import augment, sources
from clae_tf.evaluation import evaluate, monitor
from clae_tf.job import app, checkpoints, export
from clae_tf.runtime import config, distribute

from conftest import tiny_config


def _run(cfg):
    """app.run, returning (output, what it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = app.run(cfg)
    return result, out.getvalue()


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """An uninterrupted 4-step run on digits (checkpoints at 2 and 4, images at 1, 2 and 4)."""
    cfg = tiny_config(tmp_path_factory.mktemp("full"), max_steps=4)
    result, log = _run(cfg)
    return cfg, result, log


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """The same run, interrupted after 2 steps and resumed by re-running with max_steps=4. No
    export and no robust evaluation: `full` has them, and they come after what is compared."""
    base = tmp_path_factory.mktemp("resumed")
    first, first_log = _run(tiny_config(base, max_steps=2, export=False, robust_attacks=""))
    cfg = tiny_config(base, max_steps=4, export=False, robust_attacks="")
    second, second_log = _run(cfg)
    return cfg, first, first_log, second, second_log


def _restore(cfg):
    """A fresh model (and optimizer) restored from the workdir's latest checkpoint."""
    strategy = distribute.make_strategy(cfg)
    state = checkpoints.State(cfg, strategy, 89, 89)
    assert state.restore(model_only=True)
    return state


def _events(run_dir):
    """{tag: {step: kind}} over every TensorBoard event file of the run."""
    tags = {}
    files = glob.glob(os.path.join(run_dir, "tensorboard", "**", "events.out.tfevents.*"),
                      recursive=True)
    assert files
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                kind = value.metadata.plugin_data.plugin_name
                tags.setdefault(value.tag, {})[event.step] = (kind, value)
    return tags


def _scalar(value):
    return float(tf.make_ndarray(value.tensor))


@pytest.mark.slow
def test_run_writes_checkpoints_results_flags_and_events(full):
    cfg, result, log = full
    run_dir = cfg.run_dir
    assert result["workdir"] == run_dir

    ckpt_dir = os.path.join(run_dir, "checkpoints")
    assert tf.train.latest_checkpoint(ckpt_dir).endswith("ckpt-4")
    assert os.path.exists(os.path.join(ckpt_dir, "ckpt-2.index"))  # ckpt_every=2
    reader = tf.train.load_checkpoint(ckpt_dir)
    assert reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 4
    assert "step 4/4" in log

    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    assert results == json.loads(json.dumps(result["results"]))
    for key in ("knn_top1", "linear_top1"):
        assert 0.0 <= results[key] <= 1.0
    assert results["step"] == 4
    assert (results["train_examples"], results["test_examples"], results["num_classes"]) == (
        1437, 360, 10)
    assert results["adversarial"] is True

    tags = _events(run_dir)
    for tag in ("train/loss", "train/clean_loss", "train/adv_loss", "train/contrast_acc",
                "train/learning_rate"):
        assert set(tags[tag]) == {1, 2, 3, 4}, tag  # log_every=1
        assert all(kind == "scalars" for kind, _ in tags[tag].values())
    assert all(np.isfinite(_scalar(v)) for _, v in tags["train/loss"].values())
    assert _scalar(tags["train/adv_loss"][1][1]) > 0  # adversarial: there is an adversarial loss
    for tag in ("eval/knn_top1", "eval/linear_top1"):
        assert set(tags[tag]) == {4}
    assert _scalar(tags["eval/knn_top1"][4][1]) == pytest.approx(results["knn_top1"])
    for tag in ("adversarial/x", "adversarial/x_adv", "adversarial/perturbation_amplified"):
        assert {1, 2, 4} <= set(tags[tag]), tag  # the first step, then every image_every=2
        assert all(kind == "images" for kind, _ in tags[tag].values())

    app.print_summary(result)  # does not fail on a real result


@pytest.mark.slow
def test_flagfile_reproduces_the_config(full):
    cfg, _, _ = full
    path = os.path.join(cfg.run_dir, "flags.cfg")
    with open(path) as f:
        text = f.read()
    assert text.startswith("#")
    saved = config.Config.parse_flagfile(text)
    assert saved["workdir"] == cfg.run_dir
    assert (saved["width"], saved["max_steps"], saved["adversarial"]) == ("0.0625", "4", "True")
    # Parsing it with absl, as `python run.py --flagfile=...` does, gives back the same Config.
    config.define_flags()
    try:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["run.py", f"--flagfile={path}"])
        assert config.from_flags() == cfg
    finally:
        flags.FLAGS.unparse_flags()


def _images(seed=0, n=6, size=16):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.mark.slow
def test_the_exports_have_a_model_card_of_the_runs_numbers(full):
    cfg, result, _ = full
    with open(os.path.join(cfg.run_dir, "README.md"), encoding="utf-8") as f:
        card = f.read()
    with open(os.path.join(cfg.run_dir, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    assert card.startswith("---\nlibrary_name: keras\n")
    assert "these exports are of step 4." in card
    assert f"| {100 * results['knn_top1']:.2f} |" in card
    assert f"| {100 * results['linear_top1']:.2f} |" in card
    assert "- `saved_model`: " in card and "- `encoder.keras`: " in card


@pytest.mark.slow
def test_saved_model_matches_the_model(full):
    cfg, result, _ = full
    path = result["saved_model"]
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    model = _restore(cfg).model
    images = np.concatenate([_images(), np.zeros((1, 16, 16, 3), np.uint8),
                             np.full((1, 16, 16, 3), 255, np.uint8)])

    # serve_uint8, through the package's own check.
    assert export.check_export(path, model, images) < 1e-5

    loaded = tf.saved_model.load(path)
    images01 = images.astype(np.float32) / 255.0
    h, z = model(augment.normalize(tf.constant(images01)), training=False)
    for out in (loaded.serve(tf.constant(images01)), loaded.serve_uint8(tf.constant(images))):
        np.testing.assert_allclose(out["h"].numpy(), h.numpy(), atol=1e-5)
        np.testing.assert_allclose(out["z"].numpy(), z.numpy(), atol=1e-5)
    assert h.shape == (len(images), model.feature_dim) and z.shape == (len(images), cfg.proj_dim)
    np.testing.assert_allclose(np.linalg.norm(z.numpy(), axis=-1), 1.0, atol=1e-5)

    # Any input size is resized to --image_size.
    out = loaded.serve_uint8(tf.constant(_images(n=2, size=40)))
    assert out["h"].shape == (2, model.feature_dim) and out["z"].shape == (2, cfg.proj_dim)

    # The run also wrote the encoder as a .keras file (tests/export_test.py loads it without
    # clae_tf): [0, 1] images in, the same h and z out.
    assert result["encoder_keras"] == os.path.join(cfg.run_dir, "encoder.keras")
    encoder = keras.models.load_model(result["encoder_keras"])
    out = encoder(images01, training=False)
    np.testing.assert_allclose(out["h"].numpy(), h.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["z"].numpy(), z.numpy(), atol=1e-5)

    # And the probe the run's evaluation fitted on this step's h (probe.npz), as a classifier:
    # [0, 1] images in, h @ kernel + bias out.
    probe = evaluate.load_probe(os.path.join(cfg.run_dir, "probe.npz"))
    assert (probe["step"], probe["feature"]) == (4, "h")
    assert result["probe_saved_model"] == os.path.join(cfg.run_dir, "probe_saved_model")
    classifier = tf.saved_model.load(result["probe_saved_model"])
    np.testing.assert_allclose(classifier.serve(tf.constant(images01)).numpy(),
                               h.numpy() @ probe["kernel"] + probe["bias"], atol=1e-4)


@pytest.mark.slow
def test_checkpoint_holds_every_model_variable(full):
    """A model restored in a fresh process state is the trained one: eval gives the same numbers."""
    cfg, result, _ = full
    state = _restore(cfg)
    assert state.step == 4
    # The BN running statistics of every block, clean and adversarial, left their initial values.
    for v in state.model.variables:
        if "moving_mean" in v.path:
            assert np.any(v.numpy() != 0), v.path
    # And the restored clean path is the exported one (exported from the in-memory model).
    loaded = tf.saved_model.load(result["saved_model"])
    images = _images(seed=1)
    h, _ = state.model(augment.normalize(tf.constant(images, tf.float32) / 255.0), training=False)
    np.testing.assert_allclose(loaded.serve_uint8(tf.constant(images))["h"].numpy(), h.numpy(),
                               atol=1e-5)


@pytest.mark.slow
def test_eval_mode_on_a_finished_workdir(full, tmp_path):
    """--mode=eval of the trained checkpoint gives the numbers of the training process's own
    evaluation. (--mode=export over earlier exports: tests/workdir_test.py, whose last export
    replaces those of step 2 with step 4's and checks what they compute.)"""
    cfg, result, _ = full
    # On a copy, so that the other tests see the training run's own results.json.
    cfg = dataclasses.replace(cfg, workdir=str(tmp_path / "copy"))
    shutil.copytree(full[0].run_dir, cfg.run_dir)

    evaluated, _ = _run(dataclasses.replace(cfg, mode="eval"))
    # The same weights as the ones the training process evaluated in memory.
    assert evaluated["results"]["step"] == 4
    assert evaluated["results"]["knn_top1"] == pytest.approx(result["results"]["knn_top1"])
    assert evaluated["results"]["linear_top1"] == pytest.approx(result["results"]["linear_top1"],
                                                                abs=0.02)
    with open(os.path.join(cfg.run_dir, "results.json")) as f:
        assert json.load(f)["knn_top1"] == evaluated["results"]["knn_top1"]
    # eval never trains: still step 4.
    assert tf.train.latest_checkpoint(os.path.join(cfg.run_dir, "checkpoints")).endswith("ckpt-4")


def test_eval_without_a_checkpoint(tmp_path):
    with pytest.raises(ClaeError, match="--workdir"):
        app.run(tiny_config(tmp_path, mode="eval"))


@pytest.mark.slow
def test_interrupted_run_resumes_at_the_right_step(resumed):
    cfg, first, first_log, second, second_log = resumed
    assert first["results"]["step"] == 2 and "Resuming" not in first_log
    assert "step 2/2" in first_log
    assert "Resuming from" in second_log and "ckpt-2 at step 2" in second_log
    assert "step 1/" not in second_log and "step 2/" not in second_log
    assert "step 3/4" in second_log and "step 4/4" in second_log
    assert second["results"]["step"] == 4

    ckpt_dir = os.path.join(cfg.run_dir, "checkpoints")
    assert tf.train.latest_checkpoint(ckpt_dir).endswith("ckpt-4")
    reader = tf.train.load_checkpoint(ckpt_dir)
    assert reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 4

    # Each train step logged once, by the process that ran it.
    files = sorted(glob.glob(os.path.join(cfg.run_dir, "tensorboard", "events.out.tfevents.*")))
    steps = []
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(path):
            steps += [event.step for v in event.summary.value if v.tag == "train/loss"]
    assert sorted(steps) == [1, 2, 3, 4]


@pytest.mark.slow
def test_resumed_run_equals_the_uninterrupted_one(full, resumed):
    full_cfg, full_result, full_log = full
    cfg, _, _, second, second_log = resumed
    # The same losses at steps 3 and 4 ...
    for step in (3, 4):
        line = next(x for x in second_log.splitlines() if x.startswith(f"step {step}/4"))
        reference = next(x for x in full_log.splitlines() if x.startswith(f"step {step}/4"))
        assert line.split("|")[0] == reference.split("|")[0]
    # ... the same variables: weights, BN statistics (clean and adversarial), optimizer state ...
    a = _restore(full_cfg)
    b = _restore(cfg)
    assert a.step == b.step == 4
    worst = max(float(np.max(np.abs(va.numpy() - vb.numpy())))
                for va, vb in zip(a.model.variables + a.optimizer.variables,
                                  b.model.variables + b.optimizer.variables))
    assert worst == 0.0, f"resumed run differs from the uninterrupted one by up to {worst}"
    # ... and the same evaluation.
    assert second["results"]["knn_top1"] == full_result["results"]["knn_top1"]
    assert second["results"]["linear_top1"] == pytest.approx(
        full_result["results"]["linear_top1"], abs=0.02)


def _image_folder(root, classes=3, per_class=6):
    """A small folder dataset with PNG/JPEG, grayscale and odd sizes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"c{c}"), exist_ok=True)
            for i in range(n):
                h, w = int(rng.integers(10, 40)), int(rng.integers(10, 40))
                channels = 1 if i % 3 == 0 else 3
                image = tf.constant(rng.integers(0, 256, (h, w, channels), dtype=np.uint8))
                if i % 2:
                    name, encoded = f"{i}.jpg", tf.io.encode_jpeg(image)
                else:
                    name, encoded = f"{i}.png", tf.io.encode_png(image)
                tf.io.write_file(os.path.join(root, split, f"c{c}", name), encoded)


@pytest.mark.slow
def test_run_on_an_image_folder(tmp_path):
    root = str(tmp_path / "shapes")
    _image_folder(root)
    cfg = tiny_config(tmp_path, dataset=root, batch_size=4, max_steps=2, linear_epochs=1,
                      export=False, adversarial=False)
    result, _ = _run(cfg)
    r = result["results"]
    assert (r["step"], r["dataset"], r["num_classes"], r["train_examples"], r["test_examples"]) == (
        2, "shapes", 3, 18, 6)
    assert 0.0 <= r["knn_top1"] <= 1.0 and 0.0 <= r["linear_top1"] <= 1.0


@pytest.mark.slow
def test_run_on_mocked_tfds_cifar10(tmp_path):
    cfg = tiny_config(tmp_path, dataset="cifar10", batch_size=8, max_steps=2, linear_epochs=1,
                      export=False, adversarial=False)
    with tfds.testing.mock_data(num_examples=32):
        result, _ = _run(cfg)
    r = result["results"]
    assert (r["step"], r["dataset"], r["num_classes"], r["train_examples"]) == (
        2, "cifar10", 10, 32)
    assert 0.0 <= r["knn_top1"] <= 1.0 and 0.0 <= r["linear_top1"] <= 1.0
    # Without --adversarial: no adversarial images.
    tags = _events(cfg.run_dir)
    assert "adversarial/x_adv" not in tags
    assert "train/loss" in tags and "eval/knn_top1" in tags


@pytest.mark.slow
def test_run_mirrored_over_two_virtual_cpus(tmp_path):
    """The same loop under MirroredStrategy (as on several GPUs): logs, checkpoints, the online
    kNN and exports. 48 images, batch 16: 3 steps, the online evaluation after the third."""
    cfg = tiny_config(tmp_path, virtual_cpus=2, train_examples=48, epochs=1, eval_every_epochs=1,
                      online_eval_examples=30, linear_epochs=1, adversarial=False)
    result, log = _run(cfg)
    assert result["results"]["step"] == 3 and "step 3/3" in log
    tags = _events(cfg.run_dir)
    assert "train/learning_rate" in tags
    assert sorted(tags["eval/knn_top1_online"]) == [3]
    one = dataclasses.replace(cfg, virtual_cpus=0)
    state = _restore(one)  # restored on one device
    assert state.step == 3
    # The online kNN of the mirrored model, again from the checkpoint on one device.
    again = monitor.Monitor(one, state.model, sources.load(one), tf.summary.create_noop_writer(),
                            str(tmp_path)).online_eval(3)
    assert again == pytest.approx(_scalar(tags["eval/knn_top1_online"][3][1]))
    assert export.check_export(result["saved_model"], state.model, _images()) < 1e-5
