#!/usr/bin/env bash
# SLF, ALF and AFF (docs/robustness.md, "Adversarial fine-tuning") of SimCLR and SimCLR + CLAE
# on the small CIFAR-10 protocol (flags/cifar10_small_*.cfg), each judged twice: by the preset's
# cheaper suite (pgd20,fast: PGD-20, APGD-CE, APGD-T with 3 targets, Square with 1,000 queries)
# at 1, 2, 4 and 8/255, and by standard AutoAttack at 8/255.
#
#   scripts/finetune_small.sh [ROOT] [extra run.py flags...]
#   SEEDS="0 1" scripts/finetune_small.sh runs/finetune_small --dataset=/data/cifar10
#
# For each seed (SEEDS, default 0) and method, in ROOT:
#   <method>_seed<k>/       the pretraining run (its SLF numbers: the linear probe), then
#                           --mode=finetune with flags/cifar10_small_alf.cfg and _aff.cfg (their
#                           numbers: results.json "alf", "aff"), all under the cheaper suite;
#   <method>_seed<k>_aa8/   a copy of it once the fine-tunes are done, re-evaluated (no training)
#                           by standard AutoAttack at 8/255: --mode=eval (SLF), then
#                           --mode=finetune (ALF, AFF: their results are of other robust flags,
#                           so they are evaluated again).
# The L2 radii of the preset's suite are left out (--robust_l2_eps=): the field's tables are
# L-inf. Every step is resumable: run the script again with the same arguments (a finished step
# is skipped). The runs' small result files are copied to ROOT/compare/runs/; keep them as
# docs/results/finetune_small/runs/, then `python scripts/results_pages.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/sweep_lib.sh
sweep_args runs/finetune_small "$@"
SWEEP_EXTRA+=(--robust_l2_eps=)
AA8=(--robust_attacks=pgd20,autoattack --robust_eps=8 --robust_apgd_steps=0 --robust_targets=0
     --robust_square_queries=0)

suite_of() {  # the robust chain results.json's SLF numbers are of ("" if none)
  "$PYTHON" -c 'import json, sys
try:
    print(json.load(open(sys.argv[1])).get("eval_flags", {}).get("robust_attacks", ""))
except FileNotFoundError:
    print("")' "$1/results.json"
}

workdirs=()
for seed in ${SEEDS:-0}; do
  for method in simclr clae; do
    run=$ROOT/${method}_seed${seed}
    workdirs+=("$run" "${run}_aa8")
    sweep_run "$run" --flagfile="flags/cifar10_small_${method}.cfg" --seed="$seed"
    for kind in alf aff; do
      sweep_step "$run" --flagfile="flags/cifar10_small_${kind}.cfg"
    done
  done
done
for ((i = 0; i < ${#workdirs[@]}; i += 2)); do
  run=${workdirs[i]} copy=${workdirs[i + 1]}
  if [[ ! -d "$copy" ]]; then
    rm -rf "$copy.tmp" && cp -a "$run" "$copy.tmp" && mv "$copy.tmp" "$copy"
  fi
  if [[ "$(suite_of "$copy")" != "pgd20,autoattack" ]]; then
    sweep_step "$copy" --mode=eval "${AA8[@]}"
  fi
  for kind in alf aff; do
    sweep_step "$copy" --flagfile="flags/cifar10_small_${kind}.cfg" "${AA8[@]}"
  done
done
sweep_keep "$ROOT/compare/runs" "${workdirs[@]}"
