"""One verb, `prune`: dependency graph, scores, removal, family fix-ups, verification.

torch-pruning (>=1.6) builds the dependency graph and removes coupled channels together; we
supply the diffusion-specific parts: the importance (importance.py), the layers never pruned and
the attention head maps (families/), size targeting, and the fix-ups of static attributes.

Size semantics: `ratio` is torch-pruning's per-group pruning ratio. Channels coupled through
GroupNorm(G, C) are pruned in equal numbers per group and torch-pruning keeps floor((C/G)(1-ratio))
per group, so a nominal ratio removes more than its fraction there. `target_macs`/`target_params`
(fractions of the original) search the ratio by bisection instead (PAPER.md: always report real
params and MACs).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable

import torch
import torch_pruning as tp

from .config import StageConfig
from .errors import DiffpruneError, check_range
from .families import Family
from .families.unet2d import reset_parameters
from .importance import ESTIMATORS, ImportanceResult, tp_importance
from .metrics.complexity import count_macs_params
from .structure import record_structure, validate_structure

TARGET_TOLERANCE = 0.02  # a target is reached when |achieved - target| <= 2% of the original
MAX_RATIO = 0.95
RATIO_RULES = ("torch-pruning", "paper")


@dataclasses.dataclass(frozen=True)
class PruneConfig(StageConfig):
    """Settings of one pruning run (written as prune_config.json next to the result)."""

    stage = "prune"
    version = 1
    model: str = ""
    data: str = "digits"
    method: str = "diff-pruning"
    ratio: float | None = None
    target_macs: float | None = None
    target_params: float | None = None
    threshold: float = 0.05
    batch_size: int = 32
    estimator: str = "exact"  # "fast": importance.estimate_fast (diff-pruning only); batch_size = image pool
    round_to: int | None = None
    ratio_rule: str = "torch-pruning"
    seed: int = 0
    device: str = "cpu"
    prune_heads: bool = False
    head_pruning_ratio: float | None = None
    prompt: str | None = None
    captions: str | None = None
    class_labels: str | None = None

    def __post_init__(self):
        given = [n for n in ("ratio", "target_macs", "target_params") if getattr(self, n) is not None]
        if len(given) != 1:
            raise DiffpruneError(f"give exactly one of ratio, target_macs, target_params (got {given or 'none'})")
        if self.ratio is not None:
            check_range("ratio", self.ratio, 0.0, 1.0, low_open=False, high_open=True)
        for name in ("target_macs", "target_params"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), 0.0, 1.0, low_open=True)
        check_range("threshold", self.threshold, 0.0, 1.0, high_open=True)
        if self.estimator not in ESTIMATORS:
            raise DiffpruneError(f"estimator={self.estimator!r} is not one of {ESTIMATORS}")
        if self.estimator == "fast" and self.method != "diff-pruning":
            raise DiffpruneError(f"estimator='fast' applies to method 'diff-pruning' only, not {self.method!r}")
        if self.ratio_rule not in RATIO_RULES:
            raise DiffpruneError(f"ratio_rule={self.ratio_rule!r} is not one of {RATIO_RULES}")
        if self.head_pruning_ratio is not None:
            check_range("head_pruning_ratio", self.head_pruning_ratio, 0.0, 1.0, high_open=True)
        if self.round_to is not None and self.round_to < 1:
            raise DiffpruneError(f"round_to={self.round_to} must be an integer >= 1")


@dataclasses.dataclass
class PruneOutcome:
    model: torch.nn.Module
    ratio: float
    macs: tuple[int, int]  # (before, after)
    params: tuple[int, int]
    widths_before: dict[str, dict]
    widths_after: dict[str, dict]
    search: list[dict]  # bisection trace: ratio -> macs/params fraction
    wall_time_s: float


def paper_ratio_dict(model: torch.nn.Module, family: Family, ratio: float,
                     example_inputs: dict) -> dict[torch.nn.Module, float]:
    """Per-layer ratios that make torch-pruning 1.6 follow the rule of the paper's code (tp 1.1).

    There, a group of C channels coupled to GroupNorm(G, C) loses (C - int(C(1 - ratio))) // G
    channels per GroupNorm group: ratio 0.3 takes 128 -> 96, where torch-pruning 1.6 keeps
    int((C/G)(1 - ratio)) per group (128 -> 64). Groups without GroupNorm are identical in both.
    """
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    out: dict[torch.nn.Module, float] = {}
    for group in graph.get_all_groups(ignored_layers=family.ignored_layers(model),
                                      root_module_types=[torch.nn.Conv2d, torch.nn.Linear]):
        norms = [dep.target.module for dep, _ in group if isinstance(dep.target.module, torch.nn.GroupNorm)]
        if not norms:
            continue
        channels, groups = norms[0].num_channels, norms[0].num_groups
        per_group = channels // groups
        keep = per_group - (channels - int(channels * (1 - ratio))) // groups
        group_ratio = 1 - (keep + 0.5) / per_group  # int(per_group * (1 - r)) == keep, float-safe
        for dep, _ in group:
            if graph.is_out_channel_pruning_fn(dep.handler) and isinstance(
                    dep.target.module, torch.nn.Conv2d | torch.nn.Linear):
                out[dep.target.module] = max(group_ratio, 0.0)
    return out


def rounded_ratio_dict(model: torch.nn.Module, family: Family, ratio: float, example_inputs: dict,
                       round_to: int, ratio_rule: str, num_heads: dict) -> dict[torch.nn.Module, float]:
    """Per-layer ratios that give every channel group its `ratio_rule` width rounded to `round_to`.

    torch-pruning 1.6's own `round_to` is wrong for grouped channels (GroupNorm(G, C), multi-head
    attention): it rounds the per-group count of removed channels as if it were the layer's total,
    which asks to remove every channel of each group; its over-pruning check then skips the group,
    so GroupNorm-coupled layers were silently left unpruned (CIFAR UNet, ratio 0.3 paper rule,
    round_to 8: 33.5M params instead of 19.9M). Here the total width G*k must be a multiple of
    `round_to`: k (kept per group of C/G) is rounded down to a multiple of round_to / gcd(G, round_to),
    but never below one such step (a group is never emptied).
    """
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    out: dict[torch.nn.Module, float] = {}
    for group in graph.get_all_groups(ignored_layers=family.ignored_layers(model),
                                      root_module_types=[torch.nn.Conv2d, torch.nn.Linear]):
        root = group[0].dep.target.module
        channels = graph.get_out_channels(root) if graph.is_out_channel_pruning_fn(group[0].dep.handler) \
            else graph.get_in_channels(root)
        norms = [dep.target.module for dep, _ in group if isinstance(dep.target.module, torch.nn.GroupNorm)]
        heads = [num_heads[dep.target.module] for dep, _ in group if dep.target.module in num_heads
                 and graph.is_out_channel_pruning_fn(dep.handler)]
        groups = max([n.num_groups for n in norms] + heads + [1])
        if not channels or channels % groups:
            continue
        per_group, group_ratio = channels // groups, ratio
        if ratio_rule == "paper" and norms:  # the ratio paper_ratio_dict gives this group
            c, g = norms[0].num_channels, norms[0].num_groups
            group_ratio = max(1 - (c // g - (c - int(c * (1 - ratio))) // g + 0.5) / (c // g), 0.0)
        keep = int(per_group * (1 - group_ratio))
        step = round_to // math.gcd(groups, round_to)
        keep = min(per_group, max(keep - keep % step, step))
        group_ratio = max(1 - (keep + 0.5) / per_group, 0.0)  # int(per_group * (1 - r)) == keep
        for dep, _ in group:
            if graph.is_out_channel_pruning_fn(dep.handler) and isinstance(
                    dep.target.module, torch.nn.Conv2d | torch.nn.Linear):
                out[dep.target.module] = group_ratio
    return out


def head_ratio_dict(num_heads: dict[torch.nn.Module, int], ratio: float) -> dict[torch.nn.Module, float]:
    """Per-projection head ratios, capped so that at least one head survives.

    torch-pruning removes ceil(ratio * heads) heads per attention, so ratio 0.95 of 8 heads would
    remove all 8; the cap (heads - 1) / heads keeps one.
    """
    return {m: min(ratio, (h - 1) / h) for m, h in num_heads.items()}


def prune_with_ratio(model: torch.nn.Module, family: Family, importance: ImportanceResult,
                     ratio: float, round_to: int | None = None, seed: int = 0,
                     ratio_rule: str = "torch-pruning", prune_heads: bool = False,
                     head_pruning_ratio: float | None = None,
                     on_group: Callable[[str, list[int], int], None] | None = None) -> torch.nn.Module:
    """A pruned deep copy of `model` at `ratio` under `ratio_rule` (the original is untouched).

    `on_group(root_name, removed_idxs, root_channels)` is called for each group just before it is
    pruned (names as in `model`; indices in the root layer's original channels, output channels or,
    for attention head dims rooted at an output projection, its input channels).

    Attention: by default every head keeps its count and loses head dims (`ratio` of them, the
    softmax scale preserved); `prune_heads=True` removes whole heads instead (`head_pruning_ratio`,
    default `ratio`, of each attention's heads) and keeps the head size.
    """
    pruned = copy.deepcopy(model)
    pruned.eval()
    if getattr(pruned, "is_gradient_checkpointing", False):
        pruned.disable_gradient_checkpointing()  # checkpointed blocks hide their ops from the tracer
    if ratio <= 0:
        return pruned
    if importance.grads is not None:
        for name, p in pruned.named_parameters():
            p.grad = importance.grads[name].clone() if name in importance.grads else torch.zeros_like(p)
    before = record_structure(pruned)
    device = next(pruned.parameters()).device
    example = family.example_inputs(pruned, device=device)
    num_heads = family.num_heads(pruned)
    per_layer = None
    if round_to is not None and round_to > 1:  # rounding through per-layer ratios; see rounded_ratio_dict
        per_layer = rounded_ratio_dict(pruned, family, ratio, example, round_to, ratio_rule,
                                       {} if prune_heads else num_heads)
    elif ratio_rule == "paper":
        per_layer = paper_ratio_dict(pruned, family, ratio, example)
    round_to = None  # torch-pruning's own rounding is wrong for grouped channels
    torch.manual_seed(seed)  # random importance: same scores for every ratio tried
    head_ratio = ratio if head_pruning_ratio is None else head_pruning_ratio
    pruner = tp.pruner.MetaPruner(
        pruned, example, importance=tp_importance(importance.method),
        pruning_ratio=ratio, pruning_ratio_dict=per_layer, ignored_layers=family.ignored_layers(pruned),
        num_heads=num_heads, prune_head_dims=not prune_heads, prune_num_heads=prune_heads,
        head_pruning_ratio=head_ratio if prune_heads else 0.0,
        head_pruning_ratio_dict=head_ratio_dict(num_heads, head_ratio) if prune_heads else None,
        round_to=round_to)
    names = {m: n for n, m in pruned.named_modules()}
    with torch.no_grad():
        for group in pruner.step(interactive=True):
            if on_group is not None:
                dep, root = group[0].dep, group[0].dep.target.module
                graph = pruner.DG
                channels = graph.get_out_channels(root) if graph.is_out_channel_pruning_fn(dep.handler) \
                    else graph.get_in_channels(root)
                on_group(names.get(root, ""), sorted(int(i) for i in group[0].idxs), int(channels or 0))
            group.prune()
    pruned.zero_grad(set_to_none=True)
    family.fix_after_pruning(pruned, before, prune_heads=prune_heads)
    validate_structure(pruned, "pruned model")
    if importance.method == "reinit":
        torch.manual_seed(seed)
        reset_parameters(pruned)
    return pruned


def prune(model: torch.nn.Module, family: Family, config: PruneConfig,
          importance: ImportanceResult, progress: bool = True) -> PruneOutcome:
    """Prune to `config.ratio`, or search the ratio that reaches `target_macs`/`target_params`."""
    start = time.perf_counter()
    device = next(model.parameters()).device
    example = family.example_inputs(model, device=device)
    macs0, params0 = count_macs_params(model, example)
    search: list[dict] = []

    def attempt(ratio: float) -> tuple[torch.nn.Module, int, int]:
        pruned = prune_with_ratio(model, family, importance, ratio, config.round_to, config.seed,
                                  config.ratio_rule, config.prune_heads, config.head_pruning_ratio)
        macs, params = count_macs_params(pruned, example)
        search.append({"ratio": ratio, "macs_fraction": macs / macs0, "params_fraction": params / params0})
        return pruned, macs, params

    if config.ratio is not None:
        pruned, macs, params = attempt(config.ratio)
        ratio = config.ratio
    else:
        kind = "macs" if config.target_macs is not None else "params"
        target = config.target_macs if kind == "macs" else config.target_params
        pruned, macs, params, ratio = _search(attempt, kind, target, macs0, params0, progress)
    return PruneOutcome(pruned, ratio, (macs0, macs), (params0, params), record_structure(model),
                        record_structure(pruned), search, time.perf_counter() - start)


def _search(attempt, kind: str, target: float, macs0: int, params0: int, progress: bool):
    """Bisection on the ratio: the achieved fraction falls (stepwise) as the ratio grows.

    torch-pruning leaves a group untouched when its ratio would remove every channel, so very high
    ratios prune *less*; the upper end is first pulled back until it really prunes.
    """
    from tqdm.auto import tqdm

    base = macs0 if kind == "macs" else params0
    frac = lambda m, p: (m if kind == "macs" else p) / base  # noqa: E731
    if target >= 1.0 - TARGET_TOLERANCE:
        model, m, p = attempt(0.0)
        return model, m, p, 0.0
    lo, hi = 0.0, MAX_RATIO
    tried = []
    for _ in range(6):
        model, m, p = attempt(hi)
        tried.append((model, m, p, frac(m, p), hi))
        if len(tried) > 1 and tried[-1][3] >= tried[-2][3]:
            break  # backing off stopped helping: the previous hi was the smallest fraction
        hi *= 0.85
    floor_entry = min(tried, key=lambda e: e[3])
    hi, best = floor_entry[4], floor_entry
    if target < floor_entry[3] - TARGET_TOLERANCE:
        raise DiffpruneError(f"target {kind}={target:.3f} is unreachable: the smallest this model prunes "
                             f"to is {floor_entry[3]:.3f} of the original; allowed: [{floor_entry[3]:.2f}, 1.0]")
    for _ in tqdm(range(14), desc=f"search ratio for {kind}={target:.3f}", disable=not progress, leave=False):
        mid = (lo + hi) / 2
        model, m, p = attempt(mid)
        f = frac(m, p)
        if abs(f - target) < abs(best[3] - target):
            best = (model, m, p, f, mid)
        if abs(f - target) <= TARGET_TOLERANCE * 0.25 or hi - lo < 1e-3:
            break
        lo, hi = (mid, hi) if f > target else (lo, mid)
    model, m, p, f, ratio = best
    if abs(f - target) > TARGET_TOLERANCE:
        raise DiffpruneError(f"target {kind}={target:.3f} is unreachable within 2%: channel groups are "
                             f"coarse here and the nearest achievable is {f:.3f} (ratio {ratio:.3f}); "
                             "choose a nearby target or another --round-to")
    return model, m, p, ratio
