"""Robust evaluation (clae_tf/evaluation/robust.py): the attack chain's counting, the suite and
its one check against the dataset, and the results of --mode=eval. The flags themselves:
tests/config_test.py; the gradient-masking checks: tests/masking_test.py; the probe's
SavedModel: tests/export_test.py."""

import dataclasses
import glob
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from app_test import count_checks
from masking_test import four_classes

from clae_tf import ClaeError
from clae_tf.data import sources
from clae_tf.evaluation import evaluate, robust
from clae_tf.job import app, checkpoints
from clae_tf.method import builders
from clae_tf.runtime import config, distribute, workdir

from conftest import parse_flags, tiny_config


def _linear(w, b):
    return lambda v: tf.matmul(tf.reshape(v, [tf.shape(v)[0], -1]), w) + b


def _worst_margins(w, b, x, y, eps, norm="linf"):
    """(n, C) worst-case margins over the eps-ball (no [0, 1] clipping): (w_y - w_j).x + b_y - b_j
    - eps ||w_y - w_j||_* with the dual norm (L1 for L-inf, L2 for L2); +inf for j = y."""
    n, c = len(y), w.shape[1]
    out = np.full((n, c), np.inf)
    for j in range(c):
        d = w[:, y].T - w[:, j][None, :]  # (n, D)
        dual = np.abs(d).sum(axis=1) if norm == "linf" else np.linalg.norm(d, axis=1)
        out[:, j] = np.sum(d * x, axis=1) + b[y] - b[j] - eps * dual
    out[np.arange(n), y] = np.inf
    return out


# The suite of the flags' defaults: every Suite here is it with some fields replaced.
DEFAULT_SUITE = robust.Suite.from_config(config.Config())


def _suite(attacks, linf=(), l2=(), **kw):
    return dataclasses.replace(DEFAULT_SUITE, attacks=tuple(attacks), linf_eps=tuple(linf),
                               l2_eps=tuple(l2), **{"checks": False, **kw})


def _binary_problem():
    """A binary linear classifier centred at x = 0.5 and 400 points, 8 pixels each, in
    [0.35, 0.65]: the radii below never reach the [0, 1] clipping."""
    rng = np.random.default_rng(1)
    n, d = 400, 8
    w = rng.normal(size=(d, 2)).astype(np.float32)
    b = (np.array([0.1, -0.1]) - 0.5 * w.sum(axis=0)).astype(np.float32)
    x = rng.uniform(0.35, 0.65, size=(n, d)).astype(np.float32)
    y = np.argmax(x @ w + b + rng.normal(scale=0.3, size=(n, 2)), axis=1).astype(np.int32)
    return w, b, x, y


@pytest.mark.parametrize("norm, attacks, radii", [
    ("linf", ("pgd20", "fgsm"), (4.0, 16.0)),  # 1/255
    ("l2", ("pgd20", "fgsm"), (0.05, 0.1)),  # [0, 1] pixels; FGSM has no L2 version
])
def test_binary_linear_robust_accuracy_is_the_closed_form(norm, attacks, radii):
    w, b, x, y = _binary_problem()
    unit = 1 / 255 if norm == "linf" else 1.0
    margins = {e: _worst_margins(w, b, x, y, e * unit, norm).min(axis=1) for e in radii}
    clean_margin = _worst_margins(w, b, x, y, 0.0).min(axis=1)
    # No example within round-off of a decision (ties would make the count ill-defined).
    keep = np.abs(clean_margin) > 1e-3
    for m in margins.values():
        keep &= np.abs(m) > 1e-3
    suite = _suite(attacks, radii if norm == "linf" else (), radii if norm == "l2" else ())
    out = robust.robust_accuracy(_linear(w, b), x[keep].reshape(-1, 2, 4, 1), y[keep], suite, 2,
                                 batch_size=64)
    assert out["robust_clean_top1"] == pytest.approx(np.mean(clean_margin[keep] > 0))
    ran = list(attacks) if norm == "linf" else ["pgd20"]
    assert out["robust_attacks" if norm == "linf" else "robust_l2_attacks"] == ran
    table = out["robust_top1" if norm == "linf" else "robust_top1_l2"]
    assert list(table) == ran + ["worst"]
    for e, m in margins.items():
        expected = np.mean(m[keep] > 0)
        assert 0.1 < expected < out["robust_clean_top1"] - 0.05  # not vacuous
        for row in table:  # every attack reaches the exact worst case on a binary linear model
            assert table[row][robust.eps_key(e)] == pytest.approx(expected), (row, e)


