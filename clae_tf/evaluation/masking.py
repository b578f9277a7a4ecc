"""Gradient-masking checks of the robust evaluation (docs/robustness.md).

A classifier whose input gradient is useless (a saturated softmax, a flat or non-finite loss
surface) defeats gradient attacks without being robust (Athalye et al. 2018; Carlini et al.
2019's checklist). Four symptoms, measured after the L-inf chain (robust.run_chain), each with
its value, threshold, whether it fired and its cost; each fired one becomes one `warning:` line:

- square_beats_gradient: the black-box Square attack fools more than 1% of the evaluated images
  that every gradient attack before it left standing, at some radius. A working gradient attack
  should find whatever a query-limited random search finds.
- large_radius: one cheap APGD-CE run (LARGE_EPS_STEPS steps) at 64/255, a quarter of the pixel
  range in every pixel (enough to change an image beyond recognition), leaves more than 1% of
  the images robust.
- flat_gradient: more than 1% of the clean-correct images have an all-zero or non-finite
  cross-entropy input gradient, so that no gradient step can move them.
- more_steps: APGD-CE at twice --robust_apgd_steps fools more than 1% of the images (a point of
  accuracy) that APGD-CE at --robust_apgd_steps left standing at one radius: the attack has
  not converged and the reported accuracy is too high.
"""

import time

import numpy as np

THRESHOLD = 0.01  # every check: a point of accuracy (1% of the images)
LARGE_EPS = 64.0  # in 1/255
LARGE_EPS_STEPS = 20  # enough at 64/255 for any model without masking; a fifth of APGD's 100

WARNINGS = {
    "square_beats_gradient": (
        "gradient masking? Square (black box, no gradients) fooled {value:.1%} of the images "
        "that every gradient attack left standing at {eps}/255 (threshold {threshold:.0%}): the "
        "gradient attacks miss adversarial examples that exist; trust the worst case over the "
        "whole suite, not a gradient attack alone"),
    "large_radius": (
        "gradient masking? APGD-CE ({steps} steps) at {eps:g}/255, a radius no real model "
        "survives, left {value:.1%} of the images classified correctly (threshold "
        "{threshold:.0%}): the gradient does not lead the attack; treat the robust numbers as "
        "upper bounds and look at apgd-dlr/apgd-t and square"),
    "flat_gradient": (
        "gradient masking: the cross-entropy input gradient is all zero or not finite on "
        "{value:.1%} of the clean-correct images (threshold {threshold:.0%}; saturated softmax "
        "or non-differentiable model): gradient attacks cannot move them; rely on the "
        "scale-free DLR attacks (apgd-dlr, apgd-t) and square"),
    "more_steps": (
        "the attack has not converged: APGD-CE with {steps[1]} steps fooled {value:.1%} of the "
        "images that {steps[0]} steps left standing at {eps:g}/255 (threshold {threshold:.0%}); "
        "raise --robust_apgd_steps until it stops finding more (autoattack's budget is fixed: "
        "use fast or a list of attacks)"),
}


def run_checks(attacker, chain, clean, batch_size, seed) -> dict:
    """The four checks of the module docstring.

    Args:
      attacker: the robust.Attacker of the evaluation (its classifier and images).
      chain: robust.run_chain's result for L-inf (None: no L-inf chain ran).
      clean: bool (N,) the images classified correctly clean.
      batch_size, seed: as robust.attack_standing.
    Returns:
      {"robust_checks": {check: {"value", "threshold", "fired", "seconds", ...} or
      {"skipped": why}}, "robust_checks_seconds": total, "robust_warnings": [one line each]}.
    """
    start = time.time()
    args = (attacker, chain, np.asarray(clean, bool), batch_size, seed)
    checks, warnings = {}, []
    for name, check in (("square_beats_gradient", square_beats_gradient),
                        ("large_radius", large_radius), ("flat_gradient", flat_gradient),
                        ("more_steps", more_steps)):
        t = time.time()
        result = check(*args)
        if "value" in result:
            result.update(threshold=THRESHOLD, fired=bool(result["value"] > THRESHOLD),
                          seconds=time.time() - t)
            if result["fired"]:
                warnings.append(WARNINGS[name].format(**result))
        checks[name] = result
    return {"robust_checks": checks, "robust_checks_seconds": time.time() - start,
            "robust_warnings": warnings}


