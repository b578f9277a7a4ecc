"""SavedModel export of the encoder (clean BN path) and of encoder + linear probe (logits)."""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from clae_tf import augment, models
from clae_tf.config import Config


def export(cfg: Config, model, path: str):
    """Writes a SavedModel at `path` with two endpoints, both returning {"h", "z"}:

      serve(images):       float32 (N, H, W, 3) in [0, 1]
      serve_uint8(images): uint8   (N, H, W, 3) in [0, 255]

    Images of any size are resized to --image_size and normalised (--normalize) as in training.
    The exported model is a fresh
    single-device copy without the adversarial BN twins (evaluation uses the clean BNs only), so
    it loads anywhere, whatever strategy trained it.
    """
    serving = _serving_copy(cfg, model)

    def embed(images01):
        h, z = serving(_preprocess(cfg, images01), training=False)
        return {"h": h, "z": z}

    archive = keras.export.ExportArchive()
    archive.track(serving)
    archive.add_endpoint("serve", embed,
                         input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    archive.add_endpoint("serve_uint8", lambda images: embed(tf.cast(images, tf.float32) / 255.0),
                         input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    archive.write_out(path, verbose=False)


def export_probe(cfg: Config, model, probe: dict, path: str):
    """Writes the encoder + linear probe classifier as a SavedModel at `path`, one endpoint:

      serve(images): float32 (N, H, W, 3) in [0, 1] -> float32 logits (N, num_classes)

    resized and normalised as `export`, clean BNs in inference mode, the probe on h or z (as it
    was trained). Differentiable end to end, so an attack library can attack it in pixel space
    (what clae_tf/robust.py does in-process).

    Args:
      cfg: the run's Config; model: the trained encoder.
      probe: evaluate.load_probe(<workdir>/probe.npz).
      path: output directory.
    """
    serving = _serving_copy(cfg, model)
    kernel, bias = probe["kernel"], probe["bias"]
    layer = keras.layers.Dense(kernel.shape[1], dtype="float32", name="probe")
    layer.build((None, kernel.shape[0]))
    layer.set_weights([kernel, bias])
    index = {"h": 0, "z": 1}[probe["feature"]]

    def logits(images01):
        features = serving(_preprocess(cfg, images01), training=False)[index]
        return layer(tf.cast(features, tf.float32))

    archive = keras.export.ExportArchive()
    archive.track(serving)
    archive.track(layer)
    archive.add_endpoint("serve", logits,
                         input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    archive.write_out(path, verbose=False)


def _serving_copy(cfg: Config, model):
    """A fresh single-device copy of the clean path (no adversarial BNs) with model's weights."""
    serving = models.build_model(dataclasses.replace(cfg, adversarial=False, sync_bn=False))
    source = {v.path: v for v in model.variables}
    for v in serving.variables:
        v.assign(source[v.path].numpy())
    return serving


def _preprocess(cfg: Config, images01):
    """[0, 1] images of any size -> the model's input: resized to --image_size, normalised."""
    x = tf.image.resize(images01, [cfg.image_size, cfg.image_size], antialias=True)
    return augment.normalize(x, cfg.normalize)


def check_export(path: str, model, images_uint8: np.ndarray, normalize: str = "half") -> float:
    """Largest |difference| between the reloaded SavedModel and `model` on the same images."""
    loaded = tf.saved_model.load(path)
    out = loaded.serve_uint8(tf.constant(images_uint8))
    x = augment.normalize(tf.cast(images_uint8, tf.float32) / 255.0, normalize)
    h, z = model(x, training=False)
    return float(max(np.max(np.abs(out["h"].numpy() - h.numpy())),
                     np.max(np.abs(out["z"].numpy() - z.numpy()))))
