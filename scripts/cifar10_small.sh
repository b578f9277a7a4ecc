#!/usr/bin/env bash
# SimCLR vs SimCLR+CLAE on a small CIFAR-10 subset (flags/cifar10_small_*.cfg), seeds 0, 1, 2,
# then the comparison table and plot (python scripts/compare.py).
#
#   scripts/cifar10_small.sh [ROOT] [extra run.py flags...]
#   e.g. scripts/cifar10_small.sh runs/cifar10_small --dataset=/data/cifar10
#
# Workdirs: ROOT/<simclr|clae>_seed<k> (ROOT defaults to runs/cifar10_small). Runs alternate
# between the methods so that an interrupted sweep still holds complete pairs; a run that already
# has results.json is skipped, an unfinished one resumes from its checkpoint. The table and plot
# go to ROOT/compare/. Run from the repository root (the flagfiles nest by relative path).
# Takes about 55 min alone on a 2-core CPU (6 min per SimCLR run, 12 min per CLAE run; more when
# other jobs share the cores; see docs/results/results.md). SEEDS="0" runs one seed only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=runs/cifar10_small
if [[ $# -gt 0 && "$1" != -* ]]; then ROOT="$1"; shift; fi
SEEDS="${SEEDS:-0 1 2}"
PYTHON="${PYTHON:-python}"

workdirs=()
for seed in $SEEDS; do
  for method in simclr clae; do
    workdir="$ROOT/${method}_seed${seed}"
    workdirs+=("$workdir")
    if [[ -f "$workdir/results.json" ]]; then
      echo "== $workdir: done already (results.json), skipping"
      continue
    fi
    echo "== $workdir: start $(date -u +%FT%TZ)"
    start=$(date +%s)
    "$PYTHON" run.py --flagfile="flags/cifar10_small_${method}.cfg" --seed="$seed" \
        --workdir="$workdir" "$@"
    echo "== $workdir: done $(date -u +%FT%TZ), $(( $(date +%s) - start )) s wall (whole process)"
  done
done

"$PYTHON" scripts/compare.py "${workdirs[@]}" --out "$ROOT/compare"
