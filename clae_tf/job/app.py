"""One run: prepare the workdir, then train (+ evaluate + export), evaluate or export."""

import os
import shlex
import sys
import time

import keras

from clae_tf import ClaeError
from clae_tf.data import sources
from clae_tf.evaluation import evaluate, robust
from clae_tf.job import checkpoints, export, finetuning, train
from clae_tf.runtime import distribute, signals, workdir
from clae_tf.runtime.config import Config

# --precision -> the Keras policy: compute in bfloat16/float16, variables in float32.
POLICIES = {"float32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


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
    with signals.handling():  # requests to stop, taken at safe points (run.py: for good)
        strategy = strategy or distribute.make_strategy(cfg)
        if not distribute.is_chief(strategy):
            return _run(cfg, strategy, timings)
        # Only the chief writes into the workdir; it holds it for the run (one run at a time).
        with workdir.held(cfg.run_dir):
            return _run(cfg, strategy, timings)


def _run(cfg: Config, strategy, timings: dict) -> dict:
    keras.utils.set_random_seed(cfg.seed)
    keras.mixed_precision.set_global_policy(POLICIES[cfg.precision])
    workdir.check_workdir(cfg)
    t = time.time()
    source = sources.load(cfg)
    timings["data_load_seconds"] = time.time() - t
    _check_robust_suite(cfg, source)
    out = {"workdir": cfg.run_dir}
    if cfg.mode == "train":
        _train(cfg, strategy, source, timings, out)
    elif cfg.mode == "finetune":  # ALF and AFF (finetuning.py)
        finetuning.run(cfg, strategy, source, out)
    else:
        _evaluate_or_export(cfg, strategy, source, out)
    return out


def _check_robust_suite(cfg: Config, source: sources.Source):
    """The one check of the robust suite against the dataset (robust.Suite.check, e.g. a DLR
    attack on 2 classes), for training and --mode=eval alike: before any training or restore."""
    suite = robust.Suite.from_config(cfg)
    if cfg.mode != "export" and suite.runs():
        suite.check(source.num_classes)


def _train(cfg: Config, strategy, source: sources.Source, timings: dict, out: dict):
    """Trains, then (the chief) evaluates and exports; the results with their timings go to
    results.json and `out`."""
    chief = distribute.is_chief(strategy)
    t0 = time.time()
    trained = train.train(cfg, strategy, source, on_accepted=(
        (lambda trains: workdir.record_flags(cfg, trains)) if chief else None))
    if not chief:  # multi-worker: only the chief evaluates and writes results and the export
        return
    summary = {**trained.results(), "wall_seconds_this_process": time.time() - t0}
    timings.update(trained.timings)
    t = time.time()
    out["results"] = evaluate.evaluate(cfg, trained.model, source, trained.step, extra=summary)
    out["results_path"] = workdir.eval_paths(cfg.run_dir)["results"]
    timings["eval_seconds"] = time.time() - t  # features, kNN and the linear probe
    if cfg.export:
        t = time.time()
        _export(cfg, trained.model, trained.step, out)
        timings["export_seconds"] = time.time() - t
    timings["total_seconds"] = process_seconds()
    out["results"]["timings"] = timings
    workdir.update_results(cfg.run_dir, {"timings": timings})


def _evaluate_or_export(cfg: Config, strategy, source: sources.Source, out: dict):
    """--mode=eval or export: the newest checkpoint's model, evaluated or exported."""
    state = checkpoints.State(cfg, strategy)  # no optimizer: eval and export need the model only
    if not state.restore(model_only=True):
        raise ClaeError(f"--workdir: no checkpoint in {cfg.run_dir}/{workdir.CHECKPOINTS} to "
                        f"{cfg.mode}")
    if cfg.mode == "export":
        _export(cfg, state.model, state.step, out)
        return
    other = workdir.other_data(cfg)
    out["results"] = evaluate.evaluate(cfg, state.model, source, state.step, other_data=other)
    out["results_path"] = workdir.eval_paths(cfg.run_dir, other)["results"]
    if other:
        paths = workdir.eval_paths(cfg.run_dir, other)
        out["results_note"] = (f"on other data than the run's own, {other}; probe: "
                               f"{os.path.basename(paths['probe'])}; the run's "
                               f"{workdir.RESULTS_FILE} and {workdir.PROBE_FILE} are left "
                               f"as they were")


def _export(cfg: Config, model, step: int, out: dict):
    """<workdir>/saved_model (serving endpoints), <workdir>/encoder.keras (to fine-tune), and
    encoder + probe (logits) if the run's own probe (probe.npz, never one of other data) is of
    this step; all of them whole and of this step (export.write_exports)."""
    print(f"Exporting the encoder of step {step} to {cfg.run_dir} ...", flush=True)
    probe, note = _own_probe(cfg, step)
    written = export.write_exports(cfg, model, step, cfg.run_dir, probe)
    paths = written["paths"]
    out["saved_model"] = paths[workdir.SAVED_MODEL]
    out["encoder_keras"] = paths[workdir.ENCODER_KERAS]
    if workdir.PROBE_SAVED_MODEL in paths:  # a new one, or the one of this step already there
        out["probe_saved_model"] = paths[workdir.PROBE_SAVED_MODEL]
        return
    if workdir.PROBE_SAVED_MODEL in written["removed"]:
        old = written["removed"][workdir.PROBE_SAVED_MODEL]
        note += (f"; removed {workdir.PROBE_SAVED_MODEL} (of "
                 f"{'step ' + str(old) if old is not None else 'an unknown step'})")
    out["probe_note"] = note


def _own_probe(cfg: Config, step: int):
    """The run's own probe (probe.npz) if it was trained on the encoder of `step`, else None;
    and why not (one line): no probe, one that cannot be read, or one of another step."""
    probe_path = workdir.eval_paths(cfg.run_dir)["probe"]
    if not os.path.exists(probe_path):
        return None, (f"no linear probe in {cfg.run_dir} yet (run --mode=eval first); "
                      f"exported the encoder only")
    try:
        probe = evaluate.load_probe(probe_path)
    except ClaeError as e:  # a broken probe.npz counts as none: export the encoder, say why
        return None, f"{str(e).removeprefix('--workdir: ')}; exported the encoder only"
    if probe["step"] != step:  # a probe of other weights would give meaningless logits
        return None, (f"the linear probe in {probe_path} is of step {probe['step']}, the "
                      f"checkpoint of step {step} (run --mode=eval first); exported the "
                      f"encoder only")
    return probe, None


def print_summary(out: dict):
    d = out["workdir"]
    lines = [f"Workdir:      {d}"]
    if "results" in out:
        r = out["results"]
        lines.append(f"kNN top-1:    {r['knn_top1']:.4f}   linear top-1: {r['linear_top1']:.4f}"
                     f"   (step {r['step']}, {r['test_examples']} test images)")
        if "robust_clean_top1" in r:
            lines += robust_lines(r)
        path = out.get("results_path", workdir.eval_paths(d)["results"])
        note = f"  ({out['results_note']})" if "results_note" in out else ""
        lines.append(f"Results:      {path}{note}")
    for kind, r in out.get("finetune", {}).items():  # --mode=finetune
        lines.append(f"{kind.upper()} top-1:    {r['top1']:.4f}   (encoder step "
                     f"{r['encoder_step']}, {r['recipe']['epochs']} epochs, {r['test_examples']} "
                     f"test images)")
        if "robust_clean_top1" in r:
            lines += robust_lines(r)
        lines.append(f"Classifier:   {out['finetune_exports'][kind]}  "
                     f"(logits = m.serve(images in [0, 1]))")
    if "finetune" in out:
        lines.append(f"Results:      {out['finetune_results']}  ({', '.join(out['finetune'])} "
                     f"beside SLF's linear_top1 and robust_*)")
    lines.append(f"Checkpoints:  {workdir.checkpoint_dir(d)}")
    logdir = shlex.quote("--logdir=" + workdir.tensorboard_dir(d))
    lines.append(f"TensorBoard:  tensorboard {logdir}")
    if "saved_model" in out:
        lines.append(f"SavedModel:   {out['saved_model']}  "
                     f"(m = tf.saved_model.load(path); m.serve(images))")
    if "encoder_keras" in out:
        lines.append(f"Keras model:  {out['encoder_keras']}  (keras.models.load_model(path))")
    if "probe_saved_model" in out:
        lines.append(f"Probe:        {out['probe_saved_model']}  "
                     f"(logits = m.serve(images in [0, 1]))")
    elif "probe_note" in out:
        lines.append(f"Probe:        {out['probe_note']}")
    if "saved_model" in out:
        lines.append(f"Model card:   {os.path.join(d, workdir.MODEL_CARD)}  (to share the exports)")
    lines.append(f"Reproduce:    {workdir.reproduce_command(d)}")
    print("\n".join(lines))
    for warning in out.get("results", {}).get("robust_warnings", []):  # gradient masking
        print(f"warning: {warning}", file=sys.stderr)


def robust_lines(r: dict) -> list:
    """The robust evaluation in a few lines: clean accuracy on the robust subset and the attack
    chain, then per norm the worst case over the chain and the first attack alone (radii in
    1/255 for L-inf, [0, 1]-pixel units for L2)."""
    chain = r.get("robust_attacks") or r.get("robust_l2_attacks") or []
    kept = r.get("robust_kept_from")
    lines = [f"Robust top-1: clean {r['robust_clean_top1']:.4f} on {r['robust_examples']} images"
             f"  ({' > '.join(chain)}, {r['robust_seconds']:.0f} s)"
             + (f"  [kept from an earlier evaluation of step {kept['step']}]" if kept else "")]
    for label, table, attacks in (("  Linf /255:  ", "robust_top1", "robust_attacks"),
                                  ("  L2:         ", "robust_top1_l2", "robust_l2_attacks")):
        if table not in r:
            continue
        rows = ["worst"] + (r[attacks][:1] if len(r[attacks]) > 1 else [])
        lines.append(label + "   ".join(f"{row} " + " ".join(
            f"{e}:{r[table][row][e]:.4f}" for e in sorted(r[table][row], key=float))
            for row in rows))  # results.json sorts keys as strings ("16" < "2")
    return lines
