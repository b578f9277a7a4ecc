"""SavedModel export of the encoder (clean BN path) and of encoder + linear probe (logits)."""

import contextlib
import json
import os
import shutil
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from clae_tf.data import augment
from clae_tf.job import model_card, portable
from clae_tf.runtime import files, signals
from clae_tf.runtime.config import Config
from clae_tf.runtime.workdir import (
    ENCODER_KERAS,
    EXPORT_STAGING,
    EXPORTS,
    MANIFEST,
    PROBE_SAVED_MODEL,
    SAVED_MODEL,
)

# Dtypes each endpoint is traced for. A SavedModel endpoint converts a NumPy argument to its
# signature's dtype without a word (measured, TF 2.21: serve(uint8 array) ran on 0..255 as if
# 0..1, serve_uint8(float array) truncated 0.5 to 0), so each endpoint is instead a function
# traced once per dtype: the restored function picks the trace by the argument's own dtype, the
# right ones embed, the usual wrong ones fail with a message, any other finds no trace (an error
# that lists the accepted dtypes). The first dtype is the one of the `signatures` entries.
_ACCEPTS = {"serve": (tf.float32, tf.float64, tf.float16), "serve_uint8": (tf.uint8,)}
_REFUSES = {"serve": (tf.uint8, tf.int32, tf.int64),
            "serve_uint8": (tf.float32, tf.float64, tf.float16, tf.int32, tf.int64)}
_HOW = {"serve": "float images in [0, 1]; for uint8 images in [0, 255] use serve_uint8",
        "serve_uint8": "uint8 images in [0, 255]; for float images in [0, 1] use serve"}
# serve's inputs may stray a little outside [0, 1] (a user's own resampling overshoots); a
# uint8 image read as floats goes far beyond.
_RANGE_SLACK = 0.01


def export(cfg: Config, model, path: str, encoder=None):
    """Writes a SavedModel at `path` with two endpoints, both returning {"h", "z"}:

      serve(images):       float32 (N, H, W, 3) in [0, 1] (float64 and float16 are cast)
      serve_uint8(images): uint8   (N, H, W, 3) in [0, 255]

    Images of any size are resized to --image_size and normalised (--normalize) as in training.
    A wrong dtype fails (InvalidArgumentError naming the endpoint to use) instead of being cast,
    and so does a wrong shape (one image without the batch axis, 1 or 4 channels, 0 x 0 pixels);
    serve also fails on values outside [0, 1] (by more than 0.01), which catches 0..255 images
    that reach it as floats (e.g. through `signatures`, which do cast NumPy arguments), and on
    NaN or infinite values. An empty batch (N = 0) gives empty outputs, (0, D).
    The exported model is the functional copy of portable.build_encoder: single-device, without
    the adversarial BN twins (evaluation uses the clean BNs only), float32, so it loads
    anywhere, whatever strategy trained it; its variables have unique names
    (stage2_block1_conv0/kernel, ...), which keras.layers.TFSMLayer turns into its weight names.
    """
    serving = _encoder(cfg, model, encoder)
    size = cfg.image_size

    def embed(images01):
        x = tf.image.resize(images01, [size, size], antialias=True)
        return serving(x, training=False)  # {"h", "z"}; normalises inside

    def empty():
        return {k: tf.zeros([0, serving.output[k].shape[-1]]) for k in ("h", "z")}

    archive = keras.export.ExportArchive()
    archive.track(serving)
    _add_endpoints(archive, embed, empty)
    archive.write_out(path, verbose=False)


def _add_endpoints(archive, fn, empty):
    """Adds serve (float images in [0, 1]) and serve_uint8 to `archive`, with their input checks.

    Args:
      archive: a keras.export.ExportArchive tracking what `fn` uses.
      fn: float32 images (N, H, W, 3) in [0, 1] -> outputs (tensors with N rows).
      empty: () -> the outputs of an empty batch (0 rows), without running the model.
    """
    def serve(images):
        images = tf.cast(images, tf.float32)
        # Checked before the range, and by name: a NaN would otherwise fail the range check
        # with a message about the range ("from nan to ..."), or pass it where reductions skip it.
        finite = tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(images)), [
            f"serve: takes {_HOW['serve']}; got",
            tf.reduce_sum(tf.cast(~tf.math.is_finite(images), tf.int32)),
            "NaN or infinite values"])
        with tf.control_dependencies([finite]):
            in_range = tf.logical_and(tf.reduce_min(images) >= -_RANGE_SLACK,
                                      tf.reduce_max(images) <= 1 + _RANGE_SLACK)
            check = tf.debugging.Assert(in_range, [
                f"serve: takes {_HOW['serve']}; got values from", tf.reduce_min(images), "to",
                tf.reduce_max(images)])
        with tf.control_dependencies([check]):
            return fn(tf.identity(images))

    def serve_uint8(images):
        return fn(tf.cast(images, tf.float32) / 255.0)

    for name, f in (("serve", serve), ("serve_uint8", serve_uint8)):
        archive.add_endpoint(name, _dtype_checked(name, f, empty))


