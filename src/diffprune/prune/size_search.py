"""Model sizes decided before the calibration sweep: widths, params and MACs of any ratio, in seconds.

torch-pruning's local pruning removes a number of channels per group that depends on the ratio and
the group's shape, never on the scores (which channels go does; gated activations are grouped for
this, see pruning.gated_halves). So sizes are computed without weights, before the sweep (issue 14):
one dependency graph on a meta-device copy (no weights copied); per candidate ratio, the indices
torch-pruning 1.6's `MetaPruner._prune` removes from each group, counted as it counts them, mapped to
the coupled layers through that graph and applied with its own pruning functions to another meta
copy; MACs from the widths with its op counter's formulas (`WidthMacs`). The real prune then runs
once, at the chosen ratio, and must give exactly the planned structure (`SizePlan.check`).

A global/isomorphic allocation (allocation.py) makes the widths depend on the scores: its search
runs after the sweep, on the groups' scores, each candidate ratio turned into per-group ratios
(`allocate`) that the planner and the real prune apply alike.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time

import torch
import torch_pruning as tp
from torch import nn

from ..errors import DiffpruneError
from ..families import Family
from ..io.structure import record_structure, validate_structure
from .allocation import MAX_GROUP_RATIO, GroupSpec, allocate, ranked_groups, smallest
from .bisection import MAX_RATIO, TARGET_TOLERANCE, bisect, nearest, non_monotone_warning, unreachable_message
from .complexity import count_macs_params
from .config import PruneConfig
from .ratio_rules import gated_halves, paper_ratios, ratio_rule_groups, rounded_ratios
from .width_macs import WidthMacs

logger = logging.getLogger(__name__)
_ROOT_TYPES = [tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, tp.ops.TORCH_LSTM]  # MetaPruner's root_module_types
MONOTONE_PROBES = 7  # smaller ratios tried when a --ratio leaves groups whole (r/8 .. 7r/8)


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are meta tensors: shapes, no storage."""
    memo: dict[int, torch.Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        memo[id(t)] = torch.empty_like(t, device="meta")
        if isinstance(t, nn.Parameter):
            memo[id(t)] = nn.Parameter(memo[id(t)], requires_grad=t.requires_grad)
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def _index_mapping_once():
    """Refresh a graph's concat/split index mappings once, not at every `get_pruning_group` (~30 ms
    per call on the SD v1.5 UNet): the planner never prunes its graph, so they stay valid."""
    module = tp.dependency.index_mapping
    real, done = module.update_index_mapping, set()

    def once(graph):
        return None if id(graph) in done else done.add(id(graph)) or real(graph)

    module.update_index_mapping = once
    try:
        yield
    finally:  # restored whatever happens: the real prune needs every refresh
        module.update_index_mapping = real


@dataclasses.dataclass
class Candidate:
    """The size one ratio gives, under one ratio rule and rounding."""
    ratio: float
    ratio_rule: str
    round_to: int | None
    macs: int  # torch-pruning's counter, batch 1, model resolution (prune/complexity.py)
    params: int
    macs_fraction: float
    params_fraction: float
    whole_groups: int  # groups torch-pruning leaves whole because this ratio would empty them
    time_s: float
    structure: dict = dataclasses.field(default_factory=dict, repr=False)

    def fraction(self, kind: str) -> float:
        return self.macs_fraction if kind == "macs" else self.params_fraction

    def to_dict(self) -> dict:  # without the structure (large; the report holds the chosen widths)
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "structure"}


@dataclasses.dataclass
class _Group:
    """One group as torch-pruning's `_prune` ranks it (after its attention re-rooting)."""
    root: nn.Module
    handler: object
    ch_groups: int  # GroupNorm groups / heads: the same count is removed from each
    size: int  # ranked dims per channel group
    ratio_keys: tuple  # layers whose per-layer ratio applies, in torch-pruning's lookup order
    prunes_dims: bool  # removes channels (False: an attention whose whole heads are pruned instead)
    head_layer: nn.Module | None  # its first q/k/v projection when whole heads are pruned
    heads: int = 0
    head_dim: int = 0
    bijection: list | None = None  # see SizePlanner._bijection; None: ask the graph per candidate


