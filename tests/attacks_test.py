"""Tests of clae_tf.method.attacks.fgsm with the tiny dual-BN model (docs/method.md, "The CLAE
step", step 3)."""

import numpy as np
import pytest
import tensorflow as tf

from clae_tf.method import attacks, builders, losses
from clae_tf.method.attacks import auto_pgd

from conftest import tiny_config

T = 0.5


@pytest.fixture(scope="module")
def cfg():
    return tiny_config(adversarial=True)


@pytest.fixture(scope="module")
def model(cfg):
    tf.keras.utils.set_random_seed(0)
    return builders.build_model(cfg)


@pytest.fixture(scope="module")
def x1(cfg):
    rng = np.random.default_rng(0)
    # Normalised inputs in [-1, 1], as after augment.normalize.
    return tf.constant(rng.uniform(-1, 1, (8, cfg.image_size, cfg.image_size, 3)), tf.float32)


def _embed_adv(model):
    return lambda x: model(x, training=True, adversarial=True)[1]


def _batch_loss(za, zb):
    return losses.nt_xent(za, zb, T)[0]


def _adv_bn_stats(model):
    return [v for v in model.variables if "bn_adv" in v.path and "moving" in v.path]


def _snapshot(variables):
    return [v.numpy().copy() for v in variables]


def _restore(variables, values):
    for v, val in zip(variables, values):
        v.assign(val)


def _input_grad(embed, x):
    """dL(sg z(x), z(x_adv))/dx_adv at x_adv = x: the quantity whose sign FGSM takes."""
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        z = embed(x)
        loss = _batch_loss(tf.stop_gradient(z), z)
    return tape.gradient(loss, x)


def test_step_is_eps_where_gradient_nonzero_and_zero_elsewhere(model, x1):
    # Mask out part of the input inside the embedding so that its gradient is EXACTLY zero there
    # (channel 2 everywhere, and the top-left 4x4 corner of every channel); elsewhere a
    # training-mode BN network makes every input pixel matter.
    mask = np.ones(x1.shape, np.float32)
    mask[..., 2] = 0.0
    mask[:, :4, :4, :] = 0.0
    mask = tf.constant(mask)
    base = _embed_adv(model)

    def embed(x):
        return base(x * mask)

    stats = _adv_bn_stats(model)
    saved = _snapshot(stats)
    eps = 0.03
    x_adv = attacks.fgsm(embed, _batch_loss, x1, eps).numpy()
    grad = _input_grad(embed, x1).numpy()
    _restore(stats, saved)

    delta = np.abs(x_adv - x1.numpy())
    zero = grad == 0
    assert zero.sum() == (mask.numpy() == 0).sum()  # exactly the masked entries
    assert (~zero).mean() > 0.5
    np.testing.assert_array_equal(delta[zero], 0.0)
    np.testing.assert_allclose(delta[~zero], eps, rtol=0, atol=1e-6)
    assert x_adv.shape == tuple(x1.shape) and x_adv.dtype == np.float32


def test_eps_zero_is_identity(model, x1):
    stats = _adv_bn_stats(model)
    saved = _snapshot(stats)
    x_adv = attacks.fgsm(_embed_adv(model), _batch_loss, x1, 0.0)
    _restore(stats, saved)
    np.testing.assert_array_equal(x_adv.numpy(), x1.numpy())


@pytest.mark.parametrize("eps", [1e-3, 0.03])
def test_attack_increases_the_loss_it_attacks(model, x1, eps):
    # The attacked objective is x -> L(sg z_adv(x1), z_adv(x)) with the adversarial BNs in TRAINING
    # mode, i.e. each forward normalises with its own batch's statistics (FGSM differentiates
    # through those statistics). So both loss evaluations below use training mode too: at x1 the
    # second forward sees the batch x1, at x_adv the batch x_adv, exactly the function whose
    # gradient the attack followed. (Inference mode would evaluate a different function, with the
    # near-initial moving statistics.) The anchor is the training-mode embedding of x1, as in the
    # attack. The adversarial BN moving statistics are restored afterwards so other tests see the
    # same state.
    stats = _adv_bn_stats(model)
    saved = _snapshot(stats)
    embed = _embed_adv(model)
    x_adv = attacks.fgsm(embed, _batch_loss, x1, eps)
    anchor = embed(x1)
    loss_clean = float(_batch_loss(anchor, embed(x1)))
    loss_adv = float(_batch_loss(anchor, embed(x_adv)))
    # A random step of the same size as a control: the signed-gradient step must beat it.
    rng = np.random.default_rng(1)
    x_rand = x1 + eps * tf.constant(rng.choice([-1.0, 1.0], x1.shape), tf.float32)
    loss_rand = float(_batch_loss(anchor, embed(x_rand)))
    _restore(stats, saved)
    assert loss_adv > loss_clean
    assert loss_adv - loss_clean > 2 * abs(loss_rand - loss_clean)


def test_attack_touches_only_the_adversarial_bn_statistics(model, x1):
    stats = _adv_bn_stats(model)
    assert stats and all("bn_adv" in v.path for v in stats)
    others = [v for v in model.variables if "bn_adv" not in v.path]
    trainable = list(model.trainable_variables)
    assert len(others) > 0 and len(trainable) > 0
    saved_stats, saved_others, saved_trainable = (_snapshot(stats), _snapshot(others),
                                                  _snapshot(trainable))

    x_adv = attacks.fgsm(_embed_adv(model), _batch_loss, x1, 0.03)
    assert np.abs(x_adv.numpy() - x1.numpy()).max() > 0

    # clean BN stats, conv/dense weights, clean gamma/beta
    for v, before in zip(others, saved_others):
        np.testing.assert_array_equal(v.numpy(), before, err_msg=v.path)
    for v, before in zip(trainable, saved_trainable):  # includes the adversarial gamma/beta
        np.testing.assert_array_equal(v.numpy(), before, err_msg=v.path)
    # One training-mode forward through the adversarial BNs: every moving mean/variance moved.
    for v, before in zip(stats, saved_stats):
        assert not np.array_equal(v.numpy(), before), v.path
    _restore(stats, saved_stats)


def _reference_x_adv(model, x1, eps):
    """docs/method.md step 3 as the reference runs it: x_adv = x1 (a separate, watched tensor); the
    adversarial branch runs forward twice, loss L(model_adv(x1), model_adv(x_adv)) without any
    stop-gradient, on a tape that also records every parameter; one signed step w.r.t. x_adv."""
    x_adv = tf.identity(x1)
    with tf.GradientTape(persistent=True) as tape:  # records the (trainable) parameters too
        tape.watch(x_adv)
        z_a = model(x1, training=True, adversarial=True)[1]
        z_b = model(x_adv, training=True, adversarial=True)[1]
        loss = losses.nt_xent(z_a, z_b, T)[0]
    grad = tape.gradient(loss, x_adv)
    param_grads = tape.gradient(loss, model.trainable_variables)
    del tape
    assert any(g is not None for g in param_grads)  # the reference tape did see the parameters
    return grad, x1 + eps * tf.sign(grad)


def test_matches_reference_two_forward_formulation(model, x1):
    eps = 0.03
    stats = _adv_bn_stats(model)
    saved = _snapshot(stats)
    x_adv = attacks.fgsm(_embed_adv(model), _batch_loss, x1, eps).numpy()
    after_fgsm = _snapshot(stats)
    # Same state for the reference (training-mode BN output does not depend on the moving stats,
    # but restore them anyway so both computations start identically).
    _restore(stats, saved)
    grad, x_ref = _reference_x_adv(model, x1, eps)
    after_ref = _snapshot(stats)
    _restore(stats, saved)

    grad, x_ref = grad.numpy(), x_ref.numpy()
    # Away from ties (|grad| tiny relative to its scale, where round-off can flip the sign) the two
    # must agree bit-for-bit.
    decided = np.abs(grad) > 1e-4 * np.abs(grad).max()
    assert decided.mean() > 0.95
    np.testing.assert_array_equal(x_adv[decided], x_ref[decided])
    assert np.abs(x_adv - x_ref).max() <= 2 * eps + 1e-6
    # The reference updated the adversarial statistics twice, fgsm once:
    # m1 = a m0 + (1 - a) s and m2 = a m1 + (1 - a) s with the same batch statistic s.
    a = 0.99  # Keras momentum of the adversarial BN (PyTorch 0.01)
    for m0, m1, m2 in zip(saved, after_fgsm, after_ref):
        np.testing.assert_allclose(m2, a * m1 + (1 - a) * (m1 - a * m0) / (1 - a), rtol=1e-4,
                                   atol=1e-6)


def test_works_inside_tf_function(model, x1):
    stats = _adv_bn_stats(model)
    saved = _snapshot(stats)
    eager = attacks.fgsm(_embed_adv(model), _batch_loss, x1, 0.03).numpy()
    _restore(stats, saved)
    graph = tf.function(lambda x: attacks.fgsm(_embed_adv(model), _batch_loss, x, 0.03))(x1)
    _restore(stats, saved)
    grad = _input_grad(_embed_adv(model), x1).numpy()
    _restore(stats, saved)
    decided = np.abs(grad) > 1e-4 * np.abs(grad).max()
    np.testing.assert_array_equal(eager[decided], graph.numpy()[decided])


