"""The L-inf Square attack: Andriushchenko et al., "Square Attack: a query-efficient black-box
adversarial attack via random search" (ECCV 2020), Algorithm 1 and its L-inf proposal;
score-based, never a gradient.
"""

import tensorflow as tf

from clae_tf.method.attacks import engine
from clae_tf.method.attacks.common import (
    _NOT_CONVERTED,
    _clip_range,
    _count,
    _misclassified,
    _row_mask,
    _rows,
    _seed,
    _select,
    image_uniform,
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


def _signs(u):
    """Uniforms in [0, 1) -> -1.0 / +1.0 with probability 1/2 each."""
    return tf.where(u < 0.5, -1.0, 1.0)


def _square_window(u, p, h, w):
    """(M, H, W, 1) bool: one random s x s square per example, s = round(sqrt(p H W)) clipped
    to [1, min(H, W) - 1] (the official code's side), its corner uniform over every position
    that keeps it inside the image. u: (M, 2) uniforms (the corner); p: (M,) shares."""
    side = tf.cast(tf.round(tf.sqrt(p * h * w)), tf.int32)
    side = tf.clip_by_value(side, 1, max(min(h, w) - 1, 1))  # (M,)
    room = tf.cast(tf.stack([h - side + 1, w - side + 1], axis=1), tf.float32)
    corner = tf.cast(tf.floor(u * room), tf.int32)  # (M, 2)
    rows = tf.range(h)[None, :] - corner[:, :1]  # (M, H)
    cols = tf.range(w)[None, :] - corner[:, 1:]  # (M, W)
    return ((rows >= 0) & (rows < side[:, None]))[:, :, None, None] & (
        (cols >= 0) & (cols < side[:, None]))[:, None, :, None]


SQUARE_DRAWS = 16  # sign patterns drawn per example and iteration (see _square_candidate)


def _square_candidate(x_plus, x_minus, x_best, p, seed, ids, i):
    """x_best with a random square (`_square_window`) set to x + eps or x - eps (clipped), one
    sign per example and channel, drawn from each example's stream at its iteration i (M,). As
    in the official code, a sign pattern that would leave the image unchanged (the square
    already holds it) is redrawn, so no query is spent on the same image: here SQUARE_DRAWS
    patterns are drawn at once and each example takes its first that changes something (the
    first draw when none does), which has the distribution of redrawing until one does,
    without a loop."""
    h, w, c = x_best.shape[1:]
    inside = _square_window(image_uniform(seed, ids, [2], stream=1 + 2 * i), p, h, w)

    def holds(corner):  # (M, C): the square already equals this corner in every pixel
        return tf.reduce_max(tf.abs(corner - x_best) * tf.cast(inside, x_best.dtype),
                             axis=[1, 2]) < 1e-7

    signs = _signs(image_uniform(seed, ids, [SQUARE_DRAWS, c], stream=2 + 2 * i))
    held = tf.where(signs > 0, holds(x_plus)[:, None, :], holds(x_minus)[:, None, :])
    first = tf.argmax(tf.cast(~tf.reduce_all(held, axis=2), tf.int32), axis=1)  # (M,)
    chosen = tf.gather(signs, first, batch_dims=1)[:, None, None, :]  # (M, 1, 1, C)
    return _select(inside, _select(chosen > 0, x_plus, x_minus), x_best)


def _margin_fn(logits_fn):
    """(x, y) -> (margin (M,), misclassified (M,)) from one forward pass, no gradient."""
    def margin_at(x, y):
        logits = tf.stop_gradient(tf.cast(logits_fn(x), tf.float32))
        return margin(logits, y), _misclassified(logits, y)
    return margin_at


def _square_machine(logits_fn, queries, seed, p_init, clip_min, clip_max):
    """Algorithm 1 of the paper as a refill-engine machine (engine.py): per example its best
    point, margin, fooled flag and queries spent (n); its first step queries the start."""
    margin_at = _margin_fn(logits_fn)

    def corners(rows):
        x, eps = rows["x"], _rows(rows["eps"], rows["x"])
        return _clip_range(x + eps, clip_min, clip_max), _clip_range(x - eps, clip_min, clip_max)

    def start(rows):  # vertical stripes: x + eps * (one sign per column and channel)
        x, eps = rows["x"], _rows(rows["eps"], rows["x"])
        stripes = _signs(image_uniform(seed, rows["id"], [1] + x.shape[2:], stream=0))
        return dict(x_best=_clip_range(x + eps * stripes, clip_min, clip_max),
                    best=tf.zeros(tf.shape(rows["y"])), fooled=tf.zeros_like(rows["y"], tf.bool),
                    n=tf.zeros_like(rows["y"]))

    def step(s, rows):
        fresh = s["n"] == 0
        i = tf.maximum(s["n"] - 1, 0)  # the iteration after the start
        x_plus, x_minus = corners(rows)
        candidate = _square_candidate(x_plus, x_minus, s["x_best"], square_p(i, queries, p_init),
                                      seed, rows["id"], i)
        x_new = _select(_row_mask(fresh, candidate), s["x_best"], candidate)
        new, fooled_new = margin_at(x_new, rows["y"])
        accept = fresh | (new < s["best"]) | fooled_new
        return dict(x_best=_select(_row_mask(accept, x_new), x_new, s["x_best"]),
                    best=tf.where(accept, new, s["best"]),
                    fooled=s["fooled"] | (accept & fooled_new), n=s["n"] + 1)

    return engine.Machine(start, step, lambda s, rows: s["fooled"] | (s["n"] >= queries),
                          lambda s, rows: (s["x_best"], s["fooled"], s["n"]))


@_NOT_CONVERTED
def square_linf(logits_fn, x, y, eps, queries, seed, p_init=0.8, clip_min=0.0, clip_max=1.0,
                batch=None, ids=None):
    """The L-inf Square attack (Andriushchenko et al., ECCV 2020), score-based: logits only, no
    gradient is ever taken (a model without one is attacked all the same), on the refill engine
    (engine.py).

    Start: vertical stripes, x + eps * (one random sign per example, column and channel), one
    query. Then, while the budget lasts and the example stands, a random square of side
    round(sqrt(p H W)) is set to x +- eps (one sign per channel) and kept if it lowers the
    margin loss z_y - max_{i != y} z_i; p follows `square_p` (p_init halved at the official
    code's query counts, scaled to `queries`). Per example: its own squares (position uniform
    over all positions inside the image), drawn from its own random stream, acceptance and early
    exit; a fooled example's slot takes the next waiting one (`batch`).

    Args:
      logits_fn: images (N, H, W, C) -> (N, classes) logits; stateless, examples independent.
      x: (N, H, W, C) float32 clean images in [clip_min, clip_max]; y: (N,) int labels.
      eps: L-inf radius (scalar or (N,)); queries: the budget per example (int >= 1).
      seed: shape-[2] int seed; p_init: the square's first share of the image.
      clip_min, clip_max: the valid range (None: unbounded).
      batch: examples the model sees per call (None: all N at once).
      ids: (N,) int ids of the examples' random streams (default 0..N-1).

    Returns:
      (x_adv, fooled, n_queries): x_adv (N, H, W, C) the best point found (in the eps-ball and
      the range), fooled (N,) bool, n_queries (N,) int32 model evaluations spent on each example
      (the start counts as one).
    """
    queries = _count(queries, "queries", 1)
    x = tf.cast(x, tf.float32)
    if x.shape.rank != 4 or None in x.shape[1:]:
        raise ValueError(f"square_linf attacks images (N, H, W, C) of known size, got {x.shape}")
    x_adv, fooled, n_queries = engine.run(
        _square_machine(logits_fn, queries, _seed(seed), p_init, clip_min, clip_max),
        engine.pool_of(x, y, eps, ids), batch)
    return tf.stop_gradient(x_adv), fooled, n_queries
