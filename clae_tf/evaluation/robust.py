"""Robust accuracy of the frozen encoder + linear probe under a chain of attacks (AutoAttack's way).

The classifier under attack is images in [0, 1] -> normalise (--normalize) -> encoder (clean BNs,
inference mode) -> h (or z, --probe=z) -> the trained linear probe -> logits, attacked end to end.
The attacks live in PIXEL space: an L-inf radius of k/255 of the [0, 1] range (--robust_eps), an
L2 radius in [0, 1]-pixel units (--robust_l2_eps), every adversarial image clipped to [0, 1], so
the numbers mean what they mean in the literature (unlike the training --eps, which is in
normalised units).

The chain (AutoAttack's order and counting, docs/method.md): per norm, the attacks of
--robust_attacks run in order; at each radius an attack runs only on the images that every
earlier attack at that radius, and every attack up to itself at every smaller radius, left
standing. Clean-incorrect images never count as robust. An adversarial image found at a smaller
radius lies in every larger ball (and in [0, 1]), so an image fooled at 2/255 counts as fooled at
8/255: nothing is lost, every row is monotone in eps, and most images of a non-robust encoder
leave the chain at its first attack and radius, which is where the saving is.
robust_top1[attack][eps] is the accuracy after that attack and every one before it: the first
attack's row is that attack alone, and "worst" (after all of them) is the suite's worst case.

The suites (config.ROBUST_SUITES): autoattack is standard AutoAttack (APGD-CE, APGD-T and FAB-T
with 9 targets each, 100 iterations per run, Square with 5,000 queries: its budget is fixed),
fast the same minus FAB-T at the budget flags' smaller defaults (not AutoAttack). Suite holds
the budgets that run (the flags, 0 resolved to the suite's), and results.json's robust_suite
(Suite.describe) says which suite and budget produced the numbers.
"""

import dataclasses
import functools
import time
import zlib

import numpy as np
import tensorflow as tf

from clae_tf import ClaeError
from clae_tf.data import augment, sources
from clae_tf.evaluation import masking
from clae_tf.method import attacks
from clae_tf.runtime import config, signals

PGD_STEPS = 20  # PGD-20, step eps/4, random start (Madry et al. 2018's CIFAR evaluation uses 20)
NO_L2 = ("fgsm", "square")  # attacks without an L2 version: left out of the L2 chain
# The DLR losses need a third-largest logit, the targeted one a fourth (attacks/, as AutoAttack).
MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4}
TARGETED = ("apgd-t", "fab-t")  # one pass per target rank, the same targets (Attacker.set_clean)
# Per norm: the unit of its radii (in [0, 1] pixels) and its results.json keys.
NORMS = {"linf": dict(unit=1 / 255, top1="robust_top1", attacks="robust_attacks",
                      eps="robust_eps"),
         "l2": dict(unit=1.0, top1="robust_top1_l2", attacks="robust_l2_attacks",
                    eps="robust_l2_eps")}


def eps_key(eps: float) -> str:
    """results.json / TensorBoard name of a radius: 1.0 -> "1", 0.5 -> "0.5"."""
    return f"{eps:g}"


