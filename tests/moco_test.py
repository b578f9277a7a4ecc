"""MoCo: the queue is a ring buffer of the gathered keys, the key encoder follows the query
encoder by momentum, and both stay identical on every replica and equal to one device.

Steps run eagerly (train_step.make_distributed_step(compiled=False)): tracing costs more than the
few steps a test runs.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from clae_tf.data import sources, streams
from clae_tf.job import checkpoints
from clae_tf.method import train_step
from clae_tf.runtime import distribute

from conftest import tiny_config

ONE_DEVICE = tf.distribute.OneDeviceStrategy("/cpu:0")
# SGD without weight decay, and momentum 0.9 so that two steps move the key encoder visibly.
MOCO = dict(method="moco", queue_size=40, key_momentum=0.9, optimizer="sgd",
            learning_rate=0.05, weight_decay=0.0)


def _state(strategy, cfg):
    keras.utils.set_random_seed(cfg.seed)
    return checkpoints.State(cfg, strategy, 10, 10)


def _values(variables):
    return {v.path: v.numpy() for v in variables}


def _batches(cfg, n):
    source = sources.load(cfg)
    ds = streams.pretrain_dataset(source.train, cfg, epoch=0).take(n)
    return [(x1.numpy(), x2.numpy()) for x1, x2 in ds]


def test_queue_is_a_ring_buffer():
    cfg = tiny_config(**MOCO)  # batch 16, queue 40: the third batch wraps around
    moco = _state(ONE_DEVICE, cfg).method
    expected = moco.queue.numpy().copy()
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, rtol=1e-5)
    rng = np.random.default_rng(0)
    for i in range(4):
        keys = rng.standard_normal((16, cfg.proj_dim)).astype(np.float32)
        moco.enqueue(tf.constant(keys))
        rows = (16 * i + np.arange(16)) % 40  # the oldest entries
        expected[rows] = keys
        np.testing.assert_array_equal(moco.queue.numpy(), expected)
        assert int(moco.queue_ptr.numpy()) == (16 * (i + 1)) % 40


@pytest.mark.parametrize("adversarial", [False, True])
def test_steps_update_key_encoder_by_momentum_and_enqueue_the_keys(adversarial):
    cfg = tiny_config(adversarial=adversarial, **MOCO)
    state = _state(ONE_DEVICE, cfg)
    moco, model = state.method, state.model
    step = train_step.make_distributed_step(
        ONE_DEVICE, train_step.make_train_step(model, state.optimizer, cfg, 1, moco), moco,
        compiled=False)
    # The key encoder starts as a copy of the query encoder, without adversarial BNs.
    assert not any("bn_adv" in v.path for v in moco.key_model.variables)
    for k, q in moco.pairs:
        np.testing.assert_array_equal(k.numpy(), q.numpy())
    queue0 = moco.queue.numpy().copy()
    m = cfg.key_momentum
    keys_before = [k.numpy() for k, _ in moco.pairs]
    for i, (x1, x2) in enumerate(_batches(cfg, 2)):
        query_before = [q.numpy() for _, q in moco.pairs]
        metrics, _ = step(tf.constant(x1), tf.constant(x2))
        assert np.isfinite(float(metrics["loss"]))
        # key = m * key + (1 - m) * query, with the query parameters from BEFORE this step.
        for (k, _q), k0, q0 in zip(moco.pairs, keys_before, query_before):
            np.testing.assert_allclose(k.numpy(), m * k0 + (1 - m) * q0, rtol=1e-5, atol=1e-7)
        keys_before = [k.numpy() for k, _ in moco.pairs]
        # This step's keys (x2 through the key encoder as it was during the step) are now in
        # rows 16i .. 16i + 15 of the queue; the rest is untouched.
        _, k2 = moco.key_model(tf.constant(x2), training=True)
        queue = moco.queue.numpy()
        np.testing.assert_allclose(queue[16 * i:16 * (i + 1)], k2.numpy(), atol=1e-5)
        np.testing.assert_array_equal(queue[16 * (i + 1):], queue0[16 * (i + 1):])
    # Training moved the query encoder, so the key encoder now lags behind it.
    assert max(np.abs(k.numpy() - q.numpy()).max() for k, q in moco.pairs) > 1e-6


@pytest.mark.slow
def test_two_replicas_hold_the_same_queue_and_key_encoder_as_one_device():
    cfg = tiny_config(adversarial=True, **MOCO)
    batches = _batches(cfg, 2)
    out = {}
    for name, strategy in (("one", ONE_DEVICE),
                           ("two", distribute.mirrored([d.name for d in
                                                        tf.config.list_logical_devices("CPU")][:2]))):
        state = _state(strategy, cfg)
        if name == "two":  # the same starting point as the single device, whatever the RNG did
            for v in (state.model.variables + state.method.key_model.variables +
                      [state.method.queue]):
                v.assign(out["one"]["init"][v.path if v is not state.method.queue else "queue"])
        init = {**_values(state.model.variables), **_values(state.method.key_model.variables),
                "queue": state.method.queue.numpy()}
        step = train_step.make_distributed_step(strategy, train_step.make_train_step(
            state.model, state.optimizer, cfg, strategy.num_replicas_in_sync, state.method),
            state.method, compiled=False)
        for x1, x2 in batches:
            b = len(x1) // strategy.num_replicas_in_sync

            def value_fn(ctx, x1=x1, x2=x2, b=b):  # replica r: rows [r*b, (r+1)*b), as in training
                r = ctx.replica_id_in_sync_group
                return tf.constant(x1[r * b:(r + 1) * b]), tf.constant(x2[r * b:(r + 1) * b])

            step(*strategy.experimental_distribute_values_from_function(value_fn))
        local = strategy.experimental_local_results
        copies = {v.path: [c.numpy() for c in local(v.value)]
                  for v in state.method.key_model.variables}
        copies["queue"] = [c.numpy() for c in local(state.method.queue)]
        copies["queue_ptr"] = [c.numpy() for c in local(state.method.queue_ptr)]
        out[name] = {"init": init, "copies": copies}
    two = out["two"]["copies"]
    for path, values in two.items():
        assert len(values) == 2
        np.testing.assert_array_equal(values[0], values[1], err_msg=path)  # replicas agree
    one = out["one"]["copies"]
    assert int(two["queue_ptr"][0]) == int(one["queue_ptr"][0]) == 32
    # The queue holds the GLOBAL batch's keys (both replicas' halves), as on one device.
    np.testing.assert_allclose(two["queue"][0], one["queue"][0], atol=1e-4)
    for path in one:
        np.testing.assert_allclose(two[path][0], one[path][0], atol=1e-4, err_msg=path)