class SizePlanner:
    """Sizes of any ratio for one model, from one dependency graph on a weightless copy."""

    _rule_groups: list | None = None  # ratio_rule_groups of the graph, built on first use
    # a non-uniform allocation: ratio -> {layer name: per-group ratio} (allocation.allocate); None: uniform
    layer_ratios_for = None
    def __init__(self, model: nn.Module, family: Family, prune_heads: bool = False,
                 head_pruning_ratio: float | None = None):
        start = time.perf_counter()
        self.family, self.prune_heads, self.head_pruning_ratio = family, prune_heads, head_pruning_ratio
        with _index_mapping_once():
            self._setup(model, family, prune_heads)
        self.setup_s = time.perf_counter() - start

    def _setup(self, model: nn.Module, family: Family, prune_heads: bool) -> None:
        self.meta = meta_copy(model).eval()
        if getattr(self.meta, "is_gradient_checkpointing", False):
            self.meta.disable_gradient_checkpointing()  # as prune_model_at_ratio: the tracer must see every op
        self.example = family.example_inputs(self.meta, device="meta")
        self.macs0, self.params0 = count_macs_params(self.meta, self.example)
        self._macs = WidthMacs.build(self.meta, self.example, self.macs0)
        self.before = record_structure(self.meta)
        self.num_heads = family.num_heads(self.meta)
        pruner = tp.pruner.MetaPruner(  # the real prune's settings; only its graph and helpers are used
            self.meta, self.example, importance=tp.importance.RandomImportance(), pruning_ratio=0.5,
            ignored_layers=family.ignored_layers(self.meta), num_heads=dict(self.num_heads),
            prune_head_dims=not prune_heads, prune_num_heads=prune_heads,
            head_pruning_ratio=0.5 if prune_heads else 0.0,
            in_channel_groups={}, out_channel_groups={**gated_halves(self.meta),
                                                    **family.out_channel_groups(self.meta)}, root_module_types=[],
            unwrapped_parameters=family.unwrapped_parameters(self.meta))
        pruner.root_module_types = _ROOT_TYPES  # the default; [] above skips the constructor's group count
        self.graph = pruner.DG
        self._names = {m: n for n, m in self.meta.named_modules()}
        groups = self.graph.get_all_groups(ignored_layers=pruner.ignored_layers,
                                           root_module_types=pruner.root_module_types)
        self._groups = [g for g in (self._rank_group(pruner, group) for group in groups) if g is not None]
        self.specs: list[GroupSpec] = ranked_groups(pruner, self._names, prune_heads, score=False)

    def _rank_group(self, pruner, group) -> _Group | None:
        """Phase 1 of torch-pruning 1.6's `BasePruner._prune` for one group, minus the scores."""
        if not pruner._check_pruning_ratio(group):
            return None
        is_attention, qkv = pruner._is_atten_group(group)
        if is_attention:
            group = pruner._downstream_node_as_root_if_attention(group)
            if group is None:
                return None
        ch_groups = pruner._get_channel_groups(group)
        keys = []
        for dep, _ in group:
            for module, fn in ((dep.source.module, dep.trigger), (dep.target.module, dep.handler)):
                if self.graph.is_out_channel_pruning_fn(fn) and module not in keys:
                    keys.append(module)
        out = _Group(group[0].dep.target.module, group[0].dep.handler, ch_groups, len(group[0].idxs) // ch_groups,
                     tuple(keys), not pruner._is_atten_group(group)[0] or not self.prune_heads, None)
        if is_attention and self.prune_heads:
            heads = [self.num_heads[q] for q in qkv]
            out.head_layer, out.heads = qkv[0], max(heads)
            out.head_dim = qkv[0].out_features // (heads[0] * (3 if len(qkv) == 1 else 1))
        out.bijection = self._bijection(group)
        return out

    def _bijection(self, group) -> list | None:
        """(dependency, its index for each root index, its width) per coupled layer, if each holds one
        index per root index (torch-pruning records the root of each): a subset of root indices then
        maps to the matching subset, as `get_pruning_group` would (tests/test_size_search.py checks)."""
        n = len(group[0].idxs)
        if list(group[0].idxs) != list(range(n)):
            return None
        out = []
        for item in group:
            dep, idxs, roots = item.dep, list(item.idxs), list(item.root_idxs)
            if len(idxs) != n or len(set(idxs)) != n or sorted(roots) != list(range(n)):
                return None
            by_root = [0] * n
            for i, r in zip(idxs, roots, strict=True):
                by_root[r] = i
            fn = self.graph.get_out_channels if self.graph.is_out_channel_pruning_fn(dep.handler) else \
                self.graph.get_in_channels if self.graph.is_in_channel_pruning_fn(dep.handler) else None
            out.append((dep, by_root, fn and fn(dep.target.module)))
        return out

    def _group_removals(self, g: _Group, idxs: list[int]) -> list | None:
        """[(dependency, indices)] torch-pruning removes for root indices `idxs`; None if it refuses
        (`check_pruning_group`: some layer would lose every channel, so the group stays whole)."""
        if g.bijection is None:
            group = self.graph.get_pruning_group(g.root, g.handler, idxs)
            return [(dep, list(i)) for dep, i in group] if self.graph.check_pruning_group(group) else None
        if any(width is not None and width <= len(idxs) for _, _, width in g.bijection):
            return None
        return [(dep, [by_root[r] for r in idxs]) for dep, by_root, _ in g.bijection]

    def _per_layer(self, ratio: float, ratio_rule: str, round_to: int | None) -> dict:
        """The per-layer ratios prune_model_at_ratio passes for this rule and rounding ({} for none)."""
        if self.layer_ratios_for is not None:
            modules = dict(self.meta.named_modules())
            return {modules[n]: r for n, r in self.layer_ratios_for(ratio).items()}
        if not (round_to is not None and round_to > 1) and ratio_rule != "paper":
            return {}
        if self._rule_groups is None:
            self._rule_groups = ratio_rule_groups(self.graph, self.family, self.meta, {
                **({} if self.prune_heads else self.num_heads), **gated_halves(self.meta),
                **self.family.out_channel_groups(self.meta)})
        if round_to is not None and round_to > 1:
            return rounded_ratios(self._rule_groups, ratio, round_to, ratio_rule)
        return paper_ratios(self._rule_groups, ratio)

    def _removals(self, ratio: float, ratio_rule: str, round_to: int | None) -> tuple[dict, int]:
        """{(layer, pruning function): (dependency, indices)} torch-pruning removes at `ratio`, and the
        number of groups it leaves whole (phase 2 of `_prune`; indices in the unpruned layers)."""
        per_layer = self._per_layer(ratio, ratio_rule, round_to)
        head_ratio = ratio if self.head_pruning_ratio is None else self.head_pruning_ratio
        removals: dict = {}
        whole = 0
        for g in self._groups:
            r = min(next((per_layer[m] for m in g.ratio_keys if m in per_layer), ratio), 1.0)
            n = g.size - int(g.size * (1 - r))
            if n <= 0:
                continue
            idxs = {c * g.size + i for c in range(g.ch_groups) for i in range(n)} if g.prunes_dims else set()
            if g.head_layer is not None:  # head_ratio_dict's cap, then tp's ceil(ratio * heads)
                h = self.num_heads[g.head_layer]
                removed = math.ceil(min(min(head_ratio, (h - 1) / h), 1) * g.heads)
                idxs |= {k * g.head_dim + d for k in range(removed) for d in range(g.head_dim)}
            if not idxs:
                continue
            group = self._group_removals(g, sorted(idxs))
            if group is None:
                whole += 1
                continue
            for dep, dep_idxs in group:
                key = (dep.target.module, dep.handler)
                removals.setdefault(key, (dep, set()))[1].update(dep_idxs)
        return removals, whole

    def evaluate(self, ratio: float, ratio_rule: str = "torch-pruning", round_to: int | None = None,
                 full: bool = False) -> Candidate:
        """The size `prune_model_at_ratio(ratio, round_to, ratio_rule=...)` gives, on meta tensors. `full`: also
        the family's fix-ups and the whole structure (`SizePlan.check`); else params and MACs only
        (from the widths when `WidthMacs` covers the model, in place on the planner's copy, restored)."""
        start = time.perf_counter()
        if ratio <= 0:  # prune_model_at_ratio returns an untouched copy
            return self._candidate(ratio, ratio_rule, round_to, self.meta, 0, start, True)
        with _index_mapping_once():
            removals, whole = self._removals(ratio, ratio_rule, round_to)
        full = full or self._macs is None  # counting by a forward pass needs the fix-ups first
        in_place = not full and not any(isinstance(t, nn.Parameter) for t, _ in removals)
        pruned = self.meta if in_place else copy.deepcopy(self.meta)
        modules = dict(pruned.named_modules())
        saved = {m: {**m.__dict__, "_parameters": dict(m._parameters), "_buffers": dict(m._buffers)}
                 for m, _ in removals if in_place and m in self._names}
        try:
            for (target, handler), (dep, idxs) in removals.items():
                handler.__self__.pruning_dim = dep.target.pruning_dim  # as tp's Dependency.__call__
                if isinstance(target, nn.Parameter):  # an unwrapped parameter: replaced by a pruned one
                    owner, _, leaf = self.graph._param_to_name[target].rpartition(".")
                    owner = pruned.get_submodule(owner)
                    setattr(owner, leaf, handler(getattr(owner, leaf), sorted(idxs)))
                elif target in self._names:  # else one of tp's op nodes (concat, split, ...): no tensors
                    handler(modules[self._names[target]], sorted(idxs))
            if full:
                self.family.fix_after_pruning(pruned, self.before, prune_heads=self.prune_heads)
                validate_structure(pruned, f"size plan at ratio {ratio}")
            return self._candidate(ratio, ratio_rule, round_to, pruned, whole, start, full)
        finally:
            for module, state in saved.items():
                module.__dict__.update(state)

    def _candidate(self, ratio, ratio_rule, round_to, model, whole, start, full) -> Candidate:
        if self._macs is not None:
            macs, params = self._macs.count(model), sum(p.numel() for p in model.parameters())
        else:
            macs, params = count_macs_params(model, self.example)
        return Candidate(ratio, ratio_rule, round_to, macs, params, macs / self.macs0, params / self.params0,
                         whole, time.perf_counter() - start, record_structure(model) if full else {})


