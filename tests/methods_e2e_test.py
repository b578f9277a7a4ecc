"""A short run of every method, with and without CLAE, on mocked CIFAR-10 (tfds mock_data);
and a MoCo run resumed after an interruption equals the uninterrupted one (queue and key
encoder included)."""

import contextlib
import dataclasses
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from clae_tf.job import app, checkpoints
from clae_tf.runtime import config, distribute, workdir

from conftest import tiny_config


def _run(cfg):
    with contextlib.redirect_stdout(io.StringIO()), tfds.testing.mock_data(num_examples=32):
        return app.run(cfg)


# UEL without CLAE is left out: UEL's loss runs in uel-True's clean term, and the model without
# the adversarial branch at Plain/UEL's settings (linear head, cifar normalisation, SGD) in
# plain-False (UEL differs from Plain in its loss alone: losses_test.py).
@pytest.mark.slow
@pytest.mark.parametrize("method, adversarial", [
    ("plain", False), ("plain", True), ("uel", True), ("moco", False), ("moco", True)])
def test_method_runs_end_to_end(tmp_path, method, adversarial):
    # SimCLR +- CLAE runs end to end in e2e_test.py; the method's own settings apply ("auto").
    cfg = tiny_config(tmp_path, method=method, adversarial=adversarial, dataset="cifar10",
                      batch_size=8, queue_size=16, max_steps=2, linear_epochs=1, export=False)
    defaults = config.METHOD_DEFAULTS[method]
    assert (cfg.temperature, cfg.head, cfg.normalize, cfg.optimizer) == (
        defaults["temperature"], defaults["head"], defaults["normalize"], defaults["optimizer"])
    out = _run(cfg)
    r = out["results"]
    assert (r["method"], r["adversarial"], r["step"]) == (method, adversarial, 2)
    assert 0.0 <= r["knn_top1"] <= 1.0 and 0.0 <= r["linear_top1"] <= 1.0
    # The run's flags record the resolved method settings, so the flagfile reproduces them.
    with open(os.path.join(cfg.run_dir, workdir.FLAGFILE)) as f:
        saved = config.Config.parse_flagfile(f.read())
    assert saved["temperature"] == str(defaults["temperature"])
    assert saved["head"] == defaults["head"] and saved["probe"] == defaults["probe"]


def _moco_cfg(root, steps, export=False):
    # A constant learning rate: the interruption is simulated by --max_steps=2, which would
    # shorten MoCo's cosine schedule (a real resume re-runs the same command, same schedule).
    # No robust evaluation: test_method_runs_end_to_end runs it for MoCo; here only the resume
    # and the export count.
    return tiny_config(root, method="moco", dataset="cifar10", batch_size=8, queue_size=20,
                       max_steps=steps, linear_epochs=1, export=export, lr_schedule="constant",
                       robust_attacks="")


def _moco_state(cfg):
    state = checkpoints.State(cfg, distribute.make_strategy(cfg), 4, 4)
    assert state.restore(model_only=True)
    return state


@pytest.mark.slow
def test_moco_resume_equals_uninterrupted_run(tmp_path):
    full = _moco_cfg(tmp_path / "full", 4, export=True)
    out = _run(full)
    _run(_moco_cfg(tmp_path / "resumed", 2))
    _run(_moco_cfg(tmp_path / "resumed", 4))
    a, b = _moco_state(full), _moco_state(_moco_cfg(tmp_path / "resumed", 4))
    assert a.step == b.step == 4
    assert int(a.method.queue_ptr.numpy()) == int(b.method.queue_ptr.numpy()) == (4 * 8) % 20
    np.testing.assert_allclose(a.method.queue.numpy(), b.method.queue.numpy(), atol=1e-5)
    for x, y in zip(a.method.key_model.variables + a.model.variables,
                    b.method.key_model.variables + b.model.variables):
        np.testing.assert_allclose(x.numpy(), y.numpy(), atol=1e-5, err_msg=x.path)
    # The export is the query encoder alone and reloads without clae_tf.
    loaded = tf.saved_model.load(out["saved_model"])
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    z = loaded.serve_uint8(tf.constant(images))["z"].numpy()
    assert z.shape == (2, full.proj_dim)
    with open(os.path.join(full.run_dir, "results.json")) as f:
        assert json.load(f)["method"] == "moco"


def test_explicit_flags_override_the_method_settings():
    cfg = tiny_config(method="uel", temperature=0.3, optimizer="adam", learning_rate=1e-3)
    assert (cfg.temperature, cfg.optimizer, cfg.learning_rate) == (0.3, "adam", 1e-3)
    assert (cfg.head, cfg.augment, cfg.lr_schedule, cfg.lr_boundaries) == (
        "linear", "uel", "step", (120, 160, 200))
    simclr = dataclasses.replace(cfg, method="simclr")  # resolved values are kept as given
    assert simclr.temperature == 0.3
