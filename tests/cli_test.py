"""run.py on bad input: a non-zero exit and a one-line message naming the flag, no traceback.

Each subprocess that imports TensorFlow costs seconds, so most cases are errors that run.py
raises before it imports TensorFlow; a fake `tensorflow` package on PYTHONPATH checks that.
"""

import pytest

from conftest import one_line_error, run_cli, tiny_config

from clae_tf.job import checkpoints
from clae_tf.runtime import distribute, workdir

_run = run_cli


def _assert_one_line_error(proc, flag):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if flag in line]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("args, flag", [
    (["--eps=-1"], "--eps"),
    (["--alpha=-1"], "--alpha"),
    (["--batch_size=1"], "--batch_size"),
    (["--robust_eps=1,-2"], "--robust_eps"),
    (["--robust_eps=1,x"], "--robust_eps"),
    (["--robust_examples=-1"], "--robust_examples"),
    (["--robust_attacks=pgd20,autoatack"], "--robust_attacks"),
    (["--robust_l2_eps=0.5,-1"], "--robust_l2_eps"),
    (["--attack=nope"], "--attack"),
    (["--attack_steps=0"], "--attack_steps"),
    (["--attack_step_size=-0.01"], "--attack_step_size"),
])
def test_bad_values_fail_before_tensorflow(tmp_path, args, flag):
    proc = _run(args + [f"--workdir={tmp_path / 'run'}"], tmp_path, tensorflow=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: ")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert _assert_one_line_error(proc, flag).startswith(f"error: {flag}:")
    assert not (tmp_path / "run").exists()


def test_unknown_method(tmp_path):
    # An enum flag: absl rejects the value while parsing; run.py words it as every other error.
    proc = _run(["--method=nope", f"--workdir={tmp_path / 'run'}"], tmp_path, tensorflow=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    line = _assert_one_line_error(proc, "--method")
    assert line.startswith("error: --method: ") and "nope" in line and "simclr" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_missing_dataset_folder(tmp_path):
    proc = _run(["--dataset=/nonexistent", f"--workdir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = _assert_one_line_error(proc, "--dataset")
    assert line.startswith("error: --dataset:") and "/nonexistent" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_incompatible_checkpoint(tmp_path):
    # A workdir holding a real checkpoint of a width-1/16 model (no training needed).
    cfg = tiny_config(tmp_path)
    workdir.write_flagfile(cfg)
    checkpoints.State(cfg, distribute.make_strategy(cfg), 89, 89).manager.save(checkpoint_number=0)
    args = ["--arch=resnet10", "--width=0.125", "--image_size=16", "--batch_size=16",
            "--proj_dim=16", "--adversarial", "--max_steps=1", f"--workdir={cfg.run_dir}"]
    proc = _run(args, tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = _assert_one_line_error(proc, "--width")
    assert line.startswith("error: --workdir:") and cfg.run_dir in line
    assert "--width=0.0625 (now 0.125)" in line


@pytest.mark.slow  # one run.py process that imports TensorFlow (~10 s)
def test_workdir_regular_file_from_the_command_line(tmp_path):
    path = tmp_path / "not_a_dir"
    path.write_text("x")
    proc = _run(["--flagfile=flags/smoke.cfg", "--epochs=1", "--linear_epochs=2",
                 f"--workdir={path}"], tmp_path)
    assert one_line_error(proc, "--workdir", tensorflow=True) == (
        f"error: --workdir: {path} is a file, not a directory")
