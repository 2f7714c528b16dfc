"""Safe outputs: never over an input, never over a stranger's folder, complete or not at all.

Before any work a stage calls `check_output_location` (the output must not be, contain or lie inside
any input, the current directory, the home directory or a filesystem root; symlinks resolved), then
`check_output_dir` under the folder's lock: an existing non-empty folder is replaced (--overwrite)
only if the same stage wrote it, as its marker file says (`<stage>_config.json`, or report_data.json).
Results are written into a temporary sibling and renamed into place (`atomic_dir`).

Each output folder is also guarded by a lock on a `.<name>.lock` sibling (`output_lock`, in
`fslock.py`, on the `filelock` package), so two diffprune processes never write the same folder: the
second one refuses at once. Leftovers of a killed process (`.<name>.tmp-PID` staging folders) are
removed by the next run that holds the lock.

Single files are written with `atomic_write` (bytes, text, JSON or a writer callback) into a temp
sibling `.<name>.tmp-PID`, flushed and fsynced, then renamed over the target: a reader sees the old
file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import DiffpruneError, EnvironmentFailure, environment_failure
from .fslock import lock_path, output_lock  # noqa: F401  (public here too: one import for stages)

# The file that proves a folder was written by a stage (StageConfig.save writes <stage>_config.json).
STAGE_MARKERS = {"report": "report_data.json"}
_NEVER_OVERWRITTEN = "diffprune never writes into, over or around its inputs"


def marker_file(stage: str) -> str:
    """Name of the file whose JSON `stage` field says that `stage` wrote a folder."""
    return STAGE_MARKERS.get(stage, f"{stage}_config.json")


# --------------------------------------------------------------------------- reading JSON


def read_json(path: str | Path, what: str, expect: type | None = dict) -> Any:
    """Parse the JSON file `path`; any problem -> one DiffpruneError line naming `what` and the file.

    Covers a missing or unreadable file, bytes that are not UTF-8, invalid JSON, nesting too deep
    for Python's parser (RecursionError) and, with `expect`, the wrong top-level type.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DiffpruneError(f"{what} {str(path)!r} does not exist") from None
    except UnicodeDecodeError:
        raise DiffpruneError(f"{what} {str(path)!r} is not readable: not UTF-8 text") from None
    except OSError as err:
        raise DiffpruneError(f"{what} {str(path)!r} is not readable: {err.strerror or err}") from None
    return parse_json(text, f"{what} {str(path)!r}", expect)


