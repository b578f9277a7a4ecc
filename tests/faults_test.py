"""Issue 12, "Runs that survive": faults outside the train loop, one test (or a few) per item.

Items 5, 7-12. Bad values must give one line `error: --flag: ...` and exit code 2 without a
traceback; run.py reaches most of them before importing TensorFlow (a fake `tensorflow` on
PYTHONPATH checks that, as in cli_test.py).
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import REPO, run_cli, tiny_config
from subprocs import Program

from clae_tf import ClaeError, app, augment, builders, data, evaluate, export, files, workdir
from clae_tf.config import Config

_run = run_cli


def _one_line_error(proc, flag, tensorflow=False):
    """The single stderr line of a clean failure (exit 2, no traceback) naming `flag`.

    With TensorFlow imported, its C++ start-up lines (I0000..., E0000...) come first: then the
    error must be the last line and the only one starting with "error".
    """
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    if tensorflow:
        assert [line for line in lines if line.startswith("error")] == lines[-1:], proc.stderr
        lines = lines[-1:]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {flag}:"), lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Item 5: results.json and flags.cfg are written atomically; a broken results.json is absent.


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
        "from clae_tf import files\n"
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


def test_write_flagfile_is_atomic_and_reads_back(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    workdir.write_flagfile(cfg)
    path = os.path.join(cfg.run_dir, "flags.cfg")
    written = open(path).read()
    assert Config.parse_flagfile(written)["width"] == "0.0625"
    # A failure before the rename leaves the previous flags.cfg as it was.
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(OSError):
        workdir.write_flagfile(tiny_config(tmp_path, width=0.125))
    assert open(path).read() == written


@pytest.mark.parametrize("broken", ['{"knn_top1": 0.5, "wall_sec', "", "[1, 2]", "\xff\xfe"])
def test_unreadable_results_json_counts_as_absent(tmp_path, capsys, broken):
    path = tmp_path / "results.json"
    path.write_bytes(broken.encode("latin-1"))
    assert files.read_json(str(path)) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and str(path) in err[0]
    assert files.read_json(str(tmp_path / "missing.json")) is None
    assert capsys.readouterr().err == ""  # a missing file is not worth a warning


@pytest.mark.slow  # extraction and probe of a tiny model, twice: ~10-15 s on 2 shared cores
def test_evaluate_over_a_truncated_results_json(tmp_path, capsys):
    """Before: json.load raised JSONDecodeError here, in every later run and --mode=eval."""
    cfg = tiny_config(tmp_path, linear_epochs=1, train_examples=64)
    os.makedirs(cfg.run_dir)
    path = os.path.join(cfg.run_dir, "results.json")
    with open(path, "w") as f:
        f.write('{"knn_top1": 0.1, "train_seconds_this_pro')
    source = data.load(cfg)
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
    proc = _run(["--mode=eval", f"--workdir={workdir}"], tmp_path, tensorflow=False)
    line = _one_line_error(proc, "--workdir")
    assert str(workdir / "flags.cfg") in line and "re-run the training command" in line


# ---------------------------------------------------------------------------------------------
# Item 7: a workdir that cannot be written fails at once, with one line naming --workdir.


def test_workdir_that_is_a_regular_file(tmp_path):
    path = tmp_path / "not_a_dir"
    path.write_text("x")
    with pytest.raises(ClaeError, match=f"^--workdir: {path} is a file, not a directory$"):
        files.check_writable(str(path))
    # A regular file as a parent: ENOTDIR from makedirs, named with the path.
    with pytest.raises(ClaeError, match=r"^--workdir: cannot write in .*not_a_dir/run \(Not a"):
        files.check_writable(str(path / "run"))


def test_workdir_regular_file_through_app_run_before_anything_else(tmp_path, monkeypatch):
    path = tmp_path / "not_a_dir"
    path.write_text("x")
    monkeypatch.setattr(data, "load", lambda cfg: pytest.fail("loaded data before the check"))
    with pytest.raises(ClaeError, match="^--workdir: .* is a file, not a directory"):
        app.run(tiny_config(workdir=str(path)))


@pytest.mark.slow  # one run.py process that imports TensorFlow (~10 s)
def test_workdir_regular_file_from_the_command_line(tmp_path):
    path = tmp_path / "not_a_dir"
    path.write_text("x")
    proc = _run(["--flagfile=flags/smoke.cfg", "--epochs=1", "--linear_epochs=2",
                 f"--workdir={path}"], tmp_path)
    assert _one_line_error(proc, "--workdir", tensorflow=True) == (
        f"error: --workdir: {path} is a file, not a directory")


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
    check = ("from clae_tf import ClaeError, files\n"
             "try:\n"
             f"    files.check_writable({str(ro / 'run')!r})\n"
             "except ClaeError as e:\n"
             "    print(e)\n")
    script = f"mount -t tmpfs -o ro tmpfs {ro} && {sys.executable} -c \"$CHECK\""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare (a private mount namespace for a read-only "
                    "tmpfs); the regular-file and sysfs tests cover the refusal")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, CHECK=check))
    if proc.returncode != 0 and "mount" in proc.stderr:
        pytest.skip(f"not root or no mount namespaces (containers without CAP_SYS_ADMIN), so no "
                    f"read-only tmpfs to test on: {proc.stderr.strip()}")
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
# Item 8: nonsensical numeric values.

BAD_VALUES = [
    ("ckpt_every", 0), ("log_every", 0), ("image_every", 0), ("eval_batch_size", 0),
    ("linear_batch_size", -1), ("proj_hidden", -5), ("max_steps", -1), ("train_examples", -1),
    ("examples_per_class", -1), ("eps", 100.0), ("eps", 2.5), ("temperature", 1e-45),
    ("temperature", 5e-4), ("knn_sigma", 1e-45), ("knn_sigma", -1.0), ("linear_epochs", -1),
    ("linear_epochs", 0), ("linear_lr", 0.0), ("momentum", 1.0), ("momentum", -0.1),
    ("seed", -1), ("seed", 2 ** 32), ("virtual_cpus", -1), ("eps", float("nan")),
    ("alpha", float("inf")), ("learning_rate", float("nan")), ("width", float("inf")),
    ("weight_decay", float("nan")),
]


@pytest.mark.parametrize("flag, value", BAD_VALUES)
def test_bad_value_is_refused(flag, value):
    with pytest.raises(ClaeError) as e:
        Config(**{flag: value})
    assert str(e.value).startswith(f"--{flag}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("kw, flag", [
    (dict(lr_schedule="step", lr_boundaries=(160, 120), lr_factors=(0.1, 0.01)), "lr_boundaries"),
    (dict(lr_schedule="step", lr_boundaries=(-1,), lr_factors=(0.1,)), "lr_boundaries"),
    (dict(lr_schedule="step", lr_boundaries=(10, 10), lr_factors=(0.1, 0.1)), "lr_boundaries"),
    (dict(lr_schedule="step", lr_boundaries=(10,), lr_factors=(-0.1,)), "lr_factors"),
    (dict(lr_schedule="step", lr_boundaries=(10,), lr_factors=(float("nan"),)), "lr_factors"),
])
def test_bad_step_schedule_is_refused(kw, flag):
    with pytest.raises(ClaeError, match=f"^--{flag}: "):
        Config(**kw)


@pytest.mark.parametrize("kw", [
    dict(), dict(eps=2.0), dict(eps=0.0), dict(normalize="cifar", eps=4.9), dict(temperature=1e-3),
    dict(knn_sigma=1e-3), dict(max_steps=0), dict(proj_hidden=0), dict(momentum=0.0),
    dict(seed=2 ** 32 - 1), dict(train_examples=0), dict(linear_epochs=1),
    dict(lr_schedule="step", lr_boundaries=(0, 5), lr_factors=(0.5, 0.1)),
])
def test_sensible_values_pass(kw):
    Config(**kw)


def test_eps_bound_is_the_input_range_of_the_normalisation():
    """validate() cannot import augment (TensorFlow): its ranges must match NORMALIZATIONS."""
    for kind, (_, std) in augment.NORMALIZATIONS.items():
        # The smallest range a pixel's [0, 1] spans over the channels: 1 / the largest std.
        span = float(tf.reduce_min(augment.normalize(tf.ones([3]), kind)
                                   - augment.normalize(tf.zeros([3]), kind)))
        assert span == pytest.approx(1 / max(std))
        Config(normalize=kind, eps=span * 0.999)
        with pytest.raises(ClaeError, match=f"^--eps: .*{span:.3g} with --normalize={kind}"):
            Config(normalize=kind, eps=span * 1.001)


def test_eps_message_explains_the_units():
    with pytest.raises(ClaeError) as e:
        Config(eps=100)
    assert str(e.value) == ("--eps: 100 is larger than the whole input range (2 with "
                            "--normalize=half); eps is in normalised-input units (0.03 ~ 3.8/255 "
                            "of a pixel's range)")


@pytest.mark.parametrize("args, flag", [
    (["--ckpt_every=0"], "--ckpt_every"),
    (["--image_every=0"], "--image_every"),
    (["--eval_batch_size=0"], "--eval_batch_size"),
    (["--max_steps=-1"], "--max_steps"),
    (["--train_examples=-1"], "--train_examples"),
    (["--eps=100"], "--eps"),
    (["--temperature=1e-45"], "--temperature"),
    (["--eps=nan"], "--eps"),
])
def test_bad_values_fail_before_tensorflow(tmp_path, args, flag):
    proc = _run(["--flagfile=flags/smoke.cfg", "--epochs=1", "--linear_epochs=2",
                 f"--workdir={tmp_path / 'run'}"] + args, tmp_path, tensorflow=False)
    _one_line_error(proc, flag)
    assert not (tmp_path / "run").exists()


def test_knn_weights_do_not_overflow_at_small_sigma():
    """exp(s / sigma) overflowed float32 below sigma ~0.0113 (inf * 0 = nan votes); compare with
    a float64 numpy weighted kNN on the same data (exp((s - max) / sigma) in float64)."""
    rng = np.random.default_rng(0)
    train = rng.normal(size=(60, 8))
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    test = rng.normal(size=(25, 8))
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    train_y, test_y = rng.integers(0, 3, 60), rng.integers(0, 3, 25)
    for sigma in (0.5, 0.005, 1e-3):
        sim = (test.astype(np.float32) @ train.astype(np.float32).T).astype(np.float64)
        top = np.argsort(-sim, axis=1)[:, :7]
        s = np.take_along_axis(sim, top, 1)
        w = np.exp((s - s[:, :1]) / sigma)
        scores = np.stack([(w * (train_y[top] == c)).sum(1) for c in range(3)], 1)
        expected = np.mean(scores.argmax(1) == test_y)
        got = evaluate.knn_top1(train, train_y, test, test_y, 3, k=7, sigma=sigma)
        assert got == pytest.approx(expected), sigma


# ---------------------------------------------------------------------------------------------
# Item 9: classes.


def _write_png(path, value, size=8):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf.io.write_file(path, tf.io.encode_png(tf.fill([size, size, 3], tf.constant(value, tf.uint8))))


def _folder(root, train_classes=("a", "b"), test_classes=("a", "b"), per_class=3):
    for c in train_classes:
        for i in range(per_class):
            _write_png(os.path.join(root, "train", c, f"{i}.png"), 10 + i)
    for c in test_classes:
        for i in range(2):
            _write_png(os.path.join(root, "test", c, f"{i}.png"), 100 + i)
    return str(root)


def test_one_class_dataset_is_refused(tmp_path):
    root = _folder(tmp_path / "one", train_classes=("a",), test_classes=("a",))
    with pytest.raises(ClaeError, match=r"^--dataset: .* has only 1 class\(es\); kNN and linear"):
        data.load(tiny_config(dataset=root, batch_size=2))


def test_one_class_with_images_is_refused(tmp_path):
    # Two class folders, one of them empty: one class of training images.
    root = _folder(tmp_path / "empty_class", train_classes=("a",), test_classes=("a",))
    os.makedirs(os.path.join(root, "train", "b"))
    with pytest.raises(ClaeError, match=r"^--dataset: the training images .* hold only 1 class"):
        data.load(tiny_config(dataset=root, batch_size=2))


def test_train_examples_that_keep_one_class_are_refused(tmp_path, capsys):
    root = _folder(tmp_path / "sorted", train_classes=("a", "b", "c"), test_classes=("a",))
    with pytest.raises(ClaeError, match="^--train_examples: .*--examples_per_class keeps every"):
        data.load(tiny_config(dataset=root, batch_size=2, train_examples=3))
    # Two of three classes: it runs, and says so.
    source = data.load(tiny_config(dataset=root, batch_size=2, train_examples=4))
    assert source.train.num_examples == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the training images hold 2 of the 3")


def test_test_class_missing_from_train_is_named(tmp_path, capsys):
    root = _folder(tmp_path / "extra", train_classes=("a", "b"), test_classes=("a", "b", "zebra"))
    source = data.load(tiny_config(dataset=root, batch_size=2))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: test class 'zebra' (2 images) of {root}/test has no train/ folder "
                   f"and is left out of the evaluation"]
    assert source.num_classes == 2 and source.test.num_examples == 4
    # Nothing to say when the classes agree.
    data.load(tiny_config(dataset=_folder(tmp_path / "same"), batch_size=2))
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# Item 10: a corrupt test image stops the run before training.


def test_corrupt_test_image_is_named_before_training(tmp_path, monkeypatch):
    root = _folder(tmp_path / "corrupt")
    bad = os.path.join(root, "test", "b", "1b.png")
    with open(bad, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(ClaeError, match=f"^--dataset: cannot read image {bad}$"):
        data.load(tiny_config(dataset=root, batch_size=2))
    import clae_tf.train
    monkeypatch.setattr(clae_tf.train, "train", lambda *a: pytest.fail("trained first"))
    cfg = tiny_config(tmp_path, dataset=root, batch_size=2)
    with pytest.raises(ClaeError, match=f"cannot read image {bad}"):
        app.run(cfg)


def test_readable_test_split_is_decoded_once_and_cached(tmp_path):
    """The up-front check fills the in-memory cache: evaluation reads no file again."""
    root = _folder(tmp_path / "ok")
    source = data.load(tiny_config(dataset=root, batch_size=2))
    for name in os.listdir(os.path.join(root, "test", "a")):
        os.remove(os.path.join(root, "test", "a", name))
    values = sorted(int(x[0, 0, 0]) for x, _ in source.test.images)
    assert values == [100, 100, 101, 101]


# ---------------------------------------------------------------------------------------------
# Item 11: TFDS names whose preparation needs a module that is not installed.


class _Builder:
    data_dir = "/nowhere"

    def __init__(self, error):
        self.error = error

    def is_prepared(self):
        return False

    def download_and_prepare(self):
        raise self.error


def _tfds_error(monkeypatch, error):
    monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: _Builder(error))
    with pytest.raises(ClaeError) as e:
        data.load(tiny_config(dataset="mnist"))
    return str(e.value)


def test_tfds_missing_module_is_named(monkeypatch):
    message = _tfds_error(monkeypatch, ModuleNotFoundError("No module named 'importlib_resources'",
                                                           name="importlib_resources"))
    assert message == ("--dataset: preparing TFDS dataset 'mnist' needs the Python module "
                       "'importlib_resources', which is not installed (pip install "
                       "importlib_resources)")
    # Also when the ImportError is the cause of another error, and for a submodule.
    try:
        try:
            raise ModuleNotFoundError("No module named 'apache_beam.io'", name="apache_beam.io")
        except ImportError as inner:
            raise RuntimeError("builder failed") from inner
    except RuntimeError as outer:
        message = _tfds_error(monkeypatch, outer)
    assert "'apache_beam'" in message and "pip install apache_beam)" in message


def test_tfds_network_failure_still_says_download(monkeypatch):
    message = _tfds_error(monkeypatch, ConnectionError("Name or service not known"))
    assert "could not be downloaded" in message and "ConnectionError" in message


def test_tfds_mnist_offline_for_real(tmp_path):
    """What this machine does: with importlib_resources missing, name it, not the network."""
    try:
        import importlib_resources  # noqa: F401
        missing = False
    except ImportError:
        missing = True
    with pytest.raises(ClaeError) as e:
        data.load(tiny_config(dataset="mnist", data_dir=str(tmp_path / "tfds")))
    message = str(e.value)
    if missing:
        assert "pip install importlib_resources" in message, message
        assert "could not be downloaded" not in message
    else:
        assert "could not be downloaded" in message, message


# ---------------------------------------------------------------------------------------------
# Item 12: the SavedModel refuses a wrong dtype instead of casting it.


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = tiny_config(adversarial=False)
    model = builders.build_model(cfg)
    path = str(tmp_path_factory.mktemp("export") / "saved_model")
    export.export(cfg, model, path)
    return model, tf.saved_model.load(path)


def _images(n=3, size=16):
    return np.random.default_rng(1).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.mark.slow  # export + load of a tiny model: ~10-15 s on 2 shared cores
def test_saved_model_right_dtypes_match_the_model(exported):
    model, loaded = exported
    images = _images()
    h, z = model(augment.normalize(tf.constant(images, tf.float32) / 255.0), training=False)
    for out in (loaded.serve_uint8(images), loaded.serve(images.astype(np.float32) / 255.0),
                loaded.serve(images.astype(np.float64) / 255.0),
                loaded.serve(tf.constant(images.astype(np.float32) / 255.0))):
        np.testing.assert_allclose(out["h"].numpy(), h.numpy(), atol=1e-5)
        np.testing.assert_allclose(out["z"].numpy(), z.numpy(), atol=1e-5)
    # The signatures (TF Serving) keep the first dtypes: float32 and uint8.
    specs = {k: list(f.structured_input_signature[1].values())[0].dtype
             for k, f in loaded.signatures.items()}
    assert specs == {"serve": tf.float32, "serve_uint8": tf.uint8, "serving_default": tf.float32}


@pytest.mark.slow
@pytest.mark.parametrize("endpoint, dtype, says", [
    ("serve", np.uint8, "serve: takes float images in [0, 1]; for uint8 images in [0, 255] use "
                        "serve_uint8; got uint8 images"),
    ("serve", np.int64, "got int64 images"),
    ("serve_uint8", np.float32, "serve_uint8: takes uint8 images in [0, 255]; for float images "
                                "in [0, 1] use serve; got float32 images"),
    ("serve_uint8", np.float64, "got float64 images"),
    ("serve_uint8", np.int64, "got int64 images"),
])
def test_saved_model_refuses_a_wrong_dtype(exported, endpoint, dtype, says):
    _, loaded = exported
    images = _images().astype(dtype)
    if np.issubdtype(dtype, np.floating):
        images = images / 255.0  # the right values for the other endpoint
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        getattr(loaded, endpoint)(images)
    assert says in str(e.value)


@pytest.mark.slow
def test_saved_model_other_dtypes_find_no_function(exported):
    _, loaded = exported
    with pytest.raises(ValueError, match="Could not find matching concrete function"):
        loaded.serve(_images().astype(np.int16))


@pytest.mark.slow
def test_serve_refuses_0_255_values_even_when_cast(exported):
    """The `signatures` entries do cast NumPy arguments (measured): serve's range check then
    catches uint8 images read as floats; in-range floats pass."""
    _, loaded = exported
    with pytest.raises(tf.errors.InvalidArgumentError, match="got values from"):
        loaded.signatures["serve"](images=_images())
    with pytest.raises(tf.errors.InvalidArgumentError, match="got values from"):
        loaded.serve(_images().astype(np.float32))
    loaded.serve(np.full((1, 16, 16, 3), 1.005, np.float32))  # a resampling overshoot
