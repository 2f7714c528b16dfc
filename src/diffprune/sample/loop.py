"""Sampling over batches of per-image noise, sharded over processes, into sample folders.

The default sampler ("pipeline", scheduler_loop.py) runs the folder's own scheduler class exactly as
its diffusers pipeline does. The paper's samplers are explicit choices: `sampler="ddim"` / `"ddpm"`
with the scheduler config's timestep spacing or "quad" (PAPER.md, "Evaluation protocol": DDIM, 100
steps, eta = 0, "quad" spacing for CIFAR-10); their arithmetic lives in `schedules`.

Image i always starts from noise drawn from its own generator seeded by (seed, i), and any per-step
noise for image i is drawn from that same generator, so image i is the same whatever the batch size
or number of processes, and a teacher folder and a student folder pair up by index.

Folder layout written by `sample_to_folder`: see files.py. Guidance: families/guidance.py.
Flow-matching schedulers (Stable Diffusion 3) run the FlowMatch Euler chain instead (flow.py).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..diffusion import is_flow
from ..errors import DiffpruneError, check_range
from ..families.guidance import guided_predict
from ..families.pipeline_parts import denoiser_of, image_seed  # noqa: F401  (image_seed: public here too)
from ..fsutil import (
    check_output_location,
    discard_on_failure,
    output_lock,
    replace_dir,
    write_json_atomic,
)
from ..io.structure import model_fingerprint  # noqa: F401  (public here too)
from ..plots import image_grid
from .config import (  # noqa: F401  (public here too)
    CONFIG_FILE,
    CONTENT_KEYS,
    GUIDANCE_OFF,
    SampleConfig,
    plan_folder,
    upgrade_v2,
)
from .files import (  # noqa: F401  (public here too)
    GRID_FILE,
    NPZ_FILE,
    load_samples,
    png_name,
    read_png,
    write_npz_atomic,
    write_png_atomic,
)
from .flow import check_flow_args, flow_denoise
from .scheduler_loop import PIPELINE, SAMPLERS, check_pipeline_args, sampler_label, scheduler_denoise
from .schedules import (  # noqa: F401  (SPACINGS, CLIP_MODES, timestep_sequence: public here too)
    CLIP_MODES,
    SPACINGS,
    VARIANCE_TYPES,
    chain_rule,
    ddim_update,
    ddpm_update,
    final_alpha,
    limit_x0,
    reverse_chain,
    split_prediction,
    timestep_sequence,
)

# --------------------------------------------------------------------------- seeds and noise


def image_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(image_seed(seed, i)) for i in indices]


def _randn(generators: list[torch.Generator], shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """One (C, H, W) draw per generator, on CPU (device-independent), stacked and moved."""
    x = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
    return x.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- the loop


def _check_sampling_args(unet, scheduler, num_images, batch_size, steps, eta, sampler, spacing,
                         clip_sample="auto"):
    check_range("num_images", num_images, 0)
    check_range("batch_size", batch_size, 1)
    check_range("eta", eta, 0.0)
    if sampler not in SAMPLERS:
        raise DiffpruneError(f"sampler={sampler!r} is not supported; allowed: {SAMPLERS}")
    if spacing not in SPACINGS:
        raise DiffpruneError(f"spacing={spacing!r} is not supported; allowed: {SPACINGS}")
    if clip_sample not in CLIP_MODES:
        raise DiffpruneError(f"clip_sample={clip_sample!r} is not supported; allowed: {CLIP_MODES}")
    T = int(scheduler.config.num_train_timesteps)
    if not 1 <= int(steps) <= T:
        raise DiffpruneError(f"steps={steps!r} is out of range; allowed: [1, {T}] (the model's training steps)")
    config = unet.config
    if getattr(config, "num_class_embeds", None) or getattr(config, "class_embed_type", None):
        raise DiffpruneError("class-conditional UNets are not supported by `sample` yet")
    if sampler == PIPELINE:
        return check_pipeline_args(scheduler, steps, eta, spacing, clip_sample)
    if is_flow(scheduler):
        return check_flow_args(scheduler, sampler, eta, spacing, clip_sample)
    rule = chain_rule(scheduler.config, clip_sample)
    reverse_chain(T, steps, sampler, spacing, rule)  # refuses steps that run past the last timestep
    if sampler == "ddpm" and rule.variance_type not in VARIANCE_TYPES:
        raise DiffpruneError(f"scheduler variance_type={rule.variance_type!r} is not supported; "
                             f"allowed: {VARIANCE_TYPES}")


def _sample_size(unet) -> tuple[int, int]:
    size = unet.config.sample_size
    if size is None:
        raise DiffpruneError("the model's config has no sample_size; cannot choose an image size")
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@torch.no_grad()
def denoise(unet, scheduler, noise: torch.Tensor, generators: list[torch.Generator], *, steps: int,
            eta: float = 0.0, sampler: str = PIPELINE, spacing: str = "uniform", clip_sample: str = "auto",
            family=None, cond: dict | None = None, uncond: dict | None = None, guidance_scale: float = 1.0,
            guidance_rescale: float = 0.0) -> torch.Tensor:
    """Run the reverse chain from `noise` (B, C, H, W, unit variance); returns x_0 in model range (unclipped).

    `generators[b]` supplies image b's per-step noise (DDIM with eta > 0, DDPM for t > 0, schedulers
    that draw noise in `step`), drawn as diffusers' `randn_tensor` draws image b's noise from a list of
    generators. `sampler`: "pipeline" (the folder's scheduler, scheduler_loop.py) or the paper's "ddim" /
    "ddpm" (`clip_sample`: see `chain_rule`). With a `family`, the model is called as
    `family.predict(unet, x, t, cond)`; with `uncond` and guidance_scale > 1, classifier-free guidance
    as diffusers' pipelines compute it (families/guidance.py), applied to the model output before the update.
    """
    if sampler == PIPELINE:
        def predict(x, t):
            if family is None:
                return unet(x, t).sample
            return guided_predict(family, unet, x, t, cond, uncond, guidance_scale, guidance_rescale)

        return scheduler_denoise(unet, scheduler, noise, generators, steps=steps, eta=eta, clip_sample=clip_sample,
                                 predict=predict)
    if is_flow(scheduler):  # SD3: the FlowMatch Euler chain (flow.py)
        return flow_denoise(unet, scheduler, noise, steps=steps, family=family, cond=cond, uncond=uncond,
                            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)
    config = scheduler.config
    rule = chain_rule(config, clip_sample)
    abar = scheduler.alphas_cumprod.to(device=noise.device, dtype=torch.float32)
    final = final_alpha(abar, sampler, spacing, rule)
    x = noise
    shape = tuple(noise.shape[1:])
    for t, t_prev in reverse_chain(config.num_train_timesteps, steps, sampler, spacing, rule):
        a_t, a_prev = abar[t], (abar[t_prev] if t_prev >= 0 else final)
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = (unet(x, tt).sample if family is None else
               guided_predict(family, unet, x, tt, cond, uncond, guidance_scale, guidance_rescale)).float()
        x0, eps = split_prediction(out, x.float(), a_t, rule.prediction_type)
        x0 = limit_x0(x0, rule)
        if sampler == "ddim":
            z = _randn(generators, shape, x.device, torch.float32) if eta > 0 else None
            x = ddim_update(x0, eps, a_t, a_prev, eta, z)
        else:
            z = _randn(generators, shape, x.device, torch.float32) if t > 0 else None
            x = ddpm_update(x0, x.float(), a_t, a_prev, z, rule.variance_type)
        x = x.to(noise.dtype)
    return x


def _guided(ctx, batch: list[int], device) -> dict:
    """`denoise` keyword arguments for a conditional pipeline: family, cond, uncond, guidance."""
    return {"family": ctx.family, "cond": ctx.cond_for(batch, device), "uncond": ctx.uncond_for(batch, device),
            "guidance_scale": ctx.guidance_scale, "guidance_rescale": ctx.guidance_rescale}


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C), rounded as diffusers' pipelines do."""
    x = (x.float() / 2 + 0.5).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def check_finite_images(x: torch.Tensor, indices: Sequence[int]) -> None:
    """Never write an image from a non-finite sample (NaN/inf: a diverging model, guidance or conditioning):
    one line naming the first bad image of the batch `indices`."""
    bad = ~torch.isfinite(x).flatten(1).all(dim=1)
    if bool(bad.any()):
        i = int(indices[int(bad.nonzero()[0, 0])])
        raise DiffpruneError(f"image {i} ({png_name(i)}) is not finite after sampling (NaN/inf in the model output); "
                             "nothing was written for it; lower --guidance-scale or check the model / prompt "
                             "embeddings")


def sample(unet, scheduler, num_images: int, *, batch_size: int = 64, seed: int = 0, steps: int = 100,
           eta: float = 0.0, sampler: str = PIPELINE, spacing: str = "uniform",
           device: str | torch.device = "cpu", indices: Sequence[int] | None = None,
           progress: bool = True, clip_sample: str = "auto", ctx=None) -> np.ndarray:
    """Generate images `indices` (default range(num_images)) as uint8 (N, H, W, C).

    Image i depends only on (model, scheduler, seed, i, steps, eta, sampler, spacing, clip_sample),
    not on batch_size or on which other indices are generated alongside it. `clip_sample` ("auto",
    "on", "off"): what happens to each step's predicted x0 (see `chain_rule`). `ctx`
    (families.conditioning.PipelineContext) adds image i's prompt / class label, the guidance
    settings, and for latent pipelines decodes the final latents with the autoencoder.
    """
    _check_sampling_args(unet, scheduler, num_images, batch_size, steps, eta, sampler, spacing, clip_sample)
    indices = list(range(num_images)) if indices is None else [int(i) for i in indices]
    device = torch.device(device)
    unet = unet.to(device).eval()
    dtype = next(unet.parameters()).dtype
    shape = (int(unet.config.in_channels), *_sample_size(unet))
    if ctx is not None:
        ctx.to(device)
    batches = [indices[k:k + batch_size] for k in range(0, len(indices), batch_size)]
    out = []
    for batch in tqdm(batches, desc="sampling", unit="batch", disable=not progress or not batches):
        gens = image_generators(seed, batch)
        noise = _randn(gens, shape, device, dtype)
        x = denoise(unet, scheduler, noise, gens, steps=steps, eta=eta, sampler=sampler, spacing=spacing,
                    clip_sample=clip_sample, **({} if ctx is None else _guided(ctx, batch, device)))
        images = x if ctx is None else ctx.to_image_space(x)
        check_finite_images(images, batch)
        out.append(to_uint8(images))
    if not out:
        if ctx is not None:
            size, channels = ctx.data_size()
            return np.zeros((0, size, size, channels), dtype=np.uint8)
        return np.zeros((0, shape[1], shape[2], shape[0]), dtype=np.uint8)
    return np.concatenate(out)


# --------------------------------------------------------------------------- the stage


def _finish(work: Path, output_dir: Path, num_images: int, channels: int,
            size: tuple[int, int] | None = None) -> np.ndarray:
    """Main process: collect all PNGs (checking for gaps), write samples.npz and grid.png, swap in."""
    missing = [i for i in range(num_images) if not (work / png_name(i)).is_file()]
    if missing:
        raise DiffpruneError(f"{work}: {len(missing)} images missing after sampling (first: "
                             f"{png_name(missing[0])}); rerun with --resume")
    images = np.stack([read_png(work / png_name(i), channels, size) for i in range(num_images)])
    write_npz_atomic(work / NPZ_FILE, images=images, indices=np.arange(num_images, dtype=np.int64))
    grid = image_grid(images, max_images=64, pad=2)
    write_png_atomic(work / GRID_FILE, grid)
    if work != output_dir:
        replace_dir(work, output_dir)
    return images


def sample_to_folder(model: str | Path, output_dir: str | Path, num_images: int, *, batch_size: int = 64,
                     steps: int = 100, eta: float = 0.0, sampler: str = PIPELINE, spacing: str = "uniform",
                     seed: int = 0, device: str | torch.device = "cpu", resume: bool = False,
                     overwrite: bool = False, progress: bool = True, prompt: str | None = None,
                     class_labels: str | None = None, clip_sample: str = "auto", guidance_scale: float = 1.0,
                     negative_prompt: str | None = None, guidance_rescale: float = 0.0,
                     prompt_embeds: str | Path | None = None, revision: str | None = None,
                     variant: str | None = None) -> Path:
    """Sample a pipeline folder into `output_dir` (layout in the module docstring); returns it.

    `clip_sample`: "auto" clips / thresholds predicted x0 as the scheduler config says, "on" clamps
    it to +-clip_sample_range, "off" never touches it (the DDIM reference code, with spacing="quad").

    Latent pipelines are decoded with their autoencoder; Stable Diffusion UNets need `prompt`;
    DiT takes `class_labels` ('1,2,3', cycled) or random ones. `guidance_scale` > 1 turns on
    classifier-free guidance as diffusers' pipelines compute it (`negative_prompt`: the
    unconditional branch of text models, default the empty prompt; DiT: the null class;
    `guidance_rescale`: diffusers' option of that name). The default 1.0 is unguided. `prompt_embeds`:
    a prompt-embeddings file (families/prompt_embeds.py) instead of the text encoders (not loaded).
    `revision` / `variant`: which hub revision and weights variant (e.g. "fp16") to load (io.load_pipeline).

    Under `accelerate launch` with N processes, rank r generates the indices i with i % N == r;
    the main process writes samples.npz and grid.png once every rank is done.
    """
    from accelerate import PartialState

    from ..io.pipeline import load_pipeline

    state = PartialState(cpu=torch.device(device).type == "cpu")
    if state.num_processes > 1:
        device = state.device
    output_dir = check_output_location(output_dir, {"--model": model, "--prompt-embeds": prompt_embeds})
    from ..families import family_for
    from ..families.conditioning import attach_for_sampling, context_for, load_prompt_embeds

    embeds = load_prompt_embeds(prompt_embeds)
    pipe = load_pipeline(model, device="cpu", text_encoders=embeds is None, revision=revision, variant=variant)

    _, unet = denoiser_of(pipe)
    scheduler = pipe.scheduler
    ctx = attach_for_sampling(context_for(pipe, family_for(unet), unet, embeds), prompt=prompt,
                              class_labels=class_labels, seed=seed, guidance_scale=guidance_scale,
                              negative_prompt=negative_prompt, guidance_rescale=guidance_rescale)
    config = SampleConfig(model=str(Path(model).absolute()) if Path(model).exists() else str(model),
                          num_images=num_images, batch_size=batch_size, steps=steps, eta=eta,
                          sampler=sampler, spacing=spacing, seed=seed, model_fingerprint=model_fingerprint(unet),
                          prompt=prompt, class_labels=class_labels, clip_sample=clip_sample,
                          guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                          guidance_rescale=guidance_rescale,
                          prompt_embeds=None if embeds is None else str(Path(embeds.path).absolute()),
                          scheduler=sampler_label(type(scheduler).__name__, sampler, spacing, steps, eta),
                          revision=revision, variant=variant)
    _check_sampling_args(unet, scheduler, num_images, batch_size, steps, eta, sampler, spacing, clip_sample)
    pixels, channels = ctx.data_size()
    if channels not in (1, 3, 4):
        raise DiffpruneError(f"the model has in_channels={channels}; PNG output needs 1, 3 or 4")
    size = (pixels, pixels) if ctx.codec is not None else _sample_size(unet)
    with contextlib.ExitStack() as locks:
        _lock_on_main(state, locks, output_dir)
        # Every process plans from the same (untouched) folder state, so all raise the same error.
        work = plan_folder(output_dir, overwrite, resume, config)
        # On failure: no half-written file stays; a staging folder (--overwrite) is removed.
        locks.enter_context(discard_on_failure(work, output_dir, remove_folder=work != output_dir
                                               and state.is_main_process))
        state.wait_for_everyone()
        if state.is_main_process:
            if work != output_dir:
                shutil.rmtree(work, ignore_errors=True)  # a stale staging folder from an interrupted run
            work.mkdir(parents=True, exist_ok=True)
            for stale in work.glob(".*.tmp-*"):  # half-written files of a killed run (we hold the lock)
                with contextlib.suppress(OSError):
                    stale.unlink()
            write_json_atomic(work / CONFIG_FILE, config.to_dict())
        present = sum((work / png_name(i)).is_file() for i in range(num_images))
        if present:  # --resume: images kept must be readable and of this model's shape
            _on_main_agree(state, lambda: [read_png(work / png_name(i), channels, size) for i in range(num_images)
                                           if (work / png_name(i)).is_file()])
        state.wait_for_everyone()
        todo = [i for i in range(state.process_index, num_images, state.num_processes)
                if not (work / png_name(i)).is_file()]
        _generate_into(work, unet, scheduler, todo, config, device, progress and state.is_main_process, ctx)
        state.wait_for_everyone()
        if state.is_main_process:
            _finish(work, output_dir, num_images, channels, size)
            _print_summary(output_dir, num_images, present, state.num_processes, config.scheduler)
        state.wait_for_everyone()
    return output_dir


def _on_main_agree(state, fn) -> None:
    """Run `fn` on the main process; a DiffpruneError there is raised on every process (no hang)."""
    error = None
    if state.is_main_process:
        try:
            fn()
        except DiffpruneError as err:
            error = err
    if state.num_processes > 1:
        import torch.distributed as dist

        flag = torch.tensor([1.0 if error is not None else 0.0], device=state.device)
        dist.all_reduce(flag)
        if error is None and float(flag.item()) > 0:
            raise DiffpruneError("the main process refused this run; see its message")
    if error is not None:
        raise error


def _lock_on_main(state, locks: contextlib.ExitStack, output_dir: Path) -> None:
    """The main process holds the output folder's lock (fsutil.output_lock) for the whole run."""
    _on_main_agree(state, lambda: locks.enter_context(output_lock(output_dir)))


def _generate_into(work: Path, unet, scheduler, todo: list[int], config: SampleConfig, device,
                   progress: bool, ctx=None) -> None:
    """Generate `todo` in batches, writing each PNG atomically as soon as its batch is done."""
    chunks = [todo[k:k + config.batch_size] for k in range(0, len(todo), config.batch_size)]
    for chunk in tqdm(chunks, desc="sampling", unit="batch", disable=not progress or not chunks):
        images = sample(unet, scheduler, len(chunk), batch_size=config.batch_size, seed=config.seed,
                        steps=config.steps, eta=config.eta, sampler=config.sampler, spacing=config.spacing,
                        device=device, indices=chunk, progress=False, clip_sample=config.clip_sample, ctx=ctx)
        for i, img in zip(chunk, images, strict=True):
            write_png_atomic(work / png_name(i), img)


def _print_summary(folder: Path, num_images: int, reused: int, processes: int, sampler: str) -> None:
    note = f" ({reused} already present, kept)" if reused > 0 else ""
    procs = f" with {processes} processes" if processes > 1 else ""
    print(f"wrote {num_images} images{note}{procs} to {folder}/000000.png ... {png_name(num_images - 1)}")
    print(f"sampler: {sampler}")
    print(f"wrote {folder / NPZ_FILE} (images: uint8 NHWC, indices), {folder / GRID_FILE}, "
          f"{folder / CONFIG_FILE}")
