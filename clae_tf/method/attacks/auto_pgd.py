"""APGD: Auto-PGD, Algorithm 1 of Croce & Hein, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks" (ICML 2020), L-inf or L2, on the CE, DLR or
targeted DLR loss (logit_losses.py); `top_targets` picks APGD-T's target classes.
"""

import tensorflow as tf

from clae_tf.method.attacks.common import (
    _NOT_CONVERTED,
    _check_norm,
    _count,
    _misclassified,
    _on_alive,
    _projection,
    _random_start,
    _row_mask,
    _rows,
    _seed,
    _select,
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
    a = tf.where(s["k"] == 0, 1.0, momentum)
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


def _apgd_body(s, x, y, target, project, norm, evaluate, windows, rho, momentum):
    """One iteration k of Algorithm 1 on the examples not fooled yet: x_{k+1}, its loss and
    gradient, the best point, the first fooling point, and the checkpoint rule."""
    x_next = _apgd_step(s, project, norm, momentum)
    alive = ~s["fooled"]
    loss, grad, fooled_now = _on_alive(alive, evaluate, x_next, y, target)
    first = _row_mask(fooled_now & alive, x)
    n_up = s["n_up"] + tf.cast(loss > s["loss"], tf.int32)
    better = loss > s["loss_max"]
    rows = _row_mask(better, x)
    s = dict(s, x_fool=_select(first, x_next, s["x_fool"]), fooled=s["fooled"] | fooled_now,
             n_up=n_up, x_max=_select(rows, x_next, s["x_max"]),
             loss_max=tf.where(better, loss, s["loss_max"]),
             grad_max=_select(rows, grad, s["grad_max"]))
    window = windows[s["k"]]
    halve = _apgd_checkpoint(s, window, rho)
    restart = _row_mask(halve, x)  # line 14: eta / 2 and x_{k+1} <- x_max (with its gradient)
    at_check = window > 0
    return dict(
        s, k=s["k"] + 1, x_prev=s["x"], x=_select(restart, s["x_max"], x_next),
        grad=_select(restart, s["grad_max"], grad), loss=tf.where(halve, s["loss_max"], loss),
        eta=tf.where(restart, s["eta"] / 2.0, s["eta"]),
        n_up=tf.where(at_check, 0, n_up),
        halved_check=tf.where(at_check, halve, s["halved_check"]),
        loss_max_check=tf.where(at_check, s["loss_max"], s["loss_max_check"]))


@_NOT_CONVERTED
def apgd(logits_fn, x, y, eps, steps, seed, norm="linf", loss="ce", target=None, clip_min=0.0,
         clip_max=1.0, rho=0.75, momentum=0.75, x_start=None):
    """APGD, Algorithm 1 of Croce & Hein (ICML 2020), batched, one tf.while_loop.

    Per example: a random start x_0 in the ball, step size eta = 2 eps, `steps` iterations of a
    projected step with momentum (`_apgd_step`); at the checkpoints of `apgd_checkpoints` eta is
    halved and the iterate restarts from the best point x_max when the loss stopped improving
    (`_apgd_checkpoint`). Nothing couples the examples (each has its own eta, checkpoint
    decisions and early exit), so a batch split in two gives the same result from the same
    starts, up to round-off of the model's batched kernels.

    Projection: L-inf, clipping to x +- eps then to the range (exact); L2, radial scaling onto
    the ball then clipping to the range (`_project_l2`: a point of both, as AutoAttack, not the
    exact projection onto the intersection). Start: `_random_start` (noise drawn for the whole
    batch from `seed`) unless `x_start` is given. The loop stops when every example is fooled;
    fooled examples leave the model's batch (`_on_alive`).

    Args:
      logits_fn: images (N, ...) -> (N, C) logits; stateless, examples independent.
      x: (N, ...) float32 clean inputs in [clip_min, clip_max]; y: (N,) int labels.
      eps: radius (scalar or (N,)) in x's units; steps: iterations (Python int >= 0).
      seed: shape-[2] int seed of the random start (ignored with x_start).
      norm: "linf" or "l2"; loss: "ce", "dlr" or "dlr_targeted" (needs target (N,) int).
      clip_min, clip_max: the valid range (None: unbounded).
      rho: condition 1's threshold; momentum: alpha of the momentum step.
      x_start: optional (N, ...) start point instead of the random one (projected first).

    Returns:
      (x_adv, fooled): fooled (N,) bool, True if any iterate (the start included) was
      misclassified; x_adv the first such iterate for fooled examples, else the iterate of
      highest loss. Gradients stopped.
    """
    _check_norm(norm)
    loss_fn = _apgd_loss(loss, target)
    steps = _count(steps, "steps", 0)
    x = tf.cast(x, tf.float32)
    y = tf.cast(y, tf.int32)
    target = None if target is None else tf.cast(target, tf.int32)
    eps = _rows(eps, x)
    project = _projection(x, eps, norm, clip_min, clip_max)
    if x_start is None:
        x0 = _random_start(x, eps, norm, _seed(seed), clip_min, clip_max)
    else:
        x0 = project(tf.cast(x_start, x.dtype))
    evaluate = _loss_grad_fn(logits_fn, loss_fn)
    loss0, grad0, fooled0 = evaluate(x0, y, target)
    s = dict(k=tf.constant(0), x=x0, x_prev=x0, grad=grad0, loss=loss0, eta=2.0 * eps,
             x_max=x0, loss_max=loss0, grad_max=grad0, x_fool=x0, fooled=fooled0,
             n_up=tf.zeros_like(y), loss_max_check=loss0,
             halved_check=tf.zeros_like(fooled0))
    if steps > 0:
        windows = _apgd_windows(steps)
        s = tf.while_loop(
            lambda s: (s["k"] < steps) & ~tf.reduce_all(s["fooled"]),
            lambda s: (_apgd_body(s, x, y, target, project, norm, evaluate, windows, rho,
                                  momentum),),
            (s,))[0]
    x_adv = _select(_row_mask(s["fooled"], x), s["x_fool"], s["x_max"])
    return tf.stop_gradient(x_adv), tf.stop_gradient(s["fooled"])