def parse_json(text: str, where: str, expect: type | None = dict) -> Any:
    """`json.loads(text)` with every failure as one DiffpruneError line starting with `where`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DiffpruneError(f"{where} is not readable: not valid JSON ({err.msg} at line {err.lineno} "
                             f"column {err.colno})") from None
    except RecursionError:
        raise DiffpruneError(f"{where} is not readable: JSON nested too deeply") from None
    if expect is not None and not isinstance(data, expect):
        names = {dict: "an object", list: "an array"}
        raise DiffpruneError(f"{where} holds a JSON {_json_kind(data)}, expected {names.get(expect, expect.__name__)}")
    return data


def _json_kind(value: Any) -> str:
    for kind, name in ((dict, "object"), (list, "array"), (str, "string"), (bool, "boolean"),
                       (int | float, "number")):
        if isinstance(value, kind):
            return name
    return "null"


# --------------------------------------------------------------------------- where outputs may go


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _inside(inner: Path, outer: Path) -> bool:
    """True if `inner` is `outer` or lies below it (both resolved)."""
    return inner == outer or outer in inner.parents


def check_output_location(output: str | Path, inputs: Mapping[str, Any] | None = None,
                          what: str = "output dir") -> Path:
    """Refuse an output that would write into, over or around something that must survive.

    Refused, whatever the flags: a symbolic link; the current directory, the home directory, a
    filesystem root or mount point, or a folder containing any of them; and any overlap with an
    input: the output is an input, contains one, or lies inside one. `inputs` maps option names
    (e.g. "--model") to paths; None values and names that are no local path (hub ids, "digits")
    are skipped. Symlinks are resolved for the comparison. Returns `output` as an absolute path.
    """
    path = Path(output).expanduser().absolute()
    if path.is_symlink():
        raise DiffpruneError(f"{what} {str(path)!r} is a symbolic link (to {os.readlink(path)!r}); "
                             "give the real folder path, or a new folder")
    real = _real(path)
    if real.parent == real or os.path.ismount(real):
        raise DiffpruneError(f"{what} {str(output)!r} is a filesystem root or mount point; "
                             "choose a new folder inside it")
    for name, guarded in (("the current directory", _cwd()), ("the home directory", _home())):
        if guarded is None:
            continue
        if guarded == real:
            raise DiffpruneError(f"{what} {str(output)!r} is {name}; choose a new folder for the results, "
                                 f"e.g. {str(real / 'diffprune-out')!r}")
        if real in guarded.parents:
            raise DiffpruneError(f"{what} {str(output)!r} contains {name} ({str(guarded)!r}); "
                                 "choose a new folder for the results")
    for option, value in (inputs or {}).items():
        if value is None or str(value) == "" or not Path(str(value)).expanduser().exists():
            continue
        source = _real(value)
        if source == real:
            relation = f"is the {option} input"
        elif _inside(source, real):
            relation = f"contains the {option} input {str(value)!r}"
        elif _inside(real, source):
            relation = f"lies inside the {option} input {str(value)!r}"
        else:
            continue
        option_name = what if what.startswith("--") else "--output-dir"
        raise DiffpruneError(f"{what} {str(output)!r} {relation}; {_NEVER_OVERWRITTEN}: choose another {option_name}")
    return path


def check_output_file(path: str | Path, overwrite: bool, inputs: Mapping[str, Any] | None,
                      is_ours: Callable[[Path], bool], kind: str, what: str = "--output") -> Path:
    """The file twin of check_output_location + check_output_dir, for single-file outputs.

    Refused: a symlink or folder, any overlap with an input (`check_output_location`), and an
    existing file unless `overwrite` and `is_ours(path)` says a diffprune stage wrote it (`kind`
    names what that is, for the message). Returns the absolute path.
    """
    path = check_output_location(path, inputs, what=what)
    if path.is_dir():
        raise DiffpruneError(f"{what} {str(path)!r} is a folder; give a file path")
    if path.exists():
        if not overwrite:
            raise DiffpruneError(f"{what} {str(path)!r} already exists; pass --overwrite to replace it")
        if not is_ours(path):
            raise DiffpruneError(f"{what} {str(path)!r} is not {kind}; refusing to replace it; "
                                 f"choose another {what} or remove it yourself")
    return path


def _cwd() -> Path | None:
    try:
        return _real(os.getcwd())
    except OSError:  # the current directory was deleted: nothing left to protect there
        return None


def _home() -> Path | None:
    home = os.path.expanduser("~")
    return None if home == "~" else _real(home)


def check_output_dir(path: str | Path, overwrite: bool, stage: str | None = None) -> Path:
    """Refuse a file or symlink; refuse an existing non-empty folder unless `overwrite` and `stage` wrote it.

    An empty folder is fine. `stage` names the stage (prune, sample, ...) whose marker file
    (`marker_file`) must be in a folder that --overwrite may replace; without it nothing is replaced.
    """
    path = Path(path)
    if path.is_symlink():
        raise DiffpruneError(f"output dir {str(path)!r} is a symbolic link (to {os.readlink(path)!r}); "
                             "give the real folder path, or a new folder")
    if path.exists() and not path.is_dir():
        raise DiffpruneError(f"output dir {str(path)!r} exists and is a file; give a folder path")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise DiffpruneError(f"output dir {str(path)!r} already exists; pass --overwrite to replace it")
        check_replaceable(path, stage)
    return path


def check_replaceable(path: Path, stage: str | None) -> None:
    """--overwrite replaces only a folder `stage` wrote: its marker file says so (JSON "stage" field)."""
    if stage is None:
        raise DiffpruneError(f"output dir {str(path)!r} is not empty and nothing says who wrote it; "
                             "refusing to replace it; choose another --output-dir")
    marker = path / marker_file(stage)
    refusal = "; refusing to replace it; choose another --output-dir or remove it yourself"
    if not marker.is_file():
        raise DiffpruneError(f"output dir {str(path)!r} was not written by `diffprune {stage}` "
                             f"(no {marker.name}){refusal}")
    try:
        data = read_json(marker, "marker")
    except DiffpruneError as err:
        raise DiffpruneError(f"output dir {str(path)!r} was not written by `diffprune {stage}` "
                             f"({err}){refusal}") from None
    if data.get("stage") != stage and data.get("format") != f"diffprune-{stage}":
        raise DiffpruneError(f"output dir {str(path)!r} was not written by `diffprune {stage}` "
                             f"({marker.name} has stage={data.get('stage')!r}){refusal}")


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
def atomic_dir(path: str | Path, overwrite: bool = False, stage: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path`, on error it is removed.

    The old folder (with --overwrite, only one `stage` wrote: `check_output_dir`) is only removed
    once the new one is complete. The folder is locked (`output_lock`) meanwhile, and staging
    folders of killed runs are cleared first. A full disk (or another environment errno) while
    writing becomes one EnvironmentFailure line naming `path`.
    """
    path = Path(path).absolute()
    with output_lock(path):
        path = check_output_dir(path, overwrite, stage).absolute()
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_siblings(path, ".tmp-")
            if path.exists():
                remove_stale_siblings(path, ".old-")  # else an .old-* may be the only complete copy
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            yield tmp
            replace_dir(tmp, path)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            failure = _environment_failure(err, tmp, path)
            if failure is not None:
                raise failure from None
            raise


