"""Structure 'both': how a size target is split between removed layers (depth) and channels (width).

- "sqrt" (`depth_split`, the version-3 behaviour): depth to the square root of the target, then a new
  calibration sweep on the shallower model and width pruning to the rest (depth_stage.py, stage.py).
- "joint": one ranking of layers and channels by the same score, from the one sweep. The depth units
  are taken in score order (depth_scores.plan_depth); for every number k of them removed, width
  pruning takes the shallower model to the rest of the target with the same sweep's gradients
  (renamed to the shallower model: `carried_importance`), and the split whose removed weights score
  lowest wins. The score of a removed set is Diff-Pruning's first-order Taylor estimate of the loss it
  costs, sum |w * g| over every removed weight (Fang et al. 2023, Eq. 7-8: the same |w g| the width
  groups and the depth units are ranked by; "magnitude": sum w^2), so a layer and a channel compete in
  one currency under one size target. The width step then prunes the chosen shallower model with those
  carried gradients: no second sweep.

At most `MAX_SPLITS` values of k are tried (evenly spread, always k = 0 and the last one), each one a
width size search and a prune of a copy: cost grows with the number of layers, not with the data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch

from ..errors import DiffpruneError
from .config import PruneConfig, width_rest
from .depth import DepthUnit, remove_units, renamed_after_removal
from .depth_scores import DepthPlan, plan_depth
from .importance import GRADIENT_METHODS, ImportanceResult
from .pruning import prune_model

MAX_SPLITS = 8


def carried_importance(importance: ImportanceResult | None, removed_modules: Sequence[str]) -> ImportanceResult | None:
    """The sweep's result for the model without `removed_modules` (depth units' modules): gradients renamed
    (renumbered blocks), those of removed layers dropped. The rest (curve, kept steps) is the sweep's."""
    if importance is None or importance.grads is None:
        return importance
    names = renamed_after_removal(importance.grads, removed_modules)
    return dataclasses.replace(importance, grads={new: importance.grads[old] for old, new in names.items()})


def weight_score(method: str) -> Callable[[torch.Tensor, torch.Tensor | None], float]:
    """sum |w g| (diff-pruning, taylor) or sum w^2 (magnitude) of one tensor, in float64."""
    if method == "magnitude":
        return lambda w, g: float(w.detach().double().pow(2).sum())

    def taylor(w: torch.Tensor, g: torch.Tensor | None) -> float:
        if g is None or tuple(g.shape) != tuple(w.shape):
            raise DiffpruneError(f"no gradient of the weight's shape {tuple(w.shape)} to score it: the importance "
                                 "comes from another model")
        return float((w.detach().double() * g.to(w.device).double()).abs().sum())

    return taylor


def model_score(model: torch.nn.Module, method: str, grads: Mapping[str, torch.Tensor] | None) -> float:
    """The score of every weight of `model`: `.grad` where a prune left it (keep_grads), else `grads`."""
    score = weight_score(method)
    total = 0.0
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else (grads or {}).get(name)
        total += score(p, g)
    return total


def _ks(count: int) -> list[int]:
    if count <= MAX_SPLITS:
        return list(range(count))
    step = (count - 1) / (MAX_SPLITS - 1)
    return sorted({round(i * step) for i in range(MAX_SPLITS)})


def _candidate(model, family, config: PruneConfig, importance: ImportanceResult, removed, fraction: float,
               kind: str, total: float) -> dict:
    """Width pruning of `model` without `removed` to the rest of the target, and what both parts removed
    (`total`: the score of all of `model`'s weights)."""
    row = {"removed": [u.name for u in removed], "depth_fraction": fraction, "width_target": None}
    shallow = remove_units(model, removed)
    carried = carried_importance(importance, [m for u in removed for m in u.modules])
    kept = model_score(shallow, config.method, carried.grads)
    depth_cost, width_cost, size = total - kept, 0.0, fraction
    width = width_rest(config, {"fraction": fraction})
    if width is not None:
        row["width_target"] = getattr(width, f"target_{kind}")
        try:
            outcome = prune_model(shallow, family, width, carried, progress=False, keep_grads=True)
        except DiffpruneError as err:
            return {**row, "cost": None, "unreachable": str(err)}
        width_cost = kept - model_score(outcome.model, config.method, None)
        pair = outcome.macs if kind == "macs" else outcome.params
        size = fraction * pair[1] / pair[0]
        del outcome
    return {**row, "fraction": size, "cost_depth": depth_cost, "cost_width": width_cost,
            "cost": depth_cost + width_cost}


def joint_plan(model, family, config: PruneConfig, importance: ImportanceResult | None, units: Sequence[DepthUnit],
               scores: Mapping[str, float], count: Callable[[Sequence[DepthUnit]], int]) -> tuple[DepthPlan, dict]:
    """(the depth part of the lowest-cost split, {"mode", "candidates", "chosen"}) under `config`'s target."""
    kind = "macs" if config.target_macs is not None else "params"
    target = config.target_macs if config.target_macs is not None else config.target_params
    if importance is None:  # a data-free score (the dry run's magnitude): no sweep to carry
        if config.method in GRADIENT_METHODS:
            raise DiffpruneError(f"depth_split='joint' with method={config.method!r} needs the calibration sweep")
        importance = ImportanceResult(config.method, config.threshold, [], [], [], None, 0, 0.0)
    greedy = plan_depth(units, scores, count, target)
    by_name = {u.name: u for u in units}
    prefixes = [[by_name[n] for n, _ in greedy.trace[:k]] for k in range(len(greedy.trace) + 1)]
    fractions = [1.0, *(f for _, f in greedy.trace)]
    if greedy.reached:  # the last prefix is depth alone: its put-back set stands for it
        prefixes[-1], fractions[-1] = greedy.removed, greedy.fraction
    total = model_score(model, config.method, importance.grads)
    candidates = [_candidate(model, family, config, importance, prefixes[k], fractions[k], kind, total)
                  for k in _ks(len(prefixes))]
    reachable = [c for c in candidates if c["cost"] is not None]
    if not reachable:
        raise DiffpruneError(f"depth_split='joint': no split of target_{kind}={target} between layers and channels "
                             f"is reachable ({candidates[0].get('unreachable')}); allowed: a larger target")
    best = min(reachable, key=lambda c: (c["cost"], len(c["removed"])))
    removed = [by_name[n] for n in best["removed"]]
    plan = DepthPlan(removed, best["depth_fraction"], best["depth_fraction"], True,
                     greedy.trace[:len(removed)], None)
    return plan, {"mode": "joint", "candidates": candidates, "chosen": candidates.index(best)}
