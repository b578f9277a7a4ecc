"""evaluate.evaluate end to end on a toy where h and z give different answers: the kNN must read
z, the linear probe h (or z with --probe=z), and results.json / probe.npz must say so.

The toy "encoder" reads its features straight from the pixels (no training), so numpy computes
them, and the expected accuracies, from the same uint8 images:
  - h (row 0 of the image): the label one-hot, as +-1. Any linear probe on h can reach 100 %.
  - z (row 1): the label's GROUP ({0, 1} or {2, 3}) and a jitter, L2-normalised. Each test image
    of class 0 (2) has a twin of class 1 (3) with the same pixels in row 1, hence the same z:
    whatever a classifier on z predicts for the pair, at most one of the two is right, so no
    classifier on z exceeds 50 % here, and one that gets the group right scores exactly 50 %.
The kNN's expectation is conftest.numpy_knn_predict on z (and on h it would be 100 %).
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from clae_tf.data import sources
from clae_tf.evaluation import evaluate
from clae_tf.runtime import config, workdir

from conftest import numpy_knn_predict

S = 8  # image side
CLASSES = 4
PER_CLASS = 16  # training images per class
PAIRS = 8  # test twins per group: 2 * PAIRS test images per group, PAIRS per class


def _images(labels, jitter):
    """uint8 (N, S, S, 3): row 0 the one-hot label (255 / 0), row 1 (group A, group B, jitter)."""
    x = np.zeros((len(labels), S, S, 3), np.uint8)
    x[np.arange(len(labels)), 0, labels, 0] = 255
    group_b = labels >= 2
    x[:, 1, 0, 0] = np.where(group_b, 0, 255)
    x[:, 1, 1, 0] = np.where(group_b, 255, 0)
    x[:, 1, 2, 0] = jitter
    return x


def _toy_source():
    rng = np.random.default_rng(0)
    train_y = np.repeat(np.arange(CLASSES), PER_CLASS)
    # Distinct jitters: no two training images have the same z, so no similarity ties.
    train_jitter = rng.permutation(256)[:len(train_y)]
    test_y = np.tile([0, 1, 2, 3], PAIRS)  # twins: (0, 1) and (2, 3), side by side
    test_jitter = np.repeat(rng.integers(0, 256, size=2 * PAIRS), 2)  # twins share a jitter
    train_x, test_x = _images(train_y, train_jitter), _images(test_y, test_jitter)

    def split(x, y):
        return sources.Split(tf.data.Dataset.from_tensor_slices((x, y.astype(np.int32))), len(y),
                          labels=y)

    return sources.Source("toy", split(train_x, train_y), split(test_x, test_y), CLASSES), \
        (train_x, train_y, test_x, test_y)


def toy_model(x, training=False):
    """(h, z) of normalised images ("half": pixel p -> 2 p / 255 - 1), as a ContrastiveModel."""
    del training
    return x[:, 0, :CLASSES, 0], tf.math.l2_normalize(x[:, 1, :3, 0], axis=-1)


def _numpy_features(x):
    """(h, z) of uint8 images, computed in numpy as the toy model defines them."""
    pixels = x.astype(np.float64) / 255.0 * 2.0 - 1.0
    h = pixels[:, 0, :CLASSES, 0]
    z = pixels[:, 1, :3, 0]
    return h, z / np.linalg.norm(z, axis=1, keepdims=True)


def _best_possible(features, labels):
    """The highest accuracy ANY classifier of these features reaches on (features, labels):
    each distinct feature vector counts its most frequent label."""
    groups = {}
    for f, y in zip(np.round(features, 6), labels):
        groups.setdefault(f.tobytes(), []).append(int(y))
    return sum(np.bincount(ys).max() for ys in groups.values()) / len(labels)


@pytest.mark.parametrize("probe", ["h", "z"])
def test_knn_reads_z_and_the_probe_reads_its_flag(tmp_path, probe):
    cfg = config.Config(workdir=str(tmp_path), probe=probe, normalize="half", knn_k=5,
                        knn_sigma=0.1, linear_epochs=30, linear_lr=0.05, linear_batch_size=16,
                        robust_eps="")
    source, (train_x, train_y, test_x, test_y) = _toy_source()
    train_h, train_z = _numpy_features(train_x)
    test_h, test_z = _numpy_features(test_x)

    def knn(train_f, test_f):
        return np.mean(numpy_knn_predict(train_f, train_y, test_f, CLASSES, 5, 0.1) == test_y)

    # The toy tells the features apart: kNN 50 % on z and 100 % on h, probe 100 % / 50 %.
    assert (knn(train_z, test_z), knn(train_h, test_h)) == (0.5, 1.0)
    best = {"h": _best_possible(test_h, test_y), "z": _best_possible(test_z, test_y)}
    assert best == {"h": 1.0, "z": 0.5}

    results = evaluate.evaluate(cfg, toy_model, source, step=3)
    assert results["knn_top1"] == knn(train_z, test_z)
    # Trained on the features of --probe, the probe reaches the best that they allow.
    assert results["linear_top1"] == best[probe]
    with open(os.path.join(cfg.run_dir, "results.json")) as f:
        saved = json.load(f)
    assert (saved["knn_top1"], saved["linear_top1"], saved["step"]) == (0.5, best[probe], 3)
    assert (saved["train_examples"], saved["test_examples"]) == (CLASSES * PER_CLASS, 4 * PAIRS)
    saved_probe = evaluate.load_probe(os.path.join(cfg.run_dir, workdir.PROBE_FILE))
    assert saved_probe["feature"] == probe and saved_probe["step"] == 3
    # The saved weights are the probe that scored: its predictions on numpy's features.
    features = test_h if probe == "h" else test_z
    pred = np.argmax(features @ saved_probe["kernel"] + saved_probe["bias"], axis=1)
    assert np.mean(pred == test_y) == best[probe]