# --- PGD (attacks.pgd, attacks.linf_pgd, the classifier front end) -------------------------------

def _classifier(model):
    """A classifier on the tiny encoder: h -> fixed random linear map, clean BNs, inference mode."""
    w = tf.constant(np.random.default_rng(3).normal(size=(model.feature_dim, 10)), tf.float32)
    return lambda x: tf.matmul(model(x, training=False)[0], w)


def _labels(n=8):
    return tf.constant(np.arange(n) % 10, tf.int32)


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_stays_in_the_ball_and_the_range(model, x1, random_start):
    eps, lo, hi = 0.1, -0.9, 0.9  # x1 is uniform in [-1, 1]: the range clips some entries
    kw = dict(random_start=random_start, seed=tf.constant([1, 2]) if random_start else None,
              clip_min=lo, clip_max=hi)
    stats = _adv_bn_stats(model)
    saved = _snapshot(stats)
    x_con = attacks.pgd(_embed_adv(model), _batch_loss, x1, eps, steps=3, step_size=0.06, **kw)
    _restore(stats, saved)
    x_cls = attacks.pgd_classifier(_classifier(model), x1, _labels(), eps, steps=5,
                                   step_size=0.04, **kw)
    x = x1.numpy()
    for x_adv in (x_con.numpy(), x_cls.numpy()):
        assert np.all(np.abs(x_adv - x) <= eps + 1e-6)
        assert np.all((x_adv >= lo) & (x_adv <= hi))
        # It moved: most entries away from x (and many on the ball's surface).
        assert np.mean(np.abs(x_adv - x) > 1e-3) > 0.5
        interior = (x > lo + eps) & (x < hi - eps)
        assert np.mean(np.isclose(np.abs(x_adv - x)[interior], eps, atol=1e-6)) > 0.1


def test_pgd_eps_zero_is_identity(model, x1):
    seed = tf.constant([5, 6])
    stats = _adv_bn_stats(model)
    saved = _snapshot(stats)
    x_con = attacks.pgd(_embed_adv(model), _batch_loss, x1, 0.0, steps=3, step_size=0.01,
                        random_start=True, seed=seed)
    _restore(stats, saved)
    x_cls = attacks.pgd_classifier(_classifier(model), x1, _labels(), 0.0, steps=4,
                                   step_size=0.01, random_start=True, seed=seed)
    np.testing.assert_array_equal(x_con.numpy(), x1.numpy())
    np.testing.assert_array_equal(x_cls.numpy(), x1.numpy())


def test_random_start_is_uniform_in_the_ball_and_stateless():
    x = tf.zeros([20000])
    a = attacks.uniform_start(x, 0.5, tf.constant([1, 2])).numpy()
    b = attacks.uniform_start(x, 0.5, tf.constant([1, 2])).numpy()
    c = attacks.uniform_start(x, 0.5, tf.constant([1, 3])).numpy()
    np.testing.assert_array_equal(a, b)  # a pure function of the seed
    assert not np.array_equal(a, c)
    assert np.all(np.abs(a) <= 0.5)
    # U(-0.5, 0.5): mean 0, variance 1/12, each quarter of the interval a quarter of the mass.
    assert abs(a.mean()) < 0.01 and abs(a.var() - 1 / 12) < 0.003
    np.testing.assert_allclose(np.histogram(a, bins=4, range=(-0.5, 0.5))[0] / a.size, 0.25,
                               atol=0.015)


def test_fgsm_is_one_pgd_step_of_size_eps(model, x1):
    """fgsm (the anchor and the attacked embedding from ONE forward) vs the generic core with
    the anchor from a separate forward at x1, one step of size eps, no start, no clipping; and a
    PGD step of 2.5 eps projected back onto the ball is the same point."""
    eps = 0.03
    embed = _embed_adv(model)
    stats = _adv_bn_stats(model)
    saved = _snapshot(stats)
    x_fgsm = attacks.fgsm(embed, _batch_loss, x1, eps).numpy()
    _restore(stats, saved)
    z_anchor = tf.stop_gradient(embed(x1))
    x_core = attacks.linf_pgd(lambda x: _batch_loss(z_anchor, embed(x)), x1, eps, steps=1,
                              step_size=eps).numpy()
    _restore(stats, saved)
    x_big = attacks.pgd(embed, _batch_loss, x1, eps, steps=1, step_size=2.5 * eps).numpy()
    _restore(stats, saved)
    grad = _input_grad(embed, x1).numpy()
    _restore(stats, saved)
    decided = np.abs(grad) > 1e-4 * np.abs(grad).max()  # off ties, where round-off flips signs
    assert decided.mean() > 0.95
    np.testing.assert_array_equal(x_fgsm[decided], x_core[decided])
    np.testing.assert_array_equal(x_fgsm, x_big)  # the projection lands exactly on x1 +- eps


