"""The shape of a (pruned) module tree as plain JSON, and how to impose it on a freshly built model.

A pruned model = the base architecture built from its unchanged config + per-module widths recorded
here. Only whitelisted attribute names with int/float values are read back, so a hostile
`pruning.json` can change sizes, never behaviour beyond them, and never runs code.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import DiffpruneError

# Attributes that define a module's size, by class name (diffusers classes matched by name so that
# importing this module does not pull diffusers' attention code).
SHAPE_ATTRS: dict[str, tuple[str, ...]] = {
    "Conv2d": ("in_channels", "out_channels", "groups"),
    "Conv1d": ("in_channels", "out_channels", "groups"),
    "ConvTranspose2d": ("in_channels", "out_channels", "groups"),
    "Linear": ("in_features", "out_features"),
    "GroupNorm": ("num_groups", "num_channels"),
    "LayerNorm": ("normalized_shape",),
    "Attention": ("heads", "inner_dim", "inner_kv_dim", "scale", "query_dim", "out_dim"),
    "Upsample2D": ("channels", "out_channels"),
    "Downsample2D": ("channels", "out_channels"),
    "ResnetBlock2D": ("in_channels", "out_channels"),
    "Embedding": ("num_embeddings", "embedding_dim"),
    "Transformer2DModel": ("in_channels", "inner_dim", "out_channels"),
}


def _jsonable(value):
    if isinstance(value, torch.Size | tuple | list):
        return [int(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value
    return None


def record_structure(model: nn.Module) -> dict[str, dict]:
    """{module name: {"type": class name, attr: value, ...}} for every size-defining module."""
    out: dict[str, dict] = {}
    for name, module in model.named_modules():
        attrs = SHAPE_ATTRS.get(type(module).__name__)
        if not attrs:
            continue
        entry = {"type": type(module).__name__}
        for attr in attrs:
            if hasattr(module, attr) and _jsonable(getattr(module, attr)) is not None:
                entry[attr] = _jsonable(getattr(module, attr))
        out[name] = entry
    return out


def widths(structure: dict[str, dict]) -> dict[str, int]:
    """Output width per layer (conv/linear out, norm channels): what pruning changes, for reports."""
    keys = ("out_channels", "out_features", "num_channels")
    return {name: next(e[k] for k in keys if k in e) for name, e in structure.items()
            if e["type"] in ("Conv2d", "Linear", "GroupNorm", "ConvTranspose2d", "Conv1d")}


def _check_number(where: str, attr: str, value) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value and value >= 0
    if attr == "normalized_shape":
        ok = isinstance(value, list) and all(isinstance(v, int) and v > 0 for v in value)
    if not ok:
        raise DiffpruneError(f"{where}: attribute {attr}={value!r} is not a non-negative number")


def apply_structure(model: nn.Module, structure: dict[str, dict], shapes: dict[str, tuple[int, ...]],
                    where: str = "pruning.json") -> None:
    """Resize `model` in place to `structure`; parameter/buffer tensors take the shapes in `shapes`.

    `shapes` maps state-dict keys to the shapes stored in the weights file. Tensors are replaced by
    uninitialised ones of the right shape; the caller loads the real values strictly afterwards.
    """
    modules = dict(model.named_modules())
    for name, entry in structure.items():
        if not isinstance(entry, dict) or name not in modules:
            raise DiffpruneError(f"{where}: module {name!r} does not exist in the base architecture")
        module = modules[name]
        if entry.get("type") != type(module).__name__:
            raise DiffpruneError(f"{where}: module {name!r} is {type(module).__name__}, "
                                 f"file says {entry.get('type')!r}")
        allowed = SHAPE_ATTRS.get(type(module).__name__, ())
        for attr, value in entry.items():
            if attr == "type":
                continue
            if attr not in allowed:
                raise DiffpruneError(f"{where}: attribute {attr!r} of {name!r} is not one of {allowed}")
            _check_number(where, attr, value)
            setattr(module, attr, tuple(value) if attr == "normalized_shape" else value)
    for key, tensor in list(model.state_dict(keep_vars=True).items()):
        if key in shapes and tuple(tensor.shape) != tuple(shapes[key]):
            _replace_tensor(model, key, tuple(shapes[key]))
    validate_structure(model, where)


def _replace_tensor(model: nn.Module, key: str, shape: tuple[int, ...]) -> None:
    owner_name, _, leaf = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    old = getattr(owner, leaf)
    new = torch.empty(shape, dtype=old.dtype, device=old.device)
    if isinstance(old, nn.Parameter):
        setattr(owner, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        owner._buffers[leaf] = new


def validate_structure(model: nn.Module, where: str = "model") -> None:
    """Invariants every (pruned) model must satisfy: weight shapes match attributes, GroupNorm
    channels divisible by groups, attention inner dims divisible by heads."""
    for name, m in model.named_modules():
        kind = type(m).__name__
        if isinstance(m, nn.Conv2d | nn.Conv1d):
            expect = (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
            _expect_shape(where, name, m.weight, expect)
        elif isinstance(m, nn.Linear):
            _expect_shape(where, name, m.weight, (m.out_features, m.in_features))
        elif isinstance(m, nn.GroupNorm):
            if m.num_groups <= 0 or m.num_channels % m.num_groups:
                raise DiffpruneError(f"{where}: GroupNorm {name!r} has {m.num_channels} channels, "
                                     f"not divisible by num_groups={m.num_groups}")
            if m.affine:
                _expect_shape(where, name, m.weight, (m.num_channels,))
        elif isinstance(m, nn.Embedding):
            _expect_shape(where, name, m.weight, (m.num_embeddings, m.embedding_dim))
        elif kind == "Attention":
            inner = m.to_q.out_features
            if m.heads <= 0 or inner % m.heads:
                raise DiffpruneError(f"{where}: attention {name!r} inner dim {inner} is not divisible "
                                     f"by heads={m.heads}")


def _expect_shape(where: str, name: str, tensor: torch.Tensor, expect: tuple) -> None:
    if tuple(tensor.shape) != tuple(expect):
        raise DiffpruneError(f"{where}: {name!r} weight has shape {tuple(tensor.shape)} but its "
                             f"attributes say {tuple(expect)}")
