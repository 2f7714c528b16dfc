"""Atomic outputs: results appear complete under their final name, or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path`, on error it is removed.

    The old folder (with --overwrite) is only removed once the new one is complete.
    """
    path = check_output_dir(path, overwrite).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
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
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