@dataclasses.dataclass
class SizePlan:
    """The size search of one prune: every candidate tried and the one chosen."""

    kind: str  # "ratio", "macs" or "params"
    target: float | None
    chosen: Candidate
    candidates: list[Candidate]
    macs0: int
    params0: int
    setup_s: float
    wall_time_s: float
    warnings: list[str]
    allocation: str = "uniform"
    groups: list[GroupSpec] = dataclasses.field(default_factory=list, repr=False)  # the ranked groups
    layer_ratios: dict[str, float] | None = None  # a non-uniform allocation's per-group ratios (chosen)

    @property
    def ratio(self) -> float:
        return self.chosen.ratio

    def check(self, pruned: nn.Module) -> None:
        """The real prune must give the planned structure (else the plan is wrong: a bug, not bad input)."""
        real, plan = record_structure(pruned), self.chosen.structure
        if real != plan:
            name = next((n for n in sorted(set(real) | set(plan)) if real.get(n) != plan.get(n)), "?")
            raise RuntimeError(f"size plan differs from the real prune at ratio {self.ratio} in {name!r}: "
                               f"planned {plan.get(name)}, pruned {real.get(name)}")

    def trace(self) -> list[dict]:
        return [c.to_dict() for c in self.candidates]

    def report(self) -> dict:  # prune_report.json's "size_search"
        return {"kind": self.kind, "target": self.target, "chosen_ratio": self.ratio,
                "macs_fraction": self.chosen.macs_fraction, "params_fraction": self.chosen.params_fraction,
                "candidates": self.trace(), "setup_s": self.setup_s, "wall_time_s": self.wall_time_s,
                "warnings": self.warnings, "before_calibration": self.allocation == "uniform",
                "allocation": self.allocation}


