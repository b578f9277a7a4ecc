"""The optimised CLAE train step against a literal PAPER.md step 3; smoke of bench/benchmark.py.

train.make_train_step runs the attack as ONE forward pass of the adversarial branch with an
input-only gradient (attacks.fgsm), and BN as one fused op (models.py). Here the whole train step
(x_adv, the three losses, the weights after the optimizer step) is compared with a straightforward
version: two forward passes of the adversarial branch, L(model_adv(x1), model_adv(x_adv)),
differentiated with the parameters recorded, through Keras' own BatchNormalization layers.
(tests/attacks_test.py checks fgsm alone.)
"""

import dataclasses
import importlib.util
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from clae_tf import builders, checkpoints, losses, models, train
from conftest import tiny_config

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                      "benchmark.py")


def _benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", _BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _keras_bn(model, x, training, adversarial):
    """The model's forward with every DualBatchNorm going through the plain Keras BN layer."""
    original = models._can_fuse
    models._can_fuse = lambda bn, x: False
    try:
        return model(x, training=training, adversarial=adversarial)
    finally:
        models._can_fuse = original


def reference_step(model, optimizer, cfg, x1, x2):
    """PAPER.md "The CLAE step", literally (no shortcut, no fused BN)."""
    base = losses.PAIR_LOSSES[cfg.method]
    # Step 3: x_adv starts at x1; both arguments through the adversarial branch in training
    # mode; the tape records the parameters too; one signed-gradient step w.r.t. x_adv only.
    x_adv = tf.identity(x1)
    with tf.GradientTape() as tape:
        tape.watch(x_adv)
        _, z_a = _keras_bn(model, x1, True, True)
        _, z_b = _keras_bn(model, x_adv, True, True)
        attack_loss, _, _ = base(z_a, z_b, cfg.temperature)
    grad_x, _unused_param_grads = tape.gradient(attack_loss, [x_adv, model.trainable_variables])
    x_adv = tf.stop_gradient(x1 + cfg.eps * tf.sign(grad_x))
    # Steps 2 and 4.
    with tf.GradientTape() as tape:
        _, z1 = _keras_bn(model, x1, True, False)
        _, z2 = _keras_bn(model, x2, True, False)
        clean_loss, _, _ = base(z1, z2, cfg.temperature)
        _, z_adv = _keras_bn(model, x_adv, True, True)
        adv_loss, _, _ = base(z1, z_adv, cfg.temperature)
        loss = clean_loss + cfg.alpha * adv_loss
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return {"loss": loss, "clean_loss": clean_loss, "adv_loss": adv_loss}, x_adv, grad_x


def _model_and_optimizer(cfg):
    keras.utils.set_random_seed(cfg.seed)
    model = builders.build_model(cfg)
    optimizer = checkpoints.build_optimizer(cfg, 1, 1)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def _views(cfg, seed):
    shape = [cfg.batch_size, cfg.image_size, cfg.image_size, 3]
    return (tf.random.stateless_uniform(shape, [seed, 1], -1.0, 1.0),
            tf.random.stateless_uniform(shape, [seed, 2], -1.0, 1.0))


def test_optimized_step_matches_literal_paper_step():
    cfg = tiny_config(batch_size=8)
    fast_model, fast_opt = _model_and_optimizer(cfg)
    ref_model, ref_opt = _model_and_optimizer(cfg)
    for a, b in zip(fast_model.variables, ref_model.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    fast_step = tf.function(train.make_train_step(fast_model, fast_opt, cfg, num_replicas=1))
    clean_stats = [v for v in fast_model.variables if "/bn/moving_" in v.path]
    ref_clean_stats = [v for v in ref_model.variables if "/bn/moving_" in v.path]
    for step in range(2):  # the second step starts from updated weights and statistics
        x1, x2 = _views(cfg, step)
        metrics, images, _ = fast_step(x1, x2)
        ref_metrics, ref_x_adv, grad_x = reference_step(ref_model, ref_opt, cfg, x1, x2)
        for k in ("loss", "clean_loss", "adv_loss"):
            np.testing.assert_allclose(float(metrics[k]), float(ref_metrics[k]), rtol=1e-5)
        # x_adv = x1 +- eps everywhere; the same sign wherever the gradient is not ~0 (the
        # two ways of computing it round differently in the last bits).
        got, want = images["x_adv"].numpy(), ref_x_adv[:4].numpy()
        np.testing.assert_allclose(np.abs(got - x1[:4].numpy()), cfg.eps, rtol=1e-4)
        g = np.abs(grad_x[:4].numpy())
        clear = g > 1e-3 * g.max()
        np.testing.assert_array_equal(got[clear], want[clear])
        assert np.mean(got != want) < 1e-3
        # Adam moves every weight by ~lr * sign(g) on the first steps, so where |g| is near
        # Adam's epsilon, last-bit differences of g show: compare at a few % of the lr.
        atol = 0.03 * cfg.learning_rate
        for a, b in zip(fast_model.trainable_variables, ref_model.trainable_variables):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=atol, err_msg=a.path)
        for a, b in zip(clean_stats, ref_clean_stats):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)