@dataclasses.dataclass(frozen=True)
class Suite:
    """What a robust evaluation runs: the --robust_* flags (from_config), which own the defaults,
    the budget flags' 0 resolved to the suite's (Config.robust_budgets).

    attacks: names in chain order (config.ROBUST_ATTACKS, suites expanded); linf_eps: L-inf
    radii in 1/255; l2_eps: L2 radii in [0, 1]-pixel units; apgd_steps: iterations per APGD run;
    targets: APGD-T's and FAB-T's target classes (capped at classes - 1); square_queries:
    Square's budget per image; checks: run the gradient-masking checks (masking.py); fab_steps:
    iterations per FAB-T run (--robust_apgd_steps: AutoAttack runs both 100); spec: what
    --robust_attacks named, suites unexpanded (describe).
    """
    attacks: tuple
    linf_eps: tuple
    l2_eps: tuple
    apgd_steps: int
    targets: int
    square_queries: int
    checks: bool
    fab_steps: int
    spec: str

    @classmethod
    def from_config(cls, cfg) -> "Suite":
        budgets = cfg.robust_budgets
        return cls(cfg.robust_attack_list, cfg.robust_eps_list, cfg.robust_l2_eps_list,
                   budgets["robust_apgd_steps"], budgets["robust_targets"],
                   budgets["robust_square_queries"], cfg.robust_checks,
                   budgets["robust_apgd_steps"],
                   ",".join(item.strip().lower() for item in cfg.robust_attacks.split(",")
                            if item.strip()))

    def standard(self, num_classes: int) -> bool:
        """Whether the chain holds standard AutoAttack: its four attacks at its budgets
        (config.ROBUST_BUDGETS; targets: 9, or every other class when there are fewer, where
        AutoAttack only warns). Other attacks beside them only add to the worst case."""
        steps, targets, queries = (v[0] for v in config.ROBUST_BUDGETS.values())
        return (set(config.ROBUST_SUITES["autoattack"]) <= set(self.attacks)
                and self.apgd_steps == self.fab_steps == steps
                and min(self.targets, num_classes - 1) == min(targets, num_classes - 1)
                and self.square_queries == queries)

    def describe(self, num_classes: int) -> str:
        """results.json's robust_suite: what --robust_attacks named, whether it is standard
        AutoAttack, and each attack with the budget it ran (targets capped at classes - 1), e.g.
        "pgd20,fast (not AutoAttack): pgd20 (20 steps), apgd-ce (100 steps), apgd-t (3 targets x
        100 steps), square (1000 queries; L-inf only)"."""
        targets = min(self.targets, num_classes - 1)
        budget = {"pgd20": f"{PGD_STEPS} steps", "fgsm": "1 step",
                  "apgd-ce": f"{self.apgd_steps} steps", "apgd-dlr": f"{self.apgd_steps} steps",
                  "apgd-t": f"{targets} targets x {self.apgd_steps} steps",
                  "fab-t": f"{targets} targets x {self.fab_steps} steps",
                  "square": f"{self.square_queries} queries; L-inf only"}
        extra = [a for a in self.attacks if a not in config.ROBUST_SUITES["autoattack"]]
        kind = (f"standard AutoAttack{' + ' + ', '.join(extra) if extra else ''}"
                if self.standard(num_classes) else "not AutoAttack")
        return (f"{self.spec} ({kind}): "
                + ", ".join(f"{a} ({budget[a]})" for a in self.attacks))

    def attacks_for(self, norm: str) -> tuple:
        """The attacks the chain of `norm` runs (none without radii)."""
        radii = self.linf_eps if norm == "linf" else self.l2_eps
        if not radii:
            return ()
        return tuple(a for a in self.attacks if norm == "linf" or a not in NO_L2)

    def runs(self) -> bool:
        """Whether there is anything to evaluate (an attack and a radius of some norm)."""
        return any(self.attacks_for(norm) for norm in NORMS)

    def check(self, num_classes: int):
        """Raises the ClaeError of attacks the dataset cannot take (MIN_CLASSES: the DLR losses).

        app.run calls it once per run, as soon as the dataset's classes are known (before
        training); the evaluation after it takes the suite as checked.
        """
        bad = [f"{a} needs {MIN_CLASSES[a]}" for a in self.attacks
               if num_classes < MIN_CLASSES.get(a, 0)]
        if bad:
            raise ClaeError(f"--robust_attacks: the DLR losses need more classes than the "
                            f"{num_classes} of this dataset ({', '.join(bad)}): leave them out, "
                            f"e.g. --robust_attacks=pgd20,apgd-ce,square")


def load_subset(split: sources.Split, n: int):
    """(images float32 in [0, 1] (n, S, S, 3), labels int32 (n,)) of the fixed class-balanced
    subset of n examples (sources.balanced_subset; 0: all)."""
    images, labels, _ = sources.read_balanced(split, n if n > 0 else split.num_examples)
    return images.astype(np.float32) / 255.0, labels.astype(np.int32)


