"""Adversarial examples as pure functions (no flags, no distribution strategy): the CLAE training
attack and robust evaluation. train.training_attack picks and seeds the training one from the flags.

Map of the attacks and their sources:

  - `fgsm` / `pgd`: the CLAE training attack (docs/method.md, "The CLAE step", step 3): signed
    gradient steps on view 1 against the batch-wide contrastive loss of an embedding function.
  - `fgsm_classifier` (Goodfellow et al., ICLR 2015) and `pgd_classifier` (Madry et al., ICLR
    2018), L-inf or L2, on a classifier's cross-entropy.
  - `apgd`: Auto-PGD, Algorithm 1 of Croce & Hein, "Reliable evaluation of adversarial robustness
    with an ensemble of diverse parameter-free attacks" (ICML 2020), L-inf or L2, on `ce_loss`,
    `dlr_loss` or `dlr_targeted_loss` (the same paper, Sec. 4); `top_targets` picks APGD-T's
    target classes. AutoAttack = APGD-CE, APGD-T, (FAB-T,) Square, each on the survivors.
  - `square_linf`: the L-inf Square attack, Andriushchenko et al., "Square Attack: a
    query-efficient black-box adversarial attack via random search" (ECCV 2020), Algorithm 1
    and its L-inf proposal; score-based, never a gradient.

One core, `linf_pgd(objective, x, ...)`, does k signed-gradient ascent steps on any scalar
objective of the input. Two front ends build the objective:

  - `pgd` / `fgsm`: the batch-wide contrastive loss batch_loss(sg z(x1), z(x_adv)) of an
    embedding function z;
  - `pgd_classifier` / `fgsm_classifier` (robust evaluation): the summed cross-entropy of a
    classifier's logits against the labels.

Every gradient is taken w.r.t. the input only (a nested tape that watches just x_adv and no
variable), kept in float32, and the result is stop_gradient-ed: an attack never forms parameter
gradients and never becomes part of a training graph. The evaluation attacks (`apgd`,
`square_linf`, `pgd_classifier`) loop with tf.while_loop: one trace per call site, whatever the
number of iterations, and no host round trip inside the loop.
"""

import tensorflow as tf

# The evaluation attacks are tf.while_loops with no Python control flow on tensors: autograph
# (a caller's tf.function) has nothing to convert in them, and converting them the first time
# costs seconds of tracing.
_NOT_CONVERTED = tf.autograph.experimental.do_not_convert


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


def _project(x_adv, x, eps, clip_min, clip_max):
    """Back into the eps-ball around x, then into [clip_min, clip_max] (each bound optional).

    clip_by_value against x -/+ eps (rather than x + clip(x_adv - x)) leaves a point already on
    the ball's surface bit-for-bit unchanged, so one PGD step of size eps IS the FGSM expression.
    """
    x_adv = tf.clip_by_value(x_adv, x - eps, x + eps)
    if clip_min is not None:
        x_adv = tf.maximum(x_adv, tf.cast(clip_min, x_adv.dtype))
    if clip_max is not None:
        x_adv = tf.minimum(x_adv, tf.cast(clip_max, x_adv.dtype))
    return x_adv


def _seed(seed):
    if seed is None:  # a fixed default would repeat the same noise at every call
        raise ValueError("a random start needs a seed (shape-[2] integers)")
    return seed


def _ascent_step(x_adv, grad, x, eps, step_size, clip_min, clip_max):
    return _project(x_adv + step_size * tf.sign(tf.cast(grad, x_adv.dtype)), x, eps, clip_min,
                    clip_max)


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
    return _project(x + eps * noise, x, eps, clip_min, clip_max)


