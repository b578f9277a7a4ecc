#!/usr/bin/env bash
# The accuracy-robustness trade-off of CLAE: what the adversarial view buys and costs as the
# budget's units, eps and the schedule change. Four parts, each a folder of ROOT:
#
#   units     Plain and UEL + CLAE at SimCLR's pixel budget: --eps=0.075 in CIFAR normalisation
#             (std ~0.2, so ~3.8/255, as eps 0.03 is with --normalize=half), small protocol
#             (flags/cifar10_small_common.cfg), seeds 0-2. Their baselines and eps-0.03 runs are
#             docs/results/cifar10_baselines/.
#   moco      MoCo v2 with and without CLAE, small protocol, seeds 0-2.
#   eps       SimCLR + CLAE on all of CIFAR-10 (flags/cifar10_full_clae.cfg, 10 epochs), seed 0,
#             at eps 0.0078 / 0.0157 / 0.0588 / 0.1176 (1 / 2 / 7.5 / 15 per 255 of the pixel
#             range with --normalize=half); eps 0.03 (3.8/255) is docs/results/cifar10_full/.
#   schedule  SimCLR and SimCLR + CLAE on all of CIFAR-10 at 30 epochs, seeds 0 and 1 (SEEDS).
#
#   scripts/tradeoff.sh [ROOT] [extra run.py flags...]
#   PARTS="units moco" scripts/tradeoff.sh runs/tradeoff --dataset=/data/cifar10
#
# PARTS (default "units moco eps schedule") run in that order. A run with results.json is
# skipped, an unfinished one resumes from its checkpoint: run the script again with the same
# arguments. Each workdir gets sweep.jsonl (commit, preset, load; scripts/sweep_lib.sh); the
# runs' small result files are copied to ROOT/<part>/compare/runs/ (to keep in docs/results/);
# moco and schedule are scripts/cifar10_small_baselines.sh and scripts/cifar10_full.sh (with
# --epochs=30), which also write their comparison tables to ROOT/<part>/compare/. Keep
# ROOT/<part>/compare/runs/ as docs/results/tradeoff_<part>/runs/ and, for schedule, also
# ROOT/schedule/compare/online_knn.json as docs/results/tradeoff_schedule/online_knn.json (the
# kept runs have no TensorBoard events); then `python scripts/results_pages.py --plots`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/sweep_lib.sh
sweep_args runs/tradeoff "$@"
PARTS="${PARTS:-units moco eps schedule}"

units() {
  local dir=$ROOT/units seed method workdirs=()
  for seed in ${SEEDS:-0 1 2}; do
    for method in plain uel; do
      workdirs+=("$dir/${method}_clae_eps075_seed${seed}")
      sweep_run "${workdirs[-1]}" --flagfile=flags/cifar10_small_common.cfg --method="$method" \
          --adversarial --eps=0.075 --seed="$seed"
    done
  done
  sweep_keep "$dir/compare/runs" "${workdirs[@]}"
}

moco() {
  BASELINES=moco bash scripts/cifar10_small_baselines.sh "$ROOT/moco" \
      ${SWEEP_EXTRA[@]+"${SWEEP_EXTRA[@]}"}
}

eps() {
  local dir=$ROOT/eps eps workdirs=()
  for eps in 0.0078 0.0157 0.0588 0.1176; do
    workdirs+=("$dir/clae_eps${eps#0.}_seed0")
    sweep_run "${workdirs[-1]}" --flagfile=flags/cifar10_full_clae.cfg --eps="$eps" --seed=0
  done
  sweep_keep "$dir/compare/runs" "${workdirs[@]}"
}

schedule() {
  SEEDS="${SEEDS:-0 1}" bash scripts/cifar10_full.sh "$ROOT/schedule" --epochs=30 \
      ${SWEEP_EXTRA[@]+"${SWEEP_EXTRA[@]}"}
}

for part in $PARTS; do
  case $part in
    units | moco | eps | schedule) "$part" ;;
    *) echo "tradeoff.sh: unknown part '$part' (units, moco, eps, schedule)" >&2; exit 2 ;;
  esac
done
