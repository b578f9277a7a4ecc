#!/usr/bin/env bash
# SimCLR vs SimCLR + CLAE on all of CIFAR-10 (flags/cifar10_full_*.cfg: 50,000 images, ResNet-18
# x0.25, bf16, robust suite, online kNN), seeds 0, 1, 2, then the table (paired differences by
# seed, robust worst case) and the plots (accuracy, training loss, online kNN curves) with
# python scripts/compare.py.
#
#   scripts/cifar10_full.sh [ROOT] [extra run.py flags...]
#   e.g. scripts/cifar10_full.sh runs/cifar10_full --dataset=/data/cifar10
#
# Workdirs: ROOT/<simclr|clae>_seed<k> (ROOT defaults to runs/cifar10_full). The runs go seed by
# seed, SimCLR then CLAE, so that an interrupted sweep holds complete pairs; a run that already
# has results.json is skipped, an unfinished one resumes from its checkpoint (run the script
# again with the same arguments). Each workdir gets sweep.jsonl (commit, preset, load; see
# scripts/sweep_lib.sh). The table and plots go to ROOT/compare/, the runs' small result files
# (results.json, flags.cfg, sweep.jsonl) to ROOT/compare/runs/ (to keep in docs/results/).
# SEEDS="0" runs one seed.
# Time: about 1 h per seed (SimCLR + CLAE, 10 epochs in bf16, with the robust suite) on 2 cores,
# measured: 49-55 min per seed alone (docs/results/cifar10_full/); see flags/cifar10_full_common.cfg.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/sweep_lib.sh
sweep_args runs/cifar10_full "$@"
SEEDS="${SEEDS:-0 1 2}"

sweep_pairs "$ROOT" cifar10_full
