# Sourced by the protocol scripts (scripts/cifar10_small.sh, scripts/cifar10_small_methods.sh,
# scripts/cifar10_small_baselines.sh, scripts/cifar10_full.sh, scripts/tinyimagenet_small.sh,
# scripts/tradeoff.sh, scripts/finetune_small.sh): runs one run.py workdir of a sweep, and
# records in <workdir>/sweep.jsonl (clae_tf/runtime/workdir.py's SWEEP_FILE) what the results
# table needs beyond results.json:
#   {"event": "start", "unix": ..., "utc": ..., "preset": "<run.py arguments>", "extra": "<the
#    sweep's extra flags>", "commit": "<git HEAD>", "dirty": true|false, "loadavg": [1, 5, 15 min],
#    "cores": N}
#   {"event": "load", "unix": ..., "loadavg": [...]}        every $LOAD_EVERY s (default 60)
#   {"event": "end", "unix": ..., "utc": ..., "exit": <run.py's exit code>, "loadavg": [...]}
# A resumed run appends another start ... end. scripts/compare.py reads it (preset, commit, wall
# time, load at start / during / at the end: whether the machine was otherwise idle).
# Uses: PYTHON (default python), SWEEP_EXTRA (array: flags added to every run; sweep_args
# sets it), LOAD_EVERY.

PYTHON="${PYTHON:-python}"
LOAD_EVERY="${LOAD_EVERY:-60}"

