"""The L-inf Square attack: Andriushchenko et al., "Square Attack: a query-efficient black-box
adversarial attack via random search" (ECCV 2020), Algorithm 1 and its L-inf proposal;
score-based, never a gradient.
"""

import tensorflow as tf

from clae_tf.method.attacks.common import (
    _NOT_CONVERTED,
    _clip_range,
    _count,
    _misclassified,
    _on_alive,
    _row_mask,
    _rows,
    _seed,
    _select,
)
from clae_tf.method.attacks.logit_losses import margin

# The official code's schedule of the square's share p: halved after each of these iteration
# counts, given on a 10,000-query budget and scaled to the actual one.
SQUARE_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_p(i, queries, p_init=0.8):
    """The share p of the image a square covers at iteration i (0-based, after the start; a
    scalar or any int tensor) of a `queries` budget: p_init halved once per count of
    SQUARE_HALVINGS below i * 10000 / queries (the official code's int(i / queries * 10000),
    here in exact integer arithmetic)."""
    scaled = tf.cast(i, tf.int64)[..., None] * 10000 // queries
    halvings = tf.reduce_sum(tf.cast(scaled > tf.constant(SQUARE_HALVINGS, tf.int64), tf.int32),
                             axis=-1)
    return p_init / tf.pow(2.0, tf.cast(halvings, tf.float32))


def _random_signs(shape, seed):
    return tf.cast(2 * tf.random.stateless_uniform(shape, seed, 0, 2, tf.int32) - 1, tf.float32)


def _square_window(shape, p, seed):
    """(N, H, W, 1) bool: one random s x s square per example, s = round(sqrt(p H W)) clipped
    to [1, min(H, W) - 1] (the official code's side), its corner uniform over every position
    that keeps it inside the image."""
    n, h, w = shape[0], shape[1], shape[2]
    side = tf.cast(tf.round(tf.sqrt(p * h * w)), tf.int32)
    side = tf.clip_by_value(side, 1, max(min(h, w) - 1, 1))
    u = tf.random.stateless_uniform([2, n], seed)
    room = tf.cast(tf.stack([h - side + 1, w - side + 1])[:, None], tf.float32)
    corner = tf.cast(tf.floor(u * room), tf.int32)  # (2, N)
    rows = tf.range(h)[None, :] - corner[0][:, None]  # (N, H)
    cols = tf.range(w)[None, :] - corner[1][:, None]  # (N, W)
    return ((rows >= 0) & (rows < side))[:, :, None, None] & (
        (cols >= 0) & (cols < side))[:, None, :, None]


SQUARE_DRAWS = 16  # sign patterns drawn per example and iteration (see _square_candidate)


def _square_candidate(x_plus, x_minus, x_best, p, seed):
    """x_best with a random square (`_square_window`) set to x + eps or x - eps (clipped), one
    sign per example and channel. As in the official code, a sign pattern that would leave the
    image unchanged (the square already holds it) is redrawn, so no query is spent on the same
    image: here SQUARE_DRAWS patterns are drawn at once and each example takes its first that
    changes something (the first draw when none does), which has the distribution of redrawing
    until one does, without a loop."""
    n, (h, w, c) = tf.shape(x_best)[0], x_best.shape[1:]
    inside = _square_window([n, h, w], p, tf.random.experimental.stateless_fold_in(seed, 0))

    def holds(corner):  # (N, C): the square already equals this corner in every pixel
        return tf.reduce_max(tf.abs(corner - x_best) * tf.cast(inside, x_best.dtype),
                             axis=[1, 2]) < 1e-7

    signs = _random_signs([n, SQUARE_DRAWS, c], tf.random.experimental.stateless_fold_in(seed, 1))
    held = tf.where(signs > 0, holds(x_plus)[:, None, :], holds(x_minus)[:, None, :])
    first = tf.argmax(tf.cast(~tf.reduce_all(held, axis=2), tf.int32), axis=1)  # (N,)
    chosen = tf.gather(signs, first, batch_dims=1)[:, None, None, :]  # (N, 1, 1, C)
    return _select(inside, _select(chosen > 0, x_plus, x_minus), x_best)


