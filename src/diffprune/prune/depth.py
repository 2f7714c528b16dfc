"""Depth pruning: whole layers removed so that the result is a plain diffusers config (issue 26).

Width pruning (the rest of this folder) keeps every layer and narrows it; depth pruning drops layers
and keeps every width, so the pruned model is `TheDiffusersClass.from_config(new_config)` with the
surviving weights: it loads in plain diffusers, without diffprune. A *unit* is the smallest set of
layers whose removal is one config change:

- DiT / PixArt (`DiTTransformer2DModel`, `PixArtTransformer2DModel`): each entry of
  `transformer_blocks` (config: `num_layers`), as in ShortGPT (Men et al. 2024, "ShortGPT: Layers in
  Large Language Models are More Redundant Than You Expect") and TinyFusion (Fang et al. 2025,
  "TinyFusion: Diffusion Transformers Learned Shallow").
- SD3 (`SD3Transformer2DModel`): every block but the last (diffusers builds the last one with
  `context_pre_only=True`, so no config can drop it); `dual_attention_layers` (SD3.5) is remapped to
  the new block indices. (`skip_layers` / the pipeline's `skip_guidance_layers` are call arguments,
  not config: a caller must remap them with `remap_indices`.)
- UNets, after BK-SDM (Kim et al. 2023, "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable
  Diffusion", which removes the second resnet+attention pair of each down and up stage): one
  resnet (with its attention, if the block has them) of a level's down block *and* one of the
  mirrored up block, because the config has one `layers_per_block` per level (down blocks have L
  layers, up blocks L + 1). Which down index j / up index k may go is read off diffusers' own
  construction (`allowed_indices`): a kept resnet must have, at its new position, the shapes the
  new config builds there (down resnet 0 takes the block's input width; up resnet 0 takes the
  previous up block's width + a skip; the last up resnet takes the level's input width as skip).
  So j >= 1, or j = 0 when the level keeps its width; 0 < k < L, or k = 0 / k = L when the
  widths they differ by are equal. The skip connections re-pair (BK-SDM accepts it: post-training
  fixes it). UNet2DConditionModel takes a per-level tuple, so each level is its own unit (name
  `level<l>.<m>`, the m-th removal there; `transformer_layers_per_block` /
  `reverse_transformer_layers_per_block` lose the removed entries when they are per layer);
  UNet2DModel's `layers_per_block` is one int, so its unit `layers.<m>` removes one pair at every
  level. Each level keeps at least one layer. The mid block (`mid_block_type=None`, supported by
  both classes in diffusers 0.42) is a unit only with `include_mid=True` (BK-SDM-Small drops it).

`remove_units` proves every removal: a meta-device model built from the new config (plain class:
`from_config`; a width-pruned `Pruned*` model: its own loader `io.pipeline.build_pruned`, then a
forward pass on meta tensors) must hold exactly the result's state-dict keys and shapes.
Scores and the plan (`plan_depth`: the lowest-scored units go until a size target) live in depth_scores.py.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from diffusers import (
    DiTTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)

from ..errors import DiffpruneError
from ..families import family_for
from ..io.pipeline import PrunedModelMixin, build_pruned
from ..io.structure import record_structure

TRANSFORMERS = (DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel)
UNETS = (UNet2DModel, UNet2DConditionModel)
INDEX_KEYS = ("dual_attention_layers",)  # config values that are lists of transformer block indices


@dataclasses.dataclass(frozen=True)
class Part:
    """One removable layer: a transformer block, a resnet (+ its attention) or the mid block."""
    name: str  # transformer_blocks.3 / down_blocks.1.resnets.1 / mid_block
    modules: tuple[str, ...]  # the module names it removes
    params: int


@dataclasses.dataclass(frozen=True)
class DepthUnit:
    """The parts whose removal is one config change (see the module docstring)."""
    name: str  # stable: transformer_blocks.<i> / level<l>.<m> / layers.<m> / mid_block
    parts: tuple[Part, ...]

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(m for p in self.parts for m in p.modules)

    @property
    def params(self) -> int:
        return sum(p.params for p in self.parts)


def _params(model: torch.nn.Module, names: Sequence[str]) -> int:
    return sum(p.numel() for n in names for p in model.get_submodule(n).parameters())


def _part(model: torch.nn.Module, *modules: str) -> Part:
    return Part(modules[0], tuple(modules), _params(model, modules))


def _check_class(model: torch.nn.Module) -> None:
    if not isinstance(model, TRANSFORMERS + UNETS):
        raise DiffpruneError(f"depth pruning of {type(model).__name__!r} is not supported; supported: "
                             f"{[c.__name__ for c in TRANSFORMERS + UNETS]}")


# --------------------------------------------------------------------------- UNet levels


def _meta_build(model: torch.nn.Module, config: Mapping) -> torch.nn.Module:
    """The plain diffusers class of `model` built from `config` on the meta device (no memory)."""
    from accelerate import init_empty_weights

    base = next(c for c in TRANSFORMERS + UNETS if isinstance(model, c))
    with init_empty_weights():
        return base.from_config(dict(config))


def _changed(config: Mapping, changes: dict) -> dict:
    """`changes` plus `_use_default_values` without the changed keys: diffusers' from_config drops the
    keys listed there (built with their defaults), which would undo the change."""
    defaults = config.get("_use_default_values")
    return changes if defaults is None else {**changes, "_use_default_values": [k for k in defaults
                                                                                if k not in changes]}


def _per_level(value, n: int) -> list:
    return [value] * n if isinstance(value, int) else list(value)


def _reduced_config(model: torch.nn.Module, c: int) -> dict:
    """`model.config` with c layers fewer per level (levels that would keep none keep theirs)."""
    config, n = dict(model.config), len(model.down_blocks)
    new = [x - c if x - c >= 1 else x for x in _per_level(config["layers_per_block"], n)]
    changes = {"layers_per_block": new[0] if isinstance(model, UNet2DModel) else tuple(new)}
    for key, keep in (("transformer_layers_per_block", new), ("reverse_transformer_layers_per_block",
                                                              [x + 1 for x in new[::-1]])):
        value = config.get(key)
        if isinstance(value, list | tuple):  # per layer: the first entries (only resnet shapes are compared)
            changes[key] = tuple(v[:k] if isinstance(v, list | tuple) else v for v, k in zip(value, keep, strict=True))
    return {**config, **_changed(config, changes)}


def _signature(module: torch.nn.Module) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in module.state_dict().items())


def _valid(block, ref_block, removed: set[int]) -> bool:
    """Whether the block's resnets kept after removing `removed` have the shapes `ref_block` builds."""
    kept = [_signature(r) for i, r in enumerate(block.resnets) if i not in removed]
    return kept == [_signature(r) for r in ref_block.resnets]


