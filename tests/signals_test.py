"""Ctrl-C (SIGINT) and SIGTERM in every phase of a run (clae_tf/runtime/signals.py, run.py).

The handlers and held() in-process first (signal.raise_signal delivers at once), then run.py in
a child process, signalled once it has printed the line that says which phase it is in: a run
started with SIGINT ignored (as `nohup ... &` starts it), SIGTERM during training (the same
command then resumes), Ctrl-C and SIGTERM during evaluation and export, and Ctrl-C pressed
again and again while the interrupt's checkpoint is being saved.
"""

import os
import signal
import threading
import time

import pytest
import tensorflow as tf

from clae_tf.job import checkpoints
from clae_tf.runtime import signals
from clae_tf.runtime import workdir as workdir_lib

from subprocs import TIMEOUT, Program, run_py

# ------------------------------------------------------------------------------ in-process


def _deliver(sig):
    """Delivers `sig` to this process now. Returns the KeyboardInterrupt it raised, or None
    (caught here, so that a wrong handler fails the test rather than stopping pytest)."""
    try:
        signal.raise_signal(sig)
    except KeyboardInterrupt as e:
        return e
    return None


@pytest.mark.parametrize("sig, why", [(signal.SIGINT, "interrupted"),
                                      (signal.SIGTERM, "terminated (SIGTERM)")])
def test_both_signals_interrupt_until_one_is_being_handled(sig, why):
    before = signal.getsignal(signal.SIGTERM)
    with signals.handling():
        e = _deliver(sig)
        assert isinstance(e, signals.Interrupted) and signals.describe(e) == why
        # Not handled yet (as if some code had swallowed it): the next one interrupts again.
        assert isinstance(_deliver(signal.SIGINT), signals.Interrupted)
        signals.stopping()  # now it is: later signals (of either kind) interrupt nothing
        assert _deliver(signal.SIGINT) is None and _deliver(signal.SIGTERM) is None
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handlers are back
    assert signals.describe(KeyboardInterrupt()) == "interrupted"  # Python's own Ctrl-C


def test_handling_whatever_sigint_disposition_was_inherited():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals.handling():
            assert isinstance(_deliver(signal.SIGINT), signals.Interrupted)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_signal_during_held_waits_for_its_end():
    done = []

    def save():
        with signals.held():
            assert _deliver(signal.SIGTERM) is None
            with signals.held():  # nested: still held at the inner block's end
                assert _deliver(signal.SIGINT) is None
            done.append("inner")
            done.append("outer")

    with signals.handling():
        try:
            save()
        except KeyboardInterrupt as e:
            done.append(e)
        assert done[:2] == ["inner", "outer"] and len(done) == 3
        assert isinstance(done[2], signals.Interrupted) and done[2].signum == signal.SIGTERM
        signals.stopping()  # held blocks then complete and raise nothing
        with signals.held():
            assert _deliver(signal.SIGINT) is None
    with signals.handling():  # a new run starts afresh (not stopping)
        assert isinstance(_deliver(signal.SIGINT), signals.Interrupted)


def test_held_hands_the_signal_to_the_handler_in_place_when_the_block_ends():
    """Without this module's handlers (library callers): the handler that was in place gets the
    signal once the block has completed, and is in place again."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    done = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals.held():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100):  # time for the handler to run, were it not held back
                    time.sleep(0.001)
                done = True
        assert done
        assert signal.getsignal(signal.SIGTERM) is interrupt
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_signal_during_a_held_block_that_raises_is_dropped():
    with signals.handling():
        with pytest.raises(ValueError):
            with signals.held():
                assert _deliver(signal.SIGTERM) is None
                raise ValueError("the write failed")
        assert isinstance(_deliver(signal.SIGINT), signals.Interrupted)  # handlers back


def test_held_outside_the_main_thread_runs_the_block_unprotected():
    """Python allows no handlers there: held() neither fails nor touches them."""
    seen = []

    def body():
        with signals.held():
            seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [before]


# ----------------------------------------------------------------------- run.py, in a child


def _long_run(tmp_path, *extra):
    """The smoke preset for far longer than a test waits, one step per call and per line."""
    return ["--flagfile=flags/smoke.cfg", "--epochs=1000", "--steps_per_loop=1", "--log_every=1",
            "--ckpt_every=1000", "--eval_every_epochs=0", "--noexport",
            f"--workdir={tmp_path / 'run'}", *extra]


def _tail(err, n=4000):
    """The end of stderr without faulthandler's list of extension modules (one long line)."""
    return "\n".join(line for line in err.splitlines() if len(line) < 1000)[-n:]


def _error_line(err):
    """The one `error:` line, last on stderr (after TensorFlow's start-up lines), no traceback."""
    assert "Traceback" not in err, _tail(err)
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("error")] == lines[-1:], _tail(err)
    return lines[-1]


