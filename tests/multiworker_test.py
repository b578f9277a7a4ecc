"""Two local worker processes (MultiWorkerMirroredStrategy over loopback) train like one process
(SimCLR, and MoCo with its key encoder and queue).

The module starts this file twice as a worker (`python tests/multiworker_test.py worker ...`)
with a TF_CONFIG naming 127.0.0.1 ports; both run app.run for SimCLR, then for MoCo (train, then
on the chief only: evaluation, results.json, TensorBoard, the SavedModel) and dump each run's
final weights. Meanwhile this process trains the same steps on the same global batches on one
device. Workers are always killed (by their pid) when the fixture ends, whatever happens; every
wait has a timeout.
"""

import contextlib
import dataclasses
import errno
import glob
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 900  # seconds for both workers' two runs: several times what they take on a busy CPU


def _worker(cfgs_path, out_prefix):
    """One worker process: TF_CONFIG is in the environment; cfgs is a JSON list of Config
    fields, one run each, one after the other (one process start and cluster for them all)."""
    # Importing clae_tf must not initialise TF: MultiWorkerMirroredStrategy has to come first
    # (as in run.py, which imports clae_tf.job.app before make_strategy).
    from clae_tf.job import app, checkpoints, train
    from clae_tf.runtime import config, distribute

    with open(cfgs_path) as f:
        cfgs = [config.Config(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in fields.items()}) for fields in json.load(f)]
    strategy = distribute.make_strategy(cfgs[0])  # before anything else touches TF
    trained = {}
    real_train = train.train

    def keep_model(*args, **kwargs):
        summary = real_train(*args, **kwargs)
        trained.update(model=summary.model, step=summary.step)
        return summary

    states = []
    real_state = checkpoints.State

    class KeepState(real_state):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            states.append(self)

    train.train, checkpoints.State = keep_model, KeepState
    for cfg in cfgs:
        out = app.run(cfg, strategy)
        out_path = f"{out_prefix}_{cfg.method}.npz"
        np.savez(out_path, **_state_values(states[-1]))
        with open(out_path + ".json", "w") as f:
            json.dump({"chief": distribute.is_chief(strategy), "step": trained["step"],
                       "replicas": strategy.num_replicas_in_sync, "results": "results" in out,
                       "saved_model": out.get("saved_model"), "pid": os.getpid()}, f)


def _state_values(state):
    """Model variables by path, plus MoCo's key encoder ("key/<path>") and queue."""
    values = {v.path: v.numpy() for v in state.model.variables}
    if hasattr(state.method, "key_model"):  # MoCo
        values.update({f"key/{v.path}": v.numpy() for v in state.method.key_model.variables})
        values["moco_queue"] = state.method.queue.numpy()
    return values


