"""The clean encoder as a functional Keras model of standard layers only (no clae-tf code).

ContrastiveModel is a subclassed model with DualBatchNorm layers: a `.keras` file of it needs
clae_tf to load, and a SavedModel of it names every variable `clae_model/kernel:0`. The copy
built here reads the trained model's layers one by one (so convolution padding, strides, BN
epsilon, head activations follow whatever models.py does), keeps only the clean BN of each
DualBatchNorm, and gives every layer a unique name (stem_conv, stage2_block1_conv0,
stage2_block1_bn0, stage2_block1_shortcut_conv, proj_out, ...). It is what the export writes
both as `encoder.keras` and inside the SavedModel.

Input: float32 (N, image_size, image_size, 3) images in [0, 1] (resizing is the caller's job);
the --normalize mean/std is the first layer. Output: {"h": representation, "z": L2-normalised
projection}, as ContrastiveModel(normalize(x), training=False).
"""

import keras
import numpy as np

from clae_tf.data import augment
from clae_tf.method.models import ContrastiveModel, DualBatchNorm

# Every layer the copy is made of must be one of these (or models.py's padded conv, with
# `torch_pad`), rebuilt from its own config; anything else in ContrastiveModel must be
# added here, and the comparison test (tests/export_test.py) fails until it is.
_STANDARD = (keras.layers.Conv2D, keras.layers.BatchNormalization, keras.layers.Dense)


class _Copier:
    """Rebuilds layers of the trained model under new names, in float32, remembering whose
    weights each copy takes."""

    def __init__(self):
        self.pairs = []  # (copy, source) whose weights are copied once the graph is built

    def __call__(self, layer, name):
        """x -> the copy of `layer` applied to x."""
        if isinstance(layer, DualBatchNorm):
            layer = layer.clean  # the clean path only: evaluation never uses the adversarial twin
        standard = next((cls for cls in _STANDARD if isinstance(layer, cls)), None)
        if standard is None or (type(layer) is not standard and not hasattr(layer, "torch_pad")):
            raise NotImplementedError(
                f"portable.py cannot copy {layer.name} ({type(layer).__name__}): add it there")
        config = dict(layer.get_config(), name=name, dtype="float32")
        config.pop("synchronized", None)  # a single-device copy
        copy = standard.from_config(config)
        if layer.weights:
            self.pairs.append((copy, layer))
        pad, subsample = getattr(layer, "torch_pad", 0), getattr(layer, "subsample", 1)
        if subsample > 1:
            # models._Conv2D's strided 1x1 conv: keep pixels 0, s, 2s, ... (a 1x1 pool), then
            # the stride-1 conv; a fine-tuned copy then avoids the strided conv's oneDNN bug too.
            pick = keras.layers.AveragePooling2D(1, subsample, dtype="float32",
                                                 name=f"{name}_subsample")
            return lambda x: copy(pick(x))
        if not pad:
            return copy
        # models._Conv2D: PyTorch's symmetric zero padding, then a "valid" conv.
        padding = keras.layers.ZeroPadding2D(pad, dtype="float32", name=f"{name}_pad")
        return lambda x: copy(padding(x))


def build_encoder(model: ContrastiveModel, image_size: int, normalize: str = "half",
                  name: str = "clae_encoder") -> keras.Model:
    """A functional copy of `model`'s clean path, with `model`'s current weights.

    Args:
      model: a built ContrastiveModel (any strategy, with or without adversarial BNs).
      image_size: the input height and width (--image_size).
      normalize: the --normalize kind; the copy applies it to its [0, 1] inputs.
      name: the Keras model's name.

    Returns:
      A keras.Model: float32 (N, image_size, image_size, 3) in [0, 1] -> {"h", "z"}, made of
      standard Keras layers only, in float32 whatever the training precision.
    """
    copy = _Copier()
    mean, std = augment.NORMALIZATIONS[normalize]
    images = keras.Input((image_size, image_size, 3), name="images")
    x = keras.layers.Normalization(mean=list(mean), variance=list(np.square(std)),
                                   dtype="float32", name="normalize")(images)
    x = copy(model.stem_conv, "stem_conv")(x)
    x = keras.layers.ReLU(dtype="float32", name="stem_relu")(copy(model.stem_bn, "stem_bn")(x))
    if model.stem_pool is not None:  # models._MaxPool2D: PyTorch's padding, then "valid"
        pool = model.stem_pool
        # Zeros stand for its -inf: it pools ReLU outputs (>= 0) and every window holds at
        # least one real pixel, so a zero never exceeds the window's maximum.
        x = keras.layers.ZeroPadding2D(pool.torch_pad, dtype="float32", name="stem_pool_pad")(x)
        x = keras.layers.MaxPooling2D(pool.pool, pool.stride, dtype="float32",
                                      name="stem_pool")(x)
    for block in model.blocks:
        x = _block(copy, block, x)
    h = keras.layers.GlobalAveragePooling2D(dtype="float32", name="h")(x)  # (N, feature_dim)
    z = h
    if model.proj_hidden is not None:
        z = copy(model.proj_hidden, "proj_hidden")(z)
    z = copy(model.proj_out, "proj_out")(z)
    # (N, proj_dim) on the unit sphere, as ContrastiveModel's l2_normalize.
    z = keras.layers.UnitNormalization(axis=-1, dtype="float32", name="z")(z)
    encoder = keras.Model(images, {"h": h, "z": z}, name=name)
    for target, source in copy.pairs:
        target.set_weights([np.asarray(w) for w in source.get_weights()])
    return encoder


def _block(copy, block, x):
    """models._Block.call (post-activation residual block) from standard layers."""
    prefix = block.name  # stage{s}_block{b}
    out = x
    for i, (conv, bn) in enumerate(zip(block.convs, block.bns)):
        out = copy(conv, f"{prefix}_{conv.name}")(out)
        out = copy(bn, f"{prefix}_{bn.name}")(out)
        if i < len(block.convs) - 1:
            out = keras.layers.ReLU(dtype="float32", name=f"{prefix}_relu{i}")(out)
    shortcut = x
    if block.shortcut_conv is not None:
        shortcut = copy(block.shortcut_conv, f"{prefix}_shortcut_conv")(x)
        shortcut = copy(block.shortcut_bn, f"{prefix}_shortcut_bn")(shortcut)
    out = keras.layers.Add(dtype="float32", name=f"{prefix}_add")([out, shortcut])
    return keras.layers.ReLU(dtype="float32", name=f"{prefix}_out")(out)
