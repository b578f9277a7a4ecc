"""What only a GPU shows, in one run: mixed precision and XLA against float32, step and attack
throughput at the paper's CIFAR size, and the host input pipeline beside them.

    python bench/gpu_check.py                          # one H100-class GPU: ~5-8 minutes
    python bench/gpu_check.py --out=h100.json --budget_s=900 --square_queries=0
    python bench/gpu_check.py --sections=precision,xla # only (a) and (b)
    python bench/gpu_check.py --smoke                  # tiny everything: this script's CPU test

Every section is a key of the JSON (--out) and a paragraph of the summary on stdout. An entry
is numbers, or the string "skipped: <reason>", or "error: <exception>" (the run goes on; the
traceback goes to stderr). The exit status is 1 if any check fails or any part raises
(--smoke: only if a part raises).

The model and step are the package's: builders.build_model, optim.build_optimizer,
train_step.make_train_step (contrastive.build: SimCLR's NT-Xent, CLAE = SimCLR + --adversarial
with the paper's FGSM) under tf.function, with the Config of --arch/--width/--batch_size/
--image_size (default ResNet-18 x1, batch 512, 32 px: the paper's CIFAR setting). The optimizer
is SGD (lr 0.05, momentum 0.9) with weight decay 5e-4, as tests/precision_test.py: its first
update is -lr (g + wd w), so comparing updates compares gradients (Adam's first update is
lr * g / |g|, a sign, which hides gradient errors). The batch is the first batch of the real
pretraining stream (streams.pretrain_dataset) of the bundled digits at --image_size.

  precision  (a) One CLAE step from the same initial weights, optimizer state and batch in
             float32, bf16 (Keras mixed_bfloat16) and fp16 (mixed_float16 + the dynamic loss
             scale of optim.build_optimizer). The reference is STRICT float32: on a GPU, TF32
             is switched off for that one call (TF's default TF32 runs float32 matmuls and
             convolutions with a 10-bit mantissa; its own difference from strict float32 is
             the row "float32_tf32", information, no pass/fail). Per precision: loss_rel_diff
             |L - L32| / |L32|; update_rel_diff |dw - dw32| / |dw32| over the trainable weights
             (dw = the step's change of the weights); weights_rel_diff |w - w32| / |w32| after
             the step; update_cosine; perturbed_fraction (logged pixels with |x_adv - x| >
             eps/2; a gradient that underflows leaves a pixel unperturbed). fp16 also reports
             the loss scale before and after, whether it is finite, and the steps it skipped:
             a step whose scaled gradients overflow is skipped and the scale halved; it is
             then rerun from the same state with the lowered scale (up to --fp16_tries calls).
             Pass: finite loss and weights, loss_rel_diff and update_rel_diff within
             TOLERANCES[precision], perturbed_fraction at least float32's - 0.05, and for fp16
             a finite scale and an applied step.
  xla        (b) One CLAE float32 step with --jit_compile from the same state against the step
             without it, both in TF's default TF32 mode (a run's mode), the same differences as
             (a); "float32_repeat" is the same non-XLA step run twice from the same state, the
             noise floor of the GPU's non-deterministic kernels. Pass: within
             TOLERANCES["xla_tf32"] when TF32 is on, TOLERANCES["xla"] otherwise. Also the
             first call (trace + compile + step) and step time of each.
  throughput (c) SimCLR and CLAE steps, float32 / bf16 / fp16, XLA off / on: images/s =
             batch / median step time, after the first call and --warmup steps, over --rounds
             rounds of --steps steps on the same device-resident batch (one host sync per
             round); first_call_s, and the GPU's peak memory of the case. The cases of (a) and
             (b) are timed where they are built; the others run after (d) and (e) in order of
             interest and are skipped once --budget_s is spent.
  pipeline   (d) Pairs of views per second of the real pretraining stream (streams.
             pretrain_stream: crop, flip, jitter, grayscale, normalise; tf.data on all the
             host's cores) at --batch_size, over a folder of generated --image_size PNGs written
             to a temporary directory (the square in-memory path CIFAR takes) and over the
             bundled digits (8 px images cropped one by one, then resized); no network. Also
             the ratio to the fastest CLAE step of (c).
  attacks    (e) The robust evaluation's attacks as robust.py runs them (attacks.pgd_until_fooled
             as pgd20: 20 steps of eps/4 from a random start; attacks.apgd with the CE loss;
             attacks.square_linf; the refill engine with --attack_batch slots over pools of
             robust.POOL_BATCHES batches) on robust.classifier(encoder, linear probe): a
             randomly initialised float32 encoder of the same arch and width and a random probe
             on h, labels = its own clean predictions (every image is attacked),
             --attack_images random images, eps --attack_eps/255. images/s of the second full pass
             (the first traces and autotunes); the fraction fooled and the model passes per
             image (robust_speed.Counted) say how much of the budget early exits saved.
"""

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.dirname(BENCH))

import benchmark  # noqa: E402  (bench/benchmark.py: the Keras policies, the CPU's name)
import robust_speed  # noqa: E402  (bench/robust_speed.py: Counted, a model-call counter)

from clae_tf.data import sources, streams  # noqa: E402
from clae_tf.evaluation import robust  # noqa: E402
from clae_tf.method import attacks, builders, contrastive, optim, train_step  # noqa: E402
from clae_tf.runtime.config import Config  # noqa: E402

