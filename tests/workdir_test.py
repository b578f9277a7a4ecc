"""The workdir as the record of a run: evaluating on other data, exporting, resuming with other
flags and re-evaluating leave the run's own files as they were, or replace them whole.

Workdirs here hold checkpoints saved directly (no training): a run's flags.cfg, a checkpoint of
a given step with known weights, and whatever results and probe a test needs.
"""

import contextlib
import dataclasses
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from clae_tf import ClaeError
from clae_tf.data import augment, sources
from clae_tf.evaluation import evaluate
from clae_tf.job import app, checkpoints, export
from clae_tf.method import builders
from clae_tf.runtime import workdir
from clae_tf.runtime.config import Config

from conftest import REPO, one_line_error, run_cli, tiny_config

ONE_DEVICE = tf.distribute.OneDeviceStrategy("/cpu:0")
STEPS_PER_EPOCH = 1437 // 16  # digits' training split at tiny_config's batch size


def _config(tmp_path, **overrides):
    """A tiny run whose evaluation is cheap (one probe epoch, no robust evaluation)."""
    values = dict(adversarial=False, linear_epochs=1, robust_eps="", export=False)
    return tiny_config(tmp_path, **{**values, **overrides})


def _checkpoint(cfg, step, seed=0, flagfile=True):
    """Saves a checkpoint of `step` with random weights (seed) in cfg's workdir; returns its
    model. flagfile: write the run's flags.cfg too."""
    state = checkpoints.State(cfg, ONE_DEVICE, STEPS_PER_EPOCH, STEPS_PER_EPOCH * cfg.epochs)
    rng = np.random.default_rng(seed)
    for v in state.model.trainable_variables:
        v.assign(rng.normal(0.0, 0.2, v.shape).astype(np.float32))
    state.optimizer.iterations.assign(step)
    state.save(step)
    if flagfile:
        workdir.write_flagfile(cfg)
    return state.model


def _probe(model, step, seed=0, classes=10):
    """A probe on h with random weights, as evaluate.load_probe returns one."""
    rng = np.random.default_rng(seed)
    return {"kernel": rng.normal(size=(model.feature_dim, classes)).astype(np.float32),
            "bias": rng.normal(size=classes).astype(np.float32), "feature": "h", "step": step}


def _save_probe(path, probe):
    layer = keras.layers.Dense(probe["kernel"].shape[1])
    layer.build((None, probe["kernel"].shape[0]))
    layer.set_weights([probe["kernel"], probe["bias"]])
    evaluate.save_probe(path, layer, probe["feature"], probe["step"])


