"""Seconds per train step of SimCLR and SimCLR + CLAE for one input size, stem, width and batch,
beside the small CIFAR-10 protocol's step timed in the same rounds; to choose a protocol's input
size and epochs from what a step costs.

    python bench/step_cost.py --image_size=64 --stem=imagenet                 # Tiny-ImageNet, 64 px
    python bench/step_cost.py --image_size=224 --stem=imagenet --rounds=3     # the reference's size
    python bench/step_cost.py --image_size=64 --stem=imagenet --steps=1560    # + minutes per run
    python bench/step_cost.py --image_size=64 --stem=imagenet --rounds=0      # FLOPs only

The steps are bench/benchmark.py's (train.make_train_step under tf.function on fixed random
inputs, traced, then warmed up), every step of every case and precision timed once per round in
INTERLEAVED rounds, so that other jobs on the machine slow them all alike: the ratios to the
reference case (--reference, default cifar:32 = the CIFAR-10 protocols' step) hold on a busy
machine, the seconds only on an idle one. Median over rounds. FLOPs per image are counted from
the traced graph (benchmark.forward_flops). The input pipeline (streams.pretrain_dataset: both views
of --source_size px images, augmented, at --image_size) is timed on its own after the rounds: it
must deliver images faster than the CLAE step consumes them.
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.dirname(BENCH))

import benchmark  # noqa: E402  (bench/benchmark.py: the steps, FLOPs, interleaved rounds)

from clae_tf.data import streams  # noqa: E402

METHODS = ("simclr", "clae")


def parse_case(text: str):
    """'imagenet:64' -> ('imagenet', 64)."""
    stem, _, size = text.partition(":")
    if stem not in ("cifar", "imagenet") or not size.isdigit():
        raise argparse.ArgumentTypeError(f"expected <cifar|imagenet>:<size>, got {text!r}")
    return stem, int(size)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--stem", choices=("cifar", "imagenet"), default="imagenet")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--precisions", default="bf16,float32", help="comma list: float32, bf16")
    p.add_argument("--reference", default="cifar:32",
                   help="stem:size timed in the same rounds ('' for none)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (0: FLOPs only)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds after tracing")
    p.add_argument("--steps", type=int, default=0,
                   help="also print minutes of this many steps per run (epochs x images/batch)")
    p.add_argument("--source_size", type=int, default=0,
                   help="size of the stored images the pipeline crops (0: --image_size; "
                        "Tiny-ImageNet: 64)")
    p.add_argument("--pipeline_batches", type=int, default=5, help="0: do not time the pipeline")
    args = p.parse_args(argv)
    args.precisions = [x for x in args.precisions.split(",") if x]
    for precision in args.precisions:
        if precision not in benchmark.POLICIES:
            p.error(f"--precisions: unknown {precision!r}; choose from "
                    f"{', '.join(benchmark.POLICIES)}")
    args.cases = [(args.stem, args.image_size)]
    if args.reference:
        try:
            reference = parse_case(args.reference)
        except argparse.ArgumentTypeError as e:
            p.error(f"--reference: {e}")
        if reference not in args.cases:
            args.cases.append(reference)
    return args


def config(args, case, method, precision="float32"):
    stem, size = case
    return benchmark.make_config(args.arch, args.width, args.batch_size, size, method == "clae",
                                 precision, stem=stem)


def case_name(case) -> str:
    return f"{case[0]}:{case[1]}"


def time_steps(args) -> dict:
    """{(case, precision, method): [seconds per round]} and "_load": 1-min load per round."""
    fns = {}
    for case in args.cases:
        for precision in args.precisions:
            for method in METHODS:
                fns[f"{case_name(case)} {precision} {method}"] = benchmark.build_step(
                    config(args, case, method, precision))
    timed = benchmark.interleaved(fns, args.rounds, args.warmup)
    out = {"_load": timed.pop("_load")}
    for key, t in timed.items():
        name, precision, method = key.split(" ")
        out[(parse_case(name), precision, method)] = t["wall"]
    return out


def time_pipeline(args) -> float:
    """Images/s of streams.pretrain_dataset (both views) from --source_size px images."""
    cfg = config(args, args.cases[0], "clae")
    source = args.source_size or args.image_size
    split = benchmark.synthetic_split(args.batch_size * (args.pipeline_batches + 2), source)
    batches = iter(streams.pretrain_dataset(split, cfg, epoch=0))
    next(batches)  # builds the pipeline
    start = time.perf_counter()
    for _ in range(args.pipeline_batches):
        x1, _ = next(batches)
    float(x1[0, 0, 0, 0])
    return args.pipeline_batches * args.batch_size / (time.perf_counter() - start)


def report(args, flops: dict, seconds: dict, pipeline=None) -> str:
    """The markdown of the results.

    Args:
      flops: {case: benchmark.step_flops(...)} (GFLOPs per image of each step).
      seconds: time_steps' output ({} when nothing was timed).
      pipeline: images/s of the input pipeline, or None.
    """
    timing = (f"; median of {args.rounds} interleaved rounds after {args.warmup} warm-up"
              if seconds else "")
    lines = [f"{args.arch} x{args.width:g}, batch {args.batch_size}{timing}.", "",
             "FLOPs per image (conv + matmul, 2 per multiply-add): " + "; ".join(
                 f"{case_name(c)}: SimCLR step {f['simclr'] / 1e9:.3f} G, CLAE step "
                 f"{f['clae'] / 1e9:.3f} G" for c, f in flops.items())]
    if len(flops) > 1:
        (c0, f0), (c1, f1) = list(flops.items())[:2]
        lines[-1] += (f"; {case_name(c0)} / {case_name(c1)}: "
                      f"{f0['clae'] / f1['clae']:.2f}x.")
    if not seconds:
        return "\n".join(lines)
    reference = args.cases[-1] if len(args.cases) > 1 else None
    header = ["case", "precision", "SimCLR s/step", "CLAE s/step", "CLAE / SimCLR"]
    if reference:
        header += [f"SimCLR / {case_name(reference)}", f"CLAE / {case_name(reference)}"]
    if args.steps:
        header += [f"{args.steps} steps: SimCLR + CLAE (min)"]
    lines += ["", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    med = {k: statistics.median(v) for k, v in seconds.items() if k != "_load"}
    for case in args.cases:
        for precision in args.precisions:
            s, c = (med[(case, precision, m)] for m in METHODS)
            row = [case_name(case), precision, f"{s:.3f}", f"{c:.3f}", f"{c / s:.2f}"]
            if reference:
                row += [f"{s / med[(reference, precision, 'simclr')]:.2f}",
                        f"{c / med[(reference, precision, 'clae')]:.2f}"]
            if args.steps:
                row += [f"{args.steps * s / 60:.1f} + {args.steps * c / 60:.1f} = "
                        f"{args.steps * (s + c) / 60:.1f}"]
            lines.append("| " + " | ".join(row) + " |")
    load = seconds["_load"]
    lines += ["", f"1-minute load over the rounds: min {min(load):.1f}, median "
                  f"{statistics.median(load):.1f}, max {max(load):.1f} ({os.cpu_count()} "
                  f"logical CPUs; above about that count, other jobs shared the cores)."]
    if pipeline is not None:
        fastest = min(med[(args.cases[0], p, "clae")] for p in args.precisions)
        consumed = args.batch_size / fastest
        lines.append(f"Input pipeline alone ({args.source_size or args.image_size} px images -> "
                     f"two views at {args.image_size} px): {pipeline:.0f} img/s; the fastest "
                     f"CLAE step of {case_name(args.cases[0])} consumes {consumed:.0f} img/s "
                     f"({pipeline / consumed:.1f}x; under ~2x the pipeline and the step compete "
                     f"for the cores).")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    flops = {case: benchmark.step_flops(benchmark.forward_flops(config(args, case, "simclr")))
             for case in args.cases}
    seconds = time_steps(args) if args.rounds else {}
    pipeline = time_pipeline(args) if args.rounds and args.pipeline_batches else None
    print(report(args, flops, seconds, pipeline))
    print(f"[{time.time() - t0:.0f} s]")


if __name__ == "__main__":
    main()
