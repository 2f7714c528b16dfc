"""The failures users can cause or meet, each turned into one line by the CLI (`cli.main`).

- DiffpruneError: bad input (a value, a path, a file), named with what is allowed -> exit code 2.
- EnvironmentFailure: the machine, not the input (a full disk, a read-only or forbidden output
  folder) -> exit code 1.

Anything else is a bug in diffprune: the CLI prints one line and, with DIFFPRUNE_DEBUG=1, the traceback.
"""

from __future__ import annotations

import errno
import os
import re


class DiffpruneError(ValueError):
    """A problem with the user's input (a value, a path, a file), never a bug in diffprune."""

    exit_code = 2


class EnvironmentFailure(DiffpruneError):
    """The environment refused an operation (disk full, quota, read-only or forbidden path)."""

    exit_code = 1


# errno values that mean "the machine said no", not "the input is wrong".
ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EFBIG") if hasattr(errno, name))

# safetensors reports Rust IO errors as text only: `IoError(Os { code: 28, kind: StorageFull, ... })`
# (Debug form) or `I/O error: No space left on device (os error 28)` (Display form, safetensors 0.4+).
_RUST_OS_CODE = re.compile(r"\bOs\s*\{\s*code:\s*(\d+)|\(os error (\d+)\)")


def os_errno(err: BaseException) -> int | None:
    """The errno behind `err`: an OSError's, or the one a SafetensorError's message names; else None."""
    if isinstance(err, OSError):
        return err.errno
    if type(err).__name__ == "SafetensorError":
        match = _RUST_OS_CODE.search(str(err))
        return int(match.group(1) or match.group(2)) if match else None
    return None


def environment_failure(err: BaseException, path) -> EnvironmentFailure | None:
    """An EnvironmentFailure naming `path` ("no space left on device while writing X") if `err` is
    an environment errno (ENVIRONMENT_ERRNOS), else None."""
    code = os_errno(err)
    if code not in ENVIRONMENT_ERRNOS:
        return None
    return EnvironmentFailure(f"{reason_of(code)} while writing {path}")


def reason_of(code: int) -> str:
    """os.strerror(code) as the middle of a sentence: "no space left on device"."""
    reason = os.strerror(code)
    return reason[:1].lower() + reason[1:]


def write_error(err: BaseException, doing: str, suffix: str = "") -> DiffpruneError:
    """One line "`doing` (reason)`suffix`" for a failed write: an EnvironmentFailure (exit 1) when
    `err` carries an environment errno (full disk, read-only, forbidden), else a DiffpruneError."""
    code = os_errno(err)
    if code is not None:
        reason = getattr(err, "strerror", None) or os.strerror(code)
    else:
        text = str(err).strip()
        reason = text.splitlines()[0] if text else type(err).__name__
    cls = EnvironmentFailure if code in ENVIRONMENT_ERRNOS else DiffpruneError
    return cls(f"{doing} ({reason}){suffix}")


def check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """Return `value` if it lies in the given interval, else raise DiffpruneError naming both.

    NaN is always rejected. `low_open`/`high_open` make the bound exclusive.
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise DiffpruneError(f"{name}={value!r} is not a number") from None
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    interval = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    bad = v != v  # NaN
    if low is not None:
        bad = bad or (v <= low if low_open else v < low)
    if high is not None:
        bad = bad or (v >= high if high_open else v > high)
    if bad:
        raise DiffpruneError(f"{name}={value!r} is out of range; allowed: {interval}")
    return v
