"""Writing files so that a crash, a kill or a full disk never leaves a torn file and never destroys the previous one.

Every file tim4rec-pl writes (checkpoints, prepared data caches, predictions, ``config.yaml``) goes through
:func:`atomic_path`: the content is written to a temporary file in the target's own folder (so the final rename
never crosses a filesystem, whatever ``TMPDIR`` says), flushed to disk with ``fsync``, and renamed over the target
with ``os.replace``. Until the rename the old file is untouched; after it the new one is complete. When anything
fails the temporary file is removed and the old file stays as it was.

Temporary names carry the host and the process id (``.<name>.tmp-<host>-<pid>-<random>``), so that a later run
can tell the leftovers of a killed process from the files of one still running (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tim4rec_pl.errors import UserError

_HOST = socket.gethostname().replace("-", "_") or "host"
TMP_MARK = ".tmp-"  # between a temporary's base name and its <host>-<pid>-<random> tag


def temporary_name(name: str) -> str:
    """A hidden, unique temporary name for ``name`` that records this host and process."""
    return f".{name}{TMP_MARK}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_failure(target: str | os.PathLike, err: OSError, what: str = "file") -> UserError:
    """The one-line error for a write that failed; the previous file (if any) is unchanged."""
    reason = err.strerror or str(err) or type(err).__name__
    fix = "free some space there or choose another folder" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (
        "choose a folder you can write to" if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else
        "check the folder and try again")  # fmt: skip
    return UserError(f"cannot write {what} {os.fspath(target)} ({reason}); the previous file is unchanged; {fix}")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, what: str = "file") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success fsync it and rename it over ``target``.

    The caller writes the complete content to the yielded path (any writer that takes a path). An OSError (a full
    disk, no permission) becomes a one-line UserError; any failure removes the temporary file and leaves ``target``
    as it was. The target's folder is created when missing.

    Args:
        target: The file to write.
        what: Names the file in error messages (``checkpoint``, ``predictions`` ...).
    """
    target = Path(target)
    tmp = target.with_name(temporary_name(target.name))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as err:
        raise write_failure(target, err, what) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_bytes_atomically(target: str | os.PathLike, data: bytes | memoryview, what: str = "file") -> None:
    """Write ``data`` to ``target`` through :func:`atomic_path`."""
    with atomic_path(target, what) as tmp, open(tmp, "xb") as f:
        f.write(data)


def write_text_atomically(target: str | os.PathLike, text: str, what: str = "file") -> None:
    """Write ``text`` (UTF-8) to ``target`` through :func:`atomic_path`."""
    write_bytes_atomically(target, text.encode("utf-8"), what)


# ------------------------------------------------------------------------------------------- leftovers of kills
def process_alive(pid: int) -> bool:
    """True when a process with this id exists on this host (or might: no permission to ask)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, it is someone else's
        return True
    return True


def stale(path: Path, max_age_s: float = 7 * 86400) -> bool:
    """Whether a temporary named by :func:`temporary_name` (or ``<prefix>-<host>-<pid>-...``) was left by a process
    that is gone: its host is this host and its process no longer exists; or it is older than ``max_age_s``."""
    tag = path.name.rsplit(TMP_MARK, 1)[-1] if TMP_MARK in path.name else path.name.split("-", 1)[-1]
    parts = tag.split("-")
    if len(parts) >= 2 and parts[0] == _HOST and parts[1].isdigit():
        return not process_alive(int(parts[1]))
    try:
        return time.time() - path.lstat().st_mtime > max_age_s
    except OSError:
        return False


def remove_stale_temporaries(folder: str | os.PathLike, prefix: str = ".") -> list[Path]:
    """Remove the temporaries (files or folders) in ``folder`` that a killed process left behind; return them.

    Only names that start with ``prefix`` and carry the temporary mark are looked at, and only those whose owner is
    gone (see :func:`stale`) are removed: a temporary of a running process is never touched.
    """
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            path = Path(entry.path)
            if entry.name.startswith(prefix) and TMP_MARK in entry.name and stale(path):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()
                removed.append(path)
    return removed
