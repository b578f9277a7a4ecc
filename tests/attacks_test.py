"""Tests of clae_tf.attacks.fgsm with the tiny dual-BN model (PAPER.md, "The CLAE step", step 3)."""

import numpy as np
import pytest
import tensorflow as tf

from clae_tf import attacks, builders, losses
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
    # (channel 2 everywhere, and the top-left 4x4 corner of every channel); elsewhere a training-mode
    # BN network makes every input pixel matter.
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
    # mode, i.e. each forward normalises with its own batch's statistics (FGSM differentiates through
    # those statistics). So both loss evaluations below use training mode too: at x1 the second
    # forward sees the batch x1, at x_adv the batch x_adv, exactly the function whose gradient the
    # attack followed. (Inference mode would evaluate a different function, with the near-initial
    # moving statistics.) The anchor is the training-mode embedding of x1, as in the attack.
    # The adversarial BN moving statistics are restored afterwards so other tests see the same state.
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

    for v, before in zip(others, saved_others):  # clean BN stats, conv/dense weights, clean gamma/beta
        np.testing.assert_array_equal(v.numpy(), before, err_msg=v.path)
    for v, before in zip(trainable, saved_trainable):  # includes the adversarial gamma/beta
        np.testing.assert_array_equal(v.numpy(), before, err_msg=v.path)
    # One training-mode forward through the adversarial BNs: every moving mean/variance moved.
    for v, before in zip(stats, saved_stats):
        assert not np.array_equal(v.numpy(), before), v.path
    _restore(stats, saved_stats)


def _reference_x_adv(model, x1, eps):
    """PAPER.md step 3 as the reference runs it: x_adv = x1 (a separate, watched tensor); the
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
    run = tf.function(lambda loss, target: attacks.apgd(logits_fn, x, y, eps, 100, [0, 1],
                                                         norm=norm, loss=loss, target=target))
    x_dlr, fooled_dlr = run("dlr", None)
    np.testing.assert_array_equal(fooled_dlr.numpy(), ~robust)
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


def _apgd_literal(w, b, x, y, x0, eps, steps, norm, rho=0.75, alpha=0.75):
    """Algorithm 1 of Croce & Hein (2020) for ONE example of a linear classifier under CE,
    transcribed line by line in float32 numpy (the gradient in closed form: (p - e_y) W),
    stopping at its first misclassified iterate. Returns (x_adv, fooled)."""
    def f(v):
        z = w @ v + b
        p = np.exp(z - z.max())
        p /= p.sum()
        return -np.log(p[y]), (p - np.eye(len(b), dtype=np.float32)[y]) @ w, np.argmax(z) != y

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


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_matches_a_literal_transcription_of_algorithm_1(norm):
    """Same start, same 60 steps: the TF loop (batched, per-example schedules, early exit)
    ends where the one-example numpy transcription does: fooled flags, and x_adv (the first
    fooling iterate, or the best one), on a 5-class linear CE problem whose schedule halves
    eta (oscillating losses) and restarts."""
    logits_fn, w, b, x, y, reachable = _linear_case(5, norm, n=24, seed=3)
    eps = LINEAR_EPS[norm]
    x0 = attacks.uniform_start(x, eps, tf.constant([4, 5]), 0.0, 1.0).numpy()
    x_adv, fooled = attacks.apgd(logits_fn, x, y, eps, 60, None, norm=norm, x_start=x0)
    want = [_apgd_literal(w, b, x[i], y[i], x0[i], np.float32(eps), 60, norm)
            for i in range(len(y))]
    np.testing.assert_array_equal(fooled.numpy(), [fooled_i for _, fooled_i in want])
    assert 0 < fooled.numpy().sum() < len(y)
    # float32 round-off of two orders of summation; a different schedule would differ by ~eta.
    np.testing.assert_allclose(x_adv.numpy(), np.stack([x_i for x_i, _ in want]), atol=1e-4)


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
