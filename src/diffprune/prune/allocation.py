"""How many channels each group keeps under one budget: uniform (the paper), global or isomorphic ranking.

The paper prunes every channel group by the same ratio ("uniform"). torch-pruning 1.6 can instead
rank the groups' scores together: `global_pruning=True` ranks every group in one list ("global"),
`isomorphic=True` ranks groups of the same structure together (Fang et al., "Isomorphic Pruning",
ECCV 2024: "isomorphic"). Its one-shot global step has no per-group cap (`max_pruning_ratio` only
bounds user-given and iterative ratios) and rounds `round_to` per group count, wrong for grouped
channels (see ratio_rules.rounded_ratios). So the allocation is computed here, as torch-pruning
ranks (its `BasePruner._prune`: the group importance of `tp_importance`, normalized by its mean, the
mean over channel groups; remove `n = N - int(N (1 - ratio))` of the N ranked dims of a scope, every
dim scoring <= the n-th smallest), then capped and rounded, and handed to torch-pruning as per-group
ratios of its local pruning (which picks the same lowest-scored channels inside each group). The
size planner (size_search.py) applies the same per-group ratios, so plan and prune agree.

Guards: a group keeps at least ceil((1 - MAX_GROUP_RATIO) * width) of its channels and never fewer
than one `round_to` step (a global ranking would otherwise empty the layers whose normalized scores
are flattest); kept widths stay multiples of `round_to` and of the GroupNorm groups / heads / gated
halves (equal per channel group); the family's protected layers are in no group, so they stay whole.
Whole attention heads (`prune_heads`) are not ranked across attentions: their count follows
`head_pruning_ratio` per attention, as in the uniform allocation.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch_pruning as tp

from ..families import Family
from .importance import ImportanceResult, tp_importance
from .ratio_rules import gated_halves

MAX_GROUP_RATIO = 0.9  # non-uniform allocations: a group loses at most 90% of its channels


@dataclasses.dataclass
class GroupSpec:
    """One channel group as torch-pruning ranks it (after its attention re-rooting)."""

    keys: tuple[str, ...]  # its out-channel layers: the per-layer ratio lookup of torch-pruning
    size: int  # ranked dims per channel group
    ch_groups: int  # GroupNorm groups / heads / gated halves: every one keeps the same dims
    scope: str  # its structure tag: groups ranked together by "isomorphic"
    scores: torch.Tensor | None = None  # normalized importance per dim (len size), float64


def make_pruner(model: torch.nn.Module, family: Family, example: dict, importance, ratio: float,
                per_layer: dict | None, prune_heads: bool, head_ratio: float | None, num_heads: dict,
                head_dict: dict | None, **extra) -> tp.pruner.MetaPruner:
    """torch-pruning's pruner with diffprune's settings (the real prune, the planner and the scores)."""
    chunks = {**gated_halves(model), **family.out_channel_groups(model)}  # outputs = k equal parts
    return tp.pruner.MetaPruner(
        model, example, importance=importance,
        pruning_ratio=ratio, pruning_ratio_dict=per_layer, ignored_layers=family.ignored_layers(model),
        num_heads=num_heads, prune_head_dims=not prune_heads, prune_num_heads=prune_heads,
        head_pruning_ratio=head_ratio if prune_heads else 0.0,
        head_pruning_ratio_dict=head_dict if prune_heads else None,
        round_to=None, in_channel_groups={}, out_channel_groups=chunks,
        unwrapped_parameters=family.unwrapped_parameters(model), **extra)
    # (fresh dicts: torch-pruning 1.6's defaults are shared, mutable, and would keep every pruned
    # model's GroupNorm and q/k/v layers alive for the whole process)


def ranked_groups(pruner: tp.pruner.MetaPruner, names: dict, prune_heads: bool, score: bool):
    """GroupSpec of every group `pruner` ranks by width, in its order (phase 1 of `BasePruner._prune`)."""
    graph, out = pruner.DG, []
    for group in graph.get_all_groups(ignored_layers=pruner.ignored_layers,
                                      root_module_types=pruner.root_module_types):
        if not pruner._check_pruning_ratio(group):
            continue
        is_attention, _ = pruner._is_atten_group(group)
        if is_attention:
            group = pruner._downstream_node_as_root_if_attention(group)
            if group is None or prune_heads:  # whole heads: not ranked by width (module docstring)
                continue
        ch_groups = pruner._get_channel_groups(group)
        keys: list[str] = []
        tag = "Isomorphic_"  # torch-pruning's isomorphic scope name
        for dep, _ in group:
            for module, fn in ((dep.source.module, dep.trigger), (dep.target.module, dep.handler)):
                if graph.is_out_channel_pruning_fn(fn) and module in names and names[module] not in keys:
                    keys.append(names[module])
            way = "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in"
            tag += f"{type(dep.source.module)}_{way}_{type(dep.target.module)}_{way}"
        if not keys:
            continue
        scores = None
        if score:
            imp = pruner.estimate_importance(group)
            if imp is None:
                continue
            scores = imp.view(ch_groups, -1).mean(0).double().cpu() if ch_groups > 1 else imp.double().cpu()
        out.append(GroupSpec(tuple(keys), len(group[0].idxs) // ch_groups, ch_groups, tag, scores))
    return out


def group_scores(model: torch.nn.Module, family: Family, importance: ImportanceResult,
                 prune_heads: bool = False, seed: int = 0) -> list[GroupSpec]:
    """Every ranked group of `model` with its normalized scores (`tp_importance(importance.method)`)."""
    scored = copy.deepcopy(model).eval()
    if getattr(scored, "is_gradient_checkpointing", False):
        scored.disable_gradient_checkpointing()
    if importance.grads is not None:
        for name, p in scored.named_parameters():
            p.grad = importance.grads[name] if name in importance.grads else torch.zeros_like(p)  # read, never changed
    device = next(scored.parameters()).device
    example = family.example_inputs(scored, device=device)
    num_heads = family.num_heads(scored)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # random importance: the scores of prune_model_at_ratio's draw
        pruner = make_pruner(scored, family, example, tp_importance(importance.method), 0.5, None,
                             prune_heads, 0.5, num_heads, None)
        names = {m: n for n, m in scored.named_modules()}
        with torch.no_grad():
            return ranked_groups(pruner, names, prune_heads, score=True)


def min_keep(size: int, ch_groups: int, round_to: int | None) -> int:
    """The fewest dims per channel group a non-uniform allocation leaves (MAX_GROUP_RATIO, one step)."""
    step = _step(ch_groups, round_to)
    keep = max(1, math.ceil(size * (1 - MAX_GROUP_RATIO) - 1e-9))
    return min(size, -(-keep // step) * step)


def _step(ch_groups: int, round_to: int | None) -> int:
    """Kept dims per channel group come in multiples of this, so the width is one of `round_to`."""
    return round_to // math.gcd(ch_groups, round_to) if round_to and round_to > 1 else 1


def kept_dims(groups: list[GroupSpec], ratio: float, allocation: str, round_to: int | None) -> list[int]:
    """Dims per channel group each group keeps when `ratio` of its scope's ranked dims are removed."""
    if allocation not in ("global", "isomorphic"):
        raise ValueError(f"allocation {allocation!r} is not ranked across groups")
    scopes: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        scopes.setdefault("all" if allocation == "global" else g.scope, []).append(i)
    keep = [g.size for g in groups]
    for members in scopes.values():
        scores = torch.cat([groups[i].scores for i in members])
        n = len(scores) - int(len(scores) * (1 - ratio))
        if n <= 0:
            continue
        threshold = torch.kthvalue(scores, n).values
        for i in members:
            g = groups[i]
            k = g.size - int((g.scores <= threshold).sum())
            step = _step(g.ch_groups, round_to)
            k = min(g.size, k - k % step if k >= step else step)  # rounded down to a step, never emptied
            keep[i] = max(k, min_keep(g.size, g.ch_groups, round_to))
    return keep