def _saved_at_interrupt(err, why, workdir):
    """Checks the interrupt's line and that its checkpoint is on disk whole. Returns its step."""
    line = _error_line(err)
    prefix = f"error: {why} at step "
    assert line.startswith(prefix), line
    step = int(line[len(prefix):].split(";")[0])
    directory = os.path.join(workdir, "checkpoints")
    assert line == (f"{prefix}{step}; checkpoint saved in {directory}; run the same command to "
                    f"resume")
    newest = workdir_lib.checkpoint_paths(directory)[0]
    assert newest == os.path.join(directory, f"ckpt-{step}")
    assert checkpoints.unreadable(newest) is None
    assert tf.train.load_checkpoint(newest).get_tensor(
        "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == step
    return step


def test_child_starts_with_sigint_ignored():
    """What the next test relies on: Program(sigint_ignored=True) starts the program with
    SIGINT ignored, as a background job of a non-interactive shell starts."""
    with Program(["-c", "import signal; print(signal.getsignal(signal.SIGINT).name)"],
                 sigint_ignored=True) as child:
        code, out, err = child.finish()
    assert (code, out) == (0, "SIG_IGN"), err


@pytest.mark.slow  # a smoke run's start-up and a few steps
def test_ctrl_c_stops_a_run_started_with_sigint_ignored(tmp_path):
    with run_py(*_long_run(tmp_path), sigint_ignored=True) as run:
        run.wait_for(r"step 2/")
        run.send(signal.SIGINT)
        code, out, err = run.finish()
    assert code == 2, _tail(err)
    assert _saved_at_interrupt(err, "interrupted", str(tmp_path / "run")) >= 2


@pytest.mark.slow  # a smoke run's start-up and a few steps
def test_ctrl_c_again_and_again_keeps_the_interrupts_checkpoint(tmp_path):
    """Ctrl-C every 20 ms from the first on, until the program has said how it ended: the
    signals after the first must not cut short the checkpoint it saves, nor the message."""
    with run_py(*_long_run(tmp_path)) as run:
        run.wait_for(r"step 3/")
        sent, deadline = 0, time.monotonic() + TIMEOUT
        while run.running() and not any(line.startswith("error") for line in run.lines["stderr"]):
            assert time.monotonic() < deadline, f"{sent} SIGINTs did not stop it:\n{run.tail()}"
            run.send(signal.SIGINT)
            sent += 1
            # The user hammering Ctrl-C, not a wait for the program: 20 ms apart, so that the
            # second lands while the first's checkpoint is being saved even when that is quick.
            time.sleep(0.02)
        code, out, err = run.finish()
    assert sent >= 2
    assert code == 2, _tail(err)
    assert _saved_at_interrupt(err, "interrupted", str(tmp_path / "run")) >= 3


@pytest.mark.slow  # a two-step smoke run, then an export of it
def test_sigterm_during_evaluation_and_export_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    where = (f"; checkpoints so far are kept in {workdir}/checkpoints (the same command "
             f"resumes; --mode=eval --workdir={workdir} re-evaluates)")
    with run_py("--flagfile=flags/smoke.cfg", "--max_steps=2", "--linear_epochs=100000",
                "--eval_every_epochs=0", f"--workdir={workdir}") as run:
        run.wait_for(r"Evaluating step 2: ")  # the probe runs for much longer than this test
        run.send(signal.SIGTERM)
        code, out, err = run.finish()
    assert code == 2, _tail(err)
    assert _error_line(err) == f"error: terminated (SIGTERM){where}"
    with run_py("--mode=export", f"--workdir={workdir}") as run:
        run.wait_for(r"Exporting the encoder of step 2 ")
        run.send(signal.SIGTERM)
        code, out, err = run.finish()
    assert code == 2, _tail(err)
    assert _error_line(err) == f"error: terminated (SIGTERM){where}"


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    # One epoch (22 steps) leaves many steps after the marker; the evaluation at the end is
    # cut to kNN and a one-epoch probe (no robust suite, no online kNN): only the resume counts.
    args = ["--flagfile=flags/smoke.cfg", "--epochs=1", "--linear_epochs=1", "--noexport",
            f"--workdir={workdir}", "--log_every=1", "--steps_per_loop=1", "--ckpt_every=1000",
            "--robust_attacks=", "--eval_every_epochs=0"]
    with run_py(*args) as run:
        run.wait_for(r"step 3/")  # a few steps have run
        run.send(signal.SIGTERM)
        code, _, err = run.finish()
    assert code == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: terminated (SIGTERM) at step ") and "resume" in last
    saved = int(last.split("at step ")[1].split(";")[0])
    assert saved >= 3
    assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints")).endswith(f"-{saved}")
    # The same command resumes from there and finishes.
    with run_py(*args) as run:
        code, out, err = run.finish()
    assert code == 0, err[-2000:]
    assert "Resuming from" in out and f"at step {saved}." in out


@pytest.mark.slow
def test_ctrl_c_during_evaluation_is_one_line(tmp_path):
    with run_py("--flagfile=flags/smoke.cfg", "--epochs=1", "--max_steps=2",
                "--linear_epochs=100000", "--noexport", f"--workdir={tmp_path / 'run'}") as run:
        run.wait_for(r"Evaluating step 2: ")  # the probe runs for much longer than this test
        run.send(signal.SIGINT)
        code, _, err = run.finish()
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: interrupted; checkpoints so far")
