"""The sources of images: the bundled digits, image folders and TFDS, their subsets and reads.

A `--dataset` is one of:
  - "digits": scikit-learn's 8x8 handwritten digits (1,797 images, ships with the package, so it
    works offline); every 5th image is the test split.
  - a folder `root/{train,test}/<label>/<image>` (any size; grayscale becomes RGB);
  - a TFDS name (cifar10, cifar100, ...), read from --data_dir or downloaded.
Every source gives its images as decoded (uint8 (H, W, 3), any size) and resized to --image_size
(for evaluation: the reference's test transform Resize((size, size))), with int32 labels. What a
run reads from them (two-view pretraining batches, evaluation batches) is streams.py.

A file that cannot be decoded is named in a ClaeError by `raise_if_unreadable`. Whatever reads a
split (`_read` and `check_readable` here, the train loop, evaluate.extract) does it inside
`unreadable_named`, the one place that tells a decode error (`is_decode_error`) from any other.
"""

import contextlib
import dataclasses
import os
import re
import sys
from typing import Callable, List, Optional

import numpy as np
import tensorflow as tf

from clae_tf import ClaeError
from clae_tf.data import memory
from clae_tf.runtime.config import Config

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# tf.data's in-memory cache (host RAM) holds a split's decoded (else its resized) images up to
# this size (CIFAR-10 train is 150 MB). Not memory.MAX_CONSTANT_BYTES, which bounds what the
# pretraining stream captures as constants in its graph (the 2 GB protobuf limit): a split
# between the two is cached here and streamed one shuffled pipeline per epoch.
TF_CACHE_BYTES = 4 << 30
# What a failed read of an image file raises, eagerly or inside tf.data.
DECODE_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.DataLossError)
# An op that reads, decodes or parses stored data, as an error's message names it: inside tf.data
# "[[{{node decode_image/DecodeImage}}]]", eagerly "[Op:DecodeImage]".
_READ_OP = re.compile(r"(?:\{\{node |\[Op:)(?:[^\s/}\]]+/)*"
                      r"(?:ReadFile|Decode\w*|Parse\w*Example\w*)(?:\}\}|\])")
# What TensorFlow says of a file that is not there (a NotFoundError also names missing kernels).
_NO_FILE = "No such file or directory"


@dataclasses.dataclass
class Split:
    images: tf.data.Dataset  # (uint8 (S, S, 3), int32 label), in a fixed order.
    num_examples: int
    files: Optional[List[str]] = None  # image folders: all files, to name an unreadable one.
    labels: Optional[np.ndarray] = None  # when known without decoding (folders, digits).
    # indices -> the Split of just those examples, built without decoding the others.
    select: Optional[Callable[[np.ndarray], "Split"]] = None
    # (uint8 (H, W, 3) as decoded, int32 label), same order; None: `images` are the decoded ones.
    decoded: Optional[tf.data.Dataset] = None
    # Estimated bytes of the decoded images (None: unknown); streams.held_in_memory reads it.
    decoded_bytes: Optional[int] = None
    _memory: Optional[memory.Images] = dataclasses.field(default=None, repr=False)

    @property
    def decoded_images(self) -> tf.data.Dataset:
        """(uint8 (H, W, 3) as decoded, int32 label), in the split's order."""
        return self.decoded if self.decoded is not None else self.images

    def nbytes(self) -> Optional[int]:
        """Estimated bytes of the decoded images (None: unknown)."""
        if self.decoded_bytes is not None:
            return self.decoded_bytes
        return _static_bytes(self.decoded_images, self.num_examples)

    def read_decoded(self, size: int) -> memory.Images:
        """The decoded images in memory (memory.Images), read once, on the first call.

        Args:
          size: --image_size; images all size x size are stacked into one tensor.
        """
        if self._memory is None:
            arrays = [x for x, _ in _read(self, self.decoded_images)]
            if len(arrays) != self.num_examples:
                raise ValueError(f"expected {self.num_examples} images, read {len(arrays)}")
            self._memory = memory.load(arrays, size)
        return self._memory


@dataclasses.dataclass
class Source:
    name: str
    train: Split
    test: Split
    num_classes: int


