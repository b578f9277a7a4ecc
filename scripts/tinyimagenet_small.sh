#!/usr/bin/env bash
# SimCLR vs SimCLR + CLAE on the small Tiny-ImageNet protocol (flags/tinyimagenet_small_*.cfg:
# 100 images per class, ImageNet stem at 64 px, ResNet-18 x0.25, bf16, robust suite, online kNN),
# seeds 0, 1, 2, then the table (paired differences by seed, robust worst case) and the plots with
# python scripts/compare.py.
#
#   scripts/tinyimagenet_small.sh [ROOT] [extra run.py flags...]
#   e.g. scripts/tinyimagenet_small.sh runs/tinyimagenet_small --dataset=/data/tinyimagenet
#
# Data: bash scripts/tinyimagenet_folder.sh <tiny-imagenet-200.zip> <folder>, then pass
# --dataset=<folder> (docs/data.md). Workdirs: ROOT/<simclr|clae>_seed<k> (ROOT defaults to
# runs/tinyimagenet_small), seed by seed, SimCLR then CLAE (complete pairs if interrupted); a run
# with results.json is skipped, an unfinished one resumes. Each workdir gets sweep.jsonl (commit,
# preset, load; scripts/sweep_lib.sh). Table and plots: ROOT/compare/; the runs' small result
# files (results.json, flags.cfg, sweep.jsonl): ROOT/compare/runs/ (to keep in docs/results/).
# SEEDS="0 1" for fewer.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/sweep_lib.sh
sweep_args runs/tinyimagenet_small "$@"
SEEDS="${SEEDS:-0 1 2}"

sweep_pairs "$ROOT" tinyimagenet_small
