"""The train loop (checkpoints, TensorBoard, progress) around the CLAE step (train_step.py)."""

import contextlib
import dataclasses
import math
import time

import keras
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2

# Private, but the only way in: tf.config has no switch for Grappler's memory optimizer
# (tf.experimental.function_executor_type sets these same call options).
from tensorflow.python.eager import context as tf_context

from clae_tf import ClaeError
from clae_tf.data import augment, sources, streams
from clae_tf.evaluation import monitor
from clae_tf.job import checkpoints, health
from clae_tf.method import train_step
from clae_tf.runtime import distribute, files, signals, workdir
from clae_tf.runtime.config import Config
from clae_tf.runtime.progress import Progress


def make_train_loop(strategy, distributed_step, model, cfg: Config):
    """Up to `num_steps` global steps in ONE compiled call, on the device.

    Returns per call: the number of steps run, the mean metrics over them, the last step's
    images and its health (health.py). The loop stops at the first unhealthy step. One host
    round trip per call instead of per step: on a GPU the host then never waits for a step to
    finish before feeding the next (and on a CPU it saves the per-step dispatch).
    `distributed_step` is the uncompiled global step (make_distributed_step(compiled=False)).
    Every call runs under fixed_order_sums, so that a seed gives the same weights in any process.
    """
    local_batch = cfg.batch_size // strategy.num_replicas_in_sync
    image_shape = [min(4, local_batch), cfg.image_size, cfg.image_size, 3]
    variables = model.trainable_variables

    @tf.function
    def train_loop(iterator, num_steps, w_norm0):
        sums = {k: tf.constant(0.0) for k in train_step.METRICS}
        images = {"x": tf.zeros(image_shape), "x_adv": tf.zeros(image_shape)}
        steps = tf.constant(0)
        last = {"loss": tf.constant(0.0), "w_norm": w_norm0, "z_norm": tf.constant(1.0),
                "healthy": tf.constant(True)}
        for _ in tf.range(num_steps):
            x1, x2 = next(iterator)
            metrics, images = distributed_step(x1, x2)
            # A static shape for the loop variable (multi-worker datasets leave the batch
            # dimension unknown; AutoGraph needs the same shape on every iteration).
            images = {k: tf.ensure_shape(v, image_shape) for k, v in images.items()}
            steps += 1
            sums = {k: sums[k] + metrics[k] for k in train_step.METRICS}
            w_norm = health.weight_norm(variables)
            last = {"loss": metrics["loss"], "w_norm": w_norm, "z_norm": metrics["z_norm"],
                    "healthy": health.is_healthy(metrics["loss"], w_norm, metrics["z_norm"],
                                                 w_norm0)}
            if not last["healthy"]:
                break
        means = {k: v / tf.cast(tf.maximum(steps, 1), tf.float32) for k, v in sums.items()}
        return {"steps": steps, "metrics": means, "images": images, "last": last}

    def call(iterator, num_steps, w_norm0):
        with fixed_order_sums():
            return train_loop(iterator, num_steps, w_norm0)

    return call


@contextlib.contextmanager
def fixed_order_sums():
    """tf.functions called inside add the terms of each gradient in a fixed order, so that a
    seed gives the same weights in every process.

    With --adversarial the step reads every shared weight in three forward passes (x1, x2,
    x_adv), and its gradient is an AddN of three terms. When Grappler's static estimate of a
    graph's peak memory exceeds 80% of the device's memory (a CPU device declares 256 MiB: the
    CLAE step of ResNet-18 x0.25 on 256 CIFAR images goes over, a 16-image test model does
    not), its memory optimizer rewrites such AddNs into a temporary variable that each term is
    AssignAdd-ed to as it arrives: thread scheduling then picks the order of a float sum. The
    last-bit differences this leaves in those gradients (there: the projection head's) become
    eps-sized ones in x_adv through FGSM's sign(), and tenths of a point of accuracy after a
    run. (SimCLR alone reads each weight twice; AddNs of two terms are never rewritten.)
    enable_op_determinism does not stop it: the ops are deterministic, the rewritten graph is
    not.

    SWAPPING_HEURISTICS is the default level without that rewrite: its one other pass moves
    tensors to the host only on a GPU whose memory the graph exceeds. A function is optimised
    per call configuration, so every call of it must be made inside.
    """
    ctx = tf_context.context()
    options = ctx.function_call_options
    config = config_pb2.ConfigProto.FromString(options.config_proto_serialized or b"")
    config.graph_options.rewrite_options.memory_optimization = (
        rewriter_config_pb2.RewriterConfig.SWAPPING_HEURISTICS)
    ctx.function_call_options = tf_context.FunctionCallOptions(options.executor_type, config)
    try:
        yield
    finally:
        ctx.function_call_options = options