def load(cfg: Config) -> Source:
    """Opens `cfg.dataset` and applies the --train_examples / --examples_per_class subsets."""
    if cfg.dataset == "digits":
        source = _digits(cfg.image_size)
    elif os.sep in cfg.dataset or cfg.dataset.startswith(".") or os.path.exists(cfg.dataset):
        source = _folder(cfg.dataset, cfg.image_size)
    else:
        source = _tfds(cfg.dataset, cfg.data_dir, cfg.image_size)
    if source.num_classes < 2:
        raise ClaeError(f"--dataset: {cfg.dataset} has only {source.num_classes} class(es); kNN "
                        "and linear accuracy need at least 2 (with one, every prediction is right)")
    source.train = _subset(source.train, source.num_classes, cfg.train_examples,
                           cfg.examples_per_class)
    _check_train_classes(source, cfg)
    # Training only: the pretraining stream drops the last partial batch, so a training set
    # smaller than --batch_size has no step. Evaluation and export never read it in batches of
    # --batch_size (features go in --eval_batch_size batches, the probe in --linear_batch_size).
    if cfg.mode == "train" and source.train.num_examples < cfg.batch_size:
        raise ClaeError(f"--batch_size: {cfg.batch_size} is larger than the "
                        f"{source.train.num_examples} training images of {cfg.dataset}")
    check_readable(source.test, f"the test split of {cfg.dataset}")
    return source


def _check_train_classes(source: Source, cfg: Config):
    """With labels known up front: refuse < 2 classes in the training images, warn on fewer."""
    if source.train.labels is None:
        return  # TFDS: its label feature declared num_classes (checked above)
    present = np.unique(source.train.labels)
    # --examples_per_class keeps every class that has images; --train_examples may not.
    why = (" (--train_examples takes the first images, in class order for a folder; "
           "--examples_per_class keeps every class)" if cfg.train_examples else "")
    if len(present) < 2:
        raise ClaeError(f"--{'train_examples' if why else 'dataset'}: the training images of "
                        f"{cfg.dataset} hold only {len(present)} class(es); kNN and linear "
                        f"accuracy need at least 2{why}")
    if len(present) < source.num_classes:
        print(f"warning: the training images hold {len(present)} of the {source.num_classes} "
              f"classes of {cfg.dataset}{why}", file=sys.stderr)


def check_readable(split: Split, what: str):
    """Decodes every image of `split` once, so that a corrupt file stops the run before training
    rather than after it. Small splits are cached as they decode, so evaluation reuses the work.
    """
    with unreadable_named(split, what):
        split.images.batch(256).reduce(0, lambda count, _: count + 1)


def _resize(image, size):
    image = tf.image.resize(image, [size, size], antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _finish(ds, n, size, decoded_bytes=None):
    """(images resized to (size, size, 3), images as decoded), uint8, small ones cached.

    The decoded images are cached when `decoded_bytes` (an estimate) fits the cache; the resized
    ones are then made from that cache, else cached themselves when they fit.
    """
    decoded = ds.map(lambda x, y: (x, tf.cast(y, tf.int32)))
    cached = decoded_bytes is not None and decoded_bytes <= TF_CACHE_BYTES
    if cached:
        decoded = decoded.cache()
    images = decoded.map(lambda x, y: (_resize(x, size), y), num_parallel_calls=tf.data.AUTOTUNE)
    if not cached and n * size * size * 3 <= TF_CACHE_BYTES:
        images = images.cache()
    return images, decoded


def _static_bytes(ds, n):
    """n x the bytes of one image when the dataset's images have a static shape, else None."""
    shape = ds.element_spec[0].shape
    return n * int(np.prod(shape.as_list())) if shape.is_fully_defined() else None


def _digits(size):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ClaeError("--dataset=digits needs scikit-learn (pip install scikit-learn)")
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int32)
    is_test = np.arange(len(labels)) % 5 == 0

    def split(index):
        ds = tf.data.Dataset.from_tensor_slices((images[index], labels[index]))
        nbytes = _static_bytes(ds, len(index))
        resized, decoded = _finish(ds, len(index), size, nbytes)
        return Split(resized, len(index), labels=labels[index],
                     select=lambda i: split(index[i]), decoded=decoded, decoded_bytes=nbytes)

    return Source("digits", split(np.flatnonzero(~is_test)), split(np.flatnonzero(is_test)), 10)


