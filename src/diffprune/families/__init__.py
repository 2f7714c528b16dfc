"""Model families: what is specific to one kind of denoiser (inputs, protected layers, fix-ups).

`family_for(model)` picks the adapter; each adapter is one small module:
unet2d.py (DDPM/DDIM and latent-diffusion UNet2DModel), unet2d_condition.py (Stable Diffusion
UNets), dit.py (DiT), pixart.py (PixArt-alpha/sigma),
sd3.py (Stable Diffusion 3 / 3.5). Latent pipelines add their autoencoder through latent.py.
"""

from __future__ import annotations

import torch

from ..errors import DiffpruneError
from .base import Family
from .dit import DiTFamily
from .pixart import PixArtFamily
from .sd3 import SD3Family
from .unet2d import UNet2DFamily
from .unet2d_condition import UNet2DConditionFamily

FAMILIES: tuple[Family, ...] = (UNet2DFamily(), UNet2DConditionFamily(), DiTFamily(), PixArtFamily(), SD3Family())


def supported_names() -> str:
    return ", ".join(c.__name__ for fam in FAMILIES for c in fam.model_classes)


def family_for(model: torch.nn.Module) -> Family:
    """The adapter for `model`, or a DiffpruneError naming its class and the supported ones."""
    for fam in FAMILIES:
        if isinstance(model, fam.model_classes):
            fam.check(model)
            return fam
    raise DiffpruneError(f"model family {type(model).__name__!r} is not supported yet; "
                         f"supported: {supported_names()}")


__all__ = ["FAMILIES", "Family", "family_for", "supported_names"]
