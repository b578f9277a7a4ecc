#!/usr/bin/env bash
# SimCLR vs SimCLR+CLAE on a small CIFAR-10 subset (flags/cifar10_small_*.cfg), seeds 0, 1, 2,
# then the comparison table and plot (python scripts/compare.py).
#
#   scripts/cifar10_small.sh [ROOT] [extra run.py flags...]
#   e.g. scripts/cifar10_small.sh runs/cifar10_small --dataset=/data/cifar10
#
# Workdirs: ROOT/<simclr|clae>_seed<k> (ROOT defaults to runs/cifar10_small). The runs go seed by
# seed, SimCLR then CLAE, so that an interrupted sweep still holds complete pairs; a run that
# already has results.json is skipped, an unfinished one resumes from its checkpoint. Each
# workdir gets sweep.jsonl (commit, preset, load; scripts/sweep_lib.sh). The table and plot go to
# ROOT/compare/, the runs' small result files (results.json, flags.cfg, sweep.jsonl) to
# ROOT/compare/runs/. Run from anywhere; flagfiles are read relative to the repository root.
# Takes about 55 min alone on a 2-core CPU (6 min per SimCLR run, 12 min per CLAE run; more when
# other jobs share the cores; see docs/results/results.md). SEEDS="0" runs one seed only.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/sweep_lib.sh
sweep_args runs/cifar10_small "$@"
SEEDS="${SEEDS:-0 1 2}"

sweep_pairs "$ROOT" cifar10_small
