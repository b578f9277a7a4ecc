"""Ctrl-C (SIGINT) and SIGTERM as a request to stop, taken at a safe point of every phase.

The handler raises nothing: it records the request. The program takes it at its next safe
point, `check()`, which raises `Interrupted` (a KeyboardInterrupt) there: between the compiled
calls of the train loop, of the probe's training, of each attack; between the batches of an
evaluation and the files of an export. The train loop then saves a checkpoint and says so,
run.py prints one `error:` line and exits with code 2. A handler that raised wherever the main
thread happened to be would land inside TensorFlow's tracing or an import (SystemError,
AssertionError tracebacks), which is why it does not.

Some work has no safe point for a long time: an import, tracing a function, one long compiled
call. A program that calls `install()` (run.py) also gets a watchdog thread, woken by the
signal itself (signal.set_wakeup_fd: Python runs its handlers only between bytecodes of the
main thread, which a compiled call does not return to): if no safe point has taken the request
within GRACE_SECONDS, and no `held()` or `patient()` block is running, it prints the same one
line and ends the process at once with code 2 (os._exit). Nothing is lost by that: every file
is written to a temporary name and renamed into place inside `held()` (files.replacing), the
temporary names of the writes under way are removed first (`scratch`), and the work cut short
is what a safe point would have discarded as well; the train loop, whose safe points save the
steps since the last checkpoint, waits for them in `patient()`. A library caller of app.run
(`handling()`) gets the requests without the watchdog: nobody ends its process but itself.

Whoever handles the interrupt (the train loop saving its checkpoint, run.py printing the
error) calls `stopping()` first: from then on the process is on its way out and later signals
are dropped, so a second or third Ctrl-C changes nothing. The handlers are installed
explicitly, whatever the process inherited: a program started in the background by a
non-interactive shell (`nohup ... &`, CI) starts with SIGINT ignored.

No TensorFlow here: run.py installs the handlers before it imports TensorFlow.
"""

import contextlib
import os
import shutil
import signal
import socket
import sys
import threading
import time

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How long the watchdog gives the program to reach a safe point before it ends the process.
GRACE_SECONDS = 1.0


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised by check() at a safe point of the main thread."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _State:
    lock = threading.Lock()
    request = None  # the signal of the stop request not taken yet
    requested_at = 0.0  # its time.monotonic()
    stopping = False  # an interrupt or an error is being handled: drop the signals that follow
    held = 0  # depth of held() blocks: the watchdog waits for them
    patient = 0  # depth of patient() blocks: the watchdog waits for their safe points
    scratch = []  # temporary files and folders being written (scratch): removed at a hard exit
    watchdog = None  # install(): the wake-up socket pair of the watchdog thread
    note = ""  # what the hard exit's line adds after "error: <why>" (set_exit_note)


_state = _State()


def describe(e: KeyboardInterrupt) -> str:
    """What stopped the run, for the error line: "interrupted" or "terminated (SIGTERM)"."""
    if isinstance(e, Interrupted) and e.signum == signal.SIGTERM:
        return "terminated (SIGTERM)"
    return "interrupted"


def _request(signum: int):
    """Records a stop request (the handler and the watchdog's wake-up both call it)."""
    with _state.lock:
        if _state.stopping or _state.request is not None:
            return
        _state.request, _state.requested_at = signum, time.monotonic()


def _handler(signum, frame):
    # With the watchdog, its thread records the signals, in the order they came (Python runs
    # the handlers of signals that arrive together by number, SIGINT before SIGTERM).
    if _state.watchdog is None:
        _request(signum)


def check():
    """A safe point: raises Interrupted if a stop has been requested (not inside held(), and
    not once the process is stopping)."""
    with _state.lock:
        signum = _state.request
        if signum is None or _state.held or _state.stopping:
            return
        _state.request = None
    raise Interrupted(signum)


def stopping():
    """The process is on its way out (an interrupt or an error is being handled): drops the
    signals that follow, until the end of handling() (for good after install(): ignored from
    here on, since Python puts back the default handlers, which end the process, when the
    interpreter shuts down, and TensorFlow's shutdown takes a while)."""
    with _state.lock:
        _state.stopping, _state.request = True, None
    if _state.watchdog is not None and threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def set_exit_note(note: str):
    """The rest of the line a hard exit prints after "error: <why>" (run.py: where the
    checkpoints are and how to resume)."""
    _state.note = note


