"""A full disk at any write of a run: one line naming what and where (with the space needed and
free), nothing half-written or temporary left behind, what was there before intact.

Each write site with the disk "full": the write raises the exception a full disk gives there
(measured on a tmpfs, TF 2.21: OSError ENOSPC from Python's writes, ResourceExhaustedError from
TensorFlow's). Last, a real one: the smoke preset on a tiny tmpfs, then resumed.
"""

import dataclasses
import errno
import json
import math
import os
import shlex
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from clae_tf import ClaeError
from clae_tf.data import sources
from clae_tf.evaluation import evaluate, visualize
from clae_tf.job import checkpoints, export, model_card, train
from clae_tf.method import builders, train_step
from clae_tf.runtime import files, workdir

from conftest import in_mount_namespace, tiny_config
from subprocs import TIMEOUT

ONE_DEVICE = tf.distribute.OneDeviceStrategy("/cpu:0")
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


def _enospc(path=None):
    return OSError(errno.ENOSPC, NO_SPACE, path)


def _tf_no_space(path, op):
    return tf.errors.ResourceExhaustedError(None, None, f"{path}; {NO_SPACE} [Op:{op}]")


def _files(directory):
    """Every file under `directory` (relative path -> bytes)."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory)] = f.read()
    return found


def _one_line(error, what_at):
    """The error's text, checked: one line naming `what_at` ("the checkpoint at <path>"), the
    reason, the free space and what to do."""
    text = str(error)
    assert "\n" not in text, text
    assert text.startswith(f"--workdir: cannot write {what_at}: {NO_SPACE} ("), text
    assert " free)" in text and text.endswith(
        "; free some space and run the same command again"), text
    return text


# ---------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture
def cfg(tmp_path):
    return tiny_config(tmp_path, adversarial=False)


def _fail_save_after_temp_files(monkeypatch, directory):
    """tf.train.Checkpoint's write fails as SaveV2 does on a full disk, after leaving what it
    leaves there (measured: an empty ckpt-<step>_temp/), plus a partial index and the
    CheckpointManager's index temporary file, as a failure later in the save would."""
    def full(self, prefix, options=None):
        os.makedirs(f"{prefix}_temp")
        with open(f"{prefix}.index", "wb") as f:
            f.write(b"\x00half")
        with open(os.path.join(directory, "checkpoint.tmp0123abcd"), "w") as f:
            f.write("model_checkpoint_path")
        raise _tf_no_space(f"{prefix}_temp/part-00000-of-00001.data-00000-of-00001.tempstate1",
                           "SaveV2")

    monkeypatch.setattr(tf.train.Checkpoint, "_write", full)


def test_checkpoint_on_a_full_disk_keeps_the_last_good_one(cfg, monkeypatch):
    state = checkpoints.State(cfg, ONE_DEVICE, 10, 10)
    for step in (1, 2):
        state.optimizer.iterations.assign(step)
        state.save(step)
    before = _files(state.directory)
    _fail_save_after_temp_files(monkeypatch, state.directory)
    with pytest.raises(ClaeError) as e:
        state.save(3)
    text = _one_line(e.value, f"the checkpoint at {os.path.join(state.directory, 'ckpt-3')}")
    size = sum(len(v) for k, v in before.items() if k.startswith("ckpt-2."))
    assert f"(about {files.human_bytes(size)} needed, " in text
    ckpt2 = os.path.join(state.directory, "ckpt-2")
    assert f"; the last good checkpoint, {ckpt2}, is kept;" in text
    assert _files(state.directory) == before  # no ckpt-3_temp/, ckpt-3.*, checkpoint.tmp*
    monkeypatch.undo()
    resumed = checkpoints.State(cfg, ONE_DEVICE, 10, 10)
    assert resumed.restore() and resumed.step == 2


def test_first_checkpoint_on_a_full_disk(cfg, monkeypatch):
    state = checkpoints.State(cfg, ONE_DEVICE, 10, 10)
    _fail_save_after_temp_files(monkeypatch, state.directory)
    with pytest.raises(ClaeError) as e:
        state.save(1)
    text = _one_line(e.value, f"the checkpoint at {os.path.join(state.directory, 'ckpt-1')}")
    variables = state.model.variables + state.optimizer.variables
    size = sum(math.prod(v.shape) * tf.as_dtype(v.dtype).size for v in variables)
    assert f"(about {files.human_bytes(size)} needed, " in text
    assert "; no checkpoint was saved before;" in text
    assert os.listdir(state.directory) == []


