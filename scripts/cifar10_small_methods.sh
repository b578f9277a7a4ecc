#!/usr/bin/env bash
# Every method with and without CLAE, one seed, on the small CIFAR-10 protocol
# (flags/cifar10_small_common.cfg: 5,000 images, ResNet-18 x0.25, batch 256, 15 epochs; each
# method with its own loss, head, temperature, augmentations and optimizer), then one table and
# plot (python scripts/compare.py).
#
#   scripts/cifar10_small_methods.sh [ROOT] [extra run.py flags...]
#   e.g. scripts/cifar10_small_methods.sh runs/cifar10_methods --dataset=/data/cifar10
#
# Workdirs: ROOT/<method> and ROOT/<method>_clae (SimCLR uses flags/cifar10_small_simclr.cfg,
# i.e. exactly the runs of scripts/cifar10_small.sh). A run that already has results.json is
# skipped, an unfinished one resumes. METHODS="plain uel" runs a subset; SEED=1 another seed.
# Each workdir gets sweep.jsonl (commit, preset, load; scripts/sweep_lib.sh); the table and plot
# go to ROOT/compare/, the runs' small result files to ROOT/compare/runs/.
# Run from anywhere; flagfiles are read relative to the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/sweep_lib.sh
sweep_args runs/cifar10_methods "$@"
METHODS="${METHODS:-simclr plain uel moco}"
SEED="${SEED:-0}"

workdirs=()
for method in $METHODS; do
  for clae in "" "_clae"; do
    if [[ "$method" == simclr && -z "$clae" ]]; then
      args=(--flagfile=flags/cifar10_small_simclr.cfg)
    elif [[ "$method" == simclr ]]; then
      args=(--flagfile=flags/cifar10_small_clae.cfg)
    else
      args=(--flagfile=flags/cifar10_small_common.cfg --method="$method")
      if [[ -n "$clae" ]]; then args+=(--adversarial); fi
    fi
    workdirs+=("$ROOT/${method}${clae}")
    sweep_run "${workdirs[-1]}" "${args[@]}" --seed="$SEED"
  done
done

sweep_compare "$ROOT" "${workdirs[@]}"