def classifier(model, probe, normalize: str, feature: str = "h"):
    """images in [0, 1] -> logits: normalise, encoder (clean BNs, inference mode), probe on h
    or z."""
    index = {"h": 0, "z": 1}[feature]

    def logits_fn(images01):
        features = model(augment.normalize(images01, normalize), training=False)[index]
        return tf.cast(probe(features), tf.float32)
    return logits_fn


def batch_seed(seed: int, tag: str):
    """The shape-[2] seed of one attack pass: the run's --seed and a hash of the norm, the
    attack, the radius and the pass (the same run draws the same numbers). Each image draws
    from its own stream under it (keyed by its index in the evaluated set), so an image's
    attack does not depend on which images were standing with it."""
    return [int(seed), zlib.crc32(tag.encode()) & 0x7FFFFFFF]


# Images per compiled call, in batches of --eval_batch_size: the refill engine keeps the batch
# full while images wait (attacks/engine.py), and a pool bounds the attacks' memory (state,
# x_adv) and the time between safe points.
POOL_BATCHES = 4


def pools(n: int, batch_size: int):
    """The (start, stop) row ranges of n images that one compiled attack call takes together:
    POOL_BATCHES batches of batch_size each, the last one shorter."""
    size = POOL_BATCHES * batch_size
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def attack_standing(attack_pass, alive, eps, batch_size, seed, tag) -> int:
    """Runs `attack_pass` on the images still standing, marks the fooled ones.

    Args:
      attack_pass: (rows int (n,), eps, seed [2]) -> fooled bool (n,), the model seeing at most
        batch_size images per call (the refill engine's slots).
      alive: bool (N,) numpy mask of the images standing, updated in place.
      eps: the radius in [0, 1]-pixel units; batch_size: images per model call.
      seed, tag: the run's seed and the name of this pass (batch_seed).
    Returns:
      How many images it fooled.
    """
    index = np.flatnonzero(alive)
    for start, stop in pools(len(index), batch_size):
        signals.check()  # a safe point between the compiled calls
        rows = index[start:stop]
        fooled = np.asarray(attack_pass(rows, eps, batch_seed(seed, tag)), bool)
        alive[rows[fooled]] = False
    return int(len(index) - np.count_nonzero(alive[index]))


def run_chain(steps, clean, radii, unit, batch_size=500, seed=0, tag="", log=None):
    """The chain of one norm (module docstring): each attack in order, each radius in increasing
    order, each on the images still standing.

    Args:
      steps: [(attack name, [attack_pass, ...])]: an attack's passes run one after the other
        (APGD-T: one per target rank), each on what the one before left (attack_standing).
      clean: bool (N,) the images classified correctly clean.
      radii: the radii in the flag's units; unit: their size in [0, 1] pixels (1/255 for L-inf).
      batch_size, seed, tag: as attack_standing (tag names the norm).
      log: optional callable taking two progress lines per attack: when it starts (the images
        it attacks at the smallest radius) and when it ends (its accuracies, its time).
    Returns:
      {"top1": {attack: {eps_key: accuracy}, "worst": {...}}, "fooled": {attack: {eps_key:
      images it fooled}}, "standing": {attack: {eps_key: bool (N,) mask after it}},
      "seconds": {attack: wall time}}; accuracies are over all N images.
    """
    order = sorted({eps_key(e): e for e in radii}.items(), key=lambda item: item[1])
    alive = {key: np.array(clean, bool) for key, _ in order}
    out = {"top1": {}, "fooled": {}, "standing": {}, "seconds": {}}
    for name, passes in steps:
        start = time.time()
        if log is not None:  # where the chain is: an attack can run for minutes
            log(f"Robust {tag} {name}: attacking {np.count_nonzero(alive[order[0][0]])} of "
                f"{len(clean)} images at {' '.join(key for key, _ in order)} ...")
        for k, (key, eps) in enumerate(order):
            if k:  # fooled at a smaller radius by this attack or an earlier one: fooled here
                alive[key] &= alive[order[k - 1][0]]
            fooled = 0
            for p, attack_pass in enumerate(passes if eps > 0 else []):  # eps 0: x itself
                fooled += attack_standing(attack_pass, alive[key], eps * unit, batch_size, seed,
                                          f"{tag}/{name}/{key}/{p}")
            out["top1"].setdefault(name, {})[key] = float(np.mean(alive[key]))
            out["fooled"].setdefault(name, {})[key] = fooled
            out["standing"].setdefault(name, {})[key] = alive[key].copy()
        out["seconds"][name] = time.time() - start
        if log is not None:
            log(f"Robust {tag} {name}: " + " ".join(
                f"{key}:{out['top1'][name][key]:.4f}" for key, _ in order)
                + f"  ({out['seconds'][name]:.0f} s)")
    out["top1"]["worst"] = {key: float(np.mean(alive[key])) for key, _ in order}
    return out


