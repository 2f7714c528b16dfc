"""`diffprune demo`: the whole job on the embedded digits teacher, offline, in a few CPU minutes."""

from __future__ import annotations

import argparse

from .common import (
    DIGITS_MODEL,
    add_device_seed,
    add_output_dir,
    positive_int,
    show_defaults,
    unit_half_open,
    unit_open,
)


def register(subparsers) -> None:
    from .demo_job import DemoConfig

    d = DemoConfig()
    p = subparsers.add_parser(
        "demo", help="prune, fine-tune, sample, evaluate and report on the embedded digits DDPM",
        description="Runs the whole Diff-Pruning job on the embedded digits teacher and writes a report.")
    p.add_argument("--teacher", default=None,
                   help="pipeline folder to use instead of the embedded digits DDPM, a 1-channel pixel-space "
                        "model: the demo's data is the built-in digits set (default: the embedded digits DDPM)")
    p.add_argument("--threshold", type=unit_half_open, default=d.threshold, help="Diff-Pruning thr in [0, 1)")
    p.add_argument("--target-macs", type=unit_open, default=d.target_macs,
                   help="fraction of the teacher's MACs to keep, in (0, 1) (paper: 3.4G/6.1G = 0.56)")
    p.add_argument("--finetune-steps", type=positive_int, default=d.finetune_steps, help="post-training steps, >= 1")
    p.add_argument("--num-images", type=positive_int, default=d.num_images,
                   help="samples per model for FID/KID/SSIM, >= 10")
    p.add_argument("--sample-steps", type=positive_int, default=d.sample_steps, help="DDIM steps (eta 0), >= 1")
    p.add_argument("--distill", choices=("none", "output", "features", "both"), default=d.distill,
                   help="knowledge distillation from the teacher during fine-tuning (paper: none)")
    add_device_seed(p)
    add_output_dir(p)
    show_defaults(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..errors import DiffpruneError
    from .common import known_not_digits, resolve_device
    from .demo_job import DemoConfig, run_demo, summary_table

    resolve_device(args.device)
    if args.teacher is not None and known_not_digits(args.teacher):
        raise DiffpruneError(f"--teacher {args.teacher}: the demo runs on the built-in digits set, so the teacher "
                             f"must be {DIGITS_MODEL}; for other models run prune/finetune/sample/evaluate with --data")
    config = DemoConfig(teacher=args.teacher, threshold=args.threshold, target_macs=args.target_macs,
                        finetune_steps=args.finetune_steps, num_images=args.num_images,
                        sample_steps=args.sample_steps, distill=args.distill, seed=args.seed, device=args.device)
    summary = run_demo(config, args.output_dir, overwrite=args.overwrite)  # locks the output for the whole run
    print(summary_table(summary))
    print(f"report: {summary['report']}")
