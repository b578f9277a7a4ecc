"""The train loop: several steps per compiled call, gradient sums in a fixed order, divergence
caught.

S = a tiny run on digits (conftest.tiny_config). Each app.run compiles the loop, so runs are few.
"""

import contextlib
import io
import os
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, device_properties_pb2
from tensorflow.python.eager import context
from tensorflow.python.grappler import cluster as grappler_cluster
from tensorflow.python.grappler import tf_optimizer

from clae_tf import ClaeError
from clae_tf.data import sources, streams
from clae_tf.job import app, checkpoints, health, train
from clae_tf.method import train_step

from conftest import tiny_config

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


# ---------------------------------------------------------------------------------------------
# An error in a call of the compiled loop: a file that cannot be decoded is named, any other
# InvalidArgumentError (a shape bug) comes out as it came, without a look at the files.


def _call(train_loop, iterator, split):
    """train._Loop.call with this compiled loop, on a source whose training split is `split`."""
    loop = types.SimpleNamespace(train_loop=train_loop, source=types.SimpleNamespace(train=split),
                                 w_norm0=tf.constant(0.0), train_seconds=0.0,
                                 timings={"first_call": 0.0, "calls": 0.0})
    return train._Loop.call(loop, iterator, 3)


def _files(tmp_path, *contents):
    paths = []
    for i, data in enumerate(contents):
        paths.append(str(tmp_path / f"{i}.png"))
        with open(paths[-1], "wb") as f:
            f.write(data)
    return paths


def test_a_shape_bug_in_the_loop_comes_out_as_it_came_without_a_scan(tmp_path, monkeypatch):
    # A training split with an unreadable file: a scan would find it and blame it.
    split = sources.Split(None, 1, files=_files(tmp_path, b"this is not a png"))
    monkeypatch.setattr(sources, "find_unreadable", lambda split: pytest.fail("scanned"))
    loop = tf.function(lambda iterator, n, w_norm0: tf.reshape(next(iterator), [n, -1]))
    batches = iter(tf.data.Dataset.from_tensors(tf.zeros([5])).repeat())
    with pytest.raises(tf.errors.InvalidArgumentError, match="Input to reshape is a tensor with 5"):
        _call(loop, batches, split)


def test_a_file_the_loop_cannot_decode_is_named(tmp_path):
    png = tf.io.encode_png(tf.zeros([4, 4, 3], tf.uint8)).numpy()
    files = _files(tmp_path, png, b"this is not a png")
    split = sources.Split(None, 2, files=files)
    loop = tf.function(lambda iterator, n, w_norm0: next(iterator))
    batches = iter(tf.data.Dataset.from_tensor_slices(files[::-1]).map(
        lambda f: tf.io.decode_image(tf.io.read_file(f), channels=3, expand_animations=False)))
    with pytest.raises(ClaeError, match=f"^--dataset: cannot read image {files[1]}$"):
        _call(loop, batches, split)
