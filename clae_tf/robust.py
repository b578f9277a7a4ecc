"""Robust accuracy of the frozen encoder + linear probe under PGD-20 and FGSM (--robust_eps).

The classifier under attack is images in [0, 1] -> normalise (--normalize) -> encoder (clean BNs,
inference mode) -> h (or z, --probe=z) -> the trained linear probe -> logits, attacked end to end
on the probe's cross-entropy. The attack lives in PIXEL space: eps = k/255 of the [0, 1] range,
and every adversarial image is clipped to [0, 1], so the numbers mean what they mean in the
literature (unlike the training --eps, which is in normalised units).

An example counts as robust only if it is classified correctly both clean and under the attack
(as AutoAttack counts) at its radius and every smaller one of --robust_eps, so robust accuracy
never exceeds clean accuracy on the same images, equals it at eps = 0, and falls with eps.
"""

import time

import numpy as np
import tensorflow as tf

from clae_tf import attacks, augment, data

PGD_STEPS = 20  # PGD-20, step eps/4, random start (Madry et al. 2018's CIFAR evaluation uses 20)


def parse_eps(text: str):
    """--robust_eps ("1,2,4,8", in 1/255; "" -> none) as a list of floats (validated in config)."""
    return [float(item) for item in text.split(",")] if text.strip() else []


def eps_key(eps: float) -> str:
    """results.json / TensorBoard name of a radius in 1/255: 1.0 -> "1", 0.5 -> "0.5"."""
    return f"{eps:g}"


def balanced_subset(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of a fixed class-balanced subset of size n (0 or n >= len: all), in split order.

    Classes take turns: first every class's first example, then every class's second, ... (by
    position in the split), so class counts differ by at most one while every class has examples
    left, and the subset depends only on the labels' order: the same images for every run.
    """
    labels = np.asarray(labels)
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels))
    rank = np.zeros(len(labels), np.int64)  # position of each example within its class
    seen = {}
    for i, y in enumerate(labels.tolist()):
        rank[i] = seen.get(y, 0)
        seen[y] = rank[i] + 1
    order = np.lexsort((np.arange(len(labels)), labels, rank))  # by rank, then class, then index
    return np.sort(order[:n])


def load_subset(split: data.Split, n: int):
    """(images float32 in [0, 1] (n, S, S, 3), labels int32 (n,)) of `balanced_subset`."""
    labels = split.labels
    if labels is None:  # TFDS: one pass over the labels
        labels = np.array([int(y) for y in split.images.map(lambda x, y: y)], np.int64)
    index = balanced_subset(labels, n)
    keep = np.zeros(len(labels), bool)
    keep[index] = True
    keep = tf.constant(keep)
    images, ys = [], []
    ds = split.images.enumerate().filter(lambda i, example: tf.gather(keep, i)).batch(1000)
    for _, (x, y) in ds:
        images.append(x.numpy())
        ys.append(y.numpy())
    images = np.concatenate(images).astype(np.float32) / 255.0
    return images, np.concatenate(ys).astype(np.int32)


def classifier(model, probe, normalize: str, feature: str = "h"):
    """images in [0, 1] -> logits: normalise, encoder (clean BNs, inference mode), probe on h or z."""
    index = {"h": 0, "z": 1}[feature]

    def logits_fn(images01):
        features = model(augment.normalize(images01, normalize), training=False)[index]
        return tf.cast(probe(features), tf.float32)
    return logits_fn


def robust_accuracy(logits_fn, images, labels, eps_list, batch_size=500, seed=0,
                    pgd_steps=PGD_STEPS):
    """Top-1 accuracy of `logits_fn` clean and under PGD and FGSM at each radius.

    An example counts as robust at eps if it is correct clean AND under the attack at every
    radius <= eps of eps_list: the radii are attacked in increasing order, and only the
    examples still standing are attacked at the next one. An adversarial image found at a
    smaller radius lies in every larger ball (and in [0, 1]), so an example fooled at 2/255 is
    fooled at 8/255: skipping it only saves work, and makes the curve monotone in eps (a
    single-radius FGSM can miss at 8/255 what it finds at 2/255). The saving is large: most
    examples of a non-robust encoder fall at the smallest radius.

    Args:
      logits_fn: images in [0, 1] -> logits. Must not change state (inference mode).
      images: float32 (N, H, W, C) in [0, 1]; labels: int (N,).
      eps_list: radii in units of 1/255.
      batch_size: images per attacked batch.
      seed: seed of PGD's random start (with the radius and batch: reproducible).
      pgd_steps: PGD steps, of size eps/4 (20 -> PGD-20).

    Returns:
      {"clean_top1": float, "robust_top1": {"pgd20": {eps_key: acc}, "fgsm": {...}}}.
    """
    name = f"pgd{pgd_steps}"

    @tf.function(reduce_retracing=True)
    def correct(x, y):
        return tf.equal(tf.argmax(logits_fn(x), axis=-1, output_type=tf.int32), y)

    @tf.function(reduce_retracing=True)
    def pgd_correct(x, y, eps, batch_seed):
        return correct(attacks.pgd_classifier(
            logits_fn, x, y, eps, steps=pgd_steps, step_size=eps / 4, random_start=True,
            seed=batch_seed, clip_min=0.0, clip_max=1.0), y)

    @tf.function(reduce_retracing=True)
    def fgsm_correct(x, y, eps, batch_seed):
        del batch_seed
        return correct(attacks.fgsm_classifier(logits_fn, x, y, eps, clip_min=0.0,
                                               clip_max=1.0), y)

    labels = np.asarray(labels, np.int32)
    clean = np.zeros(len(labels), bool)
    for start in range(0, len(labels), batch_size):
        sl = slice(start, start + batch_size)
        clean[sl] = correct(tf.constant(images[sl], tf.float32), tf.constant(labels[sl])).numpy()
    robust = {}
    for attack_name, attack in ((name, pgd_correct), ("fgsm", fgsm_correct)):
        alive = clean.copy()
        robust[attack_name] = {}
        for k, e in sorted(enumerate(eps_list), key=lambda ke: ke[1]):
            index = np.flatnonzero(alive)
            for b, start in enumerate(range(0, len(index), batch_size)):
                rows = index[start:start + batch_size]
                ok = attack(tf.constant(images[rows], tf.float32), tf.constant(labels[rows]),
                            tf.constant(e / 255.0, tf.float32),
                            tf.constant([seed, k * 100_000 + b], tf.int64)).numpy()
                alive[rows] = ok
            robust[attack_name][eps_key(e)] = float(np.mean(alive))
    return {"clean_top1": float(np.mean(clean)), "robust_top1": robust}


def evaluate(model, probe, split: data.Split, eps_list, examples: int, normalize: str,
             feature: str = "h", batch_size: int = 500, seed: int = 0) -> dict:
    """Robust evaluation of encoder + probe on the fixed subset of `split`.

    Returns the results.json entries: robust_top1 (by attack, then eps in 1/255),
    robust_clean_top1, robust_examples, robust_eps (1/255) and robust_seconds.
    """
    t0 = time.time()
    try:
        images, labels = load_subset(split, examples)
    except tf.errors.InvalidArgumentError as e:
        data.raise_if_unreadable(split, e)
    out = robust_accuracy(classifier(model, probe, normalize, feature), images, labels, eps_list,
                          batch_size=batch_size, seed=seed)
    return {"robust_top1": out["robust_top1"], "robust_clean_top1": out["clean_top1"],
            "robust_examples": int(len(labels)), "robust_eps": [float(e) for e in eps_list],
            "robust_seconds": time.time() - t0}
