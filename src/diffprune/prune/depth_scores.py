"""How much each depth unit matters (lower = removed first), one signature for every method.

    unit_scores(model, units, method, *, importance=None, inputs=None, family=None) -> {unit name: score}

- "diff-pruning" / "taylor": Diff-Pruning's Taylor importance (Fang et al. 2023, Eq. 7-8) summed over
  the unit: sum over its parameters of |w * g|, g = `importance.grads` (the same calibration sweep as
  width pruning: exact or fast estimator; "taylor" = that sweep over every timestep), divided by the
  unit's parameter count (TAYLOR_PER_PARAM): units differ in size (UNet levels, the mid block), and
  damage per parameter removed is what a size target trades. Measured on the trained digits DDPM
  (assets/digits_ddpm, 13 candidate removals: every allowed pair of each level alone + the mid block,
  no fine-tuning; damage = increase of the eps loss on 256 test digits at uniform t): Spearman
  rank correlation of score with damage, sum / per parameter: diff-pruning (fast, thr 0.05) 0.984 /
  0.989, taylor (all t) 0.945 / 0.989; both pick the least damaging pair at 3 of 3 levels (magnitude
  0/3, block influence 0/3; their correlations 0.56 and 0.50).
- "block-influence": ShortGPT's Block Influence (Men et al. 2024, Eq. 2), also TinyFusion's
  (Fang et al. 2025) baseline: 1 - the mean cosine similarity between a layer's input and output
  hidden states, per token / pixel, over calibration batches `inputs` = [(x_t, t, cond), ...]
  (forward hooks, no gradients). UNet pairs: the resnet's input (an up block's hidden state before
  its skip is concatenated) against the pair's output; SD3 blocks: image and context tokens together.
  A unit's score is the sum over its parts (BK-SDM units are one down + one up pair, or one per level).
- "magnitude": the mean squared weight of the unit's parameters.

`part_scores` scores every candidate part (depth.candidate_parts): `depth.depth_units(model,
part_scores=...)` then picks the UNet pair (j, k) of each level with the lowest part scores.

`plan_depth` removes the lowest-scored units, one at a time, until the size (MACs or params, counted
by prune/complexity on a weightless copy: `size_counter`) reaches a target fraction of the original.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..errors import DiffpruneError
from ..families import family_for
from .complexity import count_macs_params
from .depth import DepthUnit, Part, candidate_parts, depth_units, remove_units
from .size_search import meta_copy

METHODS = ("diff-pruning", "taylor", "block-influence", "magnitude")
TAYLOR_PER_PARAM = True  # sum |w g| over the unit / its parameter count (see the module docstring)


def _check(method: str, importance, inputs) -> None:
    if method not in METHODS:
        raise DiffpruneError(f"depth score method={method!r} is not one of {METHODS}")
    if method in ("diff-pruning", "taylor") and (importance is None or importance.grads is None):
        raise DiffpruneError(f"depth score {method!r} needs an importance result with gradients "
                             "(prune.importance.estimate / estimate_fast)")
    if method == "block-influence" and not inputs:
        raise DiffpruneError("depth score 'block-influence' needs calibration inputs [(x_t, t, cond), ...]")


def _named_params(model: torch.nn.Module, part: Part):
    for module in part.modules:
        for name, p in model.get_submodule(module).named_parameters():
            yield f"{module}.{name}", p


def _taylor(model: torch.nn.Module, part: Part, grads: Mapping[str, torch.Tensor]) -> float:
    total, found = 0.0, False
    for name, w in _named_params(model, part):
        g = grads.get(name)
        if g is None:
            continue
        if tuple(g.shape) != tuple(w.shape):
            raise DiffpruneError(f"importance gradient of {name!r} has shape {tuple(g.shape)}, the model's "
                                 f"{tuple(w.shape)}: the importance comes from another model")
        found = True
        total += float((w.detach().double() * g.to(w.device).double()).abs().sum())
    if not found:
        raise DiffpruneError(f"the importance result has no gradient for depth part {part.name!r}: it comes from "
                             "another model")
    return total


def _sum_sq(model: torch.nn.Module, part: Part) -> float:
    return sum(float(p.detach().double().pow(2).sum()) for _, p in _named_params(model, part))


def _cos(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """(sum, count) of per-token cosine similarities: channels of (B, C, H, W), last dim of (B, N, D)."""
    dim = 1 if a.dim() == 4 else -1
    if a.dim() == 4 and a.shape[1] != b.shape[1]:  # an up resnet's input: hidden state, then its skip
        a = a[:, : b.shape[1]]
    if a.shape != b.shape:
        raise DiffpruneError(f"block influence needs equal input and output widths, got {tuple(a.shape)} -> "
                             f"{tuple(b.shape)}")
    cos = F.cosine_similarity(a.float(), b.float(), dim=dim, eps=1e-8)
    return float(cos.sum()), cos.numel()


def _first(value):
    if isinstance(value, tuple | list):
        return value[0]
    return getattr(value, "sample", value)


class _Influence:
    """Forward hooks: each part's input (pre-hook on its first module) and output (its last module)."""

    def __init__(self, model: torch.nn.Module, parts: Sequence[Part]):
        self.sums = {p.name: [0.0, 0] for p in parts}
        self.handles = []
        for part in parts:
            first, last = model.get_submodule(part.modules[0]), model.get_submodule(part.modules[-1])
            self.handles.append(first.register_forward_pre_hook(self._pre(part.name), with_kwargs=True))
            self.handles.append(last.register_forward_hook(self._post(part.name, type(last).__name__)))
        self.seen: dict[str, tuple] = {}

    def _pre(self, name: str):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.seen[name] = (hidden, kwargs.get("encoder_hidden_states"))
        return hook

    def _post(self, name: str, kind: str):
        def hook(module, args, output):
            hidden, context = self.seen.pop(name)
            pairs = [(hidden, output[1]), (context, output[0])] if kind == "JointTransformerBlock" else \
                [(hidden, _first(output))]
            for a, b in pairs:
                if a is not None and b is not None:
                    s, n = _cos(a, b)
                    self.sums[name][0] += s
                    self.sums[name][1] += n
        return hook

    def close(self) -> dict[str, float]:
        for h in self.handles:
            h.remove()
        return {name: 1.0 - s / n if n else float("nan") for name, (s, n) in self.sums.items()}