def _quiet(fn, *args, **kwargs):
    """fn(...), and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = fn(*args, **kwargs)
    return result, out.getvalue()


def _write_png(path, value, size=8):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf.io.write_file(path, tf.io.encode_png(tf.fill([size, size, 3], tf.constant(value, tf.uint8))))


def _folder(root):
    """A tiny image folder of 2 classes (the "other data")."""
    for split, n in (("train", 3), ("test", 2)):
        for c, label in enumerate(("a", "b")):
            for i in range(n):
                _write_png(os.path.join(root, split, label, f"{i}.png"), 40 * c + 10 * i)
    return str(root)


# ---------------------------------------------------------------------------------------------
# Evaluation on other data than the run's own.


def test_which_data_is_the_runs_own(tmp_path):
    cfg = _config(tmp_path, mode="eval")
    workdir.write_flagfile(cfg)
    assert workdir.other_data(cfg) is None
    folder = _folder(tmp_path / "my images")
    cases = {"digits_per_class5": dict(examples_per_class=5),
             "digits_train100": dict(train_examples=100),
             "digits": dict(data_dir=str(tmp_path / "tfds")),
             "cifar10": dict(dataset="cifar10"),
             "my_images": dict(dataset=folder),
             "imagenet2012_subset_1pct": dict(dataset="imagenet2012_subset/1pct")}
    for name, change in cases.items():
        assert workdir.other_data(dataclasses.replace(cfg, **change)) == name, change
    # A run on a folder: the same folder spelt differently is the run's own data.
    own = _config(tmp_path, mode="eval", dataset=folder, batch_size=2)
    workdir.write_flagfile(own)
    assert workdir.other_data(dataclasses.replace(own, dataset=folder + "/")) is None
    relative = os.path.relpath(folder)
    assert workdir.other_data(dataclasses.replace(own, dataset=relative)) is None


@pytest.mark.slow  # two data loads, model builds and a tiny evaluation: ~5 s alone, 20 s loaded
def test_eval_on_other_data_leaves_the_runs_results_and_probe_alone(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    model = _checkpoint(cfg, 4)
    own_results = {"knn_top1": 0.5, "linear_top1": 0.25, "step": 4, "dataset": "digits"}
    with open(os.path.join(cfg.run_dir, "results.json"), "w") as f:
        json.dump(own_results, f)
    own_probe = _probe(model, 4)
    _save_probe(os.path.join(cfg.run_dir, "probe.npz"), own_probe)
    before = {name: open(os.path.join(cfg.run_dir, name), "rb").read()
              for name in ("results.json", "probe.npz", "flags.cfg")}

    folder = _folder(tmp_path / "other")
    other = dataclasses.replace(cfg, mode="eval", dataset=folder, batch_size=2)
    out, _ = _quiet(app.run, other)
    for name, content in before.items():
        with open(os.path.join(cfg.run_dir, name), "rb") as f:
            assert f.read() == content, name
    results_path = os.path.join(cfg.run_dir, "results_other.json")
    assert out["results_path"] == results_path
    with open(results_path) as f:
        results = json.load(f)
    assert (results["dataset"], results["num_classes"], results["test_examples"],
            results["step"]) == ("other", 2, 4, 4)
    assert results["eval_flags"]["dataset"] == folder
    assert evaluate.load_probe(os.path.join(cfg.run_dir, "probe_other.npz"))["kernel"].shape == (
        model.feature_dim, 2)
    _, printed = _quiet(app.print_summary, out)
    line = next(x for x in printed.splitlines() if x.startswith("Results:"))
    assert results_path in line and "left as they were" in line

    # The export then takes the run's own probe (10 classes), not the one of the other data
    # (the exports themselves are stand-ins here: export_test.py tests them).
    exported = {}
    monkeypatch.setattr(export, "export", lambda cfg, model, path, encoder: os.makedirs(path))
    monkeypatch.setattr(export, "export_keras", lambda cfg, model, path, encoder: open(
        path, "w").close())
    monkeypatch.setattr(export, "export_probe", lambda cfg, model, probe, path, encoder: (
        exported.update(probe), os.makedirs(path)))
    out, _ = _quiet(app.run, dataclasses.replace(cfg, mode="export"))
    np.testing.assert_array_equal(exported["kernel"], own_probe["kernel"])
    assert out["probe_saved_model"] == os.path.join(cfg.run_dir, "probe_saved_model")


# ---------------------------------------------------------------------------------------------
# Exports: whole or not at all, and all of one step.


# Runs `python run.py --mode=export` with export_keras made slow (after it has written its
# file): SIGTERM then arrives half-way through the export, at a marker.
_SLOW_EXPORT = textwrap.dedent('''
    import runpy, sys, time
    from clae_tf.job import export
    real = export.export_keras

    def slow(*args, **kwargs):
        real(*args, **kwargs)
        print("KERAS WRITTEN", flush=True)
        time.sleep(600)

    export.export_keras = slow
    sys.argv = ["run.py"] + sys.argv[1:]
    runpy.run_path("run.py", run_name="__main__")
''')


def _outputs(run_dir, images):
    """What the three exports in run_dir compute on images (uint8): h, h again, logits."""
    saved_model = tf.saved_model.load(os.path.join(run_dir, "saved_model"))
    encoder = keras.models.load_model(os.path.join(run_dir, "encoder.keras"))
    classifier = tf.saved_model.load(os.path.join(run_dir, "probe_saved_model"))
    return (saved_model.serve_uint8(images)["h"].numpy(),
            encoder(images.astype(np.float32) / 255.0, training=False)["h"].numpy(),
            classifier.serve(images.astype(np.float32) / 255.0).numpy())


def _expected(model, probe, images, normalize):
    h, _ = model(augment.normalize(images.astype(np.float32) / 255.0, normalize), training=False)
    h = h.numpy()
    return h, h, h @ probe["kernel"] + probe["bias"]


@pytest.mark.slow  # three exports of the tiny model (one in a subprocess): ~1-4 min
def test_sigterm_during_export_leaves_the_previous_export_whole(tmp_path):
    cfg = _config(tmp_path, export=True)
    images = np.random.default_rng(5).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    # The previous export: of step 2, with its probe.
    model = _checkpoint(cfg, 2, seed=2)
    probe2 = _probe(model, 2, seed=2)
    _save_probe(os.path.join(cfg.run_dir, "probe.npz"), probe2)
    _quiet(app.run, dataclasses.replace(cfg, mode="export"))
    step2 = _expected(model, probe2, images, cfg.normalize)
    # Training went on to step 4 and evaluated it: the next export is of step 4.
    model = _checkpoint(cfg, 4, seed=4)
    probe4 = _probe(model, 4, seed=4)
    _save_probe(os.path.join(cfg.run_dir, "probe.npz"), probe4)
    step4 = _expected(model, probe4, images, cfg.normalize)

    with open(tmp_path / "stderr.txt", "w") as stderr:  # a file: a full pipe would block it
        proc = subprocess.Popen(
            [sys.executable, "-c", _SLOW_EXPORT, "--mode=export", f"--workdir={cfg.run_dir}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    line = ""
    watchdog = threading.Timer(1200, proc.kill)  # a hung export fails the test, not the suite
    watchdog.start()
    try:
        for line in proc.stdout:  # the saved_model and encoder.keras of step 4 are written
            if line.strip() == "KERAS WRITTEN":
                break
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=600)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    assert line.strip() == "KERAS WRITTEN", (tmp_path / "stderr.txt").read_text()[-2000:]
    assert proc.returncode == 2  # the watchdog: no safe point comes during the sleep
    assert not [n for n in os.listdir(cfg.run_dir) if n.endswith((".tmp", ".old"))]  # scratch

    # All three are the export of step 2, whole, and the manifest says so.
    assert export.read_manifest(cfg.run_dir) == {
        "step": 2, "exports": ["saved_model", "encoder.keras", "probe_saved_model"]}
    for got, want in zip(_outputs(cfg.run_dir, images), step2):
        np.testing.assert_allclose(got, want, atol=1e-4)

    # The next export replaces them all with step 4's, and removes the killed one's leftovers.
    _, printed = _quiet(app.run, dataclasses.replace(cfg, mode="export"))
    assert f"Exporting the encoder of step 4 to {cfg.run_dir}" in printed
    assert export.read_manifest(cfg.run_dir)["step"] == 4
    for got, want in zip(_outputs(cfg.run_dir, images), step4):
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert not [n for n in os.listdir(cfg.run_dir) if n.endswith((".tmp", ".old"))]


# ---------------------------------------------------------------------------------------------
# flags.cfg: written once the run is accepted, by training only.


@pytest.mark.slow  # the accepted run evaluates the tiny model on digits: ~5-15 s
def test_refused_resume_leaves_flags_cfg_alone(tmp_path):
    """Without flags.cfg, a run with other flags is refused by the checkpoint itself: it must
    not write its flags there (the right command would then be refused by them)."""
    cfg = _config(tmp_path, max_steps=3)
    _checkpoint(cfg, 3, flagfile=False)
    with pytest.raises(ClaeError, match="does not fit these flags"):
        _quiet(app.run, dataclasses.replace(cfg, width=0.125))
    assert not os.path.exists(os.path.join(cfg.run_dir, "flags.cfg"))
    # The right command is accepted (nothing left to train: it evaluates) and writes it.
    out, _ = _quiet(app.run, cfg)
    assert out["results"]["step"] == 3
    with open(os.path.join(cfg.run_dir, "flags.cfg")) as f:
        assert Config.parse_flagfile(f.read())["width"] == "0.0625"


def test_unreadable_flags_cfg_defers_to_the_checkpoint(tmp_path, capsys):
    cfg = _config(tmp_path)
    os.makedirs(os.path.join(cfg.run_dir, "checkpoints"))
    open(os.path.join(cfg.run_dir, "checkpoints", "ckpt-3.index"), "w").close()  # what it finds
    path = os.path.join(cfg.run_dir, "flags.cfg")
    with open(path, "wb") as f:
        f.write(b"--arch=resnet10\n--wid\xff\xfeth=0.0625\n")
    workdir.check_workdir(cfg)  # no UnicodeDecodeError; the checkpoint decides (restore)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {path} cannot be read")


def test_eval_with_an_unreadable_flags_cfg_does_not_advise_reading_it_again(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    path = workdir / "flags.cfg"
    path.write_bytes(b"--arch=resnet10\n--wid\xff\xfeth=0.0625\n")
    proc = run_cli(["--mode=eval", f"--workdir={workdir}"], tmp_path, tensorflow=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: --workdir: cannot read {path}"), line
    assert "with its flags on the command line (not --flagfile=" in line
    # The command that reads it as a flagfile: one line too.
    proc = run_cli([f"--flagfile={path}"], tmp_path, tensorflow=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: --flagfile: a flagfile of this command is not UTF-8 text")


@pytest.mark.slow  # one evaluation of the tiny model on digits: ~5-15 s
def test_reevaluating_a_finished_run_keeps_its_training_flags(tmp_path):
    """A finished 2-epoch run re-run with --epochs=1 trains nothing: it only evaluates, and its
    flags.cfg still says --epochs=2; the evaluation's own flags go with its results."""
    cfg = _config(tmp_path, epochs=2)
    _checkpoint(cfg, 2 * STEPS_PER_EPOCH)
    path = os.path.join(cfg.run_dir, "flags.cfg")
    with open(path) as f:
        before = f.read()
    out, _ = _quiet(app.run, dataclasses.replace(cfg, epochs=1, linear_epochs=2))
    with open(path) as f:
        assert f.read() == before
    results = out["results"]
    assert results["step"] == 2 * STEPS_PER_EPOCH and results["epochs"] == 2
    assert results["eval_flags"]["linear_epochs"] == "2"


