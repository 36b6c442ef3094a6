"""Output folders a run owns: checked before any work, locked while the run writes.

:func:`open_run_dir` is what every command with ``--out`` enters before it starts working:

1. it refuses a folder that already holds a run (unless the caller may overwrite it), a path
   that is a file, and a path under a file;
2. it creates the folder and writes and removes a probe file in it, so that an unwritable
   ``--out`` (``/proc/x``, a read-only mount, a path under an existing file) is one line
   naming the path *before* minutes of work, not a traceback after them;
3. it takes an OS file lock on ``OUT/.gtnkit.lock`` (``fcntl.flock``, non-blocking) and writes
   its pid into it. A second run into the same folder is refused with one line naming the
   folder and the holder's pid. The kernel drops the lock when its process exits or dies, so a
   lock file left behind by a killed run (``kill -9``, power loss) is simply taken over.

On leaving, the lock file is removed and every folder :func:`open_run_dir` created is removed
again if it is still empty, so a run refused after the claim (bad data, bad options) leaves
nothing behind.

Platforms without ``fcntl`` (Windows) lock with ``msvcrt.locking``, which the OS also releases
when the process ends; where neither exists the folder is still checked, but not locked, and a
warning says so.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from .store import RUN_MARKERS, StoreError

__all__ = ["OutDirError", "OutDirLocked", "LOCK_NAME", "check_writable", "open_run_dir",
           "refuse_existing_run"]

LOCK_NAME = ".gtnkit.lock"

log = logging.getLogger("gtnkit")

if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        with contextlib.suppress(OSError):
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

    HAVE_LOCKS = True
else:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - every POSIX Python has fcntl
        fcntl = None  # type: ignore[assignment]

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def _unlock(fd: int) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)

    HAVE_LOCKS = fcntl is not None


class OutDirError(StoreError):
    """An output path that cannot be created or written. One line naming the path."""


class OutDirLocked(OutDirError):
    """The output folder is held by another running gtnkit process (its pid in the message)."""


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _first_file_ancestor(path: Path) -> Path | None:
    for parent in path.parents:
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def refuse_existing_run(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse a folder that already holds a run unless ``overwrite``; the message says what to
    pass (and, with ``resume``, that a finished run has nothing to resume)."""
    if overwrite or not out.is_dir():
        return
    present = [m for m in RUN_MARKERS if (out / m).exists()]
    if not present:
        return
    if resume:
        raise StoreError(f"{out} already holds a finished run ({present[0]}); there is nothing "
                         f"to resume: run without --resume, with --force, to overwrite it")
    raise StoreError(f"{out} already holds a run; pass --force to overwrite it")


def _make_dirs(out: Path) -> list[Path]:
    """Create ``out`` and its missing parents; the folders created, deepest first."""
    missing = []
    for p in (out, *out.parents):
        if p.is_dir():
            break
        missing.append(p)
    created: list[Path] = []
    for p in reversed(missing):
        try:
            p.mkdir()
        except FileExistsError:
            if not p.is_dir():
                _remove_empty(created)
                raise OutDirError(f"cannot create output folder {out}: {p} is a file") from None
            continue
        except OSError as exc:
            _remove_empty(created)
            raise OutDirError(f"cannot create output folder {out}: {_reason(exc)}") from None
        created.append(p)
    return created[::-1]


def _remove_empty(folders: list[Path]) -> None:
    for p in sorted(folders, key=lambda q: len(q.parts), reverse=True):
        with contextlib.suppress(OSError):
            p.rmdir()  # only succeeds when empty


def _probe(out: Path) -> None:
    probe = out / f".gtnkit-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        raise OutDirError(f"cannot write into output folder {out}: {_reason(exc)}") from None


def check_writable(out: str | os.PathLike) -> list[Path]:
    """Create ``out`` (and missing parents) and write and remove a probe file in it.

    Returns the folders it created (deepest first), so a caller can remove them again.

    Raises:
        OutDirError: ``out`` is a file, lies under a file, or cannot be created or written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutDirError(f"output path {out} exists and is not a folder")
    blocker = _first_file_ancestor(out)
    if blocker is not None:
        raise OutDirError(f"cannot create output folder {out}: {blocker} is a file")
    created = _make_dirs(out)
    try:
        _probe(out)
    except OutDirError:
        _remove_empty(created)
        raise
    return created


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip().split()[0]
    except (OSError, IndexError):
        return "pid unknown"
    return f"pid {pid}"


def _acquire(out: Path) -> int | None:
    """Lock ``out/LOCK_NAME``; the open descriptor, or None where the OS has no file locks."""
    lock = out / LOCK_NAME
    if not HAVE_LOCKS:  # pragma: no cover
        log.warning("this platform has no OS file locks: a second run into %s is not detected",
                    out)
        return None
    for _ in range(100):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutDirError(f"cannot write into output folder {out}: {_reason(exc)}") from None
        if not _try_lock(fd):
            os.close(fd)
            raise OutDirLocked(f"{out} is in use by another gtnkit run ({_holder(lock)}); wait "
                               f"for it to finish or choose another --out")
        # The holder we raced with may have removed the file after we opened it: then we
        # hold a lock on a deleted file, and must lock the one now at the path instead.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        _unlock(fd)
        os.close(fd)
    raise OutDirLocked(f"{out}: could not take the lock {lock} (it keeps being replaced)")


def _release(out: Path, fd: int | None) -> None:
    if fd is None:  # pragma: no cover
        return
    with contextlib.suppress(OSError):
        (out / LOCK_NAME).unlink()  # still holding the lock: no one else owns this file
    _unlock(fd)
    os.close(fd)


@contextlib.contextmanager
def open_run_dir(out: str | os.PathLike, overwrite: bool = False,
                 resume: bool = False) -> Iterator[Path]:
    """Own the output folder ``out`` for the duration of the ``with`` block.

    Args:
        out: the output folder (created if missing).
        overwrite: a folder that already holds a run (``config.json`` / ``results.json``) may
            be written over; otherwise it is refused before anything is written.
        resume: only changes the refusal's wording (a finished run has nothing to resume).

    Raises:
        StoreError: the folder already holds a run.
        OutDirError: ``out`` cannot be created or written (the message names the path).
        OutDirLocked: another process holds the folder (the message names its pid).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutDirError(f"output path {out} exists and is not a folder")
    refuse_existing_run(out, overwrite, resume)
    created = check_writable(out)
    try:
        fd = _acquire(out)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        # checked again under the lock: a run may have finished between the first look and now
        refuse_existing_run(out, overwrite, resume)
        yield out
    finally:
        _release(out, fd)
        _remove_empty(created)
