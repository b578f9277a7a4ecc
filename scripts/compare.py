"""Compare finished runs: a markdown table over seeds per method and a PNG plot.

    python scripts/compare.py runs/cifar10_small/*_seed* --out runs/cifar10_small/compare

Reads each workdir's results.json (accuracies, wall time) and flags.cfg (to group the runs by
method: SimCLR, SimCLR+CLAE, ...), prints the table and writes <out>/comparison.md and
<out>/comparison.png (accuracy per method with every seed, and the training-loss curves from the
TensorBoard events). Needs matplotlib for the plot (pip install matplotlib); without it only the
table is written. Reads TensorBoard events without importing TensorFlow.

An offline tool over finished runs, not part of training: the clae_tf package does not import it.
"""

import argparse
import glob
import json
import math
import os
import struct
import sys
from typing import Dict, List, Optional

# Run as `python scripts/compare.py` from a checkout: the repository root holds clae_tf.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clae_tf.config import Config  # noqa: E402  (after the path set-up)

METHOD_NAMES = {"simclr": "SimCLR", "plain": "Plain", "uel": "UEL", "moco": "MoCo"}
# Flags that may differ between the runs of one group (the seeds of one method).
PER_RUN_FLAGS = {"seed", "workdir", "data_dir"}


def method_label(flags: dict) -> str:
    """'SimCLR' or 'SimCLR+CLAE' from a run's flags ({name: string} as in flags.cfg)."""
    name = METHOD_NAMES.get(flags.get("method", "?"), flags.get("method", "?"))
    return name + ("+CLAE" if flags.get("adversarial") == "True" else "")


def load_run(workdir: str) -> dict:
    """{workdir, label, flags, results} of one finished run; raises SystemExit if unusable."""
    paths = {name: os.path.join(workdir, name) for name in ("results.json", "flags.cfg")}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise SystemExit(f"error: {workdir}: no {', '.join(os.path.basename(p) for p in missing)}"
                         f" (not a finished clae-tf run?)")
    with open(paths["results.json"]) as f:
        results = json.load(f)
    with open(paths["flags.cfg"]) as f:
        flags = Config.parse_flagfile(f.read())
    return {"workdir": workdir, "label": method_label(flags), "flags": flags, "results": results}


def group_runs(runs: List[dict]) -> Dict[str, List[dict]]:
    """Runs by method label, in order of first appearance."""
    groups: Dict[str, List[dict]] = {}
    for run in runs:
        groups.setdefault(run["label"], []).append(run)
    return groups


def flag_differences(runs: List[dict]) -> List[str]:
    """Flags (other than the seed and workdir) whose values differ between runs of one group."""
    names = set().union(*(r["flags"] for r in runs)) - PER_RUN_FLAGS
    return sorted(n for n in names if len({r["flags"].get(n) for r in runs}) > 1)


def mean_std(values: List[float]):
    """Mean and sample standard deviation (ddof=1; nan for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def _pct(mean, std=None):
    if std is None:
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if not math.isnan(std) else f"{100 * mean:.2f}"


def _minutes(seconds: Optional[float]) -> str:
    return "?" if seconds is None else f"{seconds / 60:.1f}"


def markdown_table(groups: Dict[str, List[dict]]) -> str:
    """The summary table (mean ± std over seeds), the differences, and one row per run."""
    lines = ["| method | seeds | kNN top-1 (%) | linear top-1 (%) | training wall time / run (min) |",
             "|---|---|---|---|---|"]
    stats = {}
    for label, runs in groups.items():
        knn = mean_std([r["results"]["knn_top1"] for r in runs])
        lin = mean_std([r["results"]["linear_top1"] for r in runs])
        walls = [r["results"].get("wall_seconds_this_process") for r in runs]
        wall = sum(walls) / len(walls) if None not in walls else None
        stats[label] = (knn, lin)
        seeds = ",".join(r["flags"].get("seed", "?") for r in runs)
        lines.append(f"| {label} | {seeds} | {_pct(*knn)} | {_pct(*lin)} | {_minutes(wall)} |")
    labels = list(groups)
    if len(labels) > 1:
        lines.append("")
        for label in labels[1:]:
            # X+CLAE against X when both are there, otherwise against the first method.
            base = label[:-len("+CLAE")] if label.endswith("+CLAE") else labels[0]
            if base not in stats or base == label:
                base = labels[0]
            parts = []
            for i, metric in enumerate(("kNN", "linear")):
                (m0, s0), (m1, s1) = stats[base][i], stats[label][i]
                spread = ("one seed, no spread" if math.isnan(s0) or math.isnan(s1)
                          else f"seed std {_pct(s0)} / {_pct(s1)}")
                parts.append(f"{metric} {100 * (m1 - m0):+.2f} points ({spread})")
            lines.append(f"{label} - {base}: " + "; ".join(parts) + ".")
    lines += ["", "| run | method | seed | steps | kNN top-1 (%) | linear top-1 (%) | "
                  "train steps (min) | training wall (min) |",
              "|---|---|---|---|---|---|---|---|"]
    total = 0.0
    for label, runs in groups.items():
        for r in runs:
            res = r["results"]
            wall = res.get("wall_seconds_this_process")
            total += wall or 0.0
            lines.append(f"| {os.path.basename(os.path.normpath(r['workdir']))} | {label} | "
                         f"{r['flags'].get('seed', '?')} | {res.get('step', '?')} | "
                         f"{_pct(res['knn_top1'])} | {_pct(res['linear_top1'])} | "
                         f"{_minutes(res.get('train_seconds_this_process'))} | {_minutes(wall)} |")
    n = sum(len(runs) for runs in groups.values())
    lines += ["", f"Total training wall time of the {n} run{'s' if n != 1 else ''}: "
                  f"{_minutes(total)} min. Std: sample std over seeds (ddof=1). Times from "
                  "results.json, of the last process of each run (a resumed run counts only its "
                  "last part): training wall = wall_seconds_this_process (the training loop with "
                  "its input pipeline; evaluation, start-up and export not included); train steps "
                  "= train_seconds_this_process (the train steps alone)."]
    for label, runs in groups.items():
        diff = flag_differences(runs)
        if diff:
            lines.append(f"WARNING: the {label} runs differ in --{', --'.join(diff)}.")
    return "\n".join(lines) + "\n"


# ---- TensorBoard events, read without TensorFlow ----

def _records(path: str):
    """The payloads of a TFRecord file (length, length crc, data, data crc; crcs not checked)."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            payload = f.read(length)
            f.read(4)
            if len(payload) < length:
                return  # a file still being written
            yield payload


