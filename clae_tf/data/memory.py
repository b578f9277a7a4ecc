"""A split's decoded images held in memory, for random access by index.

The pretraining stream (streams.py) draws each epoch's order as a stateless
permutation of indices (tf.random.experimental.index_shuffle, seeded by (seed, epoch)) and
looks the images up here. One tf.data pipeline then serves every epoch of a run: no pipeline
is built, no iterator created or destroyed, and no shuffle buffer refilled at an epoch
boundary, where releasing the finished epoch's iterator stalls the train loop for seconds
(docs/performance.md).

Images that are all image_size square are one (N, S, S, 3) uint8 tensor; images of other or
mixed sizes are kept flat (one uint8 vector, each image's offset and shape) and reshaped on
lookup.
"""

import dataclasses
from typing import Optional

import numpy as np
import tensorflow as tf

# Splits whose decoded images are larger than this are not held in memory (the stream then
# falls back to one shuffled pipeline per epoch, streams.held_in_memory). The images are captured
# as constants in the pipeline's graph, which the distribution strategy serialises once (the 2 GB
# protobuf limit). Not data.TF_CACHE_BYTES, tf.data's cache in host RAM, which has no such limit.
MAX_CONSTANT_BYTES = 1 << 30


@dataclasses.dataclass
class Images:
    num_examples: int
    square: Optional[tf.Tensor] = None  # (N, S, S, 3) uint8 when every image is S x S
    flat: Optional[tf.Tensor] = None  # (sum of H * W * 3,) uint8 otherwise
    offsets: Optional[tf.Tensor] = None  # (N + 1,) int64 into `flat`
    shapes: Optional[tf.Tensor] = None  # (N, 3) int64

    def gather(self, index):
        """The (B, S, S, 3) uint8 images at `index` ((B,) int64); square images only."""
        return tf.gather(self.square, index)

    def image(self, i):
        """Image `i` (scalar int64) as decoded, uint8 (H, W, 3)."""
        if self.square is not None:
            return self.square[i]
        return tf.reshape(self.flat[self.offsets[i]:self.offsets[i + 1]], self.shapes[i])


def load(arrays, size: int) -> Images:
    """The decoded images `arrays` as Images.

    Args:
      arrays: uint8 (H, W, 3) numpy images as decoded, in a fixed order.
      size: --image_size; images all size x size are stacked into one tensor.
    Returns:
      Images.
    """
    num_examples = len(arrays)
    if all(a.shape == (size, size, 3) for a in arrays):
        return Images(num_examples, square=tf.constant(np.stack(arrays)))
    shapes = np.array([a.shape for a in arrays], np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.prod(shapes, axis=1))]).astype(np.int64)
    return Images(num_examples, flat=tf.constant(np.concatenate([a.ravel() for a in arrays])),
                  offsets=tf.constant(offsets), shapes=tf.constant(shapes))


def permuted(seed, epoch, position, num_examples):
    """The example at `position` of epoch `epoch`'s order: a stateless permutation of
    [0, num_examples) that depends only on (seed, epoch). int64 tensors in, int64 out."""
    key = tf.stack([tf.cast(seed, tf.int64) * 100_003 + 7, tf.cast(epoch, tf.int64)])
    return tf.random.experimental.index_shuffle(
        tf.cast(position, tf.int64), seed=key,
        max_index=tf.cast(num_examples - 1, tf.int64) + tf.zeros_like(position, tf.int64))
