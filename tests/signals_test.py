"""Ctrl-C (SIGINT) and SIGTERM in every phase of a run (clae_tf/runtime/signals.py, run.py).

In-process first: a signal is a request, taken at the next safe point (check), held back by
held() blocks. Then the watchdog of install() in a small child process (no TensorFlow): it ends
a program that reaches no safe point, with the one line and exit code 2, waits for a held block
and removes the scratch files. Then run.py itself, signalled at many moments of every phase of
the smoke preset, one run after the other on one workdir, each resuming where the one before
stopped.
"""

import glob
import json
import os
import signal
import threading
import time

import pytest

from clae_tf.job import checkpoints
from clae_tf.runtime import signals
from clae_tf.runtime import workdir as workdir_lib

from subprocs import REPO, TIMEOUT, Program, run_py

# ------------------------------------------------------------------------------ in-process


@pytest.mark.parametrize("sig, why", [(signal.SIGINT, "interrupted"),
                                      (signal.SIGTERM, "terminated (SIGTERM)")])
def test_a_signal_is_a_request_taken_at_the_next_safe_point(sig, why):
    before = signal.getsignal(signal.SIGTERM)
    with signals.handling():
        signal.raise_signal(sig)  # the handler runs now, and raises nothing
        with pytest.raises(signals.Interrupted) as e:
            signals.check()
        assert signals.describe(e.value) == why and e.value.signum == sig
        signals.check()  # taken: nothing is pending any more
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)  # the first request is the one taken
        with pytest.raises(signals.Interrupted) as e:
            signals.check()
        assert e.value.signum == signal.SIGINT
        signals.stopping()  # on its way out: later signals (of either kind) request nothing
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        signals.check()
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handlers are back
    assert signals.describe(KeyboardInterrupt()) == "interrupted"  # Python's own Ctrl-C
    with signals.handling():  # a new run starts afresh (not stopping)
        signal.raise_signal(signal.SIGTERM)
        with pytest.raises(signals.Interrupted):
            signals.check()


def test_handling_whatever_sigint_disposition_was_inherited():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals.handling():
            signal.raise_signal(signal.SIGINT)
            with pytest.raises(signals.Interrupted):
                signals.check()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_request_during_held_is_taken_when_the_outermost_block_ends():
    done = []
    with signals.handling():
        with pytest.raises(signals.Interrupted) as e:
            with signals.held():
                signal.raise_signal(signal.SIGTERM)
                signals.check()  # not a safe point inside the block
                with signals.held():  # nested: the inner block's end is not one either
                    signal.raise_signal(signal.SIGINT)
                done.append("inner")
                signals.check()
                done.append("outer")
        assert done == ["inner", "outer"] and e.value.signum == signal.SIGTERM
        signals.stopping()  # held blocks then complete and raise nothing
        with signals.held():
            signal.raise_signal(signal.SIGINT)


def test_a_held_block_that_raises_leaves_the_request_for_the_next_safe_point():
    with signals.handling():
        with pytest.raises(ValueError):
            with signals.held():
                signal.raise_signal(signal.SIGTERM)
                raise ValueError("the write failed")
        with pytest.raises(signals.Interrupted) as e:
            signals.check()
        assert e.value.signum == signal.SIGTERM


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



# ------------------------------------------------------------- the watchdog, in a child process

# install() as run.py calls it, then a scratch folder and a main thread that reaches no safe
# point: a pure-Python loop (the handler runs, nothing takes the request), a sleep (a call that
# does not return to Python, as a compiled call does not) or a held block longer than the
# grace period, whose end is a safe point.
_WATCHDOG = """
import os, sys, time
sys.path.insert(0, {repo!r})
from clae_tf.runtime import signals
signals.install()
signals.set_exit_note("; the note")
scratch, mode = sys.argv[1:]
os.makedirs(scratch)
try:
    with signals.scratch(scratch):
        print("ready", flush=True)
        if mode == "loop":
            while True:
                pass
        if mode == "sleep":
            time.sleep(600)
        with signals.held():
            start = time.monotonic()
            while time.monotonic() - start < 3 * signals.GRACE_SECONDS:
                pass
            print("held ended", flush=True)
except signals.Interrupted as e:
    print(f"taken {{e.signum}}", flush=True)
    sys.exit(3)
"""


