"""Evaluation against references: weighted kNN against numpy, the linear probe against scikit-learn.

kNN (docs/method.md, "Evaluation protocol"): each of the k training embeddings most similar
(cosine) to a test embedding votes for its class with weight exp(similarity / sigma); the
prediction is the class with the largest summed vote. The reference code leaves ties to
torch.topk / torch.sort (unspecified order); clae-tf defines them, and these tests pin exactly
that:
  - equal similarities at the k-th place: the training example that comes FIRST in the bank
    is among the k neighbours (tf.math.top_k keeps the lower index first);
  - equal class scores: the LOWEST class index wins (tf.argmax returns the first maximum).
knn_top1 returns only the accuracy, so the tests read its predictions through the labels: with
test_y = the reference's predictions the accuracy is 1 exactly when every prediction agrees,
and one changed label must cost exactly 1 / n.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.linear_model import LogisticRegression

from clae_tf import ClaeError
from clae_tf.data import sources
from clae_tf.evaluation import evaluate
from clae_tf.evaluation.evaluate import knn_top1, linear_probe

from conftest import tiny_config


def reference_knn_predict(train_z, train_y, test_z, num_classes, k, sigma):
    """docs/method.md's weighted kNN in float64 numpy, with the tie rules of
    the module docstring."""
    k = min(k, len(train_z))
    sim = test_z.astype(np.float64) @ train_z.astype(np.float64).T  # (n_test, n_train)
    pred = []
    for s in sim:
        nearest = np.argsort(-s, kind="stable")[:k]  # stable: equal similarities keep bank order
        scores = np.zeros(num_classes)
        np.add.at(scores, train_y[nearest], np.exp(s[nearest] / sigma))
        pred.append(int(np.argmax(scores)))  # the first (lowest) class among equal scores
    return np.array(pred)


def _unit(rng, n, d):
    z = rng.normal(size=(n, d)).astype(np.float32)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


@pytest.mark.parametrize("k", [1, 7, 60, 200])  # 200 > the bank of 60: every example votes
@pytest.mark.parametrize("sigma", [0.07, 0.1, 0.5])
@pytest.mark.parametrize("chunk", [8, 256])  # 37 test examples: 4 full chunks and a partial one
def test_knn_matches_numpy_reference(k, sigma, chunk):
    rng = np.random.default_rng(k * 100 + int(sigma * 100) + chunk)
    num_classes = 5
    train_z, test_z = _unit(rng, 60, 8), _unit(rng, 37, 8)
    train_y = rng.integers(0, num_classes, 60)
    want = reference_knn_predict(train_z, train_y, test_z, num_classes, k, sigma)
    assert knn_top1(train_z, train_y, test_z, want, num_classes, k=k, sigma=sigma,
                    chunk=chunk) == 1.0
    # Every test example counts, the last partial chunk too: each changed label costs 1/37.
    for i in (0, 36):
        wrong = want.copy()
        wrong[i] = (wrong[i] + 1) % num_classes
        assert knn_top1(train_z, train_y, test_z, wrong, num_classes, k=k, sigma=sigma,
                        chunk=chunk) == pytest.approx(36 / 37)
    # And the accuracy against random labels is the reference's.
    test_y = rng.integers(0, num_classes, 37)
    assert knn_top1(train_z, train_y, test_z, test_y, num_classes, k=k, sigma=sigma,
                    chunk=chunk) == pytest.approx(np.mean(want == test_y))


def _on_circle(xs):
    """Unit rows (x, sqrt(1 - x^2)): their dot product with e1 is exactly x in float32."""
    xs = np.asarray(xs, np.float32)
    return np.stack([xs, np.sqrt(1 - xs ** 2)], axis=1).astype(np.float32)


E1 = np.array([[1.0, 0.0]], np.float32)


def test_knn_votes_are_weighted_by_exp_similarity_over_sigma():
    # Neighbours of e1 at similarity 1.0 (class 1) and 0.6, 0.6 (class 0), k = 3: class 0
    # wins iff 2 exp(0.6 / sigma) > exp(1 / sigma), i.e. sigma > 0.4 / ln 2 = 0.577.
    bank, bank_y = _on_circle([1.0, 0.6, 0.6]), np.array([1, 0, 0])
    for sigma, winner in ((0.5, 1), (0.56, 1), (0.6, 0), (1.0, 0)):
        assert reference_knn_predict(bank, bank_y, E1, 2, 3, sigma)[0] == winner
        assert knn_top1(bank, bank_y, E1, np.array([winner]), 2, k=3, sigma=sigma) == 1.0
    # k = 1: the nearest alone, whatever sigma.
    assert knn_top1(bank, bank_y, E1, np.array([1]), 2, k=1, sigma=1.0) == 1.0


@pytest.mark.parametrize("k", [1, 3])
def test_knn_tie_at_kth_place_keeps_the_earlier_bank_example(k):
    # k = 3: neighbours at 0.8 (class 0) and 0.7 (class 1), then two at exactly 0.6 (classes
    # 0 and 1) competing for the 3rd place, then one at 0.5. With sigma large the votes are
    # nearly counts, so the tied example that gets in decides the class. k = 1: two at 0.6 tie
    # for the only place.
    sims = [0.8, 0.7, 0.6, 0.6, 0.5] if k == 3 else [0.6, 0.6, 0.5]
    tied = [2, 3] if k == 3 else [0, 1]
    base_y = [0, 1, 0, 1, 0] if k == 3 else [0, 1, 0]
    bank = _on_circle(sims)
    for first in (0, 1):  # which of the two tied examples comes first in the bank
        y = np.array(base_y)
        y[tied[0]], y[tied[1]] = first, 1 - first
        assert reference_knn_predict(bank, y, E1, 2, k, 10.0)[0] == first
        assert knn_top1(bank, y, E1, np.array([first]), 2, k=k, sigma=10.0) == 1.0


@pytest.mark.parametrize("num_classes", [2, 4])
def test_knn_equal_class_scores_go_to_the_lowest_class(num_classes):
    # Two neighbours at exactly the same similarity, one per class: the scores tie exactly.
    bank = _on_circle([0.6, 0.6, 0.5])
    for pair in ([1, 0], [0, 1], [num_classes - 1, 1]):
        bank_y = np.array(pair + [0])  # a farther third example, outside k = 2
        lowest = min(pair)
        assert reference_knn_predict(bank, bank_y, E1, num_classes, 2, 0.1)[0] == lowest
        assert knn_top1(bank, bank_y, E1, np.array([lowest]), num_classes, k=2,
                        sigma=0.1) == 1.0


def test_knn_small_sigma_does_not_overflow():
    """exp(s / sigma) overflows float32 below sigma ~0.0113 (max ~e^88.7), where inf * 0 makes
    nan votes: the votes must stay comparable."""
    # exp(1 / 0.01) = e^100. Class 1 has the nearest neighbour (1.0) and the 4th (0.9); class 0
    # the 2nd and 3rd (0.99, 0.98): class 1 wins, e^100 + e^90 > e^99 + e^98.
    bank, bank_y = _on_circle([1.0, 0.99, 0.98, 0.9]), np.array([1, 0, 0, 1])
    assert reference_knn_predict(bank, bank_y, E1, 2, 4, 0.01)[0] == 1
    assert knn_top1(bank, bank_y, E1, np.array([1]), 2, k=4, sigma=0.01) == 1.0
    # Random embeddings down to sigma 1e-3, where exp(s / sigma) overflows float64 too: against
    # a weighted kNN with the weights exp((s - max) / sigma) in float64, on the float32
    # similarities that knn_top1 ranks.
    rng = np.random.default_rng(0)
    train = rng.normal(size=(60, 8))
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    test = rng.normal(size=(25, 8))
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    train_y, test_y = rng.integers(0, 3, 60), rng.integers(0, 3, 25)
    for sigma in (0.5, 0.005, 1e-3):
        sim = (test.astype(np.float32) @ train.astype(np.float32).T).astype(np.float64)
        top = np.argsort(-sim, axis=1)[:, :7]
        s = np.take_along_axis(sim, top, 1)
        w = np.exp((s - s[:, :1]) / sigma)
        scores = np.stack([(w * (train_y[top] == c)).sum(1) for c in range(3)], 1)
        expected = np.mean(scores.argmax(1) == test_y)
        got = evaluate.knn_top1(train, train_y, test, test_y, 3, k=7, sigma=sigma)
        assert got == pytest.approx(expected), sigma


# ------------------------------------------------------------------ linear probe


def _blobs(rng, n_per_class, num_classes, d, spread):
    """Gaussian blobs whose centres lie on ONE ray from the origin (at 2, 3, 4, ... along axis
    0): only a classifier with a bias can separate them, so a probe without one would fail."""
    x, y = [], []
    for c in range(num_classes):
        centre = np.zeros(d)
        centre[0] = 2.0 + c
        x.append(centre + spread * rng.normal(size=(n_per_class, d)))
        y.append(np.full(n_per_class, c))
    return np.concatenate(x).astype(np.float32), np.concatenate(y)


# spread 0.15: separable, both must be at 100% within a point. spread 0.4: overlapping blobs
# (~85%); Adam at a constant lr ends its last epoch a few points off the optimum that
# scikit-learn's L-BFGS finds, hence 5 points (a probe without a bias is at ~60%).
@pytest.mark.parametrize("spread,tolerance", [
    (0.15, 0.01), pytest.param(0.4, 0.05, marks=pytest.mark.slow)])
def test_linear_probe_matches_scikit_learn(spread, tolerance):
    rng = np.random.default_rng(0)
    train_x, train_y = _blobs(rng, 100, 3, 6, spread)
    test_x, test_y = _blobs(rng, 100, 3, 6, spread)
    # Multinomial logistic regression, (almost) unregularised like the probe.
    want = LogisticRegression(C=1e4, max_iter=5000).fit(train_x, train_y).score(test_x, test_y)
    if spread < 0.2:
        assert want == 1.0
    got = linear_probe(train_x, train_y, test_x, test_y, 3, epochs=40, lr=0.1, batch_size=20)[0]
    assert got == pytest.approx(want, abs=tolerance)
    # The probe before training is far off: the comparison above is not vacuous.
    assert linear_probe(train_x, train_y, test_x, test_y, 3, epochs=0)[0] < want - 0.2


def reference_probe(w, b, x, y, num_classes, epochs, lr, batch_size, orders,
                    beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Mini-batch softmax regression with Adam (Kingma & Ba, Keras' epsilon placement) in
    float64 numpy: the gradient of the mean cross-entropy is x^T (softmax - onehot) / b."""
    params = [w.astype(np.float64), b.astype(np.float64)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    t = 0
    for epoch in range(epochs):
        order = orders[epoch]
        for start in range(0, len(x), batch_size):
            rows = order[start:start + batch_size]
            xb, yb = x[rows].astype(np.float64), y[rows]
            logits = xb @ params[0] + params[1]
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(rows)), yb] -= 1.0
            grads = [xb.T @ p / len(rows), p.sum(axis=0) / len(rows)]
            t += 1
            alpha = lr * np.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)
            for i, g in enumerate(grads):
                m[i] = beta_1 * m[i] + (1 - beta_1) * g
                v[i] = beta_2 * v[i] + (1 - beta_2) * g * g
                params[i] = params[i] - alpha * m[i] / (np.sqrt(v[i]) + epsilon)
    return params