def test_multiclass_linear_robust_accuracy_is_bounded_by_the_closed_form():
    """Several classes: an example is robust iff every pairwise worst margin stays > 0, so exact
    robust accuracy is the closed form; an attack can only report as much or more, and never
    more than clean."""
    rng = np.random.default_rng(2)
    n, d, c = 300, 10, 5
    w = rng.normal(size=(d, c)).astype(np.float32)
    b = (rng.normal(size=c) * 0.1 - 0.5 * w.sum(axis=0)).astype(np.float32)  # centred at 0.5
    x = rng.uniform(0.2, 0.8, size=(n, d)).astype(np.float32)
    y = np.argmax(x @ w + b + rng.normal(scale=0.3, size=(n, c)), axis=1).astype(np.int32)
    out = robust.robust_accuracy(_linear(w, b), x.reshape(-1, 2, 5, 1), y,
                                 _suite(("pgd20", "fgsm"), (4.0, 16.0)), c, batch_size=128)
    clean = np.mean(np.argmax(x @ w + b, axis=1) == y)
    assert out["robust_clean_top1"] == pytest.approx(clean)
    for e in (4.0, 16.0):
        exact = np.mean(_worst_margins(w, b, x, y, e / 255.0).min(axis=1) > 0)
        assert exact < clean - 0.05  # the radius matters
        for row in ("pgd20", "fgsm", "worst"):
            acc = out["robust_top1"][row][robust.eps_key(e)]
            assert exact - 1e-9 <= acc <= clean + 1e-9, (row, e)
        # PGD-20 finds most of the non-robust examples.
        assert out["robust_top1"]["pgd20"][robust.eps_key(e)] - exact < 0.5 * (clean - exact)


# -------------------------------------------------------------------------- the chain's counting

# Which images each (fake) attack fools WHEN it attacks them, by radius. Images 6 and 7 are
# misclassified clean. Note a fools image 0 at radius 1 but not at 4, and c would fool 1 and 5
# at 4: the chain must count what was fooled before and never attack it again.
_TABLE = {"a": {1: {0, 6}, 2: {1}, 4: set()},
          "b": {1: {2}, 2: {0, 3}, 4: {4}},
          "c": {1: set(), 2: {5}, 4: {1, 5}}}
# By hand (attack by attack, radius by radius, each on what is still standing; 8 images):
#   a@1 attacks 0-5, fools 0 -> {1,2,3,4,5}   a@2 fools 1 -> {2,3,4,5}   a@4 -> {2,3,4,5}
#   b@1 attacks {1,2,3,4,5}, fools 2 -> {1,3,4,5}
#   b@2 attacks {2,3,4,5} & {1,3,4,5} = {3,4,5}, fools 3 -> {4,5}
#   b@4 attacks {2,3,4,5} & {4,5}, fools 4 -> {5}
#   c@1 -> {1,3,4,5}   c@2 attacks {4,5}, fools 5 -> {4}   c@4: nothing left to attack
_EXPECTED = {"a": {"1": 5 / 8, "2": 4 / 8, "4": 4 / 8},
             "b": {"1": 4 / 8, "2": 2 / 8, "4": 1 / 8},
             "c": {"1": 4 / 8, "2": 1 / 8, "4": 0.0}}
_ATTACKED = {("a", 1): {0, 1, 2, 3, 4, 5}, ("a", 2): {1, 2, 3, 4, 5}, ("a", 4): {2, 3, 4, 5},
             ("b", 1): {1, 2, 3, 4, 5}, ("b", 2): {3, 4, 5}, ("b", 4): {4, 5},
             ("c", 1): {1, 3, 4, 5}, ("c", 2): {4, 5}}


def test_chain_counts_a_hand_computed_attack_table():
    attacked = {}

    def fake(name):
        def attack_pass(rows, eps, seed):
            attacked.setdefault((name, int(eps)), set()).update(rows.tolist())
            return np.isin(rows, sorted(_TABLE[name][int(eps)]))
        return [attack_pass]

    clean = np.array([True] * 6 + [False] * 2)
    lines = []
    out = robust.run_chain([(name, fake(name)) for name in "abc"], clean, [4.0, 1.0, 2.0],
                           unit=1.0, batch_size=2, tag="linf", log=lines.append)
    assert out["top1"] == {**_EXPECTED, "worst": _EXPECTED["c"]}
    # Two progress lines per attack: the images it attacks at the smallest radius, then its
    # accuracies by increasing radius (by hand, above).
    assert [line.split("  (")[0] for line in lines] == [
        "Robust linf a: attacking 6 of 8 images at 1 2 4 ...",
        "Robust linf a: 1:0.6250 2:0.5000 4:0.5000",
        "Robust linf b: attacking 5 of 8 images at 1 2 4 ...",
        "Robust linf b: 1:0.5000 2:0.2500 4:0.1250",
        "Robust linf c: attacking 4 of 8 images at 1 2 4 ...",
        "Robust linf c: 1:0.5000 2:0.1250 4:0.0000"]
    assert attacked == _ATTACKED  # survivors only; clean-incorrect images are never attacked
    assert out["fooled"] == {"a": {"1": 1, "2": 1, "4": 0}, "b": {"1": 1, "2": 1, "4": 1},
                             "c": {"1": 0, "2": 1, "4": 0}}
    np.testing.assert_array_equal(np.flatnonzero(out["standing"]["b"]["2"]), [4, 5])


