"""Smoke tests of bench/benchmark.py: its FLOP count against a hand count, and its pieces run.

(The train-step reference tests that lived here are in tests/train_test.py.)
"""

import dataclasses
import importlib.util
import os

import keras
import numpy as np
import pytest

from conftest import tiny_config

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                      "benchmark.py")


def _benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", _BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


# A 57-step run's timings (seconds) as results.json records them.
TIMINGS = dict(startup_seconds=9.0, data_load_seconds=1.0, train_data_setup_seconds=4.0,
               train_first_call_seconds=50.0, train_first_call_steps=10,
               train_calls_seconds=94.0, train_loop_seconds=160.0, eval_seconds=30.0,
               total_seconds=205.0)


def test_whole_run_breakdown_from_recorded_timings():
    """57 steps, the first call 10 of them: 47 later steps in 94 s -> 2 s/step, so the first
    call's 50 s are 20 s of steps and 30 s of compiling; the host's share is what the loop
    spent outside set-up and calls: 160 - 4 - 50 - 94 = 12 s (7.5%)."""
    whole_run = _load_whole_run()
    t = dict(TIMINGS)
    rows = {name.strip(): (seconds, note) for name, seconds, note in whole_run.breakdown(t, 57)}
    assert rows["compile (est.)"][0] == pytest.approx(30.0)
    assert rows["host (outside calls)"][0] == pytest.approx(12.0)
    assert rows["host (outside calls)"][1].startswith("7.5% of the loop")
    assert rows["steps"][1] == "47 steps, 2.000 s/step"
    assert rows["export"][0] is None  # --noexport
    assert "| export | - |" in whole_run.table(whole_run.breakdown(t, 57))


def test_whole_run_breakdown_lists_the_parts_of_evaluation_under_it():
    whole_run = _load_whole_run()
    t = dict(TIMINGS)
    names = [name for name, _, _ in whole_run.breakdown(
        t, 57, {"features": 5.0, "probe": 3.0, "knn": 1.0, "robust": 21.0})]
    at = names.index("eval")
    assert names[at + 1:at + 6] == ["  features", "  probe", "  knn", "  robust", "export"]
    # A run without robust evaluation (--robust_eps=) has no robust row.
    names = [name for name, _, _ in whole_run.breakdown(t, 57, {"features": 5.0, "probe": 3.0,
                                                                 "knn": 1.0})]
    assert "  robust" not in names and "  knn" in names


def test_whole_run_breakdown_splits_the_online_eval_out_of_the_host_time():
    whole_run = _load_whole_run()
    t = dict(TIMINGS)
    rows = {name.strip(): (seconds, note) for name, seconds, note in
            whole_run.breakdown(t, 57, online_seconds=8.0)}
    assert rows["host (outside calls)"][0] == pytest.approx(12.0)  # 160 - 4 - 50 - 94
    assert rows["online eval"][0] == pytest.approx(8.0)
    assert rows["the rest"][0] == pytest.approx(4.0)
    assert rows["the rest"][1].startswith("2.5% of the loop")  # 4 / 160
    assert "online eval" not in {n.strip() for n, _, _ in whole_run.breakdown(t, 57)}
