"""The model card written beside a run's exports: <workdir>/README.md, a Markdown page with a
YAML metadata block first, the form model hubs read, so that the workdir's exports can be shared
as they are. Built from the run's own files only (flags.cfg, results.json, export.json): what
the card says is what those files say."""

import os

from clae_tf.runtime import files, workdir

_METHODS = {"simclr": "SimCLR", "plain": "Plain", "uel": "UEL", "moco": "MoCo v2"}

_LOADING = {
    workdir.SAVED_MODEL: (
        "SavedModel of the encoder (any TensorFlow, no clae-tf): `m = tf.saved_model.load(path)`; "
        "`m.serve(images)` takes float32 images (N, H, W, 3) in [0, 1], `m.serve_uint8(images)` "
        "uint8 images in [0, 255]; both resize and normalise inside and return "
        "{{\"h\": representation, \"z\": embedding}}."),
    workdir.ENCODER_KERAS: (
        "the same encoder as a Keras 3 file of standard layers, to fine-tune: "
        "`keras.models.load_model(path)` takes float32 images (N, {size}, {size}, 3) in [0, 1] "
        "and returns {{\"h\", \"z\"}}."),
    workdir.PROBE_SAVED_MODEL: (
        "SavedModel of encoder + linear probe: `serve` / `serve_uint8` as above return the "
        "logits (N, classes) of the training classes."),
}


def card(flags: dict, results: dict, step: int, exports: list) -> str:
    """The card's text. flags: flags.cfg as {name: string value}; results: results.json (may be
    empty); step: the exports' checkpoint step; exports: the names of the exports written."""
    method = _METHODS.get(flags.get("method", ""), flags.get("method", "?"))
    adversarial = flags.get("adversarial") == "True"
    title = f"{method} + CLAE" if adversarial else method
    lines = ["---", "library_name: keras", "pipeline_tag: image-feature-extraction",
             "tags:", "- self-supervised-learning", "- contrastive-learning",
             f"- {flags.get('method', 'unknown')}"]
    lines += ["- adversarial-training", "- clae"] if adversarial else []
    dataset = _dataset_tag(flags.get("dataset", ""))
    lines += [f"datasets:\n- {dataset}"] if dataset else []
    lines += ["---", "",
              f"# {title} encoder ({flags.get('arch', '?')}, width {flags.get('width', '?')})", "",
              _summary(flags, adversarial, step), ""]
    lines += _results(results, step)
    lines += ["## Files", ""]
    size = flags.get("image_size", "?")
    lines += [f"- `{name}`: {_LOADING[name].format(size=size)}" for name in exports
              if name in _LOADING]
    lines += ["", "## Intended use and limits", "",
              "Research on self-supervised and adversarially trained representations: features "
              "for kNN, linear probes or fine-tuning on images like the training data "
              f"({flags.get('image_size', '?')} px). The robust numbers hold for the attacks and "
              "budget named above, on the subset named, not against every attack; they are no "
              "certificate. Accuracy outside the training distribution is unmeasured.", "",
              "## Reproduce", "",
              f"`{workdir.FLAGFILE}` beside this card holds every flag of the run; from a clone "
              "of clae-tf, with --dataset and --workdir set to your paths:", "", "```",
              f"python run.py --flagfile={workdir.FLAGFILE} --dataset=... --workdir=...", "```",
              ""]
    return "\n".join(lines)


def _dataset_tag(dataset: str) -> str:
    # A folder path is a user's own data: the card names only its last part.
    return os.path.basename(os.path.normpath(dataset)) if os.sep in dataset else dataset


def _summary(flags: dict, adversarial: bool, step: int) -> str:
    text = (f"Trained with clae-tf (`--method={flags.get('method')}`) on "
            f"`{_dataset_tag(flags.get('dataset', '?'))}` for {flags.get('epochs', '?')} "
            f"epochs, batch {flags.get('batch_size', '?')}, seed {flags.get('seed', '?')}; "
            f"these exports are of step {step}.")
    if adversarial:
        text += (f" Each step also trains on an adversarial view ({flags.get('attack', 'fgsm')}, "
                 f"eps {flags.get('eps')} in `--normalize={flags.get('normalize')}` units, "
                 f"alpha {flags.get('alpha')}) through separate batch norms; the export uses "
                 "the clean ones.")
    return text


def _results(results: dict, step: int) -> list:
    if not results:
        return ["## Results", "", "Not evaluated (no results.json).", ""]
    out = ["## Results", ""]
    if results.get("step") not in (None, step):
        out += [f"These numbers are of step {results['step']}, not of the exported step {step}.",
                ""]
    out += ["| measure | top-1 (%) |", "|---|---|"]
    for key, name in (("knn_top1", f"weighted kNN (k={_eval_flag(results, 'knn_k')})"),
                      ("linear_top1", "linear probe")):
        if key in results:
            out.append(f"| {name}, {results.get('test_examples', '?')} test images | "
                       f"{100 * results[key]:.2f} |")
    out += _robust(results)
    return out + [""]


def _robust(results: dict) -> list:
    rows = []
    for key, norm, unit in (("robust_top1", "L-inf", "/255"), ("robust_top1_l2", "L2", "")):
        worst = results.get(key, {}).get("worst", {})
        rows += [f"| robust, {norm} eps {eps}{unit}, worst case | {100 * acc:.1f} |"
                 for eps, acc in worst.items()]
    if not rows:
        return []
    # robust_suite: the suite and the budget that ran (robust.Suite.describe); results from
    # before it have the budget flags' values in eval_flags (their 0 did not exist then).
    suite = results.get("robust_suite") or (
        f"the attacks {', '.join(results.get('robust_attacks', []))} "
        f"(APGD {_eval_flag(results, 'robust_apgd_steps')} steps, APGD-T "
        f"{_eval_flag(results, 'robust_targets')} targets, Square "
        f"{_eval_flag(results, 'robust_square_queries')} queries)")
    budget = (f"Robust rows: encoder + probe, {results.get('robust_examples', '?')} class-balanced "
              f"test images (clean {100 * results.get('robust_clean_top1', float('nan')):.1f} %), "
              f"worst case over {suite}.")
    return rows + ["", budget]


def _eval_flag(results: dict, name: str) -> str:
    return results.get("eval_flags", {}).get(name, "?")


def write(run_dir: str, step: int, exports: list) -> str:
    """Writes the card of `run_dir`'s exports (of `step`) atomically; returns its path."""
    path = os.path.join(run_dir, workdir.MODEL_CARD)
    flags = workdir.saved_flags(run_dir) or {}
    results = files.read_json(workdir.eval_paths(run_dir)["results"]) or {}
    files.write_atomic(path, card(flags, results, step, exports), "the model card")
    return path

