"""Resume finds the newest checkpoint that can be read: a damaged index file, a deleted or
truncated newest checkpoint each fall back (with one line) instead of restarting or crashing;
a checkpoint of other flags is a flag error, found by flags.cfg or by the checkpoint itself."""

import contextlib
import dataclasses
import io
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from clae_tf import ClaeError
from clae_tf.job import app, checkpoints
from clae_tf.runtime import workdir

from conftest import one_line_error, run_cli, tiny_config

ONE_DEVICE = tf.distribute.OneDeviceStrategy("/cpu:0")


@pytest.fixture
def saved(tmp_path):
    """A workdir with ckpt-1, ckpt-2, ckpt-3; the stem kernel holds the step number."""
    cfg = tiny_config(tmp_path, adversarial=False)
    state = checkpoints.State(cfg, ONE_DEVICE, 10, 10)
    for step in (1, 2, 3):
        state.model.stem_conv.kernel.assign(tf.fill(state.model.stem_conv.kernel.shape,
                                                    float(step)))
        state.optimizer.iterations.assign(step)
        state.save(step)
    return cfg


def _restore(cfg):
    state = checkpoints.State(cfg, ONE_DEVICE, 10, 10)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ok = state.restore()
    return state, ok, out.getvalue()


def _kernel_step(state):
    values = np.unique(state.model.stem_conv.kernel.numpy())
    assert len(values) == 1
    return int(values[0])


def _ckpt(cfg, name=""):
    return os.path.join(cfg.run_dir, "checkpoints", name)


def test_damaged_index_file_resumes_from_the_newest_checkpoint(saved):
    with open(_ckpt(saved, "checkpoint"), "w") as f:
        f.write("model_checkpoint_path: \x00garbage{{{\n")
    state, ok, printed = _restore(saved)
    assert ok and state.step == 3 and _kernel_step(state) == 3
    assert printed == ""


@pytest.mark.parametrize("index", [b"\xff\xfemodel_checkpoint_path: \"ckpt-3\"\n\xc3",
                                   b'all_model_checkpoint_paths: "ckpt-1"\n'],
                         ids=["not_utf8", "names_no_checkpoint"])
@pytest.mark.parametrize("optimizer", [True, False], ids=["train", "eval"])
def test_index_file_that_tensorflow_raises_on_is_damaged_too(saved, index, optimizer):
    """TensorFlow's CheckpointManager skips an index it cannot parse, but raises on one that is
    not UTF-8 text (UnicodeDecodeError) or names no checkpoint (ValueError): a traceback in
    training (a state with an optimizer) and in eval (without)."""
    with open(_ckpt(saved, "checkpoint"), "wb") as f:
        f.write(index)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        state = (checkpoints.State(saved, ONE_DEVICE, 10, 10) if optimizer
                 else checkpoints.State(saved, ONE_DEVICE))
        ok = state.restore(model_only=not optimizer)
    assert ok and state.step == 3 and _kernel_step(state) == 3
    printed = out.getvalue().splitlines()
    assert len(printed) == 1 and printed[0].startswith(
        f"Checkpoint index {_ckpt(saved, 'checkpoint')} is damaged"), printed
    # Kept for inspection, out of the way; the next save writes a readable index again.
    with open(_ckpt(saved, "damaged/checkpoint"), "rb") as f:
        assert f.read() == index
    if optimizer:
        state.save(4)
        assert tf.train.get_checkpoint_state(_ckpt(saved)).model_checkpoint_path.endswith(
            "ckpt-4")


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(saved, damage):
    data = [n for n in os.listdir(_ckpt(saved)) if n.startswith("ckpt-3.data")]
    assert data
    for name in data:
        path = _ckpt(saved, name)
        if damage == "delete":
            os.remove(path)
        else:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    state, ok, printed = _restore(saved)
    assert ok and state.step == 2 and _kernel_step(state) == 2
    assert printed.count("\n") == 1
    assert printed.startswith(f"Checkpoint {_ckpt(saved, 'ckpt-3')} is damaged")
    # Set aside for inspection, out of the way of the next resume.
    assert os.path.exists(_ckpt(saved, "damaged/ckpt-3.index"))
    assert workdir.checkpoint_paths(_ckpt(saved))[0].endswith("ckpt-2")


def test_every_checkpoint_damaged_means_no_checkpoint(saved):
    for name in os.listdir(_ckpt(saved)):
        if ".data" in name:
            os.remove(_ckpt(saved, name))
    _, ok, printed = _restore(saved)
    assert not ok and printed.count("is damaged") == 3


