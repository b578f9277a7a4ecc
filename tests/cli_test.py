"""run.py on bad input: a non-zero exit and a one-line message naming the flag, no traceback.

An error that run.py raises before it imports TensorFlow is checked with a fake `tensorflow`
package on PYTHONPATH; the others cost a TensorFlow start-up each (seconds), so they are few.
Bad values of the flags themselves: config_test.py.
"""

import pytest

from conftest import one_line_error, run_cli

_run = run_cli


def test_unknown_method(tmp_path):
    # An enum flag: absl rejects the value while parsing; run.py words it as every other error.
    proc = _run(["--method=nope", f"--workdir={tmp_path / 'run'}"], tmp_path, tensorflow=False)
    line = one_line_error(proc, "--method")
    assert line.startswith("error: --method: ") and "nope" in line and "simclr" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_missing_dataset_folder(tmp_path):
    proc = _run(["--dataset=/nonexistent", f"--workdir={tmp_path / 'run'}"], tmp_path)
    assert "/nonexistent" in one_line_error(proc, "--dataset", tensorflow=True)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # one run.py process that imports TensorFlow (~10 s)
def test_workdir_regular_file_from_the_command_line(tmp_path):
    path = tmp_path / "not_a_dir"
    path.write_text("x")
    proc = _run(["--flagfile=flags/smoke.cfg", "--epochs=1", "--linear_epochs=2",
                 f"--workdir={path}"], tmp_path)
    assert one_line_error(proc, "--workdir", tensorflow=True) == (
        f"error: --workdir: {path} is a file, not a directory")
