"""The workdir lock (files.workdir_lock): one run at a time on a workdir, in every mode.

In-process first: flock locks belong to an open file, so a second open in the same process is
refused as another process would be. Then two run.py processes on one workdir.
"""

import dataclasses
import os
import signal
import time

import pytest

from conftest import tiny_config
from subprocs import run_py

from clae_tf import ClaeError, app, files


def test_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    workdir = str(tmp_path)
    with files.workdir_lock(workdir, ".lock"):
        with open(os.path.join(workdir, ".lock")) as f:
            assert f.read() == f"{os.getpid()}\n"
        with pytest.raises(ClaeError) as e:
            with files.workdir_lock(workdir, ".lock"):
                pass
        assert str(e.value) == f"--workdir: {workdir} is in use by process {os.getpid()}"
    with files.workdir_lock(workdir, ".lock"):  # released at the end of the run
        pass


@pytest.mark.parametrize("mode", ["train", "eval", "export"])
def test_a_run_on_a_held_workdir_writes_nothing(tmp_path, mode):
    cfg = dataclasses.replace(tiny_config(tmp_path), mode=mode)
    os.makedirs(cfg.run_dir)
    with files.workdir_lock(cfg.run_dir, ".lock"):
        with pytest.raises(ClaeError, match=r"^--workdir: .* is in use by process \d+$"):
            app.run(cfg)
    assert os.listdir(cfg.run_dir) == [".lock"]  # no flags.cfg, no checkpoints, no events


def _wait_stopped(pid, timeout=600):
    """Until every thread of `pid` is stopped (a write under way when SIGSTOP came finishes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_thread_state(pid, task) in "tTX" for task in os.listdir(f"/proc/{pid}/task")):
            return
        time.sleep(0.05)  # polls the kernel's state, whatever the machine's speed
    raise AssertionError(f"process {pid} did not stop within {timeout} s")


def _thread_state(pid, task):
    try:
        with open(f"/proc/{pid}/task/{task}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:  # the thread has ended
        return "X"


def _snapshot(workdir):
    """Every file under workdir: (size, mtime in ns, content)."""
    found = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[path] = (os.path.getsize(path), os.stat(path).st_mtime_ns, f.read())
    return found


@pytest.mark.slow  # three run.py start-ups
def test_second_run_on_a_workdir_is_refused_until_the_first_dies(tmp_path):
    workdir = tmp_path / "run"
    first_args = ["--flagfile=flags/smoke.cfg", "--epochs=1000", "--steps_per_loop=1",
                  "--log_every=1", "--eval_every_epochs=0", f"--workdir={workdir}"]
    with run_py(*first_args) as first:
        first.wait_for(r"step 1/")
        first.send(signal.SIGSTOP)  # it holds the workdir but changes nothing while we look
        _wait_stopped(first.pid)
        before = _snapshot(workdir)
        # Other flags (another seed) on the same workdir: refused before writing anything.
        with run_py(*first_args, "--seed=1") as second:
            code, out, err = second.finish()
        assert code == 2, err[-3000:]
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        assert [line for line in lines if line.startswith("error")] == lines[-1:]
        assert lines[-1] == f"error: --workdir: {workdir} is in use by process {first.pid}"
        assert _snapshot(workdir) == before
        first.kill()  # SIGKILL (a stopped process dies too): no handler, no clean-up
    assert open(workdir / ".lock").read() == f"{first.pid}\n"  # what the killed run left
    with run_py(*first_args) as third:  # proceeds: the kernel dropped the dead run's lock
        third.wait_for(r"step 1/")
