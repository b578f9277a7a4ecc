"""The larger protocols' tooling: the sweep scripts (order, skip, resume, sweep.jsonl) with a
fake python, scripts/compare.py's paired differences, robust columns and sweep records against
hand-computed numbers, and bench/step_cost.py's arithmetic."""

import importlib.util
import json
import os
import shutil
import subprocess

import pytest
import tensorflow as tf

from clae_tf.runtime.config import Config

from conftest import REPO


def _load(path, name):
    # Offline tools, not modules of the training package: loaded from their files.
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = _load("scripts/compare.py", "compare")

# ---------------------------------------------------------------- the sweep scripts

FAKE_PYTHON = """#!/usr/bin/env bash
# Records each call; "run.py" finishes its --workdir (results.json) unless FAIL_ON matches it.
echo "$*" >> "$CALLS"
if [[ "$1" == run.py ]]; then
  for a in "$@"; do [[ "$a" == --workdir=* ]] && w="${a#--workdir=}"; done
  [[ -d "$w" ]] || { echo "no workdir $w" >&2; exit 3; }
  if [[ -n "${FAIL_ON:-}" && "$w" == *"/$FAIL_ON" ]]; then exit 2; fi
  echo '{}' > "$w/results.json"
fi
"""


def _sweep(tmp_path, script, env=None):
    """Runs scripts/<script> ROOT --dataset=/data with the fake python; returns (exit code,
    [calls as argument lists], root)."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    root = tmp_path / "root"
    full_env = dict(os.environ, PYTHON=str(fake), CALLS=str(calls), LOAD_EVERY="1", **(env or {}))
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", script), str(root),
                           "--dataset=/data"], cwd=tmp_path, env=full_env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    lines = calls.read_text().splitlines() if calls.exists() else []
    calls.unlink(missing_ok=True)
    return proc.returncode, [line.split() for line in lines], root


def _runs(calls, root):
    """(workdir name, the run.py arguments other than --workdir and the extra flag) per run."""
    out = []
    for call in calls:
        if call[0] != "run.py":
            continue
        workdir = next(a.split("=", 1)[1] for a in call if a.startswith("--workdir="))
        assert os.path.dirname(workdir) == str(root)
        assert call[-1] == "--dataset=/data"  # the sweep's extra flags come last
        out.append((os.path.basename(workdir),
                    [a for a in call[1:-1] if not a.startswith("--workdir=")]))
    return out


def _events(workdir):
    with open(os.path.join(workdir, "sweep.jsonl")) as f:
        return [json.loads(line) for line in f]


FULL_ORDER = [
    ("simclr_seed0", ["--flagfile=flags/cifar10_full_simclr.cfg", "--seed=0"]),
    ("clae_seed0", ["--flagfile=flags/cifar10_full_clae.cfg", "--seed=0"]),
    ("simclr_seed1", ["--flagfile=flags/cifar10_full_simclr.cfg", "--seed=1"]),
    ("clae_seed1", ["--flagfile=flags/cifar10_full_clae.cfg", "--seed=1"]),
]


def test_full_sweep_stops_at_a_failed_run_then_resumes_only_it(tmp_path):
    code, calls, root = _sweep(tmp_path, "cifar10_full.sh",
                               dict(SEEDS="0 1", FAIL_ON="clae_seed1"))
    assert code == 2
    assert _runs(calls, root) == FULL_ORDER  # pairs in order; no table after a failure
    assert all(call[0] == "run.py" for call in calls)
    # Again: the finished runs are skipped, the failed one runs again (run.py resumes it from
    # its checkpoint), then the table of all four.
    code, calls, root = _sweep(tmp_path, "cifar10_full.sh", dict(SEEDS="0 1"))
    assert code == 0
    assert _runs(calls, root) == FULL_ORDER[3:]
    workdirs = [str(root / name) for name, _ in FULL_ORDER]
    assert calls[-1] == ["scripts/compare.py", *workdirs, "--out", str(root / "compare")]
    events = _events(root / "clae_seed1")
    assert [e["event"] for e in events if e["event"] != "load"] == ["start", "end"] * 2
    assert [e["exit"] for e in events if e["event"] == "end"] == [2, 0]
    start = events[0]
    assert start["preset"] == "--flagfile=flags/cifar10_full_clae.cfg --seed=1"
    assert start["extra"] == "--dataset=/data"
    assert len(start["commit"]) == 40 and start["dirty"] in (True, False)
    assert len(start["loadavg"]) == 3 and start["cores"] >= 1
    sweep = compare.read_sweep(str(root / "clae_seed1"))
    assert sweep["processes"] == 2 and sweep["wall_seconds"] >= 0
    assert [e["event"] for e in _events(root / "simclr_seed0")
            if e["event"] != "load"] == ["start", "end"]  # skipped: nothing appended
    # The small result files of every run, beside the table, to keep in the repository.
    for name, _ in FULL_ORDER:
        kept = root / "compare" / "runs" / name
        assert sorted(os.listdir(kept)) == ["results.json", "sweep.jsonl"]  # (no flags.cfg here)
        assert (kept / "sweep.jsonl").read_text() == (root / name / "sweep.jsonl").read_text()


@pytest.mark.parametrize("script, env, expected", [
    ("cifar10_small.sh", dict(SEEDS="0 1"), [
        (f"{m}_seed{s}", [f"--flagfile=flags/cifar10_small_{m}.cfg", f"--seed={s}"])
        for s in (0, 1) for m in ("simclr", "clae")]),
    ("cifar10_small_methods.sh", dict(SEED="1"), [
        ("simclr", ["--flagfile=flags/cifar10_small_simclr.cfg", "--seed=1"]),
        ("simclr_clae", ["--flagfile=flags/cifar10_small_clae.cfg", "--seed=1"])] + [
        (f"{m}{c}", ["--flagfile=flags/cifar10_small_common.cfg", f"--method={m}"]
         + (["--adversarial"] if c else []) + ["--seed=1"])
        for m in ("plain", "uel", "moco") for c in ("", "_clae")]),
    ("cifar10_small_methods.sh", dict(METHODS="uel simclr"), [
        ("uel", ["--flagfile=flags/cifar10_small_common.cfg", "--method=uel", "--seed=0"]),
        ("uel_clae", ["--flagfile=flags/cifar10_small_common.cfg", "--method=uel",
                      "--adversarial", "--seed=0"]),
        ("simclr", ["--flagfile=flags/cifar10_small_simclr.cfg", "--seed=0"]),
        ("simclr_clae", ["--flagfile=flags/cifar10_small_clae.cfg", "--seed=0"])]),
    ("tinyimagenet_small.sh", dict(SEEDS="0"), [
        ("simclr_seed0", ["--flagfile=flags/tinyimagenet_small_simclr.cfg", "--seed=0"]),
        ("clae_seed0", ["--flagfile=flags/tinyimagenet_small_clae.cfg", "--seed=0"])]),
    ("cifar10_small_baselines.sh", dict(SEEDS="0 1"), [
        (f"{m}{c}_seed{s}", ["--flagfile=flags/cifar10_small_common.cfg", f"--method={m}"]
         + (["--adversarial"] if c else []) + [f"--seed={s}"])
        for s in (0, 1) for m in ("plain", "uel") for c in ("", "_clae")]),
    ("cifar10_small_baselines.sh", dict(SEEDS="2", BASELINES="moco"), [
        ("moco_seed2", ["--flagfile=flags/cifar10_small_common.cfg", "--method=moco",
                        "--seed=2"]),
        ("moco_clae_seed2", ["--flagfile=flags/cifar10_small_common.cfg", "--method=moco",
                             "--adversarial", "--seed=2"])]),
])
def test_sweeps_run_complete_pairs_in_order_and_skip_finished_runs(tmp_path, script, env,
                                                                   expected):
    code, calls, root = _sweep(tmp_path, script, env)
    assert code == 0
    assert _runs(calls, root) == expected
    assert calls[-1][0] == "scripts/compare.py"
    for name, args in expected:
        assert os.path.exists(os.path.join(REPO, args[0].split("=", 1)[1]))
        # sweep_run's record of the run, and the run's small files kept beside the table.
        events = _events(root / name)
        assert events[0]["preset"] == " ".join(args) and events[0]["extra"] == "--dataset=/data"
        assert events[-1]["event"] == "end" and events[-1]["exit"] == 0
        kept = root / "compare" / "runs" / name
        assert sorted(os.listdir(kept)) == ["results.json", "sweep.jsonl"]
    code, calls, root = _sweep(tmp_path, script, env)
    assert code == 0 and _runs(calls, root) == []  # all finished: only the table again
    assert calls == [["scripts/compare.py", *(str(root / n) for n, _ in expected), "--out",
                      str(root / "compare")]]


# ---------------------------------------------------------------- compare.py

# (adversarial, seed, knn, linear, worst L-inf {1, 8}/255, worst L2 0.5), in [0, 1].
RUNS = [(False, 0, 0.40, 0.50, (0.10, 0.00), 0.00), (True, 0, 0.42, 0.51, (0.35, 0.07), 0.20),
        (False, 1, 0.41, 0.52, (0.12, 0.00), 0.01), (True, 1, 0.41, 0.52, (0.30, 0.05), 0.21),
        (False, 2, 0.45, 0.51, (0.08, 0.00), 0.00), (True, 2, 0.48, 0.50, (0.34, 0.06), 0.22)]


def _fake_run(root, adversarial, seed, knn, linear, linf, l2, online=()):
    workdir = os.path.join(root, f"{'clae' if adversarial else 'simclr'}_seed{seed}")
    os.makedirs(workdir)
    cfg = Config(dataset="/data/cifar10", adversarial=adversarial, seed=seed, workdir=workdir)
    with open(os.path.join(workdir, "flags.cfg"), "w") as f:
        f.write(cfg.to_flagfile())
    results = {"knn_top1": knn, "linear_top1": linear, "step": 30, "seed": seed,
               "steps_per_epoch": 10, "wall_seconds_this_process": 600.0,
               "train_seconds_this_process": 540.0,
               # keys as results.json has them: strings, sorted as strings
               "robust_top1": {"pgd20": {"1": 0.5, "8": 0.5},
                               "worst": {"1": linf[0], "8": linf[1]}},
               "robust_top1_l2": {"worst": {"0.5": l2}}}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, sort_keys=True)
    if online:
        writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
        with writer.as_default():
            for step, value in online:
                tf.summary.scalar("eval/knn_top1_online", value, step=step)
        writer.close()
    return workdir


@pytest.fixture
def groups(tmp_path):
    return compare.group_runs([compare.load_run(_fake_run(str(tmp_path), *r)) for r in RUNS])


def test_paired_differences_by_seed_against_hand_computed_numbers(groups):
    table = compare.markdown_table(groups)
    names = "| kNN | linear | worst 1/255 | worst 8/255 | worst L2 0.5 |"
    # CLAE - SimCLR per seed, points: kNN +2, 0, +3; linear +1, 0, -1; worst 1/255 +25, +18,
    # +26; 8/255 +7, +5, +6; L2 0.5 +20, +20, +22.
    assert "| baseline | seeds " + names in table
    # kNN: mean 5/3, sample std sqrt(((1/3)^2 + (5/3)^2 + (4/3)^2) / 2) = sqrt(7/3) = 1.528;
    # linear 0 +- 1; 1/255: 23 +- sqrt((4 + 25 + 9) / 2) = 4.359; 8/255: 6 +- 1;
    # L2: 62/3 +- sqrt(((2/3)^2 * 2 + (4/3)^2) / 2) = 1.155.
    assert ("| SimCLR | 0,1,2 | +1.67 ± 1.53 | +0.00 ± 1.00 | +23.00 ± 4.36 | +6.00 ± 1.00 "
            "| +20.67 ± 1.15 |") in table
    assert "SimCLR+CLAE - SimCLR, by seed (points):" in table
    assert "| seed " + names in table
    assert "| 0 | +2.00 | +1.00 | +25.00 | +7.00 | +20.00 |" in table
    assert "| 2 | +3.00 | -1.00 | +26.00 | +6.00 | +22.00 |" in table


def _table_widths(text):
    """[(header cells, separator cells, [cells of each row])] of every markdown table."""
    tables, lines = [], text.splitlines()
    for i, line in enumerate(lines[1:], 1):
        if line.startswith("|---"):
            rows = []
            for row in lines[i + 1:]:
                if not row.startswith("|"):
                    break
                rows.append(row.count("|") - 1)
            tables.append((lines[i - 1].count("|") - 1, line.count("|") - 1, rows))
    return tables


def test_robust_worst_case_columns_mean_std_and_per_run(groups):
    table = compare.markdown_table(groups)
    widths = _table_widths(table)
    assert len(widths) == 4  # summary, CLAE paired, by seed, per run
    for header, separator, rows in widths:
        assert separator == header and rows and set(rows) == {header}
    # SimCLR worst 1/255: 10, 12, 8 -> 10 +- 2; 8/255: 0 +- 0; L2 0.5: 0, 1, 0 -> 0.33 +- 0.58.
    assert ("| SimCLR | 0,1,2 | 42.00 ± 2.65 | 51.00 ± 1.00 | 10.00 ± 2.00 | 0.00 ± 0.00 | "
            "0.33 ± 0.58 | 10.0 |") in table
    assert ("| simclr_seed1 | SimCLR | ? | ? | 1 | 30 | 41.00 | 52.00 | 12.00 | 0.00 | 1.00 |"
            in table)


def test_robust_columns_sort_radii_as_numbers():
    results = {"knn_top1": 0.5, "linear_top1": 0.5,
               "robust_top1": {"worst": {"16": 0.0, "2": 0.2, "8": 0.1}},
               "robust_top1_l2": {"worst": {"0.5": 0.3, "0.25": 0.4}}}
    assert list(compare.metrics(results)) == ["kNN", "linear", "worst 2/255", "worst 8/255",
                                              "worst 16/255", "worst L2 0.25", "worst L2 0.5"]
    assert compare.robust_columns([{"results": results}]) == list(compare.metrics(results))[2:]
    assert compare.robust_columns([{"results": {"knn_top1": 0.5, "linear_top1": 0.5}}]) == []


def _write_sweep(workdir, lines):
    with open(os.path.join(workdir, "sweep.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")


def test_sweep_record_of_a_resumed_run(tmp_path):
    workdir = _fake_run(str(tmp_path), *RUNS[1])
    start = ('{"event": "start", "unix": %d, "preset": "--flagfile=flags/x.cfg --seed=0", '
             '"extra": "--dataset=/d", "commit": "0123456789abcdef", "dirty": %s, '
             '"loadavg": [%s, 1, 1], "cores": 2}')
    _write_sweep(workdir, [
        start % (1000, "false", "0.5"), '{"event": "load", "unix": 1060, "loadavg": [2.1, 1, 1]}',
        '{"event": "end", "unix": 1600, "exit": 2, "loadavg": [2.0, 1, 1]}',
        start % (2000, "true", "1.9"), '{"event": "load", "unix": 2060, "loadavg": [3.5, 1, 1]}',
        '{"event": "end", "unix": 2900, "exit": 0, "loadavg": [2.2, 1, 1]}',
        '{"event": "load", "un'])  # cut short by a kill
    sweep = compare.read_sweep(workdir)
    # Wall: (1600 - 1000) + (2900 - 2000) = 1500 s = 25 min; load 0.5 at the start, 3.5 at most.
    assert sweep == {"preset": "--flagfile=flags/x.cfg --seed=0 --dataset=/d",
                     "commit": "0123456,0123456+dirty", "wall_seconds": 1500,
                     "load_start": 0.5, "load_max": 3.5, "load_end": 2.2, "cores": 2,
                     "processes": 2}
    groups = compare.group_runs([compare.load_run(workdir)])
    table = compare.markdown_table(groups)
    assert ("| clae_seed0 | SimCLR+CLAE | `--flagfile=flags/x.cfg --seed=0 --dataset=/d` | "
            "0123456,0123456+dirty | 0 | 30 |") in table
    assert "| 9.0 | 10.0 | 25.0 | 0.5 / 3.5 / 2.2 |" in table
    assert "on 2 cores" in table
    # A run still going (no end yet): no wall time, no end load.
    _write_sweep(workdir, [start % (1000, "false", "0.5")])
    assert compare.read_sweep(workdir)["wall_seconds"] is None
    assert compare.read_sweep(workdir)["load_end"] is None
    os.remove(os.path.join(workdir, "sweep.jsonl"))
    assert compare.read_sweep(workdir) == {}


def test_sweep_keep_copies_result_files_and_names_no_machine_folder(tmp_path):
    """The kept flags.cfg says ROOT/<run> where the run's workdir was (both the --workdir line
    and the "Reproduce" comment); the other files are copied as they are; no checkpoints."""
    workdir = tmp_path / "sweep_root" / "clae_seed0"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "flags.cfg").write_text(  # the workdir as run.py got it (sweep_run's argument)
        f"# Reproduce this run: python run.py --flagfile={workdir}/flags.cfg\n"
        f"--workdir={workdir}\n--dataset=/data/cifar10\n--seed=0\n")
    (workdir / "results.json").write_text('{"knn_top1": 0.5}')
    (workdir / "sweep.jsonl").write_text('{"event": "end"}\n')
    out = tmp_path / "kept"
    subprocess.run(["bash", "-c", f'source scripts/sweep_lib.sh && sweep_keep "{out}" "{workdir}"'],
                   cwd=REPO, check=True, timeout=60)
    assert sorted(os.listdir(out / "clae_seed0")) == ["flags.cfg", "results.json", "sweep.jsonl"]
    assert (out / "clae_seed0" / "flags.cfg").read_text() == (
        "# Reproduce this run: python run.py --flagfile=ROOT/clae_seed0/flags.cfg\n"
        "--workdir=ROOT/clae_seed0\n--dataset=/data/cifar10\n--seed=0\n")
    assert (out / "clae_seed0" / "results.json").read_text() == '{"knn_top1": 0.5}'
    assert (out / "clae_seed0" / "sweep.jsonl").read_text() == '{"event": "end"}\n'


def test_online_knn_curves_by_epoch_and_their_plot(tmp_path):
    workdirs = [_fake_run(str(tmp_path), *r, online=[(10, 0.2 + i / 100), (20, 0.3)])
                for i, r in enumerate(RUNS[:2])]
    runs = [compare.load_run(w) for w in workdirs]
    # steps_per_epoch 10: steps 10 and 20 are epochs 1 and 2.
    assert compare.online_curves(runs[1]) == [(1.0, pytest.approx(0.21)), (2.0, pytest.approx(0.3))]
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    compare.main(workdirs + ["--out", str(out)])
    with open(out / "online_knn.json") as f:
        assert json.load(f) == {"SimCLR": {"simclr_seed0": [[1.0, pytest.approx(0.2)],
                                                             [2.0, pytest.approx(0.3)]]},
                                "SimCLR+CLAE": {"clae_seed0": [[1.0, pytest.approx(0.21)],
                                                               [2.0, pytest.approx(0.3)]]}}
    with open(out / "online_knn.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_no_online_curve_no_plot(groups, tmp_path):
    curves = compare.write_online_knn(groups, str(tmp_path / "online.json"))
    assert not compare.plot_online_knn(curves, str(tmp_path / "online.png"))
    assert not (tmp_path / "online.png").exists() and not (tmp_path / "online.json").exists()


# ---------------------------------------------------------------- bench/step_cost.py

step_cost = _load("bench/step_cost.py", "step_cost")


def test_step_cost_report_arithmetic():
    args = step_cost.parse_args(["--image_size=64", "--stem=imagenet", "--precisions=bf16",
                                 "--steps=1200", "--rounds=3"])
    assert args.cases == [("imagenet", 64), ("cifar", 32)]
    seconds = {(("imagenet", 64), "bf16", "simclr"): [0.2, 0.3, 0.25],
               (("imagenet", 64), "bf16", "clae"): [0.5, 0.6, 0.4],
               (("cifar", 32), "bf16", "simclr"): [0.5, 0.5, 0.5],
               (("cifar", 32), "bf16", "clae"): [1.0, 1.0, 1.2], "_load": [2.0, 2.5, 3.0]}
    flops = {("imagenet", 64): {"simclr": 1.23e8, "clae": 2.29e8},
             ("cifar", 32): {"simclr": 4.19e8, "clae": 7.69e8}}
    text = step_cost.report(args, flops, seconds, pipeline=1024.0)
    # Medians 0.25 / 0.5 s; vs cifar 0.5 / 1.0 s: 0.5x each; 1200 steps: 5 + 10 = 15 min.
    assert "| imagenet:64 | bf16 | 0.250 | 0.500 | 2.00 | 0.50 | 0.50 | 5.0 + 10.0 = 15.0 |" in text
    assert "| cifar:32 | bf16 | 0.500 | 1.000 | 2.00 | 1.00 | 1.00 | 10.0 + 20.0 = 30.0 |" in text
    assert "imagenet:64 / cifar:32: 0.30x" in text  # 2.29 / 7.69
    assert "min 2.0, median 2.5, max 3.0" in text
    assert "1024 img/s" in text and "consumes 512 img/s (2.0x" in text  # 256 / 0.5 s


def test_step_cost_arguments():
    assert step_cost.parse_args(["--reference="]).cases == [("imagenet", 64)]
    assert step_cost.parse_args(["--stem=cifar", "--image_size=32"]).cases == [("cifar", 32)]
    with pytest.raises(SystemExit):
        step_cost.parse_args(["--precisions=fp8"])
    with pytest.raises(SystemExit):
        step_cost.parse_args(["--reference=cifar"])


def test_step_cost_builds_the_stem_it_is_given():
    # After the ImageNet stem (7x7/2 conv, 3x3/2 max-pool) a 64 px input runs the residual
    # stages at 16 px, as the CIFAR stem (3x3/1 conv) does at 16 px: the forward FLOPs differ
    # by the stems alone.
    args = step_cost.parse_args(["--arch=resnet10", "--width=0.0625"])
    bench = step_cost.benchmark
    imagenet = bench.forward_flops(step_cost.config(args, ("imagenet", 64), "simclr"))
    cifar = bench.forward_flops(step_cost.config(args, ("cifar", 16), "simclr"))
    channels = 4  # ResNet-10 x1/16: 4-8-16-32
    assert imagenet["stem"] == 2 * 32 * 32 * 7 * 7 * 3 * channels
    assert cifar["stem"] == 2 * 16 * 16 * 3 * 3 * 3 * channels
    assert imagenet["forward"] - imagenet["stem"] == cifar["forward"] - cifar["stem"]


# ---------------------------------------------------------------- scripts/tinyimagenet_folder.sh

def _tiny_source(root):
    """A two-class tiny-imagenet-200 tree as the official zip extracts it."""
    src = root / "tiny-imagenet-200"
    for wnid, n in (("n01", 2), ("n02", 3)):
        images = src / "train" / wnid / "images"
        images.mkdir(parents=True)
        for k in range(n):
            (images / f"{wnid}_{k}.JPEG").write_bytes(f"{wnid}{k}".encode())
    (src / "val" / "images").mkdir(parents=True)
    rows = [("val_0.JPEG", "n02"), ("val_1.JPEG", "n01"), ("val_2.JPEG", "n02")]
    for name, _ in rows:
        (src / "val" / "images" / name).write_bytes(name.encode())
    (src / "val" / "val_annotations.txt").write_text(
        "".join(f"{name}\t{wnid}\t0\t0\t63\t63\n" for name, wnid in rows))
    return src


def _layout(dest):
    return {str(p.relative_to(dest)): p.read_bytes() for p in sorted(dest.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("form", ["folder", "parent", "zip"])
def test_tinyimagenet_folder_lays_out_train_and_test_by_class(tmp_path, form):
    src = _tiny_source(tmp_path / "src")
    if form == "parent":
        src = src.parent
    elif form == "zip":
        src = shutil.make_archive(str(tmp_path / "tiny-imagenet-200"), "zip", src.parent)
    dest = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "tinyimagenet_folder.sh"),
                           str(src), str(dest)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _layout(dest) == {
        "train/n01/n01_0.JPEG": b"n010", "train/n01/n01_1.JPEG": b"n011",
        "train/n02/n02_0.JPEG": b"n020", "train/n02/n02_1.JPEG": b"n021",
        "train/n02/n02_2.JPEG": b"n022",
        "test/n01/val_1.JPEG": b"val_1.JPEG", "test/n02/val_0.JPEG": b"val_0.JPEG",
        "test/n02/val_2.JPEG": b"val_2.JPEG"}
    assert proc.stdout.strip().endswith("train 5 images, test 3, classes 2")
    assert not (tmp_path / "out.partial").exists()


def test_tinyimagenet_folder_refuses_a_source_without_the_set(tmp_path):
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "tinyimagenet_folder.sh"),
                           str(tmp_path), str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "holds no tiny-imagenet-200" in proc.stderr
    assert not (tmp_path / "out").exists()
