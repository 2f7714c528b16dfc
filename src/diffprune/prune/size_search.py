"""Model sizes decided before the calibration sweep: widths, params and MACs of any ratio, in seconds.

torch-pruning's local pruning removes a number of channels per group that depends on the ratio and
the group's shape, never on the scores (which channels go does; gated activations are grouped for
this, see pruning.gated_halves). So sizes are computed without weights, before the sweep (issue 14):
one dependency graph on a meta-device copy (no weights copied); per candidate ratio, the indices
torch-pruning 1.6's `MetaPruner._prune` removes from each group, counted as it counts them, mapped to
the coupled layers through that graph and applied with its own pruning functions to another meta
copy; MACs from the widths with its op counter's formulas (`_WidthMacs`). The real prune then runs
once, at the chosen ratio, and must give exactly the planned structure (`SizePlan.check`).
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
from .complexity import count_macs_params
from .pruning import (
    PruneConfig,
    bisect,
    gated_halves,
    non_monotone_warning,
    paper_ratios,
    ratio_rule_groups,
    rounded_ratios,
    unreachable_message,
)

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
            self.meta.disable_gradient_checkpointing()  # as prune_with_ratio: the tracer must see every op
        self.example = family.example_inputs(self.meta, device="meta")
        self.macs0, self.params0 = count_macs_params(self.meta, self.example)
        self._macs = _WidthMacs.build(self.meta, self.example, self.macs0)
        self.before = record_structure(self.meta)
        self.num_heads = family.num_heads(self.meta)
        pruner = tp.pruner.MetaPruner(  # the real prune's settings; only its graph and helpers are used
            self.meta, self.example, importance=tp.importance.RandomImportance(), pruning_ratio=0.5,
            ignored_layers=family.ignored_layers(self.meta), num_heads=dict(self.num_heads),
            prune_head_dims=not prune_heads, prune_num_heads=prune_heads, head_pruning_ratio=0.5 if prune_heads else 0.0,
            in_channel_groups={}, out_channel_groups={**gated_halves(self.meta),
                                                    **family.out_channel_groups(self.meta)}, root_module_types=[])
        pruner.root_module_types = _ROOT_TYPES  # the default; [] above skips the constructor's group count
        self.graph = pruner.DG
        self._names = {m: n for n, m in self.meta.named_modules()}
        groups = self.graph.get_all_groups(ignored_layers=pruner.ignored_layers,
                                           root_module_types=pruner.root_module_types)
        self._groups = [g for g in (self._rank_group(pruner, group) for group in groups) if g is not None]

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
        """The per-layer ratios prune_with_ratio passes for this rule and rounding ({} for none)."""
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
        """The size `prune_with_ratio(ratio, round_to, ratio_rule=...)` gives, on meta tensors. `full`: also
        the family's fix-ups and the whole structure (`SizePlan.check`); else params and MACs only
        (from the widths when `_WidthMacs` covers the model, in place on the planner's copy, restored)."""
        start = time.perf_counter()
        if ratio <= 0:  # prune_with_ratio returns an untouched copy
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


_COUNTED = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm,
            nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


class _WidthMacs:
    """torch-pruning's op counter (tp.utils.op_counter, hooks on layers) as a function of the widths.

    Pruning changes channel widths only, never batch, positions or tokens: one forward of the
    unpruned model records each counted layer's input size and output positions per call, and
    `count` applies the counter's per-layer formulas (linear: inputs x out + bias; conv: kernel x
    in x out/groups x positions + bias; norms: inputs, x2 when affine) to the current widths.
    """

    def __init__(self, calls: dict, widths: dict):
        self.calls, self.widths = calls, widths
    @classmethod
    def build(cls, model: nn.Module, example: dict, macs0: int) -> _WidthMacs | None:
        """The counter, or None if a counted layer is not `_COUNTED` or it does not give `macs0` unpruned."""
        calls: dict[str, list] = {}
        hooks = []
        for name, m in model.named_modules():
            if tp.utils.op_counter.is_supported_instance(m):
                if not isinstance(m, _COUNTED):
                    return None
                hooks.append(m.register_forward_hook(
                    lambda mod, inp, out, name=name: calls.setdefault(name, []).append(
                        (inp[0].numel(), out.numel() // out.shape[1] if out.dim() > 1 else 1))))
        try:
            with torch.no_grad():
                model(**example)
        finally:
            [h.remove() for h in hooks]
        counter = cls(calls, {n: cls._width(model.get_submodule(n)) for n in calls})
        return counter if counter.count(model) == macs0 else None

    @staticmethod
    def _width(m: nn.Module) -> int:  # the input width its count scales with (convs: unused)
        return m.in_features if isinstance(m, nn.Linear) else math.prod(m.normalized_shape) if isinstance(
            m, nn.LayerNorm) else m.num_channels if isinstance(m, nn.GroupNorm) else getattr(m, "num_features", 1)

    def count(self, model: nn.Module) -> int:
        modules, total = dict(model.named_modules()), 0
        for name, records in self.calls.items():
            m, w0 = modules[name], self.widths[name]
            for inputs, positions in records:
                if isinstance(m, nn.Linear):
                    total += inputs // w0 * m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
                elif isinstance(m, nn.modules.conv._ConvNd):
                    bias = m.out_channels * positions if m.bias is not None else 0
                    total += math.prod(m.kernel_size) * m.in_channels * (m.out_channels // m.groups) * positions + bias
                else:
                    affine = m.elementwise_affine if isinstance(m, nn.LayerNorm) else m.affine
                    total += inputs // w0 * self._width(m) * (2 if affine else 1)
        return total


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
                "warnings": self.warnings, "before_calibration": True}


def search_sizes(model: nn.Module, family: Family, config: PruneConfig, progress: bool = True) -> SizePlan:
    """The size plan of `config`: its ratio's size, or the ratio whose size is within 2% of the target.

    Raises DiffpruneError for an unreachable target, listing the nearest sizes under each
    `--ratio-rule` / `--round-to` tried and which one reaches the target, if any.
    """
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # whatever the family draws, the sweep's random stream is unchanged
        family = family.configured(prune_residual=config.prune_residual)  # DiT: --prune-residual
        planner = SizePlanner(model, family, config.prune_heads, config.head_pruning_ratio)
        rule, round_to = config.ratio_rule, config.round_to if (config.round_to or 0) > 1 else None
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
            if chosen is None:
                raise DiffpruneError(unreachable_message(planner.evaluate, kind, target, rule, round_to, tried))
        if not chosen.structure:  # the whole structure of the chosen size, for SizePlan.check
            chosen.structure = planner.evaluate(chosen.ratio, rule, round_to, full=True).structure
    warnings = [w for w in [non_monotone_warning(chosen, tried, metric)] if w]
    for w in warnings:
        logger.warning(w)
    return SizePlan(kind, target, chosen, tried, planner.macs0, planner.params0, planner.setup_s,
                    time.perf_counter() - start, warnings)
