"""Evaluation of a pretrained encoder: weighted kNN on z, a linear probe on frozen h (or z), and
the robust accuracy of encoder + probe (robust.py, --robust_attacks).

Both report the FINAL number on the whole test split (no selection on test, unlike the
reference, which keeps the best test accuracy over probe epochs and drops the last kNN batch).
"""

import os
import time
import zipfile
import zlib

import keras
import numpy as np
import tensorflow as tf

from clae_tf import ClaeError
from clae_tf.data import sources, streams
from clae_tf.evaluation import robust
from clae_tf.runtime import files, signals, workdir
from clae_tf.runtime.config import EVAL_FLAGS, Config


def extract(model, split: sources.Split, batch_size: int, normalize: str):
    """(h, z, y) as numpy arrays for every image of `split`, clean BNs in inference mode."""
    embed = tf.function(lambda x: model(x, training=False))
    hs, zs, ys = [], [], []
    with sources.unreadable_named(split):
        for x, y in streams.eval_dataset(split, batch_size, normalize):
            signals.check()
            h, z = embed(x)
            hs.append(h.numpy())
            zs.append(z.numpy())
            ys.append(y.numpy())
    return np.concatenate(hs), np.concatenate(zs), np.concatenate(ys)


def knn_top1(train_z, train_y, test_z, test_y, num_classes, k=200, sigma=0.5, chunk=256):
    """Weighted kNN (Wu et al. 2018): each of the k most similar training embeddings votes for
    its class with weight exp(similarity / sigma). Embeddings must be L2-normalised.
    Ties (tests/evaluate_test.py): among equal similarities at the k-th place the training
    example that comes first in the bank votes (tf.math.top_k); among equal class scores the
    lowest class index wins (tf.argmax).

    Memory: the bank (N, D) and one (chunk, N) similarity block, never the (n_test, N) matrix;
    votes are summed per class with a segment sum, not a (chunk, k, C) one-hot, so 1,000
    classes cost no more than 10. For N = 50,000, D = 128, chunk 256: 26 MB + 51 MB
    (bench/eval_speed.py).

    Args:
      train_z, train_y: the bank (N, D) and its labels; test_z, test_y: the same for the queries.
      num_classes: number of classes; k: neighbours (at most N); sigma: vote temperature;
      chunk: test embeddings per similarity matrix.
    Returns:
      Top-1 accuracy over every test example.
    """
    k = min(k, len(train_z))
    bank = tf.constant(train_z, tf.float32)  # (N, D)
    bank_y = tf.constant(train_y, tf.int32)

    def predict(query):  # eager: a trace per call would cost more than it saves (online kNN)
        sim = tf.matmul(query, bank, transpose_b=True)  # (b, N)
        top_sim, top_idx = tf.math.top_k(sim, k=k)  # (b, k), sorted: column 0 is the max
        # exp((s - s_max) / sigma): the same vote ratios as exp(s / sigma), which overflows
        # float32 (inf * 0 = nan votes) once 1 / sigma > 88, i.e. sigma < 0.0113.
        weights = tf.exp((top_sim - top_sim[:, :1]) / sigma)
        # scores[i, c] = sum of the weights of row i's neighbours of class c.
        rows = tf.range(tf.shape(query)[0])[:, None]
        segments = rows * num_classes + tf.gather(bank_y, top_idx)  # (b, k)
        scores = tf.math.unsorted_segment_sum(tf.reshape(weights, [-1]),
                                              tf.reshape(segments, [-1]),
                                              tf.shape(query)[0] * num_classes)
        scores = tf.reshape(scores, [-1, num_classes])
        return tf.argmax(scores, axis=-1, output_type=tf.int32)

    correct = 0
    for i in range(0, len(test_z), chunk):
        signals.check()
        pred = predict(tf.constant(test_z[i:i + chunk], tf.float32)).numpy()
        correct += int(np.sum(pred == test_y[i:i + chunk]))
    return correct / len(test_z)


PROBE_EPOCHS_PER_CALL = 10


