"""Programs under test in their own process, watched through what they print.

A test waits for a line the program prints (a marker), never for a fixed time, and every wait
has a timeout that a machine three times slower than a busy one still meets. The
program's stdout and stderr are read as they come (by two threads), so a full pipe never
blocks it, and it runs in its own session with stdin closed: whether pytest runs in a
terminal, in the background or under CI does not reach it.
"""

import os
import re
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Seconds for a whole run.py of the smoke preset (about 60 s alone on 2 cores), or for a marker.
TIMEOUT = 600

# Runs argv[1:] with SIGINT ignored, as `nohup cmd &` from a script does: an exec keeps an
# ignored disposition, so the program starts with SIGINT ignored.
_SIGINT_IGNORED = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                   "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


class Program:
    """`python *args` started in REPO; `with Program(...) as p:` kills it if still running."""

    def __init__(self, args, env=None, sigint_ignored=False, cwd=REPO):
        env = dict(os.environ if env is None else env)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        prefix = [sys.executable, "-c", _SIGINT_IGNORED] if sigint_ignored else [sys.executable]
        self.proc = subprocess.Popen(prefix + list(args), cwd=cwd, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.pid = self.proc.pid
        self.lines = {"stdout": [], "stderr": []}
        self._changed = threading.Condition()
        self._open = 2
        for name in self.lines:
            threading.Thread(target=self._read, args=(name,), daemon=True).start()

    def _read(self, name):
        for line in getattr(self.proc, name):
            with self._changed:
                self.lines[name].append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._open -= 1
            self._changed.notify_all()

    def wait_for(self, pattern, stream="stdout", timeout=TIMEOUT) -> str:
        """The first line of `stream` that matches the regex `pattern` (from its start), once
        printed. Fails if the program ends without printing it, or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((line for line in self.lines[stream] if re.match(pattern, line)),
                             None)
                if found is not None:
                    return found
                if not self._open:
                    raise AssertionError(f"exited ({self.proc.wait()}) without printing "
                                         f"{pattern!r}:\n{self.tail()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {pattern!r} after {timeout} s:\n{self.tail()}")
                self._changed.wait(timeout=1.0)

    def send(self, sig):
        self.proc.send_signal(sig)

    def finish(self, timeout=TIMEOUT):
        """Waits for the exit. Returns (exit code, stdout text, stderr text)."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s:\n{self.tail()}")
        with self._changed:
            self._changed.wait_for(lambda: not self._open, timeout=60)
            return code, "\n".join(self.lines["stdout"]), "\n".join(self.lines["stderr"])

    def running(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n=3000) -> str:
        return ("stdout: " + "\n".join(self.lines["stdout"])[-n:] + "\nstderr: "
                + "\n".join(self.lines["stderr"])[-n:])

    def kill(self):
        """SIGKILL (no handler runs) and wait for the exit."""
        if self.running():
            self.proc.kill()
        self.proc.wait(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def run_py(*args, **kwargs) -> Program:
    """`python run.py *args` (the worktree's run.py and package)."""
    return Program(["run.py", *args], **kwargs)
