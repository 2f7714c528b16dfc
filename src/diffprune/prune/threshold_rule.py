"""Diff-Pruning's timestep selection (Fang et al. 2023, Eq. 8; PAPER.md "The idea"), as ddpm_prune.py runs it.

Sweeping t = 0, 1, 2, ... the loss L_t is computed and backpropagated, the running maximum L_max
(L_t included) updated, and the sweep stops after the first t with L_t < thr * L_max: the kept
timesteps are [0, cut], the step that stops the sweep included. Also the fast estimator's pieces:
the same rule on a coarse forward-only grid (`coarse_cut`), timesteps stratified over the kept
prefix, and its default number of passes (importance.estimate_fast uses them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import DiffpruneError


def stops(loss: torch.Tensor, l_max: torch.Tensor | float, threshold: float) -> bool:
    """The paper's stopping test `loss < loss_max * thr` (ddpm_prune.py), in the loss's dtype as there.

    threshold = 0 never stops (L_t >= 0): every timestep is kept.
    """
    return threshold > 0 and bool(loss < l_max * threshold)


def running_max(l_max: torch.Tensor | float, loss: torch.Tensor) -> torch.Tensor | float:
    """ddpm_prune.py's `if loss > loss_max: loss_max = loss` (from 0), applied before `stops` tests L_t."""
    return loss if bool(loss > l_max) else l_max


def threshold_sweep(loss_at: Callable[[int], torch.Tensor], num_timesteps: int | Sequence[int], threshold: float,
                    on_keep: Callable[[int, torch.Tensor], None] | None = None,
                    progress: bool = False) -> tuple[list[tuple[int, float]], int | None]:
    """Diff-Pruning's timestep selection in the order of the paper's loop (ddpm_prune.py).

    For t = 0, 1, ...: evaluate L_t, hand it to `on_keep` (the caller backpropagates it), update the
    running maximum L_max with L_t, and stop if L_t < threshold * L_max. The step that stops the
    sweep was backpropagated first, so every evaluated t is kept: the kept timesteps are [0, cut].
    `num_timesteps` may also be an increasing sequence of timesteps (a coarse grid).
    Returns every (t, L_t) evaluated and the cut: the t at which the rule stopped the sweep, or None
    when it never did (threshold = 0 keeps all). A non-finite L_t is refused, naming t, before `on_keep`.
    """
    losses: list[tuple[int, float]] = []
    l_max: torch.Tensor | float = 0.0
    steps = range(num_timesteps) if isinstance(num_timesteps, int) else num_timesteps
    bar = tqdm(steps, desc="importance (t sweep)", disable=not progress, leave=False)
    for t in bar:
        loss = loss_at(t)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise DiffpruneError(f"calibration loss is {value} at timestep t={t}; check the calibration "
                                 "images and the model weights")
        losses.append((t, value))
        if on_keep is not None:
            on_keep(t, loss)
        l_max = running_max(l_max, loss.detach())
        if stops(loss.detach(), l_max, threshold):
            return losses, t
        if progress:
            bar.set_postfix(loss=f"{value:.4f}", ratio=f"{value / max(float(l_max), 1e-30):.3f}")
    return losses, None


def cut_or_none(cut: int | None, num_timesteps: int) -> int | None:
    """ImportanceResult.cut: None when the kept range [0, cut] is every timestep."""
    return None if cut is None or cut >= num_timesteps - 1 else cut


def tail_timesteps(cut: int | None, num_timesteps: int, points: int) -> list[int]:
    """Up to `points` timesteps spread evenly over the dropped tail [cut + 1, num_timesteps - 1].

    They get forward-only losses for the plot; none when nothing was cut or points = 0.
    """
    if points < 0:
        raise DiffpruneError(f"tail_points={points} must be an integer >= 0")
    if cut is None or points == 0:
        return []
    first, last = cut + 1, num_timesteps - 1
    return sorted({round(first + i * (last - first) / max(points - 1, 1)) for i in range(points)})


def coarse_cut(loss_at: Callable[[int], torch.Tensor], num_timesteps: int, threshold: float,
               stride: int) -> tuple[int | None, list[tuple[int, float]]]:
    """The threshold rule on the grid t = 0, stride, 2*stride, ...: (cut, every (t, L_t) evaluated).

    cut = the first grid t with L_t < threshold * (running max of the grid losses, L_t included); the
    kept timesteps are [0, cut], as in the exact sweep. None when every timestep is kept: no grid
    point falls below, threshold = 0, or the rule stops only at t = num_timesteps - 1.
    """
    if stride < 1:
        raise DiffpruneError(f"grid_stride={stride} must be an integer >= 1")
    losses, cut = threshold_sweep(loss_at, range(0, num_timesteps, stride), threshold)
    return cut_or_none(cut, num_timesteps), losses


def stratified_timesteps(num_kept: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n timesteps in [0, num_kept - 1], one uniformly drawn from each of n equal strata (n may exceed num_kept)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    t = ((torch.arange(n, dtype=torch.float64) + u) * num_kept / n).floor().long()
    return t.clamp_(0, num_kept - 1)[torch.randperm(n, generator=generator)]


def default_passes(num_kept: int, pairs_per_pass: int) -> int:
    """~6 (image, t) pairs per kept timestep: under 10% of an exact sweep with a 64-image batch."""
    return max(1, math.ceil(6 * num_kept / pairs_per_pass))
