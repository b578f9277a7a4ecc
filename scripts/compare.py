"""Compare finished runs: a markdown table over seeds per method and a PNG plot.

    python scripts/compare.py runs/cifar10_small/*_seed* --out runs/cifar10_small/compare

Reads each workdir's results.json (accuracies, robust worst case, wall time), flags.cfg (to
group the runs by method: SimCLR, SimCLR+CLAE, ...) and, when a protocol script ran it, the
sweep.jsonl that scripts/sweep_lib.sh wrote (preset, commit, whole-process time, machine load).
Prints the table (mean ± std per method; for every X and X+CLAE the paired differences by seed;
one row per run) and writes <out>/comparison.md, <out>/comparison.png (accuracy per method with
every seed, and the training-loss curves from the TensorBoard events) and, when the runs have an
online kNN (--eval_every_epochs), <out>/online_knn.png and its values, <out>/online_knn.json.
Needs matplotlib for the plots (pip install matplotlib); without it only the table is written.
Reads TensorBoard events without importing TensorFlow (scripts/report_lib.py).

An offline tool over finished runs, not part of training: the clae_tf package does not import it.
"""

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional

# Run as `python scripts/compare.py` from a checkout, or loaded from its file (the tests): the
# repository root holds clae_tf, this folder report_lib.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

from report_lib import mean_std, read_scalars  # noqa: E402

from clae_tf.runtime.config import Config  # noqa: E402  (after the path set-up)
from clae_tf.runtime.workdir import FLAGFILE, RESULTS_FILE, SWEEP_FILE, tensorboard_dir  # noqa: E402

METHOD_NAMES = {"simclr": "SimCLR", "plain": "Plain", "uel": "UEL", "moco": "MoCo"}
# Flags that may differ between the runs of one group (the seeds of one method).
PER_RUN_FLAGS = {"seed", "workdir", "data_dir"}


def method_label(flags: dict) -> str:
    """'SimCLR' or 'SimCLR+CLAE' from a run's flags ({name: string} as in flags.cfg)."""
    name = METHOD_NAMES.get(flags.get("method", "?"), flags.get("method", "?"))
    return name + ("+CLAE" if flags.get("adversarial") == "True" else "")


def load_run(workdir: str) -> dict:
    """{workdir, label, flags, results} of one finished run; raises SystemExit if unusable."""
    paths = {name: os.path.join(workdir, name) for name in (RESULTS_FILE, FLAGFILE)}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise SystemExit(f"error: {workdir}: no {', '.join(os.path.basename(p) for p in missing)}"
                         f" (not a finished clae-tf run?)")
    with open(paths[RESULTS_FILE]) as f:
        results = json.load(f)
    with open(paths[FLAGFILE]) as f:
        flags = Config.parse_flagfile(f.read())
    return {"workdir": workdir, "label": method_label(flags), "flags": flags, "results": results,
            "sweep": read_sweep(workdir)}


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


def _pct(mean, std=None):
    if std is None:
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if not math.isnan(std) else f"{100 * mean:.2f}"


def _minutes(seconds: Optional[float]) -> str:
    return "?" if seconds is None else f"{seconds / 60:.1f}"