def _attack_fn(logits_fn, name, norm, steps, queries, batch):
    """The attack `name` as (x, y, eps, seed, ids[, target]) -> fooled bool (N,)
    [, queries (N,)], traceable (tf.function), on the refill engine with `batch` slots. steps:
    APGD's or FAB-T's iterations; queries: Square's; ids: the images' random streams."""
    box = dict(clip_min=0.0, clip_max=1.0, batch=batch)
    if name in ("pgd20", "fgsm"):  # FGSM: one step of eps from x
        steps, random_start = (PGD_STEPS, True) if name == "pgd20" else (1, False)
        return lambda x, y, eps, seed, ids: attacks.pgd_until_fooled(
            logits_fn, x, y, eps, steps, eps / 4 if random_start else eps,
            random_start=random_start, seed=seed, norm=norm, ids=ids, **box)[1]
    if name in ("apgd-ce", "apgd-dlr"):
        loss = name.split("-")[1]
        return lambda x, y, eps, seed, ids: attacks.apgd(
            logits_fn, x, y, eps, steps, seed, norm=norm, loss=loss, ids=ids, **box)[1]
    if name == "apgd-t":
        return lambda x, y, eps, seed, ids, target: attacks.apgd(
            logits_fn, x, y, eps, steps, seed, norm=norm, loss="dlr_targeted", target=target,
            ids=ids, **box)[1]
    if name == "fab-t":  # deterministic (no random start, AutoAttack's one restart): no seed
        return lambda x, y, eps, seed, ids, target: attacks.fab_t(
            logits_fn, x, y, eps, norm=norm, steps=steps, target=target, minimal=False,
            **box)[1]
    if name == "square":
        return lambda x, y, eps, seed, ids: attacks.square_linf(
            logits_fn, x, y, eps, queries, seed, ids=ids, **box)[1:]
    raise ValueError(f"unknown attack {name!r}")


