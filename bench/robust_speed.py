"""Speed of clae-tf's APGD and Square against an attack library, on an exported classifier.

    python bench/robust_speed.py --saved_model=runs/<run>/probe_saved_model \\
        --image_folder=/data/cifar10/test --images=500 --eps=8 --steps=100 --queries=1000
    python bench/robust_speed.py --smoke                    # tiny model, random images, seconds
    python bench/robust_speed.py --smoke --library=none     # clae-tf's half only (no library)

Both implementations attack the SAME loaded `probe_saved_model` (encoder + linear probe,
`logits = m.serve(images in [0, 1])`, clae_tf/export.py) on the same images with the same
budget, L-inf radius eps (in 1/255), one restart:

  APGD-CE   clae-tf: attacks.apgd(loss="ce"), compiled, logits_fn = the SavedModel's serve;
            ART: AutoProjectedGradientDescent(loss_type="cross_entropy", eps_step=2 eps,
            nb_random_init=1, max_iter=steps). Throughput: images x iterations / s.
  Square    clae-tf: attacks.square_linf(p_init=0.8); ART: SquareAttack(p_init=0.8,
            nb_restarts=1, max_iter=queries). Throughput: images x queries / s.

Throughput is the budget (images x iterations, images x queries) over the wall time of one
whole attack of all the images; how an implementation spends it (early exits, extra forward
passes) is part of what is compared. The library is adversarial-robustness-toolbox (ART,
`pip install -e ".[bench]"`); foolbox 3.3 has neither APGD nor Square.

The two implementations run INTERLEAVED in one process (ours, ART, then ART, ours, ...: the
order alternates every repetition), after untimed warm-up calls of each on a few images
(tracing), so that the machine's load hits both alike. Each row gives the median time and its
range over the repetitions, ours / library as the ratio of the median throughputs and (in
brackets) as the median of the per-repetition ratios; the 1-minute load average is printed
with every repetition. Robust accuracy of each (correct clean AND on its adversarial image,
in %) is printed beside it, and every adversarial image is checked to lie in the eps-ball and
in [0, 1]. "model passes / image" counts the images that went through the model in all of an
implementation's calls of it (forward, or forward and backward: once), over the images
attacked: where the time goes.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from clae_tf.data import sources  # noqa: E402 (needs REPO on sys.path, above)
from clae_tf.evaluation import robust  # noqa: E402
from clae_tf.method import attacks  # noqa: E402

SMOKE = dict(images=16, steps=5, queries=20, repeats=2, eps=8.0, batch_size=16)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--saved_model", help="probe_saved_model directory (m.serve -> logits)")
    p.add_argument("--image_folder",
                   help="test images as <folder>/<class>/<image>; classes in sorted order")
    p.add_argument("--images", type=int, default=500,
                   help="a fixed class-balanced subset of this many images "
                        "(clae_tf.data.sources.balanced_subset, as the robust evaluation)")
    p.add_argument("--eps", type=float, default=8.0, help="L-inf radius in 1/255")
    p.add_argument("--steps", type=int, default=100, help="APGD iterations (0: skip APGD)")
    p.add_argument("--queries", type=int, default=1000, help="Square queries (0: skip Square)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of each")
    p.add_argument("--batch_size", type=int, default=500, help="images per attack call, both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--library", default="art", choices=("art", "foolbox", "none"),
                   help="the attack library to compare with; none: clae-tf's attacks only")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny run: a random linear SavedModel, random images, small budgets")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    if args.library == "foolbox":
        p.error("--library: foolbox 3.3 has neither APGD nor Square; use art")
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    elif not args.saved_model:
        p.error("--saved_model: required (or --smoke)")
    elif not args.image_folder:
        p.error("--image_folder: required (or --smoke)")
    return args


# ---------------------------------------------------------------------------------- inputs

def load_images(folder: str, n: int):
    """(images float32 (n, H, W, 3) in [0, 1], labels int32 (n,)) from <folder>/<class>/<file>.

    Classes are the sorted sub-folder names (as clae_tf.data.sources numbers them), files sorted by
    name; the n images are sources.balanced_subset of that order (classes take turns).
    """
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    files, labels = [], []
    for label, name in enumerate(classes):
        names = sorted(os.listdir(os.path.join(folder, name)))
        files += [os.path.join(folder, name, f) for f in names]
        labels += [label] * len(names)
    index = sources.balanced_subset(np.array(labels), n)
    images = [tf.io.decode_image(tf.io.read_file(files[i]), channels=3,
                                 expand_animations=False).numpy() for i in index]
    return (np.stack(images).astype(np.float32) / 255.0,
            np.array(labels, np.int32)[index])


def smoke_model(path: str, size: int = 8, classes: int = 10, seed: int = 0):
    """Writes a random linear classifier of (N, size, size, 3) images as a SavedModel at `path`
    with the endpoint probe_saved_model has: serve(float32 images in [0, 1]) -> logits."""
    rng = np.random.default_rng(seed)
    module = tf.Module()
    module.w = tf.Variable(rng.normal(0, 1, (size * size * 3, classes)).astype(np.float32))
    module.b = tf.Variable(np.zeros(classes, np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    def serve(images):
        return tf.matmul(tf.reshape(images, [-1, size * size * 3]), module.w) + module.b

    module.serve = serve
    tf.saved_model.save(module, path)


def smoke_inputs(args, folder: str):
    """(SavedModel path, images, labels) of --smoke: the labels are the model's own clean
    predictions, so that every image is attacked."""
    path = os.path.join(folder, "smoke_saved_model")
    smoke_model(path, seed=args.seed)
    x = np.random.default_rng(args.seed).uniform(0, 1, (args.images, 8, 8, 3)).astype(np.float32)
    model = tf.saved_model.load(path)  # held: the restored variables live as long as it does
    y = np.argmax(model.serve(x).numpy(), axis=1).astype(np.int32)
    return path, x, y


# --------------------------------------------------------------------- the implementations

def ours(serve, shape, eps: float, args) -> dict:
    """clae-tf's attacks of `serve` (images of `shape` (H, W, C)): {name: fn(x, y) -> (x_adv,
    info)}, compiled, the budget of `args`, as the robust evaluation runs them: pools of
    robust.POOL_BATCHES batches per call, the model seeing --batch_size images per call (the
    refill engine), each image drawing from its own random stream (its index)."""

    # One trace for every pool size: the warm-up on a few images compiles the timed calls.
    signature = [tf.TensorSpec([None, *shape], tf.float32), tf.TensorSpec([None], tf.int32),
                 tf.TensorSpec([2], tf.int64), tf.TensorSpec([None], tf.int32)]

    @tf.function(input_signature=signature)
    def apgd(x, y, seed, ids):  # -> (x_adv, fooled)
        return attacks.apgd(serve, x, y, eps, args.steps, seed, norm="linf", loss="ce",
                            batch=args.batch_size, ids=ids)

    @tf.function(input_signature=signature)
    def square(x, y, seed, ids):  # -> (x_adv, queries spent on each image)
        x_adv, _, n_queries = attacks.square_linf(serve, x, y, eps, args.queries, seed,
                                                  p_init=0.8, clip_min=0.0, clip_max=1.0,
                                                  batch=args.batch_size, ids=ids)
        return x_adv, n_queries

    def pooled(attack, info_of):
        def run(x, y):
            x_adv, extra = [], []
            for start, stop in robust.pools(len(x), args.batch_size):
                out, more = attack(tf.constant(x[start:stop]), tf.constant(y[start:stop]),
                                   tf.constant([args.seed, 0], tf.int64), tf.range(start, stop))
                x_adv.append(out.numpy())
                extra.append(more.numpy())
            return np.concatenate(x_adv), info_of(np.concatenate(extra))
        return run

    return {"apgd": pooled(apgd, lambda fooled: {}),
            "square": pooled(square, lambda n: {"mean_queries": float(np.mean(n))})}


class Counted:
    """A logits function that counts the images it is called on: a tf.Variable, so that the
    calls inside compiled functions and loops count too (a forward-backward pass counts once)."""

    def __init__(self, serve):
        self.serve = serve
        self.images = tf.Variable(0, dtype=tf.int64, trainable=False)

    def __call__(self, images):
        self.images.assign_add(tf.cast(tf.shape(images)[0], tf.int64))
        return self.serve(images)

    def counting(self, fn):
        """fn(x, y) -> (x_adv, info) with info["model_images"]: the images of its model calls."""
        def run(x, y):
            self.images.assign(0)
            x_adv, info = fn(x, y)
            return x_adv, dict(info, model_images=int(self.images.numpy()))
        return run


class ServeModel(tf.Module):
    """The loaded SavedModel as the callable ART's TensorFlowV2Classifier calls:
    model(x, training=...) -> logits (the export is inference-only: `training` is ignored)."""

    def __init__(self, serve):
        super().__init__()
        self._serve = serve

    def __call__(self, x, training=False):
        del training
        return self._serve(x)


def art_classifier(serve, num_classes: int, input_shape):
    """ART's TensorFlowV2Classifier of the loaded model, inputs in [0, 1], cross-entropy loss."""
    from art.estimators.classification import TensorFlowV2Classifier
    return TensorFlowV2Classifier(
        ServeModel(serve), nb_classes=num_classes, input_shape=tuple(input_shape),
        loss_object=tf.keras.losses.CategoricalCrossentropy(from_logits=True),
        clip_values=(0.0, 1.0))