def read_sweep(workdir: str) -> dict:
    """What scripts/sweep_lib.sh recorded of a run's processes ({} without its file).

    Returns:
      {"preset": run.py's arguments (and the sweep's extra flags) of the last process,
       "commit": the commits of its processes ("+dirty" if tracked files differed),
       "wall_seconds": start-to-exit seconds summed over the processes (None if none ended),
       "load_start", "load_max", "load_end": the 1-minute load at the first start, its largest
       value over every record, at the last end (None if absent), "cores", "processes"}.
    """
    path = os.path.join(workdir, SWEEP_FILE)
    if not os.path.exists(path):
        return {}
    events = []
    with open(path) as f:
        for line in f:
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a killed writer
    starts = [e for e in events if e.get("event") == "start"]
    if not starts:
        return {}
    commits = []
    for e in starts:
        commit = e.get("commit", "?")[:7] + ("+dirty" if e.get("dirty") else "")
        if commit not in commits:
            commits.append(commit)
    wall, start = 0.0, None
    for e in events:  # each start with the end that follows it
        if e.get("event") == "start":
            start = e["unix"]
        elif e.get("event") == "end" and start is not None:
            wall, start = wall + e["unix"] - start, None
    ends = [e for e in events if e.get("event") == "end"]
    loads = [e["loadavg"][0] for e in events if e.get("loadavg")]
    last = starts[-1]
    return {"preset": " ".join(x for x in (last.get("preset"), last.get("extra")) if x),
            "commit": ",".join(commits), "wall_seconds": wall if ends else None,
            "load_start": (starts[0].get("loadavg") or [None])[0],
            "load_max": max(loads) if loads else None,
            "load_end": (ends[-1].get("loadavg") or [None])[0] if ends else None,
            "cores": last.get("cores"), "processes": len(starts)}


def metrics(results: dict) -> Dict[str, float]:
    """{column: accuracy in [0, 1]} of one run: kNN, linear, then the robust suite's worst case
    ("worst" row of results.json) per L-inf radius (1/255) and per L2 radius, where present."""
    out = {"kNN": results["knn_top1"], "linear": results["linear_top1"]}
    for table, name in (("robust_top1", "worst {}/255"), ("robust_top1_l2", "worst L2 {}")):
        worst = results.get(table, {}).get("worst", {})
        for eps in sorted(worst, key=float):  # results.json sorts keys as strings
            out[name.format(eps)] = worst[eps]
    return out


def robust_columns(runs: List[dict]) -> List[str]:
    """The robust columns any of `runs` has, in order (L-inf by radius, then L2)."""
    names: List[str] = []
    for r in runs:
        names += [n for n in metrics(r["results"]) if n.startswith("worst") and n not in names]
    return sorted(names, key=lambda n: ("L2" in n, float(n.split()[-1].split("/")[0])))


def clae_pairs(groups: Dict[str, List[dict]]) -> List[tuple]:
    """(base label, base runs by seed, CLAE label, CLAE runs by seed) for every X+CLAE whose X
    is among the groups."""
    def by_seed(runs):
        return {r["flags"].get("seed", "?"): r for r in runs}
    return [(label[:-len("+CLAE")], by_seed(groups[label[:-len("+CLAE")]]), label,
             by_seed(runs)) for label, runs in groups.items()
            if label.endswith("+CLAE") and label[:-len("+CLAE")] in groups]


def _points(mean, std=None):
    """Signed points (differences)."""
    if std is None or math.isnan(std):
        return f"{100 * mean:+.2f}"
    return f"{100 * mean:+.2f} ± {100 * std:.2f}"


