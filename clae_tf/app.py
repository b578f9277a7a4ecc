"""One run: prepare the workdir, then train (+ evaluate + export), evaluate or export."""

import dataclasses
import json
import os
import time

import keras
import tensorflow as tf

from clae_tf import ClaeError, checkpoints, data, distribute, evaluate, export, train
from clae_tf.config import CHECKPOINT_FLAGS, RESUME_DATA_FLAGS, Config

FLAGFILE = "flags.cfg"
# --precision -> the Keras policy: compute in bfloat16/float16, variables in float32.
POLICIES = {"float32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def check_workdir(cfg: Config):
    """A workdir that holds a checkpoint must be resumed with compatible flags: those that
    shape the checkpoint, and for training also those that decide the data it continues on."""
    path = os.path.join(cfg.run_dir, FLAGFILE)
    has_checkpoint = checkpoints.checkpoint_paths(os.path.join(cfg.run_dir, "checkpoints"))
    if not (has_checkpoint and os.path.exists(path)):
        return
    with open(path) as f:
        saved = Config.parse_flagfile(f.read())
    names = CHECKPOINT_FLAGS + (RESUME_DATA_FLAGS if cfg.mode == "train" else ())
    diffs = [f"--{k}={saved[k]} (now {cfg.value_str(k)})" for k in names
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


def process_seconds() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def run(cfg: Config, strategy=None) -> dict:
    """Runs cfg.mode. Returns what was written (results, paths).

    A training run records where its time went in results.json "timings" (seconds; bench/
    whole_run.py prints them as a table): start-up (process start to here: imports, TF), data
    load, the train loop's parts (train.train), evaluation and export.
    """
    timings = {"startup_seconds": process_seconds()}
    strategy = strategy or distribute.make_strategy(cfg)
    keras.utils.set_random_seed(cfg.seed)
    keras.mixed_precision.set_global_policy(POLICIES[cfg.precision])
    check_workdir(cfg)
    t = time.time()
    source = data.load(cfg)
    timings["data_load_seconds"] = time.time() - t
    export_dir = os.path.join(cfg.run_dir, "saved_model")
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
        timings.update(summary.pop("timings"))
        t = time.time()
        out["results"] = evaluate.evaluate(cfg, model, source, summary["step"], extra=summary)
        timings["eval_seconds"] = time.time() - t  # features, kNN and the linear probe
        if cfg.export:
            t = time.time()
            export.export(cfg, model, export_dir)
            timings["export_seconds"] = time.time() - t
            out["saved_model"] = export_dir
        timings["total_seconds"] = process_seconds()
        out["results"]["timings"] = timings
        _add_to_results(cfg, {"timings": timings})
        return out
    state = checkpoints.State(cfg, strategy)  # no optimizer: eval and export need the model only
    if not state.restore(model_only=True):
        raise ClaeError(f"--workdir: no checkpoint in {cfg.run_dir}/checkpoints to {cfg.mode}")
    if cfg.mode == "eval":
        out["results"] = evaluate.evaluate(cfg, state.model, source, state.step)
    else:
        export.export(cfg, state.model, export_dir)
        out["saved_model"] = export_dir
    return out


def _add_to_results(cfg: Config, entries: dict):
    path = os.path.join(cfg.run_dir, "results.json")
    with open(path) as f:
        results = json.load(f)
    results.update(entries)
    with open(path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)


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
    lines.append(f"Reproduce:    python run.py --flagfile={os.path.join(d, FLAGFILE)}")
    print("\n".join(lines))