def epoch_order(n: int, seed: int, epoch):
    """The order in which the probe visits its n training examples in `epoch` (0-based): a
    stateless shuffle of (seed, epoch), the same in and out of tf.function (tests rebuild it)."""
    return tf.random.experimental.stateless_shuffle(
        tf.range(n), seed=tf.stack([tf.cast(seed, tf.int32), tf.cast(epoch, tf.int32)]))


def linear_probe(train_h, train_y, test_h, test_y, num_classes, epochs=100, lr=3e-4,
                 batch_size=256, seed=0):
    """Logistic regression on frozen features with Adam, float32 whatever the run's precision.

    The epochs run in compiled calls of PROBE_EPOCHS_PER_CALL epochs each (a tf.while_loop
    over epochs and batches, the features on the device): a return to Python per epoch or per
    batch costs seconds of overhead over 100-1000 epochs, more than the arithmetic; a return
    every PROBE_EPOCHS_PER_CALL epochs is a safe point for Ctrl-C and SIGTERM (signals.check).

    Args:
      train_h, train_y, test_h, test_y: features (N, D) and int labels (N,).
      num_classes: output classes.
      epochs, lr, batch_size, seed: Adam on the mean cross-entropy of batches of
        `batch_size` (the last one of an epoch smaller), visited in epoch_order(N, seed, epoch).

    Returns:
      (the final epoch's test accuracy, the trained keras Dense layer: features -> logits).
    """
    layer = keras.layers.Dense(num_classes, dtype="float32", kernel_initializer=(
        keras.initializers.VarianceScaling(1.0 / 3.0, mode="fan_in", distribution="uniform",
                                           seed=seed)))
    layer.build((None, train_h.shape[1]))
    optimizer = keras.optimizers.Adam(lr)
    optimizer.build(layer.trainable_variables)
    n = len(train_h)

    @tf.function
    def train(features, labels, first_epoch, end_epoch):
        for epoch in tf.range(first_epoch, end_epoch):
            order = epoch_order(n, seed, epoch)
            for start in tf.range(0, n, batch_size):
                batch = order[start:start + batch_size]
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                        labels=tf.gather(labels, batch),
                        logits=layer(tf.gather(features, batch))))
                grads = tape.gradient(loss, layer.trainable_variables)
                optimizer.apply_gradients(zip(grads, layer.trainable_variables))

    if n and epochs:
        features, labels = tf.constant(train_h, tf.float32), tf.constant(train_y, tf.int32)
        # PROBE_EPOCHS_PER_CALL epochs per call: a safe point between calls (a request to stop
        # is seen within a second) at ~1 ms per call.
        for first in range(0, epochs, PROBE_EPOCHS_PER_CALL):
            signals.check()
            train(features, labels, tf.constant(first),
                  tf.constant(min(first + PROBE_EPOCHS_PER_CALL, epochs)))
    pred = np.argmax(layer(tf.constant(test_h, tf.float32)).numpy(), axis=-1)
    return float(np.mean(pred == test_y)), layer


def save_probe(path: str, layer, feature: str, step: int):
    """The probe's weights, what it reads (h or z) and the encoder step it was trained on."""
    kernel, bias = (np.asarray(w, np.float32) for w in layer.get_weights())
    with files.replacing(path, "the linear probe", needed=kernel.nbytes + bias.nbytes) as tmp:
        with open(tmp, "wb") as f:  # np.savez would append .npz to a path without it
            np.savez(f, kernel=kernel, bias=bias, feature=feature, step=step)


