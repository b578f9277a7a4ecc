"""The exports as a downstream user meets them: the functional copy of the clean encoder
(portable.py), the `.keras` file and the SavedModel, loaded and fine-tuned without clae_tf; the
SavedModel of encoder + linear probe, whose logits are the robust evaluation's."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from clae_tf.data import augment
from clae_tf.evaluation import evaluate, robust
from clae_tf.job import export, portable
from clae_tf.method import builders
from clae_tf.method.models import bn_layers

from conftest import tiny_config


def _trained_like(cfg, seed=0):
    """A model whose BNs are far from their initial values, the adversarial twins differently
    from the clean ones (so that copying the wrong BN, or forgetting a statistic, shows)."""
    model = builders.build_model(cfg)
    rng = np.random.default_rng(seed)
    for layer in bn_layers(model):
        for bn in (layer.clean, layer.adv):
            if bn is None:
                continue
            n = bn.gamma.shape
            bn.gamma.assign(rng.uniform(0.5, 1.5, n).astype(np.float32))
            bn.beta.assign(rng.normal(0.0, 0.3, n).astype(np.float32))
            bn.moving_mean.assign(rng.normal(0.0, 0.3, n).astype(np.float32))
            bn.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype(np.float32))
    return model


def _images01(n=5, size=16, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("overrides", [
    dict(),  # ResNet-10, CIFAR stem, MLP head, "half" normalisation
    dict(arch="resnet50", stem="imagenet", head="linear", normalize="cifar", image_size=32),
], ids=["resnet10_cifar_stem", "resnet50_imagenet_stem"])
def test_portable_encoder_is_the_clean_path(overrides):
    cfg = tiny_config(**overrides)
    model = _trained_like(cfg)
    encoder = portable.build_encoder(model, cfg.image_size, cfg.normalize)
    x = _images01(size=cfg.image_size)

    out = encoder(x, training=False)
    h, z = model(augment.normalize(x, cfg.normalize), training=False)
    np.testing.assert_allclose(out["h"].numpy(), h.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["z"].numpy(), z.numpy(), atol=1e-5)
    # Not the adversarial path (whose BNs differ here).
    h_adv, _ = model(augment.normalize(x, cfg.normalize), training=False, adversarial=True)
    assert np.max(np.abs(out["h"].numpy() - h_adv.numpy())) > 1e-3

    # Standard Keras layers only, float32, and unique variable names that say where they are.
    assert all(type(layer).__module__.startswith("keras.") for layer in encoder.layers)
    names = [v.path for v in encoder.variables]
    assert len(set(names)) == len(names)
    assert "stage2_block1_shortcut_bn/moving_variance" in names
    assert "stage1_block1_conv0/kernel" in names
    assert all(v.dtype == "float32" for v in encoder.variables)
    # Clean BNs only: one BN per conv (the model holds two).
    n_bn = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in encoder.layers)
    n_conv = sum(isinstance(layer, keras.layers.Conv2D) for layer in encoder.layers)
    assert n_bn == n_conv == len(bn_layers(model))


def test_portable_encoder_under_mixed_precision():
    """A bf16-trained model exports a float32 encoder (portable to CPUs, exact statistics)."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        cfg = tiny_config()
        model = _trained_like(cfg)
        encoder = portable.build_encoder(model, cfg.image_size, cfg.normalize)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(v.dtype == "float32" for v in encoder.variables)
    out = encoder(_images01(), training=False)
    assert out["h"].dtype == tf.float32
    h, _ = model(augment.normalize(_images01()), training=False)
    np.testing.assert_allclose(out["h"].numpy(), h.numpy(), atol=0.05, rtol=0.05)  # bf16 round-off