def test_passes_of_one_attack_each_take_what_the_one_before_left():
    """APGD-T's shape: one pass per target, each on the images still standing."""
    seen = []

    def pass_fooling(images):
        def attack_pass(rows, eps, seed):
            seen.append(set(rows.tolist()))
            return np.isin(rows, images)
        return attack_pass

    out = robust.run_chain([("t", [pass_fooling([0, 1]), pass_fooling([1, 2]),
                                   pass_fooling([3])])], np.ones(5, bool), [8.0], unit=1 / 255)
    assert seen == [{0, 1, 2, 3, 4}, {2, 3, 4}, {3, 4}]
    assert out["top1"]["t"]["8"] == 1 / 5 and out["fooled"]["t"]["8"] == 4


def _band_classifier(low, high):
    """One pixel t; class 1 iff low < t < high (logit1 = 100 (t - low)(high - t), logit0 = 0).

    Below the band the cross-entropy of class 0 grows with t, so FGSM moves t up by exactly eps:
    into the band at a small radius, past it at a large one (the overshoot)."""
    def logits_fn(x):
        t = tf.reshape(x, [-1])
        return tf.stack([tf.zeros_like(t), 100.0 * (t - low) * (high - t)], axis=1)
    return logits_fn


def test_an_image_fooled_at_a_smaller_radius_counts_as_fooled_at_larger_ones():
    low, high = 0.5 + 1 / 255, 0.5 + 6 / 255
    x = np.array([0.5, 0.49, 0.2], np.float32).reshape(-1, 1, 1, 1)
    y = np.zeros(3, np.int32)
    fn = _band_classifier(low, high)
    # By hand: at 4/255 FGSM puts 0.5 and 0.49 into the band (fooled), 0.2 stays below it; at
    # 16/255 it jumps all three past or short of the band: alone it fools none.
    alone = robust.robust_accuracy(fn, x, y, _suite(("fgsm",), (16.0,)), 2)
    assert alone["robust_top1"]["fgsm"]["16"] == 1.0
    chained = robust.robust_accuracy(fn, x, y, _suite(("fgsm",), (16.0, 4.0)), 2)
    assert chained["robust_top1"]["fgsm"] == {"4": pytest.approx(1 / 3),
                                              "16": pytest.approx(1 / 3)}


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
    out = robust.robust_accuracy(logits_fn, images, labels, _suite(("pgd20", "fgsm"), (0, 64)),
                                 10, batch_size=40)
    assert out["robust_clean_top1"] == pytest.approx(0.75)
    for row in ("pgd20", "fgsm", "worst"):
        assert out["robust_top1"][row]["0"] == out["robust_clean_top1"]
        assert out["robust_top1"][row]["64"] <= out["robust_clean_top1"]
    assert out["robust_top1"]["pgd20"]["64"] < out["robust_clean_top1"]  # the attack does something


# ----------------------------------------------------------------- the whole suite, small budget

SMALL = dict(apgd_steps=10, targets=2, square_queries=50)


@pytest.mark.slow  # the whole default suite in both norms, twice (~50 s on the shared cores)
def test_the_default_suite_is_deterministic_and_its_results_complete():
    w, b, x, y = four_classes()  # robust at 16/255, all breakable at 64/255 (closed form)
    suite = robust.Suite(config.Config(robust_attacks="pgd20,fast").robust_attack_list,
                         (16.0, 64.0), (0.25, 2.0), checks=False, fab_steps=10,
                         spec="pgd20,fast", **SMALL)
    assert suite.attacks == ("pgd20", "apgd-ce", "apgd-t", "square")
    runs = [robust.robust_accuracy(_linear(w, b), x, y, suite, 4, batch_size=16, seed=3)
            for _ in range(2)]
    for r in runs:
        del r["robust_attack_seconds"]
    assert runs[0] == runs[1]  # same seed, same numbers
    r = runs[0]
    assert r["robust_attacks"] == ["pgd20", "apgd-ce", "apgd-t", "square"]
    assert r["robust_l2_attacks"] == ["pgd20", "apgd-ce", "apgd-t"]
    assert list(r["robust_top1"]) == r["robust_attacks"] + ["worst"]
    assert list(r["robust_top1_l2"]) == r["robust_l2_attacks"] + ["worst"]
    assert r["robust_eps"] == [16.0, 64.0] and r["robust_l2_eps"] == [0.25, 2.0]
    assert r["robust_clean_top1"] == 1.0 and r["robust_examples"] == 40
    assert r["robust_top1"]["worst"] == {"16": 1.0, "64": 0.0}  # the closed form
    for table in ("robust_top1", "robust_top1_l2"):  # cumulative: never up along the chain
        rows = list(r[table].values())
        for before, after in zip(rows, rows[1:]):
            assert all(after[k] <= before[k] for k in before)
    # Square ran only at 16/255 (everything fell before it at 64/255) and counts its queries.
    assert set(r["robust_square_mean_queries"]) == {"16"}
    assert 1 <= r["robust_square_mean_queries"]["16"] <= SMALL["square_queries"]