def test_classifier_fgsm_is_the_signed_gradient_step(model, x1):
    logits_fn, y, eps = _classifier(model), _labels(), 0.05
    with tf.GradientTape() as tape:
        tape.watch(x1)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=y, logits=logits_fn(x1)))
    grad = tape.gradient(loss, x1).numpy()
    literal = np.clip(x1.numpy() + eps * np.sign(grad), -0.95, 0.95)
    x_fgsm = attacks.fgsm_classifier(logits_fn, x1, y, eps, clip_min=-0.95, clip_max=0.95).numpy()
    x_pgd1 = attacks.pgd_classifier(logits_fn, x1, y, eps, steps=1, step_size=eps,
                                    clip_min=-0.95, clip_max=0.95).numpy()
    decided = np.abs(grad) > 1e-4 * np.abs(grad).max()
    assert decided.mean() > 0.95
    np.testing.assert_allclose(x_fgsm[decided], literal[decided], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(x_fgsm, x_pgd1)


def _binary_linear(seed=0, n=64, d=12):
    """A 2-class linear softmax classifier and inputs in [0.2, 0.8] (clipping to [0, 1] never
    binds for eps <= 0.2): the worst L-inf perturbation of the margin is known exactly."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, 2)).astype(np.float32)
    b = rng.normal(size=2).astype(np.float32) * 0.1
    x = rng.uniform(0.2, 0.8, size=(n, d)).astype(np.float32)
    y = rng.integers(0, 2, n).astype(np.int32)
    return w, b, x, y


def test_linear_binary_attacks_reach_the_closed_form():
    """2 classes: CE's input gradient is -(1 - p_y)(w_y - w_j), so sign(grad) = -sign(w_y - w_j),
    the exact minimiser of the margin (w_y - w_j).x + b_y - b_j over the ball: margin - eps *
    ||w_y - w_j||_1. FGSM gets there in one step; PGD (step eps/4, random start) in at most 8."""
    w, b, x, y = _binary_linear()
    logits_fn = lambda v: tf.matmul(v, w) + b  # noqa: E731
    d = (w[:, y] - w[:, 1 - y]).T  # (n, D): w_y - w_j per example
    margin = np.sum(d * x, axis=1) + b[y] - b[1 - y]
    eps = 0.05
    worst_x = x - eps * np.sign(d)
    worst_margin = margin - eps * np.abs(d).sum(axis=1)
    for x_adv in (attacks.fgsm_classifier(logits_fn, x, y, eps, 0.0, 1.0),
                  attacks.pgd_classifier(logits_fn, x, y, eps, steps=20, step_size=eps / 4,
                                         random_start=True, seed=[0, 1], clip_min=0.0,
                                         clip_max=1.0)):
        x_adv = x_adv.numpy()
        np.testing.assert_allclose(x_adv, worst_x, rtol=0, atol=1e-6)
        adv_margin = np.sum(d * x_adv, axis=1) + b[y] - b[1 - y]
        np.testing.assert_allclose(adv_margin, worst_margin, rtol=0, atol=1e-4)


# --- Robust-evaluation attacks: APGD, APGD-T, Square, L2 PGD (attacks.apgd, square_linf) --------
#
# Linear classifiers f(x) = W x + b give the closed form: example (x, y) survives every
# perturbation of the ball iff for every other class j, (w_y - w_j).x + b_y - b_j >
# eps * ||w_y - w_j||_dual (dual of L-inf: L1; of L2: L2), the worst point for j being
# x - eps * sign(w_y - w_j) (L-inf) or x - eps * (w_y - w_j) / ||w_y - w_j||_2 (L2).

DUAL = {"linf": 1, "l2": 2}
LINEAR_EPS = {"linf": 0.04, "l2": 0.15}  # <= 0.2: from [0.2, 0.8] the range [0, 1] never binds


def _linear_case(classes, norm, n=48, dim=10, seed=0, gap=0.25):
    """A linear classifier and n inputs in [0.2, 0.8] labelled with their clean class, none
    within `gap` (relative) of the closed-form boundary eps * ||w_y - w_j||_dual.

    Returns (logits_fn, w (C, D), b, x (n, D), y (n,), reachable (n, C) bool: class j can be
    made to beat y inside the ball)."""
    eps = LINEAR_EPS[norm]
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(classes, dim)).astype(np.float32)
    b = (0.1 * rng.normal(size=classes) - 0.5 * w.sum(1)).astype(np.float32)  # centred at 0.5
    x = rng.uniform(0.2, 0.8, (30 * n, dim)).astype(np.float32)
    z = x.astype(np.float64) @ w.T + b
    y = np.argmax(z, 1)
    margin = z[np.arange(len(x)), y][:, None] - z  # (n, C): (w_y - w_j).x + b_y - b_j
    radius = eps * np.linalg.norm(w[y][:, None, :].astype(np.float64) - w[None], ord=DUAL[norm],
                                  axis=2)
    other = np.arange(classes)[None, :] != y[:, None]
    rel = np.where(other, np.abs(margin - radius) / np.maximum(radius, 1e-9), np.inf).min(1)
    keep = np.flatnonzero(rel > gap)[:n]
    assert len(keep) == n
    reachable = (other & (margin < radius))[keep]
    logits_fn = lambda v: tf.matmul(v, w.T) + b  # noqa: E731
    return logits_fn, w, b, x[keep], y[keep].astype(np.int32), reachable


def _in_ball(x_adv, x, eps, norm, lo=0.0, hi=1.0):
    delta = (x_adv - x).reshape(len(x), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert np.all(size <= eps * (1 + 1e-5) + 1e-7), size.max()
    assert np.all((x_adv >= lo) & (x_adv <= hi))


def _predict(logits_fn, x):
    return np.argmax(np.asarray(logits_fn(tf.constant(x))), axis=1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_ce_reaches_the_closed_form_on_two_classes(norm):
    """2 classes: the cross-entropy rises exactly as the margin falls, so its ascent finds every
    example the closed form says can be fooled, and no other (none can be)."""
    logits_fn, _, _, x, y, reachable = _linear_case(2, norm)
    robust = ~reachable.any(1)
    assert 0.2 < robust.mean() < 0.8
    eps = LINEAR_EPS[norm]
    x_adv, fooled = tf.function(lambda: attacks.apgd(logits_fn, x, y, eps, 100, [0, 1],
                                                     norm=norm))()
    x_adv, fooled = x_adv.numpy(), fooled.numpy()
    np.testing.assert_array_equal(fooled, ~robust)
    np.testing.assert_array_equal(_predict(logits_fn, x_adv) != y, fooled)  # x_adv fools them
    _in_ball(x_adv, x, eps, norm)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_dlr_and_targeted_reach_the_closed_form_on_five_classes(norm):
    """5 classes: APGD-DLR, and APGD-T over all 4 targets of top_targets (union, as AutoAttack
    counts it), fool exactly the examples the closed form says can be fooled. APGD-CE fools a
    subset: on more than 2 classes the point of highest cross-entropy need not be misclassified
    (it may raise several wrong logits at once), which is why AutoAttack adds the DLR attacks."""
    logits_fn, _, _, x, y, reachable = _linear_case(5, norm)
    robust = ~reachable.any(1)
    assert 0.15 < robust.mean() < 0.85
    eps = LINEAR_EPS[norm]
    run = tf.function(lambda loss, target, x_start=None: attacks.apgd(
        logits_fn, x, y, eps, 100, [0, 1], norm=norm, loss=loss, target=target,
        x_start=x_start))
    # From the centre, exactly; from a random start (L2: near the sphere), a start on the far
    # side of an example can cost it (seen for 1-2 of 48 at some seeds, before and after
    # per-image streams), as AutoAttack's single restart can.
    x_dlr, fooled_dlr = run("dlr", None, x)
    np.testing.assert_array_equal(fooled_dlr.numpy(), ~robust)
    _, fooled_random = run("dlr", None)
    assert not np.any(fooled_random.numpy() & robust)
    assert fooled_random.numpy().sum() >= 0.95 * (~robust).sum()
    np.testing.assert_array_equal(_predict(logits_fn, x_dlr.numpy()) != y, fooled_dlr.numpy())
    targets = attacks.top_targets(logits_fn(x), y, 4).numpy()
    fooled_t = np.zeros(len(y), bool)
    for k in range(4):
        x_t, fooled = run("dlr_targeted", tf.constant(targets[:, k]))
        _in_ball(x_t.numpy(), x, eps, norm)
        fooled_t |= fooled.numpy()
    np.testing.assert_array_equal(fooled_t, ~robust)
    _, fooled_ce = run("ce", None)
    assert not np.any(fooled_ce.numpy() & robust)
    assert fooled_ce.numpy().sum() >= 0.9 * (~robust).sum()


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_apgd_on_low_precision_logits(dtype):
    """A model that computes and returns its logits in float16 / bfloat16 (mixed precision):
    the losses and the input gradient are float32, x_adv is float32, and APGD-DLR still fools
    exactly the closed form's examples (their margins are 25% away from the boundary)."""
    logits_fn, w, b, x, y, reachable = _linear_case(5, "linf")
    low = lambda v: tf.matmul(tf.cast(v, dtype), tf.cast(w.T, dtype)) + tf.cast(b, dtype)  # noqa
    assert low(x).dtype == dtype
    x_adv, fooled = tf.function(lambda: attacks.apgd(low, x, y, LINEAR_EPS["linf"], 50,
                                                     tf.constant([0, 1]), loss="dlr"))()
    assert x_adv.dtype == tf.float32
    np.testing.assert_array_equal(fooled.numpy(), reachable.any(1))
    _in_ball(x_adv.numpy(), x, LINEAR_EPS["linf"], "linf")


def test_apgd_targeted_reaches_its_target():
    """Examples whose only reachable class is j: APGD-T aimed at j fools them INTO j (any
    misclassified point of the ball is classified j), and every fooled point is a class the
    closed form allows."""
    logits_fn, _, _, x, y, reachable = _linear_case(5, "linf", n=96, seed=1)
    eps = LINEAR_EPS["linf"]
    one = reachable.sum(1) == 1
    assert one.sum() >= 8
    j = np.argmax(reachable, 1).astype(np.int32)
    x_adv, fooled = attacks.apgd(logits_fn, x[one], y[one], eps, 100, [0, 2],
                                 loss="dlr_targeted", target=j[one])
    assert np.all(fooled.numpy())
    np.testing.assert_array_equal(_predict(logits_fn, x_adv.numpy()), j[one])


def _literal_checkpoints(steps):
    """The paper's W = {w_j = ceil(p_j * steps)}, p_0 = 0, p_1 = 0.22, p_{j+1} = p_j +
    max(p_j - p_{j-1} - 0.03, 0.06), in exact rational arithmetic."""
    from fractions import Fraction
    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    return sorted({-(-q.numerator * steps // q.denominator) for q in p[1:-1]} - {0})


def test_apgd_checkpoints_are_the_papers():
    assert attacks.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]  # the paper's W
    for steps in range(1, 260):
        assert attacks.apgd_checkpoints(steps) == _literal_checkpoints(steps), steps


def _tanh_case(n=24, dim=10, hidden=12, classes=4, seed=0):
    """A 2-layer tanh network (steep enough that the loss along APGD's path rises and falls,
    so eta halves and restarts) and n inputs in [0.2, 0.8] labelled with their clean class.
    Returns (logits_fn, (w1, b1, w2) as float32 numpy, x, y)."""
    rng = np.random.default_rng(seed)
    w1 = (5 * rng.normal(size=(hidden, dim))).astype(np.float32)
    b1 = (-0.5 * w1.sum(1)).astype(np.float32)
    w2 = rng.normal(size=(classes, hidden)).astype(np.float32)
    x = rng.uniform(0.2, 0.8, (n, dim)).astype(np.float32)
    logits_fn = lambda v: tf.matmul(tf.tanh(tf.matmul(v, w1.T) + b1), w2.T)  # noqa: E731
    return logits_fn, (w1, b1, w2), x, _predict(logits_fn, x).astype(np.int32)


def _apgd_literal(weights, x, y, x0, eps, steps, norm, rho=0.75, alpha=0.75):
    """Algorithm 1 of Croce & Hein (2020) for ONE example of `_tanh_case` under CE, transcribed
    line by line in float32 numpy (the input gradient by hand), stopping at its first
    misclassified iterate. Returns (x_adv, fooled)."""
    w1, b1, w2 = weights

    def f(v):  # (CE, its input gradient, misclassified)
        h = np.tanh(w1 @ v + b1)
        z = w2 @ h
        p = np.exp(z - z.max())
        p /= p.sum()
        dz = p - np.eye(len(z), dtype=np.float32)[y]
        return -np.log(p[y]), w1.T @ ((1 - h * h) * (w2.T @ dz)), np.argmax(z) != y

    def proj(v):
        if norm == "linf":
            return np.clip(np.clip(v, x - eps, x + eps), 0.0, 1.0)
        d = v - x
        return np.clip(x + d * min(1.0, eps / (np.linalg.norm(d) + 1e-12)), 0.0, 1.0)

    def direction(g):
        return np.sign(g) if norm == "linf" else g / (np.linalg.norm(g) + 1e-12)

    checks = set(_literal_checkpoints(steps))
    x0 = proj(x0)  # x^(0) is a point of S
    eta, x_k, x_prev = 2 * eps, x0, x0
    f_k, g_k, fooled = f(x0)
    if fooled:
        return x0, True
    x_max, f_max, g_max = x_k, f_k, g_k
    history, w_prev, eta_prev, f_max_prev = [f_k], 0, eta, f_k  # history[i] = f(x^(i))
    for k in range(steps):  # makes x^(k+1)
        a = 1.0 if k == 0 else alpha
        z = proj(x_k + eta * direction(g_k))
        x_next = proj(x_k + a * (z - x_k) + (1 - a) * (x_k - x_prev))
        f_next, g_next, fooled = f(x_next)
        if fooled:
            return x_next, True
        if f_next > f_max:
            x_max, f_max, g_max = x_next, f_next, g_next
        history.append(f_next)
        if k + 1 in checks:
            ups = sum(history[i + 1] > history[i] for i in range(w_prev, k + 1))
            condition1 = ups < rho * (k + 1 - w_prev)
            condition2 = eta == eta_prev and f_max == f_max_prev
            eta_prev, f_max_prev, w_prev = eta, f_max, k + 1
            if condition1 or condition2:
                eta /= 2
                x_next, f_next, g_next = x_max, f_max, g_max
                history[-1] = f_max
        x_prev, x_k, g_k = x_k, x_next, g_next
    return x_max, False


@pytest.mark.parametrize("norm,eps", [("linf", 0.04), ("l2", 0.15)])
def test_apgd_matches_a_literal_transcription_of_algorithm_1(norm, eps):
    """Same start, 100 steps: the TF loop (batched, per-example schedules, early exit) ends where
    the one-example numpy transcription does: the fooled flags, and x_adv (the first fooling
    iterate, or the best one, which after the last checkpoint need not be the last)."""
    logits_fn, weights, x, y = _tanh_case()
    x0 = attacks.uniform_start(x, eps, tf.constant([4, 5]), 0.0, 1.0).numpy()
    x_adv, fooled = attacks.apgd(logits_fn, x, y, eps, 100, None, norm=norm, x_start=x0)
    want = [_apgd_literal(weights, x[i], y[i], x0[i], np.float32(eps), 100, norm)
            for i in range(len(y))]
    np.testing.assert_array_equal(fooled.numpy(), [fooled_i for _, fooled_i in want])
    assert 0.2 < fooled.numpy().mean() < 0.9
    # float32 round-off of two implementations (tanh, summation order) grows along the path; a
    # different schedule or step differs by about eta (>= eps / 64 here).
    np.testing.assert_allclose(x_adv.numpy(), np.stack([x_i for x_i, _ in want]), atol=1e-3)


def test_apgd_checkpoint_rule():
    """The two conditions on hand-made states, rho 0.75 (window 0: not a checkpoint)."""
    def halve(n_up, window, halved_before, loss_max, loss_max_before):
        s = dict(n_up=tf.constant([n_up]), halved_check=tf.constant([halved_before]),
                 loss_max=tf.constant([loss_max]), loss_max_check=tf.constant([loss_max_before]))
        return [bool(auto_pgd._apgd_checkpoint(s, tf.constant(w), 0.75)[0]) for w in (window, 0)]
    assert halve(7, 10, True, 2.0, 1.0) == [True, False]  # condition 1: 7 < 7.5 rises
    assert halve(8, 10, True, 2.0, 1.0) == [False, False]  # 8 rises, and improved
    assert halve(6, 8, True, 2.0, 1.0) == [False, False]  # 6 rises of 8: not fewer than 6
    assert halve(10, 10, False, 1.0, 1.0) == [True, False]  # condition 2: no gain, eta unchanged
    assert halve(10, 10, True, 1.0, 1.0) == [False, False]  # ... but halved at the last check
    assert halve(10, 10, False, 1.5, 1.0) == [False, False]  # ... or the best loss rose


def test_apgd_returns_the_highest_loss_iterate():
    """Every iterate the model sees is recorded: an example never fooled ends at the iterate of
    highest loss, not at the last one. rho = 0 leaves only condition 2 to halve eta, so the
    path keeps moving after its best point and the last iterate is often worse."""
    logits_fn, _, x, y = _tanh_case()
    eps = 0.04
    x0 = attacks.uniform_start(x, eps, tf.constant([4, 5]), 0.0, 1.0)
    _, fooled = attacks.apgd(logits_fn, x, y, eps, 100, None, x_start=x0, rho=0.0)
    keep = ~fooled.numpy()  # only examples that stay unfooled: every call sees all of them
    x, y, x0 = x[keep], y[keep], tf.boolean_mask(x0, keep)
    seen = []

    def recorded(v):
        tf.py_function(lambda v: seen.append(v.numpy()), [v], [])
        return logits_fn(v)

    x_adv, fooled = tf.function(lambda: attacks.apgd(recorded, x, y, eps, 100, None,
                                                     x_start=x0, rho=0.0))()
    assert not np.any(fooled.numpy()) and len(seen) == 101
    iterates = np.stack(seen)  # (101, n, D)
    loss = np.stack([attacks.ce_loss(logits_fn(v), y).numpy() for v in iterates])
    best = loss.max(axis=0)
    assert np.all(np.any(np.all(iterates == x_adv.numpy()[None], axis=2), axis=0))  # an iterate
    assert np.all(attacks.ce_loss(logits_fn(x_adv), y).numpy() >= best * (1 - 1e-6))
    assert np.sum(loss[-1] < best * (1 - 1e-5)) >= 2  # the test can tell the last from the best


def test_losses_match_numpy():
    """ce, DLR, targeted DLR, margin and top_targets against numpy's sort of the logits (given
    in float16: every loss is float32)."""
    rng = np.random.default_rng(5)
    z = rng.normal(size=(32, 7)) * 3
    z[0, :] = z[0, 2]  # a tie: every class equal
    z = z.astype(np.float16).astype(np.float64)
    y = rng.integers(0, 7, 32).astype(np.int32)
    t = (y + rng.integers(1, 7, 32)) % 7
    rows = np.arange(32)
    srt = -np.sort(-z, axis=1)  # decreasing: pi1, pi2, ...
    other = np.where(np.arange(7)[None] == y[:, None], -np.inf, z).max(1)
    logits = tf.constant(z, tf.float16)
    want_ce = -(z[rows, y] - np.log(np.exp(z).sum(1)))
    want_dlr = -(z[rows, y] - other) / (srt[:, 0] - srt[:, 2] + 1e-12)
    want_t = -(z[rows, y] - z[rows, t]) / (srt[:, 0] - (srt[:, 2] + srt[:, 3]) / 2 + 1e-12)
    for got, want in ((attacks.ce_loss(logits, y), want_ce),
                      (attacks.dlr_loss(logits, y), want_dlr),
                      (attacks.dlr_targeted_loss(logits, y, t), want_t),
                      (attacks.margin(logits, y), z[rows, y] - other)):
        assert got.dtype == tf.float32 and got.shape == (32,)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    targets = attacks.top_targets(logits, y, 6).numpy()
    assert targets.dtype == np.int32 and targets.shape == (32, 6)
    for i in range(1, 32):  # row 0 is all ties
        order = [j for j in np.argsort(-z[i], kind="stable") if j != y[i]]
        np.testing.assert_array_equal(targets[i], order)
    assert not np.any(targets == y[:, None])


def test_dlr_is_invariant_to_scaling_the_logits():
    rng = np.random.default_rng(6)
    z = tf.constant(rng.normal(size=(8, 5)), tf.float32)
    y = rng.integers(0, 5, 8)
    for loss in (lambda z: attacks.dlr_loss(z, y),
                 lambda z: attacks.dlr_targeted_loss(z, y, (y + 1) % 5)):
        np.testing.assert_allclose(loss(1e4 * z + 3.0).numpy(), loss(z).numpy(), rtol=1e-4)


def test_bad_inputs_raise_clear_errors():
    two, three = tf.zeros([4, 2]), tf.zeros([4, 3])
    y = tf.zeros([4], tf.int32)
    with pytest.raises(ValueError, match="DLR loss.*at least 3 classes, got 2"):
        attacks.dlr_loss(two, y)
    with pytest.raises(ValueError, match="targeted DLR.*at least 4 classes, got 3"):
        attacks.dlr_targeted_loss(three, y, y + 1)
    x = tf.fill([4, 5], 0.5)
    w2 = tf.ones([5, 2])
    with pytest.raises(ValueError, match="at least 3 classes, got 2"):
        attacks.apgd(lambda v: tf.matmul(v, w2), x, y, 0.1, 10, [0, 1], loss="dlr")
    with pytest.raises(ValueError, match="needs target"):
        attacks.apgd(lambda v: tf.matmul(v, w2), x, y, 0.1, 10, [0, 1], loss="dlr_targeted")
    with pytest.raises(ValueError, match="loss must be one of"):
        attacks.apgd(lambda v: tf.matmul(v, w2), x, y, 0.1, 10, [0, 1], loss="cw")
    with pytest.raises(ValueError, match="norm must be one of"):
        attacks.apgd(lambda v: tf.matmul(v, w2), x, y, 0.1, 10, [0, 1], norm="l1")
    with pytest.raises(ValueError, match="k <= classes - 1 = 2"):
        attacks.top_targets(three, y, 3)
    images = tf.fill([4, 4, 4, 3], 0.5)
    model = lambda v: tf.reshape(v, [-1, 48])[:, :3]  # noqa: E731
    for queries in (0, -5):
        with pytest.raises(ValueError, match=f"queries must be an integer >= 1, got {queries}"):
            attacks.square_linf(model, images, y, 0.1, queries, [0, 1])
    with pytest.raises(ValueError, match="images"):
        attacks.square_linf(model, x, y, 0.1, 10, [0, 1])


def _image_linear_case(n=32, classes=4, size=6, eps=0.02, seed=0):
    """A linear classifier on (size, size, 3) images in [0.25, 0.75] and n images labelled with
    their clean class, whose every clean margin exceeds 0.8 (a random start cannot bring them
    near the boundary) and none within 25% of the closed-form boundary at eps (L-inf).

    Returns (logits_fn, x, y, robust (n,) bool by the closed form)."""
    dim = size * size * 3
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(dim, classes)).astype(np.float32)
    b = (-0.5 * w.sum(0)).astype(np.float32)
    x = rng.uniform(0.25, 0.75, (40 * n, size, size, 3)).astype(np.float32)
    z = x.reshape(len(x), dim).astype(np.float64) @ w + b
    y = np.argmax(z, 1)
    margin = z[np.arange(len(x)), y][:, None] - z
    radius = eps * np.abs(w.T[y][:, None, :].astype(np.float64) - w.T[None]).sum(2)
    other = np.arange(classes)[None] != y[:, None]
    rel = np.where(other, np.abs(margin - radius) / np.maximum(radius, 1e-9), np.inf).min(1)
    keep = np.flatnonzero((rel > 0.25) & (np.where(other, margin, np.inf).min(1) > 0.8))[:n]
    assert len(keep) == n
    robust = np.all(~other | (margin > radius), 1)[keep]
    logits_fn = lambda v: tf.matmul(tf.reshape(v, [-1, dim]), w) + b  # noqa: E731
    return logits_fn, x[keep], y[keep].astype(np.int32), robust


def test_gradient_masking_fools_pgd_and_apgd_ce_but_not_dlr_and_square():
    """Logits x 1e4: same decisions, but the float32 softmax of a correct example is exactly
    one-hot, so the cross-entropy's input gradient is exactly 0. PGD-20 and APGD-CE then see
    nothing and call the model fully robust; APGD-DLR (scale-invariant) finds the closed-form
    robust accuracy exactly, and Square (no gradient) gets to within a few images of it.
    The same APGD-CE on the unscaled logits gets there too: the model is masked, not robust."""
    logits_fn, x, y, robust = _image_linear_case()
    eps = 0.02
    scale = tf.Variable(1e4)  # masked; 1.0: the same model unmasked, without a second trace
    masked = lambda v: scale * logits_fn(v)  # noqa: E731
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        ce = tf.reduce_sum(attacks.ce_loss(masked(xt), y))
    assert np.all(tape.gradient(ce, xt).numpy() == 0)  # the premise: fully masked
    assert 0.25 < robust.mean() < 0.6
    seed = tf.constant([0, 1])
    runs = [tf.function(run) for run in (
        lambda: attacks.pgd_classifier(masked, xt, y, eps, 20, eps / 4, True, seed, 0.0, 1.0),
        lambda: attacks.apgd(masked, xt, y, eps, 100, seed)[0],
        lambda: attacks.apgd(masked, xt, y, eps, 100, seed, loss="dlr")[0],
        lambda: attacks.square_linf(masked, xt, y, eps, 300, seed)[0])]
    accuracy = [np.mean(_predict(logits_fn, run().numpy()) == y) for run in runs]
    scale.assign(1.0)
    accuracy.append(np.mean(_predict(logits_fn, runs[1]().numpy()) == y))
    pgd20, apgd_ce, apgd_dlr, square, apgd_ce_unmasked = accuracy
    assert pgd20 == 1.0 and apgd_ce == 1.0
    assert apgd_dlr == robust.mean()
    assert apgd_ce_unmasked <= robust.mean() + 0.1
    assert square <= robust.mean() + 0.15


def _no_gradient(logits_fn):
    """logits_fn whose input gradient raises: the gradient function of the identity in front of
    it fails as soon as anything differentiates through it."""
    @tf.custom_gradient
    def guard(v):
        def grad(upstream):
            raise AssertionError("an input gradient was taken")
        return tf.identity(v), grad
    return lambda v: logits_fn(guard(v))


def test_square_never_takes_a_gradient():
    logits_fn, x, y, robust = _image_linear_case()
    eps = 0.02
    guarded = _no_gradient(logits_fn)
    with pytest.raises(AssertionError, match="input gradient was taken"):  # the trap works
        attacks.apgd(guarded, x, y, eps, 2, [0, 1])
    x_adv, fooled, n_queries = tf.function(
        lambda: attacks.square_linf(guarded, x, y, eps, 300, tf.constant([0, 1])))()
    fooled = fooled.numpy()
    assert fooled.mean() >= (~robust).mean() - 0.15 and not np.any(fooled & robust)
    np.testing.assert_array_equal(_predict(logits_fn, x_adv.numpy()) != y, fooled)
    assert np.all(n_queries.numpy()[~fooled] == 300) and np.all(n_queries.numpy()[fooled] < 300)


def test_square_counts_queries_and_stays_in_the_ball_and_the_range():
    """A model that ignores the image: labelled with its class, nothing can fool it and every
    example spends the whole budget; labelled with another class, the start already fools it
    (one query). Images fill [0, 1], so the range binds: every entry of x_adv is x +- eps,
    clipped to [0, 1] (the L-inf Square attack only ever writes corners of the ball)."""
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, (6, 5, 5, 3)).astype(np.float32)
    constant = lambda v: tf.tile(tf.constant([[2.0, 0.0, 1.0]]), [tf.shape(v)[0], 1])  # noqa
    eps = 0.1
    run = tf.function(lambda y: attacks.square_linf(constant, x, y, eps, 37, tf.constant([3, 4])))
    never = run(tf.zeros([6], tf.int32))
    always = run(tf.ones([6], tf.int32))
    np.testing.assert_array_equal(never[2].numpy(), 37)
    assert not np.any(never[1].numpy())
    np.testing.assert_array_equal(always[2].numpy(), 1)
    assert np.all(always[1].numpy())
    for x_adv in (never[0].numpy(), always[0].numpy()):
        _in_ball(x_adv, x, eps, "linf")
        corners = np.isclose(x_adv, np.clip(x + eps, 0, 1)) | np.isclose(x_adv,
                                                                          np.clip(x - eps, 0, 1))
        assert np.all(corners)
    assert np.mean(np.isclose(x_adv, 0) | np.isclose(x_adv, 1)) > 0.05  # the range did bind


def test_square_never_queries_an_unchanged_image():
    """A model nothing fools keeps x_best at the striped start, so every later query must differ
    from it: signs the square already holds are redrawn. With one channel and small squares a
    single random sign would repeat the start about every other query."""
    x = np.full((4, 5, 5, 1), 0.5, np.float32)
    seen = []

    def model(v):
        tf.py_function(lambda v: seen.append(v.numpy()), [v], [])
        return tf.tile(tf.constant([[1.0, 0.0]]), [tf.shape(v)[0], 1])

    _, fooled, n_queries = tf.function(lambda: attacks.square_linf(
        model, x, tf.zeros([4], tf.int32), 0.1, 60, tf.constant([0, 1])))()
    assert len(seen) == 60 and np.all(n_queries.numpy() == 60)
    start = seen[0]
    changed = [np.any(np.abs(q - start) > 1e-7, axis=(1, 2, 3)) for q in seen[1:]]
    assert np.all(changed)


def test_square_schedule_is_the_official_one():
    """p halves after 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of 10,000 iterations (the
    official code's table), scaled to the budget: it = int(i / queries * 10000)."""
    def literal(i, queries, p_init=0.8):
        it = int(i / queries * 10000)
        for k, (lo, hi) in enumerate([(10, 50), (50, 200), (200, 500), (500, 1000), (1000, 2000),
                                      (2000, 4000), (4000, 6000), (6000, 8000), (8000, 10000)]):
            if lo < it <= hi:
                return p_init / 2 ** (k + 1)
        return p_init
    for queries in (10000, 5000, 1000, 100):
        i = tf.range(queries)
        got = attacks.square_p(i, queries).numpy()
        want = [literal(j, queries) for j in range(queries)]
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert float(attacks.square_p(0, 5000)) == pytest.approx(0.8)


def _small_net(seed=0, size=6, classes=4, hidden=16):
    """A fixed random 2-layer ReLU network on (size, size, 3) images."""
    rng = np.random.default_rng(seed)
    w1 = tf.constant(rng.normal(size=(size * size * 3, hidden)) / 4, tf.float32)
    w2 = tf.constant(rng.normal(size=(hidden, classes)), tf.float32)
    return lambda v: tf.matmul(tf.nn.relu(tf.matmul(tf.reshape(v, [tf.shape(v)[0], -1]), w1)
                                          - 1.0), w2)


def test_l2_pgd_and_apgd_stay_in_the_l2_ball_and_the_range():
    rng = np.random.default_rng(8)
    x = rng.uniform(0, 1, (16, 6, 6, 3)).astype(np.float32)  # the range binds often
    net = _small_net()
    y = tf.constant(_predict(net, x).astype(np.int32))
    eps = 0.5
    seed = tf.constant([1, 2])
    outs = tf.function(lambda: (
        attacks.pgd_classifier(net, x, y, eps, 10, eps / 4, True, seed, 0.0, 1.0, norm="l2"),
        attacks.pgd_classifier(net, x, y, eps, 10, eps / 4, False, None, 0.0, 1.0, norm="l2"),
        attacks.apgd(net, x, y, eps, 20, seed, norm="l2")[0],
        attacks.apgd(net, x, y, eps, 0, seed, norm="l2")[0]))()  # the random start alone
    for x_adv in outs:
        x_adv = x_adv.numpy()
        _in_ball(x_adv, x, eps, "l2")
        assert np.median(np.linalg.norm((x_adv - x).reshape(16, -1), axis=1)) > 0.3 * eps
    assert np.mean(outs[3].numpy() == 0) + np.mean(outs[3].numpy() == 1) > 0.01  # clipped


def test_l2_pgd_reaches_the_closed_form_on_two_classes():
    """2 classes, no random start: every normalised-gradient step goes along -(w_y - w_j), so
    after steps totalling more than eps the projection leaves x - eps (w_y - w_j) / ||.||_2."""
    logits_fn, w, b, x, y, reachable = _linear_case(2, "l2")
    eps = LINEAR_EPS["l2"]
    d = w[y] - w[1 - y]
    x_adv = attacks.pgd_classifier(logits_fn, x, y, eps, 5, eps / 2, clip_min=0.0, clip_max=1.0,
                                   norm="l2").numpy()
    np.testing.assert_allclose(x_adv, x - eps * d / np.linalg.norm(d, axis=1, keepdims=True),
                               atol=1e-5)
    np.testing.assert_array_equal(_predict(logits_fn, x_adv) != y, reachable.any(1))
    # the L-inf path is the one it always was: FGSM's corner
    x_inf = attacks.pgd_classifier(logits_fn, x, y, 0.04, 1, 0.04, norm="linf").numpy()
    np.testing.assert_allclose(x_inf, x - 0.04 * np.sign(d), atol=1e-6)


def test_every_attack_is_a_function_of_its_seed():
    net = _small_net()
    rng = np.random.default_rng(9)
    x = rng.uniform(0.2, 0.8, (8, 6, 6, 3)).astype(np.float32)
    y = tf.constant(_predict(net, x).astype(np.int32))
    eps = 0.03
    run = tf.function(lambda seed: (
        attacks.apgd(net, x, y, eps, 5, seed)[0],
        attacks.apgd(net, x, y, 10 * eps, 5, seed, norm="l2", loss="dlr")[0],
        attacks.pgd_classifier(net, x, y, 10 * eps, 3, eps, True, seed, 0.0, 1.0, norm="l2"),
        attacks.square_linf(net, x, y, eps, 20, seed)[0]))
    first, again, other = (run(tf.constant(s)) for s in ([1, 2], [1, 2], [1, 3]))
    for a, b, c in zip(first, again, other):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        assert not np.array_equal(a.numpy(), c.numpy())
    eager = attacks.apgd(net, x, y, eps, 5, tf.constant([1, 2]))[0]  # eager: the same points
    np.testing.assert_allclose(eager.numpy(), first[0].numpy(), atol=1e-6)


def test_fooled_examples_leave_the_batch_and_the_loop_stops_when_all_are():
    """Counting the model's calls and rows: examples fooled at the start are never evaluated
    again (APGD: 1 + steps calls on the others; Square: 1 + (queries - 1)), and a batch fooled
    at the start costs one call. Unfoolable examples end at their highest-loss iterate (APGD)
    or after the whole budget (Square)."""
    calls, rows = tf.Variable(0), tf.Variable(0)

    def model(v):  # class 0 iff entry 0 > 0.5: eps = 0.1 cannot change it from 0.1 or 0.9
        calls.assign_add(1)
        rows.assign_add(tf.shape(v)[0])
        s = 10.0 * (tf.reshape(v, [tf.shape(v)[0], -1])[:, :1] - 0.5)
        return tf.concat([s, -s, tf.zeros_like(s)], axis=1)

    x = np.full((8, 3, 3, 1), 0.1, np.float32)
    x[:3, 0, 0, 0] = 0.9  # classified 0; the labels say 1: fooled from the start
    y = tf.ones([8], tf.int32)
    apgd_run = tf.function(lambda x: attacks.apgd(model, x, y, 0.1, 10, tf.constant([0, 1])))
    square_run = tf.function(lambda x: attacks.square_linf(model, x, y, 0.1, 10,
                                                           tf.constant([0, 1])))
    for run, n_calls in ((apgd_run, 11), (square_run, 10)):
        calls.assign(0), rows.assign(0)
        out = run(x)
        np.testing.assert_array_equal(out[1].numpy(), [True] * 3 + [False] * 5)
        assert int(calls.numpy()) == n_calls and int(rows.numpy()) == 8 + (n_calls - 1) * 5
        calls.assign(0), rows.assign(0)
        run(np.full_like(x, 0.9))  # everything fooled at the start
        assert int(calls.numpy()) == 1 and int(rows.numpy()) == 8
    np.testing.assert_array_equal(out[2].numpy(), [1] * 3 + [10] * 5)  # Square's queries


def test_examples_are_independent_and_eps_does_not_retrace():
    """The same starts give the same result for the whole batch and for its halves (each
    example has its own step size, checkpoints and early exit); one trace serves every eps
    (per example or scalar)."""
    logits_fn, _, _, x, y, _ = _linear_case(5, "linf", n=24, seed=4)
    eps = LINEAR_EPS["linf"]
    x0 = attacks.uniform_start(x, eps, tf.constant([7, 7]), 0.0, 1.0)
    run = tf.function(lambda x, y, x0, eps: attacks.apgd(logits_fn, x, y, eps, 40, None,
                                                          loss="dlr", x_start=x0))
    whole, fooled = run(x, y, x0, tf.fill([24], eps))
    halves = [run(x[s], y[s], x0[s], tf.fill([12], eps)) for s in (slice(0, 12), slice(12, 24))]
    np.testing.assert_allclose(whole.numpy(), np.concatenate([h[0].numpy() for h in halves]),
                               atol=1e-6)
    np.testing.assert_array_equal(fooled.numpy(), np.concatenate([h[1].numpy() for h in halves]))
    assert 0 < fooled.numpy().sum() < 24
    run(x, y, x0, tf.fill([24], eps / 2))
    assert run.experimental_get_tracing_count() == 2  # two batch sizes, not three eps values


def _trained_toy_classifier(steps=150, dim=20, classes=3, hidden=32, seed=0):
    """A ReLU MLP trained by full-batch gradient descent on three separable Gaussian blobs in
    [0, 1]^dim. Returns (logits_fn, x_test (64, dim), y_test)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.3, 0.7, (classes, dim))
    y = rng.integers(0, classes, 364)
    x = np.clip(centres[y] + 0.08 * rng.normal(size=(364, dim)), 0, 1).astype(np.float32)
    params = [tf.Variable(rng.normal(size=(dim, hidden)) / np.sqrt(dim), dtype=tf.float32),
              tf.Variable(np.zeros(hidden), dtype=tf.float32),
              tf.Variable(rng.normal(size=(hidden, classes)) / np.sqrt(hidden), dtype=tf.float32)]

    def logits_fn(v):
        return tf.matmul(tf.nn.relu(tf.matmul(v, params[0]) + params[1]), params[2])

    @tf.function
    def train(x, y):
        for _ in tf.range(steps):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(attacks.ce_loss(logits_fn(x), y))
            for p, g in zip(params, tape.gradient(loss, params)):
                p.assign_sub(0.5 * g)

    train(x[:300], y[:300].astype(np.int32))
    return logits_fn, x[300:], y[300:].astype(np.int32)


def test_apgd_ce_is_at_least_as_strong_as_pgd20_on_a_trained_model():
    """Same images, same radii, L-inf and L2: APGD-CE (100 steps) never leaves more images
    standing than PGD-20 (step eps/4, random start), and the radii span robust to broken."""
    logits_fn, x, y = _trained_toy_classifier()
    assert np.mean(_predict(logits_fn, x) == y) == 1.0
    pgd = tf.function(lambda eps, norm: attacks.pgd_classifier(
        logits_fn, x, y, eps, 20, eps / 4, True, tf.constant([0, 1]), 0.0, 1.0, norm=norm))
    apgd = tf.function(lambda eps, norm: attacks.apgd(logits_fn, x, y, eps, 100,
                                                      tf.constant([0, 1]), norm=norm)[0])
    counts = []
    for norm, radii in (("linf", (0.02, 0.05, 0.1)), ("l2", (0.1, 0.25, 0.5))):
        for eps in radii:
            eps = tf.constant(eps)
            standing = [np.sum(_predict(logits_fn, attack(eps, norm).numpy()) == y)
                        for attack in (pgd, apgd)]
            assert standing[1] <= standing[0], (norm, float(eps), standing)
            counts.append(standing)
    counts = np.array(counts)
    assert counts.max() > 48 and counts.min() < 16  # the radii span robust to broken


# --- FAB-T (attacks.fab_t) -----------------------------------------------------------------------
#
# FAB-T is a minimal-distortion attack counted within eps: on a linear model its linearisation is
# exact, so the projection of x onto the target's hyperplane (within the box) IS the closest
# point of the target's boundary, and the iterates settle just past it (overshoot eta).

def _box_projection_numpy(t, w, c, norm, lo=0.0, hi=1.0):
    """The least L-inf / L2 step d with w.d = c and lo <= t + d <= hi, for ONE row, by bisection
    on the level of the parametric family d(l)_i = sign(w_i) min(l * (1 or |w_i|), room_i) (the
    KKT form), in float64. Returns (d, feasible)."""
    sign = 1.0 if c >= 0 else -1.0
    w, c = w * sign, c * sign
    room = np.where(w > 0, hi - t, t - lo)

    def step(level):
        scale = 1.0 if norm == "linf" else np.abs(w)
        return np.sign(w) * np.minimum(level * scale, room)

    if step(1e9) @ w < c:
        return step(1e9), False
    lo_l, hi_l = 0.0, 1e9
    for _ in range(80):  # to 1e9 / 2^80 < 1e-15
        mid = (lo_l + hi_l) / 2
        lo_l, hi_l = (mid, hi_l) if step(mid) @ w < c else (lo_l, mid)
    return step(hi_l), True


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_projection_matches_a_bisection(norm):
    """The sorted-breakpoint search (`fab._project`) against a plain bisection, with the box
    binding on many coordinates, zero weights, and hyperplanes out of the box's reach (every
    coordinate then goes to its bound); unbounded, the step lands on the hyperplane."""
    from clae_tf.method.attacks import fab
    rng = np.random.default_rng(10)
    t = rng.uniform(0, 1, (48, 30))
    w = rng.normal(size=(48, 30))
    w[:, :4] = 0.0
    c = rng.normal(size=48) * np.r_[np.full(32, 3.0), np.full(16, 30.0)]  # the last: out of reach
    d = fab._project(*(tf.constant(v, tf.float32) for v in (t, w, c)), norm, 0.0, 1.0).numpy()
    feasible = []
    for i in range(48):
        want, ok = _box_projection_numpy(t[i], w[i], c[i], norm)
        np.testing.assert_allclose(d[i], want, atol=1e-5)
        feasible.append(ok)
    assert 16 <= sum(feasible) < 48
    assert np.all((t + d >= -1e-6) & (t + d <= 1 + 1e-6))
    free = fab._project(*(tf.constant(v, tf.float32) for v in (t, w, c)), norm, -np.inf,
                        np.inf).numpy()
    np.testing.assert_allclose((free * w).sum(1), c, rtol=1e-5, atol=1e-4)
    dual = {"linf": 1, "l2": 2}[norm]  # the least norm, unbounded: |c| / ||w||_dual
    size = np.linalg.norm(free, ord=np.inf if norm == "linf" else 2, axis=1)
    np.testing.assert_allclose(size, np.abs(c) / np.linalg.norm(w, ord=dual, axis=1), rtol=1e-5)


def _linear_binary_case(norm, n=48, dim=10, seed=0, lo=0.2, hi=0.8, near=0.15):
    """2 classes, f(x) = W x + b, n inputs in [lo, hi] labelled with their clean class, each
    within `near` of the boundary: the closed-form distance |(w_y - w_j).x + b_y - b_j| /
    ||w_y - w_j||_dual (L-inf: L1; L2: L2). Returns (logits_fn, x, y, distance (n,))."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(2, dim)).astype(np.float32)
    b = (0.1 * rng.normal(size=2) - 0.5 * w.sum(1)).astype(np.float32)
    x = rng.uniform(lo, hi, (40 * n, dim)).astype(np.float32)
    z = x.astype(np.float64) @ w.T + b
    y = np.argmax(z, 1)
    rows = np.arange(len(x))
    distance = (z[rows, y] - z[rows, 1 - y]) / np.linalg.norm(w[y] - w[1 - y], ord=DUAL[norm],
                                                              axis=1)
    keep = np.flatnonzero(distance < near)[:n]
    assert len(keep) == n
    logits_fn = lambda v: tf.matmul(v, w.T) + b  # noqa: E731
    return logits_fn, x[keep], y[keep].astype(np.int32), distance[keep]