def library(serve, num_classes: int, input_shape, eps: float, args) -> dict:
    """ART's APGD-CE and Square with the budgets of `ours`: {name: fn(x, y) -> (x_adv, info)},
    only those with a budget (ART refuses max_iter=0, and --steps=0 / --queries=0 skip one)."""
    from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack
    clf = art_classifier(serve, num_classes, input_shape)

    def run(attack):
        def fn(x, y):
            np.random.seed(args.seed)  # ART draws from NumPy's global generator
            return attack.generate(x, y=y), {}
        return fn

    impls = {}
    if args.steps > 0:
        impls["apgd"] = run(AutoProjectedGradientDescent(
            clf, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=args.steps, targeted=False,
            nb_random_init=1, batch_size=args.batch_size, loss_type="cross_entropy",
            verbose=False))
    if args.queries > 0:
        impls["square"] = run(SquareAttack(
            clf, norm=np.inf, eps=eps, max_iter=args.queries, p_init=0.8, nb_restarts=1,
            batch_size=args.batch_size, verbose=False))
    return impls


# ------------------------------------------------------------------------------ the timing

def interleave(impls: dict, x, y, repeats: int) -> dict:
    """Times each of `impls` ({name: fn(x, y) -> (x_adv, info)}) on the same (x, y), after two
    untimed warm-up calls of each (on 2 and 3 of the images), in `repeats` rounds whose order
    alternates (A B, B A, ...).

    Returns {name: {"seconds": [...], "x_adv": ..., "info": ...}, "_load": [1-min load/round]}
    (x_adv and info of the last round).
    """
    names = list(impls)
    out = {name: {"seconds": []} for name in names}
    out["_load"] = []
    for name in names:  # tracing: one batch size, then another (relaxes ART's shapes)
        impls[name](x[:2], y[:2])
        impls[name](x[:3], y[:3])
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            x_adv, info = impls[name](x, y)
            out[name]["seconds"].append(time.perf_counter() - start)
            out[name].update(x_adv=x_adv, info=info)
        out["_load"].append(os.getloadavg()[0])
        print(f"  round {r + 1}/{repeats}: " + ", ".join(
            f"{name} {out[name]['seconds'][-1]:.2f} s" for name in names)
            + f" (load {out['_load'][-1]:.1f})", flush=True)
    return out


