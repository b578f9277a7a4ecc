"""The --augment sets built from keras-cv 0.9 layers (--augment_impl=keras_cv), an alternative to
augment.py for users who want Keras-native preprocessing layers.

What it cannot promise (docs/methods.md, "--augment_impl"):
  - Exact resume and reproducibility. keras-cv's layers draw from stateful generators
    (tf.random.Generator, seeded from --seed) and from TF's global seed (its factor samplers), so a
    view depends on how many batches the layer saw before, in which order tf.data's parallel map
    ran them: a resumed run, or the same run twice, does not see the same views. augment.py's
    views are a pure function of (seed, epoch, batch).
  - The reference's semantics. Each torchvision parameter is mapped to keras-cv's closest
    setting, and where keras-cv differs it is said below (`layers`).
  - The crop from the image as decoded: this path crops the --image_size square images (the
    eval resize) on whole batches, so larger or non-square images are resized before cropping.
"""

from clae_tf import ClaeError

# Added to --seed * 1000 for each layer's seed, so that no two layers share a generator.
_SEEDS = dict(crop=1, flip=2, jitter=3, jitter_p=4, gray_p=5)
RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's default aspect ratios (all sets)


def _keras_cv():
    """keras_cv, imported only when --augment_impl=keras_cv asks for it (an optional extra)."""
    try:
        import keras_cv
    except ImportError:
        raise ClaeError('--augment_impl: keras_cv needs keras-cv (pip install -e ".[keras-cv]")')
    return keras_cv


def saturation_factor(s):
    """keras-cv's RandomSaturation factor range for torchvision's saturation strength s.

    torchvision blends with the grayscale image by f ~ U[1 - s, 1 + s]; keras-cv multiplies the HSV
    saturation by a = k / (1 - k), k ~ U[lo, hi]. k = a / (1 + a) maps the ends of f onto a.
    """
    lo, hi = max(0.0, 1 - s), 1 + s
    return (lo / (1 + lo), hi / (1 + hi))


def layers(size, seed, crop_scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), jitter_prob=0.8,
           gray_prob=0.2):
    """One --augment set as a list of keras-cv layers, applied in order to a batch.

    The mapping from torchvision (augment.simclr_view) to keras-cv 0.9:
      - RandomResizedCrop(scale, ratio 3/4-4/3) -> RandomCropAndResize(crop_area_factor=scale,
        aspect_ratio_factor=(3/4, 4/3)): the ratio is drawn uniformly (torchvision: log-uniformly),
        a crop too large is clipped to the image (torchvision: up to 10 tries, then the centre
        crop), and the box is fractional (torchvision: whole pixels).
      - RandomHorizontalFlip -> RandomFlip("horizontal", rate 0.5): the same.
      - ColorJitter(b, c, s, h) with probability p -> RandomApply(RandomColorJitter, rate=p).
        RandomColorJitter applies brightness, contrast, saturation, hue in this fixed order
        (torchvision: a random order per image), and its factors come from TF's global seed
        (keras.utils.set_random_seed(--seed) in app.py), not from the layer's seed:
          brightness: keras-cv adds a delta (torchvision multiplies by f ~ U[1 - b, 1 + b]);
            delta ~ U[-b/2, b/2], the change torchvision makes to a mid-grey (0.5) pixel.
          contrast: factor c -> U[1 - c, 1 + c] as torchvision's, but blended with each channel's
            mean (torchvision: the mean of the grayscale image).
          saturation: scales the HSV saturation (torchvision blends with grayscale);
            saturation_factor(s) maps the ends of the range.
          hue: factor (0, 2h) -> a shift of +-U[0, h] turns, i.e. U[-h, h] as torchvision's.
      - RandomGrayscale(p 0.2) -> RandomApply(Grayscale(output_channels=3), rate=0.2)
        (tf.image.rgb_to_grayscale's weights 0.2989/0.5870/0.1140, torchvision's to 3 decimals).

    Args:
      size: output side (--image_size).
      seed: the run's --seed.
      crop_scale, jitter, jitter_prob, gray_prob: as augment.simclr_view (augment.AUGMENTATIONS).
    Returns:
      A list of keras-cv layers for (B, H, W, 3) float32 images in [0, 1].
    """
    kcv = _keras_cv().layers
    s = {k: seed * 1000 + v for k, v in _SEEDS.items()}
    b, c, sat, h = jitter
    jitter_layer = kcv.RandomColorJitter(
        value_range=(0, 1), brightness_factor=(-b / 2, b / 2), contrast_factor=c,
        saturation_factor=saturation_factor(sat), hue_factor=(0.0, 2 * h), seed=s["jitter"])
    return [
        kcv.RandomCropAndResize(target_size=(size, size), crop_area_factor=tuple(crop_scale),
                                aspect_ratio_factor=RATIO, seed=s["crop"]),
        kcv.RandomFlip("horizontal", seed=s["flip"]),
        kcv.RandomApply(jitter_layer, rate=jitter_prob, seed=s["jitter_p"]),
        kcv.RandomApply(kcv.Grayscale(output_channels=3), rate=gray_prob, seed=s["gray_p"]),
    ]


def view_fn(seed, size, augment_set):
    """A drop-in for augment.simclr_view on whole batches, made of keras-cv layers.

    The layers are built here, eagerly (not inside a tf.data trace), once, seeded from `seed`,
    and keep their state from batch to batch: both views and every batch draw from them.

    Args:
      seed: the run's --seed.
      size: --image_size.
      augment_set: the set's keyword arguments (augment.AUGMENTATIONS[--augment]).
    Returns:
      view(x, batch_seed, size, **augment_set) -> (B, size, size, 3) float32 in [0, 1] for
      x (B, H, W, 3) float32 in [0, 1]; simclr_view's signature, but `batch_seed` (the batch's
      stateless seed) and the set are ignored: keras-cv draws from the layers' own state.
    """
    import tensorflow as tf

    chain = layers(size, seed, **augment_set)

    # A tf.function, so that AutoGraph converts keras-cv's Python `if`s on tensors (RandomApply)
    # even when called from data.py's maps, which are not converted (do_not_convert).
    @tf.function(autograph=True)
    def apply(x):
        for layer in chain:
            x = layer(x)
        # keras-cv's HSV round trips can step a rounding error outside [0, 1].
        return tf.clip_by_value(tf.cast(x, tf.float32), 0.0, 1.0)

    def view(x, _batch_seed=None, _size=None, **_augment_set):
        return apply(x)

    return view
