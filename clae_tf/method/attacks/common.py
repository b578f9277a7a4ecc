"""What the attacks share: the L-inf and L2 balls (projections, random starts), per-example radii
and selection, loop bounds and seeds, and the bookkeeping of the examples still standing.

Package-internal (hence the underscores) but for NORMS and uniform_start.
"""

import tensorflow as tf

# The evaluation attacks are tf.while_loops with no Python control flow on tensors: autograph
# (a caller's tf.function) has nothing to convert in them, and converting them the first time
# costs seconds of tracing.
_NOT_CONVERTED = tf.autograph.experimental.do_not_convert


NORMS = ("linf", "l2")


def _check_norm(norm):
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _seed(seed):
    if seed is None:  # a fixed default would repeat the same noise at every call
        raise ValueError("a random start needs a seed (shape-[2] integers)")
    return seed


def _count(value, name, minimum):
    """A Python int >= minimum from an int or a constant tensor (loop bounds are static)."""
    static = tf.get_static_value(value)
    if static is None:
        raise ValueError(f"{name} must be a Python int or a constant, got {value!r}")
    if int(static) != static or static < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {static}")
    return int(static)


def _rows(value, x):
    """A scalar or (N,) value as (N, 1, ..., 1) in x's dtype, to broadcast against x (N, ...)."""
    value = tf.broadcast_to(tf.cast(value, x.dtype), tf.shape(x)[:1])
    return tf.reshape(value, [-1] + [1] * (x.shape.rank - 1))


def _row_mask(mask, x):
    """(N,) bool -> (N, 1, ..., 1), to select whole examples of x (N, ...) with `_select`."""
    return tf.reshape(mask, [-1] + [1] * (x.shape.rank - 1))


def _select(mask, a, b):
    """tf.where(mask, a, b) for a bool mask that broadcasts against the finite tensors a and b,
    as a * m + b * (1 - m): exact for finite values (x * 1 = x, x * 0 = +-0), and on CPU about
    ten times faster than TF's select on image-sized tensors, which made up most of an
    iteration's cost beside a small model."""
    m = tf.cast(mask, a.dtype)
    return a * m + b * (1.0 - m)


def _l2_norm(v):
    """(N, ...) -> (N, 1, ..., 1): the L2 norm of each example."""
    return tf.sqrt(tf.reduce_sum(tf.square(v), axis=list(range(1, v.shape.rank)), keepdims=True))


def _clip_range(x_adv, clip_min, clip_max):
    if clip_min is not None:
        x_adv = tf.maximum(x_adv, tf.cast(clip_min, x_adv.dtype))
    if clip_max is not None:
        x_adv = tf.minimum(x_adv, tf.cast(clip_max, x_adv.dtype))
    return x_adv


def _project_l2(x_adv, x, eps, clip_min, clip_max):
    """Onto the L2 ball of radius eps around x (radial scaling), THEN into [clip_min, clip_max],
    as AutoAttack does. That is not the exact Euclidean projection onto the intersection (which
    needs a search over a multiplier), but it is always a point of it: x lies in the range, so
    clipping moves every entry towards x and the distance to x can only shrink."""
    delta = x_adv - x
    delta = delta * tf.minimum(1.0, eps / (_l2_norm(delta) + 1e-12))
    return _clip_range(x + delta, clip_min, clip_max)


def _projection(x, eps, norm, clip_min, clip_max):
    """v -> P(v): into the eps-ball around x, then into [clip_min, clip_max] (each bound optional).

    L-inf: clip_by_value against x -/+ eps, then the range. Clipping against the ball's bounds
    (rather than x + clip(v - x)) leaves a point already on the ball's surface bit-for-bit
    unchanged, so one PGD step of size eps IS the FGSM expression. L2: `_project_l2`.
    """
    if norm == "l2":
        return lambda v: _project_l2(v, x, eps, clip_min, clip_max)
    lo, hi = x - eps, x + eps
    return lambda v: _clip_range(tf.clip_by_value(v, lo, hi), clip_min, clip_max)


def _direction(grad, norm):
    """The steepest-ascent direction of unit norm: sign(g) (L-inf), g / ||g||_2 (L2); 0 at g = 0."""
    if norm == "linf":
        return tf.sign(grad)
    return grad / (_l2_norm(grad) + 1e-12)


def uniform_start(x, eps, seed, clip_min=None, clip_max=None):
    """x + U(-eps, eps) per entry (stateless: a pure function of `seed`), clipped to the range.

    Args:
      x: the clean input.
      eps: radius of the L-infinity ball, in x's units.
      seed: shape-[2] integer seed of tf.random.stateless_uniform.
      clip_min, clip_max: optional valid range.

    Returns:
      A point of the ball (and of the range), same shape and dtype as x.
    """
    x = tf.convert_to_tensor(x)
    eps = tf.cast(eps, x.dtype)
    noise = tf.random.stateless_uniform(tf.shape(x), seed=seed, minval=-1.0, maxval=1.0,
                                        dtype=x.dtype)
    return _projection(x, eps, "linf", clip_min, clip_max)(x + eps * noise)


def _misclassified(logits, y):
    return tf.not_equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)


def _select_rows(mask, a, b):
    """Per example: a where mask (M,) holds, else b, for tensors of any dtype and rank >= 1
    (`_select`'s blend for floats)."""
    m = _row_mask(mask, a)
    return _select(m, a, b) if a.dtype.is_floating else tf.where(m, a, b)


