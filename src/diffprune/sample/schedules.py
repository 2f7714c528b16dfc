"""The reverse chain's arithmetic: timestep sequences from the scheduler config, and one update.

Two spacings:

- "uniform": the chain diffusers' `DDIMScheduler` / `DDPMScheduler` run for the pipeline's scheduler
  config (`set_timesteps` + `step`): `timestep_spacing` leading / trailing / linspace, `steps_offset`,
  `set_alpha_to_one` (DDIM's last alpha_bar), `clip_sample` + `clip_sample_range`, `thresholding`
  (`dynamic_thresholding_ratio`, `sample_max_value`), `prediction_type`, DDPM's `variance_type`.
  As in diffusers, a DDIM step goes from t to t - T // N whatever the spacing, and a DDPM step to the
  next timestep of the sequence (alpha_bar = 1 after the last one).
  Schedulers other than DDIM / DDPM (PNDM in Stable Diffusion folders, DPMSolver, Euler, ...) are
  read the same way, as `DDIMScheduler.from_config(their config)` would be, except that a config
  without `clip_sample` / `thresholding` keys is not clipped: those schedulers never clip x0.
- "quad": the DDIM reference code for CIFAR-10 (`generalized_steps`, skip_type "quad"),
  t_i = int((i * sqrt(0.8 T) / (N - 1))^2), each step going to the previous t_i and past t_0 to
  alpha_bar = 1. We floor (`int`) as the reference code does rather than round as PAPER.md writes
  it, since the reference code produced the paper's FIDs; for large N the first few values repeat 0
  (those steps are no-ops with eta = 0 but still cost a model call, exactly as in the reference).
  The reference never clips x0: pass clip_sample="off" to reproduce it (the default "auto" follows
  the scheduler config, which clips for google/ddpm-cifar10-32).

Updates: DDIM (Song et al. 2021, eq. 12, sigma_t(eta) from eq. 16) and DDPM ancestral (Ho et al. 2020,
eqs. 6-7: posterior mean with the "fixed_small" variance, or beta_t for "fixed_large") on the chosen
timestep subsequence; dynamic thresholding is Imagen's (Saharia et al. 2022, sec. 2.3).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..diffusion import PREDICTION_TYPES
from ..errors import DiffpruneError, check_range

SPACINGS = ("uniform", "quad")
CLIP_MODES = ("auto", "on", "off")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")

# --------------------------------------------------------------------------- scheduler config


def _key(config, name: str, default):
    """config[name], or `default` when the scheduler has no such key (or it is null)."""
    value = getattr(config, name, None)
    return default if value is None else value


@dataclasses.dataclass(frozen=True)
class ChainRule:
    """The scheduler-config keys that shape a reverse chain, meant as diffusers' DDIM/DDPM schedulers mean them."""

    prediction_type: str = "epsilon"
    x0_rule: str = "none"  # "none", "clip" (to +-clip_range) or "threshold" (dynamic thresholding)
    clip_range: float = 1.0
    threshold_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    variance_type: str = "fixed_small"