def _pairs_layout(block) -> bool:
    """A block whose layers are `resnets` (+ `attentions` of the same length): removable by index."""
    resnets, attentions = getattr(block, "resnets", None), getattr(block, "attentions", None)
    return resnets is not None and (attentions is None or len(attentions) == len(resnets))


def allowed_indices(model: torch.nn.Module, level: int, removed_down: set[int] = frozenset(),
                    removed_up: set[int] = frozenset(), refs: dict | None = None) -> tuple[list[int], list[int]]:
    """Down indices j and up indices k that may go next at `level` (down order), besides those removed.

    Decided on the base architecture (`model.config`, also for width-pruned models): the kept
    resnets must have the shapes that config with one layer fewer at that level builds.
    """
    refs = {} if refs is None else refs
    n, c = len(model.down_blocks), len(removed_down) + 1
    base = refs.setdefault(0, _meta_build(model, model.config))
    down, up = base.down_blocks[level], base.up_blocks[n - 1 - level]
    if not (_pairs_layout(down) and _pairs_layout(up)) or len(down.resnets) - c < 1:
        return [], []
    ref = refs.setdefault(c, _meta_build(model, _reduced_config(model, c)))
    rdown, rup = ref.down_blocks[level], ref.up_blocks[n - 1 - level]
    js = [j for j in range(len(down.resnets)) if j not in removed_down and _valid(down, rdown, {*removed_down, j})]
    ks = [k for k in range(len(up.resnets)) if k not in removed_up and _valid(up, rup, {*removed_up, k})]
    return js, ks


