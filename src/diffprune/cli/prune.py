"""`diffprune prune`: structural pruning of a diffusers pipeline's denoiser (Diff-Pruning et al.)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..prune.config import ALLOCATIONS, DEPTH_ONLY_METHODS, DEPTH_SPLITS, RATIO_RULES, STRUCTURES, PruneConfig
from ..prune.importance import GRADIENT_METHODS, METHODS
from ..prune.sweep_runtime import PRECISIONS
from .common import (
    add_conditioning_options,
    add_device_seed,
    add_hub_options,
    add_output_dir,
    add_portable_option,
    add_prompt_embeds_option,
    data_or_digits,
    positive_int,
    resolve_device,
    show_defaults,
    unit_half_open,
    unit_open,
)

DEFAULT_RATIO = 0.3  # --ratio when no size option is given


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prune", help="prune a pipeline's UNet and write a pruned pipeline folder",
        description="Score channels (Diff-Pruning: Taylor importance summed over the informative "
                    "timesteps; or a baseline) and remove them structurally. Writes a diffusers "
                    "pipeline folder with pruning.json, prune_report.json and a loss-over-timesteps plot.")
    p.add_argument("--model", required=True, help="diffusers pipeline folder, bare UNet folder, or hub id")
    p.add_argument("--data", default=None,
                   help="calibration images: a folder (png/jpg/jpeg/webp, recursive) or a built-in name (digits); "
                        f"only the gradient methods ({', '.join(GRADIENT_METHODS)}) need them: the data-free ones "
                        "and --dry-run run without --data and read none "
                        "(default: digits for a 1-channel pixel-space model; required for any other)")
    p.add_argument("--method", choices=METHODS + DEPTH_ONLY_METHODS, default="diff-pruning",
                   help="importance criterion: diff-pruning and taylor score with gradients on --data; magnitude "
                        "(weight norms), random and reinit (random, then train from scratch) read no data; "
                        "block-influence (--structure depth only: 1 - cos(layer input, output) on --data)")
    p.add_argument("--structure", choices=STRUCTURES, default="width",
                   help="what is removed: width = channels (the paper); depth = whole layers (UNets: one resnet+"
                        "attention pair per level in the down and the mirrored up block, BK-SDM style; DiT/PixArt/"
                        "SD3: transformer blocks), a config change that loads in plain diffusers; both = depth to "
                        "the square root of the target, then width to the rest. depth/both need --target-macs or "
                        "--target-params")
    p.add_argument("--depth-split", choices=DEPTH_SPLITS, default="sqrt",
                   help="--structure both: how the target splits between layers and channels. sqrt = depth to the "
                        "square root of the target, a new sweep on the shallower model, width to the rest; joint = "
                        "one ranking from one sweep: for each number of lowest-scored layers removed, width to the "
                        "rest, and the split whose removed weights cost the least Taylor importance (sum |w g|)")
    p.add_argument("--depth-include-mid", action="store_true",
                   help="--structure depth/both on a UNet: the mid block may be removed too (BK-SDM-Small)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--ratio", type=unit_open, default=None,
                      help="per-group pruning ratio in (0, 1) (torch-pruning's meaning, see --ratio-rule) "
                           f"(default: {DEFAULT_RATIO} unless --target-macs or --target-params is given)")
    size.add_argument("--target-macs", type=unit_open, default=None,
                      help="fraction of the original MACs to reach, in (0, 1); the ratio is searched (within 2%%) "
                           "(default: off, --ratio sets the size)")
    size.add_argument("--target-params", type=unit_open, default=None,
                      help="fraction of the original params to reach, in (0, 1); the ratio is searched (within 2%%) "
                           "(default: off, --ratio sets the size)")
    p.add_argument("--ratio-rule", choices=RATIO_RULES, default="torch-pruning",
                   help="how --ratio counts GroupNorm-coupled channels: torch-pruning 1.6 keeps "
                        "floor((C/G)(1-ratio)) per group; 'paper' follows the paper's code (ratio 0.3 -> 128 to 96)")
    p.add_argument("--threshold", type=unit_half_open, default=0.05,
                   help="Diff-Pruning's thr in [0, 1): stop the timestep sweep at the first t with "
                        "L_t < thr * max L (0 keeps all timesteps)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="calibration images (one batch, one fixed noise tensor), integer >= 1")
    p.add_argument("--estimator", choices=("exact", "fast"), default=None,
                   help="how Diff-Pruning sums gradients over the kept timesteps: 'fast' finds the cut on a coarse "
                        "forward-only grid and backpropagates ~6 sampled (image, timestep) pairs per kept timestep "
                        "drawn from all --batch-size images (the pool: 32 to 512 measured alike, "
                        "benchmarks/fast_pool.py; as close to a many-image truth as 'exact' or closer); 'exact' "
                        "backpropagates "
                        "every kept timestep on the whole batch: the paper's loop (use it to reproduce the paper) "
                        "(default: fast for --method diff-pruning; the other methods have only exact)")
    p.add_argument("--micro-batch-size", type=positive_int, default=None,
                   help="process the calibration batch (and each fast-estimator pass) in micro-batches of this "
                        "many images, integer >= 1, accumulating their gradients: the same importance and pruned "
                        "model as one batch (up to float rounding) with activation memory for M images "
                        "(default: the whole batch at once)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward during the calibration sweep (less memory, ~1.3x "
                        "the time); switched off again before pruning; same result")
    p.add_argument("--sweep-precision", choices=PRECISIONS, default="fp32",
                   help="bf16: run the sweep's forward passes under bfloat16 autocast (about half the activations, "
                        "plus a bf16 copy of the weights: saves memory from --micro-batch-size 2 up; weights and "
                        "gradient sums stay fp32; agreement with fp32 measured in "
                        "benchmarks/sweep_precision.py, not guaranteed)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                   help="how the budget is spread over the layers: 'uniform' prunes every channel group by the "
                        "same ratio (the paper); 'global' ranks all groups' (mean-normalized) scores together; "
                        "'isomorphic' ranks groups of the same structure together (Isomorphic Pruning, ECCV 2024). "
                        "global/isomorphic keep >= 10%% of every group and plan --target-macs/--target-params "
                        "after the importance sweep (no --dry-run)")
    p.add_argument("--round-to", type=positive_int, default=None,
                   help="keep channel counts multiples of this integer >= 1 (faster kernels) (default: no rounding)")
    p.add_argument("--prune-heads", action="store_true",
                   help="remove whole attention heads (head size kept) instead of pruning head dims")
    p.add_argument("--head-pruning-ratio", type=unit_half_open, default=None,
                   help="with --prune-heads: fraction of each attention's heads to remove, in [0, 1) "
                        "(default: the pruning ratio; at least one head always stays)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resulting widths, params and MACs (and the size search) and stop: no "
                        "calibration data, no importance sweep, no output folder (--output-dir not needed)")
    p.add_argument("--prune-residual", action="store_true",
                   help="transformers (DiT): also prune the residual (hidden) width, slicing the fixed "
                        "position buffer with it; UNets always prune every channel")
    add_conditioning_options(p, "calibration image")
    add_prompt_embeds_option(p)
    add_hub_options(p)
    add_device_seed(p)
    add_output_dir(p, required=False, unless="--dry-run")
    add_portable_option(p)
    show_defaults(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..errors import DiffpruneError
    from ..prune.dry_run import dry_run, dry_run_table, summary_table
    from ..prune.stage import run_prune

    resolve_device(args.device)
    if args.output_dir is None and not args.dry_run:
        raise DiffpruneError("--output-dir is required (a new folder to write), unless --dry-run")
    ratio = args.ratio
    if ratio is None and args.target_macs is None and args.target_params is None:
        if args.structure != "width":
            raise DiffpruneError(f"--structure {args.structure} needs --target-macs or --target-params (a fraction of "
                                 "the model's size in (0, 1))")
        ratio = DEFAULT_RATIO
    scores_data = args.method in GRADIENT_METHODS + DEPTH_ONLY_METHODS
    needs_data = scores_data and not args.dry_run  # the data-free methods read none
    data = data_or_digits(args.data, args.model) if needs_data else args.data
    config = PruneConfig(model=args.model, data=data, method=args.method, ratio=ratio,
                         target_macs=args.target_macs, target_params=args.target_params,
                         threshold=args.threshold, batch_size=args.batch_size, estimator=args.estimator,
                         round_to=args.round_to,
                         ratio_rule=args.ratio_rule, allocation=args.allocation, seed=args.seed, device=args.device,
                         prune_heads=args.prune_heads, head_pruning_ratio=args.head_pruning_ratio,
                         prune_residual=args.prune_residual, micro_batch_size=args.micro_batch_size,
                         gradient_checkpointing=args.gradient_checkpointing, sweep_precision=args.sweep_precision,
                         structure=args.structure, depth_include_mid=args.depth_include_mid,
                         depth_split=args.depth_split,
                         prompt=args.prompt, captions=args.captions, class_labels=args.class_labels,
                         prompt_embeds=None if args.prompt_embeds is None else str(Path(args.prompt_embeds).absolute()),
                         portable=args.portable)
    source = {"revision": args.revision, "variant": args.variant}
    if args.dry_run:
        result = dry_run(config, **source)
        if result is not None:  # None: not the main process of an accelerate launch
            print(dry_run_table(result))
        return
    report = run_prune(config, args.output_dir, overwrite=args.overwrite, **source)  # locks the output meanwhile
    if report is None:  # another process of an accelerate launch: the main one reports
        return
    print(summary_table(report))
    print(f"wrote pruned pipeline: {report['output_dir']}")
    print(f"      report: {report['output_dir']}/prune_report.json")
    if args.portable:
        from ..io.portable import describe

        print(describe(report["output_dir"]))
    if "loss_plot" in report:
        print(f"      loss curve: {report['output_dir']}/{report['loss_plot']}")
