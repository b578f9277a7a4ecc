"""Gradient attacks: FGSM and PGD on the CLAE training loss and on a classifier.

One core, `_pgd(objective, x, ...)`, does k projected steepest-ascent steps (L-inf: signed
gradient; L2: normalised gradient) on any scalar objective of the input; `linf_pgd` is its
public L-inf face. Two front ends build the objective:

  - `pgd` / `fgsm`: the CLAE training attack (docs/method.md, "The CLAE step", step 3), the
    batch-wide contrastive loss batch_loss(sg z(x1), z(x_adv)) of an embedding function z;
  - `pgd_classifier` / `fgsm_classifier` (Goodfellow et al., ICLR 2015; Madry et al., ICLR
    2018; the fine-tunes' training attack), L-inf or L2: the summed cross-entropy of a
    classifier's logits against the labels.

`pgd_until_fooled`, the robust evaluation's PGD and FGSM, takes `pgd_classifier`'s steps
(`_ascent_step`) one image at a time on the refill engine (engine.py), stopping each image at
its first misclassified iterate.

Every gradient is taken w.r.t. the input only (a nested tape that watches just x_adv and no
variable), kept in float32, and the result is stop_gradient-ed: an attack never forms parameter
gradients and never becomes part of a training graph.
"""

import tensorflow as tf

from clae_tf.method.attacks import engine
from clae_tf.method.attacks.common import (
    _NOT_CONVERTED,
    _check_norm,
    _count,
    _direction,
    _misclassified,
    _projection,
    _row_mask,
    _rows,
    _seed,
    _select,
    image_start,
    uniform_start,
)


