"""The output lock: one diffprune process per output folder, the second one refuses at once.

`output_lock(path)` holds the `filelock` package's FileLock (flock on POSIX, msvcrt on Windows, so
no `fcntl` import here) on the sibling `.<name>.lock`, which records the holder's pid for the
refusal message and is removed on release. The OS releases the lock when a process dies, even on
kill -9. Re-entrant within one process (a stage locks early and again in `fsutil.atomic_dir`);
a forked child never counts as its parent. A shared layer: imports only `errors` and `filelock`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import filelock

from .errors import DiffpruneError, write_error

# Locks this process holds: lock file -> [FileLock, depth, pid]. Process-local on purpose: a stage may take
# the lock early (for its whole run) and again in `atomic_dir`, from any thread. The pid tells a forked
# child (which inherits this dict) that the entry is its parent's, not its own.
_HELD: dict[str, list] = {}
_HELD_GUARD = threading.Lock()


def lock_path(path: str | Path) -> Path:
    path = Path(path).absolute()
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def output_lock(path: str | Path) -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock on output folder `path` (re-entrant in one process).

    Another process holding it -> DiffpruneError "output dir X is in use by another diffprune
    process (pid N)". The lock is the `filelock` package's FileLock (flock on POSIX, msvcrt on
    Windows) on `.<name>.lock`, which holds the owner's pid; the file is removed on release.
    """
    path = Path(path).absolute()
    lock = lock_path(path)
    key = str(lock)
    with _HELD_GUARD:
        entry = _HELD.get(key)
        reentered = entry is not None and entry[2] == os.getpid()
        if reentered:
            entry[1] += 1
    if reentered:
        try:
            yield path
        finally:
            with _HELD_GUARD:
                _HELD[key][1] -= 1
        return
    held = _acquire(path, lock)
    with _HELD_GUARD:
        _HELD[key] = [held, 1, os.getpid()]
    try:
        yield path
    finally:
        with _HELD_GUARD:
            entry = _HELD.get(key)
            last = entry is not None and entry[1] <= 1
            if last:
                del _HELD[key]
            elif entry is not None:
                entry[1] -= 1
        if last:
            with contextlib.suppress(OSError):
                lock.unlink()  # while still locked: filelock re-checks an inode unlinked under a waiter
            held.release(force=True)


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())


def _acquire(path: Path, lock: Path):
    """The FileLock of `lock`, acquired without waiting; held by another process -> one-line error."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(err, f"cannot create the folder of output dir {str(path)!r}") from None
    for _ in range(20):  # more than one try only while a holder is releasing (its file vanishes)
        held = filelock.FileLock(str(lock), blocking=False, thread_local=False, is_singleton=False,
                                 fallback_to_soft=False, on_acquired=_write_pid)
        try:
            held.acquire()
            return held
        except filelock.Timeout:
            owner = _read_pid(lock)
            if not owner and not lock.exists():
                continue
            who = f" (pid {owner})" if owner else ""
            raise DiffpruneError(f"output dir {str(path)!r} is in use by another diffprune process{who}; "
                                 f"wait for it to finish or choose another --output-dir") from None
        except OSError as err:  # e.g. a full disk or a read-only folder: leave no lock file behind
            if not held.is_locked:
                with contextlib.suppress(OSError):
                    if lock.stat().st_size == 0:
                        lock.unlink()
            raise write_error(err, f"cannot create lock file {str(lock)!r} for output dir {str(path)!r}") from None
    raise DiffpruneError(f"could not lock output dir {str(path)!r}: {str(lock)!r} keeps changing")


def _read_pid(lock: Path) -> str:
    try:
        with open(lock, "rb") as fh:
            text = fh.read(32).decode(errors="replace").strip()
    except OSError:  # gone already, or locked against reading (Windows)
        return ""
    return text if text.isdigit() else ""


__all__ = ["lock_path", "output_lock"]
