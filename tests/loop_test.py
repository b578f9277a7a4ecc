"""The train loop: several steps per compiled call, gradient sums in a fixed order, divergence
caught, SIGTERM saves.

S = a tiny run on digits (conftest.tiny_config). Each app.run compiles the loop, so runs are few.
"""

import contextlib
import io
import os
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, device_properties_pb2
from tensorflow.python.eager import context
from tensorflow.python.grappler import cluster as grappler_cluster
from tensorflow.python.grappler import tf_optimizer

from conftest import tiny_config
from subprocs import run_py

from clae_tf import ClaeError
from clae_tf.data import sources, streams
from clae_tf.job import app, checkpoints, health, train
from clae_tf.method import train_step

ONE_DEVICE = tf.distribute.OneDeviceStrategy("/cpu:0")


def _run(cfg):
    with contextlib.redirect_stdout(io.StringIO()):
        return app.run(cfg)


def _state_and_loop(cfg):
    keras.utils.set_random_seed(cfg.seed)
    state = checkpoints.State(cfg, ONE_DEVICE, 10, 10)
    step = train_step.make_train_step(state.model, state.optimizer, cfg, 1, state.method)
    global_step = train_step.make_distributed_step(ONE_DEVICE, step, state.method, compiled=False)
    return state, global_step, train.make_train_loop(ONE_DEVICE, global_step, state.model, cfg)


@pytest.mark.slow  # > 10 s on the 2 shared cores
def test_one_call_of_three_steps_equals_three_single_steps():
    cfg = tiny_config(optimizer="sgd", learning_rate=0.05, weight_decay=5e-4)
    batches = list(streams.pretrain_dataset(sources.load(cfg).train, cfg, epoch=0).take(3))
    # Reference: three compiled single steps, fed from the host.
    ref_state, ref_step, _ = _state_and_loop(cfg)
    ref_step = tf.function(ref_step)
    losses = [float(ref_step(x1, x2)[0]["loss"]) for x1, x2 in batches]
    state, _, loop = _state_and_loop(cfg)
    w0 = health.weight_norm(state.model.trainable_variables)
    out = loop(iter(tf.data.Dataset.from_tensor_slices(
        tuple(tf.stack(v) for v in zip(*batches)))), tf.constant(3), w0)
    assert int(out["steps"]) == 3 and bool(out["last"]["healthy"])
    # The mean of the three losses, and the weights after the third update.
    np.testing.assert_allclose(float(out["metrics"]["loss"]), np.mean(losses), rtol=1e-5)
    for a, b in zip(state.model.variables, ref_state.model.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6, err_msg=a.path)
    assert int(state.optimizer.iterations.numpy()) == 3


# A gradient summed in the order its terms arrive: what Grappler's memory optimizer makes of an
# AddN of three or more terms (a temporary variable, one AssignAdd per term) when it estimates
# that the graph needs more than 80% of the device's memory (train.fixed_order_sums).
ORDER_OF_ARRIVAL = "TemporaryVariable"


def _op_count(graph_def, op):
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    return sum(n.op == op for n in nodes)


def _grappler(concrete, config, memory_bytes):
    """Grappler's rewrite of a traced function's graph with `config`, for one CPU device that
    declares `memory_bytes`."""
    graph = concrete.graph
    meta = tf.compat.v1.train.export_meta_graph(graph_def=graph.as_graph_def(), graph=graph)
    fetch = meta.collection_def["train_op"].node_list.value  # what Grappler must keep
    fetch.extend([t.name for t in concrete.outputs] + [op.name for op in graph.control_outputs])
    device = device_properties_pb2.NamedDevice(
        name="/job:localhost/replica:0/task:0/device:CPU:0",
        properties=device_properties_pb2.DeviceProperties(type="CPU", memory_size=memory_bytes))
    cluster = grappler_cluster.Cluster(devices=[device])
    return tf_optimizer.OptimizeGraph(config, meta, cluster=cluster)


def test_gradients_of_the_clae_step_are_summed_in_a_fixed_order():
    """The tiny CLAE step sums three terms into the gradient of every shared weight (x1, x2,
    x_adv). On a device its static peak (~2 MiB) exceeds, as the CIFAR step's (~600 MiB) exceeds
    the 256 MiB of a CPU device, TF's default Grappler settings sum some of them in the order
    their terms arrive; the settings fixed_order_sums gives the loop sum none."""
    cfg = tiny_config()
    _, global_step, _ = _state_and_loop(cfg)
    x = tf.TensorSpec([cfg.batch_size, cfg.image_size, cfg.image_size, 3], tf.float32)
    concrete = tf.function(global_step).get_concrete_function(x, x)
    default = context.context().config
    with train.fixed_order_sums():
        fixed = config_pb2.ConfigProto.FromString(
            context.context().function_call_options.config_proto_serialized)
    assert _op_count(_grappler(concrete, default, 1 << 20), ORDER_OF_ARRIVAL) > 0
    assert _op_count(_grappler(concrete, fixed, 1 << 20), ORDER_OF_ARRIVAL) == 0