def allocate(groups: list[GroupSpec], ratio: float, allocation: str,
             round_to: int | None = None) -> dict[str, float]:
    """Layer name -> torch-pruning per-layer ratio giving each group its `kept_dims` (local pruning)."""
    out: dict[str, float] = {}
    for g, k in zip(groups, kept_dims(groups, ratio, allocation, round_to), strict=True):
        group_ratio = max(1 - (k + 0.5) / g.size, 0.0)  # int(size * (1 - r)) == k
        out.update(dict.fromkeys(g.keys, group_ratio))
    return out


def smallest(groups: list[GroupSpec], round_to: int | None = None) -> dict[str, float]:
    """The per-layer ratios of the smallest model any non-uniform allocation can give (every group capped)."""
    out: dict[str, float] = {}
    for g in groups:
        out.update(dict.fromkeys(g.keys, max(1 - (min_keep(g.size, g.ch_groups, round_to) + 0.5) / g.size, 0.0)))
    return out


def group_widths(groups: list[GroupSpec], before: dict[str, int], after: dict[str, int]) -> list[dict]:
    """prune_report.json's "allocation.groups": kept/total output width of each ranked group's first layer."""
    rows = []
    for g in groups:
        name = next((k for k in g.keys if k in before and k in after), None)
        if name is not None:
            rows.append({"layer": name, "kept": int(after[name]), "total": int(before[name]),
                         "channel_groups": g.ch_groups})
    return rows