def _dtype_checked(name, fn, empty):
    """`fn` as a tf.function traced for the dtypes `name` accepts and for the usual wrong ones,
    with the shape checked too: (N, H, W, 3) images with H, W >= 1, else an InvalidArgumentError
    that says so (not TensorFlow's "Could not find matching concrete function" or an error from
    inside the model). An empty batch returns empty() without running `fn` (TF 2.21's CPU
    convolution returns its input unchanged on an empty batch, and the next layer then fails on
    its shape)."""
    wrong_shape = f"{name}: takes images of shape (N, H, W, 3) with H, W >= 1; got shape"

    def refuse(message):
        check = tf.debugging.Assert(False, message, summarize=8)  # a shape whole, not [2 16 16...]
        with tf.control_dependencies([check]):
            return tf.nest.map_structure(tf.identity, empty())

    @tf.function(autograph=False)
    def endpoint(images):
        if images.dtype not in _ACCEPTS[name]:
            # Traced for a wrong dtype, any shape: the model never runs, the call fails.
            return refuse([f"{name}: takes {_HOW[name]}; got {images.dtype.name} images"])
        if images.shape.rank is None:
            # Traced for any shape after the (N, H, W, 3) traces, and a call runs the first trace
            # that fits: this one gets the other ranks and channel counts only.
            return refuse([wrong_shape, tf.shape(images)])
        sized = tf.debugging.Assert(tf.reduce_all(tf.shape(images)[1:3] >= 1),
                                    [wrong_shape, tf.shape(images)], summarize=8)
        with tf.control_dependencies([sized]):
            return tf.cond(tf.shape(images)[0] > 0, lambda: fn(images), empty)

    for dtype in _ACCEPTS[name]:  # the first trace becomes the signature
        endpoint.get_concrete_function(tf.TensorSpec([None, None, None, 3], dtype))
    for dtype in _REFUSES[name] + _ACCEPTS[name]:
        endpoint.get_concrete_function(tf.TensorSpec(None, dtype))
    return endpoint


def export_probe(cfg: Config, model, probe: dict, path: str, encoder=None):
    """Writes the encoder + linear probe classifier as a SavedModel at `path`, two endpoints:

      serve(images):       float32 (N, H, W, 3) in [0, 1] -> float32 logits (N, num_classes)
      serve_uint8(images): uint8   (N, H, W, 3) in [0, 255] -> the same

    resized and normalised as `export`, clean BNs in inference mode, the probe on h or z (as it
    was trained), with the same input checks as `export`'s endpoints (dtype, shape, range, NaN) and
    (0, num_classes) logits for an empty batch. Differentiable end to end, so an attack library
    can attack it in pixel space (what clae_tf/robust.py does in-process).

    Args:
      cfg: the run's Config; model: the trained encoder.
      probe: evaluate.load_probe(<workdir>/probe.npz).
      path: output directory.
    """
    serving = _encoder(cfg, model, encoder)
    kernel, bias = probe["kernel"], probe["bias"]
    layer = keras.layers.Dense(kernel.shape[1], dtype="float32", name="probe")
    layer.build((None, kernel.shape[0]))
    layer.set_weights([kernel, bias])
    size = cfg.image_size

    def logits(images01):
        x = tf.image.resize(images01, [size, size], antialias=True)
        features = serving(x, training=False)[probe["feature"]]  # normalises inside
        return layer(tf.cast(features, tf.float32))

    archive = keras.export.ExportArchive()
    archive.track(serving)
    archive.track(layer)
    _add_endpoints(archive, logits, lambda: tf.zeros([0, kernel.shape[1]]))
    archive.write_out(path, verbose=False)


