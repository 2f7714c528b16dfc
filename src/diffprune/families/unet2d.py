"""diffusers `UNet2DModel` (DDPM / DDIM pipelines, and the UNet of latent diffusion)."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from torch import nn

from .attention import attention_modules, fix_attention, observe_resampler_channels, qkv_head_map
from .base import Family


class UNet2DFamily(Family):
    name = "unet2d"
    component = "unet"
    model_classes = (UNet2DModel,)

    def example_inputs(self, model, batch_size=1, device="cpu"):
        size = self.sample_size(model)
        return {
            "sample": torch.randn(batch_size, self.in_channels(model), size, size, device=device),
            "timestep": torch.ones(batch_size, dtype=torch.long, device=device),
        }

    def predict(self, model, x_t, t, cond=None):
        return model(x_t, t).sample

    def ignored_layers(self, model):
        # The output conv maps to image channels; its width is fixed by the data (PAPER.md).
        return [model.conv_out]

    def num_heads(self, model):
        return qkv_head_map(model)

    def fix_after_pruning(self, model, before, prune_heads=False):
        fix_unet_blocks(model, before, prune_heads)
        device = next(model.parameters()).device
        observe_resampler_channels(model, self.example_inputs(model, device=device))


def fix_unet_blocks(model: nn.Module, before: dict, prune_heads: bool) -> None:
    """Attention heads/inner dims/scale, ResnetBlock2D and Transformer2DModel widths."""
    for name, attn in attention_modules(model):
        fix_attention(name, attn, before[name], prune_heads=prune_heads)
    for m in model.modules():
        kind = type(m).__name__
        if kind == "ResnetBlock2D":
            m.in_channels, m.out_channels = m.conv1.in_channels, m.conv2.out_channels
        elif kind == "Transformer2DModel" and getattr(m, "proj_in", None) is not None:
            proj_in, proj_out = m.proj_in, m.proj_out
            linear = isinstance(proj_in, nn.Linear)
            m.in_channels = proj_in.in_features if linear else proj_in.in_channels
            m.inner_dim = proj_in.out_features if linear else proj_in.out_channels
            m.out_channels = proj_out.out_features if linear else proj_out.out_channels


def reset_parameters(model: nn.Module) -> None:
    """Fresh default initialisation of every layer (the paper's 'scratch'/'reinit' baseline)."""
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()