@pytest.mark.parametrize("n,batch_size", [(50, 16), (48, 16), (7, 64)])  # partial, full, one batch
@pytest.mark.parametrize("per_call", [10, 2])  # 3 epochs in one call, or in calls of 2 + 1
def test_linear_probe_is_adam_softmax_regression_over_its_epoch_orders(n, batch_size, per_call,
                                                                       monkeypatch):
    """The compiled probe takes exactly the steps of numpy Adam on the same batches: the same
    weights after 3 epochs, whether they run in one call or several. Each epoch's order is
    epoch_order, and the orders differ between epochs (the shuffle is not fixed once)."""
    monkeypatch.setattr(evaluate, "PROBE_EPOCHS_PER_CALL", per_call)
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = rng.integers(0, 4, n)
    epochs, lr = 3, 0.05
    _, untrained = evaluate.linear_probe(x, y, x, y, 4, epochs=0, seed=3)
    w0, b0 = untrained.get_weights()
    acc, layer = evaluate.linear_probe(x, y, x, y, 4, epochs=epochs, lr=lr,
                                       batch_size=batch_size, seed=3)
    orders = [evaluate.epoch_order(n, 3, e).numpy() for e in range(epochs)]
    for order in orders:
        assert sorted(order) == list(range(n))
    if n > 10:
        assert not np.array_equal(orders[0], orders[1])
    want_w, want_b = reference_probe(w0, b0, x, y, 4, epochs, lr, batch_size, orders)
    got_w, got_b = layer.get_weights()
    assert np.abs(got_w - w0).max() > 0.05  # it trained
    np.testing.assert_allclose(got_w, want_w, atol=1e-5)
    np.testing.assert_allclose(got_b, want_b, atol=1e-5)
    want_acc = np.mean(np.argmax(x @ want_w + want_b, axis=1) == y)
    assert acc == pytest.approx(want_acc)