def _size(delta, norm):
    delta = delta.reshape(len(delta), -1)
    return np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_t_finds_the_closed_form_distance_on_two_classes(norm):
    """Inputs in [0.2, 0.8] and distances below 0.15: the box never binds, and the least
    distortion is the closed form. FAB-T finds a fooling point at 1 to 1.01 times it when eps is
    larger (with or without the box), and none when eps (per example) is 1% below it: then it
    returns x itself."""
    logits_fn, x, y, distance = _linear_binary_case(norm)
    run = tf.function(lambda eps: attacks.fab_t(logits_fn, x, y, eps, norm, steps=20))
    x_adv, fooled = (v.numpy() for v in run(tf.fill([48], 0.2)))
    assert np.all(fooled)
    np.testing.assert_array_equal(_predict(logits_fn, x_adv) != y, True)
    ratio = _size(x_adv - x, norm) / distance
    assert np.all((ratio >= 1 - 1e-4) & (ratio <= 1.01)), (ratio.min(), ratio.max())
    x_adv, fooled = (v.numpy() for v in run(tf.constant(0.99 * distance, tf.float32)))
    assert not np.any(fooled)
    np.testing.assert_array_equal(x_adv, x)
    _, fooled = run(tf.constant(1.02 * distance, tf.float32))
    assert np.all(fooled.numpy())
    assert run.experimental_get_tracing_count() == 1  # eps (N,) is an input, not a constant
    x_free, fooled = attacks.fab_t(logits_fn, x, y, 0.2, norm, steps=3, clip_min=None,
                                   clip_max=None)  # no box: the same points
    assert np.all(fooled.numpy())
    np.testing.assert_allclose(_size(x_free.numpy() - x, norm) / distance, ratio, rtol=1e-3)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_t_finds_the_box_constrained_distance(norm):
    """Inputs spread over [0, 1], up to 0.4 from the boundary: the box binds, and the least
    distortion is the box-constrained projection onto the hyperplane (a numpy bisection here),
    above the box-free closed form for many examples."""
    logits_fn, x, y, free = _linear_binary_case(norm, lo=0.0, hi=1.0, near=0.4, seed=1)
    w = (logits_fn(tf.eye(10)) - logits_fn(tf.zeros([1, 10]))).numpy()  # (dim, 2): W^T
    d = w[:, 1 - y].T - w[:, y].T  # the target's gap grows along d
    gap = (logits_fn(x).numpy()[np.arange(len(y)), y] - logits_fn(x).numpy()[np.arange(len(y)),
                                                                               1 - y])
    boxed = np.array([_size(_box_projection_numpy(x[i].astype(np.float64), d[i], gap[i],
                                                  norm)[0][None], norm)[0] for i in range(48)])
    assert np.sum(boxed > 1.01 * free) >= 5  # the box does bind
    x_adv, fooled = attacks.fab_t(logits_fn, x, y, 1.0, norm, steps=20)
    _in_ball(x_adv.numpy(), x, 1.0, norm)
    ratio = _size(x_adv.numpy() - x, norm) / boxed
    assert np.all(fooled.numpy())
    assert np.all((ratio >= 1 - 1e-4) & (ratio <= 1.01)), (ratio.min(), ratio.max())