def square_beats_gradient(attacker, chain, clean, batch_size, seed) -> dict:
    """The largest share, over the radii, of the N images that Square fooled after every
    gradient attack before it (in the chain, at that radius and below) left them standing."""
    del attacker, batch_size, seed
    names = list(chain["seconds"]) if chain else []
    if "square" not in names or not any(a != "square" for a in names[:names.index("square")]):
        return {"skipped": "needs square after a gradient attack in the L-inf chain"}
    fooled = chain["fooled"]["square"]
    eps = max(fooled, key=fooled.get)
    return {"value": fooled[eps] / len(clean), "eps": eps}


def large_radius(attacker, chain, clean, batch_size, seed) -> dict:
    """Robust accuracy (of the N images) under APGD-CE at LARGE_EPS from the clean-correct ones."""
    del chain
    alive = clean.copy()
    attacker.attack("apgd-ce", "linf", alive, LARGE_EPS / 255, batch_size, seed,
                    "check/large_radius", steps=LARGE_EPS_STEPS)
    return {"value": float(np.mean(alive)), "eps": LARGE_EPS, "steps": LARGE_EPS_STEPS}


def flat_gradient(attacker, chain, clean, batch_size, seed) -> dict:
    """The share of clean-correct images whose input gradient is all zero or not finite.

    Threshold 1%: a handful of images saturated far from every boundary is harmless (DLR and
    Square still attack them), but a share above a point can hold a point of robust accuracy
    that no gradient attack can take, the resolution at which the results are read.
    """
    del chain, seed
    rows = np.flatnonzero(clean)
    flat = sum(int(np.count_nonzero(attacker.flat_gradient(rows[i:i + batch_size])))
               for i in range(0, len(rows), batch_size))
    return {"value": flat / len(rows) if len(rows) else 0.0}


def more_steps(attacker, chain, clean, batch_size, seed) -> dict:
    """The share of the N images that APGD-CE at 2x the steps fools among those that APGD-CE at
    the suite's steps left standing, at one L-inf radius.

    The radius: the smallest whose worst-case accuracy is below half the clean accuracy, else
    the largest. Below it most images are robust to any attack and above it most fall to any,
    so it is where a stronger attack makes the most difference; and with at most half of the
    clean-correct images still standing there, the 2x run costs at most what one APGD-CE run
    over all of them does (the largest radius, the fallback, leaves fewer standing than any
    other). The images: those the chain left standing after its APGD-CE at
    that radius (when it has one: no extra run at the suite's steps; otherwise the chain's
    survivors after a fresh APGD-CE). The 2x run draws its own random start, so it also
    counts what a restart finds: either way, the reported accuracy is not converged.
    """
    worst = chain["top1"]["worst"] if chain else {}
    keys = [k for k in worst if float(k) > 0]
    if not keys:
        return {"skipped": "needs an L-inf radius > 0"}
    half = float(np.mean(clean)) / 2
    key = next((k for k in keys if worst[k] < half), keys[-1])
    eps, steps = float(key), attacker.suite.apgd_steps
    names = list(chain["seconds"])
    alive = chain["standing"]["apgd-ce" if "apgd-ce" in names else names[-1]][key].copy()
    if "apgd-ce" not in names:
        attacker.attack("apgd-ce", "linf", alive, eps / 255, batch_size, seed,
                        "check/more_steps/1x", steps=steps)
    fooled = attacker.attack("apgd-ce", "linf", alive, eps / 255, batch_size, seed,
                             "check/more_steps/2x", steps=2 * steps)
    return {"value": fooled / len(clean), "eps": eps, "steps": [steps, 2 * steps]}
