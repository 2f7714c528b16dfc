"""families/attention.py: pruned attention keeps heads consistent and the unpruned softmax scale."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from diffprune.families.attention import fix_attention
from diffprune.io.structure import record_structure


def _slice_rows(linear, rows):
    linear.weight = torch.nn.Parameter(linear.weight[rows].clone())
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias[rows].clone())
    linear.out_features = len(rows)


@pytest.mark.parametrize("processor", [AttnProcessor, AttnProcessor2_0])
def test_head_dim_pruning_keeps_the_unpruned_scores(processor):
    """Zero 3 of 8 dims per head in q/k/v, then remove them: outputs must not change, which holds
    only if the pruned module still scores q.k with 1/sqrt(8), not 1/sqrt(5)."""
    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=8, dim_head=8, bias=True, norm_num_groups=8, residual_connection=True)
    attn.set_processor(processor())
    keep = [h * 8 + d for h in range(8) for d in range(5)]
    drop = [h * 8 + d for h in range(8) for d in range(5, 8)]
    with torch.no_grad():
        for proj in (attn.to_q, attn.to_k, attn.to_v):
            proj.weight[drop] = 0
            proj.bias[drop] = 0
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        expected = attn(x)
    before = record_structure(attn)[""]
    with torch.no_grad():
        for proj in (attn.to_q, attn.to_k, attn.to_v):
            _slice_rows(proj, keep)
        out = attn.to_out[0]
        out.weight = torch.nn.Parameter(out.weight[:, keep].clone())
        out.in_features = len(keep)
    fix_attention("attn", attn, before, prune_heads=False)
    assert attn.heads == 8 and attn.inner_dim == 40 and attn.scale == pytest.approx(5**-0.5)
    for proc in (AttnProcessor(), AttnProcessor2_0()):  # every processor agrees after the fix
        attn.set_processor(proc)
        with torch.no_grad():
            torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)