@pytest.mark.parametrize("norm,eps", [("linf", 0.03), ("l2", 0.3)])
def test_fab_t_stays_in_the_ball_and_the_range(norm, eps):
    """A ReLU network on images filling [0, 1] (the range binds), 4 classes (3 targets): every
    x_adv is in the eps-ball and the range, the fooled ones are misclassified, the others are
    x; and the attack is a pure function of its inputs (the same call twice: the same bits)."""
    rng = np.random.default_rng(11)
    x = rng.uniform(0, 1, (16, 6, 6, 3)).astype(np.float32)
    net = _small_net()
    y = tf.constant(_predict(net, x).astype(np.int32))
    run = tf.function(lambda: attacks.fab_t(net, x, y, eps, norm, steps=15))
    x_adv, fooled = (v.numpy() for v in run())
    _in_ball(x_adv, x, eps, norm)
    assert 0 < fooled.sum() < 16
    np.testing.assert_array_equal(_predict(net, x_adv) != y.numpy(), fooled)
    np.testing.assert_array_equal(x_adv[~fooled], x[~fooled])
    again, fooled_again = run()
    np.testing.assert_array_equal(again.numpy(), x_adv)
    np.testing.assert_array_equal(fooled_again.numpy(), fooled)


def test_fab_t_leaves_misclassified_inputs_alone():
    """Examples the model already gets wrong are fooled at x: returned as x, bit for bit, and
    never attacked (a model that records what it sees gets them once, in the clean pass)."""
    logits_fn, x, clean, _ = _linear_binary_case("linf", n=8)
    y = clean.copy()
    y[:3] = 1 - y[:3]  # wrong labels: misclassified on x
    seen = []

    def recorded(v):
        tf.py_function(lambda v: seen.append(v.numpy()), [v], [])
        return logits_fn(v)

    x_adv, fooled = tf.function(lambda: attacks.fab_t(recorded, x, y, 0.01, "linf", steps=5))()
    np.testing.assert_array_equal(fooled.numpy()[:3], True)
    np.testing.assert_array_equal(x_adv.numpy()[:3], x[:3])
    assert len(seen) == 1 + 2 * 5 and all(len(v) == 5 for v in seen[1:])
    x_all, fooled_all = attacks.fab_t(logits_fn, x, 1 - clean, 0.01, "l2", steps=5)
    assert np.all(fooled_all.numpy())
    np.testing.assert_array_equal(x_all.numpy(), x)


