"""scripts/compare.py on fake workdirs: grouping by method, mean/std over seeds, events, table
and plot."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from clae_tf.runtime.config import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "compare.py")
# An offline tool, not a module of the training package: loaded from its file.
_spec = importlib.util.spec_from_file_location("compare", SCRIPT)
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

# (adversarial, seed, knn, linear); SimCLR+CLAE is 2 points better on both, seed spread 1 point.
RUNS = [(False, 0, 0.40, 0.50), (True, 0, 0.42, 0.52), (False, 1, 0.41, 0.51),
        (True, 1, 0.43, 0.53), (False, 2, 0.42, 0.52), (True, 2, 0.44, 0.54)]


def _fake_run(root, adversarial, seed, knn, linear, steps=(10, 20, 30)):
    name = f"{'clae' if adversarial else 'simclr'}_seed{seed}"
    workdir = os.path.join(root, name)
    os.makedirs(workdir)
    cfg = Config(dataset="/data/cifar10", adversarial=adversarial, seed=seed, workdir=workdir)
    with open(os.path.join(workdir, "flags.cfg"), "w") as f:
        f.write("# Reproduce this run: ...\n" + cfg.to_flagfile())
    results = {"knn_top1": knn, "linear_top1": linear, "step": steps[-1], "seed": seed,
               "wall_seconds_this_process": 600.0, "train_seconds_this_process": 540.0}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f)
    writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    with writer.as_default():
        for step in steps:
            tf.summary.scalar("train/loss", 7.0 - step / 10 + 5.0 * adversarial, step=step)
            tf.summary.scalar("train/clean_loss", 7.0 - step / 10, step=step)
            tf.summary.scalar("train/adv_loss", 5.0 * adversarial, step=step)
    writer.close()
    return workdir


@pytest.fixture
def workdirs(tmp_path):
    return [_fake_run(str(tmp_path), *run) for run in RUNS]


def test_groups_by_method_in_order(workdirs):
    groups = compare.group_runs([compare.load_run(w) for w in workdirs])
    assert list(groups) == ["SimCLR", "SimCLR+CLAE"]
    assert [r["flags"]["seed"] for r in groups["SimCLR+CLAE"]] == ["0", "1", "2"]
    assert compare.flag_differences(groups["SimCLR"]) == []


def test_mean_std_is_sample_std():
    mean, std = compare.mean_std([0.40, 0.41, 0.42])
    assert mean == pytest.approx(0.41) and std == pytest.approx(0.01)
    assert math.isnan(compare.mean_std([0.5])[1])


def test_read_scalars_from_tf_summary_events(workdirs):
    curves = compare.read_scalars(os.path.join(workdirs[1], "tensorboard"),
                                  ("train/clean_loss", "train/adv_loss", "train/missing"))
    assert [s for s, _ in curves["train/clean_loss"]] == [10, 20, 30]
    assert [v for _, v in curves["train/clean_loss"]] == pytest.approx([6.0, 5.0, 4.0])
    assert [v for _, v in curves["train/adv_loss"]] == pytest.approx([5.0] * 3)
    assert curves["train/missing"] == []


def test_main_writes_table_and_plot(workdirs, tmp_path, capsys):
    out = str(tmp_path / "out")
    compare.main(workdirs + ["--out", out])
    table = capsys.readouterr().out
    assert "| SimCLR | 0,1,2 | 41.00 ± 1.00 | 51.00 ± 1.00 | 10.0 |" in table
    assert "| SimCLR+CLAE | 0,1,2 | 43.00 ± 1.00 | 53.00 ± 1.00 | 10.0 |" in table
    assert "SimCLR+CLAE - SimCLR: kNN +2.00 points" in table
    assert "Total training wall time of the 6 runs: 60.0 min" in table
    assert "WARNING" not in table
    with open(os.path.join(out, "comparison.md")) as f:
        assert f.read() == table.split("\nPlot:")[0].split("\nTable:")[0]
    pytest.importorskip("matplotlib")
    with open(os.path.join(out, "comparison.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_warns_when_runs_of_a_method_differ(workdirs, tmp_path, capsys):
    path = os.path.join(workdirs[0], "flags.cfg")
    with open(path) as f:
        text = f.read().replace("--epochs=30", "--epochs=15")
    with open(path, "w") as f:
        f.write(text)
    runs = [compare.load_run(w) for w in workdirs]
    assert "WARNING: the SimCLR runs differ in --epochs." in compare.markdown_table(
        compare.group_runs(runs))


def test_unfinished_workdir_is_an_error(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit, match="no results.json"):
        compare.load_run(str(tmp_path / "empty"))


def test_runs_as_a_script_from_anywhere(workdirs, tmp_path):
    out = tmp_path / "script_out"
    env = dict(os.environ, MPLBACKEND="Agg", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, SCRIPT, *workdirs, "--out", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "| SimCLR+CLAE | 0,1,2 | 43.00 ± 1.00 | 53.00 ± 1.00 | 10.0 |" in proc.stdout
    assert (out / "comparison.md").exists()


def test_reads_the_events_without_tensorflow(workdirs, tmp_path):
    """Its events reader (scripts/report_lib.py) exists to spare the tables and plots of many runs
    TensorFlow's import: with that import made to fail, the loss curves still read back."""
    fake = tmp_path / "no_tensorflow" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('compare.py imported TensorFlow')\n")
    code = ("import importlib.util, json, sys\n"
            f"spec = importlib.util.spec_from_file_location('compare', {SCRIPT!r})\n"
            "compare = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(compare)\n"
            "curves = compare.read_scalars(sys.argv[1], ['train/clean_loss'])\n"
            "print(json.dumps([curves['train/clean_loss'], 'tensorflow' in sys.modules]))\n")
    env = dict(os.environ, PYTHONPATH=str(fake.parent))
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(workdirs[1], "tensorboard")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [[[10, 6.0], [20, 5.0], [30, 4.0]], False]
