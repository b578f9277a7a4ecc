"""Choosing the tf.distribute strategy, and the cross-replica helpers the train step needs."""

import tensorflow as tf

from clae_tf import ClaeError
from clae_tf.config import Config


def make_strategy(cfg: Config) -> tf.distribute.Strategy:
    """auto: MirroredStrategy over all GPUs when there are several, else the default strategy.

    --virtual_cpus=N splits the CPU into N logical devices and mirrors over them, which is how
    the multi-replica code is tested without GPUs. It must run before TF initialises devices.
    """
    if cfg.virtual_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * cfg.virtual_cpus)
        except RuntimeError:
            pass  # already initialised (e.g. by an earlier run in the same process)
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        if len(devices) != cfg.virtual_cpus:
            raise ClaeError(f"--virtual_cpus: TF was already initialised with {len(devices)} CPU "
                            f"devices in this process")
        strategy = tf.distribute.MirroredStrategy(devices)
    else:
        gpus = tf.config.list_logical_devices("GPU")
        if cfg.strategy == "mirrored" or (cfg.strategy == "auto" and len(gpus) > 1):
            strategy = tf.distribute.MirroredStrategy()
        elif cfg.strategy == "one_device" or not gpus:
            strategy = tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
        else:
            strategy = tf.distribute.OneDeviceStrategy(gpus[0].name)
    if cfg.batch_size % strategy.num_replicas_in_sync:
        raise ClaeError(f"--batch_size: {cfg.batch_size} does not divide evenly over "
                        f"{strategy.num_replicas_in_sync} replicas")
    return strategy


def gather(x):
    """Concatenates `x` over all replicas along axis 0 (identity on one replica).

    The gradient flows back through the gather, so negatives from other replicas are real
    negatives: every replica then computes the same global-batch loss.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return x
    return ctx.all_gather(x, axis=0)