def test_fab_t_is_not_fooled_by_gradient_masking():
    """The masked model of test_gradient_masking_...: logits x 1e4. FAB-T works on logit gaps
    and their gradients, whose hyperplanes do not change with the scale: over the 3 targets it
    breaks exactly the examples the closed form says can be broken, masked or not."""
    logits_fn, x, y, robust = _image_linear_case()
    eps = 0.02
    scale = tf.Variable(1e4)
    masked = lambda v: scale * logits_fn(v)  # noqa: E731
    run = tf.function(lambda: attacks.fab_t(masked, x, y, eps, "linf", steps=10))
    for value in (1e4, 1.0):
        scale.assign(value)
        x_adv, fooled = (v.numpy() for v in run())
        np.testing.assert_array_equal(fooled, ~robust)
        np.testing.assert_array_equal(_predict(logits_fn, x_adv) != y, ~robust)
        _in_ball(x_adv, x, eps, "linf")


def test_fab_t_aims_at_the_top_targets_in_turn():
    """5 classes: FAB-T with n_targets=k breaks exactly the examples for which one of their k
    most likely other classes (top_targets) can beat the label within eps (the closed form);
    k = 9 > classes - 1 takes all 4. Here 3 examples need their second target."""
    logits_fn, _, _, x, y, reachable = _linear_case(5, "linf", n=96, seed=3)
    eps = LINEAR_EPS["linf"]
    run = tf.function(lambda k: attacks.fab_t(logits_fn, x, y, eps, "linf", steps=5,
                                              n_targets=k)[1])
    targets = attacks.top_targets(logits_fn(x), y, 4).numpy()
    by_rank = reachable[np.arange(96)[:, None], targets]  # (n, 4): target of rank r reachable
    assert by_rank[:, 0].sum() < by_rank[:, :2].any(1).sum() == reachable.any(1).sum()
    for k in (1, 2, 9):
        np.testing.assert_array_equal(run(k).numpy(), by_rank[:, :k].any(1), err_msg=str(k))