def _margin_fn(logits_fn):
    """(x, y) -> (margin (M,), misclassified (M,)) from one forward pass, no gradient."""
    def margin_at(x, y):
        logits = tf.stop_gradient(tf.cast(logits_fn(x), tf.float32))
        return margin(logits, y), _misclassified(logits, y)
    return margin_at


def _square_body(i, x_best, best, fooled, n_queries, x_plus, x_minus, y, queries, p_init, seed,
                 margin_at):
    """One iteration of Algorithm 1 of the paper on the examples not fooled yet: a candidate,
    one query each, kept where it lowers the example's margin (or fools it)."""
    alive = ~fooled
    x_new = _square_candidate(x_plus, x_minus, x_best, square_p(i, queries, p_init),
                              tf.random.experimental.stateless_fold_in(seed, 1 + i))
    new, fooled_new = _on_alive(alive, margin_at, x_new, y)
    accept = alive & ((new < best) | fooled_new)
    return (i + 1, _select(_row_mask(accept, x_best), x_new, x_best),
            tf.where(accept, new, best), fooled | (accept & fooled_new),
            n_queries + tf.cast(alive, tf.int32))


@_NOT_CONVERTED
def square_linf(logits_fn, x, y, eps, queries, seed, p_init=0.8, clip_min=0.0, clip_max=1.0):
    """The L-inf Square attack (Andriushchenko et al., ECCV 2020), score-based: logits only, no
    gradient is ever taken (a model without one is attacked all the same).

    Start: vertical stripes, x + eps * (one random sign per example, column and channel), one
    query. Then, while the budget lasts and the example stands, a random square of side
    round(sqrt(p H W)) is set to x +- eps (one sign per channel) and kept if it lowers the
    margin loss z_y - max_{i != y} z_i; p follows `square_p` (p_init halved at the official
    code's query counts, scaled to `queries`). Per example: its own squares (position uniform
    over all positions inside the image), acceptance and early exit; fooled examples are no
    longer queried. The noise of each iteration is drawn for the whole batch from `seed`.

    Args:
      logits_fn: images (N, H, W, C) -> (N, classes) logits; stateless, examples independent.
      x: (N, H, W, C) float32 clean images in [clip_min, clip_max]; y: (N,) int labels.
      eps: L-inf radius (scalar or (N,)); queries: the budget per example (int >= 1).
      seed: shape-[2] int seed; p_init: the square's first share of the image.
      clip_min, clip_max: the valid range (None: unbounded).

    Returns:
      (x_adv, fooled, n_queries): x_adv (N, H, W, C) the best point found (in the eps-ball and
      the range), fooled (N,) bool, n_queries (N,) int32 model evaluations spent on each example
      (the start counts as one).
    """
    queries = _count(queries, "queries", 1)
    x = tf.cast(x, tf.float32)
    if x.shape.rank != 4 or None in x.shape[1:]:
        raise ValueError(f"square_linf attacks images (N, H, W, C) of known size, got {x.shape}")
    y = tf.cast(y, tf.int32)
    eps = _rows(eps, x)
    seed = _seed(seed)
    margin_at = _margin_fn(logits_fn)
    stripes = _random_signs(tf.stack([tf.shape(x)[0], 1, x.shape[2], x.shape[3]]),
                            tf.random.experimental.stateless_fold_in(seed, 0))
    x_best = _clip_range(x + eps * stripes, clip_min, clip_max)
    x_plus, x_minus = _clip_range(x + eps, clip_min, clip_max), _clip_range(x - eps, clip_min,
                                                                             clip_max)
    best, fooled = margin_at(x_best, y)
    state = (tf.constant(0), x_best, best, fooled, tf.ones_like(y))
    if queries > 1:
        state = tf.while_loop(
            lambda i, _, __, fooled, ___: (i < queries - 1) & ~tf.reduce_all(fooled),
            lambda *s: _square_body(*s, x_plus, x_minus, y, queries, p_init, seed, margin_at),
            state)
    _, x_best, _, fooled, n_queries = state
    return tf.stop_gradient(x_best), fooled, n_queries