def test_reproduce_line_pastes_into_a_shell(tmp_path, capsys):
    run_dir = str(tmp_path / "runs" / "it's a run")
    app.print_summary({"workdir": run_dir})
    lines = {x.split(":", 1)[0]: x.split(":", 1)[1].strip()
             for x in capsys.readouterr().out.splitlines()}
    cfg = _config(tmp_path, workdir=run_dir)
    workdir.write_flagfile(cfg)
    with open(os.path.join(run_dir, "flags.cfg")) as f:
        header = f.readline()[len("# Reproduce this run: "):].strip()
    flagfile = f"--flagfile={run_dir}/flags.cfg"
    tensorboard = ["tensorboard", f"--logdir={run_dir}/tensorboard"]
    for command, words in ((lines["Reproduce"], ["python", "run.py", flagfile]),
                           (header, ["python", "run.py", flagfile]),
                           (lines["TensorBoard"], tensorboard)):
        # What bash makes of the pasted line: one argument per line.
        proc = subprocess.run(["bash", "-c", f"set -- {command}; printf '%s\\n' \"$@\""],
                              capture_output=True, text=True, timeout=60)
        assert proc.stdout.splitlines() == words, command
        assert shlex.split(command) == words


def test_update_results_merges_drops_stale_keys_and_keeps_other_datas_apart(tmp_path, capsys):
    run_dir = str(tmp_path)
    own, other = tmp_path / "results.json", tmp_path / "results_cifar10.json"
    own.write_text(json.dumps({"step": 3, "wall_seconds_this_process": 9.5, "robust_top1": {}}))
    merged = workdir.update_results(run_dir, {"step": 4, "knn_top1": 0.5},
                                    stale_prefix="robust_")
    expected = {"step": 4, "wall_seconds_this_process": 9.5, "knn_top1": 0.5}
    assert merged == expected and json.loads(own.read_text()) == expected
    assert own.read_text() == json.dumps(expected, indent=2, sort_keys=True)
    # Without a stale prefix everything the file held stays.
    workdir.update_results(run_dir, {"timings": {"eval_seconds": 1.0}})
    assert json.loads(own.read_text()) == {**expected, "timings": {"eval_seconds": 1.0}}
    # Other data: its own file, a broken one counted as absent; the run's own left alone.
    other.write_text('{"knn_top1": 0.')
    assert workdir.update_results(run_dir, {"knn_top1": 0.25}, "cifar10") == {"knn_top1": 0.25}
    assert json.loads(other.read_text()) == {"knn_top1": 0.25}
    assert json.loads(own.read_text())["knn_top1"] == 0.5
    assert "results_cifar10.json is unreadable" in capsys.readouterr().err
    assert sorted(os.listdir(run_dir)) == ["results.json", "results_cifar10.json"]


