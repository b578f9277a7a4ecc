"""TensorFlow's start-up lines that are expected on a machine without an NVIDIA driver, kept off
the first screen.

On a CPU-only machine TensorFlow's C++ start-up writes "failed call to cuInit: ... CUDA error"
(an E-level line), "Could not find cuda drivers", absl's "All log messages before
absl::InitializeLog()" and a notice to rebuild TensorFlow for the CPU's instructions, straight
to file descriptor 2, before any Python logging setting applies (TF_CPP_MIN_LOG_LEVEL does not
reach them). A newcomer reads them as failures. `start_tensorflow` starts TensorFlow's devices
with descriptor 2 passing through a filter that drops exactly these lines, and only where no
NVIDIA driver is installed: with a driver, a cuInit failure is a real error and is shown. Every
other line passes, in order; the filter ends once the devices are up.
"""

import contextlib
import os
import subprocess
import sys

NVIDIA_DRIVER = "/proc/driver/nvidia/version"
# Substrings of the lines dropped when no NVIDIA driver is installed.
NO_GPU_NOISE = (
    "failed call to cuInit",
    "Could not find cuda drivers on your machine",
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",
)


# The filter runs in its own process, so that a crash of this one (an abort while TensorFlow
# starts) still lets it pass on every line written before the crash.
_FILTER = """
import sys
drop = [s.encode() for s in sys.argv[1:]]
for line in sys.stdin.buffer:
    if not any(d in line for d in drop):
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
"""


@contextlib.contextmanager
def stderr_without(drop):
    """Within the block, lines written to file descriptor 2 (by Python or C++) that contain one
    of the strings in `drop` are dropped; the others reach the original stderr unchanged."""
    if not drop:
        yield
        return
    original = os.dup(2)
    # Its own session: a Ctrl-C at the terminal reaches this process, not the filter.
    child = subprocess.Popen([sys.executable, "-c", _FILTER, *drop], stdin=subprocess.PIPE,
                             stdout=original, start_new_session=True)
    os.dup2(child.stdin.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)
        child.stdin.close()  # the filter reads to the end, passes the rest on and exits
        child.wait()
        os.close(original)


def start_tensorflow(driver_path: str = NVIDIA_DRIVER):
    """Imports TensorFlow and starts its devices, without the no-GPU noise where no driver is
    installed (module docstring). Returns the tensorflow module."""
    drop = () if os.path.exists(driver_path) else NO_GPU_NOISE
    with stderr_without(drop):
        import tensorflow as tf
        tf.config.list_physical_devices()
    return tf