def paired_tables(groups: Dict[str, List[dict]]) -> List[str]:
    """What CLAE changes: X+CLAE - X seed by seed (same seed: same initial weights, data order
    and views), their mean ± sample std, for every column both runs of every seed have."""
    pairs = clae_pairs(groups)
    if not pairs:
        return []
    all_runs = [r for runs in groups.values() for r in runs]
    names = [n for n in ["kNN", "linear"] + robust_columns(all_runs)
             if all(n in metrics(r["results"]) for r in all_runs)]
    summary = ["", "What CLAE changes, paired by seed (points; mean ± sample std over seeds):", "",
               "| baseline | seeds | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    detail = []
    for base_label, base, label, runs in pairs:
        seeds = [s for s in runs if s in base]
        diffs = {s: [metrics(runs[s]["results"])[n] - metrics(base[s]["results"])[n]
                     for n in names] for s in seeds}
        if not seeds:
            continue
        summary.append(f"| {base_label} | {','.join(seeds)} | " + " | ".join(
            _points(*mean_std(list(column))) for column in zip(*diffs.values())) + " |")
        detail += ["", f"{label} - {base_label}, by seed (points):", "",
                   "| seed | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        detail += [f"| {s} | " + " | ".join(_points(d) for d in diffs[s]) + " |" for s in seeds]
    return summary + detail


def _load(sweep: dict) -> str:
    if not sweep:
        return "?"
    values = [sweep.get(k) for k in ("load_start", "load_max", "load_end")]
    return " / ".join("?" if v is None else f"{v:.1f}" for v in values)


def summary_rows(groups: Dict[str, List[dict]], robust: List[str]) -> List[str]:
    """The table of mean ± std over seeds, one row per method."""
    lines = ["| method | seeds | kNN top-1 (%) | linear top-1 (%) | "
             + "".join(f"{n} (%) | " for n in robust) + "training wall time / run (min) |",
             "|---" * (5 + len(robust)) + "|"]
    for label, runs in groups.items():
        values = [[metrics(r["results"]).get(n) for r in runs] for n in ["kNN", "linear"] + robust]
        walls = [r["results"].get("wall_seconds_this_process") for r in runs]
        wall = sum(walls) / len(walls) if None not in walls else None
        seeds = ",".join(r["flags"].get("seed", "?") for r in runs)
        lines.append(f"| {label} | {seeds} | " + " | ".join(
            "-" if None in v else _pct(*mean_std(v)) for v in values) + f" | {_minutes(wall)} |")
    return lines


def difference_lines(groups: Dict[str, List[dict]]) -> List[str]:
    """X+CLAE - X (or a method - the first one) on the means, with the seed spreads."""
    stats = {label: [mean_std([r["results"][m] for r in runs])
                     for m in ("knn_top1", "linear_top1")] for label, runs in groups.items()}
    labels = list(groups)
    lines = [""] if len(labels) > 1 else []
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
    return lines


def run_rows(groups: Dict[str, List[dict]], robust: List[str]) -> List[str]:
    """One row per run: where it came from (preset, commit), its numbers and its times."""
    lines = ["", "| run | method | preset | commit | seed | steps | kNN top-1 (%) | "
                 "linear top-1 (%) | " + "".join(f"{n} (%) | " for n in robust)
             + "train steps (min) | training wall (min) | whole process (min) | "
               "load start / max / end |", "|---" * (12 + len(robust)) + "|"]
    for label, runs in groups.items():
        for r in runs:
            res, sweep = r["results"], r["sweep"]
            m = metrics(res)
            lines.append(
                f"| {os.path.basename(os.path.normpath(r['workdir']))} | {label} | "
                f"{'`' + sweep['preset'] + '`' if sweep.get('preset') else '?'} | "
                f"{sweep.get('commit', '?')} | {r['flags'].get('seed', '?')} | "
                f"{res.get('step', '?')} | {_pct(m['kNN'])} | {_pct(m['linear'])} | "
                + "".join(f"{_pct(m[n]) if n in m else '-'} | " for n in robust)
                + f"{_minutes(res.get('train_seconds_this_process'))} | "
                f"{_minutes(res.get('wall_seconds_this_process'))} | "
                f"{_minutes(sweep.get('wall_seconds'))} | {_load(sweep)} |")
    return lines


def markdown_table(groups: Dict[str, List[dict]]) -> str:
    """The summary table (mean ± std over seeds), the differences (on the means, and paired by
    seed for every X and X+CLAE), and one row per run."""
    all_runs = [r for runs in groups.values() for r in runs]
    robust = robust_columns(all_runs)
    lines = summary_rows(groups, robust) + difference_lines(groups) + paired_tables(groups)
    lines += run_rows(groups, robust)
    total = sum(r["results"].get("wall_seconds_this_process") or 0.0 for r in all_runs)
    n = len(all_runs)
    cores = {r["sweep"].get("cores") for r in all_runs if r["sweep"].get("cores")}
    lines += ["", f"Total training wall time of the {n} run{'s' if n != 1 else ''}: "
                  f"{_minutes(total)} min. Std: sample std over seeds (ddof=1). Times from "
                  "results.json, of the last process of each run (a resumed run counts only its "
                  "last part): training wall = wall_seconds_this_process (the training loop with "
                  "its input pipeline; evaluation, start-up and export not included); train steps "
                  "= train_seconds_this_process (the train steps alone)."]
    if any(r["sweep"] for r in all_runs):
        lines.append(
            f"From each workdir's {SWEEP_FILE} (scripts/sweep_lib.sh): preset = run.py's "
            "arguments, commit (+dirty: tracked files differed from it), whole process = start "
            "to exit of run.py summed over its processes (training, evaluation with the robust "
            "suite, export), load = the 1-minute load average at the start / its largest value "
            "while the run went on (sampled every minute) / at the end, on "
            f"{','.join(map(str, sorted(cores))) or '?'} cores: a run alone shows about its "
            "own threads' load (about the core count); more means other jobs shared the cores.")
    if robust:
        lines.append("worst ...: the robust suite's worst case (results.json robust_top1 / "
                     "robust_top1_l2 \"worst\") on its test subset, L-inf radii in 1/255.")
    for label, runs in groups.items():
        diff = flag_differences(runs)
        if diff:
            lines.append(f"WARNING: the {label} runs differ in --{', --'.join(diff)}.")
    return "\n".join(lines) + "\n"


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
            curves = read_scalars(tensorboard_dir(r["workdir"]),
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


def online_curves(run: dict) -> List[tuple]:
    """[(epoch, online kNN top-1)] of a run (eval/knn_top1_online; epoch = step / steps per
    epoch, or the step when results.json does not say)."""
    curve = read_scalars(tensorboard_dir(run["workdir"]),
                         ("eval/knn_top1_online",))["eval/knn_top1_online"]
    per_epoch = run["results"].get("steps_per_epoch") or 1
    return [(step / per_epoch, value) for step, value in curve]


def write_online_knn(groups: Dict[str, List[dict]], path: str) -> dict:
    """{method: {run: [[epoch, online kNN top-1], ...]}} of every run, also written to `path`
    (JSON, a few hundred bytes: the curves without the TensorBoard events) if any run has one.
    """
    curves = {label: {os.path.basename(os.path.normpath(r["workdir"])): online_curves(r)
                      for r in runs} for label, runs in groups.items()}
    if any(c for runs in curves.values() for c in runs.values()):
        with open(path, "w") as f:
            json.dump(curves, f, indent=1)
    return curves


def mean_curve(curves):
    """(epochs, mean accuracy in % at each) of several runs' [(epoch, accuracy)] curves."""
    epochs = sorted({x for curve in curves for x, _ in curve})
    return epochs, [100 * mean_std([y for curve in curves for x, y in curve if x == e])[0]
                    for e in epochs]


def plot_online_knn(curves: Dict[str, Dict[str, List[tuple]]], path: str) -> bool:
    """The online kNN curves (write_online_knn's) of every run, coloured by method (thin: each
    seed; thick: the mean over the seeds that have the epoch). Returns False if no run has one
    or matplotlib is missing."""
    curves = {label: list(runs.values()) for label, runs in curves.items()}
    if not any(c for runs in curves.values() for c in runs):
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (label, runs) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        for curve in runs:
            if curve:
                ax.plot(*zip(*[(x, 100 * y) for x, y in curve]), color=color, lw=0.8,
                        alpha=0.5, marker=".")
        epochs, means = mean_curve(runs)
        if epochs:
            n = sum(1 for c in runs if c)
            ax.plot(epochs, means, color=color, lw=2.2, marker="o",
                    label=f"{label} ({n} run{'' if n == 1 else 's'})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("online kNN top-1 (%)")
    ax.set_title("online kNN on the test subset (thin: seeds, thick: mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python scripts/compare.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+",
                        help=f"finished run workdirs ({RESULTS_FILE}, {FLAGFILE})")
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
    curves = write_online_knn(groups, os.path.join(args.out, "online_knn.json"))
    online = os.path.join(args.out, "online_knn.png")
    if plot_online_knn(curves, online):
        print(f"Online kNN curves: {online} (values: online_knn.json)")
    print(f"Table: {os.path.join(args.out, 'comparison.md')}")


if __name__ == "__main__":
    main()
