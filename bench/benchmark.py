"""Throughput of the SimCLR and CLAE train steps, the input pipeline, bf16, and peak memory.

    python bench/benchmark.py                  # docs/performance.md's step costs (20-40 min)
    python bench/benchmark.py --quick          # ResNet-10 x0.25, batch 64: ~1 min when idle
    python bench/benchmark.py --widths=1 --batch_size=128 --image_size=32 --precisions=float32
    python bench/benchmark.py --widths=0.25 --rounds=0 --profile   # op-level time by op group

What is timed: train_step.make_train_step (cfg.adversarial False = SimCLR, True = CLAE, same
architecture and width) under tf.function, called directly on fixed input tensors, after
warm-up. SimCLR, CLAE (float32 and bf16) and a large matmul are timed in INTERLEAVED rounds, so
that a machine shared with other jobs slows all of them alike: the ratios are what to read.
Each row reports the median over rounds; "images/s" is batch_size / step time (an image gives two
views). The CLAE/SimCLR ratio is also given as the median of per-round ratios, the ratio of the
fastest rounds, and the ratio of CPU seconds (all threads of this process; they do not count
time lost to other processes).

FLOPs are counted analytically from the static shapes of the Conv2D and MatMul ops in the
traced forward graph (2 FLOPs per multiply-add; BN, ReLU, the loss and the optimizer are not
counted). Per image: forward F; a full backward = input gradient B_in (all layers but the stem)
+ filter gradient B_w, each costing one forward of its layer. SimCLR = 2 (F + B_in + B_w);
CLAE = SimCLR + attack (F + B_in incl. the stem) + adversarial branch (F + B_in + B_w).
"""

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clae_tf.data import sources, streams
from clae_tf.method import builders, contrastive, optim, train_step  # noqa: E402
from clae_tf.runtime.config import Config  # noqa: E402

POLICIES = {"float32": "float32", "bf16": "mixed_bfloat16"}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except Exception:  # no lscpu: fall back on /proc/cpuinfo
        name = "unknown CPU"
    return f"{name}, {os.cpu_count()} logical CPUs"


def load() -> float:
    return os.getloadavg()[0]


def make_config(arch, width, batch_size, image_size, adversarial, precision="float32", **kw):
    return Config(arch=arch, width=width, batch_size=batch_size, image_size=image_size,
                  adversarial=adversarial, precision=precision, **kw)


# ---------------------------------------------------------------------------------------- FLOPs

def forward_flops(cfg: Config) -> dict:
    """Per-image FLOPs of one forward pass, from the traced graph's Conv2D/MatMul shapes.

    Returns {"forward", "stem"} (stem: the first convolution, whose input gradient only the
    attack needs) and the tf.compat.v1 profiler's count of the same graph as a cross-check
    ("profiler", which also counts some element-wise ops).
    """
    model = builders.build_model(cfg, adversarial=False)
    fn = tf.function(lambda x: model(x, training=True)[1])
    graph = fn.get_concrete_function(
        tf.TensorSpec([1, cfg.image_size, cfg.image_size, 3], tf.float32)).graph
    total, stem = 0, None
    for op in graph.get_operations():
        if op.type == "Conv2D":
            k_h, k_w, c_in, _ = op.inputs[1].shape
            macs = int(np.prod(op.outputs[0].shape[1:])) * k_h * k_w * c_in
        elif op.type in ("MatMul", "BatchMatMulV2"):
            macs = int(op.inputs[0].shape[-1]) * int(op.outputs[0].shape[-1])
        else:
            continue
        total += 2 * macs
        if stem is None and op.type == "Conv2D":
            stem = 2 * macs
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    profiler = tf.compat.v1.profiler.profile(graph=graph, options=opts).total_float_ops
    return {"forward": total, "stem": stem, "profiler": profiler}


def step_flops(f: dict) -> dict:
    """FLOPs per IMAGE of a SimCLR and a CLAE step (see the module docstring)."""
    fwd, b_in, b_w = f["forward"], f["forward"] - f["stem"], f["forward"]
    simclr = 2 * (fwd + b_in + b_w)
    clae = simclr + (fwd + b_in + f["stem"]) + (fwd + b_in + b_w)
    return {"simclr": simclr, "clae": clae, "ratio": clae / simclr}


# ----------------------------------------------------------------------------------- the steps

