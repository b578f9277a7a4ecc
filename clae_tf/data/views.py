"""The two views of a pretraining batch (--augment), seeded by (seed, epoch, batch index).

streams.py decides which images make a batch and in which order; this decides what is done to
them. Both views of a batch depend only on the seed, the epoch and the batch's index in it.
"""

import tensorflow as tf

from clae_tf.data import augment
from clae_tf.runtime.config import Config


class Views:
    """The two views of --augment, from a (seed, epoch, batch index) seed per batch."""

    def __init__(self, cfg: Config):
        self.cfg, self.size = cfg, cfg.image_size
        self.views = augment.AUGMENTATIONS[cfg.augment]
        self.view = augment.simclr_view
        if cfg.augment_impl == "keras_cv":  # stateful keras-cv layers (augment_kerascv.py)
            from clae_tf.data import augment_kerascv
            self.view = augment_kerascv.view_fn(cfg.seed, self.size, self.views)

    def batch_seed(self, epoch, index):
        return tf.stack([tf.constant(self.cfg.seed, tf.int64),
                         tf.cast(epoch, tf.int64) * 1_000_000 + tf.cast(index, tf.int64)])

    def _finish(self, x1, x2):
        return (augment.normalize(x1, self.cfg.normalize),
                augment.normalize(x2, self.cfg.normalize))

    def of_batch(self, epoch, index, x):
        """Both views of a batch x (B, S, S, 3) in [0, 1]."""
        seed = self.batch_seed(epoch, index)
        s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        return self._finish(self.view(x, s1, self.size, **self.views),
                            self.view(x, s2, self.size, **self.views))

    def crop_pair(self, epoch, position, image):
        """The two random resized crops of one decoded image (uint8 (H, W, 3)) at `position` of
        its epoch, and whether it was image_size square already (then uncropped: its crops are
        made with its batch's)."""
        size, b = self.size, self.cfg.batch_size
        # A third seed of the batch (the first two make its views), then the image's position.
        crop_seed = tf.random.experimental.stateless_split(
            self.batch_seed(epoch, position // b), 3)[2]
        c1, c2 = tf.unstack(tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(crop_seed, position % b), 2))
        x = tf.cast(image, tf.float32) / 255.0
        shape = tf.shape(image)
        square = (shape[0] == size) & (shape[1] == size)
        scale = self.views["crop_scale"]

        def keep():  # cropped with the batch, as above
            x_ = tf.reshape(x, [size, size, 3])
            return x_, x_

        def crop():
            return (augment.random_resized_crop_image(x, c1, size, scale),
                    augment.random_resized_crop_image(x, c2, size, scale))

        if any(d is not None and d != size for d in image.shape[:2]):  # never square
            return (*crop(), tf.constant(False))
        x1, x2 = tf.cond(square, keep, crop)
        return x1, x2, square

    def of_crops(self, epoch, index, x1, x2, square):
        """Both views of a batch of crop pairs (the square ones still to be cropped)."""
        seed = self.batch_seed(epoch, index)
        s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        return self._finish(
            augment.simclr_view(x1, s1, self.size, crop=square, **self.views),
            augment.simclr_view(x2, s2, self.size, crop=square, **self.views))
