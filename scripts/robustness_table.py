"""The robustness table and plot of docs/robustness.md from finished runs' results.json.

    python scripts/robustness_table.py \
        --run="SimCLR=runs/cifar10_small/simclr_seed*" \
        --run="SimCLR + CLAE (FGSM)=runs/cifar10_small/clae_seed*" \
        --run="SimCLR + CLAE (PGD-3)=runs/cifar10_small/clae_pgd_seed*" \
        --attack=worst --attack=pgd20 --figure=docs/results/robustness.png

Each --run is "label=glob" of workdirs or of results files (*.json), one per seed. --attack picks
the rows of the robust evaluation to show (an attack of its chain, e.g. pgd20, apgd-t, or
"worst": the worst case over the whole chain; default worst), --norm the threat model (linf:
robust_top1, radii in 1/255; l2: robust_top1_l2). Prints, as markdown:
  - clean kNN and linear top-1 (all test images) and robust top-1 on the robust subset (clean,
    then each chosen attack at each radius), mean +- sample std over the seeds of each row;
  - for every pair of rows, the later row minus the earlier one, seed by seed (the seeds both
    have), and the mean of those paired differences;
  - the robust-evaluation and whole-process wall times per run.
With --figure, also draws robust top-1 against eps (eps 0 = clean on the same images), one line
per row with the std over seeds as error bars, one panel per chosen attack.
"""

import argparse
import glob
import json
import math
import os
import statistics as st
import sys

# Run as `python scripts/robustness_table.py` from a checkout, or loaded from its file (the
# tests): the repository root holds clae_tf, this folder report_lib.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

from report_lib import mean_std  # noqa: E402

from clae_tf.runtime.workdir import RESULTS_FILE  # noqa: E402  (after the path set-up)


def load_runs(pattern: str) -> dict:
    """{seed: results} of every match of `pattern` that is a results file (*.json, e.g. the
    copies kept under docs/results/) or a workdir with a results.json."""
    runs = {}
    for match in sorted(glob.glob(pattern)):
        path = match if match.endswith(".json") else os.path.join(match, RESULTS_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                r = json.load(f)
            runs[r["seed"]] = r
    return runs


TABLES = {"linf": ("robust_top1", "/255"), "l2": ("robust_top1_l2", " (L2)")}


def columns(r: dict, attacks=("worst",), norm="linf") -> dict:
    """{column: top-1 in %} of one run: kNN, linear, clean subset, then attack at each eps."""
    table, unit = TABLES[norm]
    out = {"kNN": r["knn_top1"], "linear": r["linear_top1"], "clean (subset)":
           r["robust_clean_top1"]}
    for attack in attacks:
        by_eps = r[table][attack]
        for eps in sorted(by_eps, key=float):  # results.json sorts keys as strings
            out[f"{attack} {eps}{unit}"] = by_eps[eps]
    return {k: 100 * v for k, v in out.items()}


def missing(r: dict, attacks, norm) -> str:
    """Why run `r` cannot give the chosen columns ("" if it can)."""
    table = TABLES[norm][0]
    if table not in r:
        return f"has no {table} (python run.py --mode=eval --workdir=<run>)"
    absent = [a for a in attacks if a not in r[table]]
    if absent:
        return (f"has no {', '.join(absent)} in {table} (it has {', '.join(sorted(r[table]))}; "
                f"re-evaluate with python run.py --mode=eval --workdir=<run>)")
    return ""


def _mean_std(values) -> str:
    """The seeds' values as "mean +- sample std", or the one value."""
    mean, std = mean_std(values)
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} +- {std:.2f}"


def tables(rows, attacks=("worst",), norm="linf") -> str:
    """rows: [(label, {seed: results})] -> the markdown of the module docstring."""
    def columns_of(r):
        return columns(r, attacks, norm)

    names = list(columns_of(next(iter(rows[0][1].values()))))
    out = ["| method | seeds | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for label, runs in rows:
        cols = [columns_of(r) for r in runs.values()]
        out.append(f"| {label} | {len(cols)} | " + " | ".join(
            _mean_std([c[n] for c in cols]) for n in names) + " |")
    pairs = [(rows[j], rows[i]) for i in range(len(rows)) for j in range(i)]
    for (base_label, base), (label, runs) in pairs:
        seeds = sorted(set(runs) & set(base))
        out.append(f"\nPaired differences, {label} - {base_label} (points, seeds "
                   f"{', '.join(map(str, seeds))}):\n")
        out.append("| seed | " + " | ".join(names) + " |")
        out.append("|---" * (len(names) + 1) + "|")
        diffs = []
        for s in seeds:
            a, b = columns_of(base[s]), columns_of(runs[s])
            diffs.append([b[n] - a[n] for n in names])
            out.append(f"| {s} | " + " | ".join(f"{d:+.1f}" for d in diffs[-1]) + " |")
        out.append("| mean | " + " | ".join(f"{st.mean(d):+.1f}" for d in zip(*diffs)) + " |")
    out.append("\nWall times (s): robust evaluation / whole process, by seed:\n")

    def total(r):  # older runs have no timings: their train loop's wall time
        return r.get("timings", {}).get("total_seconds", r.get("wall_seconds_this_process", 0))

    for label, runs in rows:
        out.append(f"- {label}: " + "; ".join(
            f"seed {s} {r.get('robust_seconds', float('nan')):.0f} / {total(r):.0f}"
            for s, r in sorted(runs.items())))
    return "\n".join(out)


def figure(rows, path: str, attacks=("worst",), norm="linf"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table, unit = TABLES[norm]
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.5 * len(attacks), 3.6), sharey=True,
                             squeeze=False)
    axes = axes[0]
    n_images = next(iter(rows[0][1].values()))["robust_examples"]
    for ax, attack in zip(axes, attacks):
        for label, runs in rows:
            eps = sorted(next(iter(runs.values()))[table][attack], key=float)
            xs = [0.0] + [float(e) for e in eps]
            per_seed = [[100 * r["robust_clean_top1"]] +
                        [100 * r[table][attack][e] for e in eps] for r in runs.values()]
            means = [st.mean(v) for v in zip(*per_seed)]
            stds = [st.stdev(v) if len(v) > 1 else 0.0 for v in zip(*per_seed)]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3,
                        label=f"{label} ({len(per_seed)} seeds)")
        ax.set_title("worst case over the chain" if attack == "worst" else attack)
        ax.set_xlabel(f"eps{unit}, 0 = clean")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 of the linear probe (%)")
    axes[-1].legend()
    fig.suptitle(f"Small CIFAR-10 protocol, {n_images} test images, mean +- std over seeds",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="label=glob")
    parser.add_argument("--attack", action="append",
                        help="a row of the robust evaluation: an attack of its chain or worst "
                             "(repeat for several; default worst)")
    parser.add_argument("--norm", choices=sorted(TABLES), default="linf")
    parser.add_argument("--figure", help="write the plot here (PNG)")
    args = parser.parse_args()
    attacks = tuple(args.attack or ["worst"])
    rows = []
    for spec in args.run:
        label, _, pattern = spec.partition("=")
        runs = load_runs(pattern)
        if not runs:
            raise SystemExit(f"--run {spec!r}: no workdir with a results.json matches")
        for seed, r in sorted(runs.items()):
            why = missing(r, attacks, args.norm)
            if why:
                raise SystemExit(f"--run {spec!r}: the run of seed {seed} {why}")
        rows.append((label, runs))
    print(tables(rows, attacks, args.norm))
    if args.figure:
        figure(rows, args.figure, attacks, args.norm)


if __name__ == "__main__":
    main()