# Runs in a fresh Python with clae_tf made unimportable: a meta-path finder placed first on
# sys.meta_path refuses `clae_tf` before the editable install's finder (or any sys.path entry)
# is asked, and the script checks that `import clae_tf` fails and nothing named clae_tf gets
# loaded. It loads both exports, computes h and z, and takes one fit step of a classifier on h
# with the encoder trainable, as in docs/export.md.
_USER_SCRIPT = textwrap.dedent('''
    import importlib.abc, json, sys

    class _NoClaeTf(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "clae_tf" or name.startswith("clae_tf."):
                raise ImportError(f"{name} is blocked in this process")
            return None

    sys.meta_path.insert(0, _NoClaeTf())
    try:
        import clae_tf
        sys.exit("clae_tf is importable")
    except ImportError:
        pass

    import numpy as np
    import keras
    import tensorflow as tf

    saved_model, keras_file, data, out_path = sys.argv[1:]
    x = np.load(data)["x"]
    labels = np.arange(len(x)) % 3
    out, report = {}, {}


    # docs/export.md: keras.layers.TFSMLayer, with Keras 3's weight names repaired.
    class TFSMLayer(keras.layers.TFSMLayer):
        """keras.layers.TFSMLayer whose weights a Keras optimizer accepts.

        Keras 3 keeps TF's ":0" in the weight names ("stem_conv_kernel:0"), and optimizers with
        slots (SGD with momentum, Adam) then fail: "... is not a valid scope name".
        """

        def _add_existing_weight(self, weight):
            self._track_variable(keras.Variable(
                weight, trainable=weight.trainable, dtype=weight.dtype, shape=weight.shape,
                name=weight.name.split(":")[0].replace("/", "_")))


    def fine_tune(make_encoder, key):
        """One fit step of encoder -> h -> Dense(3); returns the largest |change| per weight."""
        images = keras.Input(x.shape[1:])
        encoder = make_encoder()
        logits = keras.layers.Dense(3)(encoder(images)["h"])
        classifier = keras.Model(images, logits)
        classifier.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                           keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        before = [w.numpy().copy() for w in encoder.trainable_weights]
        classifier.fit(x, labels, batch_size=len(x), epochs=1, verbose=0)
        after = [w.numpy() for w in encoder.trainable_weights]
        report[key + "_unchanged"] = [w.path for w, a, b in zip(encoder.trainable_weights, after,
                                                                before) if np.all(a == b)]
        report[key + "_trainable"] = len(before)


    # The .keras file: a plain functional Keras model.
    encoder = keras.models.load_model(keras_file)
    report["keras_layer_modules"] = sorted({type(layer).__module__.split(".")[0]
                                            for layer in encoder.layers})
    y = encoder(x, training=False)
    out["keras_h"], out["keras_z"] = y["h"].numpy(), y["z"].numpy()
    fine_tune(lambda: keras.models.load_model(keras_file), "keras")

    # The SavedModel through TFSMLayer: the stock layer for inference and its weight names...
    stock = keras.layers.TFSMLayer(saved_model, call_endpoint="serve", trainable=False)
    report["tfsm_names"] = [w.name for w in stock.weights]
    y = stock(x)
    out["tfsm_h"], out["tfsm_z"] = y["h"].numpy(), y["z"].numpy()
    # ... and fine-tuning it.
    fine_tune(lambda: TFSMLayer(saved_model, call_endpoint="serve", trainable=True), "tfsm")

    report["clae_tf_loaded"] = sorted(m for m in sys.modules if m.startswith("clae_tf"))
    np.savez(out_path, **out)
    print("REPORT " + json.dumps(report))
''')