# ---------------------------------------------------------------------------------------------
# A broken flags.cfg or results.json; a workdir that is a file is refused before anything else.


def test_write_flagfile_is_atomic_and_reads_back(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    workdir.write_flagfile(cfg)
    path = os.path.join(cfg.run_dir, "flags.cfg")
    written = open(path).read()
    assert Config.parse_flagfile(written)["width"] == "0.0625"
    # A failure before the rename (here a full disk: one line) leaves the previous flags.cfg
    # as it was, and no temporary file beside it.
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(ClaeError, match=f"cannot write the run's flags at {path}: No space"):
        workdir.write_flagfile(tiny_config(tmp_path, width=0.125))
    assert open(path).read() == written
    assert sorted(os.listdir(cfg.run_dir)) == ["flags.cfg"]


@pytest.mark.slow  # extraction and probe of a tiny model, twice: ~10-15 s on 2 shared cores
def test_evaluate_over_a_truncated_results_json(tmp_path, capsys):
    """A truncated results.json is replaced whole by the evaluation's results, with a warning
    (not a JSONDecodeError in every later run and --mode=eval); a readable one keeps what
    training wrote."""
    cfg = tiny_config(tmp_path, linear_epochs=1, train_examples=64)
    os.makedirs(cfg.run_dir)
    path = os.path.join(cfg.run_dir, "results.json")
    with open(path, "w") as f:
        f.write('{"knn_top1": 0.1, "train_seconds_this_pro')
    source = sources.load(cfg)
    model = builders.build_model(cfg)
    results = evaluate.evaluate(cfg, model, source, step=7)
    assert "results.json is unreadable" in capsys.readouterr().err
    with open(path) as f:
        assert json.load(f) == results
    assert results["step"] == 7 and results["test_examples"] == source.test.num_examples
    # And a readable one keeps what training wrote.
    with open(path, "w") as f:
        json.dump({"train_seconds_this_process": 12.5, "step": 3}, f)
    results = evaluate.evaluate(cfg, model, source, step=9)
    assert results["train_seconds_this_process"] == 12.5 and results["step"] == 9


def test_eval_mode_with_a_truncated_flags_cfg(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "flags.cfg").write_text("--dataset=digits\n--arch=resnet10\n--wid")
    proc = run_cli(["--mode=eval", f"--workdir={workdir}"], tmp_path, tensorflow=False)
    line = one_line_error(proc, "--workdir")
    assert str(workdir / "flags.cfg") in line and "re-run the training command" in line


def test_workdir_regular_file_through_app_run_before_anything_else(tmp_path, monkeypatch):
    path = tmp_path / "not_a_dir"
    path.write_text("x")
    monkeypatch.setattr(sources, "load", lambda cfg: pytest.fail("loaded data before the check"))
    with pytest.raises(ClaeError, match="^--workdir: .* is a file, not a directory"):
        app.run(tiny_config(workdir=str(path)))
