"""The streams a run reads: two-view pretraining batches and labelled evaluation batches.

The sources (data.py) give a split's images as decoded; this decides which images make a
pretraining batch and in which order (views.py decides what is done to them). Whether the
pretraining stream reads the split from memory is decided once, by `held_in_memory`:

  - held in memory (memory.py): ONE pipeline for the rest of the run, each epoch's order a
    stateless permutation seeded by (seed, epoch) (`pretrain_stream`);
  - otherwise: one pipeline per epoch, a shuffle buffer seeded by (seed, epoch) over the decoded
    stream (`_shuffled_epoch`).

Either way batch k of epoch e is a pure function of (seed, e, k), so a resumed run sees the
batches of one that never stopped. The random resized crop of a view is taken from the decoded
image as it is (the reference's RandomResizedCrop on the loaded image), so a 64 px Tiny-ImageNet
image is cropped at 64 px and then upsampled, and a non-square image keeps its aspect ratio.
"""

from typing import Callable, Iterator, Optional, Tuple

import tensorflow as tf

from clae_tf.data import augment, memory
from clae_tf.data import views as views_lib
from clae_tf.data.sources import Split
from clae_tf.runtime.config import Config


def held_in_memory(split: Split, cfg: Config) -> Optional[memory.Images]:
    """The split's decoded images in memory for the one-pipeline stream, or None for the
    per-epoch pipeline: the one place that decides.

    None when the decoded images are larger than memory.MAX_CONSTANT_BYTES (or of unknown
    size), and under --augment_impl=keras_cv unless every image is --image_size square
    (keras-cv crops whole batches of resized images: the per-epoch pipeline does that).
    """
    nbytes = split.nbytes()
    if nbytes is None or nbytes > memory.MAX_CONSTANT_BYTES:
        return None
    images = split.read_decoded(cfg.image_size)
    if cfg.augment_impl == "keras_cv" and images.square is None:
        return None
    return images


def pretrain_dataset(split: Split, cfg: Config, epoch: int, start_batch: int = 0):
    """Batches of two views (x1, x2) for one epoch, normalised, as a pure function of the seed.

    The order depends on (seed, epoch) and each batch's views on (seed, epoch, batch index), so
    resuming at `start_batch` gives exactly the batches an uninterrupted run would. The epoch's
    batches of pretrain_stream when the split is held in memory, else a shuffled pipeline.
    """
    images = held_in_memory(split, cfg)
    if images is None:
        return _shuffled_epoch(split, cfg, epoch, start_batch)
    steps_per_epoch = split.num_examples // cfg.batch_size
    return _stream(images, cfg, epoch * steps_per_epoch + start_batch,
                   (epoch + 1) * steps_per_epoch)


def pretrain_stream(split: Split, cfg: Config, start_step: int, end_step: int):
    """ONE pipeline of the (x1, x2) batches of global steps [start_step, end_step), over every
    epoch, or None when the split is not held in memory (`held_in_memory`)."""
    images = held_in_memory(split, cfg)
    return None if images is None else _stream(images, cfg, start_step, end_step)


def epoch_iterators(split: Split, cfg: Config, step: int, total_steps: int,
                    make_iterator: Callable[[tf.data.Dataset], Iterator]
                    ) -> Iterator[Tuple[Iterator, int]]:
    """Iterators over the (x1, x2) batches of each epoch, from global step `step` on.

    Yields (iterator, steps left in its epoch) for each epoch. A split held in memory gives ONE
    iterator for the rest of the run (`pretrain_stream`), handed out again at each epoch (the
    caller still stops at epoch ends, for epoch-end work): building a pipeline and dropping the
    last one's iterator at each boundary costs seconds per epoch (docs/performance.md).
    Otherwise one per epoch (`pretrain_dataset`).

    Args:
      split, cfg: the training split and the run's Config.
      step, total_steps: the first global step and the end of the run.
      make_iterator: dataset -> iterator (e.g. over its distributed batches).
    """
    steps_per_epoch = split.num_examples // cfg.batch_size
    images = held_in_memory(split, cfg)
    if images is not None:
        iterator = make_iterator(_stream(images, cfg, step, total_steps))
        while True:
            yield iterator, steps_per_epoch - step % steps_per_epoch
            step += steps_per_epoch - step % steps_per_epoch
    while True:
        epoch, offset = divmod(step, steps_per_epoch)
        yield make_iterator(_shuffled_epoch(split, cfg, epoch, offset)), steps_per_epoch - offset
        step += steps_per_epoch - offset


