"""Seeing the representation while it learns: online kNN, nearest neighbours, projector.

Every --eval_every_epochs the train loop (train.py) asks for the weighted kNN accuracy of z on a
fixed class-balanced subset of the test split (--online_eval_examples) against the whole
non-augmented training set -- the final evaluation's kNN (evaluate.knn_top1) on fewer test
images -- and for a picture of a few test images with their nearest training images. At the end
of training the picture once more, and the test embeddings for TensorBoard's Projector.

The features come from the model in INFERENCE mode (clean BNs, moving statistics, nothing
updated) and nothing here draws random numbers, so monitoring does not change the training
trajectory (tests/monitor_test.py checks the weights). Under a MirroredStrategy the model is
called in cross-replica context: it reads the first replica's variables, which all replicas
share.
"""

import time

import numpy as np
import tensorflow as tf

from clae_tf.data import augment, sources
from clae_tf.evaluation import evaluate, visualize
from clae_tf.runtime import signals
from clae_tf.runtime.config import Config

NEIGHBOUR_ROWS = 10  # test images in the picture: the first of each class (up to 10 classes)
NEIGHBOURS = 8  # training images after each


class Monitor:
    """Online kNN, the nearest-neighbour picture and the projector of one run (the chief's).

    Args:
      cfg: the run's Config.
      model: the ContrastiveModel being trained.
      source: the data (its train and test splits).
      writer: the run's TensorBoard writer.
      logdir: the directory of that writer (the projector's files go there).
    """

    def __init__(self, cfg: Config, model, source: sources.Source, writer, logdir):
        self.cfg, self.source, self.writer, self.logdir = cfg, source, writer, logdir
        size, normalize = cfg.image_size, cfg.normalize

        # Compiled once for any batch size: uint8 images in, (h, z) out, as evaluate.extract
        # normalises them (streams.eval_dataset), clean BNs in inference mode.
        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
        def embed(x):
            h, z = model(augment.normalize(tf.cast(x, tf.float32) / 255.0, normalize),
                         training=False)
            return tf.cast(h, tf.float32), tf.cast(z, tf.float32)

        self._embed = embed
        self._train = None  # (images, labels): the non-augmented training set, loaded once
        self._test = None  # (images, labels, split indices) of the test subsets
        self.pictured_step = None  # the step of the last neighbour picture

    def _load(self):
        """The training images and the test subsets (online kNN and projector), once."""
        if self._train is not None:
            return
        self._train = sources.read_images(self.source.train)
        n = max(self.cfg.online_eval_examples, self.cfg.projector_examples)
        images, labels, keep = sources.read_balanced(self.source.test, n)
        self._test = images, labels, keep
        # Both subsets (each the first of every class) are the first of `keep`'s own balanced
        # order: their positions in `keep`.
        self._online = sources.balanced_subset(labels, self.cfg.online_eval_examples)
        self._projected = sources.balanced_subset(labels, self.cfg.projector_examples)

    def features(self, images):
        """(h, z) float32 numpy arrays of uint8 images (N, S, S, 3), in eval batches."""
        hs, zs = [], []
        for i in range(0, len(images), self.cfg.eval_batch_size):
            signals.check()
            h, z = self._embed(tf.constant(images[i:i + self.cfg.eval_batch_size]))
            hs.append(h.numpy())
            zs.append(z.numpy())
        return np.concatenate(hs), np.concatenate(zs)

    def online_eval(self, step: int) -> float:
        """Weighted kNN top-1 of the test subset (eval/knn_top1_online) and the neighbour
        picture, at `step`. Returns the accuracy."""
        start = time.time()
        self._load()
        train_images, train_y = self._train
        _, train_z = self.features(train_images)
        test_images, test_y, _ = (a[self._online] for a in self._test)
        _, test_z = self.features(test_images)
        accuracy = evaluate.knn_top1(train_z, train_y, test_z, test_y, self.source.num_classes,
                                     k=self.cfg.knn_k, sigma=self.cfg.sigma)
        self._picture(step, train_z, test_images, test_y, test_z)
        with self.writer.as_default(step=step):
            tf.summary.scalar("eval/knn_top1_online", accuracy)
            # What monitoring costs (compare with the epoch's time).
            tf.summary.scalar("eval/online_seconds", time.time() - start)
        return accuracy

    def _picture(self, step, train_z, test_images, test_y, test_z):
        """The first test image of each class (of the subset) and its nearest training images."""
        rows = [int(np.flatnonzero(test_y == y)[0]) for y in np.unique(test_y)[:NEIGHBOUR_ROWS]]
        neighbours = visualize.nearest(test_z[rows], train_z, NEIGHBOURS)
        picture = visualize.neighbour_picture(test_images[rows], test_y[rows], *self._train,
                                              neighbours)
        with self.writer.as_default(step=step):
            tf.summary.image("monitor/nearest_neighbours", picture[None], max_outputs=1)
        self.pictured_step = step

    def at_end(self, step: int):
        """The neighbour picture (unless an online evaluation just drew it) and the projector's
        test embeddings (--projector_features, --projector_examples), at the end of training."""
        self._load()
        if self.pictured_step != step:
            test_images, test_y, _ = (a[self._online] for a in self._test)
            self._picture(step, self.features(self._train[0])[1], test_images, test_y,
                          self.features(test_images)[1])
        if self.cfg.projector_examples:
            images, labels, index = (a[self._projected] for a in self._test)
            h, z = self.features(images)
            name = f"test_{self.cfg.projector_features}"
            visualize.write_projector(self.logdir, name,
                                      h if self.cfg.projector_features == "h" else z,
                                      labels, images, index)
        self.writer.flush()