# ---------------------------------------------------------------------------------------------
# Feature extraction: a file that cannot be decoded is named; any other error is left alone.


def _shape_bug(x, training):
    """A model whose reshape fails at run time on every batch (7 rows: no batch of 16x16x3
    images divides into them; from the data, so no shape inference sees it while tracing)."""
    rows = tf.cast(tf.reduce_sum(x * 0.0), tf.int32) + 7
    bad = tf.reshape(x, [rows, -1])
    return bad, bad


def test_extract_raises_a_shape_bug_as_it_came_without_a_scan(monkeypatch):
    split = sources.load(tiny_config()).test
    monkeypatch.setattr(sources, "find_unreadable", lambda split: pytest.fail("scanned"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="Input to reshape"):
        evaluate.extract(_shape_bug, split, 64, "half")


def test_extract_names_a_file_that_cannot_be_decoded(tmp_path):
    files = []
    for i, data in enumerate((tf.io.encode_png(tf.zeros([4, 4, 3], tf.uint8)).numpy(),
                              b"this is not a png")):
        files.append(str(tmp_path / f"{i}.png"))
        with open(files[-1], "wb") as f:
            f.write(data)
    split = sources._file_split(files, np.zeros(2, np.int32), 8)
    with pytest.raises(ClaeError, match=f"^--dataset: cannot read image {files[1]}$"):
        evaluate.extract(lambda x, training: (x, x), split, 2, "half")


# ---------------------------------------------------------------------------------------------
# What an evaluation does with the robust results of an earlier one, and a probe.npz that cannot
# be read. The features and the robust evaluation are stand-ins: only the bookkeeping is tested.


def _features(n, seed):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, 4)).astype(np.float32)
    return h, h / np.linalg.norm(h, axis=1, keepdims=True), (np.arange(n) % 3).astype(np.int32)