# ---------------------------------------------------------------------------------------------
# TensorBoard: a summary op flushes the writer's queue when it is full, so a full disk surfaces
# at create_file_writer (its first event), at a tf.summary.* call, or at flush().


def _raise(error):
    def fail(*args, **kwargs):
        raise error
    return fail


def _events_error(logdir):
    return tf.errors.ResourceExhaustedError(None, None, (
        f"{logdir}/events.out.tfevents.1.vm.2.0.v2; {NO_SPACE}\n\tFailed to flush 11 events to "
        f"{logdir}/events.out.tfevents.1.vm.2.0.v2\n\tCould not flush events file. "
        f"[Op:WriteSummary]"))


def _loop(cfg):
    source = sources.load(cfg)
    state = checkpoints.State(cfg, ONE_DEVICE, 10, 10)
    return train._Loop(cfg, ONE_DEVICE, source, state, 10, 10)


def _after_one_step():
    """What the compiled loop gives back after one healthy step."""
    return {"steps": 1, "metrics": {k: 0.5 for k in train_step.METRICS}, "images": {},
            "last": {"healthy": True, "loss": 0.5, "w_norm": 1.0, "z_norm": 1.0}}


def test_train_events_writer_on_a_full_disk(cfg, monkeypatch):
    logdir = workdir.tensorboard_dir(cfg.run_dir)
    monkeypatch.setattr(tf.summary, "create_file_writer", _raise(_events_error(logdir)))
    with pytest.raises(ClaeError) as e:
        _loop(cfg)
    _one_line(e.value, f"TensorBoard events at {logdir}")


def test_train_scalars_on_a_full_disk(cfg, monkeypatch):
    loop = _loop(dataclasses.replace(cfg, eval_every_epochs=0))
    logdir = workdir.tensorboard_dir(cfg.run_dir)
    monkeypatch.setattr(tf.summary, "scalar", _raise(_events_error(logdir)))
    with pytest.raises(ClaeError) as e:
        loop.after_call(1, 1, _after_one_step(), epoch_ended=False)
    _one_line(e.value, f"TensorBoard events at {logdir}")


def test_train_final_flush_on_a_full_disk_after_the_last_checkpoint(cfg, monkeypatch):
    loop = _loop(cfg)
    loop.watch = None  # the monitor's own writes go through the same writer
    logdir = workdir.tensorboard_dir(cfg.run_dir)
    monkeypatch.setattr(loop.writer, "flush", _raise(_events_error(logdir)))
    with pytest.raises(ClaeError) as e:
        loop.finish(4)
    _one_line(e.value, f"TensorBoard events at {logdir}")
    assert workdir.checkpoint_paths(loop.state.directory) == [
        os.path.join(loop.state.directory, "ckpt-4")]  # saved before the events


def test_eval_scalars_on_a_full_disk_leave_no_new_events_file(cfg, monkeypatch):
    logdir = workdir.tensorboard_dir(cfg.run_dir)
    writer = tf.summary.create_file_writer(logdir)  # the training's events, kept
    with writer.as_default(step=1):
        tf.summary.scalar("train/loss", 1.0)
    writer.close()
    before = _files(logdir)
    monkeypatch.setattr(tf.summary, "scalar", _raise(_events_error(logdir)))
    with pytest.raises(ClaeError) as e:
        evaluate._write_scalars(cfg.run_dir, "eval", 2, {"knn_top1": 0.5, "linear_top1": 0.5})
    _one_line(e.value, f"TensorBoard events at {logdir}")
    assert _files(logdir) == before


