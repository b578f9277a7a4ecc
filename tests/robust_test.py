"""Robust evaluation (clae_tf/robust.py), the probe's weights and its SavedModel export."""

import dataclasses
import glob
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config

from clae_tf import app, builders, checkpoints, data, distribute, evaluate, export, robust


def _linear(w, b):
    return lambda v: tf.matmul(tf.reshape(v, [tf.shape(v)[0], -1]), w) + b


def _pairwise_worst_margins(w, b, x, y, eps):
    """(n, C) worst-case margins over the L-inf ball: (w_y - w_j).x + b_y - b_j - eps ||w_y - w_j||_1
    (+inf for j = y)."""
    n, c = len(y), w.shape[1]
    out = np.full((n, c), np.inf)
    for j in range(c):
        d = w[:, y].T - w[:, j][None, :]  # (n, D)
        out[:, j] = np.sum(d * x, axis=1) + b[y] - b[j] - eps * np.abs(d).sum(axis=1)
    out[np.arange(n), y] = np.inf
    return out


def test_binary_linear_robust_accuracy_is_the_closed_form():
    rng = np.random.default_rng(1)
    n, d = 400, 8
    w = rng.normal(size=(d, 2)).astype(np.float32)
    b = (np.array([0.1, -0.1]) - 0.5 * w.sum(axis=0)).astype(np.float32)  # centred at x = 0.5
    x = rng.uniform(0.2, 0.8, size=(n, d)).astype(np.float32)  # [0, 1] clipping never binds
    y = np.argmax(x @ w + b + rng.normal(scale=0.3, size=(n, 2)), axis=1).astype(np.int32)
    eps_list = [4.0, 16.0]  # in 1/255
    margins = {e: _pairwise_worst_margins(w, b, x, y, e / 255.0).min(axis=1) for e in eps_list}
    clean_margin = _pairwise_worst_margins(w, b, x, y, 0.0).min(axis=1)
    # No example within round-off of a decision (ties would make the count ill-defined).
    keep = np.abs(clean_margin) > 1e-3
    for e in eps_list:
        keep &= np.abs(margins[e]) > 1e-3
    x, y = x[keep], y[keep]
    out = robust.robust_accuracy(_linear(w, b), x.reshape(-1, 2, 4, 1), y, eps_list, batch_size=64)
    assert out["clean_top1"] == pytest.approx(np.mean(clean_margin[keep] > 0))
    for e in eps_list:
        expected = np.mean(margins[e][keep] > 0)
        assert 0.1 < expected < out["clean_top1"] - 0.05  # not vacuous
        for attack in ("pgd20", "fgsm"):
            assert out["robust_top1"][attack][robust.eps_key(e)] == pytest.approx(expected)


def test_multiclass_linear_robust_accuracy_is_bounded_by_the_closed_form():
    """Several classes: an example is robust iff every pairwise worst margin stays > 0 (the min
    over the ball of the min over j is the min over j of each closed form), so exact robust
    accuracy is the closed form; an attack can only report as much or more, and never more than
    clean."""
    rng = np.random.default_rng(2)
    n, d, c = 300, 10, 5
    w = rng.normal(size=(d, c)).astype(np.float32)
    b = (rng.normal(size=c) * 0.1 - 0.5 * w.sum(axis=0)).astype(np.float32)  # centred at 0.5
    x = rng.uniform(0.2, 0.8, size=(n, d)).astype(np.float32)
    y = np.argmax(x @ w + b + rng.normal(scale=0.3, size=(n, c)), axis=1).astype(np.int32)
    eps_list = [4.0, 16.0]
    out = robust.robust_accuracy(_linear(w, b), x.reshape(-1, 2, 5, 1), y, eps_list, batch_size=128)
    clean = np.mean(np.argmax(x @ w + b, axis=1) == y)
    assert out["clean_top1"] == pytest.approx(clean)
    for e in eps_list:
        exact = np.mean(_pairwise_worst_margins(w, b, x, y, e / 255.0).min(axis=1) > 0)
        assert exact < clean - 0.05  # the radius matters
        for attack in ("pgd20", "fgsm"):
            acc = out["robust_top1"][attack][robust.eps_key(e)]
            assert exact - 1e-9 <= acc <= clean + 1e-9, (attack, e)
        # PGD-20 finds most of the non-robust examples.
        assert out["robust_top1"]["pgd20"][robust.eps_key(e)] - exact < 0.5 * (clean - exact)


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(adversarial=False)
    tf.keras.utils.set_random_seed(0)
    model = builders.build_model(cfg)
    probe = keras.layers.Dense(10)
    probe.build((None, model.feature_dim))
    return cfg, model, probe


