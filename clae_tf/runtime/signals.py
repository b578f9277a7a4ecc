"""Ctrl-C (SIGINT) and SIGTERM as one exception, in every phase of a run.

Both raise `Interrupted` (a KeyboardInterrupt) in the main thread: the train loop saves a
checkpoint and says so, run.py prints one `error:` line and exits with code 2. The handlers are
installed explicitly, whatever the process inherited: a program started in the background by a
non-interactive shell (`nohup ... &`, CI) starts with SIGINT ignored, and Python then installs
no KeyboardInterrupt handler of its own.

Whoever handles the interrupt (the train loop saving its checkpoint, run.py printing the
error) calls `stopping()` first: from then on the process is on its way out and later signals
are dropped, so a second Ctrl-C cannot cut short the checkpoint nor the message. Until then
every signal raises, so an interrupt that some code swallowed (an exception inside a __del__
is only printed) is not the last one. Inside `held()` (a checkpoint being written, an export's
renames) a signal waits until the block ends.

No TensorFlow here: run.py installs the handlers before it imports TensorFlow.
"""

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised by the handler in the main thread."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _State:
    stopping = False  # an interrupt is being handled: drop the signals that follow


_state = _State()


def describe(e: KeyboardInterrupt) -> str:
    """What stopped the run, for the error line: "interrupted" or "terminated (SIGTERM)"."""
    if isinstance(e, Interrupted) and e.signum == signal.SIGTERM:
        return "terminated (SIGTERM)"
    return "interrupted"


def _handler(signum, frame):
    if _state.stopping:
        return
    raise Interrupted(signum)


def stopping():
    """The process is on its way out (an interrupt or an error is being handled): drops the
    signals that follow, until the end of handling() (for good after install())."""
    _state.stopping = True


def install():
    """Handles SIGINT and SIGTERM for the rest of the process (entry points). Main thread only."""
    for sig in SIGNALS:
        signal.signal(sig, _handler)


@contextlib.contextmanager
def handling():
    """install() for the duration of the block, unless already installed (library callers of
    app.run); outside the main thread, where Python allows no handlers, it does nothing."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is _handler):
        yield
        return
    previous = {sig: signal.signal(sig, _handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _state.stopping = False


@contextlib.contextmanager
def held():
    """Holds SIGINT and SIGTERM back for the block (a write that must not be cut short: a
    checkpoint, an export's renames). A signal that arrives meanwhile is delivered when the block
    has completed, to the handler that was in place: this module's raises Interrupted (or drops
    it once the process is stopping), another one runs as it would have, the default one ends
    the process. Each signal is delivered once, in the order they came (a handler that raises
    ends the delivery: the first one raises). Blocks nest: an inner one hands its signals on to
    the outer one.

    If the block raises, its exception goes on and the signal is dropped: what the block was
    guarding is abandoned anyway. Outside the main thread, where Python allows no handlers, the
    block runs unprotected.

    The handlers are swapped at the Python level: blocking the signals (pthread_sigmask) would
    not do, TensorFlow's threads would take them and Python still runs its handlers in the main
    thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    for sig in dict.fromkeys(pending):
        signal.raise_signal(sig)