@dataclasses.dataclass
class TrainResult:
    """What train() gives back: the trained model and this process's record of the training.

    timings: where the loop's time went (results.json "timings"): train_data_setup_seconds,
    train_first_call_seconds (tracing and compiling the loop) and train_first_call_steps,
    train_calls_seconds, train_loop_seconds (calls plus the host's time between them).
    """
    model: keras.Model
    step: int  # the global step reached
    steps_per_epoch: int
    train_seconds: float  # in the compiled loop calls
    online_evals: int  # online kNN evaluations (monitor.py)
    online_eval_seconds: float
    timings: dict

    def results(self) -> dict:
        """The results.json entries of this training (all but the model and the timings)."""
        return {"step": self.step, "steps_per_epoch": self.steps_per_epoch,
                "epochs": self.step / self.steps_per_epoch,
                "train_seconds_this_process": self.train_seconds,
                "online_evals_this_process": self.online_evals,
                "online_eval_seconds_this_process": self.online_eval_seconds}


def train(cfg: Config, strategy, source: sources.Source, on_accepted=None) -> TrainResult:
    """Pretrains (or resumes) in cfg.run_dir.

    Args:
      cfg: the run's Config; strategy: its tf.distribute strategy; source: sources.load(cfg).
      on_accepted(trains): called once the workdir's checkpoint (if any) has accepted these
        flags, before the first step; trains: whether any step is left to train.
    Returns:
      TrainResult: the model, the step reached and this process's timings.
    Raises:
      ClaeError: a diverged step, or Ctrl-C / SIGTERM (after saving a checkpoint).
    """
    steps_per_epoch = source.train.num_examples // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    state = checkpoints.State(cfg, strategy, steps_per_epoch, total_steps)
    if state.restore():
        print(f"Resuming from {state.restored_path} at step {state.step}.")
    if on_accepted is not None:
        on_accepted(state.step < total_steps)
    loop = _Loop(cfg, strategy, source, state, steps_per_epoch, total_steps)
    step = start = state.step
    loop_start = time.time()
    epochs = _epoch_batches(strategy, source.train, cfg, start, total_steps)
    iterator, left_in_epoch = next(epochs)
    loop.timings["data_setup"] += time.time() - loop_start
    try:
        # Requests to stop (also when called without app.run), taken at the safe points: here
        # between calls, and in the online evaluation's batches. Once the first call (tracing and
        # compiling) has run, the watchdog waits for them: they save the steps since the last
        # checkpoint.
        with signals.loop_of_calls() as first_call_done:
            while step < total_steps:
                signals.check()
                if not left_in_epoch:
                    t = time.time()
                    iterator, left_in_epoch = next(epochs)
                    loop.timings["data_setup"] += time.time() - t
                n = min(left_in_epoch, _steps_to_next_event(step, total_steps, cfg))
                out = loop.call(iterator, n)
                first_call_done()
                step += int(out["steps"])
                left_in_epoch -= int(out["steps"])
                loop.after_call(step, n, out, epoch_ended=not left_in_epoch)
    except KeyboardInterrupt as e:
        _stop(state, e)
    loop.timings["loop"] = time.time() - loop_start
    return loop.finish(step)