def _input_gradient(objective, x, finite=False):
    """(d objective / dx in float32, aux). `objective(x)` returns a scalar or (scalar, aux).
    finite=True: +-inf entries become 0 as well as NaN ones (the evaluation attacks blend
    gradients arithmetically, `_select`, where an inf would turn into NaN)."""
    # Watches the INPUT only: no parameter gradient is ever formed, and an enclosing tape
    # (the train step's, when not paused) does not see the variables through this one.
    with tf.GradientTape(watch_accessed_variables=False) as input_tape:
        input_tape.watch(x)
        out = objective(x)
    loss, aux = out if isinstance(out, tuple) else (out, None)
    # ZERO: an input the objective does not depend on (a constant model) gets no step, not None.
    grad = input_tape.gradient(loss, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    # Kept in float32 even under mixed precision: an underflowed gradient gives sign(0) = 0.
    grad = tf.cast(grad, tf.float32)
    # A NaN entry (float16: an overflowed loss scale) gives no step on that pixel, not a NaN.
    bad = tf.math.logical_not(tf.math.is_finite(grad)) if finite else tf.math.is_nan(grad)
    return tf.where(bad, tf.zeros_like(grad), grad), aux


def _scaled(batch_loss, loss_scale):
    """float16 training: the gradient is taken of loss * loss_scale (the optimizer's dynamic
    scale), else the float16 back-propagation underflows to 0 and sign(0) = 0 leaves the pixel
    unperturbed. sign() is scale-invariant, so the scale needs no undoing."""
    if loss_scale is None:
        return batch_loss
    return lambda z_anchor, z: batch_loss(z_anchor, z) * tf.cast(loss_scale, tf.float32)


def _ascent_step(x_adv, grad, step_size, norm, project):
    """P(x_adv + step_size * dir(grad)): one projected steepest-ascent step (`_direction`)."""
    return project(x_adv + step_size * _direction(tf.cast(grad, x_adv.dtype), norm))


def _pgd(objective, x, eps, steps, step_size, norm, x_start, clip_min, clip_max, unroll):
    """`steps` steps x_adv <- P(x_adv + step_size * dir(g)) on `objective` in the `norm` ball
    (`_projection`), from x, or from x_start projected; arguments as `linf_pgd`'s."""
    x = tf.convert_to_tensor(x)
    eps = tf.cast(eps, x.dtype)
    step_size = tf.cast(step_size, x.dtype)
    project = _projection(x, eps, norm, clip_min, clip_max)
    x_adv = x if x_start is None else project(tf.convert_to_tensor(x_start, x.dtype))

    def step(x_adv):
        grad, _ = _input_gradient(objective, x_adv)
        return _ascent_step(x_adv, grad, step_size, norm, project)

    if unroll:
        for _ in range(steps):
            x_adv = step(x_adv)
    elif steps > 0:
        _, x_adv = tf.while_loop(lambda i, _: i < steps, lambda i, x_adv: (i + 1, step(x_adv)),
                                 [tf.constant(0), x_adv])
    return tf.stop_gradient(x_adv)


def linf_pgd(objective, x, eps, steps, step_size, x_start=None, clip_min=None, clip_max=None,
             unroll=True):
    """`steps` signed-gradient ascent steps on `objective` in the L-inf ball around x (`_pgd`).

    x_adv <- Proj(x_adv + step_size * sign(d objective / d x_adv)), Proj = the eps-ball around x
    intersected with [clip_min, clip_max].

    Args:
      objective: x_adv -> scalar to maximise (or (scalar, aux); aux is ignored).
      x: (N, ...) clean input, the centre of the ball.
      eps: radius, in x's units. eps = 0 returns x.
      steps: number of steps (Python int >= 0; 0 returns x_start projected).
      step_size: size of each step, in x's units.
      x_start: where to start (default x); see `uniform_start`.
      clip_min, clip_max: optional valid range of the input.
      unroll: True: a Python loop (traced `steps` times), which keeps batch-norm updates and
        cross-replica reductions inside the objective (the training attack) out of a
        tf.while_loop. False: a tf.while_loop, traced once: for many steps of a stateless
        objective (PGD-20 on a classifier traces ~20x faster).

    Returns:
      x_adv, with its gradient stopped.
    """
    return _pgd(objective, x, eps, steps, step_size, "linf", x_start, clip_min, clip_max, unroll)


def pgd(embed_adv, batch_loss, x1, eps, steps, step_size, random_start=False, seed=None,
        clip_min=None, clip_max=None, loss_scale=None):
    """PGD on view 1 against the batch-wide contrastive loss: the objective is
    batch_loss(sg z(x1), z(x_adv)), z = embed_adv, so x_adv is pushed away from its own clean
    embedding and, through the batch, towards the others (docs/method.md, step 3, with k steps).

    Without a random start the first step is the reference's FGSM step: at x_adv = x1 one
    forward pass gives both the anchor z(x1) and the attacked embedding (the reference runs the
    branch twice; same x_adv). With a random start the anchor is one extra forward pass at x1.
    Each forward through training-mode BNs updates their running statistics once.

    Args:
      embed_adv: x -> z through the ADVERSARIAL BNs in training mode (clean BNs and weights are
        untouched).
      batch_loss: (z_anchor, z) -> scalar base loss over the whole (global) batch.
      x1: (N, H, W, C) normalised view 1.
      eps: radius of the L-infinity ball, in normalised-input units.
      steps: number of steps (>= 1).
      step_size: size of each step, in normalised-input units.
      random_start: start from a uniform point of the ball (`uniform_start`) instead of x.
      seed: shape-[2] integer seed of the random start (required with random_start).
      clip_min, clip_max: optional valid range (None: no clipping, as the reference).
      loss_scale: float16 training: the optimizer's dynamic loss scale (`_scaled`).

    Returns:
      x_adv, with its gradient stopped.
    """
    batch_loss = _scaled(batch_loss, loss_scale)
    if steps < 1:
        raise ValueError(f"pgd needs steps >= 1, got {steps}")
    x1 = tf.convert_to_tensor(x1)
    eps_t, step_t = tf.cast(eps, x1.dtype), tf.cast(step_size, x1.dtype)
    if random_start:
        z_anchor = tf.stop_gradient(embed_adv(x1))
        x_start = uniform_start(x1, eps, _seed(seed), clip_min, clip_max)
        steps_left = steps
    else:
        def self_anchored(x):
            z = embed_adv(x)
            return batch_loss(tf.stop_gradient(z), z), tf.stop_gradient(z)

        grad, z_anchor = _input_gradient(self_anchored, x1)
        project = _projection(x1, eps_t, "linf", clip_min, clip_max)
        x_start = _ascent_step(x1, grad, step_t, "linf", project)
        steps_left = steps - 1
    return linf_pgd(lambda x: batch_loss(z_anchor, embed_adv(x)), x1, eps, steps_left, step_size,
                    x_start=x_start, clip_min=clip_min, clip_max=clip_max)


def auto_step_size(eps, steps):
    """--attack_step_size=0: 2.5 * eps / steps (the rule of thumb of Madry et al.'s robustness
    library). k steps can then travel 2.5 radii: enough to cross the ball from a random start
    and still slide along its surface, while one step (k = 1) overshoots and is projected back
    onto the signed-gradient corner, i.e. is FGSM."""
    return 2.5 * eps / steps


def fgsm(embed_adv, batch_loss, x1, eps, loss_scale=None):
    """One FGSM step on view 1 against the batch-wide contrastive loss (the paper's attack).

    The reference computes L(model_adv(x1), model_adv(x_adv)) with x_adv = x1, i.e. runs the
    adversarial branch forward twice and back-propagates into every parameter. Both embeddings
    are the same forward pass at x_adv = x1, and the gradient w.r.t. x_adv only flows through the
    second argument, so here the branch runs once and the first argument is stop-gradient-ed;
    the tape watches only the input (no parameter gradients are ever formed). Same x_adv.
    This is `pgd` with one step of size eps, no random start and no clipping.

    Args:
      embed_adv: x -> z through the ADVERSARIAL BNs in training mode (this updates their
        running statistics once; clean BNs and weights are untouched).
      batch_loss: (z_anchor, z) -> scalar base loss over the whole (global) batch.
      x1: (N, H, W, C) normalised view 1.
      eps: step size in normalised-input units. No random start, no clipping (as the reference).
      loss_scale: float16 training: the gradient is taken of loss * loss_scale (the optimizer's
        dynamic scale), else the float16 back-propagation underflows to 0 and sign(0) = 0 leaves
        x1 unperturbed. sign() is scale-invariant; a NaN entry (an overflowed scale) gives no
        step on that pixel instead of a NaN image.

    Returns:
      x_adv = x1 + eps * sign(dL/dx_adv), with its gradient stopped.
    """
    return pgd(embed_adv, batch_loss, x1, eps, steps=1, step_size=eps, loss_scale=loss_scale)


def classifier_objective(logits_fn, y):
    """x -> the cross-entropy of logits_fn(x) against labels y, SUMMED over the batch.

    Summed, not averaged: examples are independent (inference-mode BNs), so each one's input
    gradient is that of its own loss, whatever the batch size (no 1/N that could underflow).
    """
    def objective(x):
        logits = tf.cast(logits_fn(x), tf.float32)
        return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y,
                                                                            logits=logits))
    return objective


