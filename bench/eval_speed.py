"""Time and memory of evaluation's kNN and linear probe, and of the slower versions they replaced.

    python bench/eval_speed.py                    # the small protocol and 50,000 x 10,000
    python bench/eval_speed.py --cases=small --epochs=100

Each case runs in a fresh process (so that its peak memory is its own) on random features of
the sizes of a run: "small" is the small CIFAR-10 protocol (5,000 training, 10,000 test images,
h 512-d, z 128-d, probe 100 epochs of batch 256), "full" is CIFAR-10 (50,000 x 10,000). Timed:
  knn          evaluate.knn_top1 (segment-sum votes per chunk)
  knn_before   the one-hot version it replaced (a (chunk, k, C) one-hot per chunk)
  probe        evaluate.linear_probe (compiled calls of PROBE_EPOCHS_PER_CALL epochs)
  probe_before the per-epoch version it replaced (a tf.data epoch per tf.function call)
Peak memory is the process's maximum resident set (ru_maxrss, cumulative: a part shows only if it
rises above the parts before it) after each part, next to the
resident set after importing TensorFlow and making the features; the first call of each part
includes its tracing. The 1-minute load average is printed: the numbers are only comparable
between runs on an otherwise idle machine.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {"small": (5000, 10000), "full": (50000, 10000)}


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def knn_before(train_z, train_y, test_z, test_y, num_classes, k=200, sigma=0.5, chunk=256):
    """evaluate.knn_top1 as of 5f22ea2: a (chunk, k, C) one-hot of the votes per chunk."""
    import numpy as np
    import tensorflow as tf
    k = min(k, len(train_z))
    bank = tf.constant(train_z, tf.float32)
    bank_y = tf.constant(train_y, tf.int32)
    correct = 0
    for i in range(0, len(test_z), chunk):
        sim = tf.matmul(tf.constant(test_z[i:i + chunk], tf.float32), bank, transpose_b=True)
        top_sim, top_idx = tf.math.top_k(sim, k=k)
        votes = tf.one_hot(tf.gather(bank_y, top_idx), num_classes)
        weights = tf.exp((top_sim - top_sim[:, :1]) / sigma)
        scores = tf.reduce_sum(votes * weights[..., None], axis=1)
        pred = tf.argmax(scores, axis=-1, output_type=tf.int32).numpy()
        correct += int(np.sum(pred == test_y[i:i + chunk]))
    return correct / len(test_z)


def probe_before(train_h, train_y, num_classes, epochs, lr=3e-4, batch_size=256, seed=0):
    """evaluate.linear_probe's training as of 5f22ea2: one tf.function call per epoch."""
    import keras
    import numpy as np
    import tensorflow as tf
    layer = keras.layers.Dense(num_classes)
    layer.build((None, train_h.shape[1]))
    optimizer = keras.optimizers.Adam(lr)
    optimizer.build(layer.trainable_variables)
    ds = (tf.data.Dataset.from_tensor_slices((train_h.astype(np.float32),
                                              train_y.astype(np.int32)))
          .shuffle(len(train_h), seed=seed).batch(batch_size))

    @tf.function
    def run_epoch():
        for x, y in ds:
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels=y, logits=layer(x)))
            grads = tape.gradient(loss, layer.trainable_variables)
            optimizer.apply_gradients(zip(grads, layer.trainable_variables))

    for _ in range(epochs):
        run_epoch()


def run_case(name, epochs, classes):
    """In this process: time and peak memory of each part on random features of case `name`."""
    import numpy as np
    sys.path.insert(0, REPO)
    from clae_tf.evaluation import evaluate
    n_train, n_test = CASES[name]
    rng = np.random.default_rng(0)
    unit = lambda n: (lambda z: z / np.linalg.norm(z, axis=1, keepdims=True))(  # noqa: E731
        rng.normal(size=(n, 128)).astype(np.float32))
    train_z, test_z = unit(n_train), unit(n_test)
    train_y, test_y = rng.integers(0, classes, n_train), rng.integers(0, classes, n_test)
    train_h = rng.normal(size=(n_train, 512)).astype(np.float32)
    test_h = rng.normal(size=(n_test, 512)).astype(np.float32)
    out = {"case": name, "train": n_train, "test": n_test, "classes": classes, "epochs": epochs,
           "rss_start_mb": _rss_mb()}
    parts = [
        ("knn", lambda: evaluate.knn_top1(train_z, train_y, test_z, test_y, classes)),
        ("knn_before", lambda: knn_before(train_z, train_y, test_z, test_y, classes)),
        ("probe", lambda: evaluate.linear_probe(train_h, train_y, test_h, test_y, classes,
                                                epochs=epochs)),
        ("probe_before", lambda: probe_before(train_h, train_y, classes, epochs)),
    ]
    for part, fn in parts:
        t = time.perf_counter()
        fn()
        out[f"{part}_seconds"] = time.perf_counter() - t
        out[f"{part}_peak_rss_mb"] = _rss_mb()
    print(json.dumps(out), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="small,full")
    parser.add_argument("--epochs", type=int, default=100, help="probe epochs")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: run one case
    args = parser.parse_args()
    if args.one:
        run_case(args.one, args.epochs, args.classes)
        return
    print(f"1-min load before: {os.getloadavg()[0]:.1f}")
    print("| case | part | seconds | peak RSS (MB) |\n|---|---|---|---|")
    for case in args.cases.split(","):
        line = subprocess.run([sys.executable, __file__, f"--one={case}",
                               f"--epochs={args.epochs}", f"--classes={args.classes}"],
                              check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        r = json.loads(line)
        label = f"{case} ({r['train']} x {r['test']})"
        print(f"| {label} | start (TF + features) | - | {r['rss_start_mb']:.0f} |")
        for part in ("knn", "knn_before", "probe", "probe_before"):
            print(f"| {label} | {part} | {r[part + '_seconds']:.2f} | "
                  f"{r[part + '_peak_rss_mb']:.0f} |")
    print(f"1-min load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
