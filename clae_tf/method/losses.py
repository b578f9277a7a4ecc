"""Contrastive losses as pure functions: tensors in, (loss, logits, labels) out.

Embeddings are L2-normalised already (the model returns unit-norm z). Under data parallelism the
method (methods/) passes the *gathered* embeddings of the whole global batch, so every replica
computes the same batch-wide loss; the train step (train.make_train_step) divides it by the
number of replicas for the optimizer.
"""

import tensorflow as tf


def nt_xent(z1, z2, temperature):
    """SimCLR's NT-Xent loss over the 2N views (docs/method.md, "SimCLR").

    For each view u with partner u': -log(exp(z_u.z_u'/t) / sum_{k != u} exp(z_u.z_k/t)),
    averaged over the 2N views.

    Args:
      z1, z2: (N, D) unit-norm embeddings of view 1 and view 2; row k of each is image k.
      temperature: the softmax temperature t.

    Returns:
      loss: scalar float32.
      logits: (2N, 2N) similarities / t, with the self-similarity masked to a large negative.
      labels: (2N,) int32 column of each row's positive (k <-> k + N).
    """
    z = tf.cast(tf.concat([z1, z2], axis=0), tf.float32)  # (2N, D)
    n2 = tf.shape(z)[0]
    n = n2 // 2
    logits = tf.matmul(z, z, transpose_b=True) / temperature  # (2N, 2N)
    # Remove u itself from its own denominator. -1e9 rather than -inf keeps gradients finite.
    logits = logits - 1e9 * tf.eye(n2, dtype=logits.dtype)
    labels = tf.concat([tf.range(n, n2), tf.range(0, n)], axis=0)  # (2N,)
    loss = _cross_entropy(logits, labels)
    return loss, logits, labels


def plain(z1, z2, temperature):
    """Plain batch instance classification (docs/method.md, "Plain"), one direction only.

    -(1/N) sum_i log(exp(a_i.b_i/t) / sum_k exp(a_i.b_k/t)) with a = z1, b = z2: view-1
    embeddings are the queries, view-2 embeddings the classifier weights (so CLAE's x_adv, passed
    as z2, is a positive for its own query and a negative for every other one).

    Returns (loss, logits (N, N), labels (N,) = arange).
    """
    a = tf.cast(z1, tf.float32)
    b = tf.cast(z2, tf.float32)
    logits = tf.matmul(a, b, transpose_b=True) / temperature
    labels = tf.range(tf.shape(a)[0])
    loss = _cross_entropy(logits, labels)
    return loss, logits, labels


def uel(z1, z2, temperature):
    """UEL, "invariant and spreading instance feature" (Ye et al. 2019; docs/method.md, "UEL").

    z = [z1; z2] (2N rows). Each row u is a query against the stop-gradient rows of the batch:
    P(k|u) = exp(z_u.sg(z_k)/t) / sum_{j != u} exp(z_u.sg(z_j)/t), and
    L = -(1/2N) sum_u [log P(u'|u) + sum_{k not in {u, u'}} log(1 - P(k|u))].
    Gradients reach the embeddings only as queries (rows), never as the memory (columns).

    Returns (loss, logits (2N, 2N) with the diagonal masked, labels (2N,) = each partner).
    """
    z = tf.cast(tf.concat([z1, z2], axis=0), tf.float32)
    n2 = tf.shape(z)[0]
    n = n2 // 2
    eye = tf.eye(n2, dtype=z.dtype)
    logits = tf.matmul(z, tf.stop_gradient(z), transpose_b=True) / temperature - 1e9 * eye
    labels = tf.concat([tf.range(n, n2), tf.range(0, n)], axis=0)
    log_p = tf.nn.log_softmax(logits, axis=-1)  # log P(k|u); the diagonal is ~ -1e9 -> P = 0
    log_p_pos = tf.gather(log_p, labels, batch_dims=1)  # log P(u'|u)
    # log(1 - P(k|u)) for every k != u'; k = u contributes log(1 - 0) = 0. The floor only
    # matters when a negative takes all the probability mass (then the log would be -inf).
    negative = 1.0 - tf.one_hot(labels, n2, dtype=z.dtype)
    log_not = tf.math.log(tf.maximum(1.0 - tf.exp(log_p), 1e-12)) * negative
    loss = -tf.reduce_mean(log_p_pos + tf.reduce_sum(log_not, axis=-1))
    return loss, logits, labels


def moco(q, k, queue, temperature):
    """MoCo's InfoNCE (He et al. 2020; MoCo v2): each query's positive is its image's key from
    the momentum encoder (methods/moco.py picks which view's key); the negatives are the queue
    of keys from past batches.

    Args:
      q: (N, D) unit-norm queries (query encoder; gradients flow).
      k: (N, D) unit-norm positive keys, row i for query i (momentum encoder; constants).
      queue: (K, D) unit-norm keys of earlier batches.
    Returns (loss, logits (N, 1 + K) = [positive, queue...] / t, labels (N,) = 0).
    """
    q = tf.cast(q, tf.float32)
    k = tf.stop_gradient(tf.cast(k, tf.float32))
    l_pos = tf.reduce_sum(q * k, axis=-1, keepdims=True)  # (N, 1)
    l_neg = tf.matmul(q, tf.stop_gradient(tf.cast(queue, tf.float32)), transpose_b=True)
    logits = tf.concat([l_pos, l_neg], axis=1) / temperature
    labels = tf.zeros([tf.shape(q)[0]], tf.int32)
    loss = _cross_entropy(logits, labels)
    return loss, logits, labels


def _cross_entropy(logits, labels):
    """Mean softmax cross-entropy of each row's logits against its label column."""
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def contrast_accuracy(logits, labels):
    """Fraction of views whose most similar other view is their partner."""
    pred = tf.argmax(logits, axis=-1, output_type=labels.dtype)
    return tf.reduce_mean(tf.cast(tf.equal(pred, labels), tf.float32))


# The losses of the methods whose two views both go through the trained encoder: loss(z1, z2, t).
# MoCo's loss also needs keys and a queue (methods/moco.py). methods.BUILDERS builds one
# PairMethod per entry.
PAIR_LOSSES = {"simclr": nt_xent, "plain": plain, "uel": uel}
