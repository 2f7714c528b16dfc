"""Keeping diffusers' `Attention` consistent after its projections were pruned.

torch-pruning shrinks q/k/v/out tensors but not the attributes the attention processors read:
`heads`, `inner_dim`, `scale`. A stale `heads` reshapes into wrong head sizes without an error.

Softmax scale: the unpruned model scores q.k with 1/sqrt(d_old). The torch-2 processor
(`AttnProcessor2_0`) always uses 1/sqrt(d) of the *current* head dim, the classic processor uses
`attn.scale`. We fold sqrt(d_new/d_old) into `to_q` and set `attn.scale = 1/sqrt(d_new)`, so every
processor computes the unpruned model's scores on the kept channels (DESIGN.md, "Decisions").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import DiffpruneError


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == "Attention"]


def qkv_head_map(model: nn.Module, names: tuple[str, ...] = ("to_q", "to_k", "to_v")) -> dict[nn.Module, int]:
    """q/k/v projections (`names`; SD3's joint attention adds its context projections) -> head count,
    for torch-pruning's `num_heads`."""
    out: dict[nn.Module, int] = {}
    for _, attn in attention_modules(model):
        for name in names:
            proj = getattr(attn, name, None)
            if isinstance(proj, nn.Linear):
                out[proj] = int(attn.heads)
    return out


@torch.no_grad()
def fix_attention(name: str, attn: nn.Module, before: dict, prune_heads: bool) -> None:
    """Update heads / inner dims / scale of one pruned Attention from its tensors."""
    old_inner, old_heads = int(before["inner_dim"]), int(before["heads"])
    old_head_dim = old_inner // old_heads
    inner = attn.to_q.out_features
    if inner == old_inner:
        return
    if prune_heads:
        attn.heads = inner // old_head_dim
        head_dim = old_head_dim
    else:
        attn.heads = old_heads
        head_dim = inner // old_heads
    if attn.heads * head_dim != inner or attn.heads == 0:
        raise RuntimeError(f"attention {name!r}: pruned inner dim {inner} does not split into "
                           f"heads of equal size (heads={attn.heads})")
    attn.inner_dim = inner
    attn.inner_kv_dim = attn.to_k.out_features
    if head_dim != old_head_dim and attn.scale_qk:
        if getattr(attn, "norm_q", None) is not None:
            raise DiffpruneError(f"attention {name!r} normalises q/k, so head dims cannot be pruned "
                                 "without changing its softmax scale; prune whole heads instead")
        factor = math.sqrt(head_dim / old_head_dim)  # = scale_old / scale_new
        fold_scale(attn.to_q, factor)
        attn.scale = head_dim**-0.5


def fix_attention_io(attn: nn.Module) -> None:
    """`query_dim`/`out_dim` (recorded sizes, not read by the forward) follow the residual width
    the projections now have, once it was pruned."""
    attn.query_dim = attn.to_q.in_features
    if isinstance(attn.to_out[0], nn.Linear):
        attn.out_dim = attn.to_out[0].out_features


def softmax_scale(attn: nn.Module) -> float:
    """The q.k scale a (pruned) diffusers `Attention` must hold: 1/sqrt(head_dim) of its current
    heads when `scale_qk` (diffusers' own rule; head-dim pruning keeps it by folding
    sqrt(d_new/d_old) into `to_q`, see `fix_attention`), else 1."""
    if not getattr(attn, "scale_qk", True):
        return 1.0
    return (attn.to_q.out_features // attn.heads) ** -0.5


def check_attention(where: str, name: str, attn: nn.Module) -> None:
    """`heads` splits `to_q`'s width evenly, `inner_dim` is that width, `scale` is `softmax_scale`."""
    inner, heads = attn.to_q.out_features, attn.heads
    if heads <= 0 or inner % heads:
        raise DiffpruneError(f"{where}: attention {name!r} inner dim {inner} is not divisible by heads={heads}")
    if attn.inner_dim != inner:
        raise DiffpruneError(f"{where}: attention {name!r} inner_dim={attn.inner_dim!r} is not allowed; "
                             f"allowed: {inner} (the width of its to_q)")
    expect = softmax_scale(attn)
    if not math.isclose(attn.scale, expect, rel_tol=1e-6):
        rule = f"1/sqrt(head_dim {inner // heads}) for heads={heads} of a {inner}-wide to_q" \
            if getattr(attn, "scale_qk", True) else "1 (scale_qk is off)"
        raise DiffpruneError(f"{where}: attention {name!r} scale={attn.scale!r} is not allowed; allowed: "
                             f"{expect!r} = {rule} (pruning keeps the unpruned scores, see README 'The pruned folder')")


def check_head_rule(where: str, attentions: list[tuple[str, nn.Module, int, int]],
                    prune_heads: bool | None = None) -> None:
    """Pruning keeps, for the whole model, either every attention's base head count (head dims
    pruned) or every attention's base head size (whole heads pruned; `prune_heads`). Any other
    split of the same width, or a mix of both, would change what the attention computes.

    `attentions`: (name, pruned attention, base heads, base head size) for each attention;
    `prune_heads`: the rule the pruning run recorded, if known.
    """
    by_rule: dict[str, str] = {}  # rule -> first attention that only that rule explains
    for name, attn, base_heads, base_size in attentions:
        inner, heads = attn.to_q.out_features, attn.heads
        keeps_count, keeps_size = heads == base_heads, heads * base_size == inner
        if not (keeps_count or keeps_size):
            allowed = [base_heads] + ([inner // base_size] if inner % base_size == 0 else [])
            raise DiffpruneError(f"{where}: attention {name!r} heads={heads!r} is not allowed; allowed: "
                                 f"{' or '.join(str(h) for h in dict.fromkeys(allowed))} (the base model's "
                                 f"{base_heads} heads, or heads of its size {base_size})")
        if keeps_count != keeps_size:
            by_rule.setdefault("count" if keeps_count else "size", f"{name!r} heads={heads}")
    if prune_heads is not None and ("count" if prune_heads else "size") in by_rule:
        wrong = by_rule["count" if prune_heads else "size"]
        raise DiffpruneError(f"{where}: attention {wrong} does not match the recorded method.prune_heads="
                             f"{prune_heads}; allowed: heads that keep the base head "
                             f"{'size' if prune_heads else 'count'} in every attention")
    if "count" in by_rule and "size" in by_rule:
        raise DiffpruneError(f"{where}: attention {by_rule['size']} keeps the base head size but "
                             f"{by_rule['count']} keeps the base head count; allowed: one rule for every "
                             "attention (whole heads pruned, or head dims pruned)")


def observe_resampler_channels(model: nn.Module, example_inputs: dict) -> None:
    """Set Upsample2D/Downsample2D `.channels`/`.out_channels` from what they really receive.

    Their forward asserts `x.shape[1] == self.channels`; pre-hooks set the value from one real
    forward pass, which also covers the variants without a conv (pooling, plain interpolation).
    """
    handles = []

    def fix(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        module.channels = int(x.shape[1])
        conv = getattr(module, "conv", None)
        module.out_channels = int(conv.out_channels) if isinstance(conv, nn.Conv2d | nn.ConvTranspose2d) \
            else module.channels

    for m in model.modules():
        if type(m).__name__ in ("Upsample2D", "Downsample2D"):
            handles.append(m.register_forward_pre_hook(fix, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**example_inputs)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def fold_scale(layer: nn.Linear, factor: float) -> None:
    """`layer`'s output times `factor`. A gradient the layer carries (prune_model_at_ratio's keep_grads)
    becomes the gradient of the same loss in the new weights, divided by `factor` (chain rule), so
    |w g| of every weight is unchanged."""
    for p in (layer.weight, layer.bias):
        if p is not None:
            p.mul_(factor)
            if p.grad is not None:
                p.grad = p.grad / factor
