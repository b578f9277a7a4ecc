"""One run: prepare the workdir, then train (+ evaluate + export), evaluate or export."""

import dataclasses
import json
import os
import time

import keras

from clae_tf import (ClaeError, checkpoints, data, distribute, evaluate, export, files, portable,
                     signals, train)
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
    """Writes <workdir>/flags.cfg atomically (a kill never leaves half of it)."""
    os.makedirs(cfg.run_dir, exist_ok=True)
    resolved = dataclasses.replace(cfg, workdir=cfg.run_dir)
    files.write_atomic(os.path.join(cfg.run_dir, FLAGFILE),
                       f"# Reproduce this run: python run.py --flagfile={cfg.run_dir}/{FLAGFILE}\n"
                       + resolved.to_flagfile())


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
    with signals.handling():  # SIGTERM as Ctrl-C in every phase (run.py installs it for good)
        strategy = strategy or distribute.make_strategy(cfg)
        if not distribute.is_chief(strategy):
            return _run(cfg, strategy, timings)
        # Only the chief writes into the workdir; it holds it for the run (one run at a time).
        files.check_writable(cfg.run_dir)
        with files.workdir_lock(cfg.run_dir):
            return _run(cfg, strategy, timings)


def _run(cfg: Config, strategy, timings: dict) -> dict:
    keras.utils.set_random_seed(cfg.seed)
    keras.mixed_precision.set_global_policy(POLICIES[cfg.precision])
    check_workdir(cfg)
    t = time.time()
    source = data.load(cfg)
    timings["data_load_seconds"] = time.time() - t
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
            _export(cfg, model, summary["step"], out)
            timings["export_seconds"] = time.time() - t
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
        _export(cfg, state.model, state.step, out)
    return out


def _export(cfg: Config, model, step: int, out: dict):
    """<workdir>/saved_model (serving endpoints), <workdir>/encoder.keras (to fine-tune), and
    encoder + probe (logits) if the probe is of this step."""
    print(f"Exporting step {step} to {cfg.run_dir}", flush=True)
    out["saved_model"] = os.path.join(cfg.run_dir, "saved_model")
    out["encoder_keras"] = os.path.join(cfg.run_dir, "encoder.keras")
    encoder = portable.build_encoder(model, cfg.image_size, cfg.normalize)  # one copy for all
    export.export(cfg, model, out["saved_model"], encoder)
    export.export_keras(cfg, model, out["encoder_keras"], encoder)
    probe_path = os.path.join(cfg.run_dir, evaluate.PROBE_FILE)
    if not os.path.exists(probe_path):
        out["probe_note"] = (f"no linear probe in {cfg.run_dir} yet (run --mode=eval first); "
                             f"exported the encoder only")
        return
    probe = evaluate.load_probe(probe_path)
    if probe["step"] != step:  # a probe of other weights would give meaningless logits
        out["probe_note"] = (f"the linear probe in {probe_path} is of step {probe['step']}, the "
                             f"checkpoint of step {step} (run --mode=eval first); exported the "
                             f"encoder only")
        return
    probe_dir = os.path.join(cfg.run_dir, "probe_saved_model")
    export.export_probe(cfg, model, probe, probe_dir, encoder)
    out["probe_saved_model"] = probe_dir


def _add_to_results(cfg: Config, entries: dict):
    path = os.path.join(cfg.run_dir, "results.json")
    results = files.read_json(path) or {}
    results.update(entries)
    files.write_atomic(path, json.dumps(results, indent=2, sort_keys=True))


def print_summary(out: dict):
    d = out["workdir"]
    lines = [f"Workdir:      {d}"]
    if "results" in out:
        r = out["results"]
        lines.append(f"kNN top-1:    {r['knn_top1']:.4f}   linear top-1: {r['linear_top1']:.4f}"
                     f"   (step {r['step']}, {r['test_examples']} test images)")
        if "robust_top1" in r:
            lines.append(f"Robust top-1: {robust_line(r)}")
        lines.append(f"Results:      {os.path.join(d, 'results.json')}")
    lines.append(f"Checkpoints:  {os.path.join(d, 'checkpoints')}")
    lines.append(f"TensorBoard:  tensorboard --logdir={os.path.join(d, 'tensorboard')}")
    if "saved_model" in out:
        lines.append(f"SavedModel:   {out['saved_model']}  (m = tf.saved_model.load(path); m.serve(images))")
    if "encoder_keras" in out:
        lines.append(f"Keras model:  {out['encoder_keras']}  (keras.models.load_model(path))")
    if "probe_saved_model" in out:
        lines.append(f"Probe:        {out['probe_saved_model']}  (logits = m.serve(images in [0, 1]))")
    elif "probe_note" in out:
        lines.append(f"Probe:        {out['probe_note']}")
    lines.append(f"Reproduce:    python run.py --flagfile={os.path.join(d, FLAGFILE)}")
    print("\n".join(lines))


def robust_line(r: dict) -> str:
    """One compact line: clean, then each attack at each eps (1/255), on the robust subset."""
    parts = [f"clean {r['robust_clean_top1']:.4f}"]
    for attack, by_eps in r["robust_top1"].items():
        eps = sorted(by_eps, key=float)  # results.json sorts keys as strings ("16" < "2")
        parts.append(f"{attack.upper()} " + " ".join(f"{e}:{by_eps[e]:.4f}" for e in eps))
    return f"{'  '.join(parts)}  (eps/255, {r['robust_examples']} images, {r['robust_seconds']:.0f} s)"
