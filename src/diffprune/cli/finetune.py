"""`diffprune finetune`: post-train a (pruned) pipeline folder with the paper's recipe, optional KD."""

from __future__ import annotations

import argparse

from .common import (
    add_conditioning_options,
    add_device_seed,
    add_hub_options,
    add_output_dir,
    add_portable_option,
    add_prompt_embeds_option,
    fraction,
    non_negative_float,
    non_negative_int,
    number_type,
    positive_int,
    resolve_device,
    show_defaults,
    unit_half_open,
)

unit_closed = number_type(float, 0.0, 1.0)  # [0, 1]


def add_training_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `finetune` and `train` (defaults: PAPER.md, "Post-training recipe")."""
    from ..train import EMA_WARMUPS, MIXED_PRECISION

    p.add_argument("--data", required=True,
                   help="training images: an image folder (searched recursively) or 'digits' (built in)")
    add_output_dir(p)
    p.add_argument("--steps", type=positive_int, default=1000, help="optimizer steps in total, an integer >= 1")
    p.add_argument("--batch-size", "--train_batch_size", dest="batch_size", type=positive_int, default=128,
                   help="images per process per micro-step, an integer >= 1 "
                        "(global batch = batch size x processes x grad-accum; paper: 128)")
    p.add_argument("--grad-accum", "--gradient_accumulation_steps", dest="grad_accum", type=positive_int,
                   default=1, help="micro-steps per optimizer step, an integer >= 1")
    p.add_argument("--lr", "--learning_rate", dest="lr", type=fraction, default=2e-4,
                   help="Adam learning rate, constant after warmup, in (0, 1]")
    p.add_argument("--warmup-steps", "--lr_warmup_steps", dest="warmup_steps", type=non_negative_int, default=0,
                   help="linear lr warmup steps, an integer >= 0")
    p.add_argument("--max-grad-norm", "--max_grad_norm", dest="max_grad_norm", type=non_negative_float,
                   default=1.0, help="gradient-norm clip, a number >= 0 (0 = off)")
    p.add_argument("--ema-decay", "--ema_max_decay", dest="ema_decay", type=unit_half_open, default=0.9999,
                   help="EMA decay in [0, 1) (0 = EMA equals the raw weights)")
    p.add_argument("--ema-warmup", dest="ema_warmup", choices=EMA_WARMUPS, default="none",
                   help="EMA decay schedule: none = constant (paper); ratio = min(decay, (1+k)/(10+k)); "
                        "power = min(decay, 1-(1+k)^(-2/3)); use ratio/power for short runs")
    p.add_argument("--dropout", type=unit_half_open, default=0.1,
                   help="dropout of every ResnetBlock2D during training, in [0, 1)")
    p.add_argument("--mixed-precision", "--mixed_precision", dest="mixed_precision", choices=MIXED_PRECISION,
                   default="no", help="autocast precision; fp16 needs a GPU")
    add_device_seed(p)
    p.add_argument("--num-workers", "--dataloader_num_workers", dest="num_workers", type=non_negative_int,
                   default=0, help="data-loading worker processes, an integer >= 0 (does not change results)")
    p.add_argument("--checkpoint-every", "--checkpointing_steps", dest="checkpoint_every", type=positive_int,
                   default=1000, help="write a checkpoint every N steps (and at the end), an integer >= 1")
    p.add_argument("--keep-checkpoints", "--checkpoints_total_limit", dest="keep_checkpoints",
                   type=positive_int, default=2, help="keep the newest K checkpoints, an integer >= 1")
    p.add_argument("--log-every", dest="log_every", type=positive_int, default=10,
                   help="average the loss over N steps per train_log.json/TensorBoard record, an integer >= 1")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --output-dir (same settings; --steps may grow)")
    p.add_argument("--max-steps-this-run", dest="max_steps_this_run", type=positive_int, default=None,
                   help="stop after N steps (an integer >= 1) with a checkpoint, to continue later with --resume "
                        "(default: run to --steps)")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                   help="do not write TensorBoard logs under <output>/logs")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    add_portable_option(p)


def training_kwargs(args: argparse.Namespace) -> dict:
    """The TrainingConfig fields and run options of parsed `add_training_options` arguments."""
    keys = ("steps", "batch_size", "grad_accum", "lr", "warmup_steps", "max_grad_norm", "ema_decay",
            "ema_warmup", "dropout", "mixed_precision", "seed", "checkpoint_every", "keep_checkpoints",
            "log_every", "num_workers", "portable", "resume", "overwrite", "max_steps_this_run", "progress",
            "tensorboard")
    kwargs = {k: getattr(args, k) for k in keys}
    kwargs["device"] = resolve_device(args.device)
    return kwargs


def register(subparsers) -> None:
    from ..train import DISTILL_MODES

    p = subparsers.add_parser(
        "finetune", help="post-train a (pruned) pipeline: Adam, EMA, dropout, grad clip, optional KD",
        description="Post-train a pipeline folder (pruned or not) on accelerate; writes a pipeline folder with "
                    "the EMA weights, checkpoints/, logs/ (TensorBoard), train_log.json, finetune_config.json. "
                    "Run under `accelerate launch` for several processes (on CPU: `accelerate launch "
                    "--multi_gpu --num_processes N` with no visible GPU; accelerate's --cpu starts one process).")
    p.add_argument("--model", required=True, help="pipeline folder to post-train (pruned or not)")
    add_training_options(p)
    p.add_argument("--distill", choices=DISTILL_MODES, default="none",
                   help="knowledge distillation from --teacher: output = MSE to the teacher's prediction; "
                        "features = MSE of block outputs through learnable 1x1 adapters; both")
    p.add_argument("--teacher", default=None,
                   help="teacher pipeline folder (default: the student's pruning.json base_model id, "
                        "if it is a local folder)")
    p.add_argument("--distill-weight", dest="distill_weight", type=non_negative_float, default=1.0,
                   help="weight of the output-distillation loss, a number >= 0")
    p.add_argument("--feature-weight", dest="feature_weight", type=non_negative_float, default=1.0,
                   help="weight of the feature-distillation loss, a number >= 0")
    p.add_argument("--reinit", action="store_true",
                   help="re-initialise all weights first (train the pruned architecture from scratch)")
    add_conditioning_options(p, "training image")
    add_prompt_embeds_option(p)
    add_hub_options(p)
    p.add_argument("--cond-drop-prob", "--proportion_empty_prompts", dest="cond_drop_prob", type=unit_closed,
                   default=None, help="probability in [0, 1] of replacing an image's caption by the empty prompt "
                                      "(DiT: its label by the null class), so the unconditional branch that "
                                      "classifier-free guidance uses is trained too; distillation gives the teacher "
                                      "the same dropped conditioning (default: 0.1 for text-conditional UNets, "
                                      "0 otherwise)")
    show_defaults(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..train import finetune

    finetune(args.model, args.data, args.output_dir, teacher=args.teacher, distill=args.distill,
             distill_weight=args.distill_weight, feature_weight=args.feature_weight, reinit=args.reinit,
             prompt=args.prompt, captions=args.captions, class_labels=args.class_labels,
             cond_drop_prob=args.cond_drop_prob, prompt_embeds=args.prompt_embeds, revision=args.revision,
             variant=args.variant, **training_kwargs(args))