@torch.no_grad()
def block_influence(model: torch.nn.Module, parts: Sequence[Part], inputs: Iterable[tuple],
                    family=None) -> dict[str, float]:
    """ShortGPT's BI = 1 - mean cos(input, output) of each part over the calibration batches."""
    family = family or family_for(model)
    was_training = model.training
    model.eval()
    hooks = _Influence(model, parts)
    try:
        for x_t, t, cond in inputs:
            family.predict(model, x_t, t, cond)
    finally:
        scores = hooks.close()
        model.train(was_training)
    unseen = [n for n, v in scores.items() if v != v]
    if unseen:
        raise DiffpruneError(f"depth parts {unseen} never ran in the calibration forward passes")
    return scores


def _raw(model, parts: Sequence[Part], method: str, importance, inputs, family) -> dict[str, float]:
    """Per part: sum |w g| (Taylor), sum w^2 (magnitude) or BI."""
    if method == "block-influence":
        return block_influence(model, parts, inputs, family)
    if method == "magnitude":
        return {p.name: _sum_sq(model, p) for p in parts}
    return {p.name: _taylor(model, p, importance.grads) for p in parts}


def _combine(method: str, parts: Sequence[Part], raw: Mapping[str, float]) -> float:
    total = sum(raw[p.name] for p in parts)
    params = sum(p.params for p in parts)
    if method == "magnitude" or (TAYLOR_PER_PARAM and method != "block-influence"):
        return total / max(params, 1)
    return total


def part_scores(model: torch.nn.Module, method: str, *, importance=None, inputs=None, family=None,
                include_mid: bool = False) -> dict[str, float]:
    """Score of every candidate part (depth.candidate_parts), the units' building blocks."""
    _check(method, importance, inputs)
    parts = candidate_parts(model, include_mid)
    raw = _raw(model, parts, method, importance, inputs, family)
    return {p.name: _combine(method, [p], raw) for p in parts}


def unit_scores(model: torch.nn.Module, units: Sequence[DepthUnit], method: str, *, importance=None,
                inputs=None, family=None) -> dict[str, float]:
    """{unit name: score} (module docstring); lower = removed first."""
    _check(method, importance, inputs)
    parts = list({p.name: p for u in units for p in u.parts}.values())
    raw = _raw(model, parts, method, importance, inputs, family)
    return {u.name: _combine(method, u.parts, raw) for u in units}


