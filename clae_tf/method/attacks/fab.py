"""FAB-T: the targeted Fast Adaptive Boundary attack, L-inf or L2, with a radius eps.

Sources: Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary
attack" (ICML 2020): Algorithm 1 (FAB), and its projection onto a hyperplane intersected with
the box, which the paper reduces to a 1-D search over sorted breakpoints; FAB-T, its targeted
version with the 9 most likely non-true classes as targets and one run per target, from Croce &
Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks" (ICML 2020), the version standard AutoAttack runs.

Notation of Algorithm 1: x_orig the clean input, c its class, s the target, f_s = z_s - z_c the
logit gap (the example is fooled once any class beats c), pi_s the hyperplane of the linear
approximation of f_s = 0 at the iterate, delta = proj_p(x, pi_s, C) the smallest step (in the
p-norm) from x onto pi_s inside the box C = [clip_min, clip_max].
"""

import tensorflow as tf

from clae_tf.method.attacks import engine
from clae_tf.method.attacks.auto_pgd import top_targets
from clae_tf.method.attacks.common import (
    _NOT_CONVERTED,
    _check_norm,
    _count,
    _misclassified,
    _on_alive,
    _row_mask,
    _select,
)
from clae_tf.method.attacks.gradient import _input_gradient

FAB_TARGETS = 9  # AutoAttack's FAB-T: the 9 most likely classes other than the true one
FAB_STEPS = 100
FAB_ALPHA_MAX = 0.1
FAB_ETA = 1.05
FAB_BETA = 0.9

_INF = float("inf")


def _flat(v):
    """(M, ...) -> (M, D), D static when v's example shape is."""
    dims = v.shape[1:]
    return tf.reshape(v, [-1, dims.num_elements()] if dims.is_fully_defined() else
                      [tf.shape(v)[0], -1])


def _unflat(v, like):
    """(M, D) -> the example shape of `like` (static where known, for the model)."""
    dims = like.shape[1:]
    return tf.reshape(v, [-1] + dims.as_list() if dims.is_fully_defined() else tf.shape(like))


def _norm(v, norm):
    """(M, D) -> (M,): the L-inf or L2 norm of each row."""
    if norm == "linf":
        return tf.reduce_max(tf.abs(v), axis=1)
    return tf.sqrt(tf.reduce_sum(tf.square(v), axis=1))


def _gather_k(v, k):
    """v (M, D) at column k (M,), with k clamped into [0, D - 1]."""
    k = tf.minimum(k, tf.shape(v, out_type=k.dtype)[1] - 1)
    return tf.gather(v, k, batch_dims=1)


def _level(slope, knot, c):
    """The smallest lambda >= 0 with h(lambda) = sum_i slope_i min(lambda, knot_i) >= c,
    per row: the 1-D search of the projection. h is piecewise linear, nondecreasing and concave
    with its breakpoints at the knots; at the sorted knots its values form a sorted list, in
    which a binary search (tf.searchsorted) finds the segment holding c, where h is linear.

    Args:
      slope: (M, D) >= 0 (0: the coordinate cannot move); knot: (M, D) >= 0, may be inf.
      c: (M,) >= 0.

    Returns:
      (M,) lambda; inf where even lambda = inf falls short of c (the hyperplane misses the box).
    """
    knot = tf.where(slope > 0, knot, _INF)
    order = tf.argsort(knot, axis=1)
    bps = tf.gather(knot, order, batch_dims=1)
    slopes = tf.gather(slope, order, batch_dims=1)
    finite = tf.math.is_finite(bps)
    bps_finite = tf.where(finite, bps, 0.0)
    saturated = tf.cumsum(slopes * bps_finite, axis=1, exclusive=True)  # sum over j < k
    free = tf.cumsum(slopes, axis=1, reverse=True)  # sum over j >= k
    # h at the k-th knot; at an infinite one, inf if anything still moves, else h's limit.
    at_break = tf.where(finite, saturated + free * bps_finite,
                        tf.where(free > 0, _INF, saturated))
    k = tf.searchsorted(at_break, c[:, None], side="left")[:, 0]  # knots with h < c
    lam = tf.math.divide_no_nan(c - _gather_k(saturated, k), _gather_k(free, k))
    return tf.where(k < tf.shape(bps, out_type=k.dtype)[1], tf.maximum(lam, 0.0), _INF)


