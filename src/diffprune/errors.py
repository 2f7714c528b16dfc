"""The one exception type users can cause: bad input, named with what is allowed.

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class DiffpruneError(ValueError):
    """A problem with the user's input (a value, a path, a file), never a bug in diffprune."""


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
