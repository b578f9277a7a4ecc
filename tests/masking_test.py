"""The gradient-masking checks (clae_tf/evaluation/masking.py) on a deliberately masked model and
on the same model unmasked, and their warnings as printed after the summary."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from clae_tf.evaluation import masking, robust
from clae_tf.job import app
from clae_tf.runtime import config


def four_classes(n=40, seed=5):
    """A linear classifier on 4x4x3 images and images it classifies correctly, each at a clean
    margin of about 0.6 ||w_y - w_j||_2, i.e. ~4 standard deviations of what a uniform random
    start in the 64/255 ball changes, yet breakable at 64/255 (closed form: margin <
    eps ||w_y - w_j||_1 for some j) and robust at 16/255."""
    rng = np.random.default_rng(seed)
    d, c = 48, 4
    w = rng.normal(size=(d, c)).astype(np.float32)
    b = (-0.5 * w.sum(axis=0)).astype(np.float32)
    cls = rng.integers(0, c, n)
    x = 0.5 + 0.15 * np.sign(w[:, cls].T - w.mean(axis=1)) + rng.uniform(-0.05, 0.05, (n, d))
    x = x.astype(np.float32)
    y = np.argmax(x @ w + b, axis=1).astype(np.int32)
    dw = w[:, y].T[:, :, None] - w[None]  # (n, d, c): w_y - w_j
    margin = np.einsum("nd,ndc->nc", x, dw) + (b[y][:, None] - b[None])
    margin[np.arange(n), y] = np.inf
    l1 = np.abs(dw).sum(axis=1)
    assert np.all((margin - 64 / 255 * l1).min(axis=1) < 0)  # every image breakable at 64/255
    assert np.all((margin - 16 / 255 * l1).min(axis=1) > 0)  # and none at 16/255
    return w, b, x.reshape(n, 4, 4, 3), y


def _model(w, b, scale=1.0):
    """Linear logits, times `scale`: at 1e4 the float32 softmax of every image is exactly
    one-hot, so the cross-entropy's input gradient is exactly zero (the masked model)."""
    return lambda v: scale * (tf.matmul(tf.reshape(v, [tf.shape(v)[0], -1]), w) + b)


# The cross-entropy attacks, then Square. (With APGD-T in the chain, its scale-free DLR loss
# breaks the masked model itself and Square finds nothing more: then only the other checks fire.
# Between 16 and 64/255, e.g. at 32/255, APGD-CE misses images of the unmasked multi-class
# linear model that the margin-minimising Square and APGD-T find: CE is not the margin.)
SUITE = dataclasses.replace(robust.Suite.from_config(config.Config()),
                            attacks=("pgd20", "apgd-ce", "square"), linf_eps=(16.0, 64.0),
                            l2_eps=(), apgd_steps=10, square_queries=300, checks=True)
CHECKS = ("square_beats_gradient", "large_radius", "flat_gradient", "more_steps")


@pytest.fixture(scope="module")
def evaluations():
    w, b, x, y = four_classes()
    return {name: robust.robust_accuracy(_model(w, b, scale), x, y, SUITE, 4, batch_size=40,
                                         seed=1)
            for name, scale in (("masked", 1e4), ("plain", 1.0))}


@pytest.mark.slow  # two evaluations with checks, ~10 attack traces (~60 s on the shared cores)
def test_checks_fire_on_the_masked_model(evaluations, capsys):
    r = evaluations["masked"]
    checks = r["robust_checks"]
    assert r["robust_clean_top1"] == 1.0
    # PGD-20 and APGD-CE report it robust at 64/255, where the closed form breaks every image.
    assert r["robust_top1"]["apgd-ce"]["64"] > 0.5
    assert checks["flat_gradient"]["value"] == 1.0  # every image: a zero gradient
    assert checks["large_radius"]["value"] > 0.5  # APGD-CE cannot move them even at 64/255
    # ... while Square, which never asks for a gradient, breaks most of them at 64/255.
    assert checks["square_beats_gradient"]["value"] > 0.2
    assert checks["square_beats_gradient"]["eps"] == "64"
    for name in ("square_beats_gradient", "large_radius", "flat_gradient"):
        assert checks[name]["fired"] and checks[name]["threshold"] == masking.THRESHOLD, name
    fired = [name for name in CHECKS if checks[name].get("fired")]
    assert len(r["robust_warnings"]) == len(fired)
    assert all("\n" not in w for w in r["robust_warnings"])
    assert r["robust_checks_seconds"] > 0
    # Printed: one `warning:` line each on stderr, after the summary.
    out = {"workdir": "run", "results": dict(knn_top1=0.5, linear_top1=0.5, step=0,
                                             test_examples=40, robust_seconds=1.0, **r)}
    app.print_summary(out)
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert lines[2].startswith("Robust top-1: clean 1.0000 on 40 images  (pgd20 > apgd-ce > "
                               "square, ")
    assert lines[3].startswith("  Linf /255:  worst 16:1.0000 64:")
    assert not any(line.startswith("  L2:") for line in lines)
    assert printed.err.splitlines() == [f"warning: {w}" for w in r["robust_warnings"]]
    assert len(printed.err.splitlines()) == len(fired) >= 3