def _project(t, w, c, norm, lo, hi):
    """proj_p(t, pi, C): the step d of least p-norm with w.d = c and lo <= t + d <= hi, per row.

    With the sign of w flipped so that c >= 0, each coordinate moves along sign(w_i) up to its
    room u_i to the box. L-inf: d_i = sign(w_i) min(r, u_i), r the smallest radius with
    sum_i |w_i| min(r, u_i) = c. L2 (KKT): d_i = sign(w_i) min(lambda |w_i|, u_i), lambda the
    smallest with sum_i w_i^2 min(lambda, u_i / |w_i|) = c. Both are `_level` searches. Where
    the hyperplane misses the box, every coordinate goes to its bound (closest in w.d).

    Args:
      t: (M, D) points in the box; w: (M, D) normals; c: (M,) the required w.d.
      norm: "linf" or "l2"; lo, hi: the box bounds (scalars, +-inf for none).
    """
    s = tf.where(c >= 0, 1.0, -1.0)
    w, c = w * s[:, None], c * s
    room = tf.maximum(tf.where(w > 0, hi - t, t - lo), 0.0)  # u_i
    a = tf.abs(w)
    if norm == "linf":
        lam = _level(a, room, c)
        step = tf.minimum(lam[:, None], room)
    else:
        lam = _level(tf.square(a), tf.math.divide_no_nan(room, a), c)
        step = tf.minimum(lam[:, None] * a, room)
    moves = (a > 0) & (room > 0)
    return tf.where(moves, tf.sign(w) * tf.where(moves, step, 0.0), 0.0)


def _gap_and_grad(logits_fn, x1, y, target):
    """f_s(x1) = z_target - z_y (M,), its input gradient (M, D) in float32 and whether x1 is
    misclassified (M,): one tape."""
    def objective(v):
        logits = tf.cast(logits_fn(v), tf.float32)
        gap = (tf.gather(logits, target, batch_dims=1) - tf.gather(logits, y, batch_dims=1))
        return tf.reduce_sum(gap), (gap, logits)  # summed: examples independent
    grad, (gap, logits) = _input_gradient(objective, x1, finite=True)
    return tf.stop_gradient(gap), _flat(grad), _misclassified(tf.stop_gradient(logits), y)


def _fab_step(x1, x0, gap, grad, norm, lo, hi, alpha_max, eta):
    """Algorithm 1, the update: delta, delta_orig onto pi_s (w.z = w.x1 - f_s(x1)) in the box,
    alpha = min(|delta| / (|delta| + |delta_orig|), alpha_max), then the box clip of
    (1 - alpha)(x1 + eta delta) + alpha (x_orig + eta delta_orig). Rows flat (M, D)."""
    c1 = -gap
    c0 = -gap - tf.reduce_sum(grad * (x0 - x1), axis=1)
    both = _project(tf.concat([x1, x0], 0), tf.concat([grad, grad], 0), tf.concat([c1, c0], 0),
                    norm, lo, hi)
    delta, delta_orig = tf.split(both, 2, axis=0)
    a1 = tf.maximum(_norm(delta, norm), 1e-8)
    a0 = tf.maximum(_norm(delta_orig, norm), 1e-8)
    alpha = tf.minimum(a1 / (a1 + a0), alpha_max)[:, None]
    x_new = (1.0 - alpha) * (x1 + eta * delta) + alpha * (x0 + eta * delta_orig)
    return tf.clip_by_value(x_new, lo, hi)


def _fab_machine(logits_fn, steps, norm, lo, hi, alpha_max, eta, beta, minimal):
    """One FAB-T run towards rows["target"] from x_orig = x (no random start: one restart) as a
    refill-engine machine (engine.py). Per example: the iterate x1, the least distorted fooling
    point x_out and its p-norm distance u, the iterations i. An example stops after `steps`
    iterations, or (minimal=False) once u <= eps: found, which later iterations, shrinking u,
    cannot undo."""
    def start(rows):
        x0 = _flat(rows["x"])
        return dict(i=tf.zeros_like(rows["y"]), x1=x0, x_out=x0,
                    u=tf.fill(tf.shape(rows["y"]), _INF))

    def step(s, rows):
        """Algorithm 1: the step, then, where x_new is misclassified, the best point so far
        (least p-norm) and the backward step x_orig + beta (x_new - x_orig). At i = 0, x1 is
        x_orig: one misclassified there is found at distance 0."""
        x, y, target = rows["x"], rows["y"], rows["target"]
        x0 = _flat(x)
        gap, grad, wrong = _gap_and_grad(logits_fn, _unflat(s["x1"], x), y, target)
        x_new = _fab_step(s["x1"], x0, gap, grad, norm, lo, hi, alpha_max, eta)
        fooled = _misclassified(tf.cast(logits_fn(_unflat(x_new, x)), tf.float32), y)
        dist = _norm(x_new - x0, norm)
        better = fooled & (dist < s["u"])
        clean_wrong = (s["i"] == 0) & wrong
        return dict(i=s["i"] + 1, x1=_select(fooled[:, None], x0 + beta * (x_new - x0), x_new),
                    x_out=_select((better & ~clean_wrong)[:, None], x_new, s["x_out"]),
                    u=tf.where(clean_wrong, 0.0, tf.where(better, dist, s["u"])))

    def result(s, rows):
        found = s["u"] <= rows["eps"]
        return _unflat(_select(found[:, None], s["x_out"], _flat(rows["x"])), rows["x"]), found

    def done(s, rows):
        return (s["i"] >= steps) | (False if minimal else s["u"] <= rows["eps"])

    return engine.Machine(start, step, done, result)


