"""Classifier-free guidance (Ho & Salimans 2022) computed as diffusers' pipelines compute it.

StableDiffusionPipeline / StableDiffusionXLPipeline (`__call__`): the denoiser runs once on the
batch [unconditional; conditional], `noise_pred = uncond + s * (cond - uncond)`, and when
`guidance_rescale > 0` the result goes through `rescale_noise_cfg` (Lin et al. 2024, "Common
Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4): rescaled to the conditional
prediction's per-image std, then mixed with the unrescaled guess by `guidance_rescale`. Guidance is
on only when s > 1 (diffusers' `do_classifier_free_guidance`); s <= 1 runs the conditional branch alone.

DiTPipeline: the batch is [conditional; null class] and the same formula applies to the latent
channels of the output; the learned-sigma half is never guided (`DiTFamily.predict` drops it).
"""

from __future__ import annotations

import math

import torch

from ..errors import DiffpruneError, check_range


def guidance_on(scale: float) -> bool:
    """diffusers' `do_classifier_free_guidance`: guidance_scale > 1."""
    return float(scale) > 1.0


# The largest guidance scale accepted: 10x the largest any diffusers pipeline or paper recipe uses (7.5 SD,
# 5 SDXL, 4.5 PixArt, 7 SD3, 4 DiT; sweeps go to ~20-30). The guided prediction is uncond + s * (cond -
# uncond): far beyond that it is s times a difference of two predictions, samples saturate (1e30 gave
# all-black PNGs) and half precision overflows, so a larger value is a typo, not a setting.
MAX_GUIDANCE_SCALE = 100.0


def check_guidance(scale: float, rescale: float, negative_prompt: str | None = None) -> None:
    """guidance_scale in [0, MAX_GUIDANCE_SCALE], guidance_rescale in [0, 1]; a negative prompt or a
    rescale only with guidance on (diffusers would silently ignore them)."""
    check_range("guidance_scale", scale, 0.0)
    if not math.isfinite(float(scale)):
        raise DiffpruneError(f"guidance_scale={scale!r} is not finite; allowed: [0, {MAX_GUIDANCE_SCALE:g}]")
    if float(scale) > MAX_GUIDANCE_SCALE:
        raise DiffpruneError(f"guidance_scale={scale!r} is out of range; allowed: [0, {MAX_GUIDANCE_SCALE:g}] "
                             "(diffusers' pipelines use 4-7.5; far larger scales saturate the samples)")
    check_range("guidance_rescale", rescale, 0.0, 1.0)
    if not guidance_on(scale) and (negative_prompt is not None or float(rescale) > 0):
        what = "negative_prompt" if negative_prompt is not None else f"guidance_rescale={rescale}"
        raise DiffpruneError(f"{what} has no effect with guidance_scale={scale}; guidance needs guidance_scale > 1")


def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Lin et al. 2024, sec. 3.4 (diffusers' `rescale_noise_cfg`): match the conditional prediction's
    std over all but the batch dimension, then mix `guidance_rescale` of that with the plain CFG."""
    dims = list(range(1, noise_cond.ndim))
    rescaled = noise_cfg * (noise_cond.std(dim=dims, keepdim=True) / noise_cfg.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def concat_cond(first: dict, second: dict) -> dict:
    """Two batch-first conditioning dicts with the same keys, stacked along the batch."""
    if set(first) != set(second):
        raise DiffpruneError(f"conditioning keys differ: {sorted(first)} vs {sorted(second)}")
    return {k: torch.cat([first[k], second[k]]) for k in first}


def uncond_first(family) -> bool:
    """Batch order of the pipeline: Stable Diffusion puts the unconditional half first, DiT second."""
    from .dit import DiTFamily

    return not isinstance(family, DiTFamily)


def guided_predict(family, model, x_t: torch.Tensor, t: torch.Tensor, cond: dict | None, uncond: dict | None,
                   scale: float = 1.0, rescale: float = 0.0) -> torch.Tensor:
    """The model's (guided) prediction for x_t at t: `family.predict` when guidance is off."""
    if not guidance_on(scale) or uncond is None:
        return family.predict(model, x_t, t, cond)
    first = uncond_first(family)
    pair = (uncond, cond) if first else (cond, uncond)
    out = family.predict(model, torch.cat([x_t, x_t]), torch.cat([t, t]), concat_cond(*pair))
    a, b = out.chunk(2)
    u, c = (a, b) if first else (b, a)
    guided = u + scale * (c - u)
    if rescale > 0.0:
        guided = rescale_noise_cfg(guided, c, rescale)
    return guided
