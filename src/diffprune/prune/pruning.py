"""One verb, `prune`: dependency graph, scores, removal, family fix-ups, verification.

torch-pruning (>=1.6) builds the dependency graph and removes coupled channels together; we
supply the diffusion-specific parts: the importance (importance.py), the layers never pruned and
the attention head maps (families/), size targeting, and the fix-ups of static attributes.

Size semantics: `ratio` is torch-pruning's per-group pruning ratio. Channels coupled through
GroupNorm(G, C) are pruned in equal numbers per group and torch-pruning keeps floor((C/G)(1-ratio))
per group, so a nominal ratio removes more than its fraction there. `target_macs`/`target_params`
(fractions of the original) search the ratio by bisection instead, before the calibration sweep and
on a weightless copy (size_search.py; PAPER.md: always report real params and MACs).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch_pruning as tp

from ..config import StageConfig
from ..errors import DiffpruneError, check_range
from ..families import Family
from ..families.unet2d import reset_parameters
from ..io.structure import record_structure, validate_structure
from .importance import ESTIMATORS, ImportanceResult, tp_importance

if TYPE_CHECKING:
    from .size_search import Candidate

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
    prune_residual: bool = False  # transformers (DiT): also prune the residual width (Family.configured)
    prompt: str | None = None
    captions: str | None = None
    class_labels: str | None = None
    portable: bool = False  # also write the code plain diffusers needs to load the folder (portable.py)

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
    search: list[dict]  # every size candidate evaluated: ratio -> macs/params (size_search.Candidate)
    wall_time_s: float


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
    for group in graph.get_all_groups(ignored_layers=family.ignored_layers(model),
                                      root_module_types=[torch.nn.Conv2d, torch.nn.Linear]):
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
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
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
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
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


def prune_with_ratio(model: torch.nn.Module, family: Family, importance: ImportanceResult,
                     ratio: float, round_to: int | None = None, seed: int = 0,
                     ratio_rule: str = "torch-pruning", prune_heads: bool = False,
                     head_pruning_ratio: float | None = None,
                     on_group: Callable[[str, list[int], int], None] | None = None,
                     prune_residual: bool = False) -> torch.nn.Module:
    """A pruned deep copy of `model` at `ratio` under `ratio_rule` (the original is untouched).

    `on_group(root_name, removed_idxs, root_channels)` is called for each group just before it is
    pruned (names as in `model`; indices in the root layer's original channels, output channels or,
    for attention head dims rooted at an output projection, its input channels).

    Attention: by default every head keeps its count and loses head dims (`ratio` of them, the
    softmax scale preserved); `prune_heads=True` removes whole heads instead (`head_pruning_ratio`,
    default `ratio`, of each attention's heads) and keeps the head size.
    `prune_residual`: transformer families also prune their residual (hidden) width (Family.configured).
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
            p.grad = importance.grads[name].clone() if name in importance.grads else torch.zeros_like(p)
    before = record_structure(pruned)
    device = next(pruned.parameters()).device
    example = family.example_inputs(pruned, device=device)
    num_heads = family.num_heads(pruned)
    per_layer = None
    if round_to is not None and round_to > 1:  # rounding through per-layer ratios; see rounded_ratio_dict
        per_layer = rounded_ratio_dict(pruned, family, ratio, example, round_to, ratio_rule,
                                       {**({} if prune_heads else num_heads), **gated_halves(pruned),
                                        **family.out_channel_groups(pruned)})
    elif ratio_rule == "paper":
        per_layer = paper_ratio_dict(pruned, family, ratio, example)
    chunks = {**gated_halves(pruned), **family.out_channel_groups(pruned)}  # outputs = k equal parts
    round_to = None  # torch-pruning's own rounding is wrong for grouped channels
    torch.manual_seed(seed)  # random importance: same scores for every ratio tried
    head_ratio = ratio if head_pruning_ratio is None else head_pruning_ratio
    pruner = tp.pruner.MetaPruner(
        pruned, example, importance=tp_importance(importance.method),
        pruning_ratio=ratio, pruning_ratio_dict=per_layer, ignored_layers=family.ignored_layers(pruned),
        num_heads=num_heads, prune_head_dims=not prune_heads, prune_num_heads=prune_heads,
        head_pruning_ratio=head_ratio if prune_heads else 0.0,
        head_pruning_ratio_dict=head_ratio_dict(num_heads, head_ratio) if prune_heads else None,
        round_to=round_to, in_channel_groups={}, out_channel_groups=chunks)
    # (fresh dicts: torch-pruning 1.6's defaults are shared, mutable, and would keep every pruned
    # model's GroupNorm and q/k/v layers alive for the whole process)
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
    pruned.zero_grad(set_to_none=True)
    family.fix_after_pruning(pruned, before, prune_heads=prune_heads)
    validate_structure(pruned, "pruned model")
    if importance.method == "reinit":
        torch.manual_seed(seed)
        reset_parameters(pruned)
    return pruned


def prune(model: torch.nn.Module, family: Family, config: PruneConfig,
          importance: ImportanceResult, progress: bool = True, plan=None) -> PruneOutcome:
    """Prune to `config.ratio`, or to the ratio that reaches `target_macs`/`target_params`.

    The size comes from `plan` (`size_search.search_sizes`, searched now when not given): widths,
    params and MACs decided on a weightless copy before any weights are touched. The one real prune
    then runs at the chosen ratio and must give exactly the planned structure (`SizePlan.check`).
    """
    from .size_search import search_sizes  # size_search builds on this module

    start = time.perf_counter()
    if plan is None:
        plan = search_sizes(model, family, config, progress=progress)
    pruned = prune_with_ratio(model, family, importance, plan.ratio, config.round_to, config.seed,
                              config.ratio_rule, config.prune_heads, config.head_pruning_ratio,
                              prune_residual=config.prune_residual)
    plan.check(pruned)
    return PruneOutcome(pruned, plan.ratio, (plan.macs0, plan.chosen.macs), (plan.params0, plan.chosen.params),
                        record_structure(model), record_structure(pruned), plan.trace(),
                        time.perf_counter() - start)


# --------------------------------------------------------------------------- ratio search


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


def _nearest(tried: list[Candidate], kind: str, target: float) -> str:
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
    reached, missed = [], [f"{_option(rule, round_to)}: nearest {_nearest(tried, kind, target)}"]
    for other_rule in RATIO_RULES:
        for other_round in dict.fromkeys([round_to, None]):
            if (other_rule, other_round) == (rule, round_to):
                continue
            best, other = bisect(lambda r: evaluate(r, other_rule, other_round), kind, target)  # noqa: B023
            if best is not None:
                reached.append(f"{_option(other_rule, other_round)} reaches {best.fraction(kind):.3f} "
                               f"at ratio {best.ratio:.4f}")
            else:
                missed.append(f"{_option(other_rule, other_round)}: nearest {_nearest(other, kind, target)}")
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
