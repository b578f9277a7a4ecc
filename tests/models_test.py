"""Tests of clae_tf.method.models: ResNet shapes, stems, feature widths and the dual-BN routing."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from clae_tf.method import builders, models

from conftest import tiny_config

SIZE = 16


def _x(n=4, size=SIZE, seed=0):
    return tf.constant(np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)), tf.float32)


def _stage_shapes(model, x):
    """Runs the model's layers by hand, recording the spatial size after the stem and each stage."""
    out = tf.nn.relu(model.stem_bn(model.stem_conv(x)))
    if model.stem_pool is not None:
        out = model.stem_pool(out)
    shapes = {"stem": tuple(out.shape)}
    for block in model.blocks:
        out = block(out)
        shapes[block.name.split("_")[0]] = tuple(out.shape)
    return shapes, tf.reduce_mean(out, axis=[1, 2])


@pytest.fixture(scope="module")
def dual_model():
    return builders.build_model(tiny_config(adversarial=True))


# stem -> expected H = W after the stem and after stages 1..4, for 16x16 inputs.
_SPATIAL = {
    "cifar": [16, 16, 8, 4, 2],  # 3x3/1 stem, no pool: stage 1 keeps the input resolution
    "imagenet": [4, 4, 2, 1, 1],  # 7x7/2 conv (16 -> 8) then 3x3/2 max-pool (8 -> 4)
}


@pytest.mark.parametrize("arch,blocks", [("resnet10", 4), ("resnet18", 8)])
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_shapes(arch, blocks, stem):
    cfg = tiny_config(arch=arch, stem=stem, image_size=SIZE, adversarial=False)
    model = builders.build_model(cfg)
    base = 4  # 64 * width 1/16
    assert model.feature_dim == 8 * base
    assert len(model.blocks) == blocks
    x = _x()
    h, z = model(x, training=False)
    assert h.shape == (4, model.feature_dim) and h.dtype == tf.float32
    assert z.shape == (4, cfg.proj_dim) and z.dtype == tf.float32
    np.testing.assert_allclose(np.linalg.norm(z.numpy(), axis=1), 1.0, rtol=1e-5)
    assert np.all(h.numpy() >= 0)  # global average of a ReLU output

    shapes, h_manual = _stage_shapes(model, x)
    expected = _SPATIAL[stem]
    channels = [base, base, 2 * base, 4 * base, 8 * base]
    for key, size, c in zip(["stem", "stage1", "stage2", "stage3", "stage4"], expected, channels):
        assert shapes[key] == (4, size, size, c), (key, shapes)
    # The hand-run layers are the model's forward pass.
    np.testing.assert_allclose(h_manual.numpy(), h.numpy(), rtol=1e-5, atol=1e-6)


def test_projection_head_widths(dual_model):
    # tiny_config: proj_hidden=0 (-> the representation's width), proj_dim=16.
    assert dual_model.proj_hidden.kernel.shape == (dual_model.feature_dim, dual_model.feature_dim)
    assert dual_model.proj_out.kernel.shape == (dual_model.feature_dim, 16)
    model = builders.build_model(tiny_config(proj_hidden=24, proj_dim=8, adversarial=False))
    assert model.proj_hidden.kernel.shape == (model.feature_dim, 24)
    assert model.proj_out.kernel.shape == (24, 8)


def _encoder_params(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables if "proj" not in v.path)


def test_resnet18_width1():
    # Built by one forward pass of 8x8 images (the variables do not depend on the image size).
    model = models.ContrastiveModel(arch="resnet18", width=1.0, proj_dim=16)
    assert model.feature_dim == 512  # known before building
    h, z = model(_x(2, 8), training=False)
    assert h.shape == (2, 512) and z.shape == (2, 16)
    # The CIFAR ResNet-18 of the reference (kuangliu/pytorch-cifar layout) has 11,173,962
    # parameters with its 512x10 classifier, i.e. 11,168,832 in the encoder (conv + BN affine).
    assert _encoder_params(model) == 11_168_832
    assert model.proj_hidden.kernel.shape == (512, 512)


