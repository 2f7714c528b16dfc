"""The default sampler: the folder's own scheduler, run as the diffusers pipelines run it.

`StableDiffusionPipeline.__call__` (and the SDXL, PixArt, SD3, DiT, DDPM/DDIM pipelines) do, for a
scheduler of any class: `set_timesteps(N)` (SD3: with `mu` from the image's token count when the
config shifts dynamically), latents = noise * `init_noise_sigma`, then per timestep
`scale_model_input`, the (guided) model call, and `step(out, t, x, eta=?, generator=?)`, where `eta`
and `generator` are passed only to a `step` that takes them (`prepare_extra_step_kwargs`). This
module does exactly that with a fresh scheduler per batch (multistep schedulers keep state).

The per-image noise rule holds here too: the starting noise of image i comes from its own generator
(seeded by `image_seed(seed, i)`), and `step` gets the list of the batch's generators, so a
scheduler that draws noise inside `step` (DDPM, Euler ancestral, DPM-Solver SDE, LCM, DDIM with eta
> 0) draws image i's noise from image i's generator, as diffusers' `randn_tensor` does for a list.
Image i is then the same whatever the batch size, and equals the pipeline's image for the same
latents and generators.

Schedulers outside SUPPORTED are refused in one line (each listed one is tested against its
pipeline): `DPMSolverSDEScheduler` draws its Brownian noise from one batch seed (no per-image rule,
and it needs torchsde), `LMSDiscreteScheduler` needs scipy at every step.
"""

from __future__ import annotations

import inspect

import torch

from ..errors import DiffpruneError

PIPELINE = "pipeline"
SAMPLERS = (PIPELINE, "ddim", "ddpm")  # the default first: the folder's own scheduler
SUPPORTED = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
             "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
             "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
             "UniPCMultistepScheduler", "DEISMultistepScheduler", "LCMScheduler", "TCDScheduler",
             "FlowMatchEulerDiscreteScheduler")


def _step_takes(scheduler, name: str) -> bool:
    return name in inspect.signature(scheduler.step).parameters


def check_pipeline_args(scheduler, steps: int, eta: float, spacing: str, clip_sample: str) -> None:
    """One-line refusals of settings the folder's scheduler has no meaning for, and of a step count whose
    timesteps run past the training range (diffusers' own pipeline would fail there with an IndexError)."""
    name = type(scheduler).__name__
    if name not in SUPPORTED:
        raise DiffpruneError(f"the folder's scheduler {name} is not supported by --sampler pipeline; supported: "
                             f"{', '.join(SUPPORTED)}; or pass --sampler ddim / ddpm (the paper's samplers)")
    if spacing != "uniform":
        raise DiffpruneError(f"spacing={spacing!r} is the DDIM reference code's sampler; with --sampler pipeline "
                             f"the timesteps are {name}'s own (allowed: 'uniform'); pass --sampler ddim for it")
    if float(eta) != 0.0 and not _step_takes(scheduler, "eta"):
        other = "" if name.startswith("FlowMatch") else ", or --sampler ddim"
        raise DiffpruneError(f"eta={eta} has no meaning for {name} (only DDIMScheduler takes eta); allowed: 0{other}")
    if clip_sample == "on" and "clip_sample" not in scheduler.config:
        raise DiffpruneError(f"clip_sample='on': {name} has no x0 clipping; allowed: 'auto' or 'off', "
                             "or --sampler ddim / ddpm")
    if getattr(scheduler.config, "stochastic_sampling", False):
        raise DiffpruneError(f"{name} with stochastic_sampling=True is not supported; allowed: false (SD3)")
    _check_timesteps(scheduler, steps)


def _check_timesteps(scheduler, steps: int) -> None:
    sched = fresh_scheduler(scheduler)
    try:
        sched.set_timesteps(int(steps), **_timestep_kwargs(sched, (64, 64), 1))
    except (ValueError, RuntimeError, IndexError) as err:
        raise DiffpruneError(f"steps={steps}: {type(scheduler).__name__}.set_timesteps refused it "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    T = int(sched.config.num_train_timesteps)
    top = float(sched.timesteps.max())
    if not sched.timesteps.is_floating_point() and top >= T:
        raise DiffpruneError(f"steps={steps} with the scheduler's steps_offset={sched.config.get('steps_offset', 0)} "
                             f"reaches timestep {int(top)}; allowed: timesteps < num_train_timesteps={T} "
                             "(use fewer steps)")


def fresh_scheduler(scheduler, clip_sample: str = "auto"):
    """A new scheduler of the folder's class and config; `clip_sample` on / off overrides its x0 clipping."""
    overrides = {}
    if clip_sample != "auto" and "clip_sample" in scheduler.config:
        overrides["clip_sample"] = clip_sample == "on"
        if "thresholding" in scheduler.config:
            overrides["thresholding"] = False
    return type(scheduler).from_config(scheduler.config, **overrides)


def _timestep_kwargs(scheduler, latent_hw: tuple[int, int], patch_size: int) -> dict:
    """`mu` for a flow scheduler with dynamic shifting, as StableDiffusion3Pipeline computes it."""
    if not scheduler.config.get("use_dynamic_shifting", False):
        return {}
    from .flow import shift_mu

    return {"mu": shift_mu(scheduler.config, latent_hw, patch_size)}


@torch.no_grad()
def scheduler_denoise(model, scheduler, noise: torch.Tensor, generators: list[torch.Generator], *, steps: int,
                      eta: float = 0.0, clip_sample: str = "auto", predict) -> torch.Tensor:
    """The pipeline's denoising loop from `noise` (B, C, H, W), unit variance; returns the final latents.

    `predict(x, t)` is the (guided) model output for the batch x at the (B,) timesteps t.
    """
    sched = fresh_scheduler(scheduler, clip_sample)
    patch = int(getattr(model.config, "patch_size", 1) or 1)
    sched.set_timesteps(int(steps), device=noise.device, **_timestep_kwargs(sched, tuple(noise.shape[-2:]), patch))
    step_kwargs = {}
    if _step_takes(sched, "eta"):
        step_kwargs["eta"] = float(eta)
    if _step_takes(sched, "generator"):
        step_kwargs["generator"] = generators
    # Flow-matching schedulers have neither: StableDiffusion3Pipeline starts from unit noise, unscaled.
    x = noise * getattr(sched, "init_noise_sigma", 1.0)
    scale = getattr(sched, "scale_model_input", lambda sample, _t: sample)
    for t in sched.timesteps:
        x_in = scale(x, t)
        out = predict(x_in, t.expand(x.shape[0]))
        x = sched.step(out, t, x, **step_kwargs, return_dict=False)[0]
    return x


def sampler_label(scheduler_name: str, sampler: str, spacing: str, steps: int, eta: float = 0.0) -> str:
    """What ran, in words: e.g. "PNDMScheduler (the folder's own), 50 steps", "DDIM (diffprune), quad, 100 steps"."""
    if sampler == PIPELINE:
        return f"{scheduler_name} (the folder's own), {steps} steps" + (f", eta {eta:g}" if eta else "")
    if scheduler_name.startswith("FlowMatch"):
        return f"FlowMatch Euler (diffprune), {steps} steps"
    what = f"{sampler.upper()} (diffprune), {spacing} spacing"
    return f"{what}, eta {eta:g}, {steps} steps" if sampler == "ddim" else f"{what}, {steps} steps"
