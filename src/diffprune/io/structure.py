"""The shape of a (pruned) module tree as plain JSON, and how to impose it on a freshly built model.

A pruned model = the base architecture built from its unchanged config + per-module widths recorded
here. Only whitelisted attribute names are read back, sizes as integers >= 1 and `scale` as a finite
number; attributes that are not widths (attention heads and scale, GroupNorm and conv groups) must
agree with the tensors and the documented pruning rules, so a hostile `pruning.json` can change
sizes, never behaviour beyond them, and never runs code.
"""

from __future__ import annotations

import hashlib
import math
import reprlib

import torch
from torch import nn

from ..errors import DiffpruneError
from ..families.attention import check_attention, check_head_rule

MAX_INT = 2**31 - 1  # the largest size a recorded attribute may hold

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


def _check_value(where: str, name: str, attr: str, value) -> None:
    """Type and range of one recorded attribute: sizes are integers >= 1, `scale` a finite number > 0."""
    if attr == "normalized_shape":
        ok, allowed = isinstance(value, list) and len(value) > 0 and all(_is_size(v) for v in value), \
            f"a list of integers in [1, {MAX_INT}]"
    elif attr == "scale":
        ok, allowed = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
            and value > 0, "a finite number > 0"
    else:
        ok, allowed = _is_size(value), f"an integer in [1, {MAX_INT}]"
    if not ok:
        raise DiffpruneError(f"{where}: {name!r} {attr}={reprlib.repr(value)} is not allowed; allowed: {allowed}")


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_INT


def apply_structure(model: nn.Module, structure: dict[str, dict], shapes: dict[str, tuple[int, ...]],
                    where: str = "pruning.json", prune_heads: bool | None = None) -> None:
    """Resize `model` in place to `structure`; parameter/buffer tensors take the shapes in `shapes`.

    `shapes` maps state-dict keys to the shapes stored in the weights file. Tensors are replaced by
    uninitialised ones of the right shape (on the model's device: meta stays meta); the caller loads
    the real values strictly afterwards. Widths may change; attributes that decide behaviour are
    checked against the tensors (`validate_structure`) and against the base model (`_check_pinned`;
    `prune_heads`: the head rule the pruning run recorded, if known).
    """
    modules = dict(model.named_modules())
    base: dict[str, dict] = {}
    for name, entry in structure.items():
        if not isinstance(entry, dict) or name not in modules:
            raise DiffpruneError(f"{where}: module {reprlib.repr(name)} does not exist in the base architecture")
        module = modules[name]
        if entry.get("type") != type(module).__name__:
            raise DiffpruneError(f"{where}: module {name!r} is {type(module).__name__}, "
                                 f"file says {reprlib.repr(entry.get('type'))}")
        allowed = SHAPE_ATTRS.get(type(module).__name__, ())
        base[name] = _pinned(module)
        for attr, value in entry.items():
            if attr == "type":
                continue
            if attr not in allowed:
                raise DiffpruneError(f"{where}: attribute {reprlib.repr(attr)} of {name!r} is not one of {allowed}")
            _check_value(where, name, attr, value)
            setattr(module, attr, tuple(value) if attr == "normalized_shape" else value)
    for key, tensor in list(model.state_dict(keep_vars=True).items()):
        if key in shapes and tuple(tensor.shape) != tuple(shapes[key]):
            _replace_tensor(model, key, tuple(shapes[key]))
    validate_structure(model, where)
    _check_pinned(modules, base, where, prune_heads)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)


