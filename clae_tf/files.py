"""The run's own files in its workdir: written so that a kill never leaves half a file.

No TensorFlow here: these run before (and without) it.
"""

import contextlib
import fcntl
import json
import os
import sys
from typing import Optional

from clae_tf import ClaeError


def check_writable(workdir: str):
    """Creates `workdir` if needed and writes and removes a probe file in it.

    So that a workdir that cannot hold the run (a regular file, a read-only filesystem, no
    permission) fails at once with one line, not with a traceback at the first checkpoint.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ClaeError(f"--workdir: {workdir} is a file, not a directory")
    probe = os.path.join(workdir, f".clae_write_probe.{os.getpid()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("probe\n")
        os.remove(probe)
    except OSError as e:  # EROFS, EACCES, ENOTDIR (a parent is a file), ENOSPC...
        where = f": {e.filename}" if e.filename and e.filename not in (workdir, probe) else ""
        raise ClaeError(f"--workdir: cannot write in {workdir} ({e.strerror or e}{where})")


LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Holds `workdir` for one run: a second run on it fails at once, before writing anything.

    An advisory lock (flock) on <workdir>/.lock, which holds the holder's pid. The kernel drops
    it when the process ends, however it ends (kill -9 included), so it never goes stale; the
    file itself stays.

    Args:
      workdir: the run's directory; it must exist (check_writable).

    Raises:
      ClaeError: `--workdir: <workdir> is in use by process <pid>`.
    """
    path = os.path.join(workdir, LOCK_FILE)
    with open(path, "a+") as f:  # "a+": the holder's pid stays readable until we hold it
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "unknown"  # between the holder's flock and its write
            raise ClaeError(f"--workdir: {workdir} is in use by process {pid}") from None
        except OSError as e:  # a filesystem without locks (some network and FUSE mounts)
            print(f"warning: cannot lock {path} ({e.strerror or e}); nothing stops a second "
                  f"run on this workdir", file=sys.stderr)
            yield
            return
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_atomic(path: str, text: str):
    """Replaces `path` with `text` so that readers see the old file or the new one, never a part.

    The text goes to a temporary file in the same directory (the same filesystem, so the rename
    is atomic), is flushed to disk, and os.replace puts it in place. A kill before the rename
    leaves the old file intact (and a stray `<path>.<pid>.tmp`).
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_json(path: str) -> Optional[dict]:
    """The JSON object in `path`, or None when it is missing or unreadable (says so, one line).

    A results.json cut short by a kill (before writes were atomic) must not stop later runs.
    """
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            value = json.load(f)
        if not isinstance(value, dict):
            raise ValueError(f"a JSON {type(value).__name__}, not an object")
        return value
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        print(f"warning: {path} is unreadable ({str(e).splitlines()[0][:100]}); treating it as "
              f"absent", file=sys.stderr)
        return None