@pytest.mark.slow
def test_the_loop_at_cifar_scale_runs_no_order_of_arrival_sum():
    """The same at run time, through make_train_loop: a step large enough for TF's own estimate
    to exceed the 256 MiB its CPU device declares (ResNet-10 x0.25, 256 images of 32 px: ~390
    MiB) runs, on TF's defaults, four order-of-arrival sums (the projection head's gradients),
    whose order thread scheduling picks; the loop runs none."""
    cfg = tiny_config(width=0.25, image_size=32, batch_size=256, proj_dim=64)
    state, _, loop = _state_and_loop(cfg)
    w0 = health.weight_norm(state.model.trainable_variables)
    ctx = context.context()
    ctx.enable_run_metadata()
    try:
        out = loop(iter(streams.pretrain_dataset(sources.load(cfg).train, cfg, epoch=0)),
                   tf.constant(1), w0)
        ran = ctx.export_run_metadata().function_graphs
    finally:
        ctx.disable_run_metadata()
    assert int(out["steps"]) == 1 and ran
    assert sum(_op_count(g, ORDER_OF_ARRIVAL)
               for f in ran for g in [*f.partition_graphs, f.post_optimization_graph]) == 0


def test_loop_stops_at_the_first_unhealthy_step():
    cfg = tiny_config(optimizer="sgd", learning_rate=1e35, weight_decay=0.0)
    batches = list(streams.pretrain_dataset(sources.load(cfg).train, cfg, epoch=0).take(3))
    state, _, loop = _state_and_loop(cfg)
    w0 = health.weight_norm(state.model.trainable_variables)
    out = loop(iter(tf.data.Dataset.from_tensor_slices(
        tuple(tf.stack(v) for v in zip(*batches)))), tf.constant(3), w0)
    assert int(out["steps"]) == 1 and not bool(out["last"]["healthy"])


@pytest.mark.parametrize("loss, w_norm, z_norm, healthy", [
    (3.0, 20.0, 1.0, True),
    (float("nan"), 20.0, 1.0, False),
    (3.0, float("inf"), 1.0, False),
    (3.0, 10.0 * health.MAX_WEIGHT_GROWTH + 1.0, 1.0, False),  # w_norm0 = 10
    (3.0, 20.0, 0.1, False),  # most of the batch at z = 0
])
def test_health_verdict_and_its_message(loss, w_norm, z_norm, healthy):
    verdict = health.is_healthy(tf.constant(loss), tf.constant(w_norm), tf.constant(z_norm),
                                tf.constant(10.0))
    assert bool(verdict) == healthy
    message = health.describe(7, loss, w_norm, z_norm, 10.0)
    assert (message is None) == healthy
    if not healthy:
        assert message.startswith("training diverged at step 7: ")


@pytest.mark.slow
def test_divergence_stops_the_run_and_keeps_the_good_checkpoints(tmp_path):
    cfg = tiny_config(tmp_path, optimizer="sgd", learning_rate=0.05, ckpt_every=1, max_steps=2,
                      export=False, linear_epochs=1)
    _run(cfg)
    # The same workdir, resumed with a learning rate that overflows the weights at step 3.
    bad = tiny_config(tmp_path, optimizer="sgd", learning_rate=1e35, ckpt_every=1, max_steps=5)
    with pytest.raises(ClaeError, match=r"training diverged at step 3: .*ckpt-2"):
        _run(bad)
    state = checkpoints.State(bad, ONE_DEVICE)
    assert state.restore() and state.step == 2
    for v in state.model.variables:
        assert np.all(np.isfinite(v.numpy())), v.path
    assert not os.path.exists(os.path.join(cfg.run_dir, "saved_model"))


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    # One epoch (22 steps) leaves many steps after the marker; the evaluation at the end is
    # cut to kNN and a one-epoch probe (no robust suite, no online kNN): only the resume counts.
    args = ["--flagfile=flags/smoke.cfg", "--epochs=1", "--linear_epochs=1", "--noexport",
            f"--workdir={workdir}", "--log_every=1", "--steps_per_loop=1", "--ckpt_every=1000",
            "--robust_attacks=", "--eval_every_epochs=0"]
    with run_py(*args) as run:
        run.wait_for(r"step 3/")  # a few steps have run
        run.send(signal.SIGTERM)
        code, _, err = run.finish()
    assert code == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: terminated (SIGTERM) at step ") and "resume" in last
    saved = int(last.split("at step ")[1].split(";")[0])
    assert saved >= 3
    assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints")).endswith(f"-{saved}")
    # The same command resumes from there and finishes.
    with run_py(*args) as run:
        code, out, err = run.finish()
    assert code == 0, err[-2000:]
    assert "Resuming from" in out and f"at step {saved}." in out


@pytest.mark.slow
def test_ctrl_c_during_evaluation_is_one_line(tmp_path):
    with run_py("--flagfile=flags/smoke.cfg", "--epochs=1", "--max_steps=2",
                "--linear_epochs=100000", "--noexport", f"--workdir={tmp_path / 'run'}") as run:
        run.wait_for(r"Evaluating step 2: ")  # the probe runs for much longer than this test
        run.send(signal.SIGINT)
        code, _, err = run.finish()
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: interrupted; checkpoints so far")