def test_projector_on_a_full_disk_leaves_no_half_set(tmp_path, monkeypatch):
    monkeypatch.setattr(tf.io, "write_file", _raise(_tf_no_space(tmp_path, "WriteFile")))
    with pytest.raises(ClaeError) as e:
        visualize.write_projector(str(tmp_path), "test_z", np.zeros((4, 3)), np.arange(4),
                                  np.zeros((4, 8, 8, 3), np.uint8), np.arange(4))
    _one_line(e.value, f"TensorBoard's projector files at {tmp_path / visualize.PROJECTOR_DIR}")
    assert os.listdir(tmp_path) == []  # not tensors.tsv without its metadata and sprite


# ---------------------------------------------------------------------------------------------
# The evaluation's files, flags.cfg, the exports and their model card.


def test_probe_on_a_full_disk_keeps_the_previous_probe(tmp_path, monkeypatch):
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    path = str(tmp_path / "probe.npz")
    evaluate.save_probe(path, layer, "h", step=1)
    real_savez = np.savez

    def half_then_full(f, **arrays):
        f.write(b"PK\x03\x04half an archive")
        raise _enospc()

    monkeypatch.setattr(np, "savez", half_then_full)
    with pytest.raises(ClaeError) as e:
        evaluate.save_probe(path, layer, "h", step=2)
    size = (4 * 3 + 3) * 4  # the kernel and bias in float32
    assert f"(about {size} B needed, " in _one_line(e.value, f"the linear probe at {path}")
    monkeypatch.setattr(np, "savez", real_savez)
    assert evaluate.load_probe(path)["step"] == 1
    assert os.listdir(tmp_path) == ["probe.npz"]


def _write_results(cfg):
    workdir.update_results(cfg.run_dir, {"knn_top1": 0.75})


def _write_flags(cfg):
    workdir.write_flagfile(dataclasses.replace(cfg, seed=7))


def _write_card(cfg):
    model_card.write(cfg.run_dir, 2, [workdir.SAVED_MODEL])


@pytest.mark.parametrize("write, what, name", [
    (_write_results, "the results", workdir.RESULTS_FILE),
    (_write_flags, "the run's flags", workdir.FLAGFILE),
    (_write_card, "the model card", workdir.MODEL_CARD),
], ids=["results", "flags", "model_card"])
def test_text_file_on_a_full_disk_keeps_the_old_one(cfg, monkeypatch, write, what, name):
    os.makedirs(cfg.run_dir)
    workdir.write_flagfile(cfg)
    workdir.update_results(cfg.run_dir, {"knn_top1": 0.5})
    model_card.write(cfg.run_dir, 1, [workdir.SAVED_MODEL])
    before = _files(cfg.run_dir)
    monkeypatch.setattr(os, "fsync", _raise(_enospc()))
    with pytest.raises(ClaeError) as e:
        write(cfg)
    _one_line(e.value, f"{what} at {os.path.join(cfg.run_dir, name)}")
    assert _files(cfg.run_dir) == before  # the old file, and no <name>.<pid>.tmp


@pytest.fixture
def previous_exports(cfg):
    """A run_dir with exports of step 1 (stand-ins: what write_exports moves is opaque to it)
    and their manifest."""
    os.makedirs(os.path.join(cfg.run_dir, workdir.SAVED_MODEL, "variables"))
    with open(os.path.join(cfg.run_dir, workdir.SAVED_MODEL, "saved_model.pb"), "wb") as f:
        f.write(b"step 1 " * 100)
    with open(os.path.join(cfg.run_dir, workdir.ENCODER_KERAS), "wb") as f:
        f.write(b"step 1")
    with open(os.path.join(cfg.run_dir, workdir.MANIFEST), "w") as f:
        json.dump({"step": 1, "exports": [workdir.SAVED_MODEL, workdir.ENCODER_KERAS]}, f)
    return _files(cfg.run_dir)


def _half_saved_model(cfg, model, path, encoder=None):
    os.makedirs(os.path.join(path, "variables", "variables_temp"))  # what SaveV2 leaves
    raise _tf_no_space(os.path.join(path, "variables", "variables_temp", "part-0"), "SaveV2")


def _half_keras_file(self, path, *args, **kwargs):
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04half")
    raise _enospc()


