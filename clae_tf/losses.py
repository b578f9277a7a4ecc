"""Contrastive losses as pure functions: tensors in, (loss, logits, labels) out.

Embeddings are L2-normalised already (the model returns unit-norm z). Under data parallelism the
caller passes the *gathered* embeddings of the whole global batch, so every replica computes the
same batch-wide loss; see train.py for how that is scaled.
"""

import tensorflow as tf


def nt_xent(z1, z2, temperature):
    """SimCLR's NT-Xent loss over the 2N views (PAPER.md, "SimCLR").

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
    loss = tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
    return loss, logits, labels


def contrast_accuracy(logits, labels):
    """Fraction of views whose most similar other view is their partner."""
    pred = tf.argmax(logits, axis=-1, output_type=labels.dtype)
    return tf.reduce_mean(tf.cast(tf.equal(pred, labels), tf.float32))


LOSSES = {"simclr": nt_xent}