POLICIES = {**benchmark.POLICIES, "fp16": "mixed_float16"}
PRECISIONS = ("float32", "bf16", "fp16")
SECTIONS = ("precision", "xla", "throughput", "pipeline", "attacks")
# Relative differences from the float32 step that pass (module docstring). The update's error
# is dominated by FGSM: rounding flips the sign of the input gradient where it is near 0, which
# changes the adversarial view and so the adversarial branch's gradient. Measured with this
# script on a CPU (ResNet-10 x1/16, 16 px): batch 16, fp16 0.084 (pixel signs agree 98.4%),
# bf16 0.215 (88.5%); batch 8 (--smoke), fp16 0.31, bf16 0.52; tests/precision_test.py's
# config (projection 16, batch 16) measures fp16 0.025. A wider model and a larger batch
# average more, so the bounds below are about twice the batch-16 numbers; a broken step (no
# update, an unapplied or doubled scale, underflowed gradients) is off by ~1 or more. The loss
# is a mean over the batch: within 0.1-0.5% in every case above. XLA in strict float32 only
# reorders arithmetic (tests/precision_test.py: 1e-5 and 1e-3, measured 1.4e-7 and 1.7e-6; this
# script on a CPU: 1.7e-7 and 4.4e-6), here with room for a GPU's non-deterministic kernels;
# with TF32 on, XLA's and cuDNN's convolutions each round to TF32 in their own order: fp16's
# bounds. --smoke prints its verdicts but they do not set the exit status (the bounds are for
# the full-size step, not a tiny model at batch 8); errors do.
TOLERANCES = {
    "fp16": {"loss_rel_diff": 1e-2, "update_rel_diff": 0.15},
    "bf16": {"loss_rel_diff": 2e-2, "update_rel_diff": 0.4},
    "xla": {"loss_rel_diff": 1e-4, "update_rel_diff": 1e-2},
    "xla_tf32": {"loss_rel_diff": 1e-2, "update_rel_diff": 0.15},
}
PERTURBED_SLACK = 0.05  # perturbed_fraction may be this much below float32's

FULL = dict(arch="resnet18", width=1.0, batch_size=512, image_size=32, warmup=3, rounds=3,
            steps=5, pipeline_batches=10, pipeline_images=2048, attack_images=1000,
            attack_batch=500, apgd_steps=100, square_queries=100, budget_s=360.0)
SMOKE = dict(arch="resnet10", width=0.0625, batch_size=8, image_size=16, warmup=1, rounds=1,
             steps=2, pipeline_batches=2, pipeline_images=32, attack_images=8, attack_batch=8,
             apgd_steps=5, square_queries=10, budget_s=0.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check.json", help="the JSON results")
    p.add_argument("--smoke", action="store_true",
                   help="tiny everything (" + ", ".join(f"{k}={v}" for k, v in SMOKE.items())
                        + " unless given): a CPU test of this script, well under a minute")
    p.add_argument("--cpu_all", action="store_true",
                   help="on a CPU, also run the fp16 and XLA parts (slow; tests this script)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma list of " + ", ".join(SECTIONS))
    p.add_argument("--arch", help=f"default {FULL['arch']}")
    p.add_argument("--width", type=float, help=f"default {FULL['width']}")
    p.add_argument("--batch_size", type=int, help=f"default {FULL['batch_size']}")
    p.add_argument("--image_size", type=int, help=f"default {FULL['image_size']}")
    p.add_argument("--warmup", type=int, help="untimed steps after the first call")
    p.add_argument("--rounds", type=int, help="timed rounds (median)")
    p.add_argument("--steps", type=int, help="steps per timed round")
    p.add_argument("--pipeline_batches", type=int, help="timed batches of the input pipeline")
    p.add_argument("--pipeline_images", type=int, help="generated training images")
    p.add_argument("--attack_images", type=int, help="images attacked")
    p.add_argument("--attack_batch", type=int, help="images per model call of the attacks")
    p.add_argument("--attack_eps", type=float, default=8.0, help="L-inf radius in 1/255")
    p.add_argument("--apgd_steps", type=int, help="APGD-CE iterations (0: skip)")
    p.add_argument("--square_queries", type=int, help="Square queries per image (0: skip)")
    p.add_argument("--fp16_tries", type=int, default=8,
                   help="fp16: calls of the first step from the same state while the loss "
                        "scale overflows")
    p.add_argument("--budget_s", type=float,
                   help="seconds after which the throughput cases not yet built are skipped "
                        "(0: no limit)")
    p.add_argument("--no_tf32", action="store_true",
                   help="switch TF32 off for the whole run (strict float32 everywhere)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for k, v in (SMOKE if args.smoke else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.sections = [s for s in args.sections.split(",") if s]
    for s in args.sections:
        if s not in SECTIONS:
            p.error(f"--sections: unknown {s!r}; choose from {', '.join(SECTIONS)}")
    return args


# ------------------------------------------------------------------------------------ helpers

class Clock:
    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self) -> bool:
        return bool(self.budget_s) and self.elapsed() > self.budget_s

    def log(self, text: str):
        print(f"[{self.elapsed():5.0f} s] {text}", flush=True)


def error_text(e: BaseException) -> str:
    traceback.print_exc(file=sys.stderr)
    return f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]