@pytest.mark.parametrize("flag, used", [(100, 3), (2, 2)])
def test_results_record_the_targets_apgd_t_used(flag, used):
    """--robust_targets is capped at the classes - 1 (4 classes here): results.json records what
    ran (robust_targets_used); eval_flags keeps the flag's value."""
    w, b, x, y = four_classes(n=8)
    out = robust.robust_accuracy(_linear(w, b), x, y, _suite(("apgd-t",), (16.0,), apgd_steps=2,
                                                             targets=flag), 4, batch_size=8)
    assert out["robust_targets_used"] == used
    without = robust.robust_accuracy(_linear(w, b), x, y, _suite(("fgsm",), (16.0,), targets=flag),
                                     4, batch_size=8)
    assert "robust_targets_used" not in without


# ------------------------------------------------------------- FAB-T and standard AutoAttack

def _independent_classes(norm, n=160, m=4, seed=0):
    """Images labelled 0 on 3 x m pixels (n, 3, m, 1) and a linear classifier whose class 0 has
    logit 0 and whose class j = 1..3 has logit w_j.x + b_j with w_j on the j-th m pixels alone
    (scaled 1, 2, 4). A step towards class t's boundary changes no other logit, so an image is
    broken within eps by a run aimed at t iff d_t = -z_t / ||w_t||_dual <= eps (the closed form;
    inputs in [0.4, 0.6]: the box never binds), and FAB-T with k targets breaks it iff one of
    its k most likely other classes (by clean logit) has d_t <= eps.

    Returns (w, b, images, labels, d (n, 3): d_t of classes 1..3, top (n, 3): classes 1..3 (as
    0..2) in decreasing clean logit)."""
    rng = np.random.default_rng(seed)
    w = np.zeros((3 * m, 4), np.float32)
    for j, scale in zip((1, 2, 3), (1.0, 2.0, 4.0)):
        w[(j - 1) * m:j * m, j] = scale * rng.uniform(0.5, 1.5, m)
    b = np.zeros(4, np.float32)
    b[1:] = -0.5 * w.sum(axis=0)[1:] - np.array([0.2, 0.4, 0.8])
    x = rng.uniform(0.4, 0.6, (n, 3 * m)).astype(np.float32)
    z = (x.astype(np.float64) @ w + b)[:, 1:]
    d = -z / np.linalg.norm(w[:, 1:], ord={"linf": 1, "l2": 2}[norm], axis=0)
    return w, b, x.reshape(n, 3, m, 1), np.zeros(n, np.int32), d, np.argsort(-z, axis=1)


@pytest.mark.parametrize("norm, radii", [("linf", (4.0, 8.0)), ("l2", (0.05, 0.1))])
def test_fab_t_in_the_chain_breaks_what_the_closed_form_says(norm, radii):
    """fab-t as an attack of the chain, L-inf and L2: with k targets (the top k of the clean
    logits, as APGD-T's) it fools exactly the images with one of those k classes' boundary
    within eps (images within 2% of a radius left out: FAB-T finds the least distortion to
    about 1%), and leaves every other image standing; clean-incorrect images count as fooled."""
    w, b, x, y, d, top = _independent_classes(norm)
    unit = 1 / 255 if norm == "linf" else 1.0
    keep = np.all([np.all(np.abs(d / (e * unit) - 1) > 0.02, axis=1) for e in radii], axis=0)
    clean = np.all(d > 0, axis=1)
    expected = {}
    for k in (1, 3):
        suite = _suite(("fab-t",), radii if norm == "linf" else (),
                       radii if norm == "l2" else (), targets=k, fab_steps=20)
        out = robust.robust_accuracy(_linear(w, b), x[keep], y[keep], suite, 4, batch_size=64)
        assert out["robust_targets_used"] == k
        assert out["robust_clean_top1"] == pytest.approx(np.mean(clean[keep]))
        table = out["robust_top1" if norm == "linf" else "robust_top1_l2"]
        for e in radii:
            reached = np.any(np.take_along_axis(d, top[:, :k], axis=1) <= e * unit, axis=1)
            expected[k, e] = np.mean((clean & ~reached)[keep])
            assert table["fab-t"][robust.eps_key(e)] == pytest.approx(expected[k, e]), (k, e)
            assert table["worst"] == table["fab-t"]
    big = radii[-1]  # not vacuous: the radius matters, and so do the targets after the first
    assert expected[3, big] < expected[1, big] < expected[1, radii[0]] < np.mean(clean[keep])


def _robust_many_classes(n=4, classes=12):
    """A linear classifier on 2x2x3 images that no attack breaks at 1/255 (class 0 ahead of
    every other by 10, weights ~0.1), so that every attack spends its whole budget on every
    image."""
    rng = np.random.default_rng(0)
    w = (0.1 * rng.normal(size=(12, classes))).astype(np.float32)
    b = np.zeros(classes, np.float32)
    b[0] = 10.0
    x = rng.uniform(0.2, 0.8, (n, 2, 2, 3)).astype(np.float32)
    return w, b, x, np.zeros(n, np.int32)


