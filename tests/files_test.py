"""The file primitives of a workdir (files.py): the lock, atomic writes, the check that a workdir
can be written, and putting a file or a directory in place whole.

The lock (files.workdir_lock) keeps one run at a time on a workdir, in every mode. In-process
first: flock locks belong to an open file, so a second open in the same process is refused as
another process would be. Then two run.py processes on one workdir.
"""

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from clae_tf import ClaeError
from clae_tf.job import app
from clae_tf.runtime import files

from conftest import MOUNT_REFUSED, in_mount_namespace, tiny_config
from subprocs import Program, run_py


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
    # Without CLAE's attack: the lock is the same, and two of the runs trace their train step
    # (to print "step 1/") in about half the time.
    first_args = ["--flagfile=flags/smoke.cfg", "--noadversarial", "--epochs=1000",
                  "--steps_per_loop=1", "--log_every=1", "--eval_every_epochs=0",
                  f"--workdir={workdir}"]
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


# ---------------------------------------------------------------------------------------------
# Atomic writes (results.json, flags.cfg); a results.json that cannot be read counts as absent.


def test_write_atomic_replaces_the_file_whole(tmp_path):
    path = str(tmp_path / "results.json")
    files.write_atomic(path, '{"a": 1}')
    files.write_atomic(path, '{"a": 2, "b": 3}')
    with open(path) as f:
        assert json.load(f) == {"a": 2, "b": 3}
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left


def test_a_kill_during_the_write_leaves_the_old_file(tmp_path):
    """SIGKILL while the new text is being written (made slow): the old file is still whole."""
    path = tmp_path / "results.json"
    path.write_text('{"knn_top1": 0.5}')
    script = (
        "import os, sys, time\n"
        "from clae_tf.runtime import files\n"
        "def slow_fsync(fd):\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        "os.fsync = slow_fsync\n"
        f"text = '{{\"knn_top1\": 0.75, \"pad\": \"' + 'x' * 10**6 + '\"}}'\n"
        f"files.write_atomic({str(path)!r}, text)\n")
    with Program(["-c", script]) as child:
        child.wait_for("writing$")  # the new text is half on its way
        child.kill()  # SIGKILL: no handler, no cleanup runs
    assert child.proc.returncode == -signal.SIGKILL
    assert json.loads(path.read_text()) == {"knn_top1": 0.5}
    # The new text went to a temporary file next to it (the same filesystem, for os.replace).
    leftovers = [p for p in os.listdir(tmp_path) if p != "results.json"]
    assert len(leftovers) == 1 and leftovers[0].startswith("results.json.")


def test_interrupted_write_removes_its_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "flags.cfg"
    path.write_text("--seed=1\n")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(str(path), "--seed=2\n")
    assert path.read_text() == "--seed=1\n"
    assert os.listdir(tmp_path) == ["flags.cfg"]


@pytest.mark.parametrize("broken", ['{"knn_top1": 0.5, "wall_sec', "", "[1, 2]", "\xff\xfe"])
def test_unreadable_results_json_counts_as_absent(tmp_path, capsys, broken):
    path = tmp_path / "results.json"
    path.write_bytes(broken.encode("latin-1"))
    assert files.read_json(str(path)) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and str(path) in err[0]
    assert files.read_json(str(tmp_path / "missing.json")) is None
    assert capsys.readouterr().err == ""  # a missing file is not worth a warning


# ---------------------------------------------------------------------------------------------
# check_writable: a workdir that cannot be written fails at once, with one line naming --workdir.


def test_workdir_that_is_a_regular_file(tmp_path):
    path = tmp_path / "not_a_dir"
    path.write_text("x")
    with pytest.raises(ClaeError, match=f"^--workdir: {path} is a file, not a directory$"):
        files.check_writable(str(path))
    # A regular file as a parent: ENOTDIR from makedirs, named with the path.
    with pytest.raises(ClaeError, match=r"^--workdir: cannot write in .*not_a_dir/run \(Not a"):
        files.check_writable(str(path / "run"))