def test_fab_t_with_a_given_target_runs_that_target_alone():
    """target= (N,): one run towards that class of each example, as the robust evaluation's chain
    runs FAB-T one target rank per call. Rank 0 of top_targets is n_targets=1 bit for bit; each
    rank breaks exactly the examples whose class of that rank can beat the label within eps
    (the closed form)."""
    logits_fn, _, _, x, y, reachable = _linear_case(5, "l2", n=96, seed=3)
    eps = LINEAR_EPS["l2"]
    run = tf.function(lambda target: attacks.fab_t(logits_fn, x, y, eps, "l2", steps=5,
                                                   target=target))
    targets = attacks.top_targets(logits_fn(x), y, 4).numpy()
    by_rank = reachable[np.arange(96)[:, None], targets]
    first = attacks.fab_t(logits_fn, x, y, eps, "l2", steps=5, n_targets=1)
    for got, want in zip(run(tf.constant(targets[:, 0])), first):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    for rank in range(4):
        np.testing.assert_array_equal(run(tf.constant(targets[:, rank]))[1].numpy(),
                                      by_rank[:, rank], err_msg=str(rank))
    assert run.experimental_get_tracing_count() == 1
    assert by_rank[:, 1:].any() and (by_rank[:, 1:].any(1) & ~by_rank[:, 0]).any()  # not vacuous