MEASURED = {"robust_top1": {"pgd20": {"8": 0.25}, "worst": {"8": 0.25}},
            "robust_attacks": ["pgd20"], "robust_clean_top1": 0.5, "robust_examples": 16,
            "robust_seconds": 3600.0}


@pytest.fixture
def evaluate_at(tmp_path, monkeypatch):
    """evaluate.evaluate(tiny_config(tmp_path, **flags), step) on fixed features, its robust
    evaluation (when one runs) giving MEASURED."""
    monkeypatch.setattr(evaluate, "extract",
                        lambda model, split, *a: _features(12 if split == "train" else 6, 0))
    monkeypatch.setattr(evaluate.robust, "evaluate", lambda *a: dict(MEASURED))
    source = sources.Source(name="digits", train="train", test="test", num_classes=3)

    def run(step, **flags):
        cfg = tiny_config(tmp_path, **{"linear_epochs": 1, **flags})
        return evaluate.evaluate(cfg, None, source, step)
    return run


def test_eval_without_attacks_keeps_the_robust_results_of_its_step(evaluate_at, capsys, tmp_path):
    first = evaluate_at(5, robust_attacks="pgd20", robust_eps="8")
    assert first["robust_seconds"] == 3600.0
    capsys.readouterr()
    for attacks, l2 in (("", "0.5"), (",".join(["fgsm", "square"]), "0.5")):  # none / no L2
        kept = evaluate_at(5, robust_attacks=attacks, robust_eps="", robust_l2_eps=l2)
        assert {k: kept[k] for k in MEASURED} == MEASURED
        assert kept["robust_kept_from"] == {"step": 5, "eval_flags": {
            k: v for k, v in first["eval_flags"].items() if k.startswith("robust_")}}
        assert kept["eval_flags"]["robust_attacks"] == attacks  # this evaluation's own flags
        line = capsys.readouterr().out.splitlines()[-1]
        assert line.startswith("note: kept the robust results of step 5 from an earlier "
                               "evaluation in ")
        assert line.endswith("(--robust_attacks=pgd20 --robust_eps=8 --robust_l2_eps=): this "
                             "evaluation runs no robust attack")
    with open(tmp_path / "run" / "results.json") as f:
        assert json.load(f) == json.loads(json.dumps(kept))