def _standard_run(monkeypatch, attacks=None, count=True):
    """robust_accuracy of --robust_attacks=autoattack (budget flags at 0: the standard budget)
    at 1/255 on _robust_many_classes, the chain's attacks replaced by `attacks` (the budgets
    kept). Returns (results, [(attack, classifier calls, or 0 without `count`) per pass])."""
    suite = robust.Suite.from_config(config.Config(
        robust_attacks="autoattack", robust_eps="1", robust_l2_eps="", robust_checks=False))
    assert (suite.attacks, suite.apgd_steps, suite.fab_steps, suite.targets,
            suite.square_queries) == (("apgd-ce", "apgd-t", "fab-t", "square"), 100, 100, 9, 5000)
    w, b, x, y = _robust_many_classes()
    calls = [0]

    def logits_fn(v):
        if count:  # a host call per evaluation: Square's 5,000 would take seconds
            tf.py_function(lambda: calls.__setitem__(0, calls[0] + 1), [], [])
        return _linear(w, b)(v)

    passes = []
    standing = robust.attack_standing

    def spy(attack_pass, alive, eps, batch_size, seed, tag):
        before = calls[0]
        fooled = standing(attack_pass, alive, eps, batch_size, seed, tag)
        passes.append((tag.split("/")[1], calls[0] - before))
        return fooled

    monkeypatch.setattr(robust, "attack_standing", spy)
    if attacks:
        suite = dataclasses.replace(suite, attacks=attacks)
    out = robust.robust_accuracy(logits_fn, x, y, suite, 12, batch_size=4)
    assert out["robust_top1"]["worst"] == {"1": 1.0}  # every image survives every attack
    return out, passes


def test_autoattack_runs_fab_t_and_square_at_the_standard_budget(monkeypatch):
    """--robust_attacks=autoattack with its budget flags left at 0, on a 12-class model every
    image of which survives: FAB-T one pass per target for 9 targets, 100 iterations each
    (FAB-T evaluates the classifier twice per iteration, the first of which also tells a clean
    misclassified image: attacks_test), and
    Square's 5,000 queries on every image."""
    out, passes = _standard_run(monkeypatch, ("fab-t",))
    assert passes == [("fab-t", 2 * 100)] * 9
    assert out["robust_targets_used"] == 9
    monkeypatch.undo()
    out, passes = _standard_run(monkeypatch, ("square",), count=False)
    assert passes == [("square", 0)]
    assert out["robust_square_mean_queries"] == {"1": 5000.0}


@pytest.mark.slow  # the whole standard chain on 4 images: 5-11 s on the shared cores
def test_autoattack_runs_the_standard_chain(monkeypatch):
    """The whole chain of autoattack: APGD-CE once, then APGD-T and FAB-T one pass per target
    (9), then Square, in AutoAttack's order; and results.json says it was standard AutoAttack."""
    out, passes = _standard_run(monkeypatch, count=False)
    assert [name for name, _ in passes] == (["apgd-ce"] + ["apgd-t"] * 9 + ["fab-t"] * 9
                                            + ["square"])
    assert out["robust_attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert out["robust_suite"] == (
        "autoattack (standard AutoAttack): apgd-ce (100 steps), apgd-t (9 targets x 100 steps), "
        "fab-t (9 targets x 100 steps), square (5000 queries; L-inf only)")


def test_the_chains_targets_are_the_top_classes_of_the_clean_logits():
    """APGD-T's and FAB-T's targets (one set, Attacker.set_clean) against numpy's sort of the
    clean logits with the label left out."""
    w, b, x, y = _robust_many_classes(n=6)
    y = np.arange(6, dtype=np.int32)  # labels other than the top class too
    attacker = robust.Attacker(_linear(w, b), x, y, _suite(("fab-t",), (1.0,), targets=9), 12)
    logits = attacker.clean_logits(4)
    attacker.set_clean(logits)
    masked = np.where(np.arange(12) == y[:, None], -np.inf, logits)
    np.testing.assert_array_equal(attacker._targets, np.argsort(-masked, axis=1)[:, :9])
    assert len(attacker.passes("fab-t", "l2")) == len(attacker.passes("apgd-t", "linf")) == 9