def install():
    """Handles SIGINT and SIGTERM for the rest of the process, with the watchdog (entry points;
    main thread only)."""
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    if _state.watchdog is not None:
        return
    _state.watchdog = wake_read, wake_write = socket.socketpair()
    wake_write.setblocking(False)
    signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(wake_read,), name="clae-signals", daemon=True).start()


def _watch(wake_read):
    """The watchdog: records each signal as it arrives (the C handler writes its number to the
    wake-up socket at once, whatever the main thread is doing) and ends the process if no safe
    point takes the request in time (and no held() or patient() block is running)."""
    wake_read.settimeout(0.05)
    while True:
        try:
            for signum in wake_read.recv(64):
                if signum in SIGNALS:
                    _request(signum)
        except socket.timeout:
            pass
        with _state.lock:
            due = (_state.request is not None and not (_state.held or _state.patient)
                   and not _state.stopping
                   and time.monotonic() - _state.requested_at >= GRACE_SECONDS)
            if due:
                signum, _state.stopping = _state.request, True
                paths = list(_state.scratch)
        if due:
            _hard_exit(signum, paths)


def _hard_exit(signum: int, paths):
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            try:
                os.remove(path)
            except OSError:
                pass
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 (the main thread may hold the stream: its lines are lost)
        pass
    why = describe(Interrupted(signum))
    os.write(2, f"error: {why}{_state.note}\n".encode())
    os._exit(2)


@contextlib.contextmanager
def handling():
    """Records SIGINT and SIGTERM as requests for the duration of the block, unless already
    installed (library callers of app.run); outside the main thread, where Python allows no
    handlers, it does nothing."""
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
        with _state.lock:
            _state.stopping, _state.request = False, None


@contextlib.contextmanager
def held():
    """A block that must not be cut short: a write (a checkpoint, an export's renames) or a
    compiled call whose work a stop at its end keeps. A request that arrives meanwhile (or was
    pending) waits: the watchdog does not end the process during the block, and check() raises
    it once the outermost block has completed - at its end, the next safe point. If the block
    raises, its exception goes on and the request stays for the next safe point.

    Without this module's handlers in place (a library caller's own), the signals are held
    back at the Python level and delivered once the block has completed, each once, to the
    handler that was in place (blocking them with pthread_sigmask would not do: TensorFlow's
    threads would take them and Python still runs its handlers in the main thread). Outside
    the main thread, where Python allows no handlers, the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGINT) is not _handler:
        with _foreign_held():
            yield
        return
    with _state.lock:
        _state.held += 1
    try:
        yield
    finally:
        with _state.lock:
            _state.held -= 1
    check()


@contextlib.contextmanager
def patient():
    """A block whose safe points are worth waiting for: the watchdog does not end the process
    during it, check() raises as usual (the train loop once its first call has run: a stop at a
    safe point saves the steps since the last checkpoint, a hard exit would lose them)."""
    with _state.lock:
        _state.patient += 1
    try:
        yield
    finally:
        with _state.lock:
            _state.patient -= 1


@contextlib.contextmanager
def loop_of_calls():
    """handling() around a loop of compiled calls whose safe points keep its work (the train
    loop, a fine-tune): yields `first_call_done`, to call after each call; from the first on
    the rest of the block is patient() (the first traces and compiles, and has done nothing a
    wait would keep)."""
    with handling(), contextlib.ExitStack() as stack:
        entered = []

        def first_call_done():
            if not entered:
                entered.append(stack.enter_context(patient()))
        yield first_call_done


@contextlib.contextmanager
def _foreign_held():
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


@contextlib.contextmanager
def scratch(path: str):
    """`path` is a temporary file or folder being written for the block: a hard exit of the
    watchdog removes it first, so that nothing temporary is left behind."""
    with _state.lock:
        _state.scratch.append(path)
    try:
        yield path
    finally:
        with _state.lock:
            _state.scratch.remove(path)
