"""losses.py: NT-Xent, Plain, UEL and MoCo against independent numpy references of
docs/method.md (float64 loops)."""

import numpy as np
import pytest
import tensorflow as tf

from clae_tf.method import losses


def _unit(rng, n, d):
    v = rng.standard_normal((n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _np_nt_xent(z1, z2, t):
    """docs/method.md, SimCLR: stack the 2N views; for each view u with partner u',
    loss(u) = -log(exp(z_u.z_u'/t) / sum_{k != u} exp(z_u.z_k/t)); mean over the 2N views.
    Written with explicit loops (float64), deliberately unlike the implementation."""
    z = np.concatenate([z1, z2], axis=0).astype(np.float64)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for u in range(n2):
        partner = u + n if u < n else u - n
        sims = np.array([z[u] @ z[k] / t for k in range(n2)])
        others = np.array([k for k in range(n2) if k != u])
        m = sims[others].max()
        log_denominator = m + np.log(np.sum(np.exp(sims[others] - m)))
        total += -(sims[partner] - log_denominator)
    return total / n2


@pytest.mark.parametrize("n", [1, 2, 5, 16])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0])
def test_nt_xent_matches_numpy_reference(n, temperature):
    rng = np.random.default_rng(1000 * n + int(100 * temperature))
    z1, z2 = _unit(rng, n, 8), _unit(rng, n, 8)
    loss, _, _ = losses.nt_xent(tf.constant(z1, tf.float32), tf.constant(z2, tf.float32),
                                temperature)
    expected = _np_nt_xent(z1, z2, temperature)
    assert loss.dtype == tf.float32
    assert loss.shape == ()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-5)


def test_nt_xent_is_not_symmetric_in_a_trivial_way():
    """Sanity of the reference itself: swapping the rows of z2 changes the loss (the positive is the
    same-index row of the other view, not any row)."""
    rng = np.random.default_rng(0)
    z1, z2 = _unit(rng, 6, 8), _unit(rng, 6, 8)
    a = float(losses.nt_xent(tf.constant(z1, tf.float32), tf.constant(z2, tf.float32), 0.5)[0])
    b = float(losses.nt_xent(tf.constant(z1, tf.float32), tf.constant(z2[::-1].copy(),
                                                                       tf.float32), 0.5)[0])
    assert abs(a - b) > 1e-3
    np.testing.assert_allclose(b, _np_nt_xent(z1, z2[::-1], 0.5), rtol=1e-5, atol=1e-5)


def test_nt_xent_perfect_alignment_value():
    """z2 == z1 with orthonormal rows: each view sees its partner at 1/t and 2N-2 others at 0, so
    loss = -log(e^{1/t} / (e^{1/t} + 2N - 2)) in closed form."""
    n, t = 4, 0.5
    z = np.eye(8)[:n]
    loss = float(losses.nt_xent(tf.constant(z, tf.float32), tf.constant(z, tf.float32), t)[0])
    expected = -np.log(np.exp(1 / t) / (np.exp(1 / t) + 2 * n - 2))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_logits_and_labels(n):
    rng = np.random.default_rng(n)
    t = 0.2
    z1, z2 = _unit(rng, n, 5), _unit(rng, n, 5)
    _, logits, labels = losses.nt_xent(tf.constant(z1, tf.float32), tf.constant(z2, tf.float32), t)
    logits, labels = logits.numpy(), labels.numpy()
    assert logits.shape == (2 * n, 2 * n)
    assert labels.shape == (2 * n,)
    assert labels.dtype == np.int32
    # Labels point at the partner: view-1 row k <-> view-2 row k, i.e. column k + N and back.
    np.testing.assert_array_equal(labels, np.concatenate([np.arange(n, 2 * n), np.arange(n)]))
    np.testing.assert_array_equal(labels[labels], np.arange(2 * n))  # an involution
    # Off-diagonal logits are the similarities / t; the diagonal is masked to a large negative.
    z = np.concatenate([z1, z2])
    off = ~np.eye(2 * n, dtype=bool)
    np.testing.assert_allclose(logits[off], (z @ z.T / t)[off], rtol=1e-5, atol=1e-5)
    assert np.all(np.diag(logits) < -1e8)


def test_labels_point_at_partner_when_views_agree():
    rng = np.random.default_rng(3)
    n = 6
    z = _unit(rng, n, 32)
    _, logits, labels = losses.nt_xent(tf.constant(z, tf.float32), tf.constant(z, tf.float32), 0.5)
    # With z2 == z1 the most similar other view of every row is its partner (similarity 1).
    np.testing.assert_array_equal(np.argmax(logits.numpy(), axis=1), labels.numpy())


def test_contrast_accuracy_is_one_for_identical_separated_views():
    n = 5
    z = tf.constant(np.eye(8)[:n], tf.float32)  # orthonormal: well separated
    _, logits, labels = losses.nt_xent(z, z, 0.5)
    assert float(losses.contrast_accuracy(logits, labels)) == 1.0


def test_contrast_accuracy_below_one():
    n = 4
    z1 = np.eye(8)[:n]
    z2 = z1.copy()
    z2[[0, 1]] = z2[[1, 0]]  # images 0 and 1 swapped in view 2: their 4 views match the wrong one
    _, logits, labels = losses.nt_xent(tf.constant(z1, tf.float32), tf.constant(z2, tf.float32),
                                       0.5)
    assert float(losses.contrast_accuracy(logits, labels)) == pytest.approx(0.5)
    # And fully shifted (a derangement): nothing right.
    z3 = np.roll(z1, 1, axis=0)
    _, logits, labels = losses.nt_xent(tf.constant(z1, tf.float32), tf.constant(z3, tf.float32),
                                       0.5)
    assert float(losses.contrast_accuracy(logits, labels)) == 0.0


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_gradient_matches_finite_differences(temperature):
    rng = np.random.default_rng(7)
    n, d = 4, 5
    z1, z2 = _unit(rng, n, d), _unit(rng, n, d)
    z1_t = tf.Variable(z1, dtype=tf.float32)
    with tf.GradientTape() as tape:
        loss, _, _ = losses.nt_xent(z1_t, tf.constant(z2, tf.float32), temperature)
    grad = tape.gradient(loss, z1_t).numpy()
    # Central differences of the float64 numpy reference (z1 treated as free vectors: nt_xent
    # does not re-normalise).
    h = 1e-6
    fd = np.zeros_like(z1)
    for i in range(n):
        for j in range(d):
            zp, zm = z1.copy(), z1.copy()
            zp[i, j] += h
            zm[i, j] -= h
            fd[i, j] = ((_np_nt_xent(zp, z2, temperature) - _np_nt_xent(zm, z2, temperature)) /
                        (2 * h))
    assert np.abs(fd).max() > 1e-2  # not a vacuous comparison
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=2e-5 / temperature)


# ---------------------------------------------------------------------------------------------
# Plain, UEL and MoCo.


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