def test_fab_t_bad_inputs_raise_clear_errors():
    x, y = tf.fill([4, 5], 0.5), tf.zeros([4], tf.int32)
    model = lambda v: tf.matmul(v, tf.ones([5, 3]))  # noqa: E731
    with pytest.raises(ValueError, match="norm must be one of"):
        attacks.fab_t(model, x, y, 0.1, "l1")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        attacks.fab_t(model, x, y, 0.1, steps=0)


def _fab_literal(weights, x, y, targets, eps, steps, norm, alpha_max=0.1, eta=1.05, beta=0.9):
    """FAB-T for ONE example of `_tanh_case`, transcribed from Algorithm 1 of Croce & Hein (ICML
    2020) in float64 numpy (the gradient of z_t - z_y by hand, the projection by bisection), one
    run of `steps` iterations per target until one breaks the example within eps.
    Returns (x_adv, fooled)."""
    w1, b1, w2 = (v.astype(np.float64) for v in weights)
    x = x.astype(np.float64)
    for t in targets:
        x_k, x_out, best = x, x, np.inf
        for _ in range(steps):
            h = np.tanh(w1 @ x_k + b1)
            f = w2[t] @ h - w2[y] @ h  # f_s(x_k)
            g = w1.T @ ((1 - h * h) * (w2[t] - w2[y]))
            delta = _box_projection_numpy(x_k, g, -f, norm)[0]
            delta_orig = _box_projection_numpy(x, g, -f - g @ (x - x_k), norm)[0]
            a, a_orig = (max(_size(v[None], norm)[0], 1e-8) for v in (delta, delta_orig))
            alpha = min(a / (a + a_orig), alpha_max)
            x_k = np.clip((1 - alpha) * (x_k + eta * delta) + alpha * (x + eta * delta_orig), 0, 1)
            if np.argmax(w2 @ np.tanh(w1 @ x_k + b1)) != y:
                size = _size((x_k - x)[None], norm)[0]
                if size < best:
                    x_out, best = x_k, size
                x_k = x + beta * (x_k - x)
        if best <= eps:
            return x_out, True
    return x, False


@pytest.mark.parametrize("norm,eps", [("linf", 0.02), ("l2", 0.05)])
def test_fab_t_matches_a_literal_transcription_of_algorithm_1(norm, eps):
    """A nonlinear (tanh) network, 3 targets, 20 iterations each: the batched TF attack breaks
    the same examples as the one-example float64 transcription, at the same points."""
    logits_fn, weights, x, y = _tanh_case()
    x_adv, fooled = tf.function(lambda: attacks.fab_t(logits_fn, x, y, eps, norm, steps=20))()
    targets = attacks.top_targets(logits_fn(x), y, 3).numpy()
    want = [_fab_literal(weights, x[i], y[i], targets[i], eps, 20, norm) for i in range(len(y))]
    np.testing.assert_array_equal(fooled.numpy(), [fooled_i for _, fooled_i in want])
    assert 0.2 < fooled.numpy().mean() < 0.9, fooled.numpy().mean()
    np.testing.assert_allclose(x_adv.numpy(), np.stack([x_i for x_i, _ in want]), atol=1e-4)