# sweep_args DEFAULT_ROOT ARGS...: the protocol scripts' command line, [ROOT] [extra run.py
# flags...]: sets ROOT (the first argument unless it starts with -, else DEFAULT_ROOT) and
# SWEEP_EXTRA (the other arguments, added to every run by sweep_run).
sweep_args() {
  ROOT=$1
  shift
  if [[ $# -gt 0 && "$1" != -* ]]; then ROOT=$1; shift; fi
  SWEEP_EXTRA=("$@")
}

_sweep_json_str() {  # a JSON string of $1 (backslashes and double quotes escaped)
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

_sweep_loadavg() {  # [1-min, 5-min, 15-min] load, or null where /proc/loadavg is missing
  local l1 l5 l15 _rest
  if read -r l1 l5 l15 _rest < /proc/loadavg 2>/dev/null; then
    printf '[%s, %s, %s]' "$l1" "$l5" "$l15"
  else
    printf 'null'
  fi
}

_sweep_commit() {
  git rev-parse HEAD 2>/dev/null || echo unknown
}

_sweep_dirty() {  # true if tracked files differ from the commit
  if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    echo true
  else
    echo false
  fi
}

# sweep_run WORKDIR RUN.PY-ARGS...: skips a finished run (results.json), else runs (a fresh
# start or, with a checkpoint in WORKDIR, a resume) `$PYTHON run.py ARGS --workdir=WORKDIR
# SWEEP_EXTRA...`, recording sweep.jsonl. Returns run.py's exit code (the caller's set -e then
# stops the sweep, so that a failed or interrupted run is not followed by the next).
sweep_run() {
  if [[ -f "$1/results.json" ]]; then
    echo "== $1: done already (results.json), skipping"
    return 0
  fi
  sweep_step "$@"
}

# sweep_step WORKDIR RUN.PY-ARGS...: sweep_run without the skip, for a step on a run that has
# results already (--mode=finetune, --mode=eval), which run.py itself skips or redoes.
sweep_step() {
  local workdir=$1
  shift
  mkdir -p "$workdir"
  local meta="$workdir/sweep.jsonl" start
  start=$(date +%s)
  local format='{"event": "start", "unix": %s, "utc": "%s", "preset": %s, "extra": %s,'
  format+=' "commit": "%s", "dirty": %s, "loadavg": %s, "cores": %s}\n'
  # shellcheck disable=SC2059
  printf "$format" "$start" "$(date -u +%FT%TZ)" "$(_sweep_json_str "$*")" \
    "$(_sweep_json_str "${SWEEP_EXTRA[*]:-}")" "$(_sweep_commit)" "$(_sweep_dirty)" \
    "$(_sweep_loadavg)" "$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo null)" >> "$meta"
  echo "== $workdir: start $(date -u +%FT%TZ), load $(_sweep_loadavg)"
  # The load while the run goes on, until the run ends or this script is gone ($$: the script's
  # pid, also in the subshell); its output to /dev/null so that no pipe waits for it.
  ( while sleep "$LOAD_EVERY" && kill -0 $$ 2>/dev/null; do
      printf '{"event": "load", "unix": %s, "loadavg": %s}\n' "$(date +%s)" "$(_sweep_loadavg)"
    done >> "$meta" ) >/dev/null 2>&1 &
  local sampler=$! rc=0
  trap "kill $sampler 2>/dev/null" EXIT
  "$PYTHON" run.py "$@" --workdir="$workdir" ${SWEEP_EXTRA[@]+"${SWEEP_EXTRA[@]}"} || rc=$?
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  trap - EXIT
  printf '{"event": "end", "unix": %s, "utc": "%s", "exit": %s, "loadavg": %s}\n' \
    "$(date +%s)" "$(date -u +%FT%TZ)" "$rc" "$(_sweep_loadavg)" >> "$meta"
  echo "== $workdir: exit $rc at $(date -u +%FT%TZ), $(( $(date +%s) - start )) s wall" \
       "(whole process), load $(_sweep_loadavg)"
  return "$rc"
}

# sweep_keep OUT WORKDIR...: copies each run's small result files (results.json, flags.cfg,
# sweep.jsonl; never checkpoints or events) to OUT/<workdir name>/, to be kept in the repository
# (e.g. docs/results/<protocol>/runs/) so that no one has to rerun them for the numbers. The
# workdir's path in flags.cfg (--workdir, the "Reproduce" line; run.py writes it as sweep_run
# passed it, so WORKDIR must be given here as it was there) becomes ROOT/<name>, as the protocol
# docs name the sweep's folder: a kept file names no folder of the machine it ran on.
sweep_keep() {
  local out=$1 workdir name file text recorded
  shift
  for workdir in "$@"; do
    name=$(basename "$workdir")
    mkdir -p "$out/$name"
    for file in results.json sweep.jsonl; do
      if [[ -f "$workdir/$file" ]]; then cp "$workdir/$file" "$out/$name/"; fi
    done
    if [[ -f "$workdir/flags.cfg" ]]; then
      text=$(<"$workdir/flags.cfg")
      # The path the run recorded too: a copy of a workdir (finetune_small.sh's _aa8) keeps its
      # original's. The quoted patterns match the paths literally (sed would read regexes).
      recorded=$(sed -n 's/^--workdir=//p' "$workdir/flags.cfg" | head -n 1)
      text=${text//"$workdir"/ROOT/$name}
      if [[ -n "$recorded" ]]; then text=${text//"$recorded"/ROOT/$name}; fi
      printf '%s\n' "$text" > "$out/$name/flags.cfg"
    fi
  done
}

# sweep_compare ROOT WORKDIR...: the runs' small result files to ROOT/compare/runs/ (sweep_keep),
# then scripts/compare.py's tables and plots of the runs (rows in the order given) to ROOT/compare/.
sweep_compare() {
  local root=$1
  shift
  sweep_keep "$root/compare/runs" "$@"
  "$PYTHON" scripts/compare.py "$@" --out "$root/compare"
}

# sweep_pairs ROOT PRESET: for each seed of $SEEDS, ROOT/simclr_seed<k> with
# flags/PRESET_simclr.cfg, then ROOT/clae_seed<k> with flags/PRESET_clae.cfg (complete pairs if
# interrupted); then sweep_compare. Stops at a failed run (sweep_run's exit code, set -e).
sweep_pairs() {
  local root=$1 preset=$2 seed method
  local workdirs=()
  for seed in $SEEDS; do
    for method in simclr clae; do
      workdirs+=("$root/${method}_seed${seed}")
      sweep_run "${workdirs[-1]}" --flagfile="flags/${preset}_${method}.cfg" --seed="$seed"
    done
  done
  sweep_compare "$root" "${workdirs[@]}"
}