@pytest.mark.slow
def test_exports_load_and_fine_tune_without_clae_tf(tmp_path):
    cfg = tiny_config(tmp_path)
    model = _trained_like(cfg)
    saved_model, keras_file = str(tmp_path / "saved_model"), str(tmp_path / "encoder.keras")
    export.export(cfg, model, saved_model)
    export.export_keras(cfg, model, keras_file)
    # An odd batch: TF 2.21's oneDNN CPU kernel for the gradient of a 1x1 stride-2 conv
    # corrupts the heap there; the exports subsample and convolve at stride 1 instead.
    x = _images01(n=5)
    np.savez(tmp_path / "x.npz", x=x)
    script = tmp_path / "user.py"
    script.write_text(_USER_SCRIPT)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(script), saved_model, keras_file, str(tmp_path / "x.npz"),
         str(tmp_path / "out.npz")],
        cwd="/tmp", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    assert report["clae_tf_loaded"] == []
    assert report["keras_layer_modules"] == ["keras"]

    # Both forms give the in-memory encoder's outputs.
    h, z = model(augment.normalize(x, cfg.normalize), training=False)
    got = np.load(tmp_path / "out.npz")
    for form in ("keras", "tfsm"):
        np.testing.assert_allclose(got[f"{form}_h"], h.numpy(), atol=1e-5, err_msg=form)
        np.testing.assert_allclose(got[f"{form}_z"], z.numpy(), atol=1e-5, err_msg=form)

    # Unique weight names that say where each weight is (stage, block, layer).
    names = report["tfsm_names"]
    assert len(set(names)) == len(names) == len(model.variables) - _n_adv_bn_variables(model)
    assert "stage2_block1_shortcut_conv_kernel:0" in names
    assert not any(n.startswith("clae_model") for n in names)

    # One fit step changes every trainable weight that h depends on, in both forms (the
    # projection head g, after h, gets no gradient from a classifier on h).
    n_trainable = len(portable.build_encoder(model, cfg.image_size).trainable_weights)
    for form in ("keras", "tfsm"):
        assert report[f"{form}_trainable"] == n_trainable, form
        unchanged = report[f"{form}_unchanged"]
        assert len(unchanged) == 4 and all("proj_" in n for n in unchanged), unchanged


def _n_adv_bn_variables(model):
    return sum(len(layer.adv.variables) for layer in bn_layers(model) if layer.adv is not None)


# ---------------------------------------------------------------------------------------------
# The endpoints' input checks: the encoder's (serve, serve_uint8) and the probe's, the same.


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory):
    """The encoder and encoder + probe SavedModels of one model, loaded as a user loads them;
    and the model and probe to compare with."""
    cfg = tiny_config(adversarial=False)
    model = _trained_like(cfg)
    rng = np.random.default_rng(2)
    probe = {"kernel": rng.normal(size=(model.feature_dim, 5)).astype(np.float32),
             "bias": rng.normal(size=5).astype(np.float32), "feature": "h", "step": 3}
    base = tmp_path_factory.mktemp("endpoints")
    encoder = portable.build_encoder(model, cfg.image_size, cfg.normalize)
    export.export(cfg, model, str(base / "saved_model"), encoder)
    export.export_probe(cfg, model, probe, str(base / "probe_saved_model"), encoder)
    return (cfg, model, probe, tf.saved_model.load(str(base / "saved_model")),
            tf.saved_model.load(str(base / "probe_saved_model")))


@pytest.mark.slow  # two exports and loads of the tiny model: ~15-40 s on 2 shared cores
def test_empty_batch_gives_empty_outputs(endpoints):
    """(0, D), not "Incompatible shapes" (the CPU convolution returns an empty batch with its
    input's channels, and the next layer refuses it)."""
    cfg, model, probe, encoder, classifier = endpoints
    for images in (np.zeros((0, 16, 16, 3), np.float32), np.zeros((0, 40, 24, 3), np.float64)):
        out = encoder.serve(images)
        assert out["h"].shape == (0, model.feature_dim) and out["z"].shape == (0, cfg.proj_dim)
        assert classifier.serve(images).shape == (0, 5)
    empty_uint8 = np.zeros((0, 16, 16, 3), np.uint8)
    assert encoder.serve_uint8(empty_uint8)["z"].shape == (0, cfg.proj_dim)
    assert classifier.serve_uint8(empty_uint8).shape == (0, 5)
    assert classifier.signatures["serve"](images=tf.zeros([0, 16, 16, 3]))["output_0"].shape == (
        0, 5)
    # A wrong dtype is refused even when the batch is empty.
    with pytest.raises(tf.errors.InvalidArgumentError, match="got uint8 images"):
        classifier.serve(empty_uint8)


