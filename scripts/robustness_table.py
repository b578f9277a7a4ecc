"""The robustness table and plot of README "Robustness" from finished runs' results.json.

    python scripts/robustness_table.py \
        --run="SimCLR=runs/cifar10_small/simclr_seed*" \
        --run="SimCLR + CLAE (FGSM)=runs/cifar10_small/clae_seed*" \
        --run="SimCLR + CLAE (PGD-3)=runs/cifar10_small/clae_pgd_seed*" \
        --figure=docs/results/robustness.png

Each --run is "label=glob of workdirs" (one workdir per seed). Prints, as markdown:
  - clean kNN and linear top-1 (all test images) and robust top-1 on the robust subset (clean,
    PGD-20 and FGSM at each --robust_eps), mean +- sample std over the seeds of each row;
  - for every pair of rows, the later row minus the earlier one, seed by seed (the seeds both
    have), and the mean of those paired differences;
  - the robust-evaluation and whole-process wall times per run.
With --figure, also draws robust top-1 against eps (eps 0 = clean on the same images), one line
per row with the std over seeds as error bars, one panel per attack.
"""

import argparse
import glob
import json
import os
import statistics as st


def load_runs(pattern: str) -> dict:
    """{seed: results} of every workdir matching `pattern` that has a results.json."""
    runs = {}
    for workdir in sorted(glob.glob(pattern)):
        path = os.path.join(workdir, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                r = json.load(f)
            runs[r["seed"]] = r
    return runs


def columns(r: dict) -> dict:
    """{column: top-1 in %} of one run: kNN, linear, clean subset, then attack@eps."""
    out = {"kNN": r["knn_top1"], "linear": r["linear_top1"], "clean (subset)":
           r["robust_clean_top1"]}
    for attack, by_eps in sorted(r["robust_top1"].items(), reverse=True):  # pgd20, then fgsm
        for eps in sorted(by_eps, key=float):
            out[f"{attack.upper()} {eps}/255"] = by_eps[eps]
    return {k: 100 * v for k, v in out.items()}


def mean_std(values) -> str:
    return (f"{st.mean(values):.2f} +- {st.stdev(values):.2f}" if len(values) > 1
            else f"{values[0]:.2f}")


def tables(rows) -> str:
    """rows: [(label, {seed: results})] -> the markdown of the module docstring."""
    names = list(columns(next(iter(rows[0][1].values()))))
    out = ["| method | seeds | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for label, runs in rows:
        cols = [columns(r) for r in runs.values()]
        out.append(f"| {label} | {len(cols)} | " + " | ".join(
            mean_std([c[n] for c in cols]) for n in names) + " |")
    pairs = [(rows[j], rows[i]) for i in range(len(rows)) for j in range(i)]
    for (base_label, base), (label, runs) in pairs:
        seeds = sorted(set(runs) & set(base))
        out.append(f"\nPaired differences, {label} - {base_label} (points, seeds "
                   f"{', '.join(map(str, seeds))}):\n")
        out.append("| seed | " + " | ".join(names) + " |")
        out.append("|---" * (len(names) + 1) + "|")
        diffs = []
        for s in seeds:
            a, b = columns(base[s]), columns(runs[s])
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


def figure(rows, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    attacks = sorted(next(iter(rows[0][1].values()))["robust_top1"], reverse=True)
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.5 * len(attacks), 3.6), sharey=True)
    n_images = next(iter(rows[0][1].values()))["robust_examples"]
    for ax, attack in zip(axes, attacks):
        for label, runs in rows:
            eps = sorted(next(iter(runs.values()))["robust_top1"][attack], key=float)
            xs = [0.0] + [float(e) for e in eps]
            per_seed = [[100 * r["robust_clean_top1"]] +
                        [100 * r["robust_top1"][attack][e] for e in eps] for r in runs.values()]
            means = [st.mean(v) for v in zip(*per_seed)]
            stds = [st.stdev(v) if len(v) > 1 else 0.0 for v in zip(*per_seed)]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3,
                        label=f"{label} ({len(per_seed)} seeds)")
        ax.set_title(attack.upper().replace("PGD", "PGD-") if attack.startswith("pgd")
                     else attack.upper())
        ax.set_xlabel("eps (/255), 0 = clean")
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
    parser.add_argument("--figure", help="write the plot here (PNG)")
    args = parser.parse_args()
    rows = []
    for spec in args.run:
        label, _, pattern = spec.partition("=")
        runs = load_runs(pattern)
        if not runs:
            raise SystemExit(f"--run {spec!r}: no workdir with a results.json matches")
        if any("robust_top1" not in r for r in runs.values()):
            raise SystemExit(f"--run {spec!r}: a run has no robust evaluation "
                             "(python run.py --mode=eval --workdir=<run>)")
        rows.append((label, runs))
    print(tables(rows))
    if args.figure:
        figure(rows, args.figure)


if __name__ == "__main__":
    main()