@contextlib.contextmanager
def policy(precision: str):
    """Keras' global dtype policy of `precision` (layers take it when built, steps when traced)."""
    keras.mixed_precision.set_global_policy(POLICIES[precision])
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 execution switched for the calls inside (non-XLA kernels read it when they run)."""
    before = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(enabled)
    try:
        yield
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(before)


def device_info() -> dict:
    gpus = tf.config.list_physical_devices("GPU")
    info = {"physical_devices": [f"{d.name} ({d.device_type})"
                                 for d in tf.config.list_physical_devices()],
            "gpu": None, "compute_capability": None, "cpu": benchmark.cpu_model(),
            "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "tf32_enabled": tf.config.experimental.tensor_float_32_execution_enabled()}
    build = tf.sysconfig.get_build_info()
    info["cuda_build"] = {k: str(build[k]) for k in ("cuda_version", "cudnn_version")
                          if k in build}
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        info["gpu"] = details.get("device_name", gpus[0].name)
        cc = details.get("compute_capability")
        info["compute_capability"] = list(cc) if cc else None
        info["gpu_count"] = len(gpus)
    return info


def rel(a, b) -> float:
    """|a - b| / |b| (inf when b is 0 and a is not)."""
    num, den = abs(float(a) - float(b)), abs(float(b))
    return num / den if den else (0.0 if num == 0 else math.inf)


def norm(arrays) -> float:
    return math.sqrt(sum(float(np.sum(np.square(a))) for a in arrays))


# ------------------------------------------------------------------------------------ the step

def make_cfg(args, adversarial: bool, precision: str = "float32", jit: bool = False,
             dataset: str = "digits") -> Config:
    return Config(arch=args.arch, width=args.width, batch_size=args.batch_size,
                  image_size=args.image_size, adversarial=adversarial, precision=precision,
                  jit_compile=jit, optimizer="sgd", learning_rate=0.05, weight_decay=5e-4,
                  dataset=dataset, seed=args.seed)


class Case:
    """A model, its optimizer and its compiled train step (train_step.make_train_step under
    tf.function), and the state they start from, to rerun a step from it."""

    def __init__(self, cfg: Config, weights=None):
        self.cfg = cfg
        with policy(cfg.precision):
            keras.utils.set_random_seed(cfg.seed)
            self.model = builders.build_model(cfg)
            if weights is not None:
                self.model.set_weights(weights)
            self.optimizer = optim.build_optimizer(cfg, 1, 1)
            self.optimizer.build(self.model.trainable_variables)
            self.step = tf.function(train_step.make_train_step(
                self.model, self.optimizer, cfg, 1, contrastive.build(cfg, self.model)))
        self.weights0 = self.model.get_weights()
        self.trainable0 = [v.numpy().astype(np.float64) for v in self.model.trainable_variables]
        self.optimizer0 = [v.numpy() for v in self.optimizer.variables]
        self.first_call_s = None

    @property
    def scale(self):
        """The fp16 loss scale variable, or None."""
        return getattr(self.optimizer, "dynamic_scale", None)

    def restore(self, keep_scale: bool = False):
        """The model and optimizer as built (keep_scale: the loss scale as it is now)."""
        self.model.set_weights(self.weights0)
        for v, value in zip(self.optimizer.variables, self.optimizer0):
            if not (keep_scale and v is self.scale):
                v.assign(value)

    def __call__(self, x1, x2):
        with policy(self.cfg.precision):  # a retrace, if any, under the case's policy
            start = time.perf_counter()
            out = self.step(x1, x2)
            if self.first_call_s is None:
                float(out[0]["loss"])
                self.first_call_s = time.perf_counter() - start
            return out


def one_step(case: Case, x1, x2) -> dict:
    """The loss, weights and logged images of one step from the state the case holds now."""
    scale_before = float(case.scale.numpy()) if case.scale is not None else None
    start = time.perf_counter()
    metrics, images, _ = case(x1, x2)
    loss = float(metrics["loss"])
    seconds = time.perf_counter() - start
    delta = images["x_adv"].numpy() - images["x"].numpy()
    out = {"loss": loss, "seconds": seconds, "delta": delta,
           "weights": [v.numpy().astype(np.float64) for v in case.model.trainable_variables],
           "applied": int(case.optimizer.iterations.numpy()) == 1,
           "perturbed_fraction": float(np.mean(np.abs(delta) > case.cfg.eps / 2))}
    if scale_before is not None:
        out["loss_scale_before"] = scale_before
        out["loss_scale_after"] = float(case.scale.numpy())
    return out


def compare(ref: dict, other: dict, weights0) -> dict:
    """Differences of `other`'s step from `ref`'s, both from weights0 (module docstring)."""
    d_ref = [w - w0 for w, w0 in zip(ref["weights"], weights0)]
    d_other = [w - w0 for w, w0 in zip(other["weights"], weights0)]
    n_ref, n_other = norm(d_ref), norm(d_other)
    dot = sum(float(np.sum(a * b)) for a, b in zip(d_ref, d_other))
    return {
        "loss": other["loss"], "loss_ref": ref["loss"],
        "loss_rel_diff": rel(other["loss"], ref["loss"]),
        "update_rel_diff": (norm([a - b for a, b in zip(d_other, d_ref)]) / n_ref
                            if n_ref else math.inf),
        "update_cosine": dot / (n_ref * n_other) if n_ref and n_other else 0.0,
        "weights_rel_diff": norm([a - b for a, b in zip(other["weights"], ref["weights"])])
        / norm(ref["weights"]),
        "finite": bool(math.isfinite(other["loss"])
                       and all(np.all(np.isfinite(w)) for w in other["weights"])),
        "perturbed_fraction": other["perturbed_fraction"],
        "perturbed_fraction_ref": ref["perturbed_fraction"],
        # Where both perturb a pixel, how often in the same direction (FGSM's sign of the
        # input gradient: rounding flips it where that gradient is near 0).
        "perturbation_sign_agreement": float(np.mean(
            np.sign(other["delta"]) == np.sign(ref["delta"]))),
    }


def judge(row: dict, tolerance: dict) -> list:
    """The failed checks of a compared row (empty: pass)."""
    failed = [] if row["finite"] else ["non-finite loss or weights"]
    for key, bound in tolerance.items():
        if not row[key] <= bound:
            failed.append(f"{key} {row[key]:.3g} > {bound:g}")
    if row["perturbed_fraction"] < row["perturbed_fraction_ref"] - PERTURBED_SLACK:
        failed.append(f"perturbed_fraction {row['perturbed_fraction']:.3f} < float32's "
                      f"{row['perturbed_fraction_ref']:.3f} - {PERTURBED_SLACK}")
    return failed


def fp16_step(case: Case, x1, x2, tries: int) -> tuple:
    """The first step that applies, rerun from the built state while the scale overflows.
    Returns (the step, the loss scales before each call)."""
    scales = []
    for _ in range(tries):
        case.restore(keep_scale=True)
        result = one_step(case, x1, x2)
        scales.append(result["loss_scale_before"])
        if result["applied"]:
            break
    return result, scales


def time_case(case: Case, x1, x2, args) -> dict:
    """images/s of the case's step on a fixed batch (module docstring, throughput)."""
    out = None
    for _ in range(args.warmup):
        out = case(x1, x2)
    if out is not None:
        float(out[0]["loss"])
    rounds = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for _ in range(args.steps):
            out = case(x1, x2)
        float(out[0]["loss"])  # waits for the round's last step, which needs the ones before
        rounds.append((time.perf_counter() - start) / args.steps)
    step_s = statistics.median(rounds)
    result = {"img_s": args.batch_size / step_s, "step_s": step_s, "step_s_rounds": rounds,
              "first_call_s": case.first_call_s}
    if tf.config.list_logical_devices("GPU"):
        result["gpu_peak_mib"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return result


def reset_gpu_peak():
    if tf.config.list_logical_devices("GPU"):
        tf.config.experimental.reset_memory_stats("GPU:0")


def first_batch(args):
    """The first (x1, x2) of the digits' pretraining stream, on the GPU if there is one."""
    cfg = make_cfg(args, True)
    x1, x2 = next(iter(streams.pretrain_dataset(sources.load(cfg).train, cfg, epoch=0)))
    if tf.config.list_logical_devices("GPU"):
        with tf.device("/GPU:0"):
            x1, x2 = tf.identity(x1), tf.identity(x2)
    return x1, x2


# ------------------------------------------------------------------------------- the sections

class Check:
    """The run's state: arguments, clock, results and the reasons parts are skipped."""

    def __init__(self, args):
        self.args = args
        self.clock = Clock(args.budget_s)
        self.gpu = bool(tf.config.list_physical_devices("GPU"))
        self.results = {"device": device_info(), "args": vars(args)}
        self.failures = []  # checks outside their tolerances
        self.errors = []  # parts that raised
        cc = self.results["device"]["compute_capability"]
        self.old_gpu = self.gpu and cc is not None and cc[0] < 8
        cpu_note = "--cpu_all runs it here"
        self.skip = {
            "fp16": (None if self.gpu or args.cpu_all else
                     "skipped: no GPU (mixed_float16 is for GPUs; tests/precision_test.py checks "
                     f"it on the CPU; {cpu_note})"),
            "bf16": (f"skipped: GPU of compute capability {cc} has no bfloat16 tensor cores"
                     if self.old_gpu else None),
            "xla": (None if self.gpu or args.cpu_all else
                    "skipped: no GPU (XLA on a CPU is checked for correctness by "
                    f"tests/precision_test.py, not timed; {cpu_note})"),
        }
        self.throughput = {m: {p: {"xla_off": "skipped: not run", "xla_on": "skipped: not run"}
                               for p in PRECISIONS} for m in ("simclr", "clae")}
        self.timed = set()

    def case_skip(self, precision: str, jit: bool):
        return self.skip.get(precision) or (self.skip["xla"] if jit else None)

    def verdict(self, label: str, row: dict, failed: list, case: Case, head: str) -> dict:
        """`row` with its first-call time and pass/fail, logged as `head` + the update
        difference + the verdict; a failure is also kept for the exit status."""
        row["first_call_s"] = case.first_call_s
        row["pass"], row["failed"] = not failed, failed
        self.clock.log(f"{head}, update rel. diff {row['update_rel_diff']:.2e}: "
                       f"{'pass' if not failed else 'FAIL ' + '; '.join(failed)}")
        if failed:
            self.failures.append(f"{label}: {'; '.join(failed)}")
        return row

    def record_time(self, method: str, precision: str, jit: bool, case: Case, x1, x2):
        key = "xla_on" if jit else "xla_off"
        self.timed.add((method, precision, jit))
        if "throughput" not in self.args.sections:
            self.throughput[method][precision][key] = "skipped: not selected (--sections)"
            return
        try:
            self.throughput[method][precision][key] = time_case(case, x1, x2, self.args)
            r = self.throughput[method][precision][key]
            self.clock.log(f"  {method} {precision} XLA {key[4:]}: {r['img_s']:.0f} img/s "
                           f"(first call {r['first_call_s']:.1f} s)")
        except Exception as e:  # recorded; the run goes on
            self.throughput[method][precision][key] = error_text(e)

    # (a) and (b) -------------------------------------------------------------------------

    def precision_and_xla(self, x1, x2):
        args = self.args
        want_a, want_b = "precision" in args.sections, "xla" in args.sections
        reset_gpu_peak()
        ref = Case(make_cfg(args, True))
        default = one_step(ref, x1, x2)  # TF's TF32 default: cuDNN autotunes in the run's mode
        tf32_on = tf.config.experimental.tensor_float_32_execution_enabled()
        precision = {"reference": "float32, TF32 off (strict)" if self.gpu else "float32",
                     "tolerances": {p: TOLERANCES[p] for p in ("bf16", "fp16")},
                     "perturbed_slack": PERTURBED_SLACK}
        if self.gpu and tf32_on:
            ref.restore()
            with tf32(False):
                strict = one_step(ref, x1, x2)
            precision["float32_tf32"] = compare(strict, default, ref.trainable0)
        else:
            strict = default
            precision["float32_tf32"] = ("skipped: TF32 is off (--no_tf32)" if self.gpu else
                                         "skipped: no GPU (TF32 is a mode of NVIDIA Ampere and "
                                         "later GPUs)")
        ref.restore()
        repeat = one_step(ref, x1, x2)
        self.clock.log(f"float32 CLAE step: loss {strict['loss']:.5f} (first call "
                       f"{ref.first_call_s:.1f} s)")
        self.record_time("clae", "float32", False, ref, x1, x2)
        weights0, init = ref.trainable0, ref.weights0
        del ref

        for p in ("bf16", "fp16") if want_a else ():
            precision[p] = self.case_skip(p, False)
            if precision[p]:
                continue
            try:
                reset_gpu_peak()
                case = Case(make_cfg(args, True, p), init)
                if p == "fp16":
                    result, scales = fp16_step(case, x1, x2, args.fp16_tries)
                else:
                    result, scales = one_step(case, x1, x2), None
                row = compare(strict, result, weights0)
                failed = judge(row, TOLERANCES[p])
                if scales is not None:
                    row.update(loss_scale_initial=scales[0], loss_scales_tried=scales,
                               loss_scale_after=result["loss_scale_after"],
                               skipped_steps=len(scales) - int(result["applied"]),
                               step_applied=result["applied"],
                               loss_scale_finite=math.isfinite(result["loss_scale_after"])
                               and result["loss_scale_after"] > 0,
                               loss_scale_updated=result["loss_scale_after"] != scales[0])
                    if not row["step_applied"]:
                        failed.append(f"no step applied in {args.fp16_tries} tries")
                    if not row["loss_scale_finite"]:
                        failed.append("loss scale not finite and positive")
                precision[p] = self.verdict(f"precision {p}", row, failed, case,
                                            f"{p}: loss {row['loss']:.5f}")
                case.restore()
                self.record_time("clae", p, False, case, x1, x2)
                del case
            except Exception as e:
                precision[p] = error_text(e)
                self.errors.append(f"precision {p}: {precision[p]}")
        if want_a:
            self.results["precision"] = precision

        if not want_b:
            return
        xla = {"mode": "TF32 on (TF's default)" if self.gpu and tf32_on else "strict float32",
               "float32_repeat": compare(default, repeat, weights0)}
        key = "xla_tf32" if self.gpu and tf32_on else "xla"
        xla["tolerances"] = TOLERANCES[key]
        if self.skip["xla"]:
            xla["xla_vs_no_xla"] = self.skip["xla"]
            self.results["xla"] = xla
            return
        try:
            reset_gpu_peak()
            case = Case(make_cfg(args, True, jit=True), init)
            row = compare(default, one_step(case, x1, x2), weights0)
            failed = judge(row, TOLERANCES[key])
            xla["xla_vs_no_xla"] = self.verdict(
                "xla", row, failed, case, f"XLA: loss rel. diff {row['loss_rel_diff']:.2e}")
            case.restore()
            self.record_time("clae", "float32", True, case, x1, x2)
            del case
        except Exception as e:
            xla["xla_vs_no_xla"] = error_text(e)
            self.errors.append(f"xla: {xla['xla_vs_no_xla']}")
        self.results["xla"] = xla

    # (c) ---------------------------------------------------------------------------------

    def remaining_throughput(self, x1, x2):
        """The (c) cases (a) and (b) did not build, in order of interest, within the budget."""
        order = ([("simclr", p, False) for p in PRECISIONS]
                 + [("clae", p, False) for p in PRECISIONS]
                 + [("clae", p, True) for p in PRECISIONS]
                 + [("simclr", p, True) for p in PRECISIONS])
        for method, p, jit in order:
            if (method, p, jit) in self.timed:
                continue
            key = "xla_on" if jit else "xla_off"
            reason = self.case_skip(p, jit)
            if reason:
                self.throughput[method][p][key] = reason
                continue
            if self.clock.spent():
                self.throughput[method][p][key] = (
                    f"skipped: time budget (--budget_s={self.args.budget_s:g}) spent")
                continue
            try:
                reset_gpu_peak()
                case = Case(make_cfg(self.args, method == "clae", p, jit))
                case(x1, x2)  # traces (and compiles) under the case's policy
                self.record_time(method, p, jit, case, x1, x2)
                del case
            except Exception as e:
                self.throughput[method][p][key] = error_text(e)

    def throughput_summary(self):
        out = {"config": f"{self.args.arch} x{self.args.width:g}, batch {self.args.batch_size}, "
                         f"{self.args.image_size} px, SGD",
               "timing": f"median of {self.args.rounds} rounds of {self.args.steps} steps after "
                         f"the first call and {self.args.warmup} warm-up steps",
               "results": self.throughput, "clae_over_simclr_time": {}}
        for p in PRECISIONS:
            for key in ("xla_off", "xla_on"):
                s, c = self.throughput["simclr"][p][key], self.throughput["clae"][p][key]
                if isinstance(s, dict) and isinstance(c, dict):
                    out["clae_over_simclr_time"][f"{p} {key}"] = c["step_s"] / s["step_s"]
        for method in ("simclr", "clae"):
            for p in PRECISIONS:
                for key in ("xla_off", "xla_on"):
                    v = self.throughput[method][p][key]
                    if isinstance(v, str) and v.startswith("error"):
                        self.errors.append(f"throughput {method} {p} {key}: {v}")
        self.results["throughput"] = out

    # (d) ---------------------------------------------------------------------------------

    def pipeline(self):
        args = self.args
        out = {"batch_size": args.batch_size, "image_size": args.image_size,
               "cpu_cores_usable": self.results["device"]["cpu_cores_usable"]}
        with tempfile.TemporaryDirectory(prefix="gpu_check_images_") as root:
            try:
                write_folder(root, args.pipeline_images, args.image_size, args.seed)
                cfg = make_cfg(args, True, dataset=root)
                out["generated_folder"] = dict(
                    pipeline_rate(cfg, sources.load(cfg).train, args),
                    images=args.pipeline_images,
                    what=f"{args.image_size} px PNGs: square batches held in memory (CIFAR's "
                         f"path)")
            except Exception as e:
                out["generated_folder"] = error_text(e)
        try:
            cfg = make_cfg(args, True)
            split = sources.load(cfg).train
            out["digits"] = dict(pipeline_rate(cfg, split, args), images=split.num_examples,
                                 what="8 px digits cropped one by one, resized to "
                                      f"{args.image_size} px")
        except Exception as e:
            out["digits"] = error_text(e)
        for key in ("generated_folder", "digits"):
            if isinstance(out[key], str):
                self.errors.append(f"pipeline {key}: {out[key]}")
        self.results["pipeline"] = out

    def pipeline_ratio(self):
        """The generated folder's pairs/s over the fastest CLAE step's images/s of (c)."""
        clae = [v["img_s"] for p in PRECISIONS for v in self.throughput["clae"][p].values()
                if isinstance(v, dict)]
        pl = self.results["pipeline"]
        if clae and isinstance(pl["generated_folder"], dict):
            pl["fastest_clae_img_s"] = max(clae)
            pl["folder_over_fastest_clae_step"] = pl["generated_folder"]["pairs_s"] / max(clae)

    # (e) ---------------------------------------------------------------------------------

    def attacks(self):
        args = self.args
        out = {"eps_255": args.attack_eps, "images": args.attack_images,
               "batch": args.attack_batch, "model": f"{args.arch} x{args.width:g} float32, "
               "random weights, random linear probe on h"}
        try:
            out.update(attack_rates(args))
        except Exception as e:
            out["error"] = error_text(e)
        for name, v in out.items():
            if isinstance(v, str) and v.startswith("error"):
                self.errors.append(f"attacks {name}: {v}")
        self.results["attacks"] = out


def write_folder(root: str, n: int, size: int, seed: int):
    """n random size x size PNGs as root/train/<class>/ (10 classes) and 10 in root/test/."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("test", 10)):
        for i in range(count):
            folder = os.path.join(root, split, f"c{i % 10}")
            os.makedirs(folder, exist_ok=True)
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            with open(os.path.join(folder, f"{i:06d}.png"), "wb") as f:
                f.write(tf.io.encode_png(image).numpy())


def pipeline_rate(cfg: Config, split, args) -> dict:
    """Pairs of views per second of the pretraining stream over `split` after one batch."""
    steps = 1 + args.pipeline_batches
    stream = streams.pretrain_stream(split, cfg, 0, steps)
    if stream is None:  # not held in memory: one epoch's pipeline
        stream = streams.pretrain_dataset(split, cfg, epoch=0)
    batches = iter(stream)
    next(batches)  # builds the pipeline
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.pipeline_batches):
        x1, x2 = next(batches)
    float(x1[0, 0, 0, 0])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    pairs = args.pipeline_batches * cfg.batch_size
    return {"pairs_s": pairs / wall, "cpu_s_per_1k_pairs": 1000 * cpu / pairs,
            "batches": args.pipeline_batches}


def attack_rates(args) -> dict:
    """images/s of PGD-20, APGD-CE and Square on a random encoder + probe (module docstring)."""
    cfg = make_cfg(args, False)
    keras.utils.set_random_seed(args.seed)
    model = builders.build_model(cfg, adversarial=False)
    h_dim = model(tf.zeros([1, args.image_size, args.image_size, 3]), training=False)[0].shape[-1]
    probe = keras.layers.Dense(10, dtype="float32")
    probe.build((None, h_dim))
    logits_fn = robust.classifier(model, probe, cfg.normalize, "h")
    counted = robust_speed.Counted(logits_fn)
    rng = np.random.default_rng(args.seed)
    shape = (args.image_size, args.image_size, 3)
    x = rng.uniform(0, 1, (args.attack_images, *shape)).astype(np.float32)
    y = np.concatenate([np.argmax(logits_fn(tf.constant(x[i:i + args.attack_batch])).numpy(), 1)
                        for i in range(0, len(x), args.attack_batch)]).astype(np.int32)
    eps = args.attack_eps / 255
    signature = [tf.TensorSpec([None, *shape], tf.float32), tf.TensorSpec([None], tf.int32),
                 tf.TensorSpec([2], tf.int64), tf.TensorSpec([None], tf.int32)]
    box = dict(clip_min=0.0, clip_max=1.0, batch=args.attack_batch)
    fns = {f"pgd{robust.PGD_STEPS}": (robust.PGD_STEPS, lambda xb, yb, seed, ids: attacks.
                                      pgd_until_fooled(counted, xb, yb, eps, robust.PGD_STEPS,
                                                       eps / 4, random_start=True, seed=seed,
                                                       ids=ids, **box)[1])}
    if args.apgd_steps:
        fns["apgd-ce"] = (args.apgd_steps, lambda xb, yb, seed, ids: attacks.apgd(
            counted, xb, yb, eps, args.apgd_steps, seed, norm="linf", loss="ce", ids=ids,
            **box)[1])
    if args.square_queries:
        fns["square"] = (args.square_queries, lambda xb, yb, seed, ids: attacks.square_linf(
            counted, xb, yb, eps, args.square_queries, seed, ids=ids, **box)[1])
    out = {}
    if not args.apgd_steps:
        out["apgd-ce"] = "skipped: --apgd_steps=0"
    if not args.square_queries:
        out["square"] = "skipped: --square_queries=0"
    for name, (budget, fn) in fns.items():
        try:
            compiled = tf.function(fn, input_signature=signature)
            start = time.perf_counter()
            attack_pass(compiled, x, y, args)  # traces, autotunes
            first = time.perf_counter() - start
            counted.images.assign(0)
            start = time.perf_counter()
            fooled = attack_pass(compiled, x, y, args)
            seconds = time.perf_counter() - start
            out[name] = {"budget": budget, "seconds": seconds, "first_pass_s": first,
                         "images_s": len(x) / seconds,
                         "fooled_fraction": float(np.mean(fooled)),
                         "model_passes_per_image": int(counted.images.numpy()) / len(x)}
        except Exception as e:
            out[name] = error_text(e)
    return out


def attack_pass(compiled, x, y, args) -> np.ndarray:
    """fooled (N,) of one attack of all the images, in pools of robust.POOL_BATCHES batches
    (robust.attack_standing's), each image drawing from its own stream (its index)."""
    return np.concatenate([
        compiled(tf.constant(x[start:stop]), tf.constant(y[start:stop]),
                 tf.constant([args.seed, 0], tf.int64), tf.range(start, stop)).numpy()
        for start, stop in robust.pools(len(x), args.attack_batch)])


# ----------------------------------------------------------------------------------- summary

def fmt(v, spec=".3g") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def summary(results: dict) -> str:
    d = results["device"]
    lines = [f"Device: {d['gpu'] or 'no GPU'}"
             + (f" (compute capability {d['compute_capability']})" if d["gpu"] else "")
             + f"; {d['cpu']}; TF {d['tensorflow']}, Keras {d['keras']}; TF32 "
             f"{'on' if d['tf32_enabled'] else 'off'}."]
    for s in ("precision", "xla"):
        if "error" in results.get(s, {}):
            lines += ["", f"({s}: {results[s]['error']})"]
    if "precision" in results and "error" not in results["precision"]:
        pr = results["precision"]
        lines += ["", f"(a) One CLAE step against {pr['reference']} (same weights and batch):"]
        for p in ("bf16", "fp16", "float32_tf32"):
            row = pr.get(p, "skipped: not run")
            if isinstance(row, str):
                lines.append(f"  {p}: {row}")
                continue
            verdict = ("info" if "pass" not in row else "pass" if row["pass"] else
                       "FAIL: " + "; ".join(row["failed"]))
            tol = TOLERANCES.get(p)
            lines.append(f"  {p}: loss {row['loss']:.5f} vs {row['loss_ref']:.5f} (rel. diff "
                         f"{row['loss_rel_diff']:.2e}"
                         + (f", tol {tol['loss_rel_diff']:g}" if tol else "")
                         + f"), update rel. diff {row['update_rel_diff']:.2e}"
                         + (f" (tol {tol['update_rel_diff']:g})" if tol else "")
                         + f", cosine {row['update_cosine']:.4f}, weights rel. diff "
                         f"{row['weights_rel_diff']:.2e}, perturbed {row['perturbed_fraction']:.3f}"
                         f" (same sign {row['perturbation_sign_agreement']:.3f})"
                         + (f"; loss scale {row['loss_scale_initial']:g} -> "
                            f"{row['loss_scale_after']:g}, {row['skipped_steps']} skipped"
                            if "loss_scale_after" in row else "") + f": {verdict}")
    if "xla" in results and "error" not in results["xla"]:
        x = results["xla"]
        lines += ["", f"(b) XLA against no XLA, one CLAE float32 step ({x['mode']}):"]
        r = x["float32_repeat"]
        lines.append(f"  noise floor (same step twice): loss rel. diff {r['loss_rel_diff']:.2e}, "
                     f"update rel. diff {r['update_rel_diff']:.2e}")
        row = x["xla_vs_no_xla"]
        if isinstance(row, str):
            lines.append(f"  {row}")
        else:
            lines.append(f"  XLA: loss rel. diff {row['loss_rel_diff']:.2e} (tol "
                         f"{x['tolerances']['loss_rel_diff']:g}), update rel. diff "
                         f"{row['update_rel_diff']:.2e} (tol "
                         f"{x['tolerances']['update_rel_diff']:g}), first call "
                         f"{row['first_call_s']:.1f} s: "
                         + ("pass" if row["pass"] else "FAIL: " + "; ".join(row["failed"])))
    if "throughput" in results:
        t = results["throughput"]
        lines += ["", f"(c) Step throughput, images/s ({t['config']}; {t['timing']}):", "",
                  "| method | precision | XLA off | XLA on | first call s (off / on) |",
                  "|---|---|---|---|---|"]
        for method in ("simclr", "clae"):
            for p in PRECISIONS:
                cells = [t["results"][method][p][k] for k in ("xla_off", "xla_on")]
                rate = [f"{c['img_s']:.0f}" if isinstance(c, dict) else c for c in cells]
                first = [f"{c['first_call_s']:.1f}" if isinstance(c, dict) else "-"
                         for c in cells]
                lines.append(f"| {method} | {p} | {rate[0]} | {rate[1]} | {' / '.join(first)} |")
        if t["clae_over_simclr_time"]:
            lines.append("CLAE / SimCLR step time: " + ", ".join(
                f"{k} {v:.2f}" for k, v in t["clae_over_simclr_time"].items()))
    if "pipeline" in results:
        pl = results["pipeline"]
        lines += ["", f"(d) Input pipeline, pairs of views/s (batch {pl['batch_size']}, "
                      f"{pl['cpu_cores_usable']} cores):"]
        for key in ("generated_folder", "digits"):
            v = pl[key]
            lines.append(f"  {key}: " + (v if isinstance(v, str) else
                                         f"{v['pairs_s']:.0f} pairs/s, "
                                         f"{v['cpu_s_per_1k_pairs']:.2f} CPU-s per 1000 pairs "
                                         f"({v['what']})"))
        if "folder_over_fastest_clae_step" in pl:
            lines.append(f"  generated folder / fastest CLAE step ({pl['fastest_clae_img_s']:.0f}"
                         f" img/s): {pl['folder_over_fastest_clae_step']:.2f}x")
    if "attacks" in results:
        a = results["attacks"]
        lines += ["", f"(e) Attacks ({a['model']}; {a['images']} images, eps {a['eps_255']:g}/255, "
                      f"batches of {a['batch']}):"]
        for name, v in a.items():
            if isinstance(v, dict):
                lines.append(f"  {name} ({v['budget']}): {v['images_s']:.1f} images/s "
                             f"({v['seconds']:.2f} s; first pass {v['first_pass_s']:.1f} s), "
                             f"fooled {v['fooled_fraction']:.2f}, "
                             f"{v['model_passes_per_image']:.1f} model passes/image")
            elif name in ("error", "apgd-ce", "square") or name.startswith("pgd"):
                lines.append(f"  {name}: {v}")
    for s in SECTIONS:
        if s not in results:
            lines.append(f"({s}: skipped: not selected (--sections))")
    failures, errors = results["failures"], results["errors"]
    smoke = " (--smoke: not counted)" if results["args"]["smoke"] else ""
    lines += ["", "RESULT: " + ("all checks pass" if not failures else
                                f"checks FAILED{smoke}:\n  " + "\n  ".join(failures))]
    if errors:
        lines += ["ERRORS (tracebacks on stderr):\n  " + "\n  ".join(errors)]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.no_tf32:
        tf.config.experimental.enable_tensor_float_32_execution(False)
    check = Check(args)
    clock = check.clock
    clock.log(f"device: {check.results['device']['gpu'] or 'no GPU'}; "
              f"{args.arch} x{args.width:g}, batch {args.batch_size}, {args.image_size} px")
    x1 = x2 = None
    if {"precision", "xla", "throughput"} & set(args.sections):
        x1, x2 = first_batch(args)
    if {"precision", "xla"} & set(args.sections):
        try:
            check.precision_and_xla(x1, x2)
        except Exception as e:  # the float32 reference itself failed
            text = error_text(e)
            for s in ("precision", "xla"):
                if s in args.sections:
                    check.results[s] = {"error": text}
            check.errors.append(f"precision/xla: {text}")
    if "pipeline" in args.sections:
        clock.log("input pipeline")
        check.pipeline()
    if "attacks" in args.sections:
        clock.log("attacks")
        check.attacks()
    if "throughput" in args.sections:
        clock.log("throughput cases")
        check.remaining_throughput(x1, x2)
        check.throughput_summary()
    if "pipeline" in check.results:
        check.pipeline_ratio()
    check.results["elapsed_s"] = clock.elapsed()
    check.results["failures"], check.results["errors"] = check.failures, check.errors
    with open(args.out, "w") as f:
        json.dump(check.results, f, indent=1, default=str)
    print(summary(check.results), flush=True)
    clock.log(f"wrote {args.out}")
    return 1 if check.errors or (check.failures and not args.smoke) else 0


if __name__ == "__main__":
    sys.exit(main())