def robust_top1(serve, x, y, x_adv, eps: float, batch_size: int) -> dict:
    """Robust top-1 (%) of x_adv (correct clean AND on x_adv), which images are robust ("robust",
    (N,) bool), and where x_adv lies: its largest L-inf distance from x (in 1/255) and whether
    it is inside [0, 1]."""
    def correct(images):
        return np.concatenate([np.argmax(serve(tf.constant(images[s:s + batch_size])).numpy(), 1)
                               for s in range(0, len(images), batch_size)]) == y
    robust = correct(x) & correct(x_adv)
    return {"robust_top1": 100.0 * float(np.mean(robust)), "robust": robust,
            "linf_255": float(np.max(np.abs(x_adv - x))) * 255.0,
            "in_range": bool(np.min(x_adv) >= 0.0 and np.max(x_adv) <= 1.0)}


# ----------------------------------------------------------------------------- the report

def summarize(attack: str, timed: dict, checks: dict, images: int, budget: int) -> list:
    """Table rows of one attack: per implementation the median time and its range, the
    throughput (images x budget per median second), ours / theirs, robust top-1, and the
    images its model calls took per image (info "model_images" / images, when counted)."""
    names = [n for n in timed if not n.startswith("_")]
    rows = []
    for name in names:
        s, info = timed[name]["seconds"], timed[name]["info"]
        rows.append({"attack": attack, "implementation": name, "median_s": statistics.median(s),
                     "min_s": min(s), "max_s": max(s), "seconds": s,
                     "throughput": images * budget / statistics.median(s), **info,
                     "passes": info.get("model_images", float("nan")) / images,
                     **checks[name]})
    if len(rows) == 2:  # ours first: the ratio of the medians and the median per-round ratio
        ours_s, theirs_s = rows[0]["seconds"], rows[1]["seconds"]
        rows[0]["ratio"] = rows[0]["throughput"] / rows[1]["throughput"]
        rows[0]["round_ratio"] = statistics.median(t / o for o, t in zip(ours_s, theirs_s))
    return rows