@_NOT_CONVERTED
def fab_t(logits_fn, x, y, eps, norm="linf", steps=FAB_STEPS, n_targets=FAB_TARGETS,
          clip_min=0.0, clip_max=1.0, alpha_max=FAB_ALPHA_MAX, eta=FAB_ETA, beta=FAB_BETA,
          target=None, batch=None, minimal=True):
    """FAB-T (Croce & Hein, ICML 2020), batched: Algorithm 1 of the FAB paper aimed at each of
    the `n_targets` most likely non-true classes in turn (`top_targets` of the clean logits, as
    APGD-T; classes - 1 when fewer), one run of `steps` iterations per target, each on the
    examples not broken yet, as AutoAttack's FAB-T with its one restart (no random start, hence
    no seed: the attack is deterministic).

    Each iteration linearises f_s = z_s - z_y at the iterate (one tape), projects the iterate
    and x onto that hyperplane within the box (`_project`), steps towards a blend of the two
    (`_fab_step`), and where the new point is misclassified keeps it if it is the least
    distorted so far and steps back towards x by beta. A run breaks an example if its least
    distorted fooling point is within eps (<= eps, as AutoAttack). Examples misclassified on x
    are not attacked. Nothing couples the examples.

    Args:
      logits_fn: inputs (N, ...) -> (N, C) logits; stateless, examples independent.
      x: (N, ...) float32 clean inputs in [clip_min, clip_max]; y: (N,) int labels.
      eps: radius (scalar or (N,)) in x's units; norm: "linf" or "l2".
      steps: iterations per target (Python int >= 1); n_targets: targets (int >= 1).
      clip_min, clip_max: the box (None: unbounded).
      alpha_max, eta, beta: Algorithm 1's bias towards x, overshoot and backward step.
      target: None, or (N,) int: one run towards this class of each example instead of the
        n_targets top ones (n_targets is then unused), as `apgd`'s target: a caller that
        picked the top_targets of the clean logits once (the robust evaluation's chain) runs
        one target rank per call; an example misclassified on x is then found at distance 0.
      batch: examples the model sees per call (None: all at once); when an example's run ends
        the next waiting one takes its slot (engine.py).
      minimal: run every example all `steps` iterations, for its least distorted point; False:
        stop an example's run once a point within eps is found (enough to count it fooled: the
        robust evaluation's chain), x_adv then that run's least distorted point so far.

    Returns:
      (x_adv, fooled): fooled (N,) bool, misclassified on x or broken within eps; x_adv the
      least distorted fooling point of the first target that broke the example (`minimal`; in
      the eps-ball and the box), x where none did (and for examples misclassified on x).
      Gradients stopped.
    """
    _check_norm(norm)
    steps = _count(steps, "steps", 1)
    n_targets = _count(n_targets, "n_targets", 1)
    x = tf.cast(x, tf.float32)
    y = tf.cast(y, tf.int32)
    eps = tf.broadcast_to(tf.cast(eps, tf.float32), tf.shape(y))
    lo = tf.cast(-_INF if clip_min is None else clip_min, tf.float32)
    hi = tf.cast(_INF if clip_max is None else clip_max, tf.float32)
    machine = _fab_machine(logits_fn, steps, norm, lo, hi, alpha_max, eta, beta, minimal)
    if target is not None:
        return tuple(tf.stop_gradient(v) for v in engine.run(
            machine, engine.pool_of(x, y, eps, target=tf.cast(target, tf.int32)), batch))
    logits = tf.stop_gradient(tf.cast(logits_fn(x), tf.float32))
    classes = logits.shape[-1]
    k = n_targets if classes is None else min(n_targets, classes - 1)
    targets = top_targets(logits, y, k)

    def run(x, y, target, eps):  # FAB-T draws nothing: the pool's default ids serve
        return engine.run(machine, engine.pool_of(x, y, eps, target=target), batch)

    def body(j, x_adv, fooled):
        x_run, broken = _on_alive(~fooled, run, x, y, tf.gather(targets, j, axis=1), eps)
        return j + 1, _select(_row_mask(broken, x), x_run, x_adv), fooled | broken

    _, x_adv, fooled = tf.while_loop(
        lambda j, _, fooled: (j < k) & ~tf.reduce_all(fooled), body,
        (tf.constant(0), x, _misclassified(logits, y)))
    return tf.stop_gradient(x_adv), tf.stop_gradient(fooled)