def _folder(root, size):
    if not os.path.isdir(root):
        raise ClaeError(f"--dataset: image folder {root} does not exist")
    splits = {}
    for split_name in ("train", "test"):
        split_dir = os.path.join(root, split_name)
        if not os.path.isdir(split_dir):
            raise ClaeError(f"--dataset: {root} has no '{split_name}' folder; expected "
                            f"{root}/train/<label>/<image> and {root}/test/<label>/<image>")
        splits[split_name] = split_dir
    classes = sorted(d for d in os.listdir(splits["train"])
                     if os.path.isdir(os.path.join(splits["train"], d)))
    if not classes:
        raise ClaeError(f"--dataset: {splits['train']} has no class folders (<label>/<image>)")
    _warn_test_only_classes(splits["test"], classes)
    out = {}
    for split_name, split_dir in splits.items():
        files, labels = [], []
        for label, cls in enumerate(classes):
            cls_dir = os.path.join(split_dir, cls)
            if not os.path.isdir(cls_dir):
                continue
            names = _images_in(cls_dir)
            files += [os.path.join(cls_dir, f) for f in names]
            labels += [label] * len(names)
        if not files:
            raise ClaeError(f"--dataset: no images ({', '.join(IMAGE_EXTENSIONS)}) in {split_dir}")
        out[split_name] = _file_split(files, np.array(labels, np.int32), size)
    return Source(os.path.basename(os.path.normpath(root)), out["train"], out["test"], len(classes))


def _images_in(directory):
    return sorted(f for f in os.listdir(directory) if f.lower().endswith(IMAGE_EXTENSIONS))


def _warn_test_only_classes(test_dir, classes):
    """A test class without a train/ folder cannot be predicted: its images are left out.

    A warning rather than an error: the accuracy over the other classes is still a measurement
    (and a held-out class may be deliberate), but the user must know the test set shrank.
    """
    extra = {}
    for d in sorted(os.listdir(test_dir)):
        path = os.path.join(test_dir, d)
        if d not in classes and os.path.isdir(path) and _images_in(path):
            extra[d] = len(_images_in(path))
    if extra:
        print(f"warning: test class{'es' if len(extra) > 1 else ''} "
              f"{', '.join(f'{d!r} ({n} images)' for d, n in extra.items())} of {test_dir} "
              f"{'have' if len(extra) > 1 else 'has'} no train/ folder and "
              f"{'are' if len(extra) > 1 else 'is'} left out of the evaluation", file=sys.stderr)


def _file_split(files, labels, size):
    """Images decoded lazily from `files`; a subset only ever reads its own files."""
    ds = tf.data.Dataset.from_tensor_slices((files, labels))
    ds = ds.map(lambda f, y: (_decode(tf.io.read_file(f)), y), num_parallel_calls=tf.data.AUTOTUNE)
    nbytes = _folder_bytes(files)
    resized, decoded = _finish(ds, len(files), size, nbytes)
    return Split(resized, len(files), files, labels,
                 select=lambda i: _file_split([files[j] for j in i], labels[i], size),
                 decoded=decoded, decoded_bytes=nbytes)


def _folder_bytes(files):
    """Decoded size of a folder's images, estimated from its first image (None if unreadable:
    the error then names the file when the images are read)."""
    try:
        first = _decode(tf.io.read_file(files[0]))
    except DECODE_ERRORS:
        return None
    return len(files) * int(np.prod(first.shape))


def _decode(data):
    image = tf.io.decode_image(data, channels=3, expand_animations=False)  # gray -> RGB
    image.set_shape([None, None, 3])
    return image


