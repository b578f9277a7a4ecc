"""Input pipelines: image folders, TFDS names, subsets and errors."""

import os
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from clae_tf import ClaeError
from clae_tf.data import sources, streams
from clae_tf.job import app

from conftest import tiny_config

# ---------------------------------------------------------------------------------------------
# Generated image folders. Every image is one constant colour, so an image can be recognised
# after decoding and resizing (a constant image stays constant under any resize).


def _write(path, value, size=(12, 12), channels=3, fmt="png"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = tf.fill([size[0], size[1], channels], tf.constant(value, tf.uint8))
    encoded = tf.io.encode_png(image) if fmt == "png" else tf.io.encode_jpeg(image, quality=100)
    tf.io.write_file(path, encoded)


def _mixed_folder(root):
    """root/{train,test}/<class>/... with PNG, JPEG, grayscale, RGBA and images of many sizes.

    Classes are created out of sorted order, and file names sort differently as strings than as
    numbers ('10.png' < '2.png'). Returns {path: (label, value)} of the expected train images.
    """
    train = {
        # class "b_dog" is created first but must get label 1.
        os.path.join(root, "train", "b_dog", "2.png"): (1, 200, dict(size=(20, 20))),
        os.path.join(root, "train", "b_dog", "10.jpg"): (1, 150, dict(size=(40, 30), fmt="jpeg")),
        os.path.join(root, "train", "b_dog", "3.png"): (1, 90, dict(size=(8, 12), channels=1)),
        os.path.join(root, "train", "a_cat", "x.PNG"): (0, 30, dict(size=(64, 64), channels=4)),
        os.path.join(root, "train", "a_cat", "a.jpeg"): (0, 60, dict(size=(5, 9), fmt="jpeg")),
    }
    for path, (_, value, kw) in train.items():
        _write(path, value, **kw)
    _write(os.path.join(root, "test", "a_cat", "t.png"), 11, size=(16, 16))
    _write(os.path.join(root, "test", "b_dog", "t.png"), 22, size=(33, 17), channels=1)
    # Not images: ignored.
    with open(os.path.join(root, "train", "a_cat", "notes.txt"), "w") as f:
        f.write("not an image")
    with open(os.path.join(root, "train", "README"), "w") as f:
        f.write("a file next to the class folders is not a class")
    return {p: (label, value) for p, (label, value, _) in train.items()}


def _grid_folder(root, classes=3, per_class=4, test_per_class=1):
    """Class c's image i (in sorted file order) has the unique value 10 * c + i + 1."""
    for c in range(classes):
        for i in range(per_class):
            _write(os.path.join(root, "train", f"class{c}", f"img{i:02d}.png"), 10 * c + i + 1)
        for i in range(test_per_class):
            _write(os.path.join(root, "test", f"class{c}", f"img{i:02d}.png"), 200 + c)


def _examples(split):
    """[(image uint8 numpy, label int)] of a split, in its order."""
    return [(x.numpy(), int(y.numpy())) for x, y in split.images]


def _values(split):
    """(constant value of each image, label) pairs of a split of constant-colour images."""
    out = []
    for x, y in _examples(split):
        out.append((int(x[0, 0, 0]), y))
    return out


def _cfg(dataset, **kw):
    kw.setdefault("batch_size", 2)
    return tiny_config(dataset=str(dataset), **kw)


def test_folder_loads_sorted_classes_labels_counts_and_converts_images(tmp_path):
    root = tmp_path / "pets"
    expected = _mixed_folder(str(root))
    source = sources.load(_cfg(root, image_size=16))

    assert source.name == "pets"
    assert source.num_classes == 2
    assert source.train.num_examples == 5
    assert source.test.num_examples == 2
    # Classes in sorted order, files sorted within each class; non-image files skipped.
    order = sorted(expected, key=lambda p: (expected[p][0], os.path.basename(p)))
    assert source.train.files == order

    examples = _examples(source.train)
    assert len(examples) == 5
    for path, (image, label) in zip(order, examples):
        want_label, want_value = expected[path]
        assert image.shape == (16, 16, 3), path
        assert image.dtype == np.uint8, path
        assert label == want_label, path
        tol = 2 if path.endswith((".jpg", ".jpeg")) else 0
        # Grayscale is replicated to RGB; RGBA loses its alpha channel.
        assert np.abs(image.astype(int) - want_value).max() <= tol, (path, image[0, 0])

    test = _examples(source.test)
    assert [y for _, y in test] == [0, 1]
    assert [int(x[0, 0, 0]) for x, _ in test] == [11, 22]
    assert all(x.shape == (16, 16, 3) and x.dtype == np.uint8 for x, _ in test)
    # The element spec is static: (S, S, 3) uint8 and int32 labels.
    spec = source.train.images.element_spec
    assert spec[0].shape.as_list() == [16, 16, 3] and spec[0].dtype == tf.uint8
    assert spec[1].dtype == tf.int32


def test_folder_images_resized_to_other_image_size(tmp_path):
    root = tmp_path / "pets"
    _mixed_folder(str(root))
    source = sources.load(_cfg(root, image_size=24))
    for image, _ in _examples(source.train) + _examples(source.test):
        assert image.shape == (24, 24, 3) and image.dtype == np.uint8


def _error(cfg_or_dataset, **kw):
    cfg = cfg_or_dataset if not isinstance(cfg_or_dataset, (str, os.PathLike)) else _cfg(
        cfg_or_dataset, **kw)
    with pytest.raises(ClaeError) as e:
        sources.load(cfg)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_folder_errors_name_the_flag_and_path(tmp_path):
    missing = tmp_path / "nope"
    message = _error(missing)
    assert "--dataset" in message and str(missing) in message

    # No train/ (an empty folder), then no test/.
    root = tmp_path / "empty"
    root.mkdir()
    message = _error(root)
    assert "--dataset" in message and str(root) in message and "train" in message
    (root / "train" / "a").mkdir(parents=True)
    _write(str(root / "train" / "a" / "0.png"), 1)
    message = _error(root)
    assert "--dataset" in message and str(root) in message and "test" in message

    # train/ holds files but no class folders.
    root = tmp_path / "flat"
    (root / "test" / "a").mkdir(parents=True)
    _write(str(root / "train" / "0.png"), 1)
    message = _error(root)
    assert "--dataset" in message and str(root / "train") in message and "class" in message

    # Class folders, but no images (only other files) in train/, then in test/.
    root = tmp_path / "noimages"
    (root / "train" / "a").mkdir(parents=True)
    (root / "test" / "a").mkdir(parents=True)
    (root / "train" / "a" / "notes.txt").write_text("x")
    message = _error(root)
    assert "--dataset" in message and str(root / "train") in message and "no images" in message
    _write(str(root / "train" / "a" / "0.png"), 1)
    _write(str(root / "train" / "a" / "1.png"), 2)
    message = _error(root)
    assert "--dataset" in message and str(root / "test") in message and "no images" in message


def _folder_with_corrupt_image(root, where="train"):
    _grid_folder(root, classes=2, per_class=3)
    bad = os.path.join(root, where, "class1", "img01b.png")  # sorts between img01 and img02
    with open(bad, "wb") as f:
        f.write(b"this is not a png at all")
    return bad


def test_corrupt_image_is_named_when_iterated(tmp_path):
    root = str(tmp_path / "corrupt")
    bad = _folder_with_corrupt_image(root)
    source = sources.load(_cfg(root))  # lazy: opening the folder does not decode anything
    assert source.train.num_examples == 7
    with pytest.raises(tf.errors.InvalidArgumentError) as raw:
        _examples(source.train)
    assert sources.find_unreadable(source.train) == bad
    with pytest.raises(ClaeError) as e:
        sources.raise_if_unreadable(source.train, raw.value)
    assert "--dataset" in str(e.value) and bad in str(e.value)

    # Through the pretraining stream, as the train loop sees it: the split is read into memory
    # when the stream is built, and that names the file. A fresh source: tf.data's in-memory
    # cache keeps what it read before the error, so a second pass over the same dataset
    # silently yields the readable images only.
    source = sources.load(_cfg(root))
    with pytest.raises(ClaeError, match="img01b.png"):
        streams.pretrain_dataset(source.train, _cfg(root), 0)

    # A readable split (test/ is fine) re-raises the original error rather than blaming a file.
    assert sources.find_unreadable(source.test) is None
    original = tf.errors.InvalidArgumentError(None, None, "something else")
    with pytest.raises(tf.errors.InvalidArgumentError, match="something else"):
        sources.raise_if_unreadable(source.test, original)


def test_truncated_image_is_named_too(tmp_path):
    root = str(tmp_path / "truncated")
    _grid_folder(root, classes=2, per_class=2)
    bad = os.path.join(root, "test", "class0", "zz.png")
    encoded = tf.io.encode_png(tf.fill([20, 20, 3], tf.constant(7, tf.uint8))).numpy()
    with open(bad, "wb") as f:
        f.write(encoded[: len(encoded) // 2])
    # A broken test image is found by load, before any training...
    with pytest.raises(ClaeError, match="zz.png"):
        sources.load(_cfg(root))
    # ... and the evaluation stream would name it too.
    source = sources._folder(root, 16)
    with pytest.raises(tf.errors.InvalidArgumentError) as raw:
        list(streams.eval_dataset(source.test, 2, "half"))
    with pytest.raises(ClaeError, match="zz.png"):
        sources.raise_if_unreadable(source.test, raw.value)


def test_every_read_of_a_split_names_the_file(tmp_path):
    """read_images and read_balanced (the monitor's and the robust evaluation's reads) name a
    corrupt file, and a file deleted after the folder was listed (NotFoundError in tf.data)."""
    root = str(tmp_path / "corrupt")
    bad = _folder_with_corrupt_image(root)
    source = sources.load(_cfg(root))
    with pytest.raises(ClaeError, match=f"^--dataset: cannot read image {bad}$"):
        sources.read_images(source.train)
    with pytest.raises(ClaeError, match=f"^--dataset: cannot read image {bad}$"):
        sources.read_balanced(source.train, 7)
    root = str(tmp_path / "fine")
    _grid_folder(root, classes=2, per_class=3)
    source = sources.load(_cfg(root))  # lists the files; reads only the test split
    gone = os.path.join(root, "train", "class1", "img01.png")
    os.remove(gone)
    with pytest.raises(ClaeError, match=f"^--dataset: cannot read image {gone}$"):
        sources.read_images(source.train)


def test_corrupt_image_is_named_by_app_run(tmp_path):
    root = str(tmp_path / "corrupt")
    bad = _folder_with_corrupt_image(root)
    cfg = _cfg(root, workdir=str(tmp_path / "run"), max_steps=1)
    with pytest.raises(ClaeError) as e:
        app.run(cfg)
    assert "--dataset" in str(e.value) and bad in str(e.value)


def test_corrupt_image_with_examples_per_class_is_named(tmp_path):
    # The per-class subset is picked from the file list, so only its own files are ever read:
    # a corrupt image outside it does not matter, one inside it is named while training.
    root = str(tmp_path / "corrupt")
    bad = _folder_with_corrupt_image(root)  # the third image of class1
    outside = sources.load(_cfg(root, examples_per_class=2))
    assert outside.train.num_examples == 4 and bad not in outside.train.files
    assert len(_examples(outside.train)) == 4
    cfg = _cfg(root, workdir=str(tmp_path / "run"), max_steps=1, examples_per_class=3)
    assert sources.load(cfg).train.num_examples == 6  # counted from the file list, no decoding
    with pytest.raises(ClaeError) as e:
        app.run(cfg)
    assert "--dataset" in str(e.value) and bad in str(e.value)


def _read_error(ds):
    """What reading `ds` raises."""
    try:
        list(ds.as_numpy_iterator())
    except Exception as e:  # the error is what the test looks at
        return e
    raise AssertionError("read without an error")


def test_decode_errors_are_told_from_other_errors_of_the_same_types(tmp_path):
    root = str(tmp_path / "corrupt")
    bad = _folder_with_corrupt_image(root)
    gone = str(tmp_path / "gone.png")
    decode_ds = tf.data.Dataset.from_tensor_slices([bad]).map(
        lambda f: sources._decode(tf.io.read_file(f)))
    decode_errors = {
        "tf.data decode": _read_error(decode_ds),
        "tf.data read": _read_error(tf.data.Dataset.from_tensor_slices([gone]).map(
            tf.io.read_file)),
        "record": tf.errors.DataLossError(None, None, "corrupted record at 12"),
    }
    with pytest.raises(tf.errors.InvalidArgumentError) as eager:
        sources._decode(tf.io.read_file(bad))
    decode_errors["eager decode"] = eager.value
    others = {
        "tf.data shape": _read_error(tf.data.Dataset.range(1, 3).map(
            lambda n: tf.reshape(tf.zeros([n]), [2, 2]))),
        "kernel": tf.errors.NotFoundError(None, None, "No registered 'Foo' OpKernel for 'GPU'"),
        "value": ValueError("Unknown image file format"),
    }
    with pytest.raises(tf.errors.InvalidArgumentError) as eager:
        tf.reshape(tf.zeros([5]), [2, 2])
    others["eager shape"] = eager.value
    assert isinstance(decode_errors["tf.data read"], tf.errors.NotFoundError)
    assert isinstance(others["tf.data shape"], tf.errors.InvalidArgumentError)
    assert {k: sources.is_decode_error(e) for k, e in decode_errors.items()} == dict.fromkeys(
        decode_errors, True)
    assert {k: sources.is_decode_error(e) for k, e in others.items()} == dict.fromkeys(
        others, False)


def test_other_errors_of_a_read_come_out_as_they_came_without_a_scan(tmp_path, monkeypatch):
    """A shape bug is an InvalidArgumentError too: raised as it came (the same object, its
    traceback), never blamed on a file, and no file is decoded to find one."""
    root = str(tmp_path / "corrupt")
    _folder_with_corrupt_image(root)  # a scan would find this file and blame it
    source = sources.load(_cfg(root))
    monkeypatch.setattr(sources, "find_unreadable", lambda split: pytest.fail("scanned"))
    original = tf.errors.InvalidArgumentError(None, None, "Incompatible shapes: [4,3] vs. [5,3]")

    def buggy_step():
        raise original

    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        with sources.unreadable_named(source.train, "the training split"):
            buggy_step()
    assert e.value is original and "buggy_step" in [entry.name for entry in e.traceback]
    # A real one, raised inside tf.data by a read of the split.
    with pytest.raises(tf.errors.InvalidArgumentError, match="Input to reshape"):
        sources._read(source.train, tf.data.Dataset.range(1, 3).map(
            lambda n: tf.reshape(tf.zeros([n]), [2, 2])))
    with pytest.raises(tf.errors.InvalidArgumentError, match="Incompatible shapes"):
        sources.raise_if_unreadable(source.train, original, "the training split")


def _first_per_class(examples, k):
    counts, out = {}, []
    for x, y in examples:
        if counts.get(y, 0) < k:
            out.append((x, y))
            counts[y] = counts.get(y, 0) + 1
    return out


def test_folder_subsets_take_the_first_images_in_sorted_order(tmp_path):
    root = tmp_path / "grid"
    _grid_folder(str(root), classes=3, per_class=4)
    full = sources.load(_cfg(root))
    assert full.train.num_examples == 12
    assert _values(full.train) == [(10 * c + i + 1, c) for c in range(3) for i in range(4)]

    source = sources.load(_cfg(root, examples_per_class=2))
    assert source.train.num_examples == 6
    assert _values(source.train) == [(10 * c + i + 1, c) for c in range(3) for i in range(2)]
    assert source.test.num_examples == 3  # subsets apply to the training split only

    source = sources.load(_cfg(root, train_examples=5))
    assert source.train.num_examples == 5
    assert _values(source.train) == _values(full.train)[:5]

    source = sources.load(_cfg(root, examples_per_class=2, train_examples=5))
    assert source.train.num_examples == 5
    assert _values(source.train) == [(1, 0), (2, 0), (11, 1), (12, 1), (21, 2)]

    # Larger than what there is: everything.
    source = sources.load(_cfg(root, examples_per_class=10, train_examples=100))
    assert source.train.num_examples == 12
    assert _values(source.train) == _values(full.train)


def test_digits_subsets(tmp_path):
    full = sources.load(tiny_config())
    assert (full.name, full.num_classes) == ("digits", 10)
    assert (full.train.num_examples, full.test.num_examples) == (1437, 360)
    full_examples = _examples(full.train)
    assert len(full_examples) == 1437
    x, _ = full_examples[0]
    assert x.shape == (16, 16, 3) and x.dtype == np.uint8

    source = sources.load(tiny_config(examples_per_class=3))
    assert source.train.num_examples == 30
    got = _examples(source.train)
    want = _first_per_class(full_examples, 3)
    assert len(got) == 30
    assert [y for _, y in got] == [y for _, y in want]
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(got, want))

    source = sources.load(tiny_config(train_examples=20))
    assert source.train.num_examples == 20
    got = _examples(source.train)
    assert all(np.array_equal(a, b) and ya == yb
               for (a, ya), (b, yb) in zip(got, full_examples[:20]))
    assert len(got) == 20


def _classes_taking_turns(labels, n):
    """Literal version of the class-balanced subset: the classes, in label order, take turns to
    give their next example (in split order) until n are taken or none is left; sorted."""
    queues = {c: [i for i, y in enumerate(labels) if y == c] for c in sorted(set(labels))}
    taken = []
    while len(taken) < n and any(queues.values()):
        for queue in queues.values():
            if queue and len(taken) < n:
                taken.append(queue.pop(0))
    return sorted(taken)


def test_balanced_subset_is_the_classes_taking_turns():
    uneven = [0] * 10 + [1] * 3 + [2] * 7 + [0, 1, 2] * 2  # class 1 has 5 images
    # By hand: turn 1 takes 0, 10, 13, turn 2 1, 11, 14, turn 3 2, 12, 15.
    assert _classes_taking_turns(uneven, 9) == [0, 1, 2, 10, 11, 12, 13, 14, 15]
    for labels in (uneven, np.random.default_rng(0).integers(0, 4, 200).tolist(),
                   [7, 3, 3, 7, 9, 3, 3]):  # labels that are not 0..C-1
        for n in (0, 1, 9, 14, 42, 10_000):
            got = sources.balanced_subset(np.array(labels), n)
            assert got.tolist() == _classes_taking_turns(labels, n), (labels, n)


def test_batch_size_larger_than_the_training_set(tmp_path):
    message = _error(tiny_config(train_examples=10, batch_size=16))
    assert "--batch_size" in message and "10" in message
    root = tmp_path / "grid"
    _grid_folder(str(root), classes=2, per_class=3)
    message = _error(_cfg(root, batch_size=8))
    assert "--batch_size" in message and "6" in message
    # Exactly the training set is fine.
    assert sources.load(_cfg(root, batch_size=6)).train.num_examples == 6


@pytest.mark.parametrize("mode", ["eval", "export"])
@pytest.mark.parametrize("subset", [dict(train_examples=10), dict(examples_per_class=1)])
def test_batch_size_larger_than_the_training_set_is_for_training_only(mode, subset):
    """--batch_size is the pretraining batch: evaluating (or exporting) a run on a subset smaller
    than it is fine."""
    source = sources.load(tiny_config(batch_size=16, mode=mode, **subset))
    assert source.train.num_examples == next(iter(subset.values())) * (
        10 if "examples_per_class" in subset else 1)


def test_tfds_by_name_with_mock_data():
    with tfds.testing.mock_data(num_examples=24):
        source = sources.load(tiny_config(dataset="cifar10", batch_size=8))
        examples = _examples(source.train)
        test = _examples(source.test)
    assert source.name == "cifar10"
    assert source.num_classes == 10
    assert source.train.num_examples == 24 == len(examples)
    assert source.test.num_examples == 24 == len(test)
    for x, y in examples + test:
        assert x.shape == (16, 16, 3) and x.dtype == np.uint8
        assert 0 <= y < 10


def test_unknown_dataset_name():
    message = _error(tiny_config(dataset="no_such_dataset_xyz"))
    assert "--dataset" in message and "no_such_dataset_xyz" in message


def test_tfds_dataset_not_prepared_offline(tmp_path):
    t = time.time()
    message = _error(tiny_config(dataset="mnist", data_dir=str(tmp_path / "tfds")))
    elapsed = time.time() - t
    assert "--dataset" in message and "mnist" in message
    # Offline: the download fails, unless TFDS's download code lacks a module first (then that
    # module is named instead; test_tfds_missing_module_is_named checks the message).
    assert ("could not be downloaded" in message and "image folder" in message) or (
        "pip install" in message and "could not be downloaded" not in message)
    assert elapsed < 60, f"the offline failure took {elapsed:.0f} s"


# ---------------------------------------------------------------------------------------------
# Classes: fewer than two, or test classes without training images; unreadable test images; TFDS
# preparation that needs a module that is not installed.


def _write_png(path, value, size=8):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf.io.write_file(path, tf.io.encode_png(tf.fill([size, size, 3], tf.constant(value, tf.uint8))))


def _folder(root, train_classes=("a", "b"), test_classes=("a", "b"), per_class=3):
    for c in train_classes:
        for i in range(per_class):
            _write_png(os.path.join(root, "train", c, f"{i}.png"), 10 + i)
    for c in test_classes:
        for i in range(2):
            _write_png(os.path.join(root, "test", c, f"{i}.png"), 100 + i)
    return str(root)


def test_one_class_dataset_is_refused(tmp_path):
    root = _folder(tmp_path / "one", train_classes=("a",), test_classes=("a",))
    with pytest.raises(ClaeError, match=r"^--dataset: .* has only 1 class\(es\); kNN and linear"):
        sources.load(tiny_config(dataset=root, batch_size=2))


def test_one_class_with_images_is_refused(tmp_path):
    # Two class folders, one of them empty: one class of training images.
    root = _folder(tmp_path / "empty_class", train_classes=("a",), test_classes=("a",))
    os.makedirs(os.path.join(root, "train", "b"))
    with pytest.raises(ClaeError, match=r"^--dataset: the training images .* hold only 1 class"):
        sources.load(tiny_config(dataset=root, batch_size=2))


def test_train_examples_that_keep_one_class_are_refused(tmp_path, capsys):
    root = _folder(tmp_path / "sorted", train_classes=("a", "b", "c"), test_classes=("a",))
    with pytest.raises(ClaeError, match="^--train_examples: .*--examples_per_class keeps every"):
        sources.load(tiny_config(dataset=root, batch_size=2, train_examples=3))
    # Two of three classes: it runs, and says so.
    source = sources.load(tiny_config(dataset=root, batch_size=2, train_examples=4))
    assert source.train.num_examples == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the training images hold 2 of the 3")


def test_test_class_missing_from_train_is_named(tmp_path, capsys):
    root = _folder(tmp_path / "extra", train_classes=("a", "b"), test_classes=("a", "b", "zebra"))
    source = sources.load(tiny_config(dataset=root, batch_size=2))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: test class 'zebra' (2 images) of {root}/test has no train/ folder "
                   f"and is left out of the evaluation"]
    assert source.num_classes == 2 and source.test.num_examples == 4
    # Nothing to say when the classes agree.
    sources.load(tiny_config(dataset=_folder(tmp_path / "same"), batch_size=2))
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# A corrupt test image stops the run before training.


def test_corrupt_test_image_is_named_before_training(tmp_path, monkeypatch):
    root = _folder(tmp_path / "corrupt")
    bad = os.path.join(root, "test", "b", "1b.png")
    with open(bad, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(ClaeError, match=f"^--dataset: cannot read image {bad}$"):
        sources.load(tiny_config(dataset=root, batch_size=2))
    import clae_tf.job.train
    monkeypatch.setattr(clae_tf.job.train, "train", lambda *a: pytest.fail("trained first"))
    cfg = tiny_config(tmp_path, dataset=root, batch_size=2)
    with pytest.raises(ClaeError, match=f"cannot read image {bad}"):
        app.run(cfg)


def test_readable_test_split_is_decoded_once_and_cached(tmp_path):
    """The up-front check fills the in-memory cache: evaluation reads no file again."""
    root = _folder(tmp_path / "ok")
    source = sources.load(tiny_config(dataset=root, batch_size=2))
    for name in os.listdir(os.path.join(root, "test", "a")):
        os.remove(os.path.join(root, "test", "a", name))
    values = sorted(int(x[0, 0, 0]) for x, _ in source.test.images)
    assert values == [100, 100, 101, 101]


# ---------------------------------------------------------------------------------------------
# TFDS names whose preparation needs a module that is not installed.


class _Builder:
    data_dir = "/nowhere"

    def __init__(self, error):
        self.error = error

    def is_prepared(self):
        return False

    def download_and_prepare(self):
        raise self.error


def _tfds_error(monkeypatch, error):
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: _Builder(error))
    with pytest.raises(ClaeError) as e:
        sources.load(tiny_config(dataset="mnist"))
    return str(e.value)


def test_tfds_missing_module_is_named(monkeypatch):
    message = _tfds_error(monkeypatch, ModuleNotFoundError("No module named 'importlib_resources'",
                                                           name="importlib_resources"))
    assert message == ("--dataset: preparing TFDS dataset 'mnist' needs the Python module "
                       "'importlib_resources', which is not installed (pip install "
                       "importlib_resources)")
    # Also when the ImportError is the cause of another error, and for a submodule.
    try:
        try:
            raise ModuleNotFoundError("No module named 'apache_beam.io'", name="apache_beam.io")
        except ImportError as inner:
            raise RuntimeError("builder failed") from inner
    except RuntimeError as outer:
        message = _tfds_error(monkeypatch, outer)
    assert "'apache_beam'" in message and "pip install apache_beam)" in message


def test_tfds_network_failure_still_says_download(monkeypatch):
    message = _tfds_error(monkeypatch, ConnectionError("Name or service not known"))
    assert "could not be downloaded" in message and "ConnectionError" in message


def test_tfds_mnist_offline_for_real(tmp_path):
    """The real TFDS offline: with importlib_resources missing, name it, not the network."""
    try:
        import importlib_resources  # noqa: F401
        missing = False
    except ImportError:
        missing = True
    with pytest.raises(ClaeError) as e:
        sources.load(tiny_config(dataset="mnist", data_dir=str(tmp_path / "tfds")))
    message = str(e.value)
    if missing:
        assert "pip install importlib_resources" in message, message
        assert "could not be downloaded" not in message
    else:
        assert "could not be downloaded" in message, message
