"""`diffprune train`: train a fresh UNet2DModel (default: the DDPM CIFAR-10 architecture)."""

from __future__ import annotations

import argparse

from .common import MAX_INT, positive_int, show_defaults
from .finetune import add_training_options, training_kwargs


def int_list(text: str) -> tuple[int, ...]:
    """'32,64,64' -> (32, 64, 64); every item an integer >= 0."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip() != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(v < 0 or v > MAX_INT for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: items must be integers in [0, {MAX_INT}]")
    return values


int_list.__name__ = "comma-separated integers"


def register(subparsers) -> None:
    from ..diffusion import PREDICTION_TYPES
    from ..train import BETA_SCHEDULES

    p = subparsers.add_parser(
        "train", help="train a fresh UNet2DModel (e.g. the pruned architecture's 'scratch' baseline)",
        description="Train a new UNet2DModel + DDPMScheduler with the same loop as finetune. The model comes "
                    "from --model-config (a UNet2DModel config.json) or the architecture options below "
                    "(defaults: DDPM CIFAR-10, 35.7M params).")
    p.add_argument("--model-config", dest="model_config", default=None,
                   help="UNet2DModel config JSON file; overrides the architecture options "
                        "(default: none, the architecture options below)")
    p.add_argument("--sample-size", dest="sample_size", type=positive_int, default=32,
                   help="image side in pixels, an integer >= 1 divisible by 2^(levels-1)")
    p.add_argument("--in-channels", dest="in_channels", type=positive_int, default=3,
                   help="image channels, an integer >= 1 (output channels are the same)")
    p.add_argument("--block-out-channels", dest="block_out_channels", type=int_list, default="128,256,256,256",
                   help="channels per level, comma-separated, each divisible by --norm-num-groups")
    p.add_argument("--layers-per-block", dest="layers_per_block", type=positive_int, default=2,
                   help="ResNet blocks per level, an integer >= 1")
    p.add_argument("--attention-levels", dest="attention_levels", type=int_list, default="1",
                   help="level indices (0 = full resolution) with self-attention, comma-separated; '' for none")
    p.add_argument("--norm-num-groups", dest="norm_num_groups", type=positive_int, default=32,
                   help="GroupNorm groups, an integer >= 1 dividing every level's channels")
    p.add_argument("--attention-head-dim", dest="attention_head_dim", type=positive_int, default=None,
                   help="channels per attention head, an integer in [1, narrowest attention width] "
                        "(default: one head over all channels, as DDPM)")
    p.add_argument("--num-train-timesteps", dest="num_train_timesteps", type=positive_int, default=1000,
                   help="diffusion steps T, an integer >= 2")
    p.add_argument("--beta-schedule", dest="beta_schedule", choices=BETA_SCHEDULES, default="linear",
                   help="DDPMScheduler beta schedule (linear: 1e-4 .. 0.02)")
    p.add_argument("--prediction-type", dest="prediction_type", choices=PREDICTION_TYPES, default="epsilon",
                   help="what the model predicts")
    add_training_options(p)
    show_defaults(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..fsutil import check_output_location
    from ..train import read_unet_config, scheduler_config, train, unet_config

    # train() checks its data input; the model config file is read here, so it is checked here.
    check_output_location(args.output_dir, {"--model-config": args.model_config})
    if args.model_config is not None:
        model_config = read_unet_config(args.model_config)
    else:
        model_config = unet_config(sample_size=args.sample_size, in_channels=args.in_channels,
                                   block_out_channels=args.block_out_channels,
                                   layers_per_block=args.layers_per_block, attention_levels=args.attention_levels,
                                   norm_num_groups=args.norm_num_groups, attention_head_dim=args.attention_head_dim)
    scheduler = scheduler_config(args.num_train_timesteps, args.beta_schedule, args.prediction_type)
    train(args.data, args.output_dir, model_config=model_config, scheduler=scheduler, **training_kwargs(args))