@contextlib.contextmanager
def _reserved_ports(n):
    """`n` free TCP ports, held until the block ends.

    Closing a probe socket and passing its port on leaves a gap in which any process may take
    the port, such as another pytest process (pytest -n) picking ports at the same moment.
    Each port stays bound here instead (not listening, so it receives nothing) on 0.0.0.0 with
    SO_REUSEPORT: the kernel gives it to no other bind to port 0 nor outgoing connection, yet
    a worker started with TF_GRPC_REUSE_PORT=1 binds its gRPC server to it (TensorFlow then
    sets SO_REUSEPORT as well, which lets sockets of the same user share the port).

    Yields:
      list of n distinct port numbers.
    """
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("0.0.0.0", 0))
        yield [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_reserved_ports_are_kept_from_others_but_shared_with_reuseport():
    """What the workers rely on: while reserved, a port is refused to a plain bind (another
    program) but a SO_REUSEPORT listener binds it (a worker's gRPC server); released after."""
    with _reserved_ports(2) as ports:
        assert len(set(ports)) == 2
        for port in ports:
            with socket.socket() as other:
                with pytest.raises(OSError) as refused:
                    other.bind(("127.0.0.1", port))
                assert refused.value.errno == errno.EADDRINUSE
            with socket.socket() as server:
                server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                server.bind(("0.0.0.0", port))
                server.listen()
                with socket.create_connection(("127.0.0.1", port), timeout=60):
                    pass
    for port in ports:
        with socket.socket() as other:
            other.bind(("127.0.0.1", port))


def _tail(path, n=3000):
    with open(path, errors="replace") as f:
        return f.read()[-n:]


METHODS = ("simclr", "moco")


def _config(tmp_path, method):
    from conftest import tiny_config

    # lr 0.01 and eps=0 keep the comparison with one process tight (see the test). A constant
    # learning rate: the reference does not know the workers' total steps. The chief's robust
    # evaluation and export after training do not depend on the method: MoCo's run has them,
    # SimCLR's run leaves them out (~20 s of the chief's time on 2 busy cores).
    whole = method == "moco"
    return tiny_config(tmp_path, strategy="multiworker", optimizer="sgd", learning_rate=0.01,
                       momentum=0.9, weight_decay=5e-4, max_steps=3, ckpt_every=2,
                       linear_epochs=1, log_every=1, image_every=100, eps=0.0, method=method,
                       lr_schedule="constant", queue_size=40, key_momentum=0.9, export=whole,
                       robust_attacks="quick" if whole else "")


def _reference(cfg, tmp_path):
    """The run's 3 steps on the same global batches on one device, in this process (eagerly:
    tracing would only cost time), from the weights app.run's seeding gives. Returns (the
    initial model variables, the final ones, those plus MoCo's key encoder and queue)."""
    import keras
    import tensorflow as tf

    from clae_tf.data import sources, streams
    from clae_tf.job import checkpoints
    from clae_tf.method import train_step

    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    single = dataclasses.replace(cfg, strategy="one_device",
                                 workdir=str(tmp_path / f"single_{cfg.method}"))
    source = sources.load(single)
    keras.utils.set_random_seed(cfg.seed)
    state = checkpoints.State(single, one, 10, 10)
    initial = {v.path: v.numpy() for v in state.model.variables}
    step = train_step.make_distributed_step(one, train_step.make_train_step(
        state.model, state.optimizer, single, 1, state.method), state.method, compiled=False)
    for x1, x2 in streams.pretrain_dataset(source.train, single, epoch=0).take(cfg.max_steps):
        step(x1, x2)
    reference_all = _state_values(state)
    return initial, {v.path: reference_all[v.path] for v in state.model.variables}, reference_all


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both methods' runs on the same two worker processes, SimCLR's then MoCo's, and their
    references in this process meanwhile. Returns the temporary directory and {method:
    {cfg, infos (per worker), weights (per worker), initial, reference, reference_all}}."""
    tmp_path = tmp_path_factory.mktemp("multiworker")
    cfgs = [_config(tmp_path / method, method) for method in METHODS]
    cfgs_path = str(tmp_path / "cfgs.json")
    with open(cfgs_path, "w") as f:
        json.dump([dataclasses.asdict(cfg) for cfg in cfgs], f)
    procs, logs, prefixes, references = [], [], [], {}
    # Two ports for the workers' gRPC servers, reserved until the workers have ended.
    with _reserved_ports(2) as ports:
        workers = [f"127.0.0.1:{p}" for p in ports]
        try:
            for i in range(2):
                env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO,
                           TMPDIR=str(tmp_path / f"tmp{i}"), CUDA_VISIBLE_DEVICES="",
                           TF_GRPC_REUSE_PORT="1",  # binds the port reserved for it
                           TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                                 "task": {"type": "worker", "index": i}}))
                os.makedirs(env["TMPDIR"])
                prefixes.append(str(tmp_path / f"worker{i}"))
                logs.append(str(tmp_path / f"worker{i}.log"))
                with open(logs[-1], "w") as log:
                    procs.append(subprocess.Popen(
                        [sys.executable, os.path.abspath(__file__), "worker", cfgs_path,
                         prefixes[-1]], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))

            for cfg in cfgs:  # meanwhile
                references[cfg.method] = _reference(cfg, tmp_path)

            deadline = time.time() + TIMEOUT
            for p, log in zip(procs, logs):
                try:
                    p.wait(timeout=max(1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"worker timed out after {TIMEOUT}s:\n{_tail(log)}")
                assert p.returncode == 0, f"worker failed ({p.returncode}):\n{_tail(log)}"
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=30)

    out = {}
    for cfg in cfgs:
        infos = []
        for prefix in prefixes:
            with open(f"{prefix}_{cfg.method}.npz.json") as f:
                infos.append(json.load(f))
        initial, reference, reference_all = references[cfg.method]
        out[cfg.method] = dict(
            cfg=cfg, infos=infos, initial=initial, reference=reference,
            reference_all=reference_all,
            weights=[np.load(f"{prefix}_{cfg.method}.npz") for prefix in prefixes])
    return tmp_path, out


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_workers_train_like_one_process(runs, method):
    import tensorflow as tf

    from clae_tf.job import checkpoints

    tmp_path, by_method = runs
    run = by_method[method]
    cfg, infos, initial = run["cfg"], run["infos"], run["initial"]
    reference, reference_all = run["reference"], run["reference_all"]
    whole = method == "moco"  # with the robust evaluation and the export (_config)
    assert [i["chief"] for i in infos] == [True, False]
    assert [i["step"] for i in infos] == [3, 3] and infos[0]["replicas"] == 2
    w0, w1 = run["weights"]
    assert sorted(w0.files) == sorted(reference_all)
    for k in reference_all:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)  # the workers agree exactly
    # ... and with one process on the same global batches, up to round-off (gRPC ring
    # all-reduce, synchronised vs fused BN, graph vs eager), which this tiny model amplifies
    # (see MULTI_STEP in distributed_test.py). With eps > 0 an x_adv sign at ~zero gradient
    # (a tie) could flip at one step and move the later ones; eps=0 still runs the attack
    # and the adversarial BN path, and distributed_test.py checks x_adv itself. A worker on
    # the wrong slice of the batch, or a wrong loss scale, would be off by O(1).
    diff = np.sqrt(sum(np.sum((w0[k] - reference[k]) ** 2) for k in reference))
    change = np.sqrt(sum(np.sum((reference[k] - initial[k]) ** 2) for k in reference))
    worst = max(reference, key=lambda k: np.linalg.norm(w0[k] - reference[k]) /
                (np.linalg.norm(reference[k] - initial[k]) + 1e-12))
    worst_ratio = (np.linalg.norm(w0[worst] - reference[worst]) /
                   np.linalg.norm(reference[worst] - initial[worst]))
    print(f"\n2 workers vs 1 process after 3 steps: |w_2 - w_1| / |w_1 - w_init| = "
          f"{diff / change:.2e}; worst variable {worst}: {worst_ratio:.2e}")
    # Measured: MoCo (SGD) 8e-7; SimCLR (Adam) 8.4e-4 since the workers run the compiled
    # multi-step loop against this eager reference: Adam turns last-bit differences of
    # near-zero gradients into lr-sized steps. A wrong slice or loss scale is O(1).
    assert diff / change < 1e-2
    if method == "moco":  # the queue holds the 3 global batches' keys, as on one process
        np.testing.assert_allclose(w0["moco_queue"], reference_all["moco_queue"], atol=1e-4)
        for k in reference_all:
            if k.startswith("key/"):
                np.testing.assert_allclose(w0[k], reference_all[k], atol=1e-4, err_msg=k)

    # Only the chief wrote into the workdir: checkpoints, results (with the robust ones), the
    # export, TensorBoard.
    run_dir = cfg.run_dir
    assert infos[0]["results"] and not infos[1]["results"]
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    assert results["step"] == 3 and results["method"] == method
    assert ("robust_top1" in results) == whole
    assert (infos[0]["saved_model"] is not None) == whole and infos[1]["saved_model"] is None
    assert os.path.exists(os.path.join(run_dir, "saved_model", "saved_model.pb")) == whole
    events = glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))
    assert events and all(f".{infos[0]['pid']}." in os.path.basename(e) for e in events), events
    assert tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints")).endswith("ckpt-3")
    # The non-chief saved too (collective), into temporary directories it removed again.
    assert os.listdir(tmp_path / "tmp1") == []

    # The multi-worker checkpoint restores on one device, at step 3, with the same weights.
    state = checkpoints.State(dataclasses.replace(cfg, strategy="one_device"),
                              tf.distribute.OneDeviceStrategy("/cpu:0"), 10, 10)
    assert state.restore() and state.step == 3
    for v in state.model.variables:
        np.testing.assert_array_equal(v.numpy(), w0[v.path], err_msg=v.path)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "worker":
    _worker(sys.argv[2], sys.argv[3])
