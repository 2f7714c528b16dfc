"""Per-layer ratios of the uniform allocation: the ratio rules (`--ratio-rule`), `--round-to`, gated
activations and attention heads as torch-pruning 1.6 channel groups.

torch-pruning's local pruning gives every channel group `ratio`; these helpers turn a rule (the
paper's GroupNorm counting, rounding to a multiple) into per-layer ratios it then applies. Used by
the prune verb (pruning.py) and the size planner (size_search.py), so both see the same numbers.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch_pruning as tp

from ..families import Family


@dataclasses.dataclass(frozen=True)
class GroupFacts:
    """What the per-layer ratio rules need of one channel group (`ratio_rule_groups`)."""

    layers: tuple[torch.nn.Module, ...]  # its output-channel Conv2d/Linear layers
    channels: int | None  # the root layer's width
    norms: tuple[tuple[int, int], ...]  # (num_channels, num_groups) of each GroupNorm in it
    heads: tuple[int, ...]  # channel groups of its layers from `num_heads` (q/k/v heads, gated halves)


def ratio_rule_groups(graph: tp.DependencyGraph, family: Family, model: torch.nn.Module,
                      num_heads: dict) -> list[GroupFacts]:
    """The channel groups of `graph` (built on `model`), as `paper_ratios`/`rounded_ratios` read them."""
    out = []
    # Modules only: a family may also ignore parameters (SD3.5's qk-norm weights), which torch-pruning's pruner
    # sorts out itself but get_all_groups compares with `in`, i.e. tensor == module.
    ignored = [m for m in family.ignored_layers(model) if isinstance(m, torch.nn.Module)]
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[torch.nn.Conv2d, torch.nn.Linear]):
        root = group[0].dep.target.module
        channels = graph.get_out_channels(root) if graph.is_out_channel_pruning_fn(group[0].dep.handler) \
            else graph.get_in_channels(root)
        out.append(GroupFacts(
            layers=tuple(dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)
                         and isinstance(dep.target.module, torch.nn.Conv2d | torch.nn.Linear)),
            channels=channels,
            norms=tuple((dep.target.module.num_channels, dep.target.module.num_groups) for dep, _ in group
                        if isinstance(dep.target.module, torch.nn.GroupNorm)),
            heads=tuple(num_heads[dep.target.module] for dep, _ in group if dep.target.module in num_heads
                        and graph.is_out_channel_pruning_fn(dep.handler))))
    return out


def paper_ratio_dict(model: torch.nn.Module, family: Family, ratio: float,
                     example_inputs: dict) -> dict[torch.nn.Module, float]:
    """Per-layer ratios that make torch-pruning 1.6 follow the rule of the paper's code (tp 1.1).

    See `paper_ratios`; this builds the dependency graph of `model` first.
    """
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs,
                                                  unwrapped_parameters=family.unwrapped_parameters(model))
    return paper_ratios(ratio_rule_groups(graph, family, model, {}), ratio)


def paper_ratios(groups: list[GroupFacts], ratio: float) -> dict[torch.nn.Module, float]:
    """The paper's rule: a group of C channels coupled to GroupNorm(G, C) loses (C - int(C(1 - ratio))) // G
    channels per GroupNorm group: ratio 0.3 takes 128 -> 96, where torch-pruning 1.6 keeps
    int((C/G)(1 - ratio)) per group (128 -> 64). Groups without GroupNorm are identical in both.
    """
    out: dict[torch.nn.Module, float] = {}
    for facts in groups:
        if not facts.norms:
            continue
        channels, groups_ = facts.norms[0]
        per_group = channels // groups_
        keep = per_group - (channels - int(channels * (1 - ratio))) // groups_
        group_ratio = 1 - (keep + 0.5) / per_group  # int(per_group * (1 - r)) == keep, float-safe
        for layer in facts.layers:
            out[layer] = max(group_ratio, 0.0)
    return out


def rounded_ratio_dict(model: torch.nn.Module, family: Family, ratio: float, example_inputs: dict,
                       round_to: int, ratio_rule: str, num_heads: dict) -> dict[torch.nn.Module, float]:
    """Per-layer ratios that give every channel group its `ratio_rule` width rounded to `round_to`.

    See `rounded_ratios`; this builds the dependency graph of `model` first.
    """
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs,
                                                  unwrapped_parameters=family.unwrapped_parameters(model))
    return rounded_ratios(ratio_rule_groups(graph, family, model, num_heads), ratio, round_to, ratio_rule)


def rounded_ratios(groups: list[GroupFacts], ratio: float, round_to: int,
                   ratio_rule: str) -> dict[torch.nn.Module, float]:
    """torch-pruning 1.6's own `round_to` is wrong for grouped channels (GroupNorm(G, C), multi-head
    attention): it rounds the per-group count of removed channels as if it were the layer's total,
    which asks to remove every channel of each group; its over-pruning check then skips the group,
    so GroupNorm-coupled layers were silently left unpruned (CIFAR UNet, ratio 0.3 paper rule,
    round_to 8: 33.5M params instead of 19.9M). Here the total width G*k must be a multiple of
    `round_to`: k (kept per group of C/G) is rounded down to a multiple of round_to / gcd(G, round_to),
    but never below one such step (a group is never emptied).
    """
    out: dict[torch.nn.Module, float] = {}
    for facts in groups:
        channels = facts.channels
        groups_ = max([g for _, g in facts.norms] + list(facts.heads) + [1])
        if not channels or channels % groups_:
            continue
        per_group, group_ratio = channels // groups_, ratio
        if ratio_rule == "paper" and facts.norms:  # the ratio paper_ratios gives this group
            c, g = facts.norms[0]
            group_ratio = max(1 - (c // g - (c - int(c * (1 - ratio))) // g + 0.5) / (c // g), 0.0)
        keep = int(per_group * (1 - group_ratio))
        step = round_to // math.gcd(groups_, round_to)
        keep = min(per_group, max(keep - keep % step, step))
        group_ratio = max(1 - (keep + 0.5) / per_group, 0.0)  # int(per_group * (1 - r)) == keep
        for layer in facts.layers:
            out[layer] = group_ratio
    return out


GATED_ACTIVATIONS = ("GEGLU", "SwiGLU")  # diffusers activations that gate one half of `proj` by the other


def gated_halves(model: torch.nn.Module) -> dict[torch.nn.Module, int]:
    """Input projections of gated activations -> 2, as torch-pruning channel groups (`out_channel_groups`).

    diffusers' GEGLU computes a * gelu(b) from the two halves of one projection, so hidden unit j is
    rows j and j + inner of `proj`. Left ungrouped, torch-pruning ranks the 2*inner rows as one list
    and removes the union of the units either half names: how many units go then depends on the
    scores (tiny SD UNet at ratio 0.3: 59, 62 or 64 of 128 kept for three random seeds), so the size
    of a ratio could not be known before the calibration sweep. As two channel groups both halves
    lose the same units, ranked by their mean score: `ratio` of the units, whatever the scores.
    """
    return {m.proj: 2 for m in model.modules()
            if type(m).__name__ in GATED_ACTIVATIONS and isinstance(getattr(m, "proj", None), torch.nn.Linear)}


def head_ratio_dict(num_heads: dict[torch.nn.Module, int], ratio: float) -> dict[torch.nn.Module, float]:
    """Per-projection head ratios, capped so that at least one head survives.

    torch-pruning removes ceil(ratio * heads) heads per attention, so ratio 0.95 of 8 heads would
    remove all 8; the cap (heads - 1) / heads keeps one.
    """
    return {m: min(ratio, (h - 1) / h) for m, h in num_heads.items()}