def _environment_failure(err: BaseException, staging: Path, output: Path) -> EnvironmentFailure | None:
    """`err` as one EnvironmentFailure line naming `output` (not the staging folder the user never
    sees), or None if it is no environment failure."""
    if isinstance(err, EnvironmentFailure):
        return EnvironmentFailure(str(err).replace(str(staging), str(output)))
    return environment_failure(err, output)


def replace_dir(new: Path, path: Path) -> None:
    """Rename folder `new` to `path`; an existing `path` is removed only after that succeeded
    (and put back if it did not)."""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
    try:
        new.rename(path)
    except BaseException:
        if old is not None:
            old.rename(path)  # put the previous result back: it is the only complete copy
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def discard_on_failure(folder: Path, output: Path, remove_folder: bool = False) -> Iterator[None]:
    """On any exception: remove this process's half-written `.*.tmp-PID` files in `folder` (and the
    whole `folder` if `remove_folder`, e.g. a staging folder); an environment errno (full disk)
    becomes one EnvironmentFailure line naming `output`."""
    try:
        yield
    except BaseException as err:
        if remove_folder:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            for stale in folder.glob(f".*.tmp-{os.getpid()}"):
                with contextlib.suppress(OSError):
                    stale.unlink()
        failure = _environment_failure(err, folder, output)
        if failure is not None:
            raise failure from None
        raise


def atomic_write(path: str | Path, content: bytes | str | Callable[[Path], object]) -> Path:
    """Write `path` so that a reader sees the old file or the new one, never half of one.

    `content` is bytes, text (UTF-8) or a callback that writes the temporary path it is given
    (e.g. `lambda tmp: image.save(tmp, format="PNG")`). The temp file `.<name>.tmp-PID` lies in the
    same folder (so the rename is atomic), is fsynced before `os.replace`, and is removed on any
    failure; a full disk (or another environment errno) becomes one EnvironmentFailure line naming `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        elif isinstance(content, bytes | bytearray | memoryview):
            tmp.write_bytes(content)
        else:
            content(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        failure = environment_failure(err, path)
        if failure is not None:
            raise failure from None
        raise
    return path


def _fsync(path: Path) -> None:
    """Flush `path`'s data to the disk (a rename after a crash then never exposes an empty file)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, data) -> Path:
    """`data` as indented JSON (numpy/torch values and paths converted), written with `atomic_write`."""
    return atomic_write(path, json.dumps(data, indent=2, default=json_default) + "\n")


def json_default(obj):
    """`json.dumps(default=...)` for numpy/torch values and paths."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
