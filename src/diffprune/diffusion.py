"""The DDPM forward process and the training target, shared by importance estimation and training.

L_t = || target - model(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2 (PAPER.md, "The idea");
the target is eps, v or x0 according to the scheduler's `prediction_type`.
"""

from __future__ import annotations

import torch

from .errors import DiffpruneError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def noisy_and_target(scheduler, x0: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t from the scheduler's own noise schedule, and what the model should predict at x_t."""
    x_t = scheduler.add_noise(x0, noise, timesteps)
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind == "epsilon":
        return x_t, noise
    if kind == "v_prediction":
        return x_t, scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x_t, x0
    raise DiffpruneError(f"scheduler prediction_type={kind!r} is not supported; allowed: {PREDICTION_TYPES}")


def num_train_timesteps(scheduler) -> int:
    return int(scheduler.config.num_train_timesteps)