@pytest.mark.parametrize("fails", ["saved_model", "encoder_keras"])
def test_exports_on_a_full_disk_keep_the_previous_ones(cfg, previous_exports, monkeypatch,
                                                       fails):
    if fails == "saved_model":
        monkeypatch.setattr(export, "export", _half_saved_model)
        name = workdir.SAVED_MODEL
    else:
        monkeypatch.setattr(export, "export",
                            lambda cfg, model, path, encoder=None: os.makedirs(path))
        monkeypatch.setattr(keras.Model, "save", _half_keras_file)
        name = workdir.ENCODER_KERAS
    with pytest.raises(ClaeError) as e:
        export.write_exports(cfg, builders.build_model(cfg), 2, cfg.run_dir)
    text = _one_line(e.value, f"the export at {os.path.join(cfg.run_dir, name)}")
    size = sum(len(v) for k, v in previous_exports.items() if k.split(os.sep)[0] == name)
    assert f"(about {files.human_bytes(size)} needed, " in text  # the size of the one there
    assert _files(cfg.run_dir) == previous_exports  # the staging directory is gone
    assert sorted(os.listdir(cfg.run_dir)) == sorted(
        [workdir.SAVED_MODEL, workdir.ENCODER_KERAS, workdir.MANIFEST])


# ---------------------------------------------------------------------------------------------
# A real full disk: the smoke preset on a 3 MB tmpfs (a private mount namespace: needs root and
# unshare), then the same command once the tmpfs has room.


def _in_mount_namespace(script):
    proc = in_mount_namespace(script, "a tiny tmpfs", "the tests above cover each write site",
                              timeout=2 * TIMEOUT, env={"TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow  # two run.py of the smoke preset
def test_smoke_run_on_a_full_tmpfs_stops_in_one_line_and_resumes(tmp_path):
    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir()
    logs.mkdir()
    run_dir = disk / "run"
    # No robust suite: it writes nothing, and is most of the smoke run's evaluation time. No
    # export: the first run stops before it, and the resumed run's would be a third of its time
    # (the exports on a full disk: test_exports_on_a_full_disk_keep_the_previous_ones).
    command = shlex.join([sys.executable, "run.py", "--flagfile=flags/smoke.cfg",
                          "--ckpt_every=10", "--robust_attacks=", "--noexport",
                          f"--workdir={run_dir}"])
    q = {k: shlex.quote(str(v)) for k, v in (("disk", disk), ("logs", logs), ("run", run_dir))}
    # The checkpoints of the smoke preset are 1.1 MB each: the third does not fit in 3 MB.
    _in_mount_namespace(
        f"mount -t tmpfs -o size=3m tmpfs {q['disk']} || exit 90\n"
        f"{command} > {q['logs']}/out1 2> {q['logs']}/err1; echo $? > {q['logs']}/rc1\n"
        f"find {q['run']} > {q['logs']}/files1\n"
        f"mount -o remount,size=64m {q['disk']}\n"
        f"{command} > {q['logs']}/out2 2> {q['logs']}/err2; echo $? > {q['logs']}/rc2\n"
        f"find {q['run']} > {q['logs']}/files2\n")
    out = {name: (logs / name).read_text() for name in os.listdir(logs)}
    assert out["rc1"].strip() == "2", out["err1"][-3000:]
    assert "Traceback" not in out["err1"]
    lines = out["err1"].strip().splitlines()
    assert [line for line in lines if line.startswith("error")] == lines[-1:], out["err1"]
    assert lines[-1].startswith(f"error: --workdir: cannot write the checkpoint at {run_dir}/"
                                f"checkpoints/ckpt-"), lines[-1]
    assert f": {NO_SPACE} (about " in lines[-1] and " free); the last good checkpoint" in lines[-1]
    left = out["files1"].split()
    assert not [path for path in left if path.endswith("_temp") or ".tmp" in path], left
    assert any(path.endswith(".index") for path in left), left  # the good ones are kept
    assert out["rc2"].strip() == "0", out["err2"][-3000:]
    assert f"Resuming from {run_dir}/checkpoints/ckpt-" in out["out2"]
    assert out["out2"].count("Evaluating step 44:") == 1  # trained to the end, then evaluated
    assert str(run_dir / workdir.RESULTS_FILE) in out["files2"].split()