def load_probe(path: str) -> dict:
    """{"kernel" (D, C), "bias" (C,), "feature" ("h"/"z"), "step"} as save_probe wrote them.

    Raises ClaeError (one line: the path, why, and that --mode=eval fits the probe again) for a
    file that is not such an archive: not an .npz (text, pickled data, a bare .npy), truncated,
    unreadable, or without one of the arrays or with arrays of the wrong shape.
    """
    try:
        data = np.load(path)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not the .npz archive of a probe")
        with data as f:
            probe = {"kernel": f["kernel"], "bias": f["bias"], "feature": str(f["feature"]),
                     "step": int(f["step"])}
        if (probe["kernel"].ndim != 2 or probe["bias"].shape != probe["kernel"].shape[1:]
                or probe["feature"] not in ("h", "z")):
            raise ValueError(f"kernel {probe['kernel'].shape}, bias {probe['bias'].shape} and "
                             f"feature {probe['feature']!r} are not a probe's")
    except (ValueError, TypeError, KeyError, EOFError, OSError, zipfile.BadZipFile,
            zlib.error) as e:
        # numpy's first sentence ("This file contains pickled (object) data"), on one line.
        why = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else "empty"
        raise ClaeError(f"--workdir: {path} cannot be read ({type(e).__name__}: {why}); run "
                        f"--mode=eval to fit the probe again") from None
    return probe


def evaluate(cfg: Config, model, source: sources.Source, step: int, extra=None,
             other_data=None) -> dict:
    """kNN, linear probe and robust accuracy; writes the results (<workdir>/results.json), the
    probe's weights (<workdir>/probe.npz, for export) and eval/ scalars to TensorBoard, or with
    `other_data` (workdir.data_name of data other than the run's own) the files of
    workdir.eval_paths. Returns the results as written (with what the file held before)."""
    paths = workdir.eval_paths(cfg.run_dir, other_data)
    print(f"Evaluating step {step}: kNN and a linear probe of {cfg.linear_epochs} epochs on "
          f"{cfg.probe}", flush=True)
    t = time.time()
    train_h, train_z, train_y = extract(model, source.train, cfg.eval_batch_size, cfg.normalize)
    test_h, test_z, test_y = extract(model, source.test, cfg.eval_batch_size, cfg.normalize)
    seconds = {"features": time.time() - t}  # where evaluation's time goes (bench/whole_run.py)
    # The probe's features: h for SimCLR and MoCo, the 128-d embedding z for Plain/UEL
    # (docs/method.md).
    train_f, test_f = (train_h, test_h) if cfg.probe == "h" else (train_z, test_z)
    t = time.time()
    linear, probe = linear_probe(train_f, train_y, test_f, test_y, source.num_classes,
                                 epochs=cfg.linear_epochs, lr=cfg.linear_lr,
                                 batch_size=cfg.linear_batch_size, seed=cfg.seed)
    seconds["probe"] = time.time() - t
    os.makedirs(cfg.run_dir, exist_ok=True)
    save_probe(paths["probe"], probe, cfg.probe, step)  # for export
    t = time.time()
    knn = knn_top1(train_z, train_y, test_z, test_y, source.num_classes, k=cfg.knn_k,
                   sigma=cfg.sigma)
    seconds["knn"] = time.time() - t
    results = {
        "knn_top1": knn, "linear_top1": linear,
        "step": step, "dataset": source.name, "train_examples": len(train_y),
        "test_examples": len(test_y), "num_classes": source.num_classes,
        "method": cfg.method, "adversarial": cfg.adversarial, "seed": cfg.seed,
        "eval_flags": {name: cfg.value_str(name) for name in EVAL_FLAGS
                       if getattr(cfg, name) is not None},
    }
    attacked = robust.Suite.from_config(cfg).runs()
    if attacked:  # encoder + probe under the attack chain
        results.update(robust.evaluate(cfg, model, probe, source.test, source.num_classes))
        seconds["robust"] = results["robust_seconds"]
    results["eval_seconds_by_part"] = seconds
    results.update(extra or {})
    _write_scalars(cfg.run_dir, paths["prefix"], step, results)
    kept_from = None
    if not attacked:  # the robust results already there: kept if still of this classifier
        kept_from, note = earlier_robust_results(paths["results"], results)
        if kept_from is not None:
            results["robust_kept_from"] = kept_from
        if note:
            print(note, flush=True)
    # Robust entries of an earlier evaluation are replaced by this one's (other attacks or radii
    # leave none of theirs behind), or removed as of another classifier, unless kept above.
    return workdir.update_results(cfg.run_dir, results, other_data,
                                  stale_prefix=None if kept_from is not None else "robust_")