def chain_rule(config, clip_sample: str = "auto") -> ChainRule:
    """Read a scheduler config into a ChainRule; `clip_sample` decides what happens to predicted x0.

    clip_sample: "auto" = the config (`thresholding` if set, else `clip_sample`), "on" = clamp to
    +-clip_sample_range, "off" = x0 as predicted. A key the config lacks (schedulers other than
    DDIM / DDPM) takes DDIMScheduler's default, except clip_sample / thresholding, which are off.
    """
    if clip_sample not in CLIP_MODES:
        raise DiffpruneError(f"clip_sample={clip_sample!r} is not supported; allowed: {CLIP_MODES}")
    kind = _key(config, "prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise DiffpruneError(f"scheduler prediction_type={kind!r} is not supported; allowed: {PREDICTION_TYPES}")
    spacing = _key(config, "timestep_spacing", "leading")
    if spacing not in TIMESTEP_SPACINGS:
        raise DiffpruneError(f"scheduler timestep_spacing={spacing!r} is not supported; allowed: {TIMESTEP_SPACINGS}")
    if clip_sample == "auto":
        x0_rule = ("threshold" if _key(config, "thresholding", False)
                   else "clip" if _key(config, "clip_sample", False) else "none")
    else:
        x0_rule = "clip" if clip_sample == "on" else "none"
    return ChainRule(prediction_type=kind, x0_rule=x0_rule, clip_range=float(_key(config, "clip_sample_range", 1.0)),
                     threshold_ratio=float(_key(config, "dynamic_thresholding_ratio", 0.995)),
                     sample_max_value=float(_key(config, "sample_max_value", 1.0)), timestep_spacing=spacing,
                     steps_offset=int(_key(config, "steps_offset", 0)),
                     set_alpha_to_one=bool(_key(config, "set_alpha_to_one", True)),
                     variance_type=_key(config, "variance_type", "fixed_small"))


# --------------------------------------------------------------------------- timesteps


def timestep_sequence(num_train_timesteps: int, steps: int, spacing: str = "uniform", *,
                      timestep_spacing: str = "leading", steps_offset: int = 0) -> list[int]:
    """Increasing timesteps visited by an N-step sampler.

    "uniform" follows diffusers' `DDIMScheduler.set_timesteps` / `DDPMScheduler.set_timesteps` for
    the scheduler's `timestep_spacing` (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", Table 2): leading t_i = i * (T // N) + steps_offset; trailing
    round(T - i * T / N) - 1; linspace round(i * (T - 1) / (N - 1)), computed with the same numpy
    calls so ties round alike. For trailing, numpy's float `arange` gives N + 1 values for some N
    (e.g. 61 of 1000), the last being t = -1; diffusers then calls the model at t = -1 (alpha_bar of
    T - 1), we stop after the N real timesteps. "quad" is the DDIM reference code's rule.
    """
    T = int(num_train_timesteps)
    check_range("steps", steps, 1, T)
    if spacing == "quad":
        return [int(s) for s in np.linspace(0, np.sqrt(0.8 * T), steps) ** 2]
    if spacing != "uniform":
        raise DiffpruneError(f"spacing={spacing!r} is not supported; allowed: {SPACINGS}")
    if timestep_spacing == "leading":
        seq = np.arange(0, steps) * (T // steps) + int(steps_offset)
    elif timestep_spacing == "trailing":
        seq = (np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1)[:steps][::-1]
    elif timestep_spacing == "linspace":
        seq = np.linspace(0, T - 1, steps).round()
    else:
        raise DiffpruneError(f"timestep_spacing={timestep_spacing!r} is not supported; allowed: {TIMESTEP_SPACINGS}")
    seq = [int(t) for t in seq]
    if seq[-1] >= T:
        raise DiffpruneError(f"steps={steps} with the scheduler's steps_offset={steps_offset} reaches timestep "
                             f"{seq[-1]}; allowed: timesteps < num_train_timesteps={T} (use fewer steps)")
    return seq


def reverse_chain(num_train_timesteps: int, steps: int, sampler: str, spacing: str,
                  rule: ChainRule) -> list[tuple[int, int]]:
    """(t, t_prev) pairs in the order visited; t_prev < 0 stands for the alpha_bar past the chain's end.

    DDIM with "uniform" spacing steps from t to t - T // N, as `DDIMScheduler.step` does whatever the
    spacing (so a trailing / linspace chain's t_prev need not be the next timestep visited). DDPM
    (`DDPMScheduler.previous_timestep`) and "quad" (`generalized_steps`) step to the next timestep.
    """
    T = int(num_train_timesteps)
    seq = timestep_sequence(T, steps, spacing, timestep_spacing=rule.timestep_spacing,
                            steps_offset=rule.steps_offset)
    if sampler == "ddim" and spacing == "uniform":
        prev = [t - T // steps for t in seq]
    else:
        prev = [-1, *seq[:-1]]
    return list(zip(reversed(seq), reversed(prev), strict=True))


def final_alpha(alphas_cumprod: torch.Tensor, sampler: str, spacing: str, rule: ChainRule) -> torch.Tensor:
    """alpha_bar past the chain's end: DDIM "uniform" honours set_alpha_to_one (else alpha_bar_0, as
    DDIMScheduler's final_alpha_cumprod); DDPMScheduler and the DDIM reference code use 1."""
    if sampler == "ddim" and spacing == "uniform" and not rule.set_alpha_to_one:
        return alphas_cumprod[0]
    return torch.ones((), device=alphas_cumprod.device, dtype=alphas_cumprod.dtype)


# --------------------------------------------------------------------------- one update


def split_prediction(out: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor,
                      kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_pred, eps_pred) from the model output, for eps / v / sample parametrisations."""
    if kind == "epsilon":
        return (x - (1 - a_t).sqrt() * out) / a_t.sqrt(), out
    if kind == "sample":
        return out, (x - a_t.sqrt() * out) / (1 - a_t).sqrt()
    if kind == "v_prediction":
        return a_t.sqrt() * x - (1 - a_t).sqrt() * out, a_t.sqrt() * out + (1 - a_t).sqrt() * x
    raise DiffpruneError(f"scheduler prediction_type={kind!r} is not supported; allowed: {PREDICTION_TYPES}")


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3), per image, as diffusers' schedulers:
    s = the `ratio` quantile of |x0| clamped to [1, max_value]; x0 -> clamp(x0, -s, s) / s."""
    flat = x0.reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (flat.clamp(-s, s) / s).reshape(x0.shape)


def limit_x0(x0: torch.Tensor, rule: ChainRule) -> torch.Tensor:
    """Predicted x0 after the rule's clipping or thresholding (the epsilon used stays unclipped,
    as in diffusers' step with use_clipped_model_output=False and in the DDIM reference code)."""
    if rule.x0_rule == "threshold":
        return dynamic_threshold(x0, rule.threshold_ratio, rule.sample_max_value)
    if rule.x0_rule == "clip":
        return x0.clamp(-rule.clip_range, rule.clip_range)
    return x0


def ddim_update(x0: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor,
                eta: float, noise: torch.Tensor | None) -> torch.Tensor:
    """x_{t_prev} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z (DDIM eqs. 12, 16)."""
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
    return x + sigma * noise if noise is not None else x


def ddpm_update(x0: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor,
                noise: torch.Tensor | None, variance_type: str) -> torch.Tensor:
    """Posterior mean of q(x_prev | x_t, x0) plus noise (DDPM eqs. 6-7), on a respaced chain."""
    beta = 1 - a_t / a_prev
    mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)) * x
    if noise is None:
        return mean
    # fixed_small_log is fixed_small written as exp(0.5 log var) in diffusers: the same standard deviation.
    var = beta if variance_type == "fixed_large" else ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)
    return mean + var.sqrt() * noise
