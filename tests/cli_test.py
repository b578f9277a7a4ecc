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


def test_unknown_flags_are_all_named_with_their_flagfiles(tmp_path):
    # absl's own error names the first unknown flag only, and not the file it is in.
    inner, outer = tmp_path / "inner.cfg", tmp_path / "outer.cfg"
    inner.write_text("--widht=2\n")
    outer.write_text(f"# a comment\n--flagfile={inner}\n--no_such_flag=1\n--lerning_rate=0.1\n"
                     f"--epochs=1\n")
    proc = _run([f"--flagfile={outer}", "--bogus_flag", f"--workdir={tmp_path / 'run'}"],
                tmp_path, tensorflow=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: unknown flags in --flagfile={inner}: --widht (did you mean --width?); "
        f"in --flagfile={outer}: --no_such_flag, --lerning_rate (did you mean --learning_rate?); "
        f"on the command line: --bogus_flag"], proc.stderr
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
