"""What several train steps per compiled call (--steps_per_loop) gain where per-step overhead shows.

    python bench/steps_per_loop.py               # smoke model: ResNet-10 x0.125, 16 px, batch 64
    python bench/steps_per_loop.py --rounds=3 --epochs=10

Runs `run.py --flagfile=flags/smoke.cfg` (scikit-learn's digits, offline) for --epochs epochs with
evaluation, export and monitoring off, once per setting and round, the settings interleaved so
that a busy machine slows them alike:
  1 step per call         --steps_per_loop=1  (a host round trip after every step)
  default                 --steps_per_loop=50 with the default --log_every=10 (calls end at a
                          log step: 10 steps per call)
  50 steps per call       --steps_per_loop=50 --log_every=50
and prints, from each run's results.json timings, the loop's time per step after the first call
(the steps inside the calls plus everything the host does between calls), i.e. what a step
costs once compiled. The 1-minute load average is printed before and after.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from clae_tf.runtime.workdir import RESULTS_FILE  # noqa: E402  (no TensorFlow: runs are subprocesses)

SETTINGS = [("1 step per call", ["--steps_per_loop=1"]),
            ("default (10 per call)", ["--steps_per_loop=50", "--log_every=10"]),
            ("50 steps per call", ["--steps_per_loop=50", "--log_every=50"])]


def per_step(timings: dict, steps: int) -> float:
    """Seconds per step of the loop after its first call: calls + host time between them."""
    later = (timings["train_loop_seconds"] - timings["train_data_setup_seconds"]
             - timings["train_first_call_seconds"])
    return later / (steps - timings["train_first_call_steps"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    print(f"1-min load before: {os.getloadavg()[0]:.1f}", flush=True)
    times = {name: [] for name, _ in SETTINGS}
    steps = None
    for _ in range(args.rounds):
        for name, flags in SETTINGS:
            workdir = tempfile.mkdtemp(prefix="steps_per_loop_")
            subprocess.run([sys.executable, "run.py", "--flagfile=flags/smoke.cfg",
                            f"--epochs={args.epochs}", "--noexport", "--linear_epochs=1",
                            "--robust_attacks=", "--eval_every_epochs=0", "--ckpt_every=100000",
                            "--image_every=100000", f"--workdir={workdir}"] + flags,
                           cwd=REPO, check=True, capture_output=True)
            with open(os.path.join(workdir, RESULTS_FILE)) as f:
                results = json.load(f)
            steps = results["step"]
            times[name].append(per_step(results["timings"], steps))
    base = statistics.median(times[SETTINGS[0][0]])
    print(f"{steps} steps per run\n| setting | ms per step (median) | all rounds | vs 1 per call |"
          "\n|---|---|---|---|")
    for name, _ in SETTINGS:
        t = statistics.median(times[name])
        print(f"| {name} | {1000 * t:.1f} | {', '.join(f'{1000 * x:.1f}' for x in times[name])}"
              f" | {base / t:.2f}x |")
    print(f"1-min load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