@pytest.mark.parametrize("later, why", [
    (dict(step=6), "they are of another checkpoint than the one of step 6 evaluated now"),
    (dict(linear_epochs=3), "they are of another linear probe, fitted with --linear_epochs=1 "
                            "(now 3)"),
    (dict(seed=1), "fitted with --seed=0 (now 1)"),
])
def test_eval_without_attacks_removes_robust_results_of_another_classifier(evaluate_at, capsys,
                                                                          later, why):
    evaluate_at(5, robust_attacks="pgd20")
    capsys.readouterr()
    step = later.pop("step", 5)
    out = evaluate_at(step, robust_attacks="", **later)
    assert not any(k.startswith("robust_") for k in out)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("note: removed the robust results of step 5 from an earlier "
                           "evaluation in ") and why in line, line


def test_eval_with_attacks_replaces_kept_results_and_their_record(evaluate_at, capsys):
    evaluate_at(5, robust_attacks="pgd20")
    evaluate_at(5, robust_attacks="")
    capsys.readouterr()
    out = evaluate_at(5, robust_attacks="fgsm")
    assert "robust_kept_from" not in out and out["robust_top1"] == MEASURED["robust_top1"]
    assert "note:" not in capsys.readouterr().out  # nothing earlier kept or lost without a word


def test_eval_without_attacks_and_no_earlier_robust_results_says_nothing(evaluate_at, capsys):
    out = evaluate_at(5, robust_attacks="")
    assert not any(k.startswith("robust_") for k in out)
    assert "note:" not in capsys.readouterr().out


def _probe_file(path):
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    evaluate.save_probe(str(path), layer, "h", 7)
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("damage", ["text", "empty", "truncated", "half", "npy", "no_bias",
                                    "directory"])
def test_a_probe_that_cannot_be_read_is_one_line_that_says_what_to_run(tmp_path, damage):
    path = tmp_path / "probe.npz"
    data = _probe_file(path)
    assert evaluate.load_probe(str(path))["step"] == 7
    path.unlink()
    if damage == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif damage == "no_bias":
        with open(path, "wb") as f:
            np.savez(f, kernel=np.zeros((4, 3)), feature="h", step=7)
    elif damage == "directory":
        path.mkdir()
    else:
        path.write_bytes({"text": b"kernel = [1, 2]\n", "empty": b"", "truncated": data[:-9],
                          "half": data[:len(data) // 2]}[damage])
    with pytest.raises(ClaeError) as e:
        evaluate.load_probe(str(path))
    message = str(e.value)
    assert message.startswith(f"--workdir: {path} cannot be read (")
    assert message.endswith("); run --mode=eval to fit the probe again") and "\n" not in message
