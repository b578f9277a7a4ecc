"""File primitives for a run's workdir: written so that a kill never leaves half a file, held by
one process at a time. What the files are and where they go is workdir.py's.

No TensorFlow here: these run before (and without) it.
"""

import contextlib
import fcntl
import json
import os
import re
import shutil
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


@contextlib.contextmanager
def workdir_lock(workdir: str, lock_file: str):
    """Holds `workdir` for one run: a second run on it fails at once, before writing anything.

    An advisory lock (flock) on <workdir>/<lock_file>, which holds the holder's pid. The kernel
    drops it when the process ends, however it ends (kill -9 included), so it never goes stale;
    the file itself stays.

    Args:
      workdir: the run's directory; it must exist (check_writable).
      lock_file: the name of the lock file in it (workdir.LOCK_FILE).

    Raises:
      ClaeError: `--workdir: <workdir> is in use by process <pid>`.
    """
    path = os.path.join(workdir, lock_file)
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

    A results.json that is not valid JSON (cut short by a tool that does not write atomically,
    or edited by hand) must not stop later runs.
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


def temporary_sibling(path: str) -> str:
    """`<path>.<pid>.tmp`: where a new version of `path` is written before replace_path puts it
    in place (beside it, so on the same filesystem, where a rename is atomic)."""
    return f"{path}.{os.getpid()}.tmp"


def replace_path(new: str, path: str):
    """Puts `new` (a file or a directory) at `path`, replacing what is there.

    A file over a file is one os.replace (atomic). A directory cannot be renamed over a
    non-empty one: the old one is renamed aside to `<path>.<pid>.old`, the new one renamed in,
    the old one removed. Between the two renames `path` is missing for an instant; an exception
    there (an interrupt) puts the old one back, and only a kill -9 can leave `path` missing with
    the old version aside (remove_leftovers takes it away at the next replacement).
    """
    if not (os.path.isdir(new) or os.path.isdir(path)) or not os.path.lexists(path):
        os.replace(new, path)
        return
    old = f"{path}.{os.getpid()}.old"
    os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)
        raise
    _remove(old)


def remove_path(path: str):
    """Removes a file or a directory tree: renamed aside to `<path>.<pid>.old` first, so that
    `path` goes at once (a kill -9 during the removal leaves the `.old` for remove_leftovers)."""
    old = f"{path}.{os.getpid()}.old"
    os.rename(path, old)
    _remove(old)


def remove_leftovers(path: str):
    """Removes `<path>.<pid>.tmp` and `<path>.<pid>.old` left beside `path` by a process that was
    killed while replacing it (one that is still running is left alone)."""
    directory, name = os.path.split(path)
    pattern = re.compile(re.escape(name) + r"\.(\d+)\.(tmp|old)")
    for entry in os.listdir(directory or "."):
        found = pattern.fullmatch(entry)
        if found and not _running(int(found[1])):
            _remove(os.path.join(directory, entry))


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process's own leftovers are from an earlier step of this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: str):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)

