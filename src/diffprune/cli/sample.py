"""`diffprune sample`: samples of a pipeline folder (its own scheduler, or the paper's DDIM / DDPM), one PNG
per global index + samples.npz."""

from __future__ import annotations

import argparse

from .common import (
    add_conditioning_options,
    add_device_seed,
    add_hub_options,
    add_output_dir,
    add_prompt_embeds_option,
    guidance_scale_float,
    non_negative_float,
    positive_int,
    resolve_device,
    show_defaults,
)
from .finetune import unit_closed


def register(subparsers) -> None:
    from ..sample.loop import CLIP_MODES, SAMPLERS, SPACINGS

    p = subparsers.add_parser(
        "sample", help="generate images from a (pruned) pipeline folder",
        description="Generate images i = 0..N-1; image i always starts from the noise seeded by (seed, i), "
                    "whatever the batch size or number of processes (run under `accelerate launch` to shard). "
                    "Writes 000000.png..., samples.npz (images uint8 NHWC, indices), grid.png, sample_config.json. "
                    "On CPU use `accelerate launch --multi_gpu --num_processes N` with no visible GPU "
                    "(accelerate's --cpu starts one process).")
    p.add_argument("--model", required=True, help="pipeline folder (pruned or not) or hub id")
    add_output_dir(p)
    p.add_argument("--num-images", "--num_images", dest="num_images", type=positive_int, default=64,
                   help="number of images, an integer >= 1")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=positive_int, default=64,
                   help="images per forward pass (per process), an integer >= 1; does not change the images")
    p.add_argument("--steps", type=positive_int, default=100,
                   help="sampling steps (model calls), an integer in [1, num_train_timesteps]")
    p.add_argument("--eta", type=non_negative_float, default=0.0,
                   help="DDIM eta, a number >= 0 (0 = deterministic DDIM, 1 = DDPM-like noise); only for a "
                        "DDIMScheduler folder or --sampler ddim")
    p.add_argument("--sampler", choices=SAMPLERS, default="pipeline",
                   help=f"one of {SAMPLERS}: pipeline = the folder's own scheduler class through its set_timesteps / "
                        "step, as its diffusers pipeline samples (PNDM for SD 1.x, Euler for SDXL, DPM-Solver for "
                        "PixArt, FlowMatch Euler for SD3, ...); ddim / ddpm = the paper's samplers on the "
                        "scheduler's noise schedule (flow-matching pipelines: the Euler ODE, eta 0)")
    p.add_argument("--spacing", choices=SPACINGS, default="uniform",
                   help="timestep spacing of --sampler ddim / ddpm: uniform (the scheduler config's timestep_spacing, "
                        "steps_offset and set_alpha_to_one, as diffusers' DDIMScheduler/DDPMScheduler) or quad "
                        "(t_i = int((i*sqrt(0.8T)/(N-1))^2), the DDIM reference code and the paper's CIFAR-10 "
                        "setting); --sampler pipeline uses the scheduler's own timesteps (uniform)")
    p.add_argument("--clip-sample", "--clip_sample", dest="clip_sample", choices=CLIP_MODES, default="auto",
                   help="predicted x0 at each step: auto (clip or threshold as the scheduler config says), on "
                        "(clamp to +-clip_sample_range), off (never; the DDIM reference code: --sampler ddim "
                        "--spacing quad --clip-sample off reproduces the paper's sampler)")
    add_device_seed(p)
    p.add_argument("--resume", action="store_true",
                   help="fill in only the missing images of an existing folder made with the same "
                        "model/seed/steps/eta/sampler/spacing/clip-sample/prompt/guidance (--num-images may grow)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    add_conditioning_options(p, "image", captions=False)
    add_prompt_embeds_option(p)
    group = p.add_argument_group("classifier-free guidance (Stable Diffusion, PixArt, SD3, DiT; as diffusers' "
                                 "pipelines)")
    group.add_argument("--guidance-scale", "--guidance_scale", dest="guidance_scale", type=guidance_scale_float,
                       default=1.0, help="CFG scale s, a number in [0, 100]: uncond + s * (cond - uncond), on when "
                                         "s > 1 (diffusers' pipelines use 7.5 for SD, 5.0 for SDXL, 4.0 for DiT, 7.0 "
                                         "for SD3); 1 = unguided")
    group.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", default=None,
                       help="prompt of the unconditional branch (text models; default: the empty prompt, or "
                            "zeros for SDXL pipelines with force_zeros_for_empty_prompt)")
    group.add_argument("--guidance-rescale", "--guidance_rescale", dest="guidance_rescale", type=unit_closed,
                       default=0.0, help="diffusers' guidance_rescale in [0, 1] (Lin et al. 2024, sec. 3.4; "
                                         "0.7 for zero-terminal-SNR v-prediction models)")
    add_hub_options(p)
    show_defaults(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..sample.loop import sample_to_folder

    device = resolve_device(args.device)
    sample_to_folder(args.model, args.output_dir, args.num_images, batch_size=args.batch_size,
                     steps=args.steps, eta=args.eta, sampler=args.sampler, spacing=args.spacing,
                     seed=args.seed, device=device, resume=args.resume, overwrite=args.overwrite,
                     progress=args.progress, prompt=args.prompt, class_labels=args.class_labels,
                     clip_sample=args.clip_sample, guidance_scale=args.guidance_scale,
                     negative_prompt=args.negative_prompt, guidance_rescale=args.guidance_rescale,
                     prompt_embeds=args.prompt_embeds, revision=args.revision, variant=args.variant)