def test_results_say_which_suite_produced_the_numbers():
    """robust_suite: what --robust_attacks named, whether it is standard AutoAttack (its four
    attacks at its budget, whatever the name), and each attack's budget as it ran."""
    def described(classes=10, **flags):
        return robust.Suite.from_config(config.Config(**flags)).describe(classes)
    assert described(robust_attacks="pgd20,fast") == (
        "pgd20,fast (not AutoAttack): pgd20 (20 steps), apgd-ce (100 steps), apgd-t (3 targets x "
        "100 steps), square (1000 queries; L-inf only)")
    assert described(robust_attacks="pgd20, AutoAttack") == (
        "pgd20,autoattack (standard AutoAttack + pgd20): pgd20 (20 steps), apgd-ce (100 steps), "
        "apgd-t (9 targets x 100 steps), fab-t (9 targets x 100 steps), square (5000 queries; "
        "L-inf only)")
    assert described(robust_attacks="quick") == "quick (not AutoAttack): pgd20 (20 steps), " \
                                                "fgsm (1 step)"
    # AutoAttack's attacks at its budget under other names are standard AutoAttack; with fewer
    # classes it takes classes - 1 targets, as AutoAttack does.
    assert described(robust_attacks="fast,fab-t", robust_targets=9,
                     robust_square_queries=5000).startswith("fast,fab-t (standard AutoAttack)")
    assert described(4, robust_attacks="autoattack").startswith(
        "autoattack (standard AutoAttack): apgd-ce (100 steps), apgd-t (3 targets x 100 steps)")
    assert described(robust_attacks="fast,fab-t").startswith("fast,fab-t (not AutoAttack)")
    w, b, x, y = _robust_many_classes(n=2)
    out = robust.robust_accuracy(_linear(w, b), x, y, _suite(("fgsm",), (1.0,)), 12)
    assert out["robust_suite"] == "quick (not AutoAttack): fgsm (1 step)"  # spec: the default's


# ---------------------------------------------------------------------------------- the suite

def test_attack_list_expands_suites_in_place_and_drops_repeats():
    def attacks(text):
        return config.Config(robust_attacks=text).robust_attack_list
    assert attacks("pgd20,autoattack") == ("pgd20", "apgd-ce", "apgd-t", "fab-t", "square")
    assert attacks("pgd20,fast") == ("pgd20", "apgd-ce", "apgd-t", "square")
    assert attacks("apgd-t, quick,apgd-t") == ("apgd-t", "pgd20", "fgsm")
    assert attacks("square,autoattack,quick,pgd20") == ("square", "apgd-ce", "apgd-t", "fab-t",
                                                        "pgd20", "fgsm")
    assert attacks("") == () and not robust.Suite.from_config(
        config.Config(robust_attacks="")).runs()
    assert not robust.Suite.from_config(  # L2 only with attacks that have no L2 version
        config.Config(robust_attacks="fgsm,square", robust_eps="")).runs()


def test_suite_is_the_flags_and_has_no_defaults_of_its_own():
    # The flags' defaults as --help documents them (config.py), spelled out by hand: the budget
    # flags' 0 is the suite's, 100 steps, 3 targets and 1000 queries outside autoattack.
    assert robust.Suite.from_config(config.Config()) == robust.Suite(
        attacks=("pgd20", "fgsm"), linf_eps=(1.0, 2.0, 4.0, 8.0), l2_eps=(0.25, 0.5),
        apgd_steps=100, targets=3, square_queries=1000, checks=True, fab_steps=100,
        spec="quick")
    cfg = config.Config(robust_attacks="Fast, fab-t", robust_eps="16, 4", robust_l2_eps="",
                        robust_apgd_steps=7, robust_targets=9, robust_square_queries=5000,
                        robust_checks=False)
    assert robust.Suite.from_config(cfg) == robust.Suite(
        ("apgd-ce", "apgd-t", "square", "fab-t"), (16.0, 4.0), (), 7, 9, 5000, False, 7,
        "fast,fab-t")
    with pytest.raises(TypeError):  # every field must be given: the flags own the budgets
        robust.Suite(("apgd-t",), (8.0,), ())


def test_suite_takes_the_radii_config_parsed(monkeypatch):
    cfg = config.Config(robust_eps="1,2", robust_l2_eps="0.5")
    monkeypatch.setattr(config, "parse_radii", lambda *a: pytest.fail(f"parsed again: {a}"))
    suite = robust.Suite.from_config(cfg)
    assert suite.linf_eps == (1.0, 2.0) and suite.l2_eps == (0.5,)


def test_suite_check_refuses_dlr_attacks_on_too_few_classes():
    for attacks, classes, words in ((("apgd-dlr",), 2, "(apgd-dlr needs 3)"),
                                    (("pgd20", "apgd-t"), 2, "(apgd-t needs 4)"),
                                    (("apgd-dlr", "apgd-t"), 3, "(apgd-t needs 4)")):
        with pytest.raises(ClaeError, match=r"^--robust_attacks: ") as e:
            _suite(attacks).check(classes)
        assert words in str(e.value) and f"the {classes} of this dataset" in str(e.value)
    _suite(("pgd20", "apgd-ce", "square")).check(2)  # no DLR: fine on 2 classes
    _suite(("apgd-dlr",)).check(3)
    _suite(("apgd-t",)).check(4)  # the targeted DLR loss takes a 4th-largest logit


def test_robust_accuracy_takes_its_suite_as_checked(monkeypatch):
    """Suite.check runs once, in app.run (tests/app_test.py): the evaluation does not run it
    again."""
    monkeypatch.setattr(robust.Suite, "check", lambda *a: pytest.fail("checked again"))
    x = np.array([0.5, 0.49, 0.2], np.float32).reshape(-1, 1, 1, 1)
    out = robust.robust_accuracy(_band_classifier(0.5, 0.6), x, np.zeros(3, np.int32),
                                 _suite(("fgsm",), (4.0,)), 2)
    assert out["robust_attacks"] == ["fgsm"]


