"""APGD: Auto-PGD, Algorithm 1 of Croce & Hein, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks" (ICML 2020), L-inf or L2, on the CE, DLR or
targeted DLR loss (logit_losses.py); `top_targets` picks APGD-T's target classes.
"""

import tensorflow as tf

from clae_tf.method.attacks import engine
from clae_tf.method.attacks.common import (
    _NOT_CONVERTED,
    _check_norm,
    _count,
    _misclassified,
    _projection,
    _row_mask,
    _rows,
    _seed,
    _select,
    _select_rows,
    image_start,
)
from clae_tf.method.attacks.gradient import _ascent_step, _input_gradient
from clae_tf.method.attacks.logit_losses import _is_label, ce_loss, dlr_loss, dlr_targeted_loss

APGD_LOSSES = ("ce", "dlr", "dlr_targeted")


def _apgd_loss(loss, target):
    """loss name -> (logits, y, target) -> (N,) loss, checking that `target` fits it."""
    if loss not in APGD_LOSSES:
        raise ValueError(f"loss must be one of {APGD_LOSSES}, got {loss!r}")
    if (loss == "dlr_targeted") != (target is not None):
        raise ValueError(f"loss={loss!r} {'needs' if target is None else 'takes no'} target")
    if loss == "ce":
        return lambda logits, y, target: ce_loss(logits, y)
    if loss == "dlr":
        return lambda logits, y, target: dlr_loss(logits, y)
    return dlr_targeted_loss


def top_targets(logits, y, k):
    """(N, k) int32: the k highest-scoring classes other than y, best first (APGD-T's targets,
    from the clean logits; AutoAttack takes k = 9, or classes - 1 when fewer).

    Args:
      logits: (N, C) clean logits; y: (N,) labels; k: 1 <= k <= C - 1.
    """
    logits = tf.cast(logits, tf.float32)
    classes = logits.shape[-1]
    if classes is not None and not 1 <= k <= classes - 1:
        raise ValueError(f"top_targets needs 1 <= k <= classes - 1 = {classes - 1}, got k={k}")
    masked = tf.where(_is_label(logits, y), -float("inf"), logits)
    return tf.math.top_k(masked, k=k).indices


