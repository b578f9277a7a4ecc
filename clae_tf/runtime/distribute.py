"""Choosing the tf.distribute strategy, and the cross-replica helpers the train step needs.

Data parallelism in clae-tf (docs/distributed.md):
  - --batch_size is the GLOBAL batch; each of the R replicas gets a contiguous 1/R slice.
  - Embeddings are gathered over replicas (`gather`), so the attack and the loss see every
    negative of the global batch and every replica computes the same global loss.
  - --sync_bn makes every BatchNormalization (clean and adversarial) use global-batch statistics.
  - Multi-worker: every worker runs the whole (seeded, deterministic) input pipeline and keeps its
    slice of each global batch; every worker saves checkpoints (saving is collective), but only
    the chief writes into the workdir.
"""

import itertools
import json
import os
import shutil
import tempfile

import tensorflow as tf

from clae_tf import ClaeError
from clae_tf.runtime.config import Config

_strategies_made = itertools.count(1)


def make_strategy(cfg: Config) -> tf.distribute.Strategy:
    """The strategy for --strategy / --virtual_cpus. Must run before TF initialises its devices.

    auto:        MirroredStrategy over all GPUs when there are several, else one device.
    mirrored:    MirroredStrategy over all local GPUs (or --virtual_cpus CPU devices).
    multiworker: MultiWorkerMirroredStrategy; the cluster and this process's role come from the
                 TF_CONFIG environment variable (without it: one worker).
    one_device:  the first GPU, or the CPU.
    --virtual_cpus=N splits the CPU into N logical devices and mirrors over them, which is how
    the multi-replica code is tested without GPUs (with --strategy=auto or mirrored: Config
    refuses the other two).
    """
    if cfg.strategy == "multiworker":
        strategy = _multi_worker()
    elif cfg.virtual_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * cfg.virtual_cpus)
        except RuntimeError:
            pass  # already initialised (e.g. by an earlier run in the same process)
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        if len(devices) < cfg.virtual_cpus:
            raise ClaeError(f"--virtual_cpus: TF was already initialised with {len(devices)} CPU "
                            f"devices in this process")
        strategy = mirrored(devices[:cfg.virtual_cpus])
    else:
        gpus = tf.config.list_logical_devices("GPU")
        if cfg.strategy == "mirrored" or (cfg.strategy == "auto" and len(gpus) > 1):
            strategy = mirrored()
        else:
            strategy = tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if cfg.batch_size % strategy.num_replicas_in_sync:
        raise ClaeError(f"--batch_size: {cfg.batch_size} (the global batch) does not divide evenly "
                        f"over {strategy.num_replicas_in_sync} replicas")
    return strategy


def mirrored(devices=None) -> tf.distribute.MirroredStrategy:
    """A MirroredStrategy whose collectives cannot clash with another one's in this process.

    SHARP EDGE: every MirroredStrategy object numbers its collective groups and instances from
    the same start, so a second strategy over (some of) the same devices in one process -- tests,
    notebooks, a resumed run -- reuses the first one's keys and its collectives fail with
    "Collective instance 100 expected type 0 ..." or "joining a group with size 4, but that group
    has size 2". `_collective_key_base` is the hook TF's own tests use to keep them apart.
    """
    cls = tf.distribute.MirroredStrategy
    saved = cls._collective_key_base
    cls._collective_key_base = next(_strategies_made) * 10_000
    try:
        return cls(devices)
    finally:
        cls._collective_key_base = saved


def _multi_worker() -> tf.distribute.Strategy:
    raw = os.environ.get("TF_CONFIG")
    if raw:
        try:
            tf_config = json.loads(raw)
            ok = "cluster" in tf_config and {"type", "index"} <= set(tf_config["task"])
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ClaeError('--strategy=multiworker: TF_CONFIG must be JSON like {"cluster": '
                            '{"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", '
                            '"index": 0}}; got ' + raw[:200])
    else:
        print("--strategy=multiworker without TF_CONFIG: training as a single worker.")
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except (RuntimeError, ValueError) as e:
        raise ClaeError(f"--strategy=multiworker: cannot start MultiWorkerMirroredStrategy "
                        f"({str(e).splitlines()[0][:200]}); it must be created before anything "
                        f"else uses TensorFlow, and TF_CONFIG must name this process")


def is_chief(strategy) -> bool:
    """True where TensorBoard, results, flags.cfg, the SavedModel and checkpoints are written:
    always, except on the non-chief workers of a multi-worker run."""
    return strategy.extended.should_checkpoint


def worker_dir(strategy, path: str) -> str:
    """Where this worker writes what the chief writes to `path` (collective checkpoint saves).

    The chief writes to `path`. The other workers must take part in every save, but their copy
    is thrown away: they write to a fresh local temporary directory (remove it with
    `remove_worker_dir` after each save).
    """
    if is_chief(strategy):
        return path
    task = strategy.cluster_resolver.task_id
    return tempfile.mkdtemp(prefix=f"clae_worker{task}_")


def remove_worker_dir(strategy, path: str):
    """Deletes a non-chief worker's throw-away copy (no-op on the chief)."""
    if not is_chief(strategy):
        shutil.rmtree(path, ignore_errors=True)


def distribute_batches(strategy, dataset: tf.data.Dataset):
    """Distributes a dataset of GLOBAL batches: replica r gets rows [r*b, (r+1)*b), b = B/R.

    Multi-worker: every worker runs the whole pipeline (it is a pure function of the seed) and
    keeps only its slice of each batch (AutoShardPolicy.DATA). The default policy (AUTO) would
    give each worker different input FILES for a TFDS dataset instead: other images than a
    single-process run, and a shorter epoch per worker than steps_per_epoch assumes.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def gather(x):
    """Concatenates `x` over all replicas along axis 0 (identity on one replica).

    The gradient flows back through the gather, so negatives from other replicas are real
    negatives: every replica then computes the same global-batch loss.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return x
    return ctx.all_gather(x, axis=0)