class Attacker:
    """The attacks of a suite on one classifier and one set of images.

    Each attack is compiled once (a tf.function whose input signature leaves the number of
    images open, the radius and seed tensors: one trace for every set of survivors) and called
    on the rows still standing (attack_standing's pools), its model calls in batches of
    batch_size (the refill engine), one host round trip per pool, never per iteration.

    Args:
      logits_fn: images in [0, 1] -> (N, C) float32 logits, stateless (inference mode).
      images: float32 (N, H, W, C) in [0, 1]; labels: int (N,).
      suite: the Suite; num_classes: C; batch_size: images per model call.
    """

    def __init__(self, logits_fn, images, labels, suite: Suite, num_classes: int,
                 batch_size: int = 500):
        self.logits_fn, self.suite, self.num_classes = logits_fn, suite, num_classes
        self.batch_size = batch_size
        self.images = np.asarray(images, np.float32)
        self.labels = np.asarray(labels, np.int32)
        self.square_queries = {}  # eps_key (1/255) -> queries per attacked image
        self._compiled = {}
        self._targets = None

    def _fn(self, key, build, *inputs):
        """The compiled build() of (images, *inputs), inputs of "labels", "scalar", "seed" and
        "rows" (an int per image)."""
        if key not in self._compiled:
            specs = {"labels": tf.TensorSpec([None], tf.int32),
                     "scalar": tf.TensorSpec([], tf.float32),
                     "seed": tf.TensorSpec([2], tf.int64), "rows": tf.TensorSpec([None], tf.int32)}
            signature = [tf.TensorSpec((None,) + self.images.shape[1:], tf.float32)]
            self._compiled[key] = tf.function(
                build(), input_signature=signature + [specs[i] for i in inputs])
        return self._compiled[key]

    def _call(self, fn, rows, eps, seed, *extra):
        return fn(tf.constant(self.images[rows]), tf.constant(self.labels[rows]),
                  tf.constant(eps, tf.float32), tf.constant(seed, tf.int64),
                  tf.constant(rows, tf.int32), *(tf.constant(e[rows], tf.int32) for e in extra))

    def clean_logits(self, batch_size: int) -> np.ndarray:
        """(N, C) logits of the clean images."""
        fn = self._fn("logits", lambda: self.logits_fn)
        return np.concatenate([fn(tf.constant(self.images[i:i + batch_size])).numpy()
                               for i in range(0, len(self.images), batch_size)] or
                              [np.zeros((0, self.num_classes), np.float32)])

    def set_clean(self, logits: np.ndarray):
        """APGD-T's and FAB-T's targets: the suite's number of the most likely other classes of
        each clean image (top_targets, as AutoAttack: both take the same ones)."""
        k = min(self.suite.targets, self.num_classes - 1)
        self._targets = attacks.top_targets(tf.constant(logits), tf.constant(self.labels),
                                            k).numpy()

    @property
    def targets_per_image(self) -> int:
        """APGD-T's and FAB-T's target classes per image (set_clean): min(Suite.targets,
        classes - 1)."""
        return self._targets.shape[1]

    def passes(self, name: str, norm: str, steps: int = 0):
        """The attack passes of `name` (run_chain's steps): APGD-T and FAB-T one per target rank.

        Args:
          name: an attack of config.ROBUST_ATTACKS; norm: linf or l2.
          steps: APGD's or FAB-T's iterations (0: the suite's).
        """
        steps = steps or (self.suite.fab_steps if name == "fab-t" else self.suite.apgd_steps)
        fn = self._fn((name, norm, steps), lambda: _attack_fn(
            self.logits_fn, name, norm, steps, self.suite.square_queries, self.batch_size),
            "labels", "scalar", "seed", "rows", *(["rows"] if name in TARGETED else []))
        if name in TARGETED:
            return [functools.partial(self._target_pass, fn, r)
                    for r in range(self._targets.shape[1])]
        if name == "square":
            return [functools.partial(self._square_pass, fn)]
        return [lambda rows, eps, seed: self._call(fn, rows, eps, seed).numpy()]

    def _target_pass(self, fn, rank, rows, eps, seed):
        return self._call(fn, rows, eps, seed, self._targets[:, rank]).numpy()

    def _square_pass(self, fn, rows, eps, seed):
        fooled, queries = self._call(fn, rows, eps, seed)
        self.square_queries.setdefault(eps_key(eps * 255), []).extend(queries.numpy().tolist())
        return fooled.numpy()

    def attack(self, name, norm, alive, eps, batch_size, seed, tag, steps=0) -> int:
        """Every pass of `name` on the images standing in `alive` (updated); returns how many
        it fooled. eps in [0, 1]-pixel units."""
        return sum(attack_standing(p, alive, eps, batch_size, seed, f"{tag}/{k}")
                   for k, p in enumerate(self.passes(name, norm, steps)))

    def flat_gradient(self, rows) -> np.ndarray:
        """bool (len(rows),): the cross-entropy's input gradient is all zero or not finite."""
        def build():
            def flat(x, y):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    loss = attacks.ce_loss(self.logits_fn(x), y)  # (N,); images independent
                g = tf.reshape(tape.gradient(loss, x), [tf.shape(x)[0], -1])
                return tf.reduce_all(tf.equal(g, 0.0), 1) | ~tf.reduce_all(tf.math.is_finite(g), 1)
            return flat
        fn = self._fn("flat_gradient", build, "labels")
        return fn(tf.constant(self.images[rows]), tf.constant(self.labels[rows])).numpy()


