"""Smoke tests of bench/benchmark.py: its FLOP count against a hand count, and its pieces run.

(The train-step reference tests that lived here are in tests/train_test.py.)
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

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


def _load_bench_script(name):
    """bench/<name>.py as a module (the scripts are not a package)."""
    path = os.path.join(os.path.dirname(_BENCH), f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_whole_run():
    return _load_bench_script("whole_run")


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


def test_whole_run_adds_its_outside_timing_to_the_runs_results(tmp_path, monkeypatch, capsys):
    """After the run (here a fake that writes its results.json), its wall time and the load
    around it are merged into results.json (workdir.update_results): what the run wrote stays."""
    whole_run = _load_whole_run()
    workdir = tmp_path / "run"
    written = {"timings": dict(TIMINGS), "step": 57, "knn_top1": 0.25, "linear_top1": 0.5}

    def fake_run(cmd, cwd, check):
        assert cmd[1:3] == ["run.py", "--flagfile=flags/cifar10_small_clae.cfg"]
        assert f"--workdir={workdir}" in cmd and cmd[-1] == "--epochs=1"
        workdir.mkdir()
        (workdir / "results.json").write_text(json.dumps(written))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(whole_run.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["whole_run.py", f"--workdir={workdir}", "--", "--epochs=1"])
    whole_run.main()
    results = json.loads((workdir / "results.json").read_text())
    assert {k: results.pop(k) for k in written} == written
    assert sorted(results) == ["load_before_after", "wall_seconds_outside"]
    assert results["wall_seconds_outside"] >= 0 and len(results["load_before_after"]) == 2
    assert "| wall (outside) |" in capsys.readouterr().out


# -------------------------------------------------------- bench/robust_speed.py

def _robust_speed():
    return _load_bench_script("robust_speed")


def _linear_saved_model(rs, tmp_path):
    """The --smoke SavedModel and its weights (w: (8*8*3, 10), b: (10,)) read back as numpy."""
    import tensorflow as tf
    path = str(tmp_path / "linear")
    rs.smoke_model(path, seed=3)
    model = tf.saved_model.load(path)
    return model, model.w.numpy(), model.b.numpy()


def test_robust_speed_loads_the_class_balanced_subset_of_a_folder(tmp_path):
    import tensorflow as tf
    rs = _robust_speed()
    rng = np.random.default_rng(0)
    pixels = {}
    for cls in ("cat", "ant"):  # sorted: ant = 0, cat = 1
        (tmp_path / cls).mkdir()
        for i in range(3):
            image = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
            pixels[cls, i] = image
            (tmp_path / cls / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    x, y = rs.load_images(str(tmp_path), 4)
    # Classes take turns: ant's first, cat's first, ant's second, cat's second; in file order.
    np.testing.assert_array_equal(y, [0, 0, 1, 1])
    expected = [pixels["ant", 0], pixels["ant", 1], pixels["cat", 0], pixels["cat", 1]]
    np.testing.assert_allclose(x, np.stack(expected) / 255.0, atol=1e-7)
    assert x.dtype == np.float32


def test_robust_speed_art_wrapper_gives_the_closed_form_gradient(tmp_path):
    """ART's classifier around the loaded SavedModel: logits x W + b, and the input gradient of
    the mean cross-entropy (softmax(logits) - onehot(y)) W^T / N."""
    pytest.importorskip("art")
    rs = _robust_speed()
    model, w, b = _linear_saved_model(rs, tmp_path)
    x = np.random.default_rng(1).uniform(0, 1, (6, 8, 8, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 4, 9])
    clf = rs.art_classifier(model.serve, 10, (8, 8, 3))
    logits = x.reshape(6, -1) @ w + b
    np.testing.assert_allclose(clf.predict(x), logits, rtol=1e-5, atol=1e-4)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = ((p - np.eye(10)[y]) @ w.T / len(x)).reshape(x.shape)
    np.testing.assert_allclose(clf.loss_gradient(x, np.eye(10)[y]), expected, rtol=1e-4,
                               atol=1e-7)


def test_robust_speed_counts_robust_images_and_checks_the_ball(tmp_path):
    rs = _robust_speed()
    model, w, b = _linear_saved_model(rs, tmp_path)
    rng = np.random.default_rng(2)
    x = rng.uniform(0.1, 0.9, (8, 8, 8, 3)).astype(np.float32)
    pred = np.argmax(x.reshape(8, -1) @ w + b, 1)
    x_adv = x[::-1].copy()  # the images reversed: pred[::-1] on them
    y = np.where(np.arange(8) < 6, pred, pred[::-1])  # the last two: wrong clean, right "adv"
    clean, adv = pred == y, pred[::-1] == y  # every case is there: right/wrong clean and adv
    assert (clean & adv).any() and (clean & ~adv).any() and (~clean & adv).any()
    out = rs.robust_top1(model.serve, x, y, x_adv, 8 / 255, batch_size=3)
    assert out["robust_top1"] == pytest.approx(100 * np.mean(clean & adv))
    np.testing.assert_array_equal(out["robust"], clean & adv)
    # Robust under a: 0, 3, 4; under b: 0, 1. a fooled image 1 only, b images 3 and 4.
    assert rs.fooled_only({"a": np.array([1, 0, 0, 1, 1], bool),
                           "b": np.array([1, 1, 0, 0, 0], bool)}) == {"a": 1, "b": 2}
    assert rs.fooled_only({"a": np.array([1, 0, 0, 1], bool)}) == {}
    x_adv = np.clip(x + rng.choice([-1, 1], x.shape) * 0.5 / 255, 0, 1).astype(np.float32)
    out = rs.robust_top1(model.serve, x, y, x_adv, 0.5 / 255, batch_size=3)
    assert out["linf_255"] == pytest.approx(0.5, rel=1e-4) and out["in_range"]
    assert not rs.robust_top1(model.serve, x, y, x_adv + 0.2, 0.5 / 255, 3)["in_range"]
    rows = [dict(attack="A", implementation="ours", robust_top1=40.0, eps_255=0.5,
                 linf_255=out["linf_255"], in_range=True),
            dict(attack="A", implementation="lib", robust_top1=41.0, eps_255=0.5,
                 linf_255=0.5, in_range=True)]
    assert rs.disagreements(rows) == []  # within a point, inside the ball
    rows[1].update(robust_top1=41.5, linf_255=0.51)
    notes = rs.disagreements(rows)
    assert len(notes) == 2 and notes[0].startswith("error: A (lib)")
    assert notes[1] == "note: A: robust top-1 differs by 1.5 points between the implementations"
    rows[0]["fooled_only"], rows[1]["fooled_only"] = 4, 1
    assert rs.disagreements(rows)[1].endswith("(images fooled: 4 only by ours, 1 only by lib)")


def test_robust_speed_interleaves_and_reports_medians():
    rs = _robust_speed()
    calls = []

    def impl(name):
        return lambda x, y: (calls.append(name), (x, {}))[1]

    t = rs.interleave({"a": impl("a"), "b": impl("b")}, np.zeros(1), np.zeros(1), repeats=3)
    assert calls == ["a", "a", "b", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, alternating
    assert len(t["a"]["seconds"]) == len(t["_load"]) == 3
    # 100 images x 10 iterations; ours 2, 4, 3 s, theirs 10, 9, 12 s in the same rounds.
    timed = {"ours": {"seconds": [2.0, 4.0, 3.0], "info": {"model_images": 250}},
             "lib": {"seconds": [10.0, 9.0, 12.0], "info": {"model_images": 2100}},
             "_load": [1, 2, 3]}
    checks = {name: dict(robust_top1=50.0, linf_255=8.0, in_range=True, eps_255=8.0)
              for name in ("ours", "lib")}
    ours, lib = rs.summarize("APGD-CE, 10 it.", timed, checks, 100, 10)
    assert ours["throughput"] == pytest.approx(1000 / 3) and lib["throughput"] == 100.0
    assert ours["ratio"] == pytest.approx(10 / 3)  # ratio of the medians
    assert ours["round_ratio"] == pytest.approx(4.0)  # median of 5, 2.25, 4
    text = rs.table([ours, lib])
    assert "| APGD-CE, 10 it. | ours | 3.00 (2.00-4.00) | 333 images x iterations/s | " \
           "**3.33x** (4.00x) | 2.5 | 50.0 |" in text
    assert "| APGD-CE, 10 it. | lib | 10.00 (9.00-12.00) | 100 images x iterations/s |  | " \
           "21.0 | 50.0 |" in text


def test_robust_speed_library_builds_only_the_attacks_with_a_budget(tmp_path):
    """--steps=0 or --queries=0 skips that attack: ART's constructors refuse max_iter=0."""
    pytest.importorskip("art")
    rs = _robust_speed()
    model, _, _ = _linear_saved_model(rs, tmp_path)
    for steps, queries, names in ((0, 7, {"square"}), (5, 0, {"apgd"}), (5, 7, {"apgd", "square"})):
        args = rs.parse_args(["--smoke", "--library=art"])
        args.steps, args.queries = steps, queries
        assert set(rs.library(model.serve, 10, (8, 8, 3), 8 / 255, args)) == names