def test_robust_flags_never_stop_an_old_run_from_being_evaluated(tmp_path):
    """A workdir with a checkpoint takes other values of every --robust_* flag, to resume its
    training or to evaluate it; another --width (the shape of the checkpoint) it refuses."""
    cfg = tiny_config(tmp_path)
    workdir.write_flagfile(cfg)
    index = os.path.join(workdir.checkpoint_dir(cfg.run_dir), "ckpt-3.index")
    os.makedirs(os.path.dirname(index))
    open(index, "w").close()
    other = dict(robust_attacks="apgd-ce,square", robust_eps="2", robust_l2_eps="1",
                 robust_examples=7, robust_apgd_steps=3, robust_targets=2,
                 robust_square_queries=9, robust_checks=not cfg.robust_checks)
    assert set(other) == {f.name for f in dataclasses.fields(config.Config)
                          if f.name.startswith("robust_")}
    assert all(getattr(cfg, name) != value for name, value in other.items())
    for mode in ("train", "eval"):
        workdir.check_workdir(dataclasses.replace(cfg, mode=mode, **other))
        with pytest.raises(ClaeError, match="^--workdir: .* --width=0.0625 \\(now 0.125\\)"):
            workdir.check_workdir(dataclasses.replace(cfg, mode=mode, width=0.125))


# ------------------------------------------------------------------------------------ the data

def test_load_subset_reads_the_chosen_test_images():
    cfg = tiny_config()
    split = sources.load(cfg).test
    images, labels = robust.load_subset(split, 50)
    index = sources.balanced_subset(split.labels, 50)
    assert images.shape == (50, 16, 16, 3) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    np.testing.assert_array_equal(labels, split.labels[index])
    everything = np.stack([x.numpy() for x, _ in split.images])
    np.testing.assert_array_equal(images, everything[index].astype(np.float32) / 255.0)
    assert np.bincount(labels, minlength=10).tolist() == [5] * 10
    assert len(robust.load_subset(split, 0)[1]) == split.num_examples  # 0: all


# ------------------------------------------------------ --mode=eval, --mode=export, old flags.cfg

