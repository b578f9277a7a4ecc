"""Tests of clae_tf.method.losses: NT-Xent against an independent numpy reference of docs/method.md."""

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
            fd[i, j] = (_np_nt_xent(zp, z2, temperature) - _np_nt_xent(zm, z2, temperature)) / (2 * h)
    assert np.abs(fd).max() > 1e-2  # not a vacuous comparison
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=2e-5 / temperature)