def test_workdir_where_root_cannot_create_anything(tmp_path):
    # /sys (sysfs) refuses mkdir even to root (EPERM): a real failure of the real makedirs.
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("needs Linux sysfs (/sys/kernel), where even root cannot mkdir; "
                    "test_workdir_on_a_read_only_filesystem covers the same refusal")
    with pytest.raises(ClaeError, match=r"^--workdir: cannot write in /sys/kernel/clae_run \("):
        files.check_writable("/sys/kernel/clae_run")
    assert not os.path.exists("/sys/kernel/clae_run")


def test_workdir_on_a_read_only_filesystem(tmp_path):
    """A real EROFS: a read-only tmpfs in a private mount namespace (needs root and unshare)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    check = ("from clae_tf import ClaeError\nfrom clae_tf.runtime import files\n"
             "try:\n"
             f"    files.check_writable({str(ro / 'run')!r})\n"
             "except ClaeError as e:\n"
             "    print(e)\n")
    script = (f"mount -t tmpfs -o ro tmpfs {ro} || exit {MOUNT_REFUSED}\n"
              f"{sys.executable} -c \"$CHECK\"")
    proc = in_mount_namespace(script, "a read-only tmpfs",
                              "the regular-file and sysfs tests cover the refusal",
                              env={"CHECK": check})
    assert proc.stdout.strip() == (
        f"--workdir: cannot write in {ro / 'run'} (Read-only file system)"), proc.stderr


def test_workdir_without_write_permission(tmp_path, monkeypatch):
    # Tests run as root, where chmod does not stop writes: the probe's open fails as it would
    # for another user (EACCES), through the real check.
    workdir = tmp_path / "run"
    real_open = open

    def open_refusing_the_probe(path, *args, **kwargs):
        if ".clae_write_probe" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", open_refusing_the_probe)
    with pytest.raises(ClaeError) as e:
        files.check_writable(str(workdir))
    assert str(e.value) == f"--workdir: cannot write in {workdir} (Permission denied)"


def test_writable_workdir_is_created_and_left_clean(tmp_path):
    workdir = tmp_path / "a" / "b"
    files.check_writable(str(workdir))
    assert os.listdir(workdir) == []


# ---------------------------------------------------------------------------------------------
# Replacing a file or a directory whole (exports); the leftovers of killed processes.


def test_replace_path_puts_a_directory_in_place_whole(tmp_path):
    target, new = tmp_path / "saved_model", tmp_path / "staging"
    for d, text in ((target, "old"), (new, "new")):
        (d / "variables").mkdir(parents=True)
        (d / "saved_model.pb").write_text(text)
    files.replace_path(str(new), str(target))
    assert (target / "saved_model.pb").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["saved_model"]  # the old one is gone, no leftover
    # And a file over a file.
    (tmp_path / "encoder.keras").write_text("old")
    (tmp_path / "new.keras").write_text("new")
    files.replace_path(str(tmp_path / "new.keras"), str(tmp_path / "encoder.keras"))
    assert (tmp_path / "encoder.keras").read_text() == "new"


def test_replace_path_interrupted_between_the_renames_puts_the_old_one_back(tmp_path,
                                                                             monkeypatch):
    target, new = tmp_path / "saved_model", tmp_path / "staging"
    target.mkdir()
    (target / "saved_model.pb").write_text("old")
    new.mkdir()
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new one into place
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        files.replace_path(str(new), str(target))
    assert (target / "saved_model.pb").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["saved_model", "staging"]


def test_leftovers_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    alive = str(os.getppid())
    for name in (f"export.{dead}.tmp", f"saved_model.{dead}.old", f"export.{alive}.tmp"):
        (tmp_path / name / "variables").mkdir(parents=True)
    (tmp_path / f"export.json.{dead}.tmp").write_text("{")
    (tmp_path / "saved_model").mkdir()
    for name in ("export", "saved_model", "export.json"):
        files.remove_leftovers(str(tmp_path / name))
    assert sorted(os.listdir(tmp_path)) == [f"export.{alive}.tmp", "saved_model"]


# ---------------------------------------------------------------------------------------------
# A full disk: no_space_reason recognises it, writing turns it into one line and cleans up.

def _resource_exhausted(message):
    import tensorflow as tf
    return tf.errors.ResourceExhaustedError(None, None, message)


NO_SPACE_ERRORS = {
    "oserror_enospc": lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/w/probe.npz"),
    "oserror_edquot": lambda: OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)),
    "tf_save": lambda: _resource_exhausted(  # as TensorFlow 2.21's checkpoint save says it
        "{{function_node __wrapped__SaveV2_dtypes_244_device_/job:localhost/replica:0/task:0/"
        "device:CPU:0}} /w/checkpoints/ckpt-30_temp/part-00000-of-00001.data-00000-of-00001."
        "tempstate1; No space left on device [Op:SaveV2]"),
    "tf_summary": lambda: _resource_exhausted(  # and its summary writer (queue full or flush)
        "/w/tensorboard/events.out.tfevents.1.vm.2.0.v2; No space left on device\n\tFailed to "
        "flush 11 events to /w/tensorboard/events.out.tfevents.1.vm.2.0.v2\n\tCould not flush "
        "events file. [Op:WriteSummary]"),
}


@pytest.mark.parametrize("make", NO_SPACE_ERRORS.values(), ids=NO_SPACE_ERRORS.keys())
def test_no_space_errors_are_recognised(make):
    error = make()
    assert files.no_space_reason(error) in ("No space left on device", "Disk quota exceeded")
    try:  # raised while handling one, or from one (a library that wraps the error)
        try:
            raise error
        except Exception as e:
            raise RuntimeError("saving failed") from e
    except RuntimeError as wrapped:
        assert files.no_space_reason(wrapped) == files.no_space_reason(error)


@pytest.mark.parametrize("error", [
    OSError(errno.EACCES, "Permission denied"), OSError("no errno: No space left on device"),
    ValueError("No space left on device"), KeyboardInterrupt(),
], ids=["eacces", "oserror_without_errno", "valueerror", "interrupt"])
def test_other_errors_are_not_no_space(error):
    assert files.no_space_reason(error) is None


def test_out_of_memory_is_not_no_space():
    assert files.no_space_reason(_resource_exhausted(
        "OOM when allocating tensor with shape[256,512,16,16] [Op:Conv2D]")) is None


def test_writing_turns_a_full_disk_into_one_line_and_cleans_up(tmp_path):
    half = tmp_path / "model.tmp"
    path = tmp_path / "model"
    with pytest.raises(ClaeError) as e:
        with files.writing(str(path), "the export", needed=3 * 2**20, cleanup=[str(half)],
                           note=lambda: "the last good one is kept"):
            (half / "variables").mkdir(parents=True)
            (half / "variables" / "data").write_bytes(b"x" * 1000)
            raise NO_SPACE_ERRORS["tf_save"]()
    free = files.human_bytes(shutil.disk_usage(tmp_path).free)
    assert str(e.value) == (
        f"--workdir: cannot write the export at {path}: No space left on device (about 3.0 MiB "
        f"needed, {free} free); the last good one is kept; free some space and run the same "
        f"command again")
    assert os.listdir(tmp_path) == []


def _interrupt_while_handling_a_full_disk():
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            return e


@pytest.mark.parametrize("make", [lambda: OSError(errno.EACCES, "Permission denied"),
                                  _interrupt_while_handling_a_full_disk],
                         ids=["eacces", "interrupt"])
def test_writing_lets_other_errors_through_untouched(tmp_path, make):
    leftover = tmp_path / "half"
    leftover.write_text("x")
    error = make()
    with pytest.raises(type(error)) as e:
        with files.writing(str(tmp_path / "f"), "x", cleanup=[str(leftover)]):
            raise error
    assert e.value is error
    assert leftover.exists()  # left as before: only a full disk cleans up


def test_write_atomic_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text('{"knn_top1": 0.5}')

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ClaeError) as e:
        files.write_atomic(str(path), '{"knn_top1": 0.75}', "the results")
    assert str(e.value).startswith(f"--workdir: cannot write the results at {path}: No space "
                                   f"left on device (about 18 B needed, ")
    assert "\n" not in str(e.value)
    assert json.loads(path.read_text()) == {"knn_top1": 0.5}
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file


def test_free_bytes_of_a_path_not_yet_there(tmp_path):
    assert files.free_bytes(str(tmp_path / "a" / "b")) == shutil.disk_usage(tmp_path).free
