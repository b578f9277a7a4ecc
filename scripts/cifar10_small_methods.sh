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
# Run from anywhere; flagfiles are read relative to the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=runs/cifar10_methods
if [[ $# -gt 0 && "$1" != -* ]]; then ROOT="$1"; shift; fi
METHODS="${METHODS:-simclr plain uel moco}"
SEED="${SEED:-0}"
PYTHON="${PYTHON:-python}"

workdirs=()
for method in $METHODS; do
  for clae in "" "_clae"; do
    workdir="$ROOT/${method}${clae}"
    workdirs+=("$workdir")
    if [[ -f "$workdir/results.json" ]]; then
      echo "== $workdir: done already (results.json), skipping"
      continue
    fi
    if [[ "$method" == simclr && -z "$clae" ]]; then
      args=(--flagfile=flags/cifar10_small_simclr.cfg)
    elif [[ "$method" == simclr ]]; then
      args=(--flagfile=flags/cifar10_small_clae.cfg)
    else
      args=(--flagfile=flags/cifar10_small_common.cfg --method="$method")
      [[ -n "$clae" ]] && args+=(--adversarial)
    fi
    echo "== $workdir: start $(date -u +%FT%TZ)"
    start=$(date +%s)
    "$PYTHON" run.py "${args[@]}" --seed="$SEED" --workdir="$workdir" "$@"
    echo "== $workdir: done $(date -u +%FT%TZ), $(( $(date +%s) - start )) s wall (whole process)"
  done
done

"$PYTHON" scripts/compare.py "${workdirs[@]}" --out "$ROOT/compare"