@_NOT_CONVERTED
def pgd_classifier(logits_fn, x, y, eps, steps, step_size, random_start=False, seed=None,
                   clip_min=None, clip_max=None, norm="linf", ids=None):
    """PGD (Madry et al. 2018) on a classifier's cross-entropy, in the L-inf or the L2 ball.

    L-inf: x_adv <- Proj(x_adv + step_size * sign(g)); L2: x_adv <- Proj(x_adv + step_size *
    g / ||g||_2), g the input gradient of the example's own cross-entropy and Proj the ball
    then the range (`_project_l2` says why that is a point of both).

    Args:
      logits_fn: x -> (N, C) logits (inference mode: no state changes).
      x: (N, ...) clean inputs; y: (N,) int labels.
      eps, steps, step_size: radius, number and size of the steps, in x's units.
      random_start: start from a random point of the ball (`image_start`: each example's own
        random stream, as APGD's: the same seed gives both attacks the same starts) instead of x.
      seed: shape-[2] integer seed of the random start (required with random_start).
      clip_min, clip_max: optional valid range of x (e.g. 0 and 1 for pixels).
      norm: "linf" or "l2".
      ids: (N,) int ids of the examples' random streams (default 0..N-1).

    Returns:
      x_adv, with its gradient stopped.
    """
    _check_norm(norm)
    x = tf.convert_to_tensor(x)
    if norm == "l2":
        eps = _rows(eps, x)
    x_start = None  # L-inf: x itself
    if random_start:
        ids = tf.range(tf.shape(x)[0]) if ids is None else ids
        x_start = image_start(x, eps if norm == "l2" else _rows(eps, x), norm, _seed(seed),
                              ids, clip_min, clip_max)
    elif norm == "l2":
        x_start = x  # L2: x projected (x + 0, then the range: x again for an x in the range)
    # A tf.while_loop: the objective is stateless (inference mode), and PGD-20 then traces once.
    return _pgd(classifier_objective(logits_fn, y), x, eps, steps, step_size, norm, x_start,
                clip_min, clip_max, unroll=False)


