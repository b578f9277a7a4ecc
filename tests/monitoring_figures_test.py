"""scripts/monitoring_figures.py on a fake finished run: reads the projector files and the
neighbour pictures back and writes the README's two PNGs."""

import importlib.util
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from clae_tf.evaluation import visualize
from clae_tf.runtime.config import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "monitoring_figures.py")
_spec = importlib.util.spec_from_file_location("monitoring_figures", SCRIPT)
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)


def test_figures_from_a_fake_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    workdir = str(tmp_path / "run")
    logdir = os.path.join(workdir, "tensorboard")
    os.makedirs(logdir)
    with open(os.path.join(workdir, "flags.cfg"), "w") as f:
        f.write(Config(workdir=workdir).to_flagfile())
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"num_classes": 3, "step": 20, "knn_top1": 0.5, "epochs": 2.0,
                   "train_seconds_this_process": 100.0}, f)
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 3
    features = rng.normal(size=(30, 4)) + 3 * labels[:, None]
    images = rng.integers(0, 256, size=(30, 8, 8, 3), dtype=np.uint8)
    visualize.write_projector(logdir, "test_z", features, labels, images, np.arange(30))
    # The projector's files read back as written (the sprite cut into its thumbnails).
    got_features, got_labels, thumbs, name = figures.read_projector(logdir)
    np.testing.assert_allclose(got_features, features, rtol=1e-5)
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(thumbs, images)
    assert name == "test_z"
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for step, seconds in ((10, 4.0), (20, 5.0)):
            picture = np.full((20, 30, 3), step, np.uint8)
            tf.summary.image("monitor/nearest_neighbours", picture[None], step=step)
            tf.summary.scalar("eval/knn_top1_online", step / 40, step=step)
            tf.summary.scalar("eval/online_seconds", seconds, step=step)
    writer.flush()
    pictures = figures.neighbour_pictures(logdir)
    assert sorted(pictures) == [10, 20] and pictures[20].shape == (20, 30, 3)
    assert int(pictures[20][0, 0, 0]) == 20
    out = str(tmp_path / "out")
    figures.main([f"--workdir={workdir}", f"--out={out}"])
    for png in ("projector.png", "nearest_neighbours.png"):
        assert tf.io.decode_png(tf.io.read_file(os.path.join(out, png))).shape[0] > 100
    printed = capsys.readouterr().out
    # 50 s of train steps per epoch: 4 s is 8%, 5 s 10%.
    assert "step 10: 4.0 s = 8.0%" in printed and "step 20: 5.0 s = 10.0%" in printed
    assert "step 10: 25.0%, step 20: 50.0%" in printed