def test_eps_zero_is_clean_and_robust_never_exceeds_clean(tiny):
    cfg, model, probe = tiny
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (40, 16, 16, 3)).astype(np.float32)
    logits_fn = robust.classifier(model, probe, cfg.normalize, "h")
    # Labels = the clean predictions for most, so that clean accuracy is high and attacks matter.
    pred = np.argmax(logits_fn(tf.constant(images)).numpy(), axis=1)
    labels = np.where(np.arange(40) % 4 == 0, (pred + 1) % 10, pred).astype(np.int32)
    out = robust.robust_accuracy(logits_fn, images, labels, [0.0, 64.0], batch_size=40)
    assert out["clean_top1"] == pytest.approx(0.75)
    for attack in ("pgd20", "fgsm"):
        assert out["robust_top1"][attack]["0"] == out["clean_top1"]
        assert out["robust_top1"][attack]["64"] <= out["clean_top1"]
    assert out["robust_top1"]["pgd20"]["64"] < out["clean_top1"]  # the attack does something


def test_balanced_subset():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7 + [0, 1, 2] * 2)
    idx = robust.balanced_subset(labels, 9)
    assert np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [3, 3, 3]
    # The first examples of each class, in split order.
    assert idx.tolist() == [0, 1, 2, 10, 11, 12, 13, 14, 15]
    idx = robust.balanced_subset(labels, 14)  # class 1 has only 5: the others fill in
    counts = np.bincount(labels[idx]).tolist()
    assert sum(counts) == 14 and counts[1] == 5 and abs(counts[0] - counts[2]) <= 1
    assert robust.balanced_subset(labels, 0).tolist() == list(range(len(labels)))
    assert robust.balanced_subset(labels, 100).tolist() == list(range(len(labels)))


def test_load_subset_reads_the_chosen_test_images():
    cfg = tiny_config()
    split = data.load(cfg).test
    images, labels = robust.load_subset(split, 50)
    index = robust.balanced_subset(split.labels, 50)
    assert images.shape == (50, 16, 16, 3) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    np.testing.assert_array_equal(labels, split.labels[index])
    everything = np.stack([x.numpy() for x, _ in split.images])
    np.testing.assert_array_equal(images, everything[index].astype(np.float32) / 255.0)
    assert np.bincount(labels, minlength=10).tolist() == [5] * 10


def test_linear_top1_is_linear_probe_accuracy_and_the_layer_reproduces_it():
    rng = np.random.default_rng(0)
    train_h, test_h = rng.normal(size=(200, 6)), rng.normal(size=(50, 6))
    train_y, test_y = (train_h[:, 0] > 0).astype(int), (test_h[:, 0] > 0).astype(int)
    acc = evaluate.linear_top1(train_h, train_y, test_h, test_y, 2, epochs=20, lr=0.05)
    acc2, layer = evaluate.linear_probe(train_h, train_y, test_h, test_y, 2, epochs=20, lr=0.05)
    assert acc == acc2 and acc > 0.8
    pred = np.argmax(layer(tf.constant(test_h, tf.float32)).numpy(), axis=1)
    assert np.mean(pred == test_y) == acc


@pytest.mark.parametrize("feature", ["h", "z"])
def test_probe_saved_model_gives_the_in_memory_logits(tiny, tmp_path, feature):
    cfg, model, _ = tiny
    dim = model.feature_dim if feature == "h" else cfg.proj_dim
    probe = keras.layers.Dense(10)
    probe.build((None, dim))
    rng = np.random.default_rng(1)
    probe.set_weights([rng.normal(size=(dim, 10)).astype(np.float32),
                       rng.normal(size=10).astype(np.float32)])
    evaluate.save_probe(str(tmp_path / "probe.npz"), probe, feature, 7)
    saved = evaluate.load_probe(str(tmp_path / "probe.npz"))
    assert saved["feature"] == feature and saved["step"] == 7
    path = str(tmp_path / "probe_saved_model")
    export.export_probe(cfg, model, saved, path)
    loaded = tf.saved_model.load(path)
    images = rng.uniform(0, 1, (5, 16, 16, 3)).astype(np.float32)
    expected = robust.classifier(model, probe, cfg.normalize, feature)(tf.constant(images))
    np.testing.assert_allclose(loaded.serve(tf.constant(images)).numpy(), expected.numpy(),
                               atol=1e-5)
    assert loaded.serve(tf.zeros([2, 40, 40, 3])).shape == (2, 10)  # any size is resized