def compiled_step(cfg: Config):
    """The seeded model's train step under tf.function (call under cfg.precision's policy)."""
    keras.utils.set_random_seed(cfg.seed)
    model = builders.build_model(cfg)
    optimizer = optim.build_optimizer(cfg, 1, 1)
    optimizer.build(model.trainable_variables)
    return tf.function(train_step.make_train_step(model, optimizer, cfg, 1,
                                                  contrastive.build(cfg, model)))


def build_step(cfg: Config):
    """A compiled train step and its inputs, built under cfg.precision's Keras policy."""
    keras.mixed_precision.set_global_policy(POLICIES[cfg.precision])
    try:
        step = compiled_step(cfg)
        shape = [cfg.batch_size, cfg.image_size, cfg.image_size, 3]
        x1 = tf.random.stateless_uniform(shape, [1, 2], -1.0, 1.0)
        x2 = tf.random.stateless_uniform(shape, [3, 4], -1.0, 1.0)
        step(x1, x2)  # trace under this policy
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return lambda: float(step(x1, x2)[0]["loss"])


def build_matmul(n: int, dtype):
    a = tf.cast(tf.random.stateless_normal([n, n], [5, 6]), dtype)
    b = tf.cast(tf.random.stateless_normal([n, n], [7, 8]), dtype)
    fn = tf.function(lambda a, b: tf.reduce_sum(tf.cast(tf.matmul(a, b)[:1, :1], tf.float32)))
    fn(a, b)
    return lambda: float(fn(a, b))


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def interleaved(fns: dict, rounds: int, warmup: int) -> dict:
    """Times every callable once per round, alternating the order every round.

    Returns {name: {"wall": [...], "cpu": [...]}} and "_load": the 1-minute load per round.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out = {name: {"wall": [], "cpu": []} for name in names}
    out["_load"] = []
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            wall, cpu = timed(fns[name])
            out[name]["wall"].append(wall)
            out[name]["cpu"].append(cpu)
        out["_load"].append(load())
        print(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{k} {v['wall'][-1]:.2f}s" for k, v in out.items() if k != "_load")
            + f" (load {out['_load'][-1]:.1f})", flush=True)
    return out


def build_width(args, width: float) -> dict:
    """The callables timed for one width: both steps per precision, and the matmuls."""
    fns = {}
    for precision in args.precisions:
        for method in ("simclr", "clae"):
            cfg = make_config(args.arch, width, args.batch_size, args.image_size,
                              method == "clae", precision)
            fns[f"{method}_{precision}"] = build_step(cfg)
    fns["matmul_float32"] = build_matmul(args.matmul_size, tf.float32)
    if "bf16" in args.precisions:
        fns["matmul_bf16"] = build_matmul(args.matmul_size, tf.bfloat16)
    return fns


def bench_width(args, width: float, flops: dict, fns: dict) -> list:
    t = interleaved(fns, args.rounds, args.warmup)
    med = {k: {m: statistics.median(v[m]) for m in ("wall", "cpu")}
           for k, v in t.items() if not k.startswith("_")}
    mm_flops = 2 * args.matmul_size ** 3
    rows = []
    for precision in args.precisions:
        s, c = f"simclr_{precision}", f"clae_{precision}"
        per_round = [a / b for a, b in zip(t[c]["wall"], t[s]["wall"])]
        mm = mm_flops / med[f"matmul_{precision}"]["wall"]
        row = {
            "width": width, "precision": precision, "batch_size": args.batch_size,
            "image_size": args.image_size, "rounds": args.rounds,
            "simclr_img_s": args.batch_size / med[s]["wall"],
            "clae_img_s": args.batch_size / med[c]["wall"],
            "ratio": med[c]["wall"] / med[s]["wall"],
            "ratio_round_median": statistics.median(per_round),
            "ratio_round_iqr": [float(np.percentile(per_round, 25)),
                                float(np.percentile(per_round, 75))],
            "ratio_cpu": med[c]["cpu"] / med[s]["cpu"],
            # Contention only adds time, so the fastest rounds are the least disturbed (but a
            # CLAE step, twice as long, is less likely to fit in a quiet moment).
            "ratio_best": min(t[c]["wall"]) / min(t[s]["wall"]),
            "wall_per_round": {s: t[s]["wall"], c: t[c]["wall"]},
            "simclr_s": med[s]["wall"], "clae_s": med[c]["wall"],
            "simclr_cpu_s": med[s]["cpu"], "clae_cpu_s": med[c]["cpu"],
            "simclr_gflops": flops["simclr"] * args.batch_size / med[s]["wall"] / 1e9,
            "clae_gflops": flops["clae"] * args.batch_size / med[c]["wall"] / 1e9,
            "matmul_gflops": mm / 1e9,
            "load": [min(t["_load"]), statistics.median(t["_load"]), max(t["_load"])],
        }
        row["simclr_vs_matmul"] = row["simclr_gflops"] / row["matmul_gflops"]
        row["clae_vs_matmul"] = row["clae_gflops"] / row["matmul_gflops"]
        if precision == "bf16" and "float32" in args.precisions:
            row["bf16_speedup_simclr"] = med["simclr_float32"]["wall"] / med[s]["wall"]
            row["bf16_speedup_clae"] = med["clae_float32"]["wall"] / med[c]["wall"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------- profile

OP_GROUPS = (("conv forward", ("Conv2D",)), ("conv input-grad", ("Conv2DBackpropInput",)),
             ("conv filter-grad", ("Conv2DBackpropFilter",)),
             ("BN forward", ("FusedBatchNormV3", "FusedBatchNormEx")),
             ("BN grad", ("FusedBatchNormGradV3",)), ("ReLU, ReLU grad", ("Relu", "ReluGrad")),
             ("add (residual, grad sums)", ("AddV2", "AddN")), ("matmul (head)", ("MatMul",)))


def op_profile(fn, logdir: str) -> dict:
    """Seconds per op group of one call of fn, from a tf.profiler trace (CPU op durations)."""
    import glob

    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    tf.profiler.experimental.start(logdir)
    fn()
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))[-1], "rb") as f:
        space.ParseFromString(f.read())
    out = {name: 0.0 for name, _ in OP_GROUPS}
    out["other ops"] = 0.0
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" not in name or name.startswith("__"):
                    continue  # executor / function wrappers, not ops
                op = name.rsplit(":", 1)[1].replace("_MklNative", "").replace("_Mkl", "")
                if op in ("Process", "Run") or op.startswith(" "):
                    continue
                group = next((g for g, ops in OP_GROUPS if op in ops), "other ops")
                out[group] += event.duration_ps * 1e-12
    return out


def bench_profile(args, width: float, precision: str) -> dict:
    fns = {m: build_step(make_config(args.arch, width, args.batch_size, args.image_size,
                                     m == "clae", precision)) for m in ("simclr", "clae")}
    runs = {m: [] for m in fns}
    for r in range(args.profile_reps):  # interleaved, median per op group
        for m, fn in (fns.items() if r % 2 == 0 else reversed(fns.items())):
            fn()
            runs[m].append(op_profile(fn, os.path.join(tempfile.gettempdir(),
                                                     f"clae_bench_profile_{os.getpid()}_{m}_{r}")))
    return {m: {g: statistics.median(p[g] for p in profiles) for g in profiles[0]}
            for m, profiles in runs.items()}


# ------------------------------------------------------------------------------ input pipeline

def synthetic_split(n: int, size: int) -> sources.Split:
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = np.zeros([n], np.int32)
    return sources.Split(tf.data.Dataset.from_tensor_slices((images, labels)).cache(), n)


def bench_pipeline(args) -> dict:
    """Images/s of streams.pretrain_dataset (both views, augmented, normalised) on its own."""
    cfg = make_config(args.arch, 1.0, args.batch_size, args.image_size, True)
    n = args.batch_size * (args.pipeline_batches + args.warmup + 2)
    split = synthetic_split(n, args.image_size)
    it = iter(streams.pretrain_dataset(split, cfg, epoch=0))
    for _ in range(args.warmup + 1):
        next(it)
    w, c = time.perf_counter(), time.process_time()
    for _ in range(args.pipeline_batches):
        x1, _ = next(it)
    _ = float(x1[0, 0, 0, 0])
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    return {"img_s": args.pipeline_batches * args.batch_size / wall,
            "cpu_s_per_1k_img": 1000 * cpu / (args.pipeline_batches * args.batch_size),
            "batches": args.pipeline_batches, "load": load()}


# -------------------------------------------------------------------------------------- memory

def memory_child(argv) -> None:
    """Runs a few CLAE steps fed by the real pipeline; prints peak RSS as JSON (subprocess)."""
    arch, width, batch, size, precision, steps = argv
    cfg = make_config(arch, float(width), int(batch), int(size), True, precision)
    keras.mixed_precision.set_global_policy(POLICIES[precision])
    model = builders.build_model(cfg)
    optimizer = optim.build_optimizer(cfg, 1, 1)
    optimizer.build(model.trainable_variables)
    step = tf.function(train_step.make_train_step(model, optimizer, cfg, 1,
                                              contrastive.build(cfg, model)))
    split = synthetic_split(cfg.batch_size * int(steps), cfg.image_size)
    before = _vm_hwm_mb()
    for x1, x2 in streams.pretrain_dataset(split, cfg, epoch=0).take(int(steps)):
        float(step(x1, x2)[0]["loss"])
    # VmHWM is this process's own peak. ru_maxrss is reported too, but Linux carries it over
    # from the forked parent (this benchmark, already large) across exec, so it can be too high.
    out = {"peak_rss_mb": _vm_hwm_mb(), "rss_before_steps_mb": before,
           "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if tf.config.list_logical_devices("GPU"):
        out["gpu_peak_mb"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    print("MEMORY " + json.dumps(out))


def _vm_hwm_mb() -> float:
    """Peak resident set size of this process (Linux /proc; falls back on ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_memory(args, width, precision) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory_child", args.arch, str(width),
           str(args.batch_size), str(args.image_size), precision, str(args.memory_steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY "):
            return {"width": width, "precision": precision, **json.loads(line[7:])}
    raise RuntimeError(f"memory child failed:\n{proc.stderr[-2000:]}")


# ------------------------------------------------------------------------------- bf16 check

def train_curve(cfg: Config, steps: int) -> dict:
    """Losses of `steps` CLAE steps on cfg.dataset, and |x_adv - x| / eps of the logged images."""
    keras.mixed_precision.set_global_policy(POLICIES[cfg.precision])
    try:
        step = compiled_step(cfg)
        source = sources.load(cfg)
        losses, ratios, epoch = [], [], 0
        while len(losses) < steps:
            for x1, x2 in streams.pretrain_dataset(source.train, cfg, epoch).take(
                    steps - len(losses)):
                metrics, images = step(x1, x2)
                losses.append([float(metrics[k]) for k in ("loss", "clean_loss", "adv_loss")])
                ratios.append(np.abs(images["x_adv"].numpy() - images["x"].numpy()).ravel()
                              / cfg.eps)
            epoch += 1
    finally:
        keras.mixed_precision.set_global_policy("float32")
    ratios = np.concatenate(ratios)
    return {"losses": losses, "delta_is_eps": float(np.mean(np.abs(ratios - 1) < 1e-3)),
            "delta_is_zero": float(np.mean(ratios < 1e-3)),
            "delta_max_over_eps": float(ratios.max())}


def bf16_check(args) -> dict:
    """The same CLAE run (same seed, data, initial weights) in float32 and in bf16."""
    cfg = make_config(args.arch, 0.25, 128, args.image_size, True, dataset="digits")
    out = {p: train_curve(dataclasses.replace(cfg, precision=p), args.bf16_check_steps)
           for p in ("float32", "bf16")}
    f32, b16 = (np.array(out[p]["losses"])[:, 0] for p in ("float32", "bf16"))
    out["max_abs_loss_diff"] = float(np.abs(f32 - b16).max())
    out["config"] = (f"{cfg.arch} x{cfg.width:g}, batch {cfg.batch_size}, digits at "
                     f"{cfg.image_size}px")
    return out


# --------------------------------------------------------------------------------------- report

def report(args, results) -> str:
    f = results["flops"]
    lines = [f"CPU: {results['cpu']}; TF {tf.__version__}, Keras {keras.__version__}; "
             f"{args.arch}, batch {args.batch_size}, {args.image_size}x{args.image_size}; "
             f"median of {args.rounds} interleaved rounds after {args.warmup} warm-up.", ""]
    lines += ["| width | precision | SimCLR img/s | CLAE img/s | CLAE/SimCLR time: ratio of "
              "medians (median of per-round ratios; IQR) | of best rounds | of CPU time | "
              "CLAE GFLOP/s | "
              "matmul GFLOP/s | CLAE / matmul | SimCLR / matmul | bf16 speed-up SimCLR, CLAE | "
              "load 1-min (min/med/max) |",
              "|---" * 13 + "|"]
    for r in results["steps"]:
        speed = (f"{r['bf16_speedup_simclr']:.2f}x, {r['bf16_speedup_clae']:.2f}x"
                 if "bf16_speedup_clae" in r else "-")
        lines.append(
            f"| x{r['width']:g} | {r['precision']} | {r['simclr_img_s']:.1f} | "
            f"{r['clae_img_s']:.1f} | **{r['ratio']:.3f}** ({r['ratio_round_median']:.3f}; "
            f"{r['ratio_round_iqr'][0]:.2f}-{r['ratio_round_iqr'][1]:.2f}) | "
            f"{r['ratio_best']:.3f} | {r['ratio_cpu']:.3f} | {r['clae_gflops']:.1f} | "
            f"{r['matmul_gflops']:.1f} | "
            f"{100 * r['clae_vs_matmul']:.0f}% | {100 * r['simclr_vs_matmul']:.0f}% | {speed} | "
            f"{r['load'][0]:.1f}/{r['load'][1]:.1f}/{r['load'][2]:.1f} |")
    lines.append("")
    for width, fw in f.items():
        sf = step_flops(fw)
        lines.append(f"FLOPs per image, x{width:g}: forward {fw['forward'] / 1e9:.4f} G "
                     f"(tf.compat.v1 profiler: {fw['profiler'] / 1e9:.4f} G), SimCLR step "
                     f"{sf['simclr'] / 1e9:.3f} G, CLAE step {sf['clae'] / 1e9:.3f} G, "
                     f"arithmetic ratio {sf['ratio']:.3f}.")
    if "pipeline" in results and results["steps"]:
        p = results["pipeline"]
        fastest = max(results["steps"], key=lambda r: r["clae_img_s"])
        cpu_per_1k = 1000 * fastest["clae_cpu_s"] / args.batch_size
        lines.append(
            f"Input pipeline alone: {p['img_s']:.0f} img/s, {p['cpu_s_per_1k_img']:.2f} CPU-s per "
            f"1000 images (load {p['load']:.1f}). The fastest CLAE step above (x"
            f"{fastest['width']:g} {fastest['precision']}) consumes {fastest['clae_img_s']:.1f} "
            f"img/s, {cpu_per_1k:.1f} CPU-s per 1000 images: pipeline/step = "
            f"{p['img_s'] / fastest['clae_img_s']:.1f}x by wall clock, "
            f"{cpu_per_1k / p['cpu_s_per_1k_img']:.1f}x by CPU time.")
    for key, prof in results.get("profile", {}).items():
        lines += ["", f"Op-level time of one step ({key}; seconds summed over the ops of a "
                  f"group, median of {args.profile_reps} interleaved profiled steps):", "",
                  "| op group | SimCLR s | CLAE s | CLAE / SimCLR |", "|---|---|---|---|"]
        for group in list(prof["simclr"]) + ["total"]:
            a = sum(prof["simclr"].values()) if group == "total" else prof["simclr"][group]
            b = sum(prof["clae"].values()) if group == "total" else prof["clae"][group]
            lines.append(f"| {group} | {a:.3f} | {b:.3f} | {b / a if a else float('nan'):.2f} |")
        lines.append("")
    if "bf16_check" in results:
        c = results["bf16_check"]
        f32, b16 = c["float32"]["losses"], c["bf16"]["losses"]
        picks = sorted(set([0, len(f32) // 4, len(f32) // 2, 3 * len(f32) // 4, len(f32) - 1]))
        lines.append(f"bf16 check ({c['config']}, {len(f32)} CLAE steps, same seed/data/init): "
                     "loss float32 -> bf16 at steps " + ", ".join(
                         f"{i + 1}: {f32[i][0]:.4f} -> {b16[i][0]:.4f}" for i in picks)
                     + f"; max |diff| {c['max_abs_loss_diff']:.4f}. |x_adv - x| = eps for "
                     f"{100 * c['bf16']['delta_is_eps']:.2f}% of logged pixels in bf16 "
                     f"({100 * c['float32']['delta_is_eps']:.2f}% float32), 0 for "
                     f"{100 * c['bf16']['delta_is_zero']:.2f}%, max |delta|/eps "
                     f"{c['bf16']['delta_max_over_eps']:.4f}.")
    for m in results.get("memory", []):
        lines.append(f"Peak RSS of a CLAE run (x{m['width']:g}, {m['precision']}, batch "
                     f"{args.batch_size}, fed by the pipeline): {m['peak_rss_mb']:.0f} MB "
                     f"({m['rss_before_steps_mb']:.0f} MB before the first step; ru_maxrss "
                     f"{m['ru_maxrss_mb']:.0f} MB)"
                     + (f", GPU peak {m['gpu_peak_mb']:.0f} MB" if "gpu_peak_mb" in m else "")
                     + ".")
    return "\n".join(lines)


FULL = dict(arch="resnet18", widths="1,0.25", batch_size=256, rounds=10, warmup=1,
            matmul_size=4096, pipeline_batches=20, memory_widths="1", memory_steps=3,
            bf16_check_steps=30)
# Smaller everything (ResNet-10: half the layers, so half the tracing time).
QUICK = dict(arch="resnet10", widths="0.25", batch_size=64, rounds=5, warmup=1,
             matmul_size=2048, pipeline_batches=5, memory_widths="0.25", memory_steps=2,
             bf16_check_steps=0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", help=f"default {FULL['arch']} ({QUICK['arch']} with --quick)")
    p.add_argument("--widths", help="comma-separated width multipliers")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--precisions", default="float32,bf16")
    p.add_argument("--rounds", type=int, help="timed interleaved rounds (0: no step timing)")
    p.add_argument("--warmup", type=int, help="untimed rounds after the tracing call")
    p.add_argument("--matmul_size", type=int, help="n of the n x n x n reference matmul")
    p.add_argument("--pipeline_batches", type=int)
    p.add_argument("--memory_widths", help="widths of the memory subprocess runs; '' to skip")
    p.add_argument("--memory_steps", type=int)
    p.add_argument("--quick", action="store_true",
                   help=f"under 2 minutes: {', '.join(f'{k}={v}' for k, v in QUICK.items())} "
                        f"unless given")
    p.add_argument("--bf16_check_steps", type=int,
                   help="CLAE steps of the float32-vs-bf16 training check (0: skip)")
    p.add_argument("--profile", action="store_true",
                   help="also print the op-level time of one SimCLR and one CLAE step per "
                        "width and precision (tf.profiler)")
    p.add_argument("--profile_reps", type=int, default=5,
                   help="profiled steps of each kind (interleaved; median per op group)")
    p.add_argument("--inter_op_threads", type=int, default=0,
                   help="tf.config.threading inter-op threads (0: TF's default)")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.widths = [float(w) for w in args.widths.split(",") if w]
    args.precisions = [x for x in args.precisions.split(",") if x]
    args.memory_widths = [float(w) for w in args.memory_widths.split(",") if w]
    for prec in args.precisions:
        if prec not in POLICIES:
            p.error(f"--precisions: unknown {prec!r}; choose from {', '.join(POLICIES)}")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_memory_child":
        return memory_child(argv[1:])
    args = parse_args(argv)
    if args.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    t0 = time.time()
    results = {"cpu": cpu_model(), "flops": {}, "steps": [], "args": vars(args)}
    # The memory subprocesses run while this process traces (nothing is timed then), and are
    # waited for before the first timed round.
    results["memory"] = []
    memory = threading.Thread(target=lambda: results["memory"].extend(
        bench_memory(args, w, "float32") for w in args.memory_widths))
    memory.start()
    if not args.rounds:
        memory.join()
    for width in (args.widths if args.rounds else []):
        cfg = make_config(args.arch, width, args.batch_size, args.image_size, False)
        results["flops"][width] = forward_flops(cfg)
        fns = build_width(args, width)
        memory.join()
        print(f"[{time.time() - t0:.0f}s] x{width:g} built; timing", flush=True)
        results["steps"] += bench_width(args, width, step_flops(results["flops"][width]), fns)
        del fns
        print(f"[{time.time() - t0:.0f}s] width x{width:g} done (load {load():.1f})", flush=True)
    results["pipeline"] = bench_pipeline(args)
    print(f"[{time.time() - t0:.0f}s] pipeline done", flush=True)
    if args.profile:
        results["profile"] = {f"x{w:g} {p}": bench_profile(args, w, p)
                              for w in args.widths for p in args.precisions}
        print(f"[{time.time() - t0:.0f}s] profiles done", flush=True)
    if args.bf16_check_steps:
        results["bf16_check"] = bf16_check(args)
        print(f"[{time.time() - t0:.0f}s] bf16 check done", flush=True)
    text = report(args, results)
    print(text)
    print(f"[{time.time() - t0:.0f}s total]")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