def test_robust_speed_refuses_foolbox(capsys):
    rs = _robust_speed()
    with pytest.raises(SystemExit) as exit_info:
        rs.parse_args(["--smoke", "--library=foolbox"])
    assert exit_info.value.code == 2
    assert "--library: foolbox 3.3 has neither APGD nor Square" in capsys.readouterr().err


@pytest.mark.slow  # 5-13 s on 2 busy cores: tracing the compiled APGD and Square loops
def test_robust_speed_smoke_runs_our_attacks_and_the_library_if_installed(tmp_path):
    """`--smoke` end to end: clae-tf's half always, ART's beside it only where ART is installed
    (the "bench" extra; CI installs "test" only)."""
    import json
    has_art = importlib.util.find_spec("art") is not None
    rs = _robust_speed()
    path = tmp_path / "out.json"
    assert rs.main(["--smoke", f"--library={'art' if has_art else 'none'}",
                    f"--json={path}"]) == 0
    result = json.loads(path.read_text())
    rows = result["rows"]
    names = ["clae-tf", "ART"] if has_art else ["clae-tf"]
    assert [(r["attack"], r["implementation"]) for r in rows] == [
        (attack, name) for attack in ("APGD-CE, 5 it.", "Square, 20 q.") for name in names]
    for r in rows:  # 16 images, 5 iterations or 20 queries, the budget over the median time
        budget = 5 if r["attack"].startswith("APGD") else 20
        assert r["throughput"] == pytest.approx(16 * budget / np.median(r["seconds"]))
        assert len(r["seconds"]) == 2 and r["linf_255"] <= 8.0 + 1e-3 and r["in_range"]
        assert r["robust_top1"] <= result["clean_top1"]
        assert 1 <= r["passes"]  # every image goes through the model at least once
    if has_art:
        assert "ratio" in rows[0] and "ratio" in rows[2]
        assert all(isinstance(r["fooled_only"], int) for r in rows)