def write_exports(cfg: Config, model, step: int, run_dir: str, probe: Optional[dict] = None):
    """Writes the exports of `model` (the checkpoint of `step`) into `run_dir`, each whole or not
    at all, and all of the same step.

    Everything is written into a staging directory beside them first (`export.<pid>.tmp`; a stop
    meanwhile leaves the previous exports as they were and removes it, a kill -9 leaves it for
    the next export to remove), then renamed into place with Ctrl-C and SIGTERM held back
    (signals.held), and the manifest (export.json: the step and the exports of it) is written
    last, then the model card (README.md, model_card.py) from the run's flags and results.
    Without a probe, a probe export left by an earlier export is kept if the manifest says it
    is of this step, else removed in the same go: it would classify with another encoder than
    saved_model's.

    Args:
      cfg: the run's Config; model: the trained encoder; step: its checkpoint's step.
      run_dir: the workdir.
      probe: evaluate.load_probe of the probe trained on this step's encoder, or None.
    Returns:
      {"paths": {export name: its path} of the exports of `step` now in run_dir,
       "removed": {export name: its step (None if unknown)} of the stale ones removed}.
    """
    for name in EXPORTS + (EXPORT_STAGING, MANIFEST):
        files.remove_leftovers(os.path.join(run_dir, name))
    staging = files.temporary_sibling(os.path.join(run_dir, EXPORT_STAGING))
    try:
        signals.check()  # safe points: before each export is written into staging
        with _staged(run_dir, SAVED_MODEL, staging):
            os.makedirs(staging)
            encoder = portable.build_encoder(model, cfg.image_size, cfg.normalize)  # one for all
            export(cfg, model, os.path.join(staging, SAVED_MODEL), encoder)
        signals.check()
        with _staged(run_dir, ENCODER_KERAS, staging):
            export_keras(cfg, model, os.path.join(staging, ENCODER_KERAS), encoder)
        signals.check()
        if probe is not None:
            with _staged(run_dir, PROBE_SAVED_MODEL, staging):
                export_probe(cfg, model, probe, os.path.join(staging, PROBE_SAVED_MODEL),
                             encoder)
        written = [name for name in EXPORTS if os.path.lexists(os.path.join(staging, name))]
        previous = read_manifest(run_dir) or {}
        kept = [name for name in EXPORTS if name not in written and previous.get("step") == step
                and name in previous["exports"]]  # of this very step: still right
        removed = {name: previous.get("step") for name in EXPORTS
                   if name not in written + kept and os.path.lexists(os.path.join(run_dir, name))}
        manifest = os.path.join(run_dir, MANIFEST)
        with signals.held():
            # No manifest while the exports are being swapped: one that failed (or was killed
            # -9) halfway leaves exports whose step nothing claims, never a wrong claim.
            if os.path.lexists(manifest):
                files.remove_path(manifest)
            for name in written:
                files.replace_path(os.path.join(staging, name), os.path.join(run_dir, name))
            for name in removed:
                files.remove_path(os.path.join(run_dir, name))
            files.write_atomic(manifest, json.dumps({"step": step, "exports": written + kept},
                                                    indent=2), "the exports' manifest")
        model_card.write(run_dir, step, written + kept)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # empty unless something failed
    return {"paths": {name: os.path.join(run_dir, name) for name in written + kept},
            "removed": removed}


@contextlib.contextmanager
def _staged(run_dir: str, name: str, staging: str):
    """Around the writing of export `name` into `staging`: a full disk removes `staging` and
    is one line naming the export's place in `run_dir`, with the size of the one there now as
    the space needed (files.writing)."""
    path = os.path.join(run_dir, name)
    with files.writing(path, "the export", needed=lambda: files.tree_bytes(path),
                       cleanup=(staging,)), signals.scratch(staging):  # a hard exit removes it
        yield


def read_manifest(run_dir: str) -> Optional[dict]:
    """The manifest of the exports in `run_dir` ({"step", "exports"}) if every export it lists
    is there, else None (no export yet, or one from before manifests: nothing says its step)."""
    manifest = files.read_json(os.path.join(run_dir, MANIFEST))
    if manifest is None or not all(os.path.lexists(os.path.join(run_dir, name))
                                   for name in manifest.get("exports", ())):
        return None
    return manifest


def export_keras(cfg: Config, model, path: str, encoder=None):
    """Writes the clean encoder as a `.keras` file of standard Keras layers (portable.py).

    keras.models.load_model(path) opens it without clae-tf; it takes float32 (N, --image_size,
    --image_size, 3) images in [0, 1] (resize them first) and returns {"h", "z"}, and can be
    fine-tuned or extended like any Keras model.
    """
    _encoder(cfg, model, encoder).save(path)


def check_export(path: str, model, images_uint8: np.ndarray, normalize: str = "half") -> float:
    """Largest |difference| between the reloaded SavedModel and `model` on the same images."""
    loaded = tf.saved_model.load(path)
    out = loaded.serve_uint8(tf.constant(images_uint8))
    x = augment.normalize(tf.cast(images_uint8, tf.float32) / 255.0, normalize)
    h, z = model(x, training=False)
    return float(max(np.max(np.abs(out["h"].numpy() - h.numpy())),
                     np.max(np.abs(out["z"].numpy() - z.numpy()))))


def _encoder(cfg: Config, model, encoder=None):
    """`encoder` (a portable.build_encoder copy of `model`, shared by the exports of one run),
    or a new one."""
    if encoder is not None:
        return encoder
    return portable.build_encoder(model, cfg.image_size, cfg.normalize)