@pytest.mark.slow
def test_probe_endpoints_compute_logits_of_h(endpoints):
    """serve (float) and serve_uint8 give h @ kernel + bias, h of the clean encoder."""
    cfg, model, probe, _, classifier = endpoints
    images = np.random.default_rng(3).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    h, _ = model(augment.normalize(images.astype(np.float32) / 255.0, cfg.normalize),
                 training=False)
    expected = h.numpy() @ probe["kernel"] + probe["bias"]
    np.testing.assert_allclose(classifier.serve_uint8(images).numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(classifier.serve(images / 255.0).numpy(), expected, atol=1e-4)


def _nan_at_one_pixel(n=2):
    images = np.full((n, 16, 16, 3), 0.5, np.float32)
    images[-1, 3, 4, 1] = np.nan
    return images


@pytest.mark.slow
@pytest.mark.parametrize("form", ["encoder", "probe"])
@pytest.mark.parametrize("endpoint, images, says", [
    ("serve", np.full((2, 16, 16, 3), 200.0, np.float32), "serve: takes float images in [0, 1]; "
     "for uint8 images in [0, 255] use serve_uint8; got values from"),
    ("serve", np.full((2, 16, 16, 3), 200, np.uint8), "got uint8 images"),
    ("serve", _nan_at_one_pixel(), "got] [1] [NaN or infinite values"),
    ("serve", np.full((1, 16, 16, 3), np.inf, np.float32), "NaN or infinite values"),
    ("serve_uint8", np.full((2, 16, 16, 3), 0.5, np.float32), "serve_uint8: takes uint8 images "
     "in [0, 255]; for float images in [0, 1] use serve; got float32 images"),
    ("serve", np.full((16, 16, 3), 0.5, np.float32), "serve: takes images of shape (N, H, W, 3) "
     "with H, W >= 1; got shape] [16 16 3]"),
    ("serve_uint8", np.full((16, 16, 3), 9, np.uint8), "serve_uint8: takes images of shape "
     "(N, H, W, 3) with H, W >= 1; got shape] [16 16 3]"),
    ("serve", np.full((2, 16, 16, 1), 0.5, np.float32), "got shape] [2 16 16 1]"),
    ("serve_uint8", np.full((2, 16, 16, 4), 9, np.uint8), "got shape] [2 16 16 4]"),
    ("serve", np.zeros((2, 0, 0, 3), np.float32), "got shape] [2 0 0 3]"),
    ("serve_uint8", np.zeros((1, 16, 0, 3), np.uint8), "got shape] [1 16 0 3]"),
    ("serve", np.full((16, 16, 3), 9, np.uint8), "got uint8 images"),  # the dtype first
], ids=["0_255_floats", "uint8", "nan", "inf", "floats_to_uint8", "one_image", "one_image_uint8",
        "1_channel", "4_channels", "0x0", "no_columns", "uint8_one_image"])
def test_probe_endpoint_checks_its_input_as_the_encoder_does(endpoints, form, endpoint, images,
                                                             says):
    _, _, _, encoder, classifier = endpoints
    loaded = encoder if form == "encoder" else classifier
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        getattr(loaded, endpoint)(images)
    assert says in str(e.value)


# ---------------------------------------------------------------------------------------------
# The SavedModel refuses a wrong dtype instead of casting it.


@pytest.fixture(scope="module")
def exported(endpoints):
    """The model and its encoder SavedModel, loaded: the export of `endpoints` (one export and
    load of the tiny model serves both groups of tests)."""
    _, model, _, encoder, _ = endpoints
    return model, encoder


def _images(n=3, size=16):
    return np.random.default_rng(1).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.mark.slow  # the export and load of the `endpoints` fixture
def test_saved_model_right_dtypes_match_the_model(exported):
    model, loaded = exported
    images = _images()
    h, z = model(augment.normalize(tf.constant(images, tf.float32) / 255.0), training=False)
    for out in (loaded.serve_uint8(images), loaded.serve(images.astype(np.float32) / 255.0),
                loaded.serve(images.astype(np.float64) / 255.0),
                loaded.serve(tf.constant(images.astype(np.float32) / 255.0))):
        np.testing.assert_allclose(out["h"].numpy(), h.numpy(), atol=1e-5)
        np.testing.assert_allclose(out["z"].numpy(), z.numpy(), atol=1e-5)
    # The signatures (TF Serving) keep the first dtypes: float32 and uint8.
    specs = {k: list(f.structured_input_signature[1].values())[0].dtype
             for k, f in loaded.signatures.items()}
    assert specs == {"serve": tf.float32, "serve_uint8": tf.uint8, "serving_default": tf.float32}
    assert all(list(f.structured_input_signature[1].values())[0].shape.as_list() == [
        None, None, None, 3] for f in loaded.signatures.values())


@pytest.mark.slow
@pytest.mark.parametrize("endpoint, dtype, says", [
    ("serve", np.uint8, "serve: takes float images in [0, 1]; for uint8 images in [0, 255] use "
                        "serve_uint8; got uint8 images"),
    ("serve", np.int64, "got int64 images"),
    ("serve_uint8", np.float32, "serve_uint8: takes uint8 images in [0, 255]; for float images "
                                "in [0, 1] use serve; got float32 images"),
    ("serve_uint8", np.float64, "got float64 images"),
    ("serve_uint8", np.int64, "got int64 images"),
])
def test_saved_model_refuses_a_wrong_dtype(exported, endpoint, dtype, says):
    _, loaded = exported
    images = _images().astype(dtype)
    if np.issubdtype(dtype, np.floating):
        images = images / 255.0  # the right values for the other endpoint
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        getattr(loaded, endpoint)(images)
    assert says in str(e.value)


@pytest.mark.slow
def test_saved_model_other_dtypes_find_no_function(exported):
    _, loaded = exported
    with pytest.raises(ValueError, match="Could not find matching concrete function"):
        loaded.serve(_images().astype(np.int16))


@pytest.mark.slow
def test_serve_refuses_0_255_values_even_when_cast(exported):
    """The `signatures` entries do cast NumPy arguments (measured): serve's range check then
    catches uint8 images read as floats; in-range floats pass."""
    _, loaded = exported
    with pytest.raises(tf.errors.InvalidArgumentError, match="got values from"):
        loaded.signatures["serve"](images=_images())
    with pytest.raises(tf.errors.InvalidArgumentError, match="got values from"):
        loaded.serve(_images().astype(np.float32))
    loaded.serve(np.full((1, 16, 16, 3), 1.005, np.float32))  # a resampling overshoot


# ---------------------------------------------------------------------------------------------
# The probe's SavedModel: encoder + the linear probe of probe.npz, the robust evaluation's
# classifier.


@pytest.mark.slow  # an export and load of the probe SavedModel each: ~14 s with the machine shared
@pytest.mark.parametrize("feature", ["h", "z"])
def test_probe_saved_model_gives_the_in_memory_logits(tmp_path, feature):
    cfg = tiny_config(adversarial=False)
    tf.keras.utils.set_random_seed(0)
    model = builders.build_model(cfg)
    dim = model.feature_dim if feature == "h" else cfg.proj_dim
    probe = keras.layers.Dense(10)
    probe.build((None, dim))
    rng = np.random.default_rng(1)
    probe.set_weights([rng.normal(size=(dim, 10)).astype(np.float32),
                       rng.normal(size=10).astype(np.float32)])
    evaluate.save_probe(str(tmp_path / "probe.npz"), probe, feature, 7)
    saved = evaluate.load_probe(str(tmp_path / "probe.npz"))
    assert saved["feature"] == feature and saved["step"] == 7
    path = str(tmp_path / "probe_saved_model")
    export.export_probe(cfg, model, saved, path)
    loaded = tf.saved_model.load(path)
    images = rng.uniform(0, 1, (5, 16, 16, 3)).astype(np.float32)
    expected = robust.classifier(model, probe, cfg.normalize, feature)(tf.constant(images))
    np.testing.assert_allclose(loaded.serve(tf.constant(images)).numpy(), expected.numpy(),
                               atol=1e-5)
    assert loaded.serve(tf.zeros([2, 40, 40, 3])).shape == (2, 10)  # any size is resized
