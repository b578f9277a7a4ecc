"""--mode=finetune: the run's encoder fine-tuned adversarially (ALF, AFF: evaluation/finetune.py),
judged by the run's robust suite, its numbers written beside SLF's and its classifier exported.

What each fine-tune leaves in the workdir (for data other than the run's own, as --mode=eval,
the names end in _<data> and the numbers go to results_<data>.json):

    finetune_alf/, finetune_aff/          recipe.json and the checkpoints (ckpt-<step>, per epoch)
    results.json "alf", "aff"             top1, robust_*, the recipe, the encoder step
    alf_saved_model/, aff_saved_model/    encoder + head, the endpoints of probe_saved_model/,
                                          and finetune.json (kind, encoder step, recipe, top1)

A stopped fine-tune resumes from its checkpoint; a finished one, whose results are of the same
recipe, encoder step and robust flags and whose export is there, is skipped (--finetune_restart
runs it again); one whose results are missing or of other robust flags is evaluated again
without training.
"""

import json
import os
import shutil

from clae_tf import ClaeError
from clae_tf.data import sources
from clae_tf.evaluation import finetune
from clae_tf.job import checkpoints, export, portable
from clae_tf.runtime import files, signals, workdir
from clae_tf.runtime.config import DATA_FLAGS, EVAL_FLAGS, Config


def run(cfg: Config, strategy, source: sources.Source, out: dict):
    """Every fine-tune of --finetune on the newest checkpoint's encoder; out["finetune"] gets
    {kind: its results entry}, out["finetune_exports"] {kind: its export} and
    out["finetune_results"] the results file."""
    state = checkpoints.State(cfg, strategy)  # no optimizer: the encoder only
    if not state.restore(model_only=True):
        raise ClaeError(f"--workdir: no checkpoint in {cfg.run_dir}/{workdir.CHECKPOINTS} to "
                        f"fine-tune")
    other = workdir.other_data(cfg)
    encoder = portable.build_encoder(state.model, cfg.image_size, cfg.normalize)
    out["finetune"], out["finetune_exports"] = {}, {}
    out["finetune_results"] = workdir.eval_paths(cfg.run_dir, other)["results"]
    train = None
    for kind in cfg.finetune_list:
        recipe = finetune.Recipe.from_config(cfg, kind)
        where = workdir.finetune_paths(cfg.run_dir, kind, other)
        note = finetune.prepare(where["checkpoints"], recipe, state.step, cfg.finetune_restart)
        if note:
            print(note, flush=True)
        tuner = finetune.Tuner(recipe, encoder, source.num_classes, where["checkpoints"])
        reached = tuner.restore()
        if train is None:
            train = sources.read_images(source.train)
        total = recipe.steps_per_epoch(len(train[1])) * recipe.epochs
        flags = _eval_flags(cfg)
        results = files.read_json(workdir.eval_paths(cfg.run_dir, other)["results"]) or {}
        entry = results.get(kind) or {}
        if (reached == total and os.path.isdir(where["export"])
                and entry.get("recipe") == recipe.record()
                and entry.get("encoder_step") == state.step and entry.get("eval_flags") == flags):
            print(f"{kind.upper()} of the encoder of step {state.step} is done ({where['export']}"
                  f"); --finetune_restart runs it again", flush=True)
            out["finetune"][kind], out["finetune_exports"][kind] = entry, where["export"]
            continue
        print(f"{kind.upper()} of the encoder of step {state.step}: {recipe.epochs} epochs on "
              f"{len(train[1])} images" + (f", resuming at step {reached} of {total}"
                                           if reached else ""), flush=True)
        trained = tuner.train(*train, resume="run the same command" + (
            " without --finetune_restart" if cfg.finetune_restart else "") + " to resume")
        entry = {**finetune.evaluate(cfg, tuner.logits, source.test, source.num_classes),
                 "encoder_step": state.step, "recipe": recipe.record(), "eval_flags": flags,
                 "train_examples": int(len(train[1])), "steps": total,
                 "train_seconds_this_process": trained["seconds"],
                 "final_loss": trained["final_loss"]}
        write_classifier(cfg, tuner.encoder, tuner.probe(), where["export"],
                         {"kind": kind, "encoder_step": state.step, "recipe": recipe.record(),
                          "top1": entry["top1"]})
        workdir.update_results(cfg.run_dir, {kind: entry}, other)  # SLF's entries stay
        out["finetune"][kind], out["finetune_exports"][kind] = entry, where["export"]


def _eval_flags(cfg: Config) -> dict:
    """The data and robust flags the numbers are of (as results.json eval_flags)."""
    return {name: cfg.value_str(name) for name in EVAL_FLAGS
            if getattr(cfg, name) is not None and (name in DATA_FLAGS
                                                    or name.startswith("robust_"))}


def write_classifier(cfg: Config, encoder, probe: dict, path: str, info: dict):
    """export.export_probe of encoder + head at `path` (the endpoints and input checks of
    probe_saved_model/), with `info` in its finetune.json (what it is: the fine-tune, the encoder
    step, the recipe), whole or not at all: written beside it, then renamed into place with a
    stop request held back."""
    files.remove_leftovers(path)
    tmp = files.temporary_sibling(path)
    try:
        with files.writing(path, "the fine-tuned classifier", cleanup=(tmp,),
                           needed=lambda: files.tree_bytes(path)), signals.scratch(tmp):
            export.export_probe(cfg, None, probe, tmp, encoder=encoder)
            with open(os.path.join(tmp, workdir.FINETUNE_INFO), "w") as f:
                json.dump(info, f, indent=2, sort_keys=True)
            with signals.held():
                files.replace_path(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
