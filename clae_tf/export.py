"""SavedModel export of the encoder (clean BN path) with serving signatures."""

import keras
import numpy as np
import tensorflow as tf

from clae_tf import augment, portable
from clae_tf.config import Config


def export(cfg: Config, model, path: str):
    """Writes a SavedModel at `path` with two endpoints, both returning {"h", "z"}:

      serve(images):       float32 (N, H, W, 3) in [0, 1]
      serve_uint8(images): uint8   (N, H, W, 3) in [0, 255]

    Images of any size are resized to --image_size and normalised (--normalize) as in training.
    The exported model is the functional copy of portable.build_encoder: single-device, without
    the adversarial BN twins (evaluation uses the clean BNs only), float32, so it loads
    anywhere, whatever strategy trained it; its variables have unique names
    (stage2_block1_conv0/kernel, ...), which keras.layers.TFSMLayer turns into its weight names.
    """
    serving = portable.build_encoder(model, cfg.image_size, cfg.normalize)
    size = cfg.image_size

    def embed(images01):
        x = tf.image.resize(images01, [size, size], antialias=True)
        return serving(x, training=False)  # {"h", "z"}; normalises inside

    archive = keras.export.ExportArchive()
    archive.track(serving)
    archive.add_endpoint("serve", embed,
                         input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    archive.add_endpoint("serve_uint8", lambda images: embed(tf.cast(images, tf.float32) / 255.0),
                         input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    archive.write_out(path, verbose=False)


def export_keras(cfg: Config, model, path: str):
    """Writes the clean encoder as a `.keras` file of standard Keras layers (portable.py).

    keras.models.load_model(path) opens it without clae-tf; it takes float32 (N, --image_size,
    --image_size, 3) images in [0, 1] (resize them first) and returns {"h", "z"}, and can be
    fine-tuned or extended like any Keras model.
    """
    portable.build_encoder(model, cfg.image_size, cfg.normalize).save(path)


def check_export(path: str, model, images_uint8: np.ndarray, normalize: str = "half") -> float:
    """Largest |difference| between the reloaded SavedModel and `model` on the same images."""
    loaded = tf.saved_model.load(path)
    out = loaded.serve_uint8(tf.constant(images_uint8))
    x = augment.normalize(tf.cast(images_uint8, tf.float32) / 255.0, normalize)
    h, z = model(x, training=False)
    return float(max(np.max(np.abs(out["h"].numpy() - h.numpy())),
                     np.max(np.abs(out["z"].numpy() - z.numpy()))))
