"""Monitoring: online kNN, the neighbour picture and the projector files (monitor.py, visualize.py).

The online kNN is checked against a numpy weighted kNN (conftest.numpy_knn_predict) on the
final evaluation's features (evaluate.extract through tf.data) of a subset picked here by hand;
the projector files are read back with TensorBoard's projector plugin itself; the picture's
frames are checked pixel by pixel.
"""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorboard.plugins import projector
from tensorboard.plugins.projector import projector_plugin

from clae_tf.data import sources
from clae_tf.evaluation import evaluate, monitor, visualize
from clae_tf.job import train
from clae_tf.method import builders
from clae_tf.runtime import distribute

from conftest import numpy_knn_predict, tiny_config

ONE_DEVICE = tf.distribute.OneDeviceStrategy("/cpu:0")


def _first_per_class(labels, k):
    """Literal version of the subset: the first k images of each class, in split order."""
    keep, seen = [], {}
    for i, y in enumerate(labels):
        if seen.get(y, 0) < k:
            keep.append(i)
        seen[y] = seen.get(y, 0) + 1
    return np.array(keep)


def _events(logdir):
    """{tag: {step: tensor}} over the event files in logdir."""
    tags = {}
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, {})[event.step] = tf.make_ndarray(value.tensor)
    return tags


def test_online_knn_is_the_weighted_knn_of_z_on_the_first_of_each_class(tmp_path):
    cfg = tiny_config(tmp_path, online_eval_examples=50)
    keras.utils.set_random_seed(0)
    model = builders.build_model(cfg)
    source = sources.load(cfg)
    logdir = str(tmp_path / "tb")
    writer = tf.summary.create_file_writer(logdir)
    accuracy = monitor.Monitor(cfg, model, source, writer, logdir).online_eval(step=7)
    writer.flush()
    # The final evaluation's features of the same images (tf.data, its own extraction) and a
    # float64 numpy kNN. With these weights the k-th and (k+1)-th similarities differ by
    # > 2e-5 and the two best class scores by > 0.01: float32 rounding cannot flip a vote.
    keep = _first_per_class(source.test.labels, 5)
    train_h, train_z, train_y = evaluate.extract(model, source.train, 64, cfg.normalize)
    test_h, test_z, test_y = evaluate.extract(model, source.test.select(keep), 64, cfg.normalize)
    expected = np.mean(numpy_knn_predict(train_z, train_y, test_z, 10, cfg.knn_k, cfg.sigma)
                       == test_y)
    assert accuracy == pytest.approx(expected, abs=1e-9)
    assert 0.0 < accuracy < 1.0  # random weights: a number, not a constant
    # z, not h, and this subset, not the first 50 test images: each gives another number.
    on_h = np.mean(numpy_knn_predict(train_h, train_y, test_h, 10, cfg.knn_k, cfg.sigma) == test_y)
    _, first_z, first_y = evaluate.extract(model, source.test.select(np.arange(50)), 64,
                                           cfg.normalize)
    first = np.mean(numpy_knn_predict(train_z, train_y, first_z, 10, cfg.knn_k, cfg.sigma)
                    == first_y)
    assert on_h != expected and first != expected
    tags = _events(logdir)
    assert float(tags["eval/knn_top1_online"][7]) == pytest.approx(expected)
    # The picture: 10 rows (one per digit) of the query and 8 neighbours, 16-pixel images.
    png = tags["monitor/nearest_neighbours"][7]  # [width, height, encoded png]
    picture = tf.io.decode_png(png[2]).numpy()
    c = 16 + 2 * visualize.BORDER + visualize.GAP
    assert picture.shape == (visualize.GAP + 10 * c, visualize.GAP + 9 * c + 8, 3)


