"""views.py: the two views of a batch, and the crops of images that are not --image_size square.

ImageNet-size data: crops from the decoded image as it is (the reference's RandomResizedCrop on
the loaded image), each seeded by its position in the epoch.
"""

import os

import numpy as np
import tensorflow as tf

from clae_tf.data import augment, sources

from conftest import pretrain_batches, tiny_config


def _ramp_folder(root, sizes=((60, 120), (100, 50), (60, 120), (90, 70))):
    """Images whose red channel is 2 x column and green 2 x row: a crop's box can be read back
    from its pixels. Sizes (H, W) of different aspect ratios (none square)."""
    for i, (h, w) in enumerate(sizes * 2):
        rows, cols = np.mgrid[0:h, 0:w]
        image = np.stack([2 * cols, 2 * rows, np.full_like(rows, 128)], -1).astype(np.uint8)
        for split in ("train", "test"):
            path = os.path.join(root, split, f"c{i % 2}", f"{i}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tf.io.write_file(path, tf.io.encode_png(image))


def _crop_only(monkeypatch):
    """--augment=uel without colour jitter and grayscale: views are crop + flip only."""
    monkeypatch.setitem(augment.AUGMENTATIONS, "uel", dict(
        crop_scale=(0.2, 1.0), jitter=(0.0, 0.0, 0.0, 0.0), jitter_prob=0.0, gray_prob=0.0))


def test_pretrain_crops_keep_the_aspect_ratio_of_non_square_images(tmp_path, monkeypatch):
    """The reference's RandomResizedCrop sees the loaded image: a crop's aspect ratio is in
    [3/4, 4/3] in the image's own pixels (a crop of a copy squashed to a square would be
    stretched by the image's aspect ratio, 2:1 here)."""
    root = tmp_path / "ramps"
    _ramp_folder(str(root))
    _crop_only(monkeypatch)
    cfg = tiny_config(dataset=str(root), image_size=16, batch_size=4, augment="uel",
                      normalize="half")
    source = sources.load(cfg)
    ratios = []
    for x1, x2 in pretrain_batches(source.train, cfg, epoch=0, n=2):
        for view in np.concatenate([x1, x2]) * 0.5 + 0.5:  # back to [0, 1]
            col = view[..., 0] * 255 / 2  # the column of the original image each pixel shows
            row = view[..., 1] * 255 / 2
            mid = slice(4, 12)  # away from the borders (antialiasing filter edge effects)
            cw = abs(np.polyfit(np.arange(16)[mid], col[8, mid], 1)[0]) * 16
            ch = abs(np.polyfit(np.arange(16)[mid], row[mid, 8], 1)[0]) * 16
            ratios.append(cw / ch)
            assert col.min() >= -0.5 and row.min() >= -0.5
    ratios = np.array(ratios)
    assert len(ratios) == 16
    assert np.all((ratios > 0.75 * 0.9) & (ratios < 4 / 3 * 1.1)), ratios


def test_pretrain_views_of_images_of_many_sizes_resume_exactly(tmp_path):
    root = tmp_path / "ramps"
    _ramp_folder(str(root))
    cfg = tiny_config(dataset=str(root), image_size=16, batch_size=2)
    source = sources.load(cfg)
    full = pretrain_batches(source.train, cfg, epoch=1, n=4)
    resumed = pretrain_batches(source.train, cfg, epoch=1, start_batch=2, n=2)
    assert len(full) == 4 and all(x.shape == (2, 16, 16, 3) for b in full for x in b)
    for (a1, a2), (b1, b2) in zip(full[2:], resumed):
        np.testing.assert_array_equal(a1, b1)
        np.testing.assert_array_equal(a2, b2)
    assert not np.allclose(full[0][0], full[0][1])


def test_square_images_at_image_size_keep_their_batch_crops(tmp_path):
    """A folder of image_size-square images (CIFAR as PNGs) goes through the per-image path,
    which must give exactly the views of a dataset known to be square (TFDS CIFAR), i.e. the
    crops of whole batches as before per-image crops existed."""
    root = tmp_path / "squares"
    rng = np.random.default_rng(0)
    for c in range(2):
        for i in range(6):
            for split in ("train", "test"):
                path = os.path.join(root, split, f"c{c}", f"{i}.png")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tf.io.write_file(path, tf.io.encode_png(
                    rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)))
    cfg = tiny_config(dataset=str(root), image_size=16, batch_size=4)
    folder = sources.load(cfg).train
    assert folder.decoded.element_spec[0].shape.as_list() == [None, None, 3]
    examples = [(x.numpy(), int(y.numpy())) for x, y in folder.images]
    images = np.stack([x for x, _ in examples])
    labels = np.array([y for _, y in examples], np.int32)
    static = sources.Split(tf.data.Dataset.from_tensor_slices((images, labels)), len(labels))
    for start in (0, 1):
        for (a1, a2), (b1, b2) in zip(pretrain_batches(folder, cfg, 1, start),
                                      pretrain_batches(static, cfg, 1, start)):
            np.testing.assert_array_equal(a1, b1)
            np.testing.assert_array_equal(a2, b2)