def test_a_checkpoint_of_other_flags_is_refused_with_one_line(saved, tmp_path):
    """With flags.cfg, app.run first compares the flags that shape the checkpoint with it
    (workdir.check_workdir): one line naming the flag, flags.cfg left as it was. Without it, the
    checkpoint itself does not fit (State.restore): a flag error too."""
    workdir.write_flagfile(saved)
    flagfile = os.path.join(saved.run_dir, "flags.cfg")
    with open(flagfile) as f:
        before = f.read()
    messages = {}
    for flag, change in (("--width", dict(width=0.125)), ("--adversarial", dict(adversarial=True)),
                         ("--image_size", dict(image_size=24)), ("--arch", dict(arch="resnet18"))):
        with pytest.raises(ClaeError) as e:
            app.run(dataclasses.replace(saved, **change))
        messages[flag] = str(e.value)
    for flag, message in messages.items():
        assert message.startswith(f"--workdir: {saved.run_dir} holds a checkpoint made with "
                                  f"{flag}="), message
        assert "\n" not in message, message
    assert "--width=0.0625 (now 0.125)" in messages["--width"]
    with open(flagfile) as f:
        assert f.read() == before

    os.remove(flagfile)
    other = tiny_config(tmp_path, adversarial=False, proj_dim=8)  # same workdir, other head
    with pytest.raises(ClaeError, match="does not fit these flags"):
        _restore(other)


# TensorFlow's C++ start-up lines (logged before absl's logging is set up: "0000" dates).
_TF_START_UP = re.compile(r"WARNING: All log messages before absl::InitializeLog|[IWE]0000 00:00:")


@pytest.mark.slow  # one run.py process that imports TensorFlow (~20 s)
def test_a_checkpoint_of_another_method_is_refused_in_one_line_and_nothing_else(tmp_path):
    """A --method=moco checkpoint without flags.cfg, resumed with --method=simclr: the error
    line is all that follows TensorFlow's start-up, not TensorFlow's warning about each value of
    the checkpoint that the failed restore did not reach (tens of lines, logged at exit)."""
    moco = tiny_config(tmp_path, adversarial=False, method="moco")
    checkpoints.State(moco, ONE_DEVICE, 10, 10).save(1)
    proc = run_cli(["--method=simclr", "--dataset=digits", f"--arch={moco.arch}",
                    f"--width={moco.width}", f"--image_size={moco.image_size}",
                    f"--batch_size={moco.batch_size}", f"--proj_dim={moco.proj_dim}",
                    "--epochs=1", f"--workdir={moco.workdir}"], tmp_path)
    line = one_line_error(proc, "--workdir", tensorflow=True)
    assert "ckpt-1 does not fit these flags" in line, line
    assert [text for text in proc.stderr.splitlines() if not _TF_START_UP.match(text)] == [
        line], proc.stderr
    assert proc.stdout == "", proc.stdout


def test_eval_state_restores_without_an_optimizer(saved):
    state = checkpoints.State(saved, ONE_DEVICE)
    assert state.optimizer is None
    assert state.restore(model_only=True) and state.step == 3 and _kernel_step(state) == 3


@pytest.mark.parametrize("flag, value", [("dataset", "cifar10"), ("examples_per_class", 5),
                                         ("seed", 1)])
def test_resuming_training_on_other_data_is_refused(saved, flag, value):
    workdir.write_flagfile(saved)
    other = tiny_config(**{flag: value},
                        workdir=saved.run_dir, adversarial=False)
    with pytest.raises(ClaeError, match=f"--workdir: .* --{flag}="):
        workdir.check_workdir(other)
    # Evaluating the same encoder on another dataset is fine.
    if flag == "dataset":
        workdir.check_workdir(tiny_config(workdir=saved.run_dir, adversarial=False, mode="eval",
                                      dataset="cifar10"))


def test_resuming_with_another_constant_learning_rate_takes_it(saved, tmp_path):
    # A constant learning rate is an optimizer variable, so the checkpoint holds it; the advice
    # after a divergence ("try a lower --learning_rate") must not be undone by the restore.
    lower = tiny_config(tmp_path, adversarial=False, learning_rate=saved.learning_rate / 10)
    state, ok, _ = _restore(lower)
    assert ok
    np.testing.assert_allclose(float(state.optimizer.learning_rate), lower.learning_rate,
                               rtol=1e-6)