def _pgd_machine(logits_fn, steps, step_size, norm, random_start, seed, clip_min, clip_max):
    """`pgd_classifier` as a refill-engine machine (engine.py) that also checks every iterate:
    per example the iterate x_k, its gradient, k, and the first misclassified iterate."""
    def start(rows):
        x, eps = rows["x"], _rows(rows["eps"], rows["x"])
        x0 = (image_start(x, eps, norm, seed, rows["id"], clip_min, clip_max) if random_start
              else _projection(x, eps, norm, clip_min, clip_max)(x))
        return dict(k=tf.zeros_like(rows["y"]) - 1, x=x0, grad=tf.zeros_like(x0), x_fool=x0,
                    fooled=tf.zeros_like(rows["y"], tf.bool))

    def step(s, rows):
        x, y, eps = rows["x"], rows["y"], _rows(rows["eps"], rows["x"])
        project = _projection(x, eps, norm, clip_min, clip_max)
        x_next = _ascent_step(s["x"], s["grad"], _rows(step_size, x), norm, project)
        x_next = _select(_row_mask(s["k"] < 0, x), s["x"], x_next)  # first: the start itself

        def objective(v):
            logits = tf.cast(logits_fn(v), tf.float32)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            return tf.reduce_sum(loss), _misclassified(logits, y)  # summed: examples independent
        grad, wrong = _input_gradient(objective, x_next)
        first = wrong & ~s["fooled"]
        return dict(k=s["k"] + 1, x=x_next, grad=grad, fooled=s["fooled"] | wrong,
                    x_fool=_select(_row_mask(first, x), x_next, s["x_fool"]))

    def result(s, rows):
        return _select(_row_mask(s["fooled"], s["x"]), s["x_fool"], s["x"]), s["fooled"]

    return engine.Machine(start, step, lambda s, rows: s["fooled"] | (s["k"] >= steps), result)


@_NOT_CONVERTED
def pgd_until_fooled(logits_fn, x, y, eps, steps, step_size, random_start=False, seed=None,
                     clip_min=None, clip_max=None, norm="linf", batch=None, ids=None):
    """`pgd_classifier`'s iterates (the same start and steps), an example stopping at its first
    misclassified iterate, the start included: the robust evaluation's PGD and FGSM, on the
    refill engine (engine.py; `batch`, `ids` as `apgd`'s). Up to its first misclassified
    iterate an example follows pgd_classifier's path exactly, so it is fooled wherever
    pgd_classifier's x_adv is (and where an earlier iterate was).

    Returns:
      (x_adv, fooled): fooled (N,) bool; x_adv the first misclassified iterate, else
      pgd_classifier's x_adv. Gradients stopped.
    """
    _check_norm(norm)
    steps = _count(steps, "steps", 0)
    pool = engine.pool_of(x, y, eps, ids)
    machine = _pgd_machine(logits_fn, steps, step_size, norm, random_start,
                           _seed(seed) if random_start else None, clip_min, clip_max)
    x_adv, fooled = engine.run(machine, pool, batch)
    return tf.stop_gradient(x_adv), tf.stop_gradient(fooled)


def fgsm_classifier(logits_fn, x, y, eps, clip_min=None, clip_max=None):
    """FGSM (Goodfellow et al. 2015): x + eps * sign(d CE / dx), clipped to the range if given."""
    return pgd_classifier(logits_fn, x, y, eps, steps=1, step_size=eps, clip_min=clip_min,
                          clip_max=clip_max)