def table(rows: list) -> str:
    """The rows as a Markdown table."""
    lines = ["| attack | implementation | median s (min-max) | throughput | ours / library "
             "(per-round median) | model passes / image | robust top-1 (%) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        unit = "images x iterations/s" if r["attack"].startswith("APGD") else "queries/s"
        ratio = (f"**{r['ratio']:.2f}x** ({r['round_ratio']:.2f}x)" if "ratio" in r else "")
        lines.append(f"| {r['attack']} | {r['implementation']} | {r['median_s']:.2f} "
                     f"({r['min_s']:.2f}-{r['max_s']:.2f}) | {r['throughput']:,.0f} {unit} | "
                     f"{ratio} | {r['passes']:.1f} | {r['robust_top1']:.1f} |")
    return "\n".join(lines)


def fooled_only(robust: dict) -> dict:
    """{name: images fooled by that implementation that the other one left standing} of two
    implementations' robust masks ({name: (N,) bool}); {} for one."""
    if len(robust) != 2:
        return {}
    (a, robust_a), (b, robust_b) = robust.items()
    return {a: int(np.sum(robust_b & ~robust_a)), b: int(np.sum(robust_a & ~robust_b))}


def disagreements(rows: list) -> list:
    """Lines saying where an adversarial image left the eps-ball or [0, 1], and where the two
    implementations' robust accuracies differ by more than a point."""
    notes = []
    for r in rows:
        if r["linf_255"] > r["eps_255"] * (1 + 1e-5) + 1e-4 or not r["in_range"]:
            notes.append(f"error: {r['attack']} ({r['implementation']}): an adversarial image "
                         f"lies {r['linf_255']:.4f}/255 from its image or outside [0, 1]")
    by_attack = {}
    for r in rows:
        by_attack.setdefault(r["attack"], []).append(r)
    for attack, pair in by_attack.items():
        if len(pair) == 2 and abs(pair[0]["robust_top1"] - pair[1]["robust_top1"]) > 1.0:
            split = ", ".join(f"{r['fooled_only']} only by {r['implementation']}"
                              for r in pair if "fooled_only" in r)
            notes.append(f"note: {attack}: robust top-1 differs by "
                         f"{abs(pair[0]['robust_top1'] - pair[1]['robust_top1']):.1f} points "
                         f"between the implementations" + (f" (images fooled: {split})"
                                                           if split else ""))
    return notes


def header(args, n: int, clean: float) -> str:
    """One line: the code, the libraries, the machine and the budgets of this run."""
    try:
        import subprocess

        def git(*cmd):
            return subprocess.run(["git", "-C", REPO, *cmd], capture_output=True,
                                  text=True).stdout.strip()
        commit = git("rev-parse", "--short", "HEAD")
        if git("status", "--porcelain", "--untracked-files=no"):
            commit += " + uncommitted changes"
    except OSError:
        commit = "?"
    lib = ""
    if args.library == "art":
        import art
        lib = f", adversarial-robustness-toolbox {art.__version__}"
    return (f"commit {commit}, TensorFlow {tf.__version__}{lib}, {os.cpu_count()} CPUs; "
            f"{n} images, clean top-1 {clean:.1f}%, eps {args.eps:g}/255, APGD {args.steps} "
            f"iterations, Square {args.queries} queries, batch {args.batch_size}, "
            f"{args.repeats} repetitions")


# ------------------------------------------------------------------------------------ main

def run(args, serve, x, y) -> dict:
    """Warms up, times and checks every attack with a budget; returns the results."""
    eps = args.eps / 255.0
    clean = robust_top1(serve, x, y, x, eps, args.batch_size)["robust_top1"]
    counted = {"clae-tf": Counted(serve)}  # one counter each
    impls = {"clae-tf": ours(counted["clae-tf"], x.shape[1:], eps, args)}
    if args.library == "art":
        counted["ART"] = Counted(serve)
        num_classes = int(serve(tf.constant(x[:1])).shape[-1])
        impls["ART"] = library(counted["ART"], num_classes, x.shape[1:], eps, args)
    impls = {name: {key: counted[name].counting(fn) for key, fn in fns.items()}
             for name, fns in impls.items()}
    rows = []
    for attack, key, budget in ((f"APGD-CE, {args.steps} it.", "apgd", args.steps),
                                (f"Square, {args.queries} q.", "square", args.queries)):
        if budget <= 0:
            continue
        print(f"{attack} on {len(x)} images at {args.eps:g}/255:", flush=True)
        timed = interleave({name: fns[key] for name, fns in impls.items()}, x, y, args.repeats)
        checks = {name: dict(robust_top1(serve, x, y, timed[name]["x_adv"], eps,
                                         args.batch_size), eps_255=args.eps) for name in impls}
        only = fooled_only({name: checks[name].pop("robust") for name in impls})
        for name, count in only.items():
            checks[name]["fooled_only"] = count
        for row in summarize(attack, timed, checks, len(x), budget):
            rows.append(dict(row, load=timed["_load"]))
    return {"header": header(args, len(x), clean), "clean_top1": clean, "rows": rows,
            "load": [v for r in rows[::max(1, len(impls))] for v in r["load"]]}


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            path, x, y = smoke_inputs(args, tmp)
        else:
            path = args.saved_model
            x, y = load_images(args.image_folder, args.images)
        model = tf.saved_model.load(path)  # held: its variables live as long as it does
        result = run(args, model.serve, x, y)
    result["load_before"], result["load_after"] = load_before, os.getloadavg()[0]
    print()
    print(result["header"])
    print(f"1-minute load average: {load_before:.1f} before, per round "
          f"{', '.join(f'{v:.1f}' for v in result['load'])}, {result['load_after']:.1f} after")
    print(table(result["rows"]))
    notes = disagreements(result["rows"])
    for line in notes:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if any(line.startswith("error:") for line in notes) else 0


if __name__ == "__main__":
    sys.exit(main())
