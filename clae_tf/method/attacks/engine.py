"""The refill engine: an evaluation attack as a per-image state machine, run over a pool of
images in a fixed number of slots. When an image finishes (fooled, or its budget spent) its
slot takes the next waiting image, so every model call works on a full batch until the pool runs
out, and no work is spent on finished images (their state leaves the loop with them).

An image's result depends only on its own inputs, its id and the seed: every random number it
draws comes from common.image_uniform, a counter-based stream keyed by (seed, id, stream, element),
so which images share its batch, its slot and when it starts change nothing (up to the model's
batched kernels' round-off). The pool's order, the number of slots and a split of the pool
into several calls give the same numbers.

A `Machine` is four functions of per-image tensors (every leaf's first axis runs over images):

  start(rows) -> state     the state before any model call (rows: the pool's inputs of
                           these images: "x", "y", "id", and whatever else the pool holds)
  step(state, rows) -> state   one iteration: its model calls and the update. An image's
                           first step evaluates its start (a state `start` leaves "fresh").
  done(state, rows) -> (M,) bool   finished: fooled, or its budget spent
  result(state, rows) -> tuple of (M, ...) outputs
"""

import typing

import tensorflow as tf

from clae_tf.method.attacks.common import _NOT_CONVERTED, _on_alive, _select_rows


class Machine(typing.NamedTuple):
    start: typing.Callable
    step: typing.Callable
    done: typing.Callable
    result: typing.Callable


def pool_of(x, y, eps, ids=None, **extra):
    """The pool `run` takes: x float32, y int32, eps per image, the ids of the images' random
    streams (default 0..N-1), and any further per-image inputs (None ones left out)."""
    y = tf.cast(y, tf.int32)
    pool = dict(x=tf.cast(x, tf.float32), y=y,
                eps=tf.broadcast_to(tf.cast(eps, tf.float32), tf.shape(y)),
                id=tf.range(tf.shape(y)[0]) if ids is None else tf.cast(ids, tf.int32))
    pool.update({k: v for k, v in extra.items() if v is not None})
    return pool


def _gather(pool, slot):
    return {k: tf.gather(v, tf.maximum(slot, 0)) for k, v in pool.items()}


@_NOT_CONVERTED
def run(machine: Machine, pool: dict, batch=None):
    """Runs `machine` on every image of `pool` in `batch` slots (None: all at once).

    Args:
      machine: the attack (module docstring).
      pool: {name: (N, ...) tensor}: each image's inputs, "id" among them (its random streams).
      batch: the slots: images the model sees per call (a Python int >= 1, or None).

    Returns:
      machine.result's outputs for every image, (N, ...) each, in pool order.
    """
    n = tf.shape(pool["id"])[0]
    b = n if batch is None else tf.minimum(n, int(batch))
    slot = tf.range(b)  # the pool index of each slot's image; -1: empty (the pool ran out)
    rows = _gather(pool, slot)
    state = machine.start(rows)

    def zeros(v):
        out = tf.zeros(tf.concat([[n], tf.shape(v)[1:]], 0), v.dtype)
        out.set_shape(pool["id"].shape[:1].concatenate(v.shape[1:]))
        return out
    outs = tf.nest.map_structure(zeros, machine.result(state, rows))

    def retire(slot, waiting, state, outs, rows, finished):
        """The finished images' results into outs; their slots take the next waiting images,
        in pool order."""
        where = tf.boolean_mask(slot, finished)[:, None]
        outs = tf.nest.map_structure(
            lambda out, v: tf.tensor_scatter_nd_update(out, where, tf.boolean_mask(v, finished)),
            outs, machine.result(state, rows))
        new = waiting + tf.cumsum(tf.cast(finished, tf.int32)) - 1
        refill = finished & (new < n)
        slot = tf.where(finished, tf.where(refill, new, -1), slot)
        fresh = _on_alive(refill, machine.start, _gather(pool, slot))
        state = tf.nest.map_structure(lambda a, s: _select_rows(refill, a, s), fresh, state)
        return slot, waiting + tf.reduce_sum(tf.cast(finished, tf.int32)), state, outs

    def body(slot, waiting, state, outs):
        active = slot >= 0
        rows = _gather(pool, slot)
        state = _on_alive(active, machine.step, state, rows)
        finished = active & machine.done(state, rows)
        # Most iterations finish no image: they skip the results' and the states' copies.
        return tf.cond(tf.reduce_any(finished),
                       lambda: retire(slot, waiting, state, outs, rows, finished),
                       lambda: (slot, waiting, state, outs))

    _, _, _, outs = tf.while_loop(lambda slot, *_: tf.reduce_any(slot >= 0), body,
                                  (slot, b, state, outs))
    return outs