def search_sizes(model: nn.Module, family: Family, config: PruneConfig, progress: bool = True,
                 scores: list[GroupSpec] | None = None) -> SizePlan:
    """The size plan of `config`: its ratio's size, or the ratio whose size is within 2% of the target.

    A global/isomorphic `config.allocation` needs the groups' `scores` (allocation.group_scores) and
    plans its per-group ratios from them. Raises DiffpruneError for an unreachable target, listing
    the nearest sizes under each `--ratio-rule` / `--round-to` tried and which one reaches it, if any.
    """
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # whatever the family draws, the sweep's random stream is unchanged
        planner = _planner(model, family, config)
        rule, round_to = config.ratio_rule, config.round_to if (config.round_to or 0) > 1 else None
        if config.allocation != "uniform":
            if scores is None:
                raise ValueError(f"allocation {config.allocation!r} plans from the scores (allocation.group_scores)")
            planner.layer_ratios_for = lambda r: allocate(scores, r, config.allocation, round_to)
        if config.ratio is not None:
            kind, target = "ratio", None
            chosen = planner.evaluate(config.ratio, rule, round_to, full=True)
            tried = [chosen]
            if chosen.whole_groups:  # a group left whole: would a smaller ratio prune more?
                tried += [planner.evaluate(config.ratio * k / (MONOTONE_PROBES + 1), rule, round_to)
                          for k in range(1, MONOTONE_PROBES + 1)]
            metric = "macs"
        else:
            kind = metric = "macs" if config.target_macs is not None else "params"
            target = config.target_macs if kind == "macs" else config.target_params
            chosen, tried = bisect(lambda r: planner.evaluate(r, rule, round_to), kind, target, progress)
            if chosen is None and config.allocation != "uniform":
                raise DiffpruneError(_unreachable_allocation(config.allocation, kind, target, tried))
            if chosen is None:
                raise DiffpruneError(unreachable_message(planner.evaluate, kind, target, rule, round_to, tried))
        if not chosen.structure:  # the whole structure of the chosen size, for SizePlan.check
            chosen.structure = planner.evaluate(chosen.ratio, rule, round_to, full=True).structure
    warnings = [w for w in [non_monotone_warning(chosen, tried, metric)] if w]
    for w in warnings:
        logger.warning(w)
    return SizePlan(kind, target, chosen, tried, planner.macs0, planner.params0, planner.setup_s,
                    time.perf_counter() - start, warnings, config.allocation, scores or planner.specs,
                    planner.layer_ratios_for(chosen.ratio) if planner.layer_ratios_for else None)