def test_resnet50_width1():
    model = models.ContrastiveModel(arch="resnet50", width=1.0, proj_dim=16)
    assert model.feature_dim == 2048  # known before building
    h, _ = model(_x(2, 8), training=False)
    assert h.shape == (2, 2048)
    # torchvision resnet50 (25,557,032) minus its fc (2,049,000), with the 3x3 CIFAR stem
    # (1,728 weights) in place of the 7x7 one (9,408).
    assert _encoder_params(model) == 25_557_032 - 2_049_000 - 9_408 + 1_728


def _bn_stats(model, which):
    """Moving mean/variance variables of the clean ('bn/') or adversarial ('bn_adv/') BNs."""
    out = [v for v in model.variables if f"/{which}/moving_" in v.path]
    assert out
    return out


def _changed(variables, before):
    return [not np.array_equal(v.numpy(), b) for v, b in zip(variables, before)]


def test_dual_bn_variables(dual_model):
    clean, adv = _bn_stats(dual_model, "bn"), _bn_stats(dual_model, "bn_adv")
    n_bn = len(models.bn_layers(dual_model))
    assert len(clean) == len(adv) == 2 * n_bn
    paths = [v.path for v in dual_model.variables]
    assert len(set(paths)) == len(paths)
    # Convolutions and dense layers are shared: exactly one copy of each.
    kernels = [p for p in paths if p.endswith("kernel")]
    assert not any("bn_adv" in p for p in kernels)
    # Each BN has its own adversarial gamma/beta.
    assert sum(p.endswith("bn_adv/gamma") for p in paths) == n_bn
    assert sum(p.endswith("bn/gamma") for p in paths) == n_bn


@pytest.mark.parametrize("adversarial", [False, True])
def test_training_forward_updates_only_its_own_bns(dual_model, adversarial):
    clean, adv = _bn_stats(dual_model, "bn"), _bn_stats(dual_model, "bn_adv")
    others = [v for v in dual_model.variables if "moving_" not in v.path]
    before_clean, before_adv = [v.numpy() for v in clean], [v.numpy() for v in adv]
    before_others = [v.numpy() for v in others]

    dual_model(_x(seed=int(adversarial) + 1), training=True, adversarial=adversarial)

    used, unused = (adv, clean) if adversarial else (clean, adv)
    before_used, before_unused = ((before_adv, before_clean) if adversarial
                                  else (before_clean, before_adv))
    assert all(_changed(used, before_used)), [v.path for v, c in
                                              zip(used, _changed(used, before_used)) if not c]
    assert not any(_changed(unused, before_unused))
    assert not any(_changed(others, before_others))  # a forward pass changes no weight


def test_inference_forward_updates_nothing(dual_model):
    before = [v.numpy() for v in dual_model.variables]
    for adversarial in (False, True):
        dual_model(_x(seed=5), training=False, adversarial=adversarial)
    assert not any(_changed(dual_model.variables, before))


def test_adversarial_path_uses_its_own_bn_parameters():
    dual_model = builders.build_model(tiny_config(adversarial=True))  # fresh: untouched statistics
    x = _x(seed=3)
    _, z_clean = dual_model(x, training=False)
    _, z_adv = dual_model(x, training=False, adversarial=True)
    # Freshly built twins are identical (gamma 1, beta 0, stats 0/1), so the paths agree...
    np.testing.assert_allclose(z_clean.numpy(), z_adv.numpy(), atol=1e-5)
    # ...until an adversarial parameter changes: then only the adversarial output moves.
    # (beta, not gamma: with zero biases and unit statistics the network is positively
    # homogeneous up to the normalised z, so scaling a gamma would not show.)
    beta = [v for v in dual_model.variables if v.path.endswith("stem_bn/bn_adv/beta")][0]
    saved = beta.numpy()
    beta.assign(saved + 0.5)
    try:
        _, z_clean2 = dual_model(x, training=False)
        _, z_adv2 = dual_model(x, training=False, adversarial=True)
    finally:
        beta.assign(saved)
    np.testing.assert_array_equal(z_clean2.numpy(), z_clean.numpy())
    assert np.abs(z_adv2.numpy() - z_adv.numpy()).max() > 1e-3