def read_scalars(logdir: str, tags) -> Dict[str, List[tuple]]:
    """{tag: [(step, value)]} from every events file under logdir, sorted by step (a step written
    twice, e.g. after a resume, keeps the last value)."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.util import tensor_util

    found: Dict[str, Dict[int, float]] = {t: {} for t in tags}
    files = sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True))
    for path in files:
        for payload in _records(path):
            event = event_pb2.Event.FromString(payload)
            for v in event.summary.value:
                if v.tag not in found:
                    continue
                if v.HasField("tensor"):
                    value = float(tensor_util.make_ndarray(v.tensor))
                else:
                    value = float(v.simple_value)
                found[v.tag][int(event.step)] = value
    return {t: sorted(d.items()) for t, d in found.items()}


def plot(groups: Dict[str, List[dict]], path: str) -> bool:
    """Accuracy per method (bars: mean; dots: seeds; whiskers: std) and the training-loss curves.
    Returns False (and says so) if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install matplotlib); no plot written",
              file=sys.stderr)
        return False
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = list(groups)
    width = 0.6 / len(labels)
    for i, label in enumerate(labels):
        runs, color = groups[label], colors[i % len(colors)]
        for j, metric in enumerate(("knn_top1", "linear_top1")):
            values = [100 * r["results"][metric] for r in runs]
            mean, std = mean_std(values)
            x = j + (i - (len(labels) - 1) / 2) * width
            ax_acc.errorbar(x, mean, yerr=None if math.isnan(std) else std, fmt="D", ms=7,
                            color=color, capsize=5, label=label if j == 0 else None)
            # Seeds as dots just left of the mean, spread a little so equal values stay visible.
            dots = [x - width * 0.3 + (k - (len(values) - 1) / 2) * width * 0.08
                    for k in range(len(values))]
            ax_acc.scatter(dots, values, color=color, s=16, alpha=0.6, zorder=3)
            ax_acc.annotate(f"{mean:.1f}", (x, mean), textcoords="offset points",
                            xytext=(12, -3), fontsize=8)
    all_values = [100 * r["results"][m] for runs in groups.values() for r in runs
                  for m in ("knn_top1", "linear_top1")]
    lo, hi = min(all_values), max(all_values)
    ax_acc.set_ylim(max(0.0, lo - 0.25 * (hi - lo) - 3), hi + 0.15 * (hi - lo) + 3)
    ax_acc.set_xlim(-0.6, 1.6)
    ax_acc.set_xticks([0, 1], ["kNN top-1 (z)", "linear top-1 (probe features)"])
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_title("test accuracy (diamond: mean, whisker: std, dots: seeds)")
    # Many methods: legends below the axes, where they cover no data.
    below = {}
    if len(labels) > 2:
        below = dict(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8)
    ax_acc.legend(**(dict(below, ncol=4) if below else {}))
    any_adv = False
    for i, label in enumerate(labels):
        color = colors[i % len(colors)]
        for k, r in enumerate(groups[label]):
            curves = read_scalars(os.path.join(r["workdir"], "tensorboard"),
                                  ("train/loss", "train/clean_loss", "train/adv_loss"))
            clean = curves["train/clean_loss"] or curves["train/loss"]
            if clean:
                ax_loss.plot(*zip(*clean), color=color, lw=1, alpha=0.8,
                             label=f"{label} clean loss" if k == 0 else None)
            adv = curves["train/adv_loss"]
            if r["flags"].get("adversarial") == "True" and adv:
                any_adv = True
                ax_loss.plot(*zip(*adv), color=color, lw=1, ls="--", alpha=0.8,
                             label=f"{label} adversarial loss" if k == 0 else None)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("the method's loss")
    ax_loss.set_title("training loss per run (train/clean_loss"
                      + (", dashed: train/adv_loss)" if any_adv else ")"))
    ax_loss.legend(**(dict(below, ncol=2) if below else dict(fontsize=8)))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python scripts/compare.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", help="finished run workdirs (results.json, flags.cfg)")
    parser.add_argument("--out", required=True, help="folder for comparison.md and comparison.png")
    args = parser.parse_args(argv)
    groups = group_runs([load_run(w) for w in args.workdirs])
    table = markdown_table(groups)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "comparison.md"), "w") as f:
        f.write(table)
    png = os.path.join(args.out, "comparison.png")
    if plot(groups, png):
        print(f"Plot: {png}")
    print(f"Table: {os.path.join(args.out, 'comparison.md')}")


if __name__ == "__main__":
    main()