def _planner(model: nn.Module, family: Family, config: PruneConfig) -> SizePlanner:
    family = family.configured(prune_residual=config.prune_residual)  # DiT: --prune-residual
    return SizePlanner(model, family, config.prune_heads, config.head_pruning_ratio)


def _unreachable_allocation(allocation: str, kind: str, target: float, tried: list[Candidate]) -> str:
    smallest_ = min(c.fraction(kind) for c in tried)
    if target >= smallest_ - TARGET_TOLERANCE:  # inside the range, but between two steps of the ranking
        return (f"target {kind}={target:.3f} is unreachable within 2% of the original with --allocation "
                f"{allocation}: it falls between two sizes, nearest {nearest(tried, kind, target)}; use a target "
                f"within 2% of one of them (or its --ratio), or --allocation uniform")
    return (f"target {kind}={target:.3f} is unreachable within 2% of the original with --allocation {allocation}: "
            f"the smallest size keeps {smallest_:.3f} (every group keeps >= {1 - MAX_GROUP_RATIO:.0%} of its "
            f"channels); allowed: a target >= {smallest_ - TARGET_TOLERANCE:.3f}, or --allocation uniform")


def check_reachable(model: nn.Module, family: Family, config: PruneConfig) -> dict:
    """Before the sweep, for a global/isomorphic allocation: the smallest size it can give (every group
    at its cap, whatever the scores) must reach the target; returns {"macs": .., "params": ..} fractions."""
    with torch.random.fork_rng(devices=[]):
        planner = _planner(model, family, config)
        round_to = config.round_to if (config.round_to or 0) > 1 else None
        planner.layer_ratios_for = lambda r: smallest(planner.specs, round_to)
        low = planner.evaluate(MAX_RATIO, config.ratio_rule, round_to)
    for kind, target in (("macs", config.target_macs), ("params", config.target_params)):
        if target is not None and target < low.fraction(kind) - TARGET_TOLERANCE:
            raise DiffpruneError(_unreachable_allocation(config.allocation, kind, target, [low]))
    return {"macs": low.macs_fraction, "params": low.params_fraction}
