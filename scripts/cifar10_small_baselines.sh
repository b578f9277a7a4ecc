#!/usr/bin/env bash
# The paper's other baselines with and without CLAE, seeds 0, 1, 2, on the small CIFAR-10
# protocol (flags/cifar10_small_common.cfg: 5,000 images, ResNet-18 x0.25, 15 epochs, the robust
# suite; each method with its own loss, head, temperature, augmentations and optimizer), then one
# table: for each baseline, what CLAE changes (paired differences by seed, mean +- std; clean kNN
# and linear, robust worst case) and the plots, with python scripts/compare.py.
#
#   scripts/cifar10_small_baselines.sh [ROOT] [extra run.py flags...]
#   BASELINES="plain uel moco" scripts/cifar10_small_baselines.sh     # MoCo v2 too
#
# Workdirs: ROOT/<method>_seed<k> and ROOT/<method>_clae_seed<k> (ROOT defaults to
# runs/cifar10_baselines). BASELINES (default "plain uel") in order; the runs go seed by seed,
# each baseline then its + CLAE, so that an interrupted sweep holds complete pairs; a run with
# results.json is skipped, an unfinished one resumes. Each workdir gets sweep.jsonl (commit,
# preset, load; scripts/sweep_lib.sh). Table and plots: ROOT/compare/; the runs' small result
# files (results.json, flags.cfg, sweep.jsonl): ROOT/compare/runs/ (to keep in docs/results/).
# SEEDS="0" for one seed.
# SimCLR's pairs on this protocol are scripts/cifar10_small.sh's.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/sweep_lib.sh
sweep_args runs/cifar10_baselines "$@"
SEEDS="${SEEDS:-0 1 2}"
BASELINES="${BASELINES:-plain uel}"

workdirs=()
for seed in $SEEDS; do
  for method in $BASELINES; do
    workdirs+=("$ROOT/${method}_seed${seed}")
    sweep_run "${workdirs[-1]}" --flagfile=flags/cifar10_small_common.cfg --method="$method" \
        --seed="$seed"
    workdirs+=("$ROOT/${method}_clae_seed${seed}")
    sweep_run "${workdirs[-1]}" --flagfile=flags/cifar10_small_common.cfg --method="$method" \
        --adversarial --seed="$seed"
  done
done

sweep_compare "$ROOT" "${workdirs[@]}"