def robust_accuracy(logits_fn, images, labels, suite: Suite, num_classes: int, batch_size=500,
                    seed=0, log=None) -> dict:
    """Clean accuracy and the chain of every norm (run_chain) on the same images, then the
    gradient-masking checks (masking.py).

    Args:
      logits_fn: images in [0, 1] -> logits. Must not change state (inference mode).
      images: float32 (N, H, W, C) in [0, 1]; labels: int (N,).
      suite: what to run, already checked against num_classes (Suite.check); num_classes: the
        classifier's classes.
      batch_size: images per attacked batch; seed: the run's seed (batch_seed).
      log: optional callable taking a progress line per attack (run_chain).

    Returns:
      The results.json entries (docs/robustness.md): robust_clean_top1, robust_examples,
      per norm its top-1 table, attacks and radii, robust_attack_seconds ({norm: {attack: s}}),
      robust_square_mean_queries (queries per image Square attacked, by radius),
      robust_targets_used (apgd-t's and fab-t's target classes per image: suite.targets, at
      most num_classes - 1; only with one of them), robust_suite (Suite.describe: which suite
      and budget produced the numbers), and with suite.checks robust_checks,
      robust_checks_seconds and robust_warnings.
    """
    attacker = Attacker(logits_fn, images, labels, suite, num_classes, batch_size)
    logits = attacker.clean_logits(batch_size)
    clean = np.argmax(logits, axis=1) == attacker.labels
    out = {"robust_clean_top1": float(np.mean(clean)), "robust_examples": int(len(clean)),
           "robust_attack_seconds": {}, "robust_suite": suite.describe(num_classes)}
    if set(TARGETED) & set(suite.attacks):
        attacker.set_clean(logits)
        # What ran: the suite's targets capped at classes - 1 (eval_flags keeps the flag's).
        out["robust_targets_used"] = int(attacker.targets_per_image)
    chains = {}
    for norm, keys in NORMS.items():
        names = suite.attacks_for(norm)
        radii = suite.linf_eps if norm == "linf" else suite.l2_eps
        out[keys["attacks"]] = list(names)
        out[keys["eps"]] = [float(e) for e in radii]
        if not names:
            continue
        steps = [(name, attacker.passes(name, norm)) for name in names]
        chains[norm] = run_chain(steps, clean, radii, keys["unit"], batch_size, seed, norm, log)
        out[keys["top1"]] = chains[norm]["top1"]
        out["robust_attack_seconds"][norm] = chains[norm]["seconds"]
    if attacker.square_queries:
        out["robust_square_mean_queries"] = {k: float(np.mean(v)) if v else 0.0
                                        for k, v in attacker.square_queries.items()}
    if suite.checks:
        out.update(masking.run_checks(attacker, chains.get("linf"), clean, batch_size, seed))
    return out


def evaluate(cfg, model, probe, split: sources.Split, num_classes: int) -> dict:
    """Robust evaluation (--robust_*) of encoder + probe on the fixed subset of `split`; the
    suite is checked against num_classes (Suite.check) by app.run.

    Returns the results.json entries of robust_accuracy and robust_seconds (all of it,
    loading the images included).
    """
    return evaluate_classifier(cfg, classifier(model, probe, cfg.normalize, cfg.probe), split,
                               num_classes)


def evaluate_classifier(cfg, logits_fn, split: sources.Split, num_classes: int) -> dict:
    """evaluate() of any classifier (images in [0, 1] -> logits; the fine-tunes' too)."""
    t0 = time.time()
    images, labels = load_subset(split, cfg.robust_examples)
    out = robust_accuracy(logits_fn, images, labels, Suite.from_config(cfg), num_classes,
                          batch_size=cfg.eval_batch_size, seed=cfg.seed,
                          log=functools.partial(print, flush=True))
    out["robust_seconds"] = time.time() - t0
    return out