def _tfds(name, data_dir, size):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ClaeError(f"--dataset: {name!r} is neither 'digits' nor an existing image folder, "
                        f"and TFDS names need tensorflow-datasets ({_missing_module(e)})")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ClaeError(f"--dataset: {name!r} is neither 'digits', an existing image folder, "
                        f"nor a TFDS dataset name")
    except ImportError as e:
        raise ClaeError(f"--dataset: TFDS dataset {name!r} needs {_missing_module(e)}")
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except Exception as e:  # network errors come in many types
            missing = _import_error(e)
            if missing is not None:  # not a network problem: the builder's own code needs it
                raise ClaeError(f"--dataset: preparing TFDS dataset {name!r} needs "
                                f"{_missing_module(missing)}")
            raise ClaeError(
                f"--dataset: TFDS dataset {name!r} is not in {builder.data_dir} and could not be "
                f"downloaded ({type(e).__name__}: {str(e).splitlines()[0][:120]}). Prepare it on a "
                f"machine with network (or pass --data_dir), or use an image folder: "
                f"--dataset=/path/with/train/<label>/<image>")
    _, label_key = builder.info.supervised_keys or ("image", "label")
    num_classes = builder.info.features[label_key].num_classes
    splits = {}
    for split_name, candidates in (("train", ("train",)), ("test", ("test", "validation"))):
        available = list(builder.info.splits.keys())
        tfds_split = next((s for s in candidates if s in available or not available), None)
        if tfds_split is None:
            raise ClaeError(f"--dataset: TFDS dataset {name!r} has no {split_name} split "
                            f"(it has {', '.join(available)})")
        ds = builder.as_dataset(split=tfds_split, as_supervised=True, shuffle_files=False)
        n = int(ds.cardinality())
        if n < 0:
            n = int(ds.reduce(0, lambda c, _: c + 1))
        nbytes = _static_bytes(ds, n)
        resized, decoded = _finish(ds, n, size, nbytes)
        splits[split_name] = Split(resized, n, decoded=decoded, decoded_bytes=nbytes)
    return Source(name, splits["train"], splits["test"], num_classes)


def _import_error(error: BaseException) -> Optional[ImportError]:
    """The ImportError (ModuleNotFoundError) that `error` is or was raised from, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ImportError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _missing_module(error: ImportError) -> str:
    if error.name:
        top = error.name.split(".")[0]
        return f"the Python module {top!r}, which is not installed (pip install {top})"
    return f"a Python module that does not import ({str(error).splitlines()[0][:120]})"


def _subset(split, num_classes, train_examples, examples_per_class):
    """The first N images, and/or the first K of each class, in the source's order."""
    if split.select is not None and (train_examples or examples_per_class):
        # Labels known from the file list (or memory): pick the examples before decoding.
        keep = np.ones(split.num_examples, bool)
        if examples_per_class:
            seen = np.zeros(num_classes, np.int64)
            for i, y in enumerate(split.labels):
                keep[i] = seen[y] < examples_per_class
                seen[y] += 1
        index = np.flatnonzero(keep)[:train_examples or None]
        return split if len(index) == split.num_examples else split.select(index)
    # TFDS: filter the decoded stream by running per-class counts.
    n = split.num_examples

    def first_per_class(ds):
        # Running per-class counts; keep an image while its class has fewer than K.
        def count(counts, example):
            _, y = example
            keep = counts[y] < examples_per_class
            return counts + tf.one_hot(y, num_classes, dtype=tf.int32), (example, keep)

        ds = ds.scan(tf.zeros([num_classes], tf.int32), count)
        # Distinct argument names: AutoGraph cannot tell two same-line lambdas with the same
        # signature apart, and warns.
        return ds.filter(lambda _, keep: keep).map(lambda example, _keep: example)

    ds, decoded = split.images, split.decoded
    if examples_per_class:
        ds = first_per_class(ds)
        decoded = first_per_class(decoded) if decoded is not None else None
        # TFDS: labels come with the images, so counting them decodes every image once.
        labels = np.array([int(y) for y in _read(split, split.images.map(lambda x, y: y))])
        n = int(sum(min(int(c), examples_per_class) for c in
                    np.bincount(labels, minlength=num_classes)))
    if train_examples:
        ds = ds.take(train_examples)
        decoded = decoded.take(train_examples) if decoded is not None else None
        n = min(n, train_examples)
    if n == split.num_examples:
        return split
    nbytes = (split.decoded_bytes * n // split.num_examples
              if split.decoded_bytes is not None else None)
    return Split(ds.cache(), n, split.files, decoded=decoded, decoded_bytes=nbytes)