def scored_units(model: torch.nn.Module, method: str, *, include_mid: bool = False, importance=None,
                 inputs=None, family=None) -> tuple[list[DepthUnit], dict[str, float]]:
    """The units (UNet pairs chosen by score) and their scores, from one scoring pass over the parts."""
    _check(method, importance, inputs)
    parts = candidate_parts(model, include_mid)
    raw = _raw(model, parts, method, importance, inputs, family)
    units = depth_units(model, include_mid, part_scores={p.name: _combine(method, [p], raw) for p in parts})
    return units, {u.name: _combine(method, u.parts, raw) for u in units}


# --------------------------------------------------------------------------- planning


def size_counter(model: torch.nn.Module, kind: str = "macs") -> Callable[[Sequence[DepthUnit]], int]:
    """units -> MACs (or params) of `model` without them, counted by prune/complexity on a weightless
    (meta) copy, as size_search.py counts; a removal that is not config-expressible raises."""
    if kind not in ("macs", "params"):
        raise DiffpruneError(f"kind={kind!r} is not one of ('macs', 'params')")
    meta = meta_copy(model).eval()
    if getattr(meta, "is_gradient_checkpointing", False):
        meta.disable_gradient_checkpointing()
    family = family_for(model)

    def count(units: Sequence[DepthUnit]) -> int:
        pruned = remove_units(meta, units)
        macs, params = count_macs_params(pruned, family.example_inputs(pruned, device="meta"))
        return macs if kind == "macs" else params

    return count


def _put_back(removed: list[DepthUnit], scores: Mapping[str, float], size_of: Callable[[Sequence[DepthUnit]], int],
              total: int, target: float, fraction: float) -> tuple[list[DepthUnit], float]:
    """`removed` without the units the target does not need, the most important (highest score) kept first."""
    for unit in sorted(removed, key=lambda u: (-scores[u.name], u.name)):
        rest = [u for u in removed if u is not unit]
        if not rest:
            break
        try:
            size = size_of(rest)
        except DiffpruneError:
            continue
        if size / total <= target:
            removed, fraction = rest, size / total
    return removed, fraction


@dataclasses.dataclass
class DepthPlan:
    removed: list[DepthUnit]  # in removal order (lowest score first)
    fraction: float  # achieved size / original size
    target: float
    reached: bool  # fraction <= target
    trace: list[tuple[str, float]]  # (unit name, fraction after removing it)
    message: str | None = None  # why the target was not reached

    def summary(self) -> dict:
        return {"removed": [u.name for u in self.removed], "modules": [m for u in self.removed for m in u.modules],
                "fraction": self.fraction, "target": self.target, "reached": self.reached, "trace": self.trace,
                "message": self.message}


def plan_depth(units: Sequence[DepthUnit], scores: Mapping[str, float],
               size_of: Callable[[Sequence[DepthUnit]], int], target_fraction: float) -> DepthPlan:
    """Remove the lowest-scored units, one at a time, until size_of(removed) / size_of([]) <= target.

    Stops at the first set that reaches the target, then puts back, highest score first, every removed
    unit the target does not need (a small low-scored unit taken before a large one that alone reaches
    the target; `_put_back`), so it never removes more than the target asks. A unit whose
    removal next is not config-expressible (size_of raises DiffpruneError) waits for the next step.
    When every unit that can go is gone and the size is still above the target, `reached` is False
    and `message` says so: depth alone cannot reach it (combine with width pruning).
    """
    if not 0.0 < target_fraction <= 1.0:
        raise DiffpruneError(f"target_fraction={target_fraction!r} is not allowed; allowed: (0, 1]")
    missing = [u.name for u in units if u.name not in scores]
    if missing:
        raise DiffpruneError(f"no score for depth units {missing}")
    total = size_of([])
    order = sorted(units, key=lambda u: (scores[u.name], u.name))
    removed: list[DepthUnit] = []
    trace: list[tuple[str, float]] = []
    fraction = 1.0
    while fraction > target_fraction:
        for unit in (u for u in order if u not in removed):
            try:
                size = size_of([*removed, unit])
            except DiffpruneError:
                continue
            removed.append(unit)
            fraction = size / total
            trace.append((unit.name, fraction))
            break
        else:
            break
    reached = fraction <= target_fraction
    if reached:
        removed, fraction = _put_back(removed, scores, size_of, total, target_fraction, fraction)
    message = None if reached else (
        f"depth pruning alone reaches {fraction:.3f} (all {len(removed)} removable units gone), above the target "
        f"{target_fraction:.3f}; combine with width pruning")
    return DepthPlan(removed, fraction, target_fraction, reached, trace, message)
