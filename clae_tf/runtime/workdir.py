"""A run's directory (--workdir): its layout, its flags.cfg and its results.

The only module that knows what a run leaves in its workdir (docs/monitoring.md) and the only
writer of its results files:

    flags.cfg                  the resolved flags (reproduce and resume the run)
    checkpoints/               checkpoints.State's checkpoints
    tensorboard/               events (train/, eval/, eval_<data>/), projector files
    results.json, probe.npz    the evaluation on the run's own data
    results_<data>.json, probe_<data>.npz   an evaluation (--mode=eval) on other data
    saved_model/, encoder.keras, probe_saved_model/, export.json   the exports (export.py)
    README.md                  the exports' model card (model_card.py)
    .lock                      held by the process that runs in it
    sweep.jsonl                a protocol sweep's record of the run (scripts/sweep_lib.sh)

No TensorFlow here: run.py reads flags.cfg before importing it.
"""

import contextlib
import dataclasses
import json
import os
import re
import shlex
import sys
from typing import Optional

from clae_tf import ClaeError
from clae_tf.runtime import files
from clae_tf.runtime.config import CHECKPOINT_FLAGS, DATA_FLAGS, RESUME_DATA_FLAGS, Config

FLAGFILE = "flags.cfg"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
RESULTS_FILE = "results.json"
PROBE_FILE = "probe.npz"
LOCK_FILE = ".lock"
# The exports, and the manifest that says of which step they are (export.write_exports).
SAVED_MODEL, ENCODER_KERAS = "saved_model", "encoder.keras"
PROBE_SAVED_MODEL = "probe_saved_model"
EXPORTS = (SAVED_MODEL, ENCODER_KERAS, PROBE_SAVED_MODEL)
MANIFEST = "export.json"
MODEL_CARD = "README.md"  # a model hub's README: metadata block, then the card
EXPORT_STAGING = "export"  # the exports are written into export.<pid>.tmp/ first
# The adversarial fine-tunes (--mode=finetune, job/finetuning.py): per kind (alf, aff) its
# checkpoints and its exported classifier, whose FINETUNE_INFO says what it is.
FINETUNE_INFO = "finetune.json"
# What a protocol sweep records of a run's processes (preset, commit, load); written by
# scripts/sweep_lib.sh alone (sweep_run), read by scripts/compare.py.
SWEEP_FILE = "sweep.jsonl"


def finetune_paths(run_dir: str, kind: str, other_data=None) -> dict:
    """{"checkpoints", "export"} of fine-tune `kind` in `run_dir`: finetune_<kind>/ and
    <kind>_saved_model/ (with other_data, eval_paths', a _<other_data> suffix on both)."""
    suffix = f"_{other_data}" if other_data else ""
    return {"checkpoints": os.path.join(run_dir, f"finetune_{kind}{suffix}"),
            "export": os.path.join(run_dir, f"{kind}{suffix}_saved_model")}


def flagfile(run_dir: str) -> str:
    """<run_dir>/flags.cfg."""
    return os.path.join(run_dir, FLAGFILE)


def checkpoint_dir(run_dir: str) -> str:
    """<run_dir>/checkpoints."""
    return os.path.join(run_dir, CHECKPOINTS)


def checkpoint_paths(directory: str) -> list:
    """Every ckpt-<step> prefix in `directory` that has an index file, newest first."""
    if not os.path.isdir(directory):
        return []
    steps = [int(name[5:-6]) for name in os.listdir(directory)
             if name.startswith("ckpt-") and name.endswith(".index") and name[5:-6].isdigit()]
    return [os.path.join(directory, f"ckpt-{step}") for step in sorted(steps, reverse=True)]


def tensorboard_dir(run_dir: str) -> str:
    """<run_dir>/tensorboard."""
    return os.path.join(run_dir, TENSORBOARD)


@contextlib.contextmanager
def held(run_dir: str):
    """Creates `run_dir` if needed, checks that it can be written, and holds it for the body (a
    second run on it fails at once, files.workdir_lock on <run_dir>/.lock)."""
    files.check_writable(run_dir)
    with files.workdir_lock(run_dir, LOCK_FILE):
        yield


def data_name(cfg: Config) -> str:
    """A file-name-safe name of cfg's data: the dataset (a folder's last part), then the subset
    flags (`digits_per_class5`, `my_images_train1000`)."""
    dataset = os.path.normpath(cfg.dataset)
    name = os.path.basename(dataset) if os.path.isdir(dataset) else dataset
    if cfg.train_examples:
        name += f"_train{cfg.train_examples}"
    if cfg.examples_per_class:
        name += f"_per_class{cfg.examples_per_class}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "data"