def _on_alive(alive, fn, *rows):
    """fn(*rows) on the examples where alive (M,) holds, its outputs (any structure of (K, ...)
    tensors) scattered back to M rows (zeros, False elsewhere): the finished examples of an
    attack cost no model calls. fn on all rows directly when every one is alive."""
    def compact():
        index = tf.where(alive)  # (K, 1)
        outs = fn(*tf.nest.map_structure(lambda v: tf.gather_nd(v, index), rows))
        m = tf.shape(alive, out_type=tf.int64)

        def scatter(v):
            shape = tf.concat([m, tf.shape(v, out_type=tf.int64)[1:]], 0)
            if v.dtype == tf.bool:
                out = tf.scatter_nd(index, tf.cast(v, tf.int32), shape) > 0
            else:
                out = tf.scatter_nd(index, v, shape)
            out.set_shape(alive.shape[:1].concatenate(v.shape[1:]))  # loops keep static shapes
            return out
        return tf.nest.map_structure(scatter, outs)
    return tf.cond(tf.reduce_all(alive), lambda: fn(*rows), compact)


# Per-image random streams (the refill engine, engine.py): counter-based, keyed by (seed, image
# id, stream, position), so an image draws the same numbers whatever batch it is in.
_M32 = 0xFFFFFFFF


def _mix(v):
    """A 32-bit integer hash (int64 holding [0, 2^32)): two xor-shift-multiply rounds with
    odd constants below 2^31, so every product stays below 2^63 (no int64 overflow)."""
    v = tf.bitwise.bitwise_xor(v, tf.bitwise.right_shift(v, 16))
    v = tf.bitwise.bitwise_and(v * 0x21F0AAAD, _M32)
    v = tf.bitwise.bitwise_xor(v, tf.bitwise.right_shift(v, 15))
    v = tf.bitwise.bitwise_and(v * 0x735A2D97, _M32)
    return tf.bitwise.bitwise_xor(v, tf.bitwise.right_shift(v, 15))


def _key(seed, ids, stream):
    """(M,) int64: one key per image from the shape-[2] seed, its id and the stream number
    (a scalar or (M,) int: e.g. an iteration)."""
    seed = tf.bitwise.bitwise_and(tf.cast(seed, tf.int64), _M32)
    ids = tf.bitwise.bitwise_and(tf.cast(ids, tf.int64), _M32)
    stream = tf.bitwise.bitwise_and(tf.cast(stream, tf.int64), _M32)
    key = _mix(tf.bitwise.bitwise_xor(seed[1], _mix(tf.bitwise.bitwise_xor(stream, 0x9E3779B9))))
    key = _mix(tf.bitwise.bitwise_xor(seed[0], key))
    return _mix(tf.bitwise.bitwise_xor(_mix(ids + 0x632BE5AB), key))


def image_uniform(seed, ids, shape, stream=0):
    """(M, *shape) float32 uniform in [0, 1) (24-bit resolution): image i's numbers are a pure
    function of (seed, ids[i], stream, position), whatever else is in the batch.

    Args:
      seed: shape-[2] int seed; ids: (M,) int image ids (< 2^32); shape: the per-image shape
        (static ints); stream: a scalar or (M,) int telling draws of one image apart.
    """
    size = 1
    for s in shape:
        size *= int(s)
    counter = _mix(tf.range(size, dtype=tf.int64) * 2 + 1)  # (size,): the element's own hash
    bits = _mix(tf.bitwise.bitwise_xor(_key(seed, ids, stream)[:, None], counter[None, :]))
    u = tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) * (1.0 / (1 << 24))
    return tf.reshape(u, tf.concat([tf.shape(u)[:1], tf.constant(list(shape), tf.int32)], 0))


def image_normal(seed, ids, shape, stream=0):
    """(M, *shape) float32 standard normal (Box-Muller on two `image_uniform` streams)."""
    u1 = image_uniform(seed, ids, shape, 2 * tf.cast(stream, tf.int64))
    u2 = image_uniform(seed, ids, shape, 2 * tf.cast(stream, tf.int64) + 1)
    radius = tf.sqrt(-2.0 * tf.math.log1p(-u1))  # 1 - u1 in (0, 1]: log is finite
    return radius * tf.cos(2.0 * 3.141592653589793 * u2)


def image_start(x, eps, norm, seed, ids, clip_min, clip_max):
    """A random point of the ball around each example, then clipped to the range, from each
    example's own stream (`image_uniform`): L-inf, x + eps U(-1, 1) per entry; L2, uniform in
    the ball: a Gaussian direction at radius eps U^(1/d), d the entries per example (in high
    dimension nearly the sphere, where AutoAttack starts). eps: (M, 1, ..., 1); ids: (M,)."""
    shape = x.shape[1:]
    if norm == "linf":
        delta = eps * (2.0 * image_uniform(seed, ids, shape) - 1.0)
    else:
        direction = image_normal(seed, ids, shape, stream=1)
        u = tf.reshape(image_uniform(seed, ids, [1], stream=4), tf.shape(eps))
        delta = eps * u ** (1.0 / shape.num_elements()) * direction / (
            _l2_norm(direction) + 1e-12)
    return _projection(x, eps, norm, clip_min, clip_max)(x + delta)