def test_bf16_step_close_to_float32_and_x_adv_on_the_eps_sphere():
    cfg = tiny_config(batch_size=16)
    x1, x2 = _views(cfg, 3)
    out = {}
    for precision, policy in (("float32", "float32"), ("bf16", "mixed_bfloat16")):
        keras.mixed_precision.set_global_policy(policy)
        try:
            model, optimizer = _model_and_optimizer(dataclasses.replace(cfg, precision=precision))
            # Eagerly: tracing costs more than the step here (the compiled step is tested above).
            metrics, images, _ = train.make_train_step(model, optimizer, cfg, num_replicas=1)(x1, x2)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        assert metrics["loss"].dtype == tf.float32 and images["x_adv"].dtype == tf.float32
        out[precision] = metrics, images
        delta = np.abs(images["x_adv"].numpy() - images["x"].numpy())
        np.testing.assert_allclose(delta, cfg.eps, rtol=1e-3)  # no sign(0) from an underflow
    for k in ("loss", "clean_loss", "adv_loss"):
        np.testing.assert_allclose(float(out["bf16"][0][k]), float(out["float32"][0][k]),
                                   rtol=0.02)


# ------------------------------------------------------------------ bench/benchmark.py smoke

def test_flop_count_matches_hand_count():
    bench = _benchmark()
    cfg = tiny_config(adversarial=False, arch="resnet10", width=0.0625, image_size=16)
    f = bench.forward_flops(cfg)
    # ResNet-10 x1/16 (4-8-16-32 channels), 16x16, CIFAR stem: 3x3 convs, 1x1 shortcuts.
    hw = [16 * 16, 8 * 8, 4 * 4, 2 * 2]
    ch = [4, 8, 16, 32]
    macs = hw[0] * 9 * 3 * ch[0]  # stem
    for s in range(4):
        c_in = ch[max(s - 1, 0)]
        macs += hw[s] * 9 * (c_in * ch[s] + ch[s] * ch[s])
        if s > 0:
            macs += hw[s] * c_in * ch[s]
    macs += 32 * 32 + 32 * cfg.proj_dim  # projection head: 32 -> 32 -> proj_dim
    assert f["forward"] == 2 * macs
    assert f["stem"] == 2 * hw[0] * 9 * 3 * ch[0]
    assert f["profiler"] >= f["forward"]
    s = bench.step_flops(f)
    assert s["simclr"] == 2 * (3 * f["forward"] - f["stem"])
    assert s["clae"] == s["simclr"] + 2 * f["forward"] + 2 * f["forward"] - f["stem"] + f["forward"]
    assert 1.8 < s["ratio"] < 1.85


def test_benchmark_pieces_run(capsys):
    bench = _benchmark()
    args = bench.parse_args(["--quick", "--arch=resnet10", "--batch_size=8", "--image_size=16",
                             "--rounds=2", "--warmup=0", "--matmul_size=64",
                             "--pipeline_batches=2", "--precisions=float32"])
    calls = []
    t = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                          rounds=2, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a"]  # warm-up, then alternating order
    assert len(t["a"]["wall"]) == len(t["_load"]) == 2
    cfg = bench.make_config("resnet10", 0.0625, 8, 16, False)  # SimCLR: quicker to trace
    assert np.isfinite(bench.build_step(dataclasses.replace(cfg, precision="bf16"))())
    assert keras.mixed_precision.global_policy().name == "float32"
    pipeline = bench.bench_pipeline(args)
    assert pipeline["img_s"] > 0
    fake = {"cpu": "test CPU", "flops": {0.0625: bench.forward_flops(cfg)},
            "steps": [{"width": 0.0625, "precision": "float32", "simclr_img_s": 20.0,
                       "clae_img_s": 11.0, "ratio": 1.82, "ratio_round_median": 1.8,
                       "ratio_round_iqr": [1.7, 1.9], "ratio_cpu": 1.83, "ratio_best": 1.8,
                       "clae_gflops": 1.0,
                       "matmul_gflops": 2.0, "clae_vs_matmul": 0.5, "simclr_vs_matmul": 0.5,
                       "load": [1.0, 1.0, 1.0], "clae_cpu_s": 1.0}],
            "pipeline": pipeline,
            "memory": [{"width": 0.0625, "precision": "float32", "peak_rss_mb": 900.0,
                        "rss_before_steps_mb": 800.0, "ru_maxrss_mb": 1000.0}]}
    text = bench.report(args, fake)
    assert "| x0.0625 | float32 | 20.0 | 11.0 | **1.820**" in text
    assert "Peak RSS" in text and "Input pipeline alone" in text


def _load_whole_run():
    path = os.path.join(os.path.dirname(_BENCH), "whole_run.py")
    spec = importlib.util.spec_from_file_location("whole_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_whole_run_breakdown_from_recorded_timings():
    """57 steps, the first call 10 of them: 47 later steps in 94 s -> 2 s/step, so the first
    call's 50 s are 20 s of steps and 30 s of compiling; the host's share is what the loop
    spent outside set-up and calls: 160 - 4 - 50 - 94 = 12 s (7.5%)."""
    whole_run = _load_whole_run()
    t = dict(startup_seconds=9.0, data_load_seconds=1.0, train_data_setup_seconds=4.0,
             train_first_call_seconds=50.0, train_first_call_steps=10, train_calls_seconds=94.0,
             train_loop_seconds=160.0, eval_seconds=30.0, total_seconds=205.0)
    rows = {name.strip(): (seconds, note) for name, seconds, note in whole_run.breakdown(t, 57)}
    assert rows["compile (est.)"][0] == pytest.approx(30.0)
    assert rows["host (outside calls)"][0] == pytest.approx(12.0)
    assert rows["host (outside calls)"][1].startswith("7.5% of the loop")
    assert rows["steps"][1] == "47 steps, 2.000 s/step"
    assert rows["export"][0] is None  # --noexport
    assert "| export | - |" in whole_run.table(whole_run.breakdown(t, 57))