def test_without_adversarial_no_twins():
    model = builders.build_model(tiny_config(adversarial=False))
    assert not any("bn_adv" in v.path for v in model.variables)
    assert all(layer.adv is None for layer in models.bn_layers(model))
    with pytest.raises(ValueError, match="adversarial"):
        model(_x(), training=True, adversarial=True)


def test_resnet18_has_20_dual_bns():
    model = builders.build_model(tiny_config(arch="resnet18", adversarial=True))
    layers = models.bn_layers(model)
    # stem + 2 per block x 8 blocks + shortcut BNs of stages 2, 3, 4.
    assert len(layers) == 20
    assert sum(layer.name == "shortcut_bn" for layer in layers) == 3
    assert all(layer.adv is not None for layer in layers)


def test_bn_momenta_default_config(dual_model):
    cfg = tiny_config(adversarial=True)  # the dual_model's config; BN momenta at their defaults
    assert (cfg.bn_momentum, cfg.bn_adv_momentum) == (0.1, 0.01)  # PyTorch convention
    layers = models.bn_layers(dual_model)
    assert layers
    for layer in layers:
        assert layer.clean.momentum == pytest.approx(0.9)
        assert layer.adv.momentum == pytest.approx(0.99)
        assert layer.clean.epsilon == pytest.approx(1e-5)  # PyTorch's BN epsilon