def _stream(images: memory.Images, cfg: Config, start_step: int, end_step: int):
    """The batches of global steps [start_step, end_step) of images held in memory.

    Epoch e = step // steps_per_epoch takes its images in the order of a stateless permutation
    seeded by (seed, e) (the last num_examples % batch_size of it are dropped, as
    drop_remainder), and batch k of it its views from (seed, e, k): the stream from any step is
    exactly the tail of the stream from 0.

    Images already --image_size square (CIFAR at 32) are cropped on whole batches. Any other
    image is cropped as it was decoded, one by one before batching (images of different sizes
    cannot share a batch; padding them would make the crop op read each image's true size), with
    a seed of (seed, epoch, batch index, position in the batch); the rest of its view (flip,
    jitter, grayscale) is made on the batch with the batch's seeds.
    """
    b, n = cfg.batch_size, images.num_examples
    steps_per_epoch = n // b
    views = views_lib.Views(cfg)

    if images.square is not None:
        @tf.autograph.experimental.do_not_convert
        def batch_of_views(step):
            epoch, index = step // steps_per_epoch, step % steps_per_epoch
            x = images.gather(memory.permuted(cfg.seed, epoch,
                                              index * b + tf.range(b, dtype=tf.int64), n))
            return views.of_batch(epoch, index, tf.cast(x, tf.float32) / 255.0)

        ds = tf.data.Dataset.range(start_step, end_step).map(
            batch_of_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return _with_options(ds.prefetch(2))

    @tf.autograph.experimental.do_not_convert
    def crops(example):  # example: its global position in the stream, step * b + position
        step = example // b
        epoch, position = step // steps_per_epoch, example % (steps_per_epoch * b)
        image = images.image(memory.permuted(cfg.seed, epoch, position, n))
        return (epoch, position, *views.crop_pair(epoch, position, image))

    @tf.autograph.experimental.do_not_convert
    def batch_of_crops(epoch, position, x1, x2, square):
        return views.of_crops(epoch[0], position[0] // b, x1, x2, square)

    ds = tf.data.Dataset.range(start_step * b, end_step * b).map(
        crops, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(b, drop_remainder=True).map(  # static batch size: whole batches anyway
        batch_of_crops, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _with_options(ds.prefetch(2))


def _with_options(ds):
    """The pipeline shares the CPU cores with the train step and needs a fraction of one core
    (docs/performance.md), so each of its ops runs on one thread rather than spreading over every
    core the step is using."""
    options = tf.data.Options()
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


def _shuffled_epoch(split: Split, cfg: Config, epoch: int, start_batch: int = 0):
    """pretrain_dataset of a split not held in memory: a shuffle buffer seeded by
    (seed, epoch) over the decoded stream, one pipeline per epoch."""
    b = cfg.batch_size
    views = views_lib.Views(cfg)
    source = split.decoded_images
    if cfg.augment_impl == "keras_cv":  # keras-cv crops whole batches of the resized images
        source = split.images
    buffer = min(split.num_examples, 50_000)
    ds = source.shuffle(buffer, seed=cfg.seed * 100_003 + epoch, reshuffle_each_iteration=False)

    if source.element_spec[0].shape.as_list() == [cfg.image_size, cfg.image_size, 3]:
        ds = ds.batch(b, drop_remainder=True).skip(start_batch).enumerate(start_batch)

        @tf.autograph.experimental.do_not_convert  # no control flow; AutoGraph only warns here
        def two_views(index, batch):
            images, _ = batch
            return views.of_batch(epoch, index, tf.cast(images, tf.float32) / 255.0)

        return ds.map(two_views, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    ds = ds.skip(start_batch * b).enumerate(start_batch * b)

    @tf.autograph.experimental.do_not_convert
    def crop_pair(position, example):
        return views.crop_pair(epoch, position, example[0])

    ds = ds.map(crop_pair, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(b, drop_remainder=True).enumerate(start_batch)

    @tf.autograph.experimental.do_not_convert
    def two_views_of_crops(index, batch):
        return views.of_crops(epoch, index, *batch)

    return ds.map(two_views_of_crops, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
        tf.data.AUTOTUNE)


def eval_dataset(split: Split, batch_size: int, normalize: str):
    """Non-augmented images, normalised as --normalize, with labels, every image once, in order.

    The images are the decoded ones resized to --image_size square (bilinear, antialiased when
    shrinking) and rounded to uint8: the reference's test transform, torchvision's
    Resize((size, size)) on a PIL image, then ToTensor and Normalize.
    """
    return split.images.batch(batch_size).map(
        lambda x, y: (augment.normalize(tf.cast(x, tf.float32) / 255.0, normalize), y),
        num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
