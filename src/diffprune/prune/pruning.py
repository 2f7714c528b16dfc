"""Width pruning of a model in memory: dependency graph, scores, removal, family fix-ups, verification.

`prune_model(model, family, config, importance)` is the in-memory core of the prune stage
(`diffprune.prune(config, output_dir)`, the one public verb: folder in, folder out);
`prune_model_at_ratio` is the same at a given per-group ratio (a pruned deep copy).

torch-pruning (>=1.6) builds the dependency graph and removes coupled channels together; we
supply the diffusion-specific parts: the importance (importance.py), the layers never pruned and
the attention head maps (families/), size targeting, the allocation of widths over the layers
(allocation.py) and the fix-ups of static attributes.

Size semantics: `ratio` is torch-pruning's per-group pruning ratio. Channels coupled through
GroupNorm(G, C) are pruned in equal numbers per group and torch-pruning keeps floor((C/G)(1-ratio))
per group, so a nominal ratio removes more than its fraction there. `target_macs`/`target_params`
(fractions of the original) search the ratio by bisection instead, on a weightless copy
(size_search.py; PAPER.md: always report real params and MACs); for the uniform allocation before
the calibration sweep, for global/isomorphic (whose widths follow the scores) after it.

The names of the lower modules (config, ratio rules, search messages) stay importable from here.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable

import torch

from ..families import Family
from ..families.unet2d import reset_parameters
from ..io.structure import record_structure, validate_structure
from .allocation import MAX_GROUP_RATIO, group_scores, make_pruner
from .bisection import MAX_RATIO, TARGET_TOLERANCE, bisect, non_monotone_warning, unreachable_message
from .config import ALLOCATIONS, RATIO_RULES, PruneConfig
from .importance import ImportanceResult, tp_importance
from .ratio_rules import (
    GATED_ACTIVATIONS,
    GroupFacts,
    gated_halves,
    head_ratio_dict,
    paper_ratio_dict,
    paper_ratios,
    ratio_rule_groups,
    rounded_ratio_dict,
    rounded_ratios,
)
from .size_search import SizePlan, search_sizes

__all__ = [
    "ALLOCATIONS", "GATED_ACTIVATIONS", "MAX_RATIO", "RATIO_RULES", "TARGET_TOLERANCE", "GroupFacts", "PruneConfig",
    "PruneOutcome", "bisect", "gated_halves", "head_ratio_dict", "non_monotone_warning", "paper_ratio_dict",
    "paper_ratios", "prune_model", "prune_model_at_ratio", "ratio_rule_groups", "rounded_ratio_dict", "rounded_ratios",
    "unreachable_message",
]


@dataclasses.dataclass
class PruneOutcome:
    model: torch.nn.Module
    ratio: float
    macs: tuple[int, int]  # (before, after)
    params: tuple[int, int]
    widths_before: dict[str, dict]
    widths_after: dict[str, dict]
    search: list[dict]  # every size candidate evaluated: ratio -> macs/params (size_search.Candidate)
    wall_time_s: float
    plan: SizePlan | None = None  # the size plan the prune followed (its allocation and groups)


def prune_model_at_ratio(model: torch.nn.Module, family: Family, importance: ImportanceResult,
                     ratio: float, round_to: int | None = None, seed: int = 0,
                     ratio_rule: str = "torch-pruning", prune_heads: bool = False,
                     head_pruning_ratio: float | None = None,
                     on_group: Callable[[str, list[int], int], None] | None = None,
                     prune_residual: bool = False, layer_ratios: dict[str, float] | None = None,
                     keep_grads: bool = False) -> torch.nn.Module:
    """A pruned deep copy of `model` at `ratio` under `ratio_rule` (the original is untouched).

    `on_group(root_name, removed_idxs, root_channels)` is called for each group just before it is
    pruned (names as in `model`; indices in the root layer's original channels, output channels or,
    for attention head dims rooted at an output projection, its input channels).

    Attention: by default every head keeps its count and loses head dims (`ratio` of them, the
    softmax scale preserved); `prune_heads=True` removes whole heads instead (`head_pruning_ratio`,
    default `ratio`, of each attention's heads) and keeps the head size.
    `prune_residual`: transformer families also prune their residual (hidden) width (Family.configured).
    `layer_ratios` (layer name -> ratio, from allocation.allocate: a non-uniform allocation) replaces
    the ratio rule and rounding; each group is capped at allocation.MAX_GROUP_RATIO.
    `keep_grads`: the copy keeps `importance.grads` as `.grad`, sliced with the channels it keeps
    (depth_split.py scores what a prune removed); by default it has none.
    """
    family = family.configured(prune_residual=prune_residual)
    pruned = copy.deepcopy(model)
    pruned.eval()
    if getattr(pruned, "is_gradient_checkpointing", False):
        pruned.disable_gradient_checkpointing()  # checkpointed blocks hide their ops from the tracer
    if ratio <= 0:
        return pruned
    if importance.grads is not None:
        for name, p in pruned.named_parameters():
            # Not copied (one model-size tensor less at full size): torch-pruning reads .grad and slices
            # it into new tensors, never in place, so `importance` can serve another prune.
            p.grad = importance.grads[name] if name in importance.grads else torch.zeros_like(p)
    before = record_structure(pruned)
    device = next(pruned.parameters()).device
    example = family.example_inputs(pruned, device=device)
    num_heads = family.num_heads(pruned)
    per_layer, extra = None, {}
    if layer_ratios is not None:  # a non-uniform allocation: its per-group ratios already rounded
        modules = dict(pruned.named_modules())
        per_layer = {modules[n]: r for n, r in layer_ratios.items()}
        extra = {"max_pruning_ratio": MAX_GROUP_RATIO}
    elif round_to is not None and round_to > 1:  # rounding through per-layer ratios; see rounded_ratio_dict
        per_layer = rounded_ratio_dict(pruned, family, ratio, example, round_to, ratio_rule,
                                       {**({} if prune_heads else num_heads), **gated_halves(pruned),
                                        **family.out_channel_groups(pruned)})
    elif ratio_rule == "paper":
        per_layer = paper_ratio_dict(pruned, family, ratio, example)
    torch.manual_seed(seed)  # random importance: same scores for every ratio tried
    head_ratio = ratio if head_pruning_ratio is None else head_pruning_ratio
    pruner = make_pruner(pruned, family, example, tp_importance(importance.method), ratio, per_layer, prune_heads,
                         head_ratio, num_heads, head_ratio_dict(num_heads, head_ratio), **extra)
    names = {m: n for n, m in pruned.named_modules()}
    with torch.no_grad():
        for group in pruner.step(interactive=True):
            if on_group is not None:
                dep, root = group[0].dep, group[0].dep.target.module
                graph = pruner.DG
                channels = graph.get_out_channels(root) if graph.is_out_channel_pruning_fn(dep.handler) \
                    else graph.get_in_channels(root)
                on_group(names.get(root, ""), sorted(int(i) for i in group[0].idxs), int(channels or 0))
            family.before_group_prune(pruned, group)  # tensors torch-pruning does not see (buffers)
            group.prune()
    if not keep_grads:
        pruned.zero_grad(set_to_none=True)
    family.fix_after_pruning(pruned, before, prune_heads=prune_heads)
    validate_structure(pruned, "pruned model")
    if importance.method == "reinit":
        torch.manual_seed(seed)
        reset_parameters(pruned)
    return pruned


def prune_model(model: torch.nn.Module, family: Family, config: PruneConfig,
          importance: ImportanceResult, progress: bool = True, plan: SizePlan | None = None,
          keep_grads: bool = False) -> PruneOutcome:
    """Prune to `config.ratio`, or to the ratio that reaches `target_macs`/`target_params`.

    The size comes from `plan` (`size_search.search_sizes`, searched now when not given): widths,
    params and MACs decided on a weightless copy. The one real prune then runs at the chosen ratio
    (and, for a global/isomorphic allocation, the chosen per-group ratios, from the scores of
    `importance`) and must give exactly the planned structure (`SizePlan.check`). `keep_grads`: as
    in `prune_model_at_ratio`.
    """
    start = time.perf_counter()
    if plan is None or (config.allocation != "uniform" and plan.groups is None):
        scores = None
        if config.allocation != "uniform":  # the widths follow the scores: rank them first
            scores = group_scores(model, family.configured(prune_residual=config.prune_residual), importance,
                                  config.prune_heads, config.seed)
        plan = search_sizes(model, family, config, progress=progress, scores=scores)
    pruned = prune_model_at_ratio(model, family, importance, plan.ratio, config.round_to, config.seed,
                              config.ratio_rule, config.prune_heads, config.head_pruning_ratio,
                              prune_residual=config.prune_residual, layer_ratios=plan.layer_ratios,
                              keep_grads=keep_grads)
    plan.check(pruned)
    return PruneOutcome(pruned, plan.ratio, (plan.macs0, plan.chosen.macs), (plan.params0, plan.chosen.params),
                        record_structure(model), record_structure(pruned), plan.trace(),
                        time.perf_counter() - start, plan)