@pytest.mark.slow  # the fixture above
def test_checks_stay_silent_on_the_unmasked_model(evaluations):
    r = evaluations["plain"]
    checks = r["robust_checks"]
    # The closed form: robust at 16/255, broken at 64/255; the gradient attacks find all of it.
    assert r["robust_top1"]["pgd20"]["16"] == 1.0 and r["robust_top1"]["pgd20"]["64"] == 0.0
    assert checks["flat_gradient"]["value"] == 0.0
    assert checks["large_radius"]["value"] == 0.0
    assert checks["square_beats_gradient"]["value"] == 0.0
    assert checks["more_steps"]["value"] == 0.0
    assert not any(checks[name]["fired"] for name in CHECKS)
    assert r["robust_warnings"] == []


class _SlowAttacker:
    """Stands in for robust.Attacker: an APGD-CE that fools images 0-2 only with >= 20 steps."""
    suite = dataclasses.replace(SUITE, attacks=("apgd-ce",))

    def __init__(self):
        self.calls = []

    def attack(self, name, norm, alive, eps, batch_size, seed, tag, steps=0):
        self.calls.append((name, round(eps * 255, 6), steps, np.flatnonzero(alive).tolist()))
        fooled = alive & (np.arange(len(alive)) < 3) if steps >= 20 else np.zeros_like(alive)
        alive[fooled] = False
        return int(fooled.sum())


def _chain(worst, clean):
    """A run_chain result of one attack "pgd20" whose standing images give `worst` by radius."""
    n = len(clean)
    standing = {k: np.array(clean) & (np.arange(n) < round(v * n)) for k, v in worst.items()}
    return {"top1": {"pgd20": worst, "worst": worst}, "seconds": {"pgd20": 0.0},
            "fooled": {"pgd20": {k: 0 for k in worst}}, "standing": {"pgd20": standing}}


def test_more_steps_picks_the_first_radius_below_half_clean_and_counts_what_2x_finds():
    clean = np.arange(10) < 8  # clean accuracy 0.8: half is 0.4
    attacker = _SlowAttacker()
    chain = _chain({"0": 0.8, "1": 0.7, "2": 0.3, "4": 0.1}, clean)
    out = masking.more_steps(attacker, chain, clean, 4, 0)
    # 2/255 (0.3 < 0.4): APGD-CE at 10 steps first (the chain has none), then 20 on what is left.
    assert attacker.calls == [("apgd-ce", 2.0, 10, [0, 1, 2]), ("apgd-ce", 2.0, 20, [0, 1, 2])]
    assert out == {"value": 0.3, "eps": 2.0, "steps": [10, 20]}
    # None below half: the largest radius.
    attacker = _SlowAttacker()
    masking.more_steps(attacker, _chain({"1": 0.7, "2": 0.6}, clean), clean, 4, 0)
    assert attacker.calls[0][1] == 2.0


def test_run_checks_words_a_fired_check_as_one_warning():
    clean = np.arange(10) < 8

    class Attacker(_SlowAttacker):
        def flat_gradient(self, rows):
            return np.asarray(rows) == 7  # one of 8 clean-correct images: 12.5%

    out = masking.run_checks(Attacker(), _chain({"2": 0.3}, clean), clean, 4, 0)
    checks = out["robust_checks"]
    assert checks["square_beats_gradient"] == {
        "skipped": "needs square after a gradient attack in the L-inf chain"}
    assert checks["flat_gradient"]["value"] == 0.125 and checks["flat_gradient"]["fired"]
    assert checks["more_steps"]["value"] == 0.3 and checks["more_steps"]["fired"]
    assert checks["large_radius"]["value"] == 0.5 and checks["large_radius"]["fired"]
    assert len(out["robust_warnings"]) == 3
    assert out["robust_warnings"][2].startswith(
        "the attack has not converged: APGD-CE with 20 steps fooled 30.0% of the images that 10 "
        "steps left standing at 2/255 (threshold 1%)")