# Beside the step (the checkpoint: a workdir holds one per step), what decides the classifier
# that robust numbers are of (encoder + linear probe) and the attacks' random draws.
PROBE_FLAGS = ("probe", "linear_epochs", "linear_lr", "linear_batch_size")


def earlier_robust_results(path: str, results: dict):
    """For an evaluation that runs no robust attack: whether the robust entries of an earlier
    evaluation in the results file at `path` stay, and the line that says what happens to them.

    They stay if they are of the step evaluated now, of a probe fitted with the same flags
    (PROBE_FLAGS) and of the same --seed, as results.json records them ("step", "eval_flags",
    "seed"); they would be a second evaluation's compute lost for nothing. Else they describe
    another classifier than the one whose results are written now, and go.

    Args:
      path: the results file; results: this evaluation's entries ("step", "eval_flags", "seed").
    Returns:
      (robust_kept_from: {"step", "eval_flags": the robust flags of the evaluation that measured
      them} if they stay, else None; a one-line note, or None if there are none).
    """
    saved = files.read_json(path) or {}
    if not any(k.startswith("robust_") for k in saved):
        return None, None
    was_flags = saved.get("eval_flags") or {}
    kept_from = saved.get("robust_kept_from") or {
        "step": saved.get("step"),
        "eval_flags": {k: v for k, v in was_flags.items() if k.startswith("robust_")}}
    step, where = results["step"], f"from an earlier evaluation in {path}"
    old = "an unknown step" if kept_from["step"] is None else f"step {kept_from['step']}"
    if kept_from["step"] != step:
        return None, (f"note: removed the robust results of {old} {where}: they are of another "
                      f"checkpoint than the one of step {step} evaluated now, which runs no "
                      f"robust attack")
    now_flags = results["eval_flags"]
    changed = [f"--{name}={was_flags[name]} (now {now_flags.get(name)})" for name in PROBE_FLAGS
               if name in was_flags and was_flags[name] != now_flags.get(name)]
    if saved.get("seed") is not None and saved["seed"] != results["seed"]:
        changed.append(f"--seed={saved['seed']} (now {results['seed']})")
    if changed:
        return None, (f"note: removed the robust results of {old} {where}: they are of another "
                      f"linear probe, fitted with {', '.join(changed)}; this evaluation runs no "
                      f"robust attack")
    chain = " ".join(f"--{name}={kept_from['eval_flags'][name]}"
                     for name in ("robust_attacks", "robust_eps", "robust_l2_eps")
                     if name in kept_from["eval_flags"])
    return kept_from, (f"note: kept the robust results of {old} {where}"
                       f"{f' ({chain})' if chain else ''}: this evaluation runs no robust attack")


def _write_scalars(run_dir, prefix, step, results):
    """The results as TensorBoard scalars, in an events file of their own; a full disk removes
    that file (files.writing)."""
    logdir = workdir.tensorboard_dir(run_dir)
    before = _entries(logdir)
    with files.writing(logdir, "TensorBoard events", cleanup=lambda: _entries(logdir) - before):
        writer = tf.summary.create_file_writer(logdir)
        with writer.as_default(step=step):
            tf.summary.scalar(f"{prefix}/knn_top1", results["knn_top1"])
            tf.summary.scalar(f"{prefix}/linear_top1", results["linear_top1"])
            for table in ("robust_top1", "robust_top1_l2"):  # L-inf, L2
                for attack, by_eps in results.get(table, {}).items():
                    for eps, acc in by_eps.items():
                        tf.summary.scalar(f"{prefix}/{table}/{attack}_{eps}", acc)
        writer.flush()


def _entries(directory):
    """The paths in `directory` (none if it is missing)."""
    if not os.path.isdir(directory):
        return set()
    return {os.path.join(directory, name) for name in os.listdir(directory)}