@pytest.mark.parametrize("adversarial,keras_momentum", [(False, 0.9), (True, 0.99)])
def test_bn_training_forward_numerically(dual_model, adversarial, keras_momentum):
    """Stem BN in training mode: output normalised with the biased batch statistics (eps 1e-5),
    and new = m * old + (1 - m) * batch for the moving mean and (biased) variance, with Keras
    momentum m = 0.9 (clean) or 0.99 (adversarial)."""
    name = "bn_adv" if adversarial else "bn"
    mean_var, var_var = [[v for v in dual_model.variables
                          if v.path.endswith(f"stem_bn/{name}/{stat}")][0]
                         for stat in ("moving_mean", "moving_variance")]
    x = _x(seed=7)
    conv = dual_model.stem_conv(x).numpy()
    batch_mean, batch_var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
    old_mean, old_var = mean_var.numpy(), var_var.numpy()
    out = dual_model.stem_bn(tf.constant(conv), training=True, adversarial=adversarial).numpy()
    layer = dual_model.stem_bn.adv if adversarial else dual_model.stem_bn.clean
    expected = ((conv - batch_mean) / np.sqrt(batch_var + 1e-5) * layer.gamma.numpy()
                + layer.beta.numpy())
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    m = keras_momentum
    # The batch statistic each update implies: (new - m * old) / (1 - m). Compared tightly enough
    # (the batch has 4 * 16 * 16 = 1024 values per channel) to tell the biased variance Keras
    # tracks (and the fused path must reproduce) from the Bessel-corrected one (x 1024/1023).
    implied_mean = (mean_var.numpy() - m * old_mean) / (1 - m)
    implied_var = (var_var.numpy() - m * old_var) / (1 - m)
    np.testing.assert_allclose(implied_mean, batch_mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(implied_var, batch_var, rtol=2e-4)
    assert not np.allclose(implied_var, batch_var * 1024 / 1023, rtol=2e-4)


# ---------------------------------------------------------------------------------------------
# Layers as PyTorch computes them: an independent numpy ResNet with nn.Conv2d(padding=k // 2) and
# nn.MaxPool2d(3, 2, padding=1), fed the Keras weights.


def _np_conv2d(x, w, stride):
    """PyTorch conv2d(padding=k // 2) in float64: x (N, H, W, C), w (k, k, C, F)."""
    k, p = w.shape[0], w.shape[0] // 2
    xp = np.pad(x, [(0, 0), (p, p), (p, p), (0, 0)])
    ho = (x.shape[1] + 2 * p - k) // stride + 1
    wo = (x.shape[2] + 2 * p - k) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for i in range(k):
        for j in range(k):
            patch = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
            out += patch @ w[i, j]
    return out


def _np_maxpool(x, k=3, stride=2):
    """PyTorch max_pool2d(k, stride, padding=k // 2): the border is -inf."""
    p = k // 2
    xp = np.pad(x, [(0, 0), (p, p), (p, p), (0, 0)], constant_values=-np.inf)
    ho = (x.shape[1] + 2 * p - k) // stride + 1
    wo = (x.shape[2] + 2 * p - k) // stride + 1
    out = np.full((x.shape[0], ho, wo, x.shape[3]), -np.inf)
    for i in range(k):
        for j in range(k):
            out = np.maximum(out, xp[:, i:i + stride * (ho - 1) + 1:stride,
                                     j:j + stride * (wo - 1) + 1:stride])
    return out


def _np_bn(x, bn):
    """Inference-mode BatchNorm with the layer's (randomised) statistics and affine."""
    layer = bn.clean
    mean, var, gamma, beta = (np.asarray(v, np.float64) for v in (
        layer.moving_mean, layer.moving_variance, layer.gamma, layer.beta))
    return (x - mean) / np.sqrt(var + layer.epsilon) * gamma + beta


def _randomise_bns(layer, seed):
    rng = np.random.default_rng(seed)
    for bn in [sub for sub in layer._flatten_layers() if isinstance(sub, models.DualBatchNorm)]:
        n = bn.clean.gamma.shape[0]
        bn.clean.moving_mean.assign(rng.normal(0, 0.5, n))
        bn.clean.moving_variance.assign(rng.uniform(0.5, 2.0, n))
        bn.clean.gamma.assign(rng.uniform(0.5, 1.5, n))
        bn.clean.beta.assign(rng.normal(0, 0.5, n))


def _bn_factory(name):
    return models.DualBatchNorm(name=name)


@pytest.mark.parametrize("bottleneck", [False, True])
@pytest.mark.parametrize("size", [8, 9])
def test_downsampling_block_computes_what_pytorch_computes(bottleneck, size):
    """A stride-2 block with its 1x1/2 shortcut == the numpy block with PyTorch's padding."""
    block = models._Block(4, 2, bottleneck, _bn_factory, name="block")
    x = np.random.default_rng(1).normal(size=(2, size, size, 6))
    out = block(tf.constant(x, tf.float32), training=False).numpy()
    _randomise_bns(block, seed=2)
    out = block(tf.constant(x, tf.float32), training=False).numpy()

    ref = x
    for i, (conv, bn) in enumerate(zip(block.convs, block.bns)):
        ref = _np_bn(_np_conv2d(ref, conv.kernel.numpy(), conv.strides[0]), bn)
        if i < len(block.convs) - 1:
            ref = np.maximum(ref, 0)
    shortcut = _np_bn(_np_conv2d(x, block.shortcut_conv.kernel.numpy(), 2), block.shortcut_bn)
    ref = np.maximum(ref + shortcut, 0)
    assert out.shape == ref.shape == (2, (size + 1) // 2, (size + 1) // 2, block.out_filters)
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("size", [32, 33])
def test_imagenet_stem_computes_what_pytorch_computes(size):
    """7x7/2 conv (padding 3), BN, ReLU, 3x3/2 max-pool (padding 1), and the first
    downsampling block after it, as the numpy reference computes them."""
    model = models.ContrastiveModel(arch="resnet10", stem="imagenet", width=0.0625, proj_dim=8)
    x = np.random.default_rng(3).normal(size=(2, size, size, 3))
    model(tf.constant(x, tf.float32))
    _randomise_bns(model, seed=4)
    out = tf.nn.relu(model.stem_bn(model.stem_conv(tf.constant(x, tf.float32))))
    out = model.stem_pool(out).numpy()

    ref = _np_bn(_np_conv2d(x, model.stem_conv.kernel.numpy(), 2), model.stem_bn)
    ref = _np_maxpool(np.maximum(ref, 0))
    n = (size + 2 * 3 - 7) // 2 + 1
    n = (n + 2 - 3) // 2 + 1
    assert out.shape == ref.shape == (2, n, n, model.stem_conv.filters)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # A max-pool input that is negative at the border: -inf padding, not zeros.
    neg = -1.0 - np.random.default_rng(5).uniform(size=(1, 6, 6, 2))
    np.testing.assert_allclose(model.stem_pool(tf.constant(neg, tf.float32)).numpy(),
                               _np_maxpool(neg), atol=1e-6)


def test_building_an_imagenet_stem_model_leaves_no_name_scope_open():
    # A MaxPooling2D subclass behind the stem conv used to leave the model's name scope open:
    # every layer made afterwards got a "clae_model/" path (the export's copies then missed).
    builders.build_model(tiny_config(stem="imagenet", image_size=32))
    layer = keras.layers.Dense(2, name="after")
    layer.build((None, 3))
    assert [v.path for v in layer.variables] == ["after/kernel", "after/bias"]


# ---------------------------------------------------------------------------------------------
# The strided 1x1 shortcut conv, computed as a subsampling and a stride-1 conv (models._Conv2D).


@pytest.mark.parametrize("size", [8, 9])
def test_strided_1x1_conv_is_pytorchs_forward_and_gradients(size):
    """y[n, i, j] = x[n, 2i, 2j] @ w (PyTorch's Conv2d(c, f, 1, stride=2), output size
    floor((size - 1) / 2) + 1), and the gradients of sum(y * g) w.r.t. x and w by hand."""
    conv = models._Conv2D(5, 1, 2, name="shortcut_conv")
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, size, size, 3))  # an even batch: the test process must not crash
    conv.build((None, size, size, 3))
    assert conv.kernel.shape == (1, 1, 3, 5)  # PyTorch's (5, 3, 1, 1), transposed as before
    w = conv.kernel.numpy().astype(np.float64)[0, 0]  # (C, F)
    n_out = (size - 1) // 2 + 1
    g = rng.normal(size=(2, n_out, n_out, 5))

    xt = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = conv(xt)
        loss = tf.reduce_sum(y * tf.constant(g, tf.float32))
    dx, dw = tape.gradient(loss, [xt, conv.kernel])

    y_ref = np.zeros((2, n_out, n_out, 5))
    dx_ref = np.zeros_like(x)
    dw_ref = np.zeros((3, 5))
    for i in range(n_out):
        for j in range(n_out):
            y_ref[:, i, j] = x[:, 2 * i, 2 * j] @ w
            dx_ref[:, 2 * i, 2 * j] = g[:, i, j] @ w.T  # every other pixel gets no gradient
            dw_ref += x[:, 2 * i, 2 * j].T @ g[:, i, j]
    assert y.shape == (2, n_out, n_out, 5)
    assert conv.compute_output_shape((None, size, size, 3)) == (None, n_out, n_out, 5)
    np.testing.assert_allclose(y.numpy(), y_ref, atol=1e-5)
    np.testing.assert_allclose(dx.numpy(), dx_ref, atol=1e-5)
    np.testing.assert_allclose(dw.numpy()[0, 0], dw_ref, atol=1e-4)
    assert dw.shape == conv.kernel.shape


def test_no_strided_1x1_conv_kernel_in_any_model():
    """Every 1x1 conv with stride 2 (the shortcuts of the basic and the bottleneck blocks, under
    either stem) convolves at stride 1 after subsampling; the 3x3/2 and 7x7/2 convs, whose
    gradients oneDNN computes correctly, keep their stride."""
    seen = set()
    for arch, stem in [("resnet18", "cifar"), ("resnet50", "imagenet")]:
        model = builders.build_model(tiny_config(arch=arch, stem=stem, image_size=32))
        for layer in model._flatten_layers():
            if isinstance(layer, models._Conv2D):
                k = layer.kernel_size[0]
                stride = layer.strides[0] * layer.subsample
                seen.add((k, stride))
                assert (layer.strides[0], layer.subsample) == ((1, 2) if (k, stride) == (1, 2)
                                                               else (stride, 1)), layer.name
    assert {(1, 2), (3, 2), (7, 2), (1, 1), (3, 1)} <= seen
