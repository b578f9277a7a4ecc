"""runtime/quiet_start.py: the no-GPU start-up lines are dropped from stderr, every other line
passes in order, also when the process crashes inside the filter's block, and nothing is dropped
where an NVIDIA driver is installed."""

import subprocess
import sys

import pytest

from conftest import REPO

_WRITER = """
import os, sys
from clae_tf.runtime import quiet_start
print("before noise", file=sys.stderr, flush=True)
with quiet_start.stderr_without(("noise",)):
    os.write(2, b"noise from C++\\nreal error 1\\n")
    print("python noise", file=sys.stderr, flush=True)
    print("real error 2", file=sys.stderr, flush=True)
    if sys.argv[1] == "crash":
        os.abort()
print("after noise", file=sys.stderr, flush=True)
"""


@pytest.mark.parametrize("how", ["normal", "crash"])
def test_only_the_listed_lines_are_dropped_in_order_even_on_a_crash(how):
    proc = subprocess.run([sys.executable, "-c", _WRITER, how], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    expected = ["before noise", "real error 1", "real error 2"]
    if how == "normal":
        assert proc.returncode == 0
        expected.append("after noise")
    else:
        assert proc.returncode != 0
    assert proc.stderr.splitlines() == expected


_START = """
import sys
from clae_tf.runtime import quiet_start
tf = quiet_start.start_tensorflow(sys.argv[1])
print("devices", len(tf.config.list_physical_devices()))
"""


@pytest.mark.slow  # two TensorFlow start-ups
def test_the_cuinit_line_is_dropped_only_without_a_driver(tmp_path):
    driver = tmp_path / "version"

    def start():
        return subprocess.run([sys.executable, "-c", _START, str(driver)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    without = start()
    assert without.returncode == 0 and "devices" in without.stdout
    assert "cuInit" not in without.stderr and "InitializeLog" not in without.stderr
    driver.write_text("NVRM version: a driver is installed\n")
    shown = start()
    assert shown.returncode == 0
    if "cuInit" not in shown.stderr:  # a TensorFlow built without CUDA never calls it
        pytest.skip("this TensorFlow writes no cuInit line to filter")
    assert "InitializeLog" in shown.stderr
