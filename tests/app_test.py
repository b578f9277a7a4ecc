"""One run (clae_tf/job/app.py): the robust suite checked once against the dataset, --mode=export
without a probe, and the printed summary of the robust results."""

import dataclasses
import os

import pytest
import tensorflow as tf

from clae_tf import ClaeError
from clae_tf.evaluation import robust
from clae_tf.job import app, checkpoints
from clae_tf.runtime import distribute, workdir

from conftest import tiny_config


def count_checks(monkeypatch):
    """The num_classes of every Suite.check call from now on (the check itself still runs)."""
    calls = []
    check = robust.Suite.check
    monkeypatch.setattr(robust.Suite, "check", lambda self, n: calls.append(n) or check(self, n))
    return calls


def _two_class_folder(root):
    for split, per_class in (("train", 8), ("test", 2)):
        for label in ("cat", "dog"):
            for i in range(per_class):
                path = root / split / label / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(tf.io.encode_png(tf.fill([8, 8, 3], tf.constant(
                    10 * i, tf.uint8))).numpy())
    return str(root)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dlr_attack_on_a_two_class_dataset_fails_before_training_or_restoring(tmp_path,
                                                                              monkeypatch, mode):
    """Checked once, as soon as the classes are known: before training, and for --mode=eval
    before the checkpoint is looked for (there is none here: that would be another error)."""
    checks = count_checks(monkeypatch)
    cfg = tiny_config(tmp_path, dataset=_two_class_folder(tmp_path / "data"),
                      robust_attacks="autoattack", mode=mode)
    with pytest.raises(ClaeError, match=r"^--robust_attacks: .*\(apgd-t needs 4\)"):
        app.run(cfg)
    assert checks == [2]
    assert not os.path.exists(os.path.join(cfg.run_dir, "checkpoints"))


@pytest.mark.slow  # > 10 s on the 2 shared cores
def test_export_mode_without_a_probe_says_so(tmp_path):
    """A probe.npz that cannot be read takes this same way (app._own_probe returns no probe and
    a note, as without one): the test below checks its note."""
    cfg = tiny_config(tmp_path)
    workdir.write_flagfile(cfg)
    checkpoints.State(cfg, distribute.make_strategy(cfg), 89, 89).manager.save(checkpoint_number=0)
    out = app.run(dataclasses.replace(cfg, mode="export"))
    assert os.path.exists(os.path.join(out["saved_model"], "saved_model.pb"))
    assert "probe_saved_model" not in out
    assert "no linear probe" in out["probe_note"] and "\n" not in out["probe_note"]
    assert not os.path.exists(os.path.join(cfg.run_dir, "probe_saved_model"))


@pytest.mark.parametrize("content", [b"kernel = 1\n", b"PK\x03\x04 truncated"])
def test_a_probe_that_cannot_be_read_exports_the_encoder_only_and_says_what_to_run(tmp_path,
                                                                                   content):
    """As with no probe at all: the encoder is exported, and the Probe line of the summary says
    why there is no probe export and what to run."""
    cfg = tiny_config(tmp_path)
    os.makedirs(cfg.run_dir)
    path = os.path.join(cfg.run_dir, "probe.npz")
    with open(path, "wb") as f:
        f.write(content)
    probe, note = app._own_probe(cfg, 0)
    assert probe is None and "\n" not in note
    assert note.startswith(f"{path} cannot be read (")
    assert note.endswith("); run --mode=eval to fit the probe again; exported the encoder only")


def test_printout_of_the_robust_results():
    r = {"robust_clean_top1": 0.421, "robust_examples": 1000, "robust_seconds": 312.4,
         "robust_attacks": ["pgd20", "apgd-ce", "apgd-t", "square"],
         "robust_l2_attacks": ["pgd20", "apgd-ce", "apgd-t"],
         # As read back from results.json: keys sorted as strings.
         "robust_top1": {"apgd-ce": {"1": 0.34, "16": 0.0, "2": 0.28},
                         "pgd20": {"1": 0.35, "16": 0.01, "2": 0.29},
                         "worst": {"1": 0.33, "16": 0.0, "2": 0.27}},
         "robust_top1_l2": {"pgd20": {"0.25": 0.3, "0.5": 0.2},
                            "worst": {"0.25": 0.29, "0.5": 0.125}}}
    assert app.robust_lines(r) == [
        "Robust top-1: clean 0.4210 on 1000 images  (pgd20 > apgd-ce > apgd-t > square, 312 s)",
        "  Linf /255:  worst 1:0.3300 2:0.2700 16:0.0000   pgd20 1:0.3500 2:0.2900 16:0.0100",
        "  L2:         worst 0.25:0.2900 0.5:0.1250   pgd20 0.25:0.3000 0.5:0.2000"]
    # One attack: its row is the worst case, printed once.
    one = dict(r, robust_attacks=["apgd-ce"], robust_top1={"apgd-ce": {"8": 0.5},
                                                           "worst": {"8": 0.5}})
    del one["robust_top1_l2"]
    assert app.robust_lines(one)[1:] == ["  Linf /255:  worst 8:0.5000"]
    # Results kept from an earlier evaluation (evaluate.earlier_robust_results) say so.
    kept = dict(one, robust_kept_from={"step": 7, "eval_flags": {}})
    assert app.robust_lines(kept)[0] == app.robust_lines(one)[0] + (
        "  [kept from an earlier evaluation of step 7]")