def _pinned(module: nn.Module) -> dict:
    """The base model's values of the attributes pruning may not set freely."""
    if type(module).__name__ == "Attention":
        return {"heads": module.heads, "head_dim": module.to_q.out_features // module.heads}
    if isinstance(module, nn.GroupNorm):
        return {"num_groups": module.num_groups}
    if isinstance(module, _CONVS):
        return {"groups": module.groups, "depthwise": module.groups > 1 and module.groups == module.in_channels}
    return {}


def _check_pinned(modules: dict[str, nn.Module], base: dict[str, dict], where: str,
                  prune_heads: bool | None = None) -> None:
    """Channel pruning keeps GroupNorm groups and conv groups (depthwise convs stay depthwise);
    attention keeps its head count or its head size, one rule for the model (`check_head_rule`)."""
    attentions = []
    for name, was in base.items():
        m = modules[name]
        if isinstance(m, nn.GroupNorm) and m.num_groups != was["num_groups"]:
            raise DiffpruneError(f"{where}: GroupNorm {name!r} num_groups={m.num_groups!r} is not allowed; "
                                 f"allowed: {was['num_groups']} (pruning keeps the base model's groups)")
        elif isinstance(m, _CONVS):
            expect = m.in_channels if was["depthwise"] else was["groups"]
            if m.groups != expect:
                raise DiffpruneError(f"{where}: {name!r} groups={m.groups!r} is not allowed; allowed: {expect} "
                                     "(pruning keeps the base model's conv groups)")
        elif type(m).__name__ == "Attention":
            attentions.append((name, m, was["heads"], was["head_dim"]))
    check_head_rule(where, attentions, prune_heads)


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
    channels divisible by groups, attention heads/inner dim/scale agree with to_q (`check_attention`)."""
    for name, m in model.named_modules():
        kind = type(m).__name__
        if isinstance(m, _CONVS):
            if m.groups < 1 or m.in_channels % m.groups or m.out_channels % m.groups:
                raise DiffpruneError(f"{where}: {name!r} has {m.in_channels} in / {m.out_channels} out "
                                     f"channels, not divisible by groups={m.groups}")
            if isinstance(m, nn.ConvTranspose2d):
                expect = (m.in_channels, m.out_channels // m.groups, *m.kernel_size)
            else:
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
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            _expect_shape(where, name, m.weight, tuple(m.normalized_shape))
        elif isinstance(m, nn.Embedding):
            _expect_shape(where, name, m.weight, (m.num_embeddings, m.embedding_dim))
        elif kind == "Attention":
            check_attention(where, name, m)
        elif kind in ("Upsample2D", "Downsample2D"):
            _check_resampler(where, name, m)


def _check_resampler(where: str, name: str, m: nn.Module) -> None:
    """Up/Downsample2D assert `channels` on every call: it must be what their conv takes."""
    conv = getattr(m, "conv", None)
    if not isinstance(conv, nn.Conv2d | nn.ConvTranspose2d):
        return
    for attr, expect in (("channels", conv.in_channels), ("out_channels", conv.out_channels)):
        if getattr(m, attr) != expect:
            raise DiffpruneError(f"{where}: {name!r} {attr}={getattr(m, attr)!r} is not allowed; allowed: "
                                 f"{expect} (its conv's {'in' if attr == 'channels' else 'out'}put width)")


def _expect_shape(where: str, name: str, tensor: torch.Tensor, expect: tuple) -> None:
    if tuple(tensor.shape) != tuple(expect):
        raise DiffpruneError(f"{where}: {name!r} weight has shape {tuple(tensor.shape)} but its "
                             f"attributes say {tuple(expect)}")


def model_fingerprint(unet) -> str:
    """sha256 over parameter names, shapes and bytes: identifies the weights a folder came from."""
    h = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def restore_saved_buffers(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Buffers the architecture builds as non-persistent but the weights file holds load from the file.

    A residual-pruned DiT stores its sliced sin-cos position buffer (`pos_embed.pos_embed`, see
    families/dit.py): diffusers rebuilds that buffer from the base width at construction, and a fresh
    sin-cos of the pruned width would be a different function. Only buffers the base model already
    has are restored, differing from the base's shape in the last (channel) dimension alone, never
    larger (pruning only slices), and as wide as the owner's `proj` output when it has one (the
    PatchEmbed adds the buffer to it); anything else in the file is refused by the strict load.
    Called by `pipeline.build_pruned` (H6, issue 16: the DiT residual width).
    """
    for key, saved in state.items():
        owner_name, _, leaf = key.rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
        except AttributeError:
            continue
        base = owner._buffers.get(leaf)
        if base is None or leaf not in owner._non_persistent_buffers_set:
            continue
        proj = state.get(f"{owner_name}.proj.weight" if owner_name else "proj.weight")
        width = int(proj.shape[0]) if proj is not None and proj.dim() > 0 else None
        ok = saved.dim() == base.dim() and (saved.dim() == 0 or (
            saved.shape[:-1] == base.shape[:-1] and 0 < saved.shape[-1] <= base.shape[-1]
            and width in (None, saved.shape[-1])))
        if not ok:
            allowed = f"{tuple(base.shape[:-1]) + (width,)}" if width is not None else \
                f"{tuple(base.shape)} with a last dimension of at most {base.shape[-1]}"
            raise DiffpruneError(f"{where}: buffer {key!r} has shape {tuple(saved.shape)}; allowed: {allowed}")
        owner.register_buffer(leaf, base, persistent=True)