def balanced_subset(labels, n: int) -> np.ndarray:
    """Indices of a fixed class-balanced subset of n examples, in split order.

    Classes take turns: first every class's first example, then every class's second, ... (by
    position in the split), so class counts differ by at most one while every class has examples
    left (with n not a multiple of the classes, the lowest labels get the extra one), and the
    subset depends only on the labels' order: the same images for every run. The subset of a
    smaller n is the first of these, so it lies inside the subset of a larger one.

    Args:
      labels: int (N,) labels of the split, in its order.
      n: how many to keep (0: none; more than N: all).
    Returns:
      int (min(n, N),) indices, ascending.
    """
    labels = np.asarray(labels)
    rank = np.zeros(len(labels), np.int64)  # position of each example within its class
    seen = {}
    for i, y in enumerate(labels.tolist()):
        rank[i] = seen.get(y, 0)
        seen[y] = rank[i] + 1
    order = np.lexsort((labels, rank))  # rank 0 of every class, then rank 1, ... (stable)
    return np.sort(order[:max(n, 0)])


def read_images(split: Split, index=None, batch_size: int = 1000):
    """The uint8 images (N, S, S, 3) and int64 labels (N,) of `split` as numpy arrays, in order.

    Args:
      split: the split to read.
      index: ascending indices of the examples to keep (None: all). A split that can select
        (image folders, digits) decodes only those; a TFDS split decodes every image once.
      batch_size: images decoded per tf.data batch.
    Returns:
      (images, labels); a file that cannot be decoded is named in a ClaeError.
    """
    if index is not None and split.select is not None:
        return read_images(split.select(np.asarray(index)), batch_size=batch_size)
    batches = _read(split, split.images.batch(batch_size))
    images = np.concatenate([x for x, _ in batches])
    labels = np.concatenate([y for _, y in batches]).astype(np.int64)
    return (images, labels) if index is None else (images[index], labels[index])


def read_balanced(split: Split, n: int):
    """`read_images` of the `balanced_subset` of n examples of `split`.

    Returns:
      (uint8 images, int64 labels, the subset's indices in the split).
    """
    if split.labels is None:  # TFDS: labels only by decoding, so decode the whole split once
        images, labels = read_images(split)
        index = balanced_subset(labels, n)
        return images[index], labels[index], index
    index = balanced_subset(split.labels, n)
    return (*read_images(split, index), index)


def find_unreadable(split: Split) -> Optional[str]:
    """The first file of `split` that cannot be decoded (used only after a decode error)."""
    for path in split.files or []:
        try:
            _decode(tf.io.read_file(path))
        except DECODE_ERRORS:
            return path
    return None


def is_decode_error(error: BaseException) -> bool:
    """Whether `error` says that stored data could not be read: a DataLossError (a corrupt file
    or record), a NotFoundError of a missing file, or a DECODE_ERRORS error raised by an op that
    reads, decodes or parses data (_READ_OP). Any other InvalidArgumentError (a shape or dtype
    bug) or NotFoundError (a missing kernel) is not one."""
    message = str(error)
    if isinstance(error, tf.errors.DataLossError):
        return True
    if isinstance(error, tf.errors.NotFoundError) and _NO_FILE in message:
        return True
    return isinstance(error, DECODE_ERRORS) and bool(_READ_OP.search(message))


def raise_if_unreadable(split: Split, error: Exception, what: Optional[str] = None):
    """Turns a decode error deep in tf.data into a one-line ClaeError naming the file.

    The one translation of decode errors (through `unreadable_named`). An error that is not a
    decode error (is_decode_error) is raised unchanged, without looking at a single file.

    Args:
      split: the split being read; error: what reading it raised (DECODE_ERRORS).
      what: names the split when no file of it is to blame (TFDS has no files); None: then
        `error` itself is raised.
    """
    if not is_decode_error(error):
        raise error
    path = find_unreadable(split)
    if path is not None:
        raise ClaeError(f"--dataset: cannot read image {path}")
    if what is None:
        raise error
    raise ClaeError(f"--dataset: cannot read {what} ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:120]})")


@contextlib.contextmanager
def unreadable_named(split: Split, what: Optional[str] = None):
    """Runs its body, a read of `split`'s images; a decode error raised there becomes the
    ClaeError of raise_if_unreadable, any other error leaves it as it came (same object and
    traceback)."""
    try:
        yield
    except DECODE_ERRORS as e:
        raise_if_unreadable(split, e, what)


def _read(split: Split, ds: tf.data.Dataset) -> list:
    """Every element of `ds`, a dataset of `split`'s images, as numpy, in order; a file that
    cannot be decoded is named in a ClaeError."""
    with unreadable_named(split):
        return list(ds.as_numpy_iterator())
