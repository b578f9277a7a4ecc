"""A one-line progress bar with ETA that is right after a resume (it times only this process)."""

import sys
import time


class Progress:
    def __init__(self, start, total, stream=None, every=10):
        self.start, self.total, self.stream = start, total, stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every  # not a terminal (CI logs): one line every `every` steps
        self.t0 = time.time()

    def update(self, step, values):
        done = step - self.start
        if not self.tty and step % self.every and step != self.total:
            return
        elapsed = time.time() - self.t0
        eta = elapsed / done * (self.total - step) if done else float("nan")
        frac = step / max(1, self.total)
        bar = "=" * int(25 * frac)
        text = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        line = (f"step {step}/{self.total} [{bar:<25}] {100 * frac:3.0f}% {text} "
                f"| {_clock(elapsed)} elapsed, ETA {_clock(eta)}")
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        if self.tty and step == self.total:
            self.stream.write("\n")
        self.stream.flush()


def _clock(seconds):
    if seconds != seconds:  # nan
        return "--:--"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