def _default_rank(block_len: int, down: bool) -> Callable[[int], tuple]:
    """BK-SDM's choice without scores: the second pair of a down block (the last ones first) and
    of an up block (the middle ones first, then the first and the last)."""
    if down:
        return lambda j: (j == 0, -j)
    return lambda k: (k in (0, block_len - 1), k)


def _pick(model, name: str, indices: list[int], scores: Mapping[str, float] | None, down: bool) -> int:
    block = model.get_submodule(name)
    if scores is None:
        return min(indices, key=_default_rank(len(block.resnets), down))
    return min(indices, key=lambda i: (scores.get(f"{name}.resnets.{i}", float("inf")), i))


def _pair(model, name: str, i: int) -> Part:
    block = model.get_submodule(name)
    extra = (f"{name}.attentions.{i}",) if getattr(block, "attentions", None) is not None else ()
    return _part(model, f"{name}.resnets.{i}", *extra)


def _level_units(model, scores: Mapping[str, float] | None) -> list[list[Part]]:
    """Per level: the parts of its 1st, 2nd, ... removal (a down part and an up part each)."""
    n, refs, out = len(model.down_blocks), {}, []
    for level in range(n):
        down, up = f"down_blocks.{level}", f"up_blocks.{n - 1 - level}"
        gone_d: set[int] = set()
        gone_u: set[int] = set()
        parts: list[list[Part]] = []
        while True:
            js, ks = allowed_indices(model, level, gone_d, gone_u, refs)
            alone = allowed_indices(model, level, refs=refs) if gone_d else (js, ks)
            js, ks = [j for j in js if j in alone[0]], [k for k in ks if k in alone[1]]
            if not js or not ks:
                break
            j, k = _pick(model, down, js, scores, True), _pick(model, up, ks, scores, False)
            gone_d.add(j)
            gone_u.add(k)
            parts.append([_pair(model, down, j), _pair(model, up, k)])
        out.append(parts)
    return out


def candidate_parts(model: torch.nn.Module, include_mid: bool = False) -> list[Part]:
    """Every part some unit may remove (what depth_scores scores before the UNet pairs are chosen)."""
    _check_class(model)
    if isinstance(model, TRANSFORMERS):
        return [p for u in depth_units(model) for p in u.parts]
    n, refs, out = len(model.down_blocks), {}, []
    for level in range(n):
        js, ks = allowed_indices(model, level, refs=refs)
        out += [_pair(model, f"down_blocks.{level}", j) for j in js]
        out += [_pair(model, f"up_blocks.{n - 1 - level}", k) for k in ks]
    if include_mid and model.mid_block is not None:
        out.append(_part(model, "mid_block"))
    return out


def depth_units(model: torch.nn.Module, include_mid: bool = False,
                part_scores: Mapping[str, float] | None = None) -> list[DepthUnit]:
    """The removable units of `model` (module docstring). UNets: at each level the pair (j, k) with
    the lowest `part_scores` (part name -> score, depth_scores.part_scores), else BK-SDM's (1, 1)."""
    _check_class(model)
    if isinstance(model, TRANSFORMERS):
        count = len(model.transformer_blocks) - isinstance(model, SD3Transformer2DModel)  # SD3: not the last
        return [DepthUnit(f"transformer_blocks.{i}", (_part(model, f"transformer_blocks.{i}"),)) for i in range(count)]
    levels = _level_units(model, part_scores)
    if isinstance(model, UNet2DModel):
        units = [DepthUnit(f"layers.{m}", tuple(p for lv in levels for p in lv[m]))
                 for m in range(min(len(lv) for lv in levels))]
    else:
        units = [DepthUnit(f"level{lv}.{m}", tuple(parts)) for lv, ms in enumerate(levels)
                 for m, parts in enumerate(ms)]
    if include_mid and model.mid_block is not None:
        units.append(DepthUnit("mid_block", (_part(model, "mid_block"),)))
    return units


