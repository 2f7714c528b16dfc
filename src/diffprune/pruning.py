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
import time

import torch
import torch_pruning as tp

from .config import StageConfig
from .errors import DiffpruneError, check_range
from .families import Family
from .families.unet2d import reset_parameters
from .importance import ImportanceResult, tp_importance
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
    round_to: int | None = None
    ratio_rule: str = "torch-pruning"
    seed: int = 0
    device: str = "cpu"

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
        if self.ratio_rule not in RATIO_RULES:
            raise DiffpruneError(f"ratio_rule={self.ratio_rule!r} is not one of {RATIO_RULES}")
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


def prune_with_ratio(model: torch.nn.Module, family: Family, importance: ImportanceResult,
                     ratio: float, round_to: int | None = None, seed: int = 0,
                     ratio_rule: str = "torch-pruning") -> torch.nn.Module:
    """A pruned deep copy of `model` at `ratio` under `ratio_rule` (the original is untouched)."""
    pruned = copy.deepcopy(model)
    pruned.eval()
    if ratio <= 0:
        return pruned
    if importance.grads is not None:
        for name, p in pruned.named_parameters():
            p.grad = importance.grads[name].clone() if name in importance.grads else torch.zeros_like(p)
    before = record_structure(pruned)
    device = next(pruned.parameters()).device
    example = family.example_inputs(pruned, device=device)
    per_layer = paper_ratio_dict(pruned, family, ratio, example) if ratio_rule == "paper" else None
    torch.manual_seed(seed)  # random importance: same scores for every ratio tried
    pruner = tp.pruner.MetaPruner(
        pruned, example, importance=tp_importance(importance.method),
        pruning_ratio=ratio, pruning_ratio_dict=per_layer, ignored_layers=family.ignored_layers(pruned),
        num_heads=family.num_heads(pruned), prune_head_dims=True, prune_num_heads=False,
        round_to=round_to)
    with torch.no_grad():
        for group in pruner.step(interactive=True):
            group.prune()
    pruned.zero_grad(set_to_none=True)
    family.fix_after_pruning(pruned, before)
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
                                  config.ratio_rule)
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