def _watchdog(tmp_path, mode, **kwargs):
    scratch = tmp_path / "scratch"
    return scratch, Program(["-c", _WATCHDOG.format(repo=REPO), str(scratch), mode], **kwargs)


@pytest.mark.parametrize("mode", ["loop", "sleep"])
def test_the_watchdog_ends_a_program_that_reaches_no_safe_point(tmp_path, mode):
    scratch, program = _watchdog(tmp_path, mode, sigint_ignored=True)
    with program:
        program.wait_for("ready")
        assert scratch.is_dir()
        # Later signals are dropped. Of the same kind as the first: two kinds pending together
        # are delivered by number (SIGINT first), whatever order they were sent in.
        for _ in range(3):
            program.send(signal.SIGTERM)
        code, out, err = program.finish()
    assert (code, err.strip()) == (2, "error: terminated (SIGTERM); the note"), err
    assert not scratch.exists()  # the scratch of the write under way is removed


def test_the_watchdog_waits_for_a_held_block(tmp_path):
    scratch, program = _watchdog(tmp_path, "held")
    with program:
        program.wait_for("ready")
        program.send(signal.SIGINT)
        code, out, err = program.finish()
    assert (code, out.splitlines()) == (3, ["ready", "held ended", "taken 2"]), err
    assert scratch.is_dir()  # nothing was cut short


# -------------------------------------------------- run.py, signalled in every phase of a run

_WHY = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}
# (the line that starts the moment, None: the handlers are in place; stdout or stderr; seconds
# after it; the first signal). The seconds are where the signal lands (the test samples moments
# of each phase; what it checks holds whenever the signal lands), not a wait for the program.
_MOMENTS = [
    (None, 0.0, signal.SIGTERM),  # imports
    (None, 3.0, signal.SIGINT),  # TensorFlow's start, data, the model, tracing the train step
    (r"step \d+/", 0.0, signal.SIGINT),  # training
    (r"step \d+/", 0.3, signal.SIGTERM),  # training again, after the resume
    (r"Evaluating step", 0.0, signal.SIGTERM),  # features and kNN
    (r"Evaluating step", 1.0, signal.SIGINT),  # the linear probe
    (r"Robust linf pgd20: attacking", 0.0, signal.SIGTERM),  # tracing an attack
    (r"Robust linf apgd-ce: attacking", 0.3, signal.SIGINT),
    (r"Robust linf square: attacking", 0.1, signal.SIGTERM),
    (r"Exporting", 0.0, signal.SIGTERM),  # tracing and writing the SavedModel
    (r"Exporting", 1.5, signal.SIGINT),  # the SavedModel, the Keras model or the probe's
]


def _handles_sigterm(pid) -> bool:
    """Whether the process has its own SIGTERM handler yet (SigCgt of /proc/<pid>/status):
    run.py installs it first thing."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def _wait_for_handlers(run):
    deadline = time.monotonic() + TIMEOUT
    while not _handles_sigterm(run.pid):
        assert run.running() and time.monotonic() < deadline, run.tail()
        time.sleep(0.005)  # polls the program's state


def _leftovers(workdir):
    """Temporary files and folders anywhere in the workdir: a write cut short."""
    return [path for pattern in ("*.tmp", "*.old", "*_temp*")
            for path in glob.glob(os.path.join(workdir, "**", pattern), recursive=True)]


def _check_whole(workdir):
    """Every file of the workdir whole: no temporary leftovers, the newest checkpoint readable,
    results.json and the exports' manifest readable."""
    assert not _leftovers(workdir), _leftovers(workdir)
    directory = os.path.join(workdir, workdir_lib.CHECKPOINTS)
    if os.path.isdir(directory) and workdir_lib.checkpoint_paths(directory):
        newest = workdir_lib.checkpoint_paths(directory)[0]
        assert checkpoints.unreadable(newest) is None, newest
    for name in (workdir_lib.RESULTS_FILE, "export.json"):
        if os.path.exists(os.path.join(workdir, name)):
            with open(os.path.join(workdir, name)) as f:
                json.load(f)