def linf_pgd(objective, x, eps, steps, step_size, x_start=None, clip_min=None, clip_max=None,
             unroll=True):
    """The core: `steps` signed-gradient ascent steps on `objective` in the L-inf ball around x.

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
    x = tf.convert_to_tensor(x)
    eps = tf.cast(eps, x.dtype)
    step_size = tf.cast(step_size, x.dtype)
    x_adv = x if x_start is None else _project(tf.convert_to_tensor(x_start, x.dtype), x, eps,
                                               clip_min, clip_max)
    def step(x_adv):
        grad, _ = _input_gradient(objective, x_adv)
        return _ascent_step(x_adv, grad, x, eps, step_size, clip_min, clip_max)

    if unroll:
        for _ in range(steps):
            x_adv = step(x_adv)
    elif steps > 0:
        _, x_adv = tf.while_loop(lambda i, _: i < steps, lambda i, x_adv: (i + 1, step(x_adv)),
                                 [tf.constant(0), x_adv])
    return tf.stop_gradient(x_adv)


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
        x_start = _ascent_step(x1, grad, x1, eps_t, step_t, clip_min, clip_max)
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
                   clip_min=None, clip_max=None, norm="linf"):
    """PGD (Madry et al. 2018) on a classifier's cross-entropy, in the L-inf or the L2 ball.

    L-inf: x_adv <- Proj(x_adv + step_size * sign(g)); L2: x_adv <- Proj(x_adv + step_size *
    g / ||g||_2), g the input gradient of the example's own cross-entropy and Proj the ball
    then the range (`_project_l2` says why that is a point of both).

    Args:
      logits_fn: x -> (N, C) logits (inference mode: no state changes).
      x: (N, ...) clean inputs; y: (N,) int labels.
      eps, steps, step_size: radius, number and size of the steps, in x's units.
      random_start: start from a uniform point of the ball (`uniform_start`; L2: `_random_start`)
        instead of x.
      seed: shape-[2] integer seed of the random start (required with random_start).
      clip_min, clip_max: optional valid range of x (e.g. 0 and 1 for pixels).
      norm: "linf" or "l2".

    Returns:
      x_adv, with its gradient stopped.
    """
    _check_norm(norm)
    x = tf.convert_to_tensor(x)
    objective = classifier_objective(logits_fn, y)
    if norm == "l2":
        eps = _rows(eps, x)
        x_start = (_random_start(x, eps, norm, _seed(seed), clip_min, clip_max) if random_start
                   else x)
        return _l2_pgd(objective, x, eps, steps, step_size, x_start, clip_min, clip_max)
    x_start = None
    if random_start:
        x_start = uniform_start(x, eps, _seed(seed), clip_min, clip_max)
    # A tf.while_loop: the objective is stateless (inference mode), and PGD-20 then traces once.
    return linf_pgd(objective, x, eps, steps, step_size, x_start=x_start, clip_min=clip_min,
                    clip_max=clip_max, unroll=False)


def fgsm_classifier(logits_fn, x, y, eps, clip_min=None, clip_max=None):
    """FGSM (Goodfellow et al. 2015): x + eps * sign(d CE / dx), clipped to the range if given."""
    return pgd_classifier(logits_fn, x, y, eps, steps=1, step_size=eps, clip_min=clip_min,
                          clip_max=clip_max)


# --- Geometry shared by the evaluation attacks: per-example radii, the L2 ball ------------------

NORMS = ("linf", "l2")


def _check_norm(norm):
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


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
    """v -> P(v), the projection onto the ball around x and the range. L-inf: one clip to the
    box [max(x - eps, clip_min), min(x + eps, clip_max)], computed once (the same numbers as
    `_project`'s two clips, as x lies in the range); L2: `_project_l2`."""
    if norm == "l2":
        return lambda v: _project_l2(v, x, eps, clip_min, clip_max)
    lo, hi = _clip_range(x - eps, clip_min, None), _clip_range(x + eps, None, clip_max)
    return lambda v: tf.clip_by_value(v, lo, hi)


def _direction(grad, norm):
    """The steepest-ascent direction of unit norm: sign(g) (L-inf), g / ||g||_2 (L2); 0 at g = 0."""
    if norm == "linf":
        return tf.sign(grad)
    return grad / (_l2_norm(grad) + 1e-12)


def _random_start(x, eps, norm, seed, clip_min, clip_max):
    """A random point of the ball around each example, then clipped to the range.

    L-inf: x + U(-eps, eps) per entry (`uniform_start`). L2: uniform in the ball: a Gaussian
    direction at radius eps * U^(1/d), d the entries per example (in high dimension nearly the
    sphere, where AutoAttack starts). The noise is drawn for the whole (N, ...) batch from `seed`,
    so example i's start depends on the seed, i and the batch shape.
    """
    if norm == "linf":
        return uniform_start(x, eps, seed, clip_min, clip_max)
    d = 1
    for size in x.shape[1:]:
        d *= size
    direction = tf.random.stateless_normal(tf.shape(x), seed=seed, dtype=x.dtype)
    u = tf.random.stateless_uniform(tf.shape(eps), seed=tf.random.experimental.stateless_fold_in(
        seed, 1), dtype=x.dtype)
    delta = eps * u ** (1.0 / d) * direction / (_l2_norm(direction) + 1e-12)
    return _project_l2(x + delta, x, eps, clip_min, clip_max)


def _l2_pgd(objective, x, eps, steps, step_size, x_start, clip_min, clip_max):
    """`steps` normalised-gradient ascent steps on `objective` in the L2 ball (tf.while_loop)."""
    step_size = tf.cast(step_size, x.dtype)
    x_adv = _project_l2(tf.convert_to_tensor(x_start, x.dtype), x, eps, clip_min, clip_max)

    def step(i, x_adv):
        grad, _ = _input_gradient(objective, x_adv)
        x_adv = x_adv + step_size * _direction(tf.cast(grad, x.dtype), "l2")
        return i + 1, _project_l2(x_adv, x, eps, clip_min, clip_max)

    if steps > 0:
        _, x_adv = tf.while_loop(lambda i, _: i < steps, step, [tf.constant(0), x_adv])
    return tf.stop_gradient(x_adv)


def _count(value, name, minimum):
    """A Python int >= minimum from an int or a constant tensor (loop bounds are static)."""
    static = tf.get_static_value(value)
    if static is None:
        raise ValueError(f"{name} must be a Python int or a constant, got {value!r}")
    if int(static) != static or static < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {static}")
    return int(static)


# --- Losses on logits (Croce & Hein 2020): per example, float32 ---------------------------------

def _need_classes(logits, needed, what):
    classes = logits.shape[-1]
    if classes is not None and classes < needed:
        raise ValueError(f"{what} needs at least {needed} classes, got {classes}")


def _is_label(logits, y):
    """(N, C) bool: column == y."""
    return tf.equal(tf.range(tf.shape(logits)[-1])[None, :], tf.cast(y, tf.int32)[:, None])


def _true_and_other(logits, y):
    """(z_y, max_{i != y} z_i), each (N,)."""
    z_y = tf.gather(logits, tf.cast(y, tf.int32), batch_dims=1)
    other = tf.reduce_max(tf.where(_is_label(logits, y), -float("inf"), logits), axis=-1)
    return z_y, other


def margin(logits, y):
    """(N,) z_y - max_{i != y} z_i in float32: > 0 iff the example is classified correctly."""
    z_y, other = _true_and_other(tf.cast(logits, tf.float32), y)
    return z_y - other


def ce_loss(logits, y):
    """(N,) cross-entropy of each example, on float32 logits."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int32),
                                                          logits=tf.cast(logits, tf.float32))


def dlr_loss(logits, y):
    """(N,) the untargeted DLR loss: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12).

    pi sorts the logits decreasingly. Invariant to shifting and (positive) scaling the logits, so
    a saturated softmax cannot hide its gradient. Needs >= 3 classes (ValueError otherwise).
    """
    logits = tf.cast(logits, tf.float32)
    _need_classes(logits, 3, "the DLR loss (z_pi1 - z_pi3)")
    z_y, other = _true_and_other(logits, y)
    top = tf.math.top_k(logits, k=3).values
    return -(z_y - other) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(logits, y, target):
    """(N,) the targeted DLR loss: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12).

    Needs >= 4 classes (z_pi4, as AutoAttack's APGD-T, which indexes the 4th largest logit):
    ValueError otherwise. On 3 classes use `dlr_loss`, whose one other class is the target.
    """
    logits = tf.cast(logits, tf.float32)
    _need_classes(logits, 4, "the targeted DLR loss (z_pi1 - (z_pi3 + z_pi4) / 2)")
    z_y = tf.gather(logits, tf.cast(y, tf.int32), batch_dims=1)
    z_t = tf.gather(logits, tf.cast(target, tf.int32), batch_dims=1)
    top = tf.math.top_k(logits, k=4).values
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


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


# --- APGD (Croce & Hein, ICML 2020, Algorithm 1) -------------------------------------------------

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


def _misclassified(logits, y):
    return tf.not_equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)


def _on_alive(alive, fn, *rows):
    """fn(*rows) on the examples where alive (N,) holds, its outputs scattered back to N rows
    (zeros, False elsewhere): the fooled examples of an attack cost no more model calls."""
    index = tf.where(alive)  # (M, 1)
    outs = fn(*[None if r is None else tf.gather_nd(r, index) for r in rows])
    n = tf.shape(alive, out_type=tf.int64)
    scattered = []
    for out in outs:
        shape = tf.concat([n, tf.shape(out, out_type=tf.int64)[1:]], 0)
        if out.dtype == tf.bool:
            scattered.append(tf.scatter_nd(index, tf.cast(out, tf.int32), shape) > 0)
        else:
            scattered.append(tf.scatter_nd(index, out, shape))
    return tuple(scattered)


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
    z = project(s["x"] + s["eta"] * _direction(s["grad"], norm))
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


# --- Square attack, L-inf (Andriushchenko et al., ECCV 2020) ------------------------------------

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