def apgd_checkpoints(steps):
    """The iterations w_j = ceil(p_j * steps) at which APGD may halve its step size.

    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), all p_j < 1; counted in
    hundredths so that no float round-off turns 0.41 * 100 into 42. Coinciding w_j (few steps)
    count once. steps = 100: [22, 41, 57, 70, 80, 87, 93, 99].
    """
    p_prev, p, w = 0, 22, []
    while p < 100:
        w_j = -(-p * steps // 100)
        if w_j > (w[-1] if w else 0):
            w.append(w_j)
        p_prev, p = p, p + max(p - p_prev - 3, 6)
    return w


def _apgd_windows(steps):
    """(steps,) int32: at iteration k (it makes x_{k+1}) w_j - w_{j-1} if k + 1 = w_j, else 0."""
    windows, last = [0] * steps, 0
    for w_j in apgd_checkpoints(steps):
        windows[w_j - 1], last = w_j - last, w_j
    return tf.constant(windows, tf.int32, shape=[steps])


def _loss_grad_fn(logits_fn, loss_fn):
    """(x, y, target) -> (loss (M,), input gradient float32 (M, ...), misclassified (M,))."""
    def loss_grad(x, y, target):
        def objective(x):
            logits = tf.cast(logits_fn(x), tf.float32)
            loss = loss_fn(logits, y, target)
            # Summed: each example's gradient is that of its own loss (examples independent).
            return tf.reduce_sum(loss), (loss, logits)
        grad, (loss, logits) = _input_gradient(objective, x, finite=True)
        return tf.stop_gradient(loss), grad, _misclassified(tf.stop_gradient(logits), y)
    return loss_grad


def _apgd_step(s, project, norm, momentum):
    """Algorithm 1, lines 7-8: z = P(x_k + eta dir(g)), x_{k+1} = P(x_k + a (z - x_k) +
    (1 - a)(x_k - x_{k-1})), a = 1 at the first step (no momentum yet), else `momentum`."""
    a = _rows(tf.where(s["k"] == 0, 1.0, momentum), s["x"])
    z = _ascent_step(s["x"], s["grad"], s["eta"], norm, project)
    x_next = s["x"] + a * (z - s["x"]) + (1.0 - a) * (s["x"] - s["x_prev"])
    return project(x_next)


def _apgd_checkpoint(s, window, rho):
    """At a checkpoint w_j (window = w_j - w_{j-1} > 0), which examples halve eta: condition 1,
    fewer than rho * window of the steps since w_{j-1} raised the loss; condition 2, eta was not
    halved at w_{j-1} and the best loss has not risen since. The paper's reading: at w_1 the
    reference point is the start, and condition 1 is a strict "<" (AutoAttack's code: "<=",
    condition 2 off at w_1). Returns (N,) bool, all False off the checkpoints."""
    at_check = window > 0
    oscillating = tf.cast(s["n_up"], tf.float32) < rho * tf.cast(window, tf.float32)
    stalled = ~s["halved_check"] & (s["loss_max"] <= s["loss_max_check"])
    return at_check & (oscillating | stalled)


def _apgd_first(s, x0, loss, grad, fooled):
    """The state after the start x0's evaluation (k = 0: no step taken yet)."""
    return dict(s, k=tf.zeros_like(s["k"]), x=x0, x_prev=x0, grad=grad, loss=loss, x_max=x0,
                loss_max=loss, grad_max=grad, x_fool=x0, fooled=fooled,
                n_up=tf.zeros_like(s["n_up"]), loss_max_check=loss,
                halved_check=tf.zeros_like(fooled))


def _apgd_update(s, x_next, loss, grad, fooled_now, windows, rho):
    """One iteration k of Algorithm 1 after x_{k+1}'s evaluation: the best point, the first
    fooling point, and the checkpoint rule (an image stops at its first fooling point)."""
    first = _row_mask(fooled_now, x_next)
    n_up = s["n_up"] + tf.cast(loss > s["loss"], tf.int32)
    better = loss > s["loss_max"]
    rows = _row_mask(better, x_next)
    s = dict(s, x_fool=_select(first, x_next, s["x_fool"]), fooled=s["fooled"] | fooled_now,
             n_up=n_up, x_max=_select(rows, x_next, s["x_max"]),
             loss_max=tf.where(better, loss, s["loss_max"]),
             grad_max=_select(rows, grad, s["grad_max"]))
    window = tf.gather(windows, tf.maximum(s["k"], 0))  # k = -1: a fresh image (unused)
    halve = _apgd_checkpoint(s, window, rho)
    restart = _row_mask(halve, x_next)  # line 14: eta / 2 and x_{k+1} <- x_max (its gradient)
    at_check = window > 0
    return dict(
        s, k=s["k"] + 1, x_prev=s["x"], x=_select(restart, s["x_max"], x_next),
        grad=_select(restart, s["grad_max"], grad), loss=tf.where(halve, s["loss_max"], loss),
        eta=_select(restart, s["eta"] / 2.0, s["eta"]),
        n_up=tf.where(at_check, 0, n_up),
        halved_check=tf.where(at_check, halve, s["halved_check"]),
        loss_max_check=tf.where(at_check, s["loss_max"], s["loss_max_check"]))


def _apgd_machine(logits_fn, loss_fn, steps, seed, norm, clip_min, clip_max, rho, momentum):
    """APGD as a refill-engine machine (engine.py): one image's state is Algorithm 1's."""
    evaluate = _loss_grad_fn(logits_fn, loss_fn)
    # (steps + 1,): window at iteration k; the extra 0 keeps k = steps (no step) in range.
    windows = tf.concat([_apgd_windows(steps), [0]], 0)

    def project(rows):
        return _projection(rows["x"], _rows(rows["eps"], rows["x"]), norm, clip_min, clip_max)

    def start(rows):
        x, eps = rows["x"], _rows(rows["eps"], rows["x"])
        if "x_start" in rows:
            x0 = project(rows)(rows["x_start"])
        else:
            x0 = image_start(x, eps, norm, seed, rows["id"], clip_min, clip_max)
        zero, none = tf.zeros_like(rows["y"]), tf.zeros_like(rows["y"], tf.bool)
        loss = tf.zeros(tf.shape(rows["y"]), tf.float32)
        return dict(k=zero - 1, x=x0, x_prev=x0, grad=tf.zeros_like(x0), loss=loss,
                    eta=2.0 * eps, x_max=x0, loss_max=loss, grad_max=tf.zeros_like(x0),
                    x_fool=x0, fooled=none, n_up=zero, loss_max_check=loss, halved_check=none)

    def step(s, rows):
        fresh = s["k"] < 0  # its first step evaluates the start
        x_next = _select(_row_mask(fresh, s["x"]), s["x"],
                         _apgd_step(s, project(rows), norm, momentum))
        loss, grad, fooled = evaluate(x_next, rows["y"], rows.get("target"))
        first = _apgd_first(s, x_next, loss, grad, fooled)
        later = _apgd_update(s, x_next, loss, grad, fooled, windows, rho)
        return {k: _select_rows(fresh, first[k], later[k]) for k in s}

    def result(s, rows):
        return _select(_row_mask(s["fooled"], s["x"]), s["x_fool"], s["x_max"]), s["fooled"]

    return engine.Machine(start, step, lambda s, rows: s["fooled"] | (s["k"] >= steps), result)


@_NOT_CONVERTED
def apgd(logits_fn, x, y, eps, steps, seed, norm="linf", loss="ce", target=None, clip_min=0.0,
         clip_max=1.0, rho=0.75, momentum=0.75, x_start=None, batch=None, ids=None):
    """APGD, Algorithm 1 of Croce & Hein (ICML 2020), on the refill engine (engine.py).

    Per example: a random start x_0 in the ball, step size eta = 2 eps, `steps` iterations of a
    projected step with momentum (`_apgd_step`); at the checkpoints of `apgd_checkpoints` eta is
    halved and the iterate restarts from the best point x_max when the loss stopped improving
    (`_apgd_checkpoint`). Nothing couples the examples (each has its own eta, checkpoint
    decisions, random start and early exit): an example's result depends on its input, its id
    and the seed only, up to round-off of the model's batched kernels.

    Projection: L-inf, clipping to x +- eps then to the range (exact); L2, radial scaling onto
    the ball then clipping to the range (`_project_l2`: a point of both, as AutoAttack, not the
    exact projection onto the intersection). Start: `image_start` (the example's own random
    stream) unless `x_start` is given. An example stops at its first misclassified iterate,
    and its slot takes the next waiting example (`batch`).

    Args:
      logits_fn: images (N, ...) -> (N, C) logits; stateless, examples independent.
      x: (N, ...) float32 clean inputs in [clip_min, clip_max]; y: (N,) int labels.
      eps: radius (scalar or (N,)) in x's units; steps: iterations (Python int >= 0).
      seed: shape-[2] int seed of the random start (ignored with x_start).
      norm: "linf" or "l2"; loss: "ce", "dlr" or "dlr_targeted" (needs target (N,) int).
      clip_min, clip_max: the valid range (None: unbounded).
      rho: condition 1's threshold; momentum: alpha of the momentum step.
      x_start: optional (N, ...) start point instead of the random one (projected first).
      batch: examples the model sees per call (None: all N at once).
      ids: (N,) int ids of the examples' random streams (default 0..N-1).

    Returns:
      (x_adv, fooled): fooled (N,) bool, True if any iterate (the start included) was
      misclassified; x_adv the first such iterate for fooled examples, else the iterate of
      highest loss. Gradients stopped.
    """
    _check_norm(norm)
    loss_fn = _apgd_loss(loss, target)
    steps = _count(steps, "steps", 0)
    pool = engine.pool_of(x, y, eps, ids,
                          target=None if target is None else tf.cast(target, tf.int32),
                          x_start=None if x_start is None else tf.cast(x_start, tf.float32))
    if x_start is None:
        seed = _seed(seed)
    x_adv, fooled = engine.run(_apgd_machine(logits_fn, loss_fn, steps, seed, norm, clip_min,
                                             clip_max, rho, momentum), pool, batch)
    return tf.stop_gradient(x_adv), tf.stop_gradient(fooled)
