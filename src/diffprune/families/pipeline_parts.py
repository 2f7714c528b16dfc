"""Small helpers every stage shares, with no imports of the stage modules (no import cycles).

`image_seed`: the per-image seed of sampling (and of DiT's random labels); `denoiser_of`: which
pipeline component holds the prunable denoiser.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DiffpruneError


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image `index`, a fixed function of (seed, index)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def denoiser_of(pipe) -> tuple[str, torch.nn.Module]:
    """(component name, module) of the pipeline's prunable denoiser, or a clear error.

    Latent pipelines (a `vqvae` or `vae` beside the denoiser) are supported: only the denoiser is
    pruned, in latent space (families/latent.py).
    """
    from . import family_for, supported_names

    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            family_for(module)  # raises for unsupported families, naming them
            return name, module
    raise DiffpruneError(f"{type(pipe).__name__} has no 'unet' or 'transformer' component to prune; "
                         f"supported denoisers: {supported_names()}")