# -------------------------------------------------------- bench/gpu_check.py

def _json_leaves(value, path=""):
    """(path, leaf) of every number, bool, string and null under a JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _json_leaves(v, f"{path}/{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _json_leaves(v, f"{path}/{i}")
    else:
        yield path, value


def _measured_or_skipped(value, key):
    """A cell of gpu_check.json: a dict whose `key` is a positive number, or a skip reason."""
    if isinstance(value, str):
        return value.startswith("skipped: ") and len(value) > len("skipped: ")
    return isinstance(value, dict) and value[key] > 0


@pytest.mark.slow  # 30-80 s on 2 CPU cores: a subprocess importing TF and tracing 4 steps
def test_gpu_check_smoke_reports_every_section(tmp_path):
    """`bench/gpu_check.py --smoke` on this machine: every section with numbers or a skip
    reason, nothing raised, and the float32-vs-bf16 step comparison in finite numbers."""
    import math
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(_BENCH), "gpu_check.py"),
                           "--smoke", f"--out={out}"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RESULT:" in proc.stdout
    result = json.loads(out.read_text())
    assert result["errors"] == []
    sections = ("device", "precision", "xla", "throughput", "pipeline", "attacks")
    assert all(s in result for s in sections)
    for s in sections:
        for path, leaf in _json_leaves(result[s]):
            assert not (isinstance(leaf, str) and leaf.startswith("error")), (s + path, leaf)
            if isinstance(leaf, float) and s != "precision":
                assert math.isfinite(leaf), (s + path, leaf)
    device = result["device"]
    assert any("CPU" in d for d in device["physical_devices"]) and "gpu" in device

    # (a): bf16 ran and differs from float32 by finite, small-ish amounts; fp16 and TF32
    # rows are numbers on a GPU, skip reasons on a CPU.
    precision = result["precision"]
    bf16 = precision["bf16"]
    for key in ("loss", "loss_ref", "loss_rel_diff", "update_rel_diff", "update_cosine",
                "weights_rel_diff", "perturbed_fraction", "perturbation_sign_agreement"):
        assert math.isfinite(bf16[key]), (key, bf16[key])
    assert bf16["finite"] and isinstance(bf16["pass"], bool)
    assert 0 < bf16["update_rel_diff"] < 1 and bf16["update_cosine"] > 0.5
    assert bf16["loss_rel_diff"] < 0.05
    for row in ("fp16", "float32_tf32"):
        assert _measured_or_skipped(precision[row], "loss"), precision[row]
    if result["device"]["gpu"] is None:
        assert precision["fp16"].startswith("skipped: no GPU")

    # (b): the repeat is the noise floor (0 on a CPU); XLA measured or skipped.
    xla = result["xla"]
    assert math.isfinite(xla["float32_repeat"]["update_rel_diff"])
    assert _measured_or_skipped(xla["xla_vs_no_xla"], "first_call_s")

    # (c): every method x precision x XLA cell; float32 and bf16 without XLA always run.
    cells = result["throughput"]["results"]
    for method in ("simclr", "clae"):
        for p in ("float32", "bf16", "fp16"):
            for key in ("xla_off", "xla_on"):
                assert _measured_or_skipped(cells[method][p][key], "img_s"), (method, p, key)
            if p != "fp16":
                assert cells[method][p]["xla_off"]["img_s"] > 0

    # (d) and (e).
    for key in ("generated_folder", "digits"):
        assert result["pipeline"][key]["pairs_s"] > 0
    attacks = result["attacks"]
    assert attacks["pgd20"]["images_s"] > 0
    # The start and 20 steps at most per image; an image left standing takes all 21 passes.
    pgd = attacks["pgd20"]
    assert (1 - pgd["fooled_fraction"]) * 21 <= pgd["model_passes_per_image"] <= 21, pgd
    for name in ("apgd-ce", "square"):
        assert _measured_or_skipped(attacks[name], "images_s"), attacks[name]
