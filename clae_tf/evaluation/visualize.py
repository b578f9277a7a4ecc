"""Pictures of a representation: the nearest-neighbour grid and TensorBoard's embedding projector.

Pure functions on numpy arrays (uint8 images, float features, int labels) and files; monitor.py
decides what to show and when.
"""

import math
import os

import numpy as np
import tensorflow as tf
from tensorboard.plugins import projector

from clae_tf.runtime import files, signals

# Neighbour picture: a frame says whether a neighbour has the query's label.
GREEN = (0, 200, 0)  # same label as the query
RED = (220, 0, 0)  # another label
QUERY = (128, 128, 128)  # the query's own frame
BACKGROUND = 255  # white between tiles
BORDER = 2  # frame width in pixels
GAP = 2  # background between tiles
# The projector: files under <logdir>/projector, the config at the logdir root, where
# TensorBoard's projector plugin looks for it (the run "." of `tensorboard --logdir=<logdir>`).
PROJECTOR_DIR = "projector"
# The projector's WebGL sprite is at most this many pixels on a side.
MAX_SPRITE_PIXELS = 8192


def nearest(query_z, bank_z, k):
    """Indices (Q, k) of the k most similar rows of bank_z (cosine: rows are L2-normalised),
    most similar first (ties: the lower index first)."""
    sim = np.asarray(query_z, np.float32) @ np.asarray(bank_z, np.float32).T  # (Q, N)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def neighbour_picture(query_images, query_labels, bank_images, bank_labels, neighbours):
    """One image: each query (a row) followed by its nearest bank images, framed by label.

    Geometry (S = image size, t = S + 2 * BORDER, c = t + GAP): tile (r, j) -- j = 0 the query,
    j >= 1 its j-th neighbour -- is the t x t square whose top-left pixel is
    (GAP + r * c, GAP + j * c + (S // 2 if j else 0)): a wider gap of S // 2 sets the queries
    apart. Its outer BORDER pixels are the frame: QUERY for the query, GREEN when the neighbour's
    label is the query's, RED otherwise; the rest is BACKGROUND.

    Args:
      query_images: uint8 (Q, S, S, 3).
      query_labels: int (Q,).
      bank_images: uint8 (N, S, S, 3), the images the neighbours are taken from.
      bank_labels: int (N,).
      neighbours: int (Q, K) indices into the bank (nearest first).
    Returns:
      uint8 (GAP + Q * c, GAP + (K + 1) * c + S // 2, 3).
    """
    q, k = neighbours.shape
    s = query_images.shape[1]
    t, c, sep = s + 2 * BORDER, s + 2 * BORDER + GAP, s // 2
    out = np.full((GAP + q * c, GAP + (k + 1) * c + sep, 3), BACKGROUND, np.uint8)

    def put(r, j, image, colour):
        y, x = GAP + r * c, GAP + j * c + (sep if j else 0)
        out[y:y + t, x:x + t] = colour
        out[y + BORDER:y + BORDER + s, x + BORDER:x + BORDER + s] = image

    for r in range(q):
        put(r, 0, query_images[r], QUERY)
        for j, i in enumerate(neighbours[r], start=1):
            put(r, j, bank_images[i], GREEN if bank_labels[i] == query_labels[r] else RED)
    return out


def sprite(images):
    """Thumbnails in a square grid, row-major, as the projector reads a sprite.

    Args:
      images: uint8 (N, S, S, 3).
    Returns:
      (uint8 (m * d, m * d, 3) with m = ceil(sqrt(N)) and empty cells black, d): d is the
      thumbnail size, S or less so that the sprite stays within MAX_SPRITE_PIXELS.
    """
    n, s = len(images), images.shape[1]
    m = max(1, math.ceil(math.sqrt(n)))
    d = min(s, MAX_SPRITE_PIXELS // m)
    if d != s:
        images = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(
            images, [d, d], antialias=True)), 0, 255), tf.uint8).numpy()
    grid = np.zeros((m * m, d, d, 3), np.uint8)
    grid[:n] = images
    return grid.reshape(m, m, d, d, 3).transpose(0, 2, 1, 3, 4).reshape(m * d, m * d, 3), d


def write_projector(logdir, name, features, labels, images, index):
    """Writes embeddings so that TensorBoard's Projector tab shows them with labels and images.

    Files: <logdir>/projector_config.pbtxt, and under <logdir>/projector/: tensors.tsv (one row
    of features per line), metadata.tsv (a header, then label and split index per line) and
    sprite.png. Paths in the config are relative to the logdir, as the plugin requires.

    Args:
      logdir: the TensorBoard log directory of the run.
      name: the tensor's name in the projector (e.g. "test_z").
      features: float (N, D).
      labels: int (N,).
      images: uint8 (N, S, S, 3), the thumbnails.
      index: int (N,), each example's index in its split (shown next to the label).
    Returns:
      The path of projector_config.pbtxt.
    """
    directory = os.path.join(logdir, PROJECTOR_DIR)
    config_path = os.path.join(logdir, "projector_config.pbtxt")
    # A full disk removes the projector's files: a half-replaced set would mislabel the points;
    # a stop waits for them (a few small files).
    with signals.held(), files.writing(directory, "TensorBoard's projector files",
                                       cleanup=(directory, config_path)):
        os.makedirs(directory, exist_ok=True)
        np.savetxt(os.path.join(directory, "tensors.tsv"), np.asarray(features, np.float32),
                   delimiter="\t", fmt="%.6g")
        with open(os.path.join(directory, "metadata.tsv"), "w") as f:
            f.write("label\tindex\n")  # two columns: the projector wants a header line
            f.writelines(f"{int(y)}\t{int(i)}\n" for y, i in zip(labels, index))
        grid, d = sprite(images)
        tf.io.write_file(os.path.join(directory, "sprite.png"), tf.io.encode_png(grid))
        config = projector.ProjectorConfig()
        embedding = config.embeddings.add()
        embedding.tensor_name = name
        embedding.tensor_path = f"{PROJECTOR_DIR}/tensors.tsv"
        embedding.metadata_path = f"{PROJECTOR_DIR}/metadata.tsv"
        embedding.sprite.image_path = f"{PROJECTOR_DIR}/sprite.png"
        embedding.sprite.single_image_dim.extend([d, d])
        projector.visualize_embeddings(logdir, config)
    return config_path
