"""The ratio search: bisection on the ratio towards a params/MACs target, and its messages.

`bisect` drives any `evaluate(ratio) -> Candidate` (size_search.SizePlanner.evaluate); the
messages explain an unreachable target (nearest sizes under every option) and a non-monotone ratio
(torch-pruning leaves a group whole when a ratio would empty it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import RATIO_RULES

if TYPE_CHECKING:
    from .size_search import Candidate

TARGET_TOLERANCE = 0.02  # a target is reached when |achieved - target| <= 2% of the original
MAX_RATIO = 0.95


def bisect(evaluate, kind: str, target: float, progress: bool = False) -> tuple[Candidate | None, list[Candidate]]:
    """Bisection on the ratio: the achieved fraction falls (stepwise) as the ratio grows.

    torch-pruning leaves a group untouched when its ratio would remove every channel, so very high
    ratios prune *less*; the upper end is first pulled back until it really prunes. Returns the
    candidate nearest the target if within 2% (else None) and every candidate tried, in order.
    """
    from tqdm.auto import tqdm

    tried: list[Candidate] = []

    def run(ratio: float) -> Candidate:
        tried.append(evaluate(ratio))
        return tried[-1]

    if target >= 1.0 - TARGET_TOLERANCE:
        return run(0.0), tried
    lo, hi = 0.0, MAX_RATIO
    backoff: list[Candidate] = []
    for _ in range(6):
        backoff.append(run(hi))
        if len(backoff) > 1 and backoff[-1].fraction(kind) >= backoff[-2].fraction(kind):
            break  # backing off stopped helping: the previous hi was the smallest fraction
        hi *= 0.85
    best = min(backoff, key=lambda c: c.fraction(kind))
    hi = best.ratio
    if target < best.fraction(kind) - TARGET_TOLERANCE:
        return None, tried
    for _ in tqdm(range(14), desc=f"search ratio for {kind}={target:.3f}", disable=not progress, leave=False):
        mid = (lo + hi) / 2
        c = run(mid)
        if abs(c.fraction(kind) - target) < abs(best.fraction(kind) - target):
            best = c
        if abs(c.fraction(kind) - target) <= TARGET_TOLERANCE * 0.25 or hi - lo < 1e-3:
            break
        lo, hi = (mid, hi) if c.fraction(kind) > target else (lo, mid)
    return (best if abs(best.fraction(kind) - target) <= TARGET_TOLERANCE else None), tried


def _option(rule: str, round_to: int | None) -> str:
    return f"--ratio-rule {rule}" + (f" --round-to {round_to}" if round_to else " (no --round-to)")


def nearest(tried: list[Candidate], kind: str, target: float) -> str:
    """The closest sizes tried below and above the target, e.g. '0.541 (ratio 0.2812) / 0.667 (ratio 0.2695)'."""
    below = [c for c in tried if c.fraction(kind) < target]
    above = [c for c in tried if c.fraction(kind) >= target]
    parts = [f"{c.fraction(kind):.3f} (ratio {c.ratio:.4f})" for c in (
        max(below, key=lambda c: c.fraction(kind)) if below else None,
        min(above, key=lambda c: c.fraction(kind)) if above else None) if c is not None]
    return " / ".join(parts) or "none"


def unreachable_message(evaluate, kind: str, target: float, rule: str, round_to: int | None,
                        tried: list[Candidate]) -> str:
    """One line: the nearest sizes under the user's option (`tried`) and under each other one tried
    (`evaluate(ratio, ratio_rule, round_to)` -> Candidate), and which option reaches the target."""
    reached, missed = [], [f"{_option(rule, round_to)}: nearest {nearest(tried, kind, target)}"]
    for other_rule in RATIO_RULES:
        for other_round in dict.fromkeys([round_to, None]):
            if (other_rule, other_round) == (rule, round_to):
                continue
            best, other = bisect(lambda r: evaluate(r, other_rule, other_round), kind, target)  # noqa: B023
            if best is not None:
                reached.append(f"{_option(other_rule, other_round)} reaches {best.fraction(kind):.3f} "
                               f"at ratio {best.ratio:.4f}")
            else:
                missed.append(f"{_option(other_rule, other_round)}: nearest {nearest(other, kind, target)}")
    head = f"target {kind}={target:.3f} is unreachable within 2% of the original"
    if reached:
        return f"{head} with {missed[0]}; use {'; or '.join(reached)}"
    return (f"{head} under every option tried ({'; '.join(missed)}); allowed: a target within 2% of "
            f"one of these sizes")


def non_monotone_warning(chosen: Candidate, tried: list[Candidate], kind: str) -> str | None:
    """A warning when a smaller ratio tried prunes more than the chosen one (a group left whole)."""
    smaller = [c for c in tried if c.ratio < chosen.ratio and c.fraction(kind) < chosen.fraction(kind) - 1e-9]
    if not smaller:
        return None
    s = min(smaller, key=lambda c: c.fraction(kind))
    return (f"ratio {chosen.ratio:.4g} keeps {chosen.macs_fraction:.3f} of the MACs and {chosen.params_fraction:.3f} "
            f"of the params, but the smaller ratio {s.ratio:.4g} keeps only {s.macs_fraction:.3f} of the MACs and "
            f"{s.params_fraction:.3f} of the params: torch-pruning leaves a channel group whole when a ratio "
            f"would empty it ({chosen.whole_groups} groups at ratio {chosen.ratio:.4g})")