def test_online_knn_under_mirrored_strategy_reads_the_same_model(tmp_path):
    cfg = tiny_config(tmp_path, online_eval_examples=50)
    keras.utils.set_random_seed(0)
    one = builders.build_model(cfg)
    strategy = distribute.mirrored([d.name for d in tf.config.list_logical_devices("CPU")[:2]])
    with strategy.scope():
        mirrored = builders.build_model(cfg)
    mirrored.set_weights(one.get_weights())
    source = sources.load(cfg)
    noop = tf.summary.create_noop_writer()
    a = monitor.Monitor(cfg, one, source, noop, str(tmp_path))
    b = monitor.Monitor(cfg, mirrored, source, noop, str(tmp_path))
    images = sources.read_images(source.test)[0][:40]
    np.testing.assert_allclose(a.features(images)[1], b.features(images)[1], atol=1e-6)
    assert a.online_eval(1) == b.online_eval(1)


def _train(cfg, strategy=ONE_DEVICE):
    keras.utils.set_random_seed(cfg.seed)
    return train.train(cfg, strategy, sources.load(cfg))


@pytest.mark.slow
def test_online_evaluation_leaves_the_training_trajectory_unchanged(tmp_path):
    # 48 images, batch 16: 3 steps per epoch, online evaluations after steps 3 and 6.
    common = dict(train_examples=48, epochs=2, online_eval_examples=30, export=False,
                  ckpt_every=100, optimizer="sgd", learning_rate=0.05, weight_decay=5e-4)
    on = tiny_config(tmp_path / "on", eval_every_epochs=1, **common)
    off = tiny_config(tmp_path / "off", eval_every_epochs=0, **common)
    with_eval, without = _train(on), _train(off)
    assert with_eval.online_evals == 2 and without.online_evals == 0
    for a, b in zip(with_eval.model.variables, without.model.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)  # BN stats included
    tags = _events(os.path.join(on.run_dir, "tensorboard"))
    assert sorted(tags["eval/knn_top1_online"]) == [3, 6]
    assert sorted(tags["monitor/nearest_neighbours"]) == [3, 6]
    # Without online evaluation the picture is still drawn once, at the end.
    off_tags = _events(os.path.join(off.run_dir, "tensorboard"))
    assert "eval/knn_top1_online" not in off_tags
    assert sorted(off_tags["monitor/nearest_neighbours"]) == [6]


# The online kNN during a mirrored run (app.run over 2 virtual CPUs), against the checkpoint's on
# one device: tests/e2e_test.py, test_run_mirrored_over_two_virtual_cpus.


def _serve(app, **query):
    """One request to a projector plugin route (a WSGI app); returns the response body."""
    from werkzeug.test import Client
    response = Client(app).get("/", query_string=query)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_data()


def test_projector_files_are_what_the_plugin_reads(tmp_path):
    rng = np.random.default_rng(0)
    n, d, s = 50, 6, 8
    features = rng.normal(size=(n, d)).astype(np.float32)
    labels = rng.integers(0, 10, size=n)
    images = rng.integers(0, 256, size=(n, s, s, 3), dtype=np.uint8)
    index = np.arange(100, 100 + n)
    logdir = str(tmp_path)
    path = visualize.write_projector(logdir, "test_z", features, labels, images, index)
    # The config, parsed with the plugin's protobuf; paths relative to the logdir.
    config = projector.ProjectorConfig()
    with open(path) as f:
        text_format.Parse(f.read(), config)
    assert path == os.path.join(logdir, "projector_config.pbtxt")
    (embedding,) = config.embeddings
    assert embedding.tensor_name == "test_z"
    assert list(embedding.sprite.single_image_dim) == [s, s]
    # The tensor as the plugin reads it (its own TSV reader).
    tensor = projector_plugin._read_tensor_tsv_file(os.path.join(logdir, embedding.tensor_path))
    np.testing.assert_allclose(tensor, features, rtol=1e-5)
    with open(os.path.join(logdir, embedding.metadata_path)) as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    assert rows[0] == ["label", "index"]
    assert rows[1:] == [[str(y), str(i)] for y, i in zip(labels, index)]
    # The sprite: an 8 x 8 grid (ceil(sqrt(50))) of 8-pixel thumbnails, row-major.
    sprite = tf.io.decode_png(tf.io.read_file(
        os.path.join(logdir, embedding.sprite.image_path))).numpy()
    assert sprite.shape == (8 * s, 8 * s, 3)
    np.testing.assert_array_equal(sprite[s:2 * s, 3 * s:4 * s], images[8 + 3])
    # The plugin, serving the logdir as `tensorboard --logdir` would (the run ".").
    from tensorboard.plugins import base_plugin
    plugin = projector_plugin.ProjectorPlugin(base_plugin.TBContext(logdir=logdir))
    apps = plugin.get_plugin_apps()
    assert b'"."' in _serve(apps["/runs"])
    served = np.frombuffer(_serve(apps["/tensor"], run=".", name="test_z"), np.float32)
    np.testing.assert_allclose(served.reshape(n, d), features, rtol=1e-5)
    assert _serve(apps["/metadata"], run=".", name="test_z").decode().startswith("label\tindex\n")
    assert _serve(apps["/sprite_image"], run=".", name="test_z")[1:4] == b"PNG"


