"""progress.py: the progress line, checked character for character, with a clock set by the test.

Not a terminal (a log file, CI): one line every `every` steps and one at the last step. A
terminal: every step, over the same line ("\r" ... "\033[K"), ended by a newline at the last.
The ETA counts only the steps of this process, so it is right after a resume.
"""

import io
import types

import pytest

from clae_tf.runtime import progress


@pytest.fixture
def clock(monkeypatch):
    """The time progress.py reads: now[0] seconds."""
    now = [1000.0]
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(time=lambda: now[0]))
    return now


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_lines_every_n_steps_and_at_the_end(clock):
    out = io.StringIO()
    bar = progress.Progress(0, 20, stream=out, every=10)
    clock[0] += 15.0
    bar.update(5, {"loss": 1.23456})  # not a multiple of every: nothing
    assert out.getvalue() == ""
    clock[0] += 15.0
    bar.update(10, {"loss": 1.23456, "contrast_acc": 0.5})
    clock[0] += 32.5
    bar.update(17, {"loss": 0.25})  # the last step only: nothing yet
    bar.update(20, {"loss": 0.000123456})
    assert out.getvalue() == (
        "step 10/20 [============             ]  50% loss 1.235 contrast_acc 0.5 "
        "| 00:30 elapsed, ETA 00:30\n"
        "step 20/20 [=========================] 100% loss 0.0001235 "
        "| 01:02 elapsed, ETA 00:00\n")


def test_after_a_resume_the_eta_counts_only_the_steps_of_this_process(clock):
    out = io.StringIO()
    bar = progress.Progress(4000, 10000, stream=out, every=100)
    clock[0] += 7200.0  # 100 steps in 2 h: 5900 steps left take 118 h
    bar.update(4100, {})
    clock[0] += 3599.0  # 200 steps in 10799 s: 5800 left take 29 x 10799 s = 86:59:31
    bar.update(4200, {"loss": 3})
    assert out.getvalue() == (
        "step 4100/10000 [==========               ]  41%  | 2:00:00 elapsed, ETA 118:00:00\n"
        "step 4200/10000 [==========               ]  42% loss 3 "
        "| 2:59:59 elapsed, ETA 86:59:31\n")


def test_a_terminal_gets_every_step_on_one_line(clock):
    out = _Terminal()
    bar = progress.Progress(2, 4, stream=out, every=10)
    bar.update(2, {"loss": 2.0})  # no step done yet: no ETA
    clock[0] += 61.0
    bar.update(3, {"loss": 1.5})
    clock[0] += 59.0
    bar.update(4, {"loss": 1.0})
    assert out.getvalue() == (
        "\rstep 2/4 [============             ]  50% loss 2 | 00:00 elapsed, ETA --:--\033[K"
        "\rstep 3/4 [==================       ]  75% loss 1.5 | 01:01 elapsed, ETA 01:01\033[K"
        "\rstep 4/4 [=========================] 100% loss 1 | 02:00 elapsed, ETA 00:00\033[K"
        "\n")
