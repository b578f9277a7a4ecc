"""Shared test setup: 4 virtual CPU devices (for the multi-replica tests), a tiny config, the
first batches of the pretraining stream and a numpy reference of the weighted kNN."""

import os
import shutil
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# Must happen before anything initialises TF's devices. Single-device tests use /cpu:0.
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 4)

from clae_tf.data import streams  # noqa: E402
from clae_tf.runtime.config import Config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, tmp_path, tensorflow=True):
    """`python run.py *args` from the repository root. tensorflow=False: any import of TF fails
    loudly, so the errors under test must come before it."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if not tensorflow:
        fake = tmp_path / "no_tensorflow"
        (fake / "tensorflow").mkdir(parents=True, exist_ok=True)
        (fake / "tensorflow" / "__init__.py").write_text(
            "raise ImportError('run.py imported TensorFlow before checking its flags')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(fake), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=600)  # generous: a machine 3x slower than a busy one


def one_line_error(proc, flag, tensorflow=False):
    """The single stderr line of a clean failure (exit 2, no traceback) naming `flag`.

    With TensorFlow imported, its C++ start-up lines (I0000..., E0000...) come first: then the
    error must be the last line and the only one starting with "error".
    """
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    if tensorflow:
        assert [line for line in lines if line.startswith("error")] == lines[-1:], proc.stderr
        lines = lines[-1:]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {flag}:"), lines[0]
    return lines[0]


def parse_flags(*args):
    """run.py's parsing of `args` into a Config (flagfile paths relative to the cwd)."""
    from absl import flags

    from clae_tf.runtime import config
    config.define_flags()
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["run.py", *args])
        return config.from_flags()
    finally:
        flags.FLAGS.unparse_flags()


# The exit code of an in_mount_namespace script whose mount was refused.
MOUNT_REFUSED = 90


def in_mount_namespace(script, what, covered_by, timeout=600, env=None):
    """Runs the sh `script` in a private mount namespace (`unshare -m`; root), where it may
    mount a small tmpfs (`mount ... || exit 90`); returns the finished process. Skips, saying
    why, where unshare is missing or mounting is not allowed (not root, or a container without
    CAP_SYS_ADMIN). what: the filesystem the test needs; covered_by: what covers it otherwise."""
    import pytest
    if shutil.which("unshare") is None:
        pytest.skip(f"needs util-linux unshare (a private mount namespace for {what}); "
                    f"{covered_by}")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **(env or {})))
    if proc.returncode == MOUNT_REFUSED or (proc.returncode != 0
                                            and proc.stderr.startswith("unshare")):
        pytest.skip(f"not root or no mount namespaces (containers without CAP_SYS_ADMIN), so no "
                    f"{what} to test on: {proc.stderr.strip()}")
    return proc


def tiny_config(tmp_path=None, **overrides) -> Config:
    """A model and run small enough for CPU tests (ResNet-10 at width 1/16, 16x16 images)."""
    values = dict(arch="resnet10", width=0.0625, image_size=16, batch_size=16, proj_dim=16,
                  epochs=1, linear_epochs=2, knn_k=5, eval_batch_size=64, log_every=1,
                  image_every=2, ckpt_every=2, dataset="digits", adversarial=True,
                  robust_eps="8", robust_examples=16, robust_attacks="quick",
                  robust_l2_eps="", robust_checks=False)  # the robust evaluation, but cheap
    if tmp_path is not None:
        values["workdir"] = str(tmp_path / "run")
    values.update(overrides)
    return Config(**values)


def pretrain_batches(split, cfg, epoch, start_batch=0, n=3):
    """The (x1, x2) batches of streams.pretrain_dataset from `start_batch` on, `n` of them, as
    numpy arrays."""
    return [(a.numpy(), b.numpy()) for a, b in
            streams.pretrain_dataset(split, cfg, epoch, start_batch).take(n)]


def numpy_knn_predict(train_z, train_y, test_z, num_classes, k, sigma):
    """The weighted kNN of docs/method.md in float64 numpy, one test example at a time: the k
    training embeddings most similar (dot product) to it vote for their class with weight
    exp(similarity / sigma); the class with the largest sum wins. Ties: equal similarities keep
    the bank's order (stable sort), equal sums go to the lowest class (np.argmax).

    Returns:
      int (n_test,) predicted classes.
    """
    k = min(k, len(train_z))
    sim = np.asarray(test_z, np.float64) @ np.asarray(train_z, np.float64).T  # (n_test, n_train)
    pred = []
    for s in sim:
        nearest = np.argsort(-s, kind="stable")[:k]
        scores = np.zeros(num_classes)
        np.add.at(scores, np.asarray(train_y)[nearest], np.exp(s[nearest] / sigma))
        pred.append(int(np.argmax(scores)))
    return np.array(pred)