def test_sprite_stays_within_the_projector_limit(monkeypatch):
    images = np.full((5, 8, 8, 3), 200, np.uint8)
    grid, d = visualize.sprite(images)
    assert grid.shape == (24, 24, 3) and d == 8
    monkeypatch.setattr(visualize, "MAX_SPRITE_PIXELS", 20)  # 3 x 8 pixels would not fit
    grid, d = visualize.sprite(images)
    assert d == 6 and grid.shape == (18, 18, 3)
    np.testing.assert_array_equal(grid[:6, :6], 200)  # resized, same colour


def test_nearest_is_the_top_cosine_similarity():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(30, 5))
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    query = bank[[3, 7]] + 0.01 * rng.normal(size=(2, 5))
    got = visualize.nearest(query, bank, 8)
    for q, row in zip(query, got):
        sims = [float(np.dot(q, b)) for b in bank]
        assert list(row) == sorted(range(30), key=lambda i: -sims[i])[:8]
    assert list(got[:, 0]) == [3, 7]


def test_neighbour_picture_frames_say_whether_the_label_matches():
    s, b, gap = 6, visualize.BORDER, visualize.GAP
    rng = np.random.default_rng(2)
    bank = rng.integers(0, 256, size=(20, s, s, 3), dtype=np.uint8)
    bank_labels = rng.integers(0, 3, size=20)
    queries = rng.integers(0, 256, size=(2, s, s, 3), dtype=np.uint8)
    query_labels = np.array([0, 2])
    neighbours = rng.permutation(20)[:16].reshape(2, 8)
    picture = visualize.neighbour_picture(queries, query_labels, bank, bank_labels, neighbours)
    t = s + 2 * b
    c = t + gap
    assert picture.shape == (gap + 2 * c, gap + 9 * c + s // 2, 3) and picture.dtype == np.uint8
    for r in range(2):
        for j in range(9):
            y, x = gap + r * c, gap + j * c + (s // 2 if j else 0)
            tile = picture[y:y + t, x:x + t]
            if j == 0:
                colour, image = (128, 128, 128), queries[r]
            else:
                i = neighbours[r, j - 1]
                same = bank_labels[i] == query_labels[r]
                colour, image = ((0, 200, 0) if same else (220, 0, 0)), bank[i]
            frame = np.ones((t, t), bool)
            frame[b:-b, b:-b] = False
            assert (tile[frame] == colour).all(), (r, j)
            np.testing.assert_array_equal(tile[b:-b, b:-b], image)
    # Both colours occur (the check above is not vacuous), and the gaps are white.
    assert (picture == (0, 200, 0)).all(-1).any() and (picture == (220, 0, 0)).all(-1).any()
    assert (picture[:gap] == 255).all()
    assert (picture[:, gap + t:gap + t + gap + s // 2] == 255).all()  # query | neighbours
