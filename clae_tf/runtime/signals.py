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
is only printed) is not the last one. Inside `held()` (a checkpoint being written) a signal
waits until the block ends.

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
    holding = 0  # depth of held() blocks
    held = None  # the first signal that arrived inside held()


_state = _State()


def describe(e: KeyboardInterrupt) -> str:
    """What stopped the run, for the error line: "interrupted" or "terminated (SIGTERM)"."""
    if isinstance(e, Interrupted) and e.signum == signal.SIGTERM:
        return "terminated (SIGTERM)"
    return "interrupted"


def _handler(signum, frame):
    if _state.stopping:
        return
    if _state.holding:
        _state.held = _state.held or signum
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
        _state.stopping, _state.held = False, None


@contextlib.contextmanager
def held():
    """Defers SIGINT and SIGTERM to the end of the block (a write that must not be cut short);
    one that arrived meanwhile is raised then, unless the process is already stopping.

    Only with the handlers installed (install, handling); otherwise the block is interruptible
    as any other code.
    """
    _state.holding += 1
    done = False
    try:
        yield
        done = True
    finally:
        _state.holding -= 1
        signum = _state.held if not _state.holding else None
        if signum is not None:
            _state.held = None
    if done and signum is not None and not _state.stopping:
        raise Interrupted(signum)