def _stop_line(err, first, workdir, training):
    """The one `error:` line of a stop, last on stderr, no traceback; its checkpoint's step if
    it says the train loop saved one."""
    assert "Traceback" not in err, err[-4000:]
    err, context = err.split("\nmoment ", 1)
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("error")] == lines[-1:], err[-4000:]
    line, why = lines[-1], _WHY[first]
    directory = os.path.join(workdir, workdir_lib.CHECKPOINTS)
    saved = line.startswith(f"error: {why} at step ")
    if saved:
        step = int(line.split(" at step ")[1].split(";")[0])
        assert line == (f"error: {why} at step {step}; checkpoint saved in {directory}; run "
                        f"the same command to resume")
        assert workdir_lib.checkpoint_paths(directory)[0].endswith(f"ckpt-{step}")
        return step
    assert not training, (line, context)  # the train loop takes it at a safe point
    assert line in (f"error: {why}", f"error: {why}; checkpoints so far are kept in "
                    f"{directory} (the same command resumes; --mode=eval --workdir={workdir} "
                    f"re-evaluates)"), line
    return None


@pytest.mark.slow  # 12 runs of the smoke preset on one workdir, most of them cut short
def test_signals_at_every_moment_of_a_run_stop_it_with_one_line_and_it_resumes(tmp_path):
    """Each run gets three signals, the first at one of _MOMENTS, two more of the same kind
    50 and 300 ms later (the user pressing Ctrl-C again while it stops), started with SIGINT
    ignored as a CI runner starts it: exit 2, the one line of the first, no traceback, the
    workdir whole, and the same command resumes; the last run, not signalled, finishes.
    CLAE_SIGNAL_DELAYS=<path> writes each stop's delay (first signal to exit) there."""
    workdir = str(tmp_path / "run")
    command = ["--flagfile=flags/smoke.cfg", "--epochs=4", f"--workdir={workdir}",
               "--robust_examples=20", "--robust_eps=8", "--robust_l2_eps=",
               "--robust_attacks=pgd20,apgd-ce,square"]
    delays, sent = [], 0
    for pattern, after, first in _MOMENTS:
        with run_py(*command, sigint_ignored=True) as run:
            if pattern is None:
                _wait_for_handlers(run)
            else:
                run.wait_for(pattern)
            time.sleep(after)
            t = time.monotonic()
            for wait in (0.05, 0.25, 0):  # one kind: two pending together go by number
                if run.running():
                    run.send(first)
                    sent += 1
                time.sleep(wait)
            code, out, err = run.finish()
            delays.append({"moment": pattern or f"start + {after} s", "after": after,
                           "seconds": time.monotonic() - t})
        assert code == 2, (pattern, after, err[-4000:])
        _stop_line(err + f"\nmoment {pattern} + {after} s; stdout:\n{out[-1500:]}", first,
                   workdir, training="Evaluating" not in out and "step" in (pattern or ""))
        _check_whole(workdir)
    assert sent >= 30
    with run_py(*command) as run:
        code, out, err = run.finish()
    assert code == 0, err[-4000:]
    assert "Resuming from" in out and "Exporting" in out
    _check_whole(workdir)
    if os.environ.get("CLAE_SIGNAL_DELAYS"):
        with open(os.environ["CLAE_SIGNAL_DELAYS"], "w") as f:
            json.dump({"delays": delays, "loadavg": os.getloadavg()}, f, indent=1)
