"""The forward process and the training target, shared by importance estimation, training and sampling.

Two kinds of scheduler, told apart by `is_flow(scheduler)`:

- DDPM-style (DDPM/DDIM/PNDM/... configs with `alphas_cumprod`): L_t = || target -
  model(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2 (PAPER.md, "The idea"); the target is eps, v
  or x0 according to the scheduler's `prediction_type`; "timestep t" is the integer t in [0, T), and
  the model is called at t.
- Flow matching (`FlowMatchEulerDiscreteScheduler`, Stable Diffusion 3; Esser et al. 2024, "Scaling
  Rectified Flow Transformers", sec. 2-3): x_t = (1 - sigma) x0 + sigma eps, target v = eps - x0,
  model timestep sigma * num_train_timesteps (diffusers' StableDiffusion3Pipeline and
  train_dreambooth_sd3.py). "Timestep t" is an index into the scheduler's own training sigmas (its
  `sigmas` at construction: N values with its `shift` applied) sorted from the least noisy upward:
  t = 0 is the smallest sigma, t = N - 1 is sigma = 1. The Diff-Pruning sweep, its threshold rule,
  the kept timesteps and training's t ~ U{0, ..., N - 1} all use this index.
"""

from __future__ import annotations

import json

import torch

from .errors import DiffpruneError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_FLOW_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def is_flow(scheduler) -> bool:
    """A flow-matching scheduler (diffusers' FlowMatch* classes, read as FlowMatchEulerDiscreteScheduler)."""
    return type(scheduler).__name__.startswith("FlowMatch")


def flow_schedule(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, model timesteps), float32, sorted from the least noisy: the training schedule a fresh
    `FlowMatchEulerDiscreteScheduler` of this config builds (the live scheduler's `sigmas` change
    with `set_timesteps`, as train_dreambooth_sd3.py notes by copying the scheduler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    key = json.dumps({k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
                     sort_keys=True, default=str)
    if key not in _FLOW_CACHE:
        fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        if fresh.config.invert_sigmas:
            raise DiffpruneError("FlowMatchEulerDiscreteScheduler with invert_sigmas=True is not supported; "
                                 "allowed: invert_sigmas false (Stable Diffusion 3)")
        _FLOW_CACHE[key] = (fresh.sigmas.flip(0).float().contiguous(), fresh.timesteps.flip(0).float().contiguous())
    return _FLOW_CACHE[key]


def _flow_sigma(scheduler, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    sigmas = flow_schedule(scheduler)[0].to(like.device)[timesteps.long().to(like.device)]
    return sigmas.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def noisy_and_target(scheduler, x0: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t from the scheduler's own noise schedule, and what the model should predict at x_t.

    `timesteps`: integer t (DDPM) or indices into the ascending flow sigmas (see module docstring)."""
    if is_flow(scheduler):
        sigma = _flow_sigma(scheduler, timesteps, x0)
        return (1 - sigma) * x0 + sigma * noise, noise - x0
    x_t = scheduler.add_noise(x0, noise, timesteps)
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind == "epsilon":
        return x_t, noise
    if kind == "v_prediction":
        return x_t, scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x_t, x0
    raise DiffpruneError(f"scheduler prediction_type={kind!r} is not supported; allowed: {PREDICTION_TYPES}")


def model_timesteps(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """What the denoiser is called with at `timesteps`: t itself (DDPM), sigma_t * N (flow, float)."""
    if is_flow(scheduler):
        return flow_schedule(scheduler)[1].to(timesteps.device)[timesteps.long()]
    return timesteps


def sigma_at(scheduler, t: int | None) -> float | None:
    """The flow sigma of sweep index t (None for DDPM schedulers or t None)."""
    if t is None or not is_flow(scheduler):
        return None
    return float(flow_schedule(scheduler)[0][int(t)])


def num_train_timesteps(scheduler) -> int:
    """How many timesteps the sweep and training draw from (flow: the training sigmas)."""
    if is_flow(scheduler):
        return int(flow_schedule(scheduler)[0].numel())
    return int(scheduler.config.num_train_timesteps)