def eval_paths(run_dir: str, other_data=None) -> dict:
    """Where an evaluation writes: {"results", "probe"} paths and the TensorBoard "prefix".

    other_data: None for the run's own data (results.json, probe.npz, eval/...); for an
    evaluation on other data, its data_name: results_<name>.json, probe_<name>.npz and
    eval_<name>/..., so that the run's own results, and the probe export reads, stay its own.
    """
    if other_data is None:
        return {"results": os.path.join(run_dir, RESULTS_FILE),
                "probe": os.path.join(run_dir, PROBE_FILE), "prefix": "eval"}
    return {"results": os.path.join(run_dir, f"results_{other_data}.json"),
            "probe": os.path.join(run_dir, f"probe_{other_data}.npz"),
            "prefix": f"eval_{other_data}"}


def update_results(run_dir: str, entries: dict, other_data=None, stale_prefix=None) -> dict:
    """Merges `entries` into the results file of eval_paths(run_dir, other_data) and writes it
    atomically (a kill never leaves half of it); returns the merged results.

    What the file held is kept (--mode=eval keeps what training wrote: wall time, epochs...),
    except the keys that start with `stale_prefix`; a broken file counts as absent.
    """
    path = eval_paths(run_dir, other_data)["results"]
    saved = files.read_json(path) or {}
    if stale_prefix is not None:
        saved = {k: v for k, v in saved.items() if not k.startswith(stale_prefix)}
    results = {**saved, **entries}
    files.write_atomic(path, json.dumps(results, indent=2, sort_keys=True), "the results")
    return results


def saved_flags(run_dir: str) -> Optional[dict]:
    """The flags in <run_dir>/flags.cfg ({name: string value}), or None when there is no
    readable one (missing, not UTF-8 text, not a file)."""
    try:
        with open(flagfile(run_dir), encoding="utf-8") as f:
            return Config.parse_flagfile(f.read())
    except (OSError, UnicodeDecodeError):
        return None


def check_workdir(cfg: Config):
    """A workdir that holds a checkpoint must be resumed with compatible flags: those that
    shape the checkpoint, and for training also those that decide the data it continues on.

    An unreadable flags.cfg is treated as a missing one: the checkpoint itself then decides
    (checkpoints.State.restore refuses one that does not fit), and flags.cfg is rewritten once
    a training run is accepted.
    """
    path = flagfile(cfg.run_dir)
    if not checkpoint_paths(checkpoint_dir(cfg.run_dir)):
        return
    saved = saved_flags(cfg.run_dir)
    if saved is None:
        if os.path.lexists(path):
            print(f"warning: {path} cannot be read (not a UTF-8 text file); the checkpoint "
                  f"alone decides whether these flags fit, and a training run that it accepts "
                  f"rewrites {FLAGFILE}", file=sys.stderr)
        return
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
    files.write_atomic(flagfile(cfg.run_dir),
                       f"# Reproduce this run: {reproduce_command(cfg.run_dir)}\n"
                       + resolved.to_flagfile(), "the run's flags")


def reproduce_command(run_dir: str) -> str:
    """The shell command that reproduces (and resumes) the run in `run_dir`, quoted to paste."""
    return f"python run.py {shlex.quote('--flagfile=' + flagfile(run_dir))}"


def record_flags(cfg: Config, trains: bool):
    """Once the checkpoint accepted cfg: flags.cfg, if this process trains (its flags are then
    the run's) or if the workdir has no complete flags.cfg (a run needs one to be evaluated). A
    process that only evaluates and exports (a finished run, re-run with --epochs=1) leaves the
    training's flags.cfg alone."""
    saved = saved_flags(cfg.run_dir)
    complete = saved is not None and set(Config.parse_flagfile(cfg.to_flagfile())) <= set(saved)
    if trains or not complete:
        write_flagfile(cfg)


def other_data(cfg: Config) -> Optional[str]:
    """--mode=eval: None when cfg's data flags are the run's own (flags.cfg), else the
    data_name of cfg's data, whose results go to files of their own."""
    saved = saved_flags(cfg.run_dir)
    if saved is None:
        return None
    for name in DATA_FLAGS:
        now, was = getattr(cfg, name), saved.get(name)
        now = None if now is None else cfg.value_str(name)
        same_folder = (name == "dataset" and was is not None and os.path.isdir(now)
                       and os.path.isdir(was) and os.path.samefile(now, was))
        if now != was and not same_folder:
            return data_name(cfg)
    return None
