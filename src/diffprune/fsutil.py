"""Atomic outputs: results appear complete under their final name, or not at all.

Each output folder is also guarded by an advisory lock on a `.<name>.lock` sibling (`output_lock`),
so two diffprune processes never write the same folder: the second one refuses at once. The lock
is released by the kernel when a process dies (even on kill -9); leftovers of such a process
(`.<name>.tmp-PID` staging folders) are removed by the next run that holds the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import DiffpruneError


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output dir unless `overwrite`; refuse a path that is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DiffpruneError(f"output dir {str(path)!r} exists and is a file; give a folder path")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise DiffpruneError(f"output dir {str(path)!r} already exists; pass --overwrite to replace it")
    return path


# Locks this process holds: lock file -> [fd, depth, pid]. Process-local on purpose: a stage may take
# the lock early (for its whole run) and again in `atomic_dir`; flock itself is not re-entrant. The pid
# tells a forked child (which inherits this dict) that the entry is its parent's, not its own.
_HELD: dict[str, list[int]] = {}
_HELD_GUARD = threading.Lock()


def lock_path(path: str | Path) -> Path:
    path = Path(path).absolute()
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def output_lock(path: str | Path) -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock on output folder `path` (re-entrant in one process).

    Another process holding it -> DiffpruneError "output dir X is in use by another diffprune
    process (pid N)". The lock file is removed on release.
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
    fd = _acquire(path, lock)
    with _HELD_GUARD:
        _HELD[key] = [fd, 1, os.getpid()]
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
                lock.unlink()  # before unlocking: a waiter that opened the old inode re-checks (below)
            os.close(fd)


def _acquire(path: Path, lock: Path) -> int:
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DiffpruneError(f"cannot create the folder of output dir {str(path)!r} "
                             f"({err.strerror or err})") from None
    for _ in range(20):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise DiffpruneError(f"cannot create lock file {str(lock)!r} for output dir {str(path)!r} "
                                 f"({err.strerror or err})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_pid(fd)
            os.close(fd)
            who = f" (pid {owner})" if owner else ""
            raise DiffpruneError(f"output dir {str(path)!r} is in use by another diffprune process{who}; "
                                 f"wait for it to finish or choose another --output-dir") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file while we waited to lock it: try a fresh one
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise DiffpruneError(f"could not lock output dir {str(path)!r}: {str(lock)!r} keeps changing")


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def remove_stale_siblings(path: Path, *patterns: str) -> None:
    """Remove `.<name><pattern>*` siblings left by killed runs; call only while holding the lock."""
    for pattern in patterns:
        for stale in path.parent.glob(f".{_glob_escape(path.name)}{pattern}*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    stale.unlink()


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path`, on error it is removed.

    The old folder (with --overwrite) is only removed once the new one is complete. The folder is
    locked (`output_lock`) meanwhile, and staging folders of killed runs are cleared first.
    """
    path = Path(path).absolute()
    with output_lock(path):
        path = check_output_dir(path, overwrite).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(path, ".tmp-")
        if path.exists():
            remove_stale_siblings(path, ".old-")  # else an .old-* may be the only complete copy
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | Path, data) -> Path:
    """Write JSON via a temp file + rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=json_default) + "\n")
    os.replace(tmp, path)
    return path


def json_default(obj):
    """`json.dumps(default=...)` for numpy/torch values and paths."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