@pytest.mark.slow  # > 10 s on the 2 shared cores
def test_export_mode_without_a_probe_says_so(tmp_path):
    cfg = tiny_config(tmp_path)
    app.write_flagfile(cfg)
    checkpoints.State(cfg, distribute.make_strategy(cfg), 89, 89).manager.save(checkpoint_number=0)
    out = app.run(dataclasses.replace(cfg, mode="export"))
    assert os.path.exists(os.path.join(out["saved_model"], "saved_model.pb"))
    assert "probe_saved_model" not in out
    assert "no linear probe" in out["probe_note"] and "\n" not in out["probe_note"]
    assert not os.path.exists(os.path.join(cfg.run_dir, "probe_saved_model"))


def _tags(run_dir):
    tags = {}
    for path in glob.glob(os.path.join(run_dir, "tensorboard", "**", "events.out.tfevents.*"),
                          recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags[value.tag] = float(tf.make_ndarray(value.tensor))
    return tags


@pytest.mark.slow  # three evaluations of the tiny model on digits and two exports (~40 s alone)
def test_eval_mode_computes_it_and_export_writes_the_probe(tmp_path):
    """--mode=eval on a workdir with a checkpoint (step 0, untrained: no training needed) writes
    the robust results, scalars and probe.npz; --mode=export then writes probe_saved_model."""
    cfg = tiny_config(tmp_path, robust_eps="0,8", robust_examples=20, linear_epochs=1)
    app.write_flagfile(cfg)
    checkpoints.State(cfg, distribute.make_strategy(cfg), 89, 89).manager.save(checkpoint_number=0)
    out = app.run(dataclasses.replace(cfg, mode="eval"))
    r = out["results"]
    with open(os.path.join(cfg.run_dir, "results.json")) as f:
        assert json.load(f) == json.loads(json.dumps(r))
    assert r["robust_examples"] == 20 and r["robust_eps"] == [0.0, 8.0]
    assert set(r["robust_top1"]) == {"pgd20", "fgsm"}
    for attack in ("pgd20", "fgsm"):
        assert set(r["robust_top1"][attack]) == {"0", "8"}
        assert r["robust_top1"][attack]["0"] == r["robust_clean_top1"]
    tags = _tags(cfg.run_dir)
    assert tags["eval/robust_top1/pgd20_8"] == pytest.approx(r["robust_top1"]["pgd20"]["8"])
    assert tags["eval/robust_top1/fgsm_0"] == pytest.approx(r["robust_top1"]["fgsm"]["0"])
    assert app.robust_line(r).startswith("clean ")
    assert "\n" not in app.robust_line(r)
    assert evaluate.load_probe(os.path.join(cfg.run_dir, "probe.npz"))["step"] == 0

    exported = app.run(dataclasses.replace(cfg, mode="export"))
    assert os.path.exists(os.path.join(exported["probe_saved_model"], "saved_model.pb"))

    # Turned off: no robust results, and none left over from the previous evaluation.
    off = app.run(dataclasses.replace(cfg, mode="eval", robust_eps=""))
    assert not any(k.startswith("robust_") for k in off["results"])


def test_an_example_fooled_at_a_smaller_radius_counts_as_fooled_at_larger_ones():
    # A binary linear model: FGSM lands on the exact worst case. Attacked alone at 16/255 it
    # finds the same fooled set as at 4/255 plus more; the curve is monotone and equals the
    # single-radius results here (the worst case at 4/255 is inside the 16/255 ball).
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 2)).astype(np.float32)
    b = (np.array([0.1, -0.1]) - 0.5 * w.sum(axis=0)).astype(np.float32)
    x = rng.uniform(0.2, 0.8, size=(300, 8)).astype(np.float32).reshape(-1, 2, 4, 1)
    y = np.argmax(x.reshape(-1, 8) @ w + b, axis=1).astype(np.int32)
    both = robust.robust_accuracy(_linear(w, b), x, y, [16.0, 4.0], batch_size=64)
    for e in ("4", "16"):
        alone = robust.robust_accuracy(_linear(w, b), x, y, [float(e)], batch_size=64)
        assert both["robust_top1"]["fgsm"][e] == pytest.approx(alone["robust_top1"]["fgsm"][e])
    assert both["robust_top1"]["pgd20"]["16"] <= both["robust_top1"]["pgd20"]["4"] < 1.0
