"""One run: prepare the workdir, then train (+ evaluate + export), evaluate or export."""

import dataclasses
import json
import os
import time

import keras
import tensorflow as tf

from clae_tf import ClaeError, checkpoints, data, distribute, evaluate, export, train
from clae_tf.config import CHECKPOINT_FLAGS, Config

FLAGFILE = "flags.cfg"


def check_workdir(cfg: Config):
    """A workdir that holds a checkpoint must be resumed with compatible flags."""
    path = os.path.join(cfg.run_dir, FLAGFILE)
    has_checkpoint = tf.train.latest_checkpoint(os.path.join(cfg.run_dir, "checkpoints"))
    if not (has_checkpoint and os.path.exists(path)):
        return
    with open(path) as f:
        saved = Config.parse_flagfile(f.read())
    diffs = [f"--{k}={saved[k]} (now {cfg.value_str(k)})" for k in CHECKPOINT_FLAGS
             if k in saved and saved[k] != cfg.value_str(k)]
    if diffs:
        raise ClaeError(f"--workdir: {cfg.run_dir} holds a checkpoint made with "
                        f"{', '.join(diffs)}; use the same flags or another --workdir")


def write_flagfile(cfg: Config):
    os.makedirs(cfg.run_dir, exist_ok=True)
    resolved = dataclasses.replace(cfg, workdir=cfg.run_dir)
    with open(os.path.join(cfg.run_dir, FLAGFILE), "w") as f:
        f.write(f"# Reproduce this run: python run.py --flagfile={cfg.run_dir}/{FLAGFILE}\n")
        f.write(resolved.to_flagfile())


def run(cfg: Config, strategy=None) -> dict:
    """Runs cfg.mode. Returns what was written (results, paths)."""
    strategy = strategy or distribute.make_strategy(cfg)
    keras.utils.set_random_seed(cfg.seed)
    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if cfg.precision == "bf16" else "float32")
    check_workdir(cfg)
    source = data.load(cfg)
    out = {"workdir": cfg.run_dir}
    if cfg.mode == "train":
        chief = distribute.is_chief(strategy)
        if chief:
            write_flagfile(cfg)
        t0 = time.time()
        summary = train.train(cfg, strategy, source)
        model = summary.pop("model")
        if not chief:  # multi-worker: only the chief evaluates and writes results and the export
            return out
        summary["wall_seconds_this_process"] = time.time() - t0
        out["results"] = evaluate.evaluate(cfg, model, source, summary["step"], extra=summary)
        if cfg.export:
            out.update(_export(cfg, model))
        return out
    state = checkpoints.State(cfg, strategy)  # no optimizer: eval and export need the model only
    if not state.restore(model_only=True):
        raise ClaeError(f"--workdir: no checkpoint in {cfg.run_dir}/checkpoints to {cfg.mode}")
    if cfg.mode == "eval":
        out["results"] = evaluate.evaluate(cfg, state.model, source, state.step)
    else:
        out.update(_export(cfg, state.model))
    return out


def _export(cfg: Config, model) -> dict:
    """<workdir>/saved_model (serving endpoints) and <workdir>/encoder.keras (to fine-tune)."""
    paths = {"saved_model": os.path.join(cfg.run_dir, "saved_model"),
             "encoder_keras": os.path.join(cfg.run_dir, "encoder.keras")}
    export.export(cfg, model, paths["saved_model"])
    export.export_keras(cfg, model, paths["encoder_keras"])
    return paths


def print_summary(out: dict):
    d = out["workdir"]
    lines = [f"Workdir:      {d}"]
    if "results" in out:
        r = out["results"]
        lines.append(f"kNN top-1:    {r['knn_top1']:.4f}   linear top-1: {r['linear_top1']:.4f}"
                     f"   (step {r['step']}, {r['test_examples']} test images)")
        lines.append(f"Results:      {os.path.join(d, 'results.json')}")
    lines.append(f"Checkpoints:  {os.path.join(d, 'checkpoints')}")
    lines.append(f"TensorBoard:  tensorboard --logdir={os.path.join(d, 'tensorboard')}")
    if "saved_model" in out:
        lines.append(f"SavedModel:   {out['saved_model']}  (m = tf.saved_model.load(path); m.serve(images))")
    if "encoder_keras" in out:
        lines.append(f"Keras model:  {out['encoder_keras']}  (keras.models.load_model(path))")
    lines.append(f"Reproduce:    python run.py --flagfile={os.path.join(d, FLAGFILE)}")
    print("\n".join(lines))
