"""Sampling a flow-matching model (Stable Diffusion 3): the Euler ODE chain of
`FlowMatchEulerDiscreteScheduler`, as `StableDiffusion3Pipeline.__call__` runs it.

The sigmas and model timesteps of an N-step chain come from a fresh FlowMatchEulerDiscreteScheduler
built from the pipeline's scheduler config (`set_timesteps(N)`, with `mu` from the image's token
count when the config uses dynamic shifting, as the pipeline's `calculate_shift`), so every option of
that scheduler (shift, shift_terminal, Karras / exponential / beta sigmas) means what it means there.
Each step, in float32 as `FlowMatchEulerDiscreteScheduler.step`: x <- x + (sigma_{i+1} - sigma_i) v,
with v the (guided) model output at timestep t_i; the last sigma is 0. Classifier-free guidance as the pipeline:
v = v_uncond + s (v_cond - v_uncond) on the batch [uncond; cond] (families/guidance.py).

The chain is deterministic (the flow ODE), so of the DDIM/DDPM options only the DDIM sampler with
eta = 0, the scheduler's own ("uniform") spacing and no x0 clipping apply; others are refused.
"""

from __future__ import annotations

import torch

from ..errors import DiffpruneError
from ..families.guidance import guided_predict


def check_flow_args(scheduler, sampler: str, eta: float, spacing: str, clip_sample: str) -> None:
    """One-line refusals of the DDPM-only options for a flow-matching scheduler."""
    name = type(scheduler).__name__
    if sampler != "ddim" or float(eta) != 0.0:
        raise DiffpruneError(f"{name} samples the deterministic flow ODE (Euler); sampler={sampler!r} eta={eta} "
                             "is not supported; allowed: sampler 'ddim' with eta 0")
    if spacing != "uniform":
        raise DiffpruneError(f"spacing={spacing!r} is not supported for {name}; allowed: 'uniform' (its own sigmas)")
    if clip_sample == "on":
        raise DiffpruneError(f"clip_sample='on' is not supported for {name}; allowed: 'auto' or 'off' (no x0 clip)")
    if getattr(scheduler.config, "stochastic_sampling", False):
        raise DiffpruneError(f"{name} with stochastic_sampling=True is not supported; allowed: false (SD3)")


def shift_mu(config, latent_hw: tuple[int, int], patch_size: int) -> float:
    """StableDiffusion3Pipeline's `calculate_shift` for dynamic shifting (its defaults for missing keys)."""
    seq = (latent_hw[0] // patch_size) * (latent_hw[1] // patch_size)
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.16)
    slope = (top - base) / (max_len - base_len)
    return seq * slope + base - slope * base_len


def flow_chain(scheduler, steps: int, latent_hw: tuple[int, int], patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps) of an N-step chain: N + 1 sigmas ending at 0, N model timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)  # other FlowMatch* configs: read as Euler
    kwargs = {}
    if fresh.config.get("use_dynamic_shifting", False):
        kwargs["mu"] = shift_mu(fresh.config, latent_hw, patch_size)
    fresh.set_timesteps(int(steps), device="cpu", **kwargs)
    return fresh.sigmas.float(), fresh.timesteps.float()


@torch.no_grad()
def flow_denoise(model, scheduler, noise: torch.Tensor, *, steps: int, family, cond: dict | None = None,
                 uncond: dict | None = None, guidance_scale: float = 1.0,
                 guidance_rescale: float = 0.0) -> torch.Tensor:
    """Run the Euler chain from `noise` (B, C, H, W) at sigma = sigma_max; returns the final latents."""
    patch = int(getattr(model.config, "patch_size", 1) or 1)
    sigmas, timesteps = flow_chain(scheduler, steps, tuple(noise.shape[-2:]), patch)
    x = noise
    for i, t in enumerate(timesteps.tolist()):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        v = guided_predict(family, model, x, tt, cond, uncond, guidance_scale, guidance_rescale)
        dt = (sigmas[i + 1] - sigmas[i]).to(x.device)
        x = (x.float() + dt * v.float()).to(v.dtype)
    return x.to(noise.dtype)