def _tags(run_dir):
    tags = {}
    for path in glob.glob(os.path.join(run_dir, "tensorboard", "**", "events.out.tfevents.*"),
                          recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags[value.tag] = float(tf.make_ndarray(value.tensor))
    return tags


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One workdir through three runs, what each wrote read back before the next one runs:
    --mode=eval on a checkpoint (step 0, untrained: no training needed) with the whole chain;
    --mode=eval without attacks; and --mode=eval of a flags.cfg from before the chain's flags
    (its lines removed), with them on the command line as run.py gives them. (The export of
    the probe an evaluation wrote: tests/e2e_test.py, after training; --mode=export of a
    probe.npz: tests/workdir_test.py.)"""
    cfg = tiny_config(tmp_path_factory.mktemp("evaluated"), robust_eps="0,8",
                      robust_examples=20, linear_epochs=300, robust_attacks="pgd20,fast",
                      robust_l2_eps="0.5", robust_checks=True, robust_apgd_steps=2,
                      robust_targets=2, robust_square_queries=5)
    workdir.write_flagfile(cfg)
    checkpoints.State(cfg, distribute.make_strategy(cfg), 89, 89).manager.save(checkpoint_number=0)
    with pytest.MonkeyPatch.context() as patch:
        checks = count_checks(patch)
        out = app.run(dataclasses.replace(cfg, mode="eval"))
    with open(os.path.join(cfg.run_dir, "results.json")) as f:
        saved = json.load(f)
    # The chain must have images to attack (a probe of 300 epochs on the untrained encoder's
    # features gets 3 of the 20 right here), else every robust assertion below compares zero
    # with zero.
    assert out["results"]["robust_clean_top1"] >= 0.1, out["results"]["robust_clean_top1"]
    evaluated = dict(cfg=cfg, out=out, r=out["results"], saved=saved, checks=checks,
                     tags=_tags(cfg.run_dir),
                     probe=evaluate.load_probe(os.path.join(cfg.run_dir, "probe.npz")))
    evaluated["off"] = app.run(dataclasses.replace(cfg, mode="eval", robust_attacks=""))["results"]
    evaluated["old"] = app.run(_old_flagfile_config(cfg))["results"]
    return evaluated


def _old_flagfile_config(cfg):
    """The Config run.py builds for --mode=eval --robust_attacks=fast (and the chain's other
    flags) on the run's flags.cfg with the chain's flags taken out of it."""
    path = os.path.join(cfg.run_dir, workdir.FLAGFILE)
    with open(path) as f:
        lines = f.read().splitlines()
    new = ("robust_attacks", "robust_l2_eps", "robust_apgd_steps", "robust_targets",
           "robust_square_queries", "robust_checks")
    with open(path, "w") as f:
        f.write("\n".join(line for line in lines if not line.lstrip("-").startswith(new)
                          and not line.startswith("--norobust_checks")))
    return parse_flags(f"--flagfile={path}", "--mode=eval", "--robust_attacks=fast",
                       "--robust_apgd_steps=2", "--robust_targets=2",
                       "--robust_square_queries=5", "--robust_l2_eps=", "--norobust_checks")


CHAIN = ["pgd20", "apgd-ce", "apgd-t", "square"]


@pytest.mark.slow  # the `evaluated` fixture: three evaluations of the tiny model (~30 s alone)
def test_eval_mode_checks_the_robust_suite_once(evaluated):
    assert evaluated["checks"] == [10]  # digits: 10 classes


@pytest.mark.slow
def test_eval_mode_results_json_is_what_it_returns(evaluated):
    assert evaluated["saved"] == json.loads(json.dumps(evaluated["r"]))


@pytest.mark.slow
def test_eval_mode_robust_tables_have_every_attack_and_radius(evaluated):
    r = evaluated["r"]
    assert r["robust_examples"] == 20 and r["robust_eps"] == [0.0, 8.0]
    assert r["robust_l2_eps"] == [0.5]
    assert r["robust_attacks"] == CHAIN and r["robust_l2_attacks"] == CHAIN[:3]
    assert list(r["robust_top1"]) == CHAIN + ["worst"]
    assert set(r["robust_top1_l2"]) == set(CHAIN[:3] + ["worst"])


@pytest.mark.slow
def test_eval_mode_radius_zero_is_the_clean_accuracy(evaluated):
    r = evaluated["r"]
    for row in r["robust_top1"].values():
        assert set(row) == {"0", "8"} and row["0"] == r["robust_clean_top1"]


@pytest.mark.slow
def test_eval_mode_records_attack_times_and_masking_checks(evaluated):
    r = evaluated["r"]
    assert set(r["robust_attack_seconds"]) == {"linf", "l2"}
    assert set(r["robust_checks"]) == {"square_beats_gradient", "large_radius", "flat_gradient",
                                       "more_steps"}
    assert r["robust_checks_seconds"] >= 0 and isinstance(r["robust_warnings"], list)


@pytest.mark.slow
def test_eval_mode_writes_robust_scalars_to_tensorboard(evaluated):
    r, tags = evaluated["r"], evaluated["tags"]
    assert tags["eval/robust_top1/pgd20_8"] == pytest.approx(r["robust_top1"]["pgd20"]["8"])
    assert tags["eval/robust_top1/worst_8"] == pytest.approx(r["robust_top1"]["worst"]["8"])
    assert tags["eval/robust_top1_l2/apgd-t_0.5"] == pytest.approx(
        r["robust_top1_l2"]["apgd-t"]["0.5"])


@pytest.mark.slow
def test_eval_mode_summary_prints_the_robust_lines_and_warnings(evaluated, capsys):
    app.print_summary(evaluated["out"])
    printed = capsys.readouterr()
    assert "\n".join(app.robust_lines(evaluated["r"])) in printed.out
    assert printed.err.splitlines() == [f"warning: {w}" for w in evaluated["r"]["robust_warnings"]]


@pytest.mark.slow
def test_eval_mode_writes_the_probe_of_its_step(evaluated):
    assert evaluated["probe"]["step"] == 0


@pytest.mark.slow
def test_eval_mode_records_the_targets_used_and_the_flag(evaluated):
    r = evaluated["r"]
    assert r["robust_targets_used"] == 2 and r["eval_flags"]["robust_targets"] == "2"


@pytest.mark.slow
def test_eval_mode_records_which_suite_produced_the_numbers(evaluated):
    assert evaluated["r"]["robust_suite"] == (
        "pgd20,fast (not AutoAttack): pgd20 (20 steps), apgd-ce (2 steps), apgd-t (2 targets x "
        "2 steps), square (5 queries; L-inf only)")
    assert evaluated["old"]["robust_suite"].startswith("fast (not AutoAttack): apgd-ce (2 steps)")


@pytest.mark.slow
def test_eval_without_attacks_keeps_the_robust_results_of_its_step(evaluated):
    """--robust_attacks= on the same checkpoint and probe flags: the robust results of the first
    evaluation stay, with where they come from (tests/evaluate_test.py: when they go)."""
    off, r = evaluated["off"], evaluated["r"]
    assert {k: v for k, v in off.items() if k.startswith("robust_") and k != "robust_kept_from"} \
        == {k: v for k, v in json.loads(json.dumps(r)).items() if k.startswith("robust_")}
    assert off["robust_kept_from"] == {"step": 0, "eval_flags": {
        k: v for k, v in r["eval_flags"].items() if k.startswith("robust_")}}
    assert off["eval_flags"]["robust_attacks"] == ""


@pytest.mark.slow
def test_old_flagfile_is_evaluated_with_the_chain_flags_of_the_command_line(evaluated):
    r = evaluated["old"]
    assert r["robust_attacks"] == CHAIN[1:] and "robust_top1_l2" not in r
    assert "robust_kept_from" not in r  # measured now: the kept results and their record go
