"""The train state of a workdir: model, method state, optimizer, and their checkpoints."""

import math
import os
import traceback

import keras
import tensorflow as tf
from tensorflow.python.checkpoint import checkpoint as tf_checkpoint

from clae_tf import ClaeError
from clae_tf.method import builders, contrastive
from clae_tf.method.optim import build_optimizer
from clae_tf.runtime import distribute, files, signals, workdir
from clae_tf.runtime.config import Config


class State:
    """Model, method (methods/base.py), optimizer and checkpoint manager of a workdir.

    Without steps_per_epoch (eval, export) no optimizer is built: restore() then reads the
    model and the method's variables only, and the step comes from the checkpoint's number.
    """

    def __init__(self, cfg: Config, strategy, steps_per_epoch=None, total_steps=None):
        with strategy.scope():
            self.model = builders.build_model(cfg)
            self.method = contrastive.build(cfg, self.model)
            self.optimizer = None
            self._learning_rate = cfg.learning_rate
            if steps_per_epoch is not None:
                self.optimizer = build_optimizer(cfg, steps_per_epoch, total_steps)
                # Keras 3 optimizers must be built in the scope before a distributed step.
                self.optimizer.build(self.model.trainable_variables)
        # Every model variable by path: tf.train.Checkpoint does not follow Keras 3's tracked
        # lists (model.blocks, a block's convs/bns), so `model=` alone misses the blocks' BN
        # moving statistics (their trainable weights are reached only through the optimizer).
        items = dict(model=self.model, variables={v.path: v for v in self.model.variables},
                     **self.method.checkpoint_items())
        if self.optimizer is not None:
            items["optimizer"] = self.optimizer
        self.checkpoint = tf.train.Checkpoint(**items)
        self.directory = workdir.checkpoint_dir(cfg.run_dir)
        # Multi-worker: saving is collective, so every worker saves; only the chief's copy lands
        # in the workdir, the others go to a temporary directory that is removed after each save.
        self.strategy = strategy
        self.manager = _manager(self.checkpoint, distribute.worker_dir(strategy, self.directory))
        self.saved_step = None  # the same on every worker (decides collective saves)
        self._restored_step = 0
        self.restored_path = None

    @property
    def latest_checkpoint(self):
        """The newest ckpt-<step> on disk (the files, not the `checkpoint` index file, which a
        crash can leave damaged). Every worker reads the chief's directory."""
        found = workdir.checkpoint_paths(self.directory)
        return found[0] if found else None

    def save(self, step: int):
        """Writes ckpt-<step>. A Ctrl-C or SIGTERM meanwhile waits until it is written whole.

        A full disk removes what this save wrote (its ckpt-<step>_temp/, any file of
        ckpt-<step>, the index's temporary file) and is a ClaeError that names the last good
        checkpoint (files.writing).
        """
        directory = self.manager.directory
        with signals.held(), files.writing(
                os.path.join(directory, f"ckpt-{step}"), "the checkpoint",
                needed=self._checkpoint_bytes, cleanup=lambda: _partial_save(directory, step),
                note=lambda: _last_good(self.latest_checkpoint)):
            self.manager.save(checkpoint_number=step)
            distribute.remove_worker_dir(self.strategy, directory)
            self.saved_step = step

    def _checkpoint_bytes(self) -> int:
        """About the size of a checkpoint: the newest one's files, else the variables' bytes."""
        latest = self.latest_checkpoint
        if latest is None:
            variables = self.model.variables + (self.optimizer.variables if self.optimizer
                                                else [])
            return sum(math.prod(v.shape) * tf.as_dtype(v.dtype).size for v in variables)
        directory, prefix = os.path.split(latest)
        return sum(files.tree_bytes(os.path.join(directory, name))
                   for name in os.listdir(directory) if name.startswith(prefix + "."))

    def restore(self, model_only=False):
        """Restores the newest checkpoint that can be read; False when there is none.

        A damaged checkpoint (missing or truncated files) is moved to checkpoints/damaged/ and
        the next older one is tried, with one line saying so. A readable checkpoint that does
        not restore into this model is a flag mismatch: an error. model_only: skip what this
        state does not hold (eval, export).
        """
        for path in workdir.checkpoint_paths(self.directory):
            try:
                status = self.checkpoint.restore(path)
                if model_only or self.optimizer is None:
                    status.expect_partial()
                else:
                    status.assert_existing_objects_matched()
            except (AssertionError, ValueError, IndexError, tf.errors.OpError) as e:
                _expect_partial(e)  # this failure is reported below, in one line
                # Only a failed restore reads the whole file again, to tell a damaged checkpoint
                # (fall back; an older one then overwrites whatever this one assigned) from one
                # of another model (an error).
                problem = unreadable(path)
                if not problem:
                    raise ClaeError(f"--workdir: checkpoint {path} does not fit these flags "
                                    f"({str(e).splitlines()[0][:160]}); use another --workdir")
                print(f"Checkpoint {path} is damaged ({problem}); trying the one before it.")
                if distribute.is_chief(self.strategy):
                    _set_aside(path)
                continue
            self._restored_step = _step_of(path)
            self.restored_path = path
            if self.optimizer is not None and not isinstance(
                    self.optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
                # A constant learning rate is a variable that the checkpoint restored: the
                # flags' value wins (resuming with a lower --learning_rate must take effect).
                self.optimizer.learning_rate = self._learning_rate
            self.saved_step = self.step
            return True
        return False

    @property
    def step(self) -> int:
        if self.optimizer is None:
            return self._restored_step
        return int(self.optimizer.iterations.numpy())


def _manager(checkpoint, directory):
    """tf.train.CheckpointManager of `directory`, over a damaged `checkpoint` index file too.

    The manager reads the index only to know which checkpoints it saved before (resume finds
    them from their files, workdir.checkpoint_paths). TensorFlow ignores an index it cannot
    parse, but raises on one that is not UTF-8 text (UnicodeDecodeError) or names no checkpoint
    (ValueError): such an index is set aside in damaged/, with one line, as a damaged
    checkpoint is, and the manager starts without it.
    """
    try:
        return tf.train.CheckpointManager(checkpoint, directory, max_to_keep=3)
    except (UnicodeDecodeError, ValueError) as e:
        index = os.path.join(directory, "checkpoint")
        if not tf.io.gfile.exists(index):
            raise
        print(f"Checkpoint index {index} is damaged ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:120]}); set aside in {directory}/damaged/, the "
              f"checkpoints are found from their own files.")
        tf.io.gfile.makedirs(os.path.join(directory, "damaged"))
        tf.io.gfile.rename(index, os.path.join(directory, "damaged", "checkpoint"),
                           overwrite=True)
        return tf.train.CheckpointManager(checkpoint, directory, max_to_keep=3)


# The bookkeeping of one tf.train.Checkpoint.restore call (private to TensorFlow; () if a
# release renames it, which brings back TensorFlow's own report of a failed restore).
_RESTORE_COORDINATOR = getattr(tf_checkpoint, "_CheckpointRestoreCoordinator", ())


def _expect_partial(error):
    """Marks the restore that raised `error` as partial on purpose, as status.expect_partial()
    marks one that returned a status (a restore that raises returns none).

    Without this, TensorFlow logs a warning for every value of the checkpoint that the restore
    did not reach (tens of lines: the whole model of another --method) when the restore's
    bookkeeping is garbage-collected, typically at exit, after the one line that says what is
    wrong. The restore is found among the locals of the frames that `error` passed through.
    """
    for frame, _ in traceback.walk_tb(error.__traceback__):
        for value in frame.f_locals.values():
            if isinstance(value, _RESTORE_COORDINATOR):
                value.expect_partial = True


def unreadable(path):
    """Why the checkpoint at `path` cannot be read (None if every tensor in it reads)."""
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except (tf.errors.OpError, ValueError, IndexError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return None


def _set_aside(path):
    """Moves the files of a damaged checkpoint to <dir>/damaged/ (kept for inspection)."""
    directory, prefix = os.path.split(path)
    aside = os.path.join(directory, "damaged")
    tf.io.gfile.makedirs(aside)
    for name in tf.io.gfile.listdir(directory):
        if name == prefix + ".index" or name.startswith(prefix + ".data"):
            tf.io.gfile.rename(os.path.join(directory, name), os.path.join(aside, name),
                               overwrite=True)


def _partial_save(directory, step):
    """What a failed save of ckpt-<step> leaves in `directory`: TensorFlow's ckpt-<step>_temp/,
    the files of ckpt-<step> written so far, and the `checkpoint` index's temporary file."""
    prefix = f"ckpt-{step}"
    return [os.path.join(directory, name) for name in os.listdir(directory)
            if name in (prefix, prefix + "_temp") or name.startswith(prefix + ".")
            or name.startswith("checkpoint.tmp")]


def _last_good(path):
    return (f"the last good checkpoint, {path}, is kept" if path else
            "no checkpoint was saved before")


def _step_of(path):
    return int(path.rsplit("-", 1)[1])  # saved as ckpt-<step>
