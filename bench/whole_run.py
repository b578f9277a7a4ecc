"""Where the time of a whole run goes: start-up, data, compile, steps, evaluation, export.

    python bench/whole_run.py                                  # the small CIFAR-10 CLAE run
    python bench/whole_run.py -- --epochs=3 --linear_epochs=10 --noexport
    python bench/whole_run.py --results=runs/x/results.json    # the table of a finished run
    python bench/whole_run.py --seed=1 --workdir=runs/bf16_s1 -- --precision=bf16

Runs `python run.py --flagfile=flags/cifar10_small_clae.cfg --seed=0` (--flagfile, --seed, and
the arguments after `--`) in a fresh process, timed from outside (written into its results.json as
"wall_seconds_outside", with the 1-minute load average before and after), then prints the table
from the "timings" the run recorded in its results.json (clae_tf/app.py, train.train):

  start-up      process start -> app.run (imports, TensorFlow, flags)
  data load     opening the dataset (file lists, subsets)
  data set-up   the train pipeline and its iterator (the split read into memory)
  first call    the first compiled loop call: tracing + compiling the loop, and its steps
  compile (est) first call - its steps at the mean step time of the later calls
  steps         every later call (steps, and any wait for data inside them)
  host          the loop's time outside calls: online eval (its own row), progress, logs,
                checkpoints, new pipelines
  eval          evaluate.evaluate: features, linear probe, kNN, robust accuracy (each a row)
  export        the SavedModel, .keras and probe exports and their reload checks
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# No TensorFlow: the run is a subprocess.
from clae_tf.runtime.workdir import RESULTS_FILE, update_results  # noqa: E402

EVAL_PARTS = [("features", "h, z of the train and test splits, once"),
              ("probe", "linear probe, compiled calls of 10 epochs"),
              ("knn", "weighted kNN on z"),
              ("robust", "the attack chain of --robust_attacks, with its checks")]


def breakdown(t: dict, steps: int, eval_parts=None, online_seconds=None) -> list:
    """Rows (name, seconds, note) of a run's timings dict (results.json "timings").

    Args:
      t: the timings (seconds; train_first_call_steps a count).
      steps: the run's number of train steps in this process.
      eval_parts: results.json "eval_seconds_by_part" (seconds by part of eval), if any.
      online_seconds: results.json "online_eval_seconds_this_process" (the online kNN and
        pictures of --eval_every_epochs, done by the host between calls), if any.
    Returns:
      [(name, seconds or None, note)], in the order of the run.
    """
    later_steps = steps - t["train_first_call_steps"]
    step_time = t["train_calls_seconds"] / later_steps if later_steps > 0 else 0.0
    compile_est = t["train_first_call_seconds"] - t["train_first_call_steps"] * step_time
    host = (t["train_loop_seconds"] - t["train_data_setup_seconds"]
            - t["train_first_call_seconds"] - t["train_calls_seconds"])
    loop = t["train_loop_seconds"]
    return [
        ("start-up", t["startup_seconds"], "imports, TensorFlow, flags"),
        ("data load", t["data_load_seconds"], "open the dataset"),
        ("data set-up", t["train_data_setup_seconds"], "train pipeline(s) + iterator(s)"),
        ("first call", t["train_first_call_seconds"],
         f"{t['train_first_call_steps']} steps + tracing/compiling"),
        ("  compile (est.)", compile_est, f"first call - its steps at {step_time:.2f} s/step"),
        ("steps", t["train_calls_seconds"], f"{later_steps} steps, {step_time:.3f} s/step"),
        ("host (outside calls)", host, f"{100 * host / loop:.1f}% of the loop ({loop:.1f} s)"),
    ] + ([("  online eval", online_seconds, "kNN + pictures every --eval_every_epochs"),
          ("  the rest", host - online_seconds,
           f"{100 * (host - online_seconds) / loop:.1f}% of the loop: progress, logs, "
           "checkpoints")] if online_seconds else []) + [
        ("eval", t.get("eval_seconds"), "features + probe + kNN + robust"),
    ] + [(f"  {name}", (eval_parts or {}).get(name), note) for name, note in EVAL_PARTS
         if name in (eval_parts or {})] + [
        ("export", t.get("export_seconds"), "SavedModel, .keras, probe + reload checks"),
        ("total (process)", t.get("total_seconds"), "as the run measured itself"),
    ]


def table(rows) -> str:
    lines = ["| part | seconds | note |", "|---|---|---|"]
    for name, seconds, note in rows:
        lines.append(f"| {name} | {'-' if seconds is None else f'{seconds:.1f}'} | {note} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", help="print the table of this results.json; run nothing")
    parser.add_argument("--flagfile", default="flags/cifar10_small_clae.cfg")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep the run here (default: a new temporary dir)")
    parser.add_argument("run_args", nargs="*", help="more run.py flags (after --)")
    args = parser.parse_args()
    wall = None
    path = args.results
    if path is None:
        workdir = args.workdir or tempfile.mkdtemp(prefix="whole_run_")
        cmd = [sys.executable, "run.py", f"--flagfile={args.flagfile}", f"--seed={args.seed}",
               f"--workdir={workdir}"] + args.run_args
        print(" ".join(cmd), flush=True)
        load0, t = os.getloadavg()[0], time.time()
        subprocess.run(cmd, cwd=REPO, check=True)
        wall = time.time() - t
        load1 = os.getloadavg()[0]
        print(f"1-min load before/after: {load0:.1f}/{load1:.1f}")
        run_dir = os.path.join(REPO, workdir)  # run.py ran in REPO (a relative --workdir)
        path = os.path.join(run_dir, RESULTS_FILE)
    with open(path) as f:
        results = json.load(f)
    rows = breakdown(results["timings"], results["step"],  # a fresh run: all its steps
                     results.get("eval_seconds_by_part"),
                     results.get("online_eval_seconds_this_process"))
    if wall is not None:
        rows.append(("wall (outside)", wall, "timed by this script"))
        results = update_results(run_dir, {  # for the tables of several runs
            "wall_seconds_outside": wall, "load_before_after": [load0, load1]})
    print(table(rows))
    print(f"kNN {100 * results['knn_top1']:.2f}  linear {100 * results['linear_top1']:.2f}")


if __name__ == "__main__":
    main()
