"""Plain, UEL and MoCo losses against independent numpy references of docs/method.md (float64 loops)."""

import numpy as np
import pytest
import tensorflow as tf

from clae_tf.method import losses


def _unit(rng, n, d):
    v = rng.standard_normal((n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _log_softmax_at(sims, index):
    m = sims.max()
    return sims[index] - (m + np.log(np.sum(np.exp(sims - m))))


def _np_plain(a, b, t):
    """-(1/N) sum_i log(exp(a_i.b_i/t) / sum_k exp(a_i.b_k/t))."""
    n = len(a)
    return -sum(_log_softmax_at(np.array([a[i] @ b[k] / t for k in range(n)]), i)
                for i in range(n)) / n


def _np_uel(rows, cols, t):
    """docs/method.md, UEL, with the queries `rows` and the stop-gradient side `cols` given apart:
    P(k|u) = exp(r_u.c_k/t) / sum_{j != u} exp(r_u.c_j/t);
    L = -(1/2N) sum_u [log P(u'|u) + sum_{k not in {u, u'}} log(1 - P(k|u))]."""
    n2 = len(rows)
    n = n2 // 2
    total = 0.0
    for u in range(n2):
        partner = u + n if u < n else u - n
        others = [j for j in range(n2) if j != u]
        e = {j: np.exp(rows[u] @ cols[j] / t) for j in others}
        s = sum(e.values())
        total += np.log(e[partner] / s)
        total += sum(np.log(1.0 - e[k] / s) for k in others if k != partner)
    return -total / n2


def _np_moco(q, k, queue, t):
    """-(1/N) sum_i log(exp(q_i.k_i/t) / (exp(q_i.k_i/t) + sum_j exp(q_i.queue_j/t)))."""
    total = 0.0
    for i in range(len(q)):
        sims = np.array([q[i] @ k[i]] + [q[i] @ c for c in queue]) / t
        total += _log_softmax_at(sims, 0)
    return -total / len(q)


@pytest.mark.parametrize("n,t", [(1, 0.1), (4, 0.1), (9, 0.5)])
def test_plain_matches_numpy(n, t):
    rng = np.random.default_rng(n)
    a, b = _unit(rng, n, 8), _unit(rng, n, 8)
    loss, logits, labels = losses.plain(tf.constant(a, tf.float32), tf.constant(b, tf.float32), t)
    np.testing.assert_allclose(float(loss), _np_plain(a, b, t), rtol=1e-5)
    assert logits.shape == (n, n) and labels.numpy().tolist() == list(range(n))


def test_plain_is_one_directional():
    rng = np.random.default_rng(7)
    a, b = _unit(rng, 6, 8), _unit(rng, 6, 8)
    ab = float(losses.plain(tf.constant(a), tf.constant(b), 0.1)[0])
    ba = float(losses.plain(tf.constant(b), tf.constant(a), 0.1)[0])
    assert abs(ab - ba) > 1e-3
    np.testing.assert_allclose(ba, _np_plain(b, a, 0.1), rtol=1e-5)


@pytest.mark.parametrize("n,t", [(1, 0.1), (3, 0.1), (8, 0.5)])
def test_uel_matches_numpy(n, t):
    rng = np.random.default_rng(10 + n)
    z1, z2 = _unit(rng, n, 8), _unit(rng, n, 8)
    loss, logits, labels = losses.uel(tf.constant(z1, tf.float32), tf.constant(z2, tf.float32), t)
    z = np.concatenate([z1, z2])
    np.testing.assert_allclose(float(loss), _np_uel(z, z, t), rtol=1e-5)
    assert logits.shape == (2 * n, 2 * n)
    assert labels.numpy().tolist() == list(range(n, 2 * n)) + list(range(n))


def test_uel_gradient_flows_through_the_queries_only():
    """The stop-gradient side (the columns) gets no gradient: the loss's gradient equals the
    finite differences of the reference with the columns held fixed, and NOT the ones where
    the columns move with the rows (which a missing stop-gradient would give)."""
    rng = np.random.default_rng(3)
    n, t, h = 3, 0.5, 1e-6
    z1, z2 = _unit(rng, n, 5), _unit(rng, n, 5)
    a, b = tf.constant(z1, tf.float64), tf.constant(z2, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch([a, b])
        loss, _, _ = losses.uel(a, b, t)
    grad = np.concatenate([g.numpy() for g in tape.gradient(loss, [a, b])])
    z = np.concatenate([z1, z2])
    rows_only, both = np.zeros_like(z), np.zeros_like(z)
    for i in np.ndindex(*z.shape):
        zp, zm = z.copy(), z.copy()
        zp[i] += h
        zm[i] -= h
        rows_only[i] = (_np_uel(zp, z, t) - _np_uel(zm, z, t)) / (2 * h)
        both[i] = (_np_uel(zp, zp, t) - _np_uel(zm, zm, t)) / (2 * h)
    np.testing.assert_allclose(grad, rows_only, rtol=1e-3, atol=1e-5)  # float32 loss
    assert np.max(np.abs(rows_only - both)) > 1e-2  # the comparison can tell them apart


@pytest.mark.parametrize("n,k,t", [(1, 1, 0.2), (4, 10, 0.2), (5, 3, 0.07)])
def test_moco_matches_numpy(n, k, t):
    rng = np.random.default_rng(20 + n)
    q, keys, queue = _unit(rng, n, 6), _unit(rng, n, 6), _unit(rng, k, 6)
    loss, logits, labels = losses.moco(*(tf.constant(v, tf.float32) for v in (q, keys, queue)), t)
    np.testing.assert_allclose(float(loss), _np_moco(q, keys, queue, t), rtol=1e-5)
    assert logits.shape == (n, 1 + k) and not labels.numpy().any()


def test_moco_gradient_only_reaches_the_queries():
    rng = np.random.default_rng(5)
    q, k, queue = (tf.constant(_unit(rng, m, 4)) for m in (3, 3, 7))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([q, k, queue])
        loss, _, _ = losses.moco(q, k, queue, 0.2)
    assert tape.gradient(loss, k) is None and tape.gradient(loss, queue) is None
    assert np.abs(tape.gradient(loss, q).numpy()).max() > 0


@pytest.mark.parametrize("fn", [losses.plain, losses.uel])
def test_perfectly_aligned_separated_views_have_low_loss(fn):
    z = np.eye(4)  # orthogonal images, identical views
    loss, logits, labels = fn(tf.constant(z), tf.constant(z), 0.1)
    assert float(loss) < 1e-3
    assert float(losses.contrast_accuracy(logits, labels)) == 1.0