# --------------------------------------------------------------------------- removal


def remap_indices(indices: Sequence[int], removed: Sequence[int]) -> tuple[int, ...]:
    """Block indices after the blocks `removed` are gone (those removed themselves are dropped)."""
    gone = set(removed)
    return tuple(i - sum(r < i for r in gone) for i in indices if i not in gone)


def _resolve(model: torch.nn.Module, units: Sequence[DepthUnit | str]) -> list[DepthUnit]:
    """Units given by name are looked up (default UNet pairs); every unit must belong to `model`."""
    known = {u.name: u for u in depth_units(model, include_mid=True)} if any(isinstance(u, str) for u in units) else {}
    out, seen = [], set()
    for unit in units:
        if isinstance(unit, str):
            if unit not in known:
                raise DiffpruneError(f"depth unit {unit!r} does not exist in {type(model).__name__}; "
                                     f"allowed: {sorted(known)}")
            unit = known[unit]
        modules = dict(model.named_modules())
        for part in unit.parts:
            if any(m not in modules for m in part.modules) or _params(model, part.modules) != part.params:
                raise DiffpruneError(f"depth unit {unit.name!r} is not a unit of this {type(model).__name__} "
                                     f"(part {part.name!r} missing or of another size)")
        if seen & set(unit.modules):
            raise DiffpruneError(f"depth unit {unit.name!r} overlaps another unit given "
                                 f"({sorted(seen & set(unit.modules))})")
        seen |= set(unit.modules)
        out.append(unit)
    return out


def _removed_positions(modules: Iterable[str]) -> dict[str, list[int]]:
    """ModuleList name -> indices removed from it ("mid_block" -> [0] for the mid block), from the
    removed modules' names."""
    out: dict[str, list[int]] = {}
    for name in modules:
        parent, _, index = name.rpartition(".")
        key, i = (parent, int(index)) if index.isdigit() else (name, 0)
        out.setdefault(key, []).append(i)
    return out


def renamed_after_removal(names: Iterable[str], removed_modules: Sequence[str]) -> dict[str, str]:
    """{name before: name after} for the parameter (or module) `names` of a model that `remove_units`
    takes `removed_modules` from (a unit's `modules`; ModuleLists renumber). Names inside a removed
    module are left out."""
    removed = _removed_positions(removed_modules)
    gone = set(removed_modules)
    out = {}
    for name in names:
        if any(name == m or name.startswith(m + ".") for m in gone):
            continue
        new = name
        for key, indices in removed.items():
            head, sep, tail = name.partition(key + ".")
            index, dot, rest = tail.partition(".")
            if head == "" and sep and index.isdigit():
                new = f"{key}.{remap_indices([int(index)], indices)[0]}{dot}{rest}"
        out[name] = new
    return out


def _transformer_changes(model, removed: dict[str, list[int]]) -> dict:
    gone = removed.get("transformer_blocks", [])
    if isinstance(model, SD3Transformer2DModel) and len(model.transformer_blocks) - 1 in gone:
        raise DiffpruneError("the last SD3 block (context_pre_only) cannot be removed by a config change")
    changes = {"num_layers": len(model.transformer_blocks) - len(gone)}
    for key in INDEX_KEYS:
        if key in model.config and model.config[key]:
            changes[key] = remap_indices(model.config[key], gone)
    return changes


