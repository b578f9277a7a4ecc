"""Input pipeline throughput of --augment_impl=tf (augment.py) and keras_cv (augment_kerascv.py).

    python bench/augment_throughput.py                      # CIFAR-10 from TFDS
    python bench/augment_throughput.py --dataset=digits --examples_per_class=0 --rounds=2

What is timed: iterating streams.pretrain_dataset (two views of every image, normalised, batches of
--batch_size, the pipeline a training run uses) for whole epochs, with nothing consuming the
batches. The default data settings are flags/cifar10_small_clae.cfg's (5,000 training images,
32 px, --augment=simclr). Epoch 0 of each implementation is a warm-up (decoding into the cache,
tracing); then the two are timed in interleaved rounds, one epoch each, so that a machine shared
with other jobs slows both alike. "images/s" is images (each giving two views) per second; the
1-minute load average before and after is printed, to say how busy the machine was.
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clae_tf.data import sources, streams  # noqa: E402
from clae_tf.runtime.config import Config  # noqa: E402


def epoch_time(split, cfg, epoch):
    start = time.perf_counter()
    n = 0
    for x1, _ in streams.pretrain_dataset(split, cfg, epoch):
        n += int(x1.shape[0])
    return n, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--examples_per_class", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--augment", default="simclr")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    base = Config(dataset=args.dataset, examples_per_class=args.examples_per_class,
                  batch_size=args.batch_size, image_size=args.image_size, augment=args.augment,
                  normalize="half", seed=0)
    split = sources.load(base).train
    cfgs = {impl: dataclasses.replace(base, augment_impl=impl) for impl in ("tf", "keras_cv")}
    print(f"{split.num_examples} images, batch {args.batch_size}, {args.image_size} px, "
          f"--augment={args.augment}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    for impl, cfg in cfgs.items():
        n, t = epoch_time(split, cfg, 0)
        print(f"warm-up {impl}: {n / t:.0f} images/s", flush=True)
    rates = {impl: [] for impl in cfgs}
    for r in range(args.rounds):
        for impl, cfg in cfgs.items():
            n, t = epoch_time(split, cfg, 1 + r)
            rates[impl].append(n / t)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()) +
              f" images/s (load {os.getloadavg()[0]:.1f})", flush=True)
    print("| --augment_impl | images/s (median) | min - max |")
    print("|---|---|---|")
    for impl, v in rates.items():
        print(f"| {impl} | {statistics.median(v):.0f} | {min(v):.0f} - {max(v):.0f} |")
    ratio = statistics.median(a / b for a, b in zip(rates["tf"], rates["keras_cv"]))
    print(f"tf / keras_cv (median of per-round ratios): {ratio:.2f}; "
          f"load after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