class _Loop:
    """The host's side of the train loop: the compiled loop (make_train_loop) and what each of
    its calls reports to (health check, online kNN, progress, TensorBoard, checkpoints), with
    the ledger of where the time goes."""

    def __init__(self, cfg: Config, strategy, source: sources.Source, state, steps_per_epoch,
                 total_steps):
        self.cfg, self.source, self.state = cfg, source, state
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.start = state.step
        replica_step = train_step.make_train_step(state.model, state.optimizer, cfg,
                                       strategy.num_replicas_in_sync, state.method)
        self.train_loop = make_train_loop(
            strategy, train_step.make_distributed_step(strategy, replica_step, state.method,
                                                       compiled=False),
            state.model, cfg)
        logdir = self.logdir = workdir.tensorboard_dir(cfg.run_dir)
        chief = distribute.is_chief(strategy)
        with self._events():  # the writer writes its first event at once
            self.writer = (tf.summary.create_file_writer(logdir) if chief
                           else tf.summary.create_noop_writer())
        # Online kNN and pictures: the chief only (no collectives in there, monitor.py).
        self.watch = (monitor.Monitor(cfg, state.model, source, self.writer, logdir) if chief
                      else None)
        self.online, self.online_seconds, self.online_evals = {}, 0.0, 0
        self.progress = Progress(self.start, total_steps, every=cfg.log_every)
        self.w_norm0 = health.weight_norm(state.model.trainable_variables)
        self.window_start, self.window_steps, self.train_seconds = time.time(), 0, 0.0
        # Where the time goes (results.json "timings"): pipeline set-up, the first call (tracing
        # and compiling the loop), the calls, and the host's time between calls.
        self.timings = {"data_setup": 0.0, "first_call": 0.0, "calls": 0.0, "loop": 0.0}

    def call(self, iterator, n: int) -> dict:
        """One call of the compiled loop, up to n steps; its outputs as numpy (train_loop)."""
        t = time.time()
        with sources.unreadable_named(self.source.train):  # names a file tf.data cannot decode
            out = self.train_loop(iterator, tf.constant(n), self.w_norm0)
        out = tf.nest.map_structure(lambda v: v.numpy(), out)  # the one round trip
        self.train_seconds += time.time() - t
        if not self.timings["first_call"]:
            self.timings["first_call"], self.timings["first_call_steps"] = time.time() - t, n
        else:
            self.timings["calls"] += time.time() - t
        return out

    def after_call(self, step: int, n: int, out: dict, epoch_ended: bool):
        """The host's work once a call of n steps has brought the run to `step`."""
        cfg = self.cfg
        self._check_health(step, out["last"])
        metrics = {k: float(v) for k, v in out["metrics"].items()}
        self.window_steps += int(out["steps"])
        with self._events():
            if (self.watch and cfg.eval_every_epochs and epoch_ended
                    and (step // self.steps_per_epoch) % cfg.eval_every_epochs == 0):
                self._online_eval(step)
            self.progress.update(step, {**{k: metrics[k] for k in ("loss", "contrast_acc")},
                                        **self.online})
            if step % cfg.log_every == 0 or step == self.total_steps:
                self._log_scalars(step, metrics)
            if cfg.adversarial and (step % cfg.image_every == 0 or step == self.start + n):
                _log_images(self.writer, step, out["images"], cfg.eps, cfg.normalize)
        if step % cfg.ckpt_every == 0:
            self.state.save(step)

    def _events(self):
        """Around TensorBoard writes: a summary op flushes the writer's queue when it is full,
        so a full disk surfaces there or at flush() (files.writing: one line)."""
        return files.writing(self.logdir, "TensorBoard events")

    def _check_health(self, step: int, last: dict):
        if not last["healthy"]:
            raise ClaeError(
                health.describe(step, float(last["loss"]), float(last["w_norm"]),
                                float(last["z_norm"]), float(self.w_norm0))
                + f"; {_last_good(self.state)} (try a lower --learning_rate)")

    def _online_eval(self, step: int):
        t = time.time()
        self.online["knn_online"] = self.watch.online_eval(step)
        self.online_evals += 1
        self.online_seconds += time.time() - t
        self.window_start += time.time() - t  # not part of train/images_per_sec

    def _log_scalars(self, step: int, metrics: dict):
        elapsed = time.time() - self.window_start
        # convert_to_tensor: float() of a Keras variable fails when it is mirrored.
        lr = float(tf.convert_to_tensor(self.state.optimizer.learning_rate))
        _log_scalars(self.writer, step, metrics, lr,
                     self.window_steps * self.cfg.batch_size / max(elapsed, 1e-9))
        self.window_start, self.window_steps = time.time(), 0

    def finish(self, step: int) -> TrainResult:
        """The last checkpoint, the monitor's last picture, the events on disk; the record."""
        if self.state.saved_step != step:
            self.state.save(step)
        with self._events():
            if self.watch:
                self.watch.at_end(step)
            self.writer.flush()
        return TrainResult(
            model=self.state.model, step=step, steps_per_epoch=self.steps_per_epoch,
            train_seconds=self.train_seconds, online_evals=self.online_evals,
            online_eval_seconds=self.online_seconds,
            timings={f"train_{k}" + ("" if k.endswith("steps") else "_seconds"): v
                     for k, v in self.timings.items()})


def _stop(state, interrupt: KeyboardInterrupt):
    """Ctrl-C or SIGTERM in the loop: keeps what this process has done (if it is healthy), so
    that the same command resumes, and stops with one line. Later signals are dropped
    (signals.py), so that this save and the message complete."""
    signals.stopping()
    why = signals.describe(interrupt)
    if not math.isfinite(float(health.weight_norm(state.model.trainable_variables))):
        raise ClaeError(f"{why} at step {state.step} with non-finite weights; "
                        f"{_last_good(state)}")
    if state.saved_step != state.step:  # e.g. a signal held until a save ended
        state.save(state.step)
    raise ClaeError(f"{why} at step {state.step}; checkpoint saved in "
                    f"{state.directory}; run the same command to resume")


def _last_good(state):
    path = state.latest_checkpoint
    return (f"nothing was saved after it, the last good checkpoint is {path}" if path else
            "no checkpoint was saved")


def _steps_to_next_event(step, total_steps, cfg):
    """Steps until the host must act: a log, image or checkpoint step, the end, or
    --steps_per_loop, whichever comes first."""
    n = min(cfg.steps_per_loop, total_steps - step)
    for every in (cfg.log_every, cfg.ckpt_every) + ((cfg.image_every,) if cfg.adversarial else ()):
        n = min(n, every - step % every)
    return n


def _epoch_batches(strategy, split, cfg, step, total_steps):
    """streams.epoch_iterators over the distributed (x1, x2) batches: (iterator, steps left in
    its epoch) per epoch, from global step `step` on."""
    return streams.epoch_iterators(
        split, cfg, step, total_steps,
        lambda ds: iter(distribute.distribute_batches(strategy, ds)))


def _log_scalars(writer, step, metrics, lr, images_per_sec):
    with writer.as_default(step=step):
        for k, v in metrics.items():
            tf.summary.scalar(f"train/{k}", v)
        tf.summary.scalar("train/learning_rate", lr)
        tf.summary.scalar("train/images_per_sec", images_per_sec)


def _log_images(writer, step, images, eps, normalize):
    """A few x, x_adv and the perturbation amplified to the full range (+eps white, -eps black)."""
    x = tf.clip_by_value(augment.denormalize(images["x"], normalize), 0.0, 1.0)
    x_adv = tf.clip_by_value(augment.denormalize(images["x_adv"], normalize), 0.0, 1.0)
    delta = (images["x_adv"] - images["x"]) / (2.0 * max(eps, 1e-12)) + 0.5
    with writer.as_default(step=step):
        tf.summary.image("adversarial/x", x, max_outputs=4)
        tf.summary.image("adversarial/x_adv", x_adv, max_outputs=4)
        tf.summary.image("adversarial/perturbation_amplified",
                         tf.clip_by_value(delta, 0.0, 1.0), max_outputs=4)