def _unet_changes(model, removed: dict[str, list[int]]) -> dict:
    config, n = model.config, len(model.down_blocks)
    down = [sorted(removed.get(f"down_blocks.{lv}.resnets", [])) for lv in range(n)]
    up = [sorted(removed.get(f"up_blocks.{n - 1 - lv}.resnets", [])) for lv in range(n)]
    if [len(d) for d in down] != [len(u) for u in up]:
        raise DiffpruneError("a UNet level must lose as many down as up layers (one layers_per_block per level)")
    layers = _per_level(config["layers_per_block"], n)
    new = [x - len(d) for x, d in zip(layers, down, strict=True)]
    if isinstance(model, UNet2DModel) and len(set(new)) > 1:
        raise DiffpruneError("UNet2DModel has one layers_per_block for every level: remove a layer at every level")
    changes: dict = {}
    if new != layers:
        same = isinstance(config["layers_per_block"], int) and len(set(new)) == 1
        changes["layers_per_block"] = new[0] if same or isinstance(model, UNet2DModel) else tuple(new)
    for key, gone in (("transformer_layers_per_block", down), ("reverse_transformer_layers_per_block", up[::-1])):
        value = config.get(key)
        if isinstance(value, list | tuple) and any(isinstance(v, list | tuple) for v in value):
            changes[key] = tuple(tuple(x for i, x in enumerate(v) if i not in g) if isinstance(v, list | tuple)
                                 else v for v, g in zip(value, gone, strict=True))
    if "mid_block" in removed:
        changes["mid_block_type"] = None
    return changes


def _delete(model: torch.nn.Module, removed: dict[str, list[int]]) -> None:
    for name, indices in removed.items():
        if name == "mid_block":
            model.mid_block = None
            continue
        modules = model.get_submodule(name)
        for i in sorted(indices, reverse=True):
            del modules[i]  # ModuleList renumbers


def remove_units(model: torch.nn.Module, units: Sequence[DepthUnit | str]) -> torch.nn.Module:
    """A deep copy of `model` without `units` (DepthUnit or unit names), config updated and proven.

    ModuleLists are renumbered and `register_to_config` records the new num_layers /
    layers_per_block / mid_block_type / remapped index lists; `prove_config` checks the result.
    """
    _check_class(model)
    units = _resolve(model, units)
    result = copy.deepcopy(model)
    if not units:
        return result
    removed = _removed_positions(m for u in units for m in u.modules)
    changes = (_transformer_changes if isinstance(model, TRANSFORMERS) else _unet_changes)(model, removed)
    _delete(result, removed)
    result.register_to_config(**_changed(result.config, changes))
    prove_config(result, ", ".join(u.name for u in units))
    return result


def _meta_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in model.state_dict().items()}


def prove_config(model: torch.nn.Module, what: str = "model") -> None:
    """`model` is what its config builds: a meta-device build has exactly its state-dict keys and
    shapes. Width-pruned (`Pruned*`) models are rebuilt with their own loader (config + recorded
    structure, `build_pruned`) and must then run a forward pass on meta tensors."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        if isinstance(model, PrunedModelMixin):
            info = {**model.pruning_info, "structure": record_structure(model)}
            built = build_pruned(type(model), dict(model.config), info, _meta_state(model), where=what)
            with torch.no_grad():  # build_pruned keeps real buffers (e.g. DiT's pos_embed): to meta too
                built.to("meta")(**family_for(built).example_inputs(built, device="meta"))
        else:
            built = _meta_build(model, model.config)
    except (DiffpruneError, RuntimeError, ValueError, AssertionError) as err:
        raise DiffpruneError(f"removing {what} is not expressible in the config: {str(err).splitlines()[0]}") from None
    theirs = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    if theirs != shapes:
        diff = sorted(set(theirs.items()) ^ set(shapes.items()))[:3]
        raise DiffpruneError(f"removing {what} is not expressible in the config: the config builds other "
                             f"tensors ({diff})")
