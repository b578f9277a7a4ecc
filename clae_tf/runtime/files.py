"""File primitives for a run's workdir: written so that a kill never leaves half a file, held by
one process at a time. What the files are and where they go is workdir.py's.

No TensorFlow here: these run before (and without) it.
"""

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import sys
from typing import Callable, Optional, Union

from clae_tf import ClaeError
from clae_tf.runtime import signals


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


def write_atomic(path: str, text: str, what: Optional[str] = None):
    """Replaces `path` with `text` so that readers see the old file or the new one, never a part.

    The text goes to a temporary file in the same directory (replacing), is flushed to disk, and
    os.replace puts it in place. A kill before the rename leaves the old file intact (and a
    stray `<path>.<pid>.tmp`); a full disk leaves the old file and no temporary one, and is a
    ClaeError (writing). what: the file's description in that error.
    """
    with replacing(path, what, needed=len(text.encode())) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


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


@contextlib.contextmanager
def replacing(path: str, what: Optional[str] = None, needed: "Lazy" = None):
    """Yields temporary_sibling(path) for the body to write, then puts it at `path` (os.replace,
    atomic). If the body or the rename fails, `path` is left as it was and the temporary file is
    removed; a full disk is a ClaeError (writing, with `what` and `needed`). A stop request
    waits for the rename (signals.held); a hard exit before it removes the temporary file
    (signals.scratch)."""
    tmp = temporary_sibling(path)
    try:
        with writing(path, what, needed=needed, cleanup=(tmp,)), signals.scratch(tmp):
            yield tmp
            with signals.held():
                os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


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


# ---------------------------------------------------------------------------------------------
# A full disk (or a used-up quota) at any write: one line that says where and how much, and
# nothing half-written left behind.

# The errnos of a full filesystem; their strerror ("No space left on device", "Disk quota
# exceeded") is also what TensorFlow's ResourceExhaustedError says then (out of memory is the
# same class, in other words).
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_WORDS = tuple(os.strerror(code) for code in NO_SPACE_ERRNOS)

Lazy = Union[Callable[[], object], object]  # a value, or a function called for it on failure


def no_space_reason(error: BaseException) -> Optional[str]:
    """Why `error` says the disk is full ("No space left on device" or "Disk quota exceeded"),
    or an error it was raised from or while handling says so; None if none does.

    Recognised: OSError with errno ENOSPC or EDQUOT (Python's writes: open, np.savez, Keras's
    .keras zip files) and TensorFlow's ResourceExhaustedError whose message holds those words
    (checkpoints, SavedModel variables, TensorBoard events, tf.io.write_file).
    """
    seen = []
    while error is not None and not any(error is e for e in seen):
        seen.append(error)
        if isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS:
            return os.strerror(error.errno)
        if type(error).__name__ == "ResourceExhaustedError":
            found = [words for words in _NO_SPACE_WORDS if words in str(error)]
            if found:
                return found[0]
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def writing(path: str, what: Optional[str] = None, needed: Lazy = None,
            cleanup: Lazy = (), note: Lazy = ""):
    """The body writes `path`; if the disk there is full (no_space_reason), removes `cleanup`
    (what the write left half done) and raises ClaeError, one line: the path, `what` it is,
    the bytes `needed` (if known) and those free, `note`. Any other error goes on as it is.

    Args:
      path: the file or directory being written (named in the error).
      what: what it is ("the checkpoint"), or None.
      needed: about how many bytes the write needs, or None (unknown).
      cleanup: paths (files or directory trees) to remove.
      note: a sentence to add ("the last good checkpoint is ...").
    Each of needed, cleanup and note may be a function, called only after a full disk.
    """
    try:
        yield
    except Exception as e:  # an interrupt stays one, whatever it interrupted
        reason = no_space_reason(e)
        if reason is None:
            raise
        for leftover in _value(cleanup):
            _remove(leftover)
        raise ClaeError(no_space_message(path, what, reason, _estimate(needed), _value(note)))


def no_space_message(path: str, what: Optional[str], reason: str, needed: Optional[int] = None,
                     note: str = "") -> str:
    """`--workdir: cannot write <what> at <path>: <reason> (about N needed, M free); <note>;
    free some space and run the same command again`."""
    free = free_bytes(path)
    sizes = ([f"about {human_bytes(needed)} needed"] if needed else []) + (
        [f"{human_bytes(free)} free"] if free is not None else [])
    target = f"{what} at {path}" if what else path
    return (f"--workdir: cannot write {target}: {reason}"
            + (f" ({', '.join(sizes)})" if sizes else "") + (f"; {note}" if note else "")
            + "; free some space and run the same command again")


def free_bytes(path: str) -> Optional[int]:
    """The bytes free for this user on the filesystem of `path` (or of its nearest existing
    parent), or None if that cannot be read."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def tree_bytes(path: str) -> int:
    """The bytes of the file at `path`, or of every file under the directory `path` (0 if
    missing)."""
    if not os.path.isdir(path):
        return os.path.getsize(path) if os.path.isfile(path) else 0
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def human_bytes(n: int) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _value(lazy: Lazy):
    return lazy() if callable(lazy) else lazy


def _estimate(needed: Lazy) -> Optional[int]:
    """_value(needed), or None if it cannot be had: an estimate must not hide the full disk."""
    try:
        return _value(needed)
    except Exception:
        return None
