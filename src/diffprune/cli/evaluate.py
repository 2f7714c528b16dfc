"""`diffprune evaluate`: FID/KID, SSIM consistency, CLIP score, params/MACs, latency and throughput in one JSON."""

from __future__ import annotations

import argparse

from .common import (
    add_device_seed,
    add_hub_options,
    at_least_two_int,
    non_negative_int,
    positive_int,
    resolve_device,
    show_defaults,
)

_EPILOG = """examples:
  diffprune evaluate --samples out/student --reference digits --teacher-samples out/teacher
  diffprune evaluate --model pruned/ --teacher-model teacher/ --latency-repeats 50
  diffprune evaluate --reference data/cifar_train --feature-net inception --save-stats cifar_train.npz
  diffprune evaluate --samples out/student --reference cifar_train.npz --feature-net inception
  diffprune evaluate --samples out/sd_student --clip-score --clip-model path/to/clip-vit-large-patch14

Every number in the JSON names its feature extractor ("digits-cnn-v1" or "inception-v3-pytorch-fid"),
how it was chosen, and the sample counts behind it; digits-FID is comparable only with other digits-FIDs.
--feature-net auto never picks Inception itself: RGB or larger images need --feature-net inception.
Inception weights: --inception-weights PATH, else $DIFFPRUNE_CACHE (or ~/.cache/diffprune)/
pt_inception-2015-12-05-6726825d.pth, else downloaded from the pytorch-fid release when online
(set DIFFPRUNE_OFFLINE=1 to never try). A .pth is unpickled only if its SHA-256 is pytorch-fid's
(6726825d0af5...) and torch >= 2.6; a .safetensors conversion needs neither.
CLIP score: each sample against the prompt its sample_config.json records, torchmetrics' CLIPScore
(max(mean 100*cos, 0)); --clip-model is a local folder or a hub id (weights: safetensors only)."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="FID/KID, SSIM consistency, params/MACs and latency of samples and models",
        description=__doc__.splitlines()[0],
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("fidelity (FID, KID)")
    g.add_argument(
        "--samples",
        help="sample folder (samples.npz or numbered PNGs), image folder, or .npz of "
        "uint8 images to judge (default: none)",
    )
    g.add_argument(
        "--reference",
        help="'digits' (built-in data), an image folder, an .npz of images, or a "
        "statistics .npz written by --save-stats (default: none = no FID/KID)",
    )
    g.add_argument(
        "--reference-split",
        choices=("all", "train", "test"),
        default="all",
        help="split of the built-in digits reference (default: all, the data the teacher trained on)",
    )
    g.add_argument(
        "--feature-net",
        choices=("auto", "digits", "inception"),
        default="auto",
        help="feature extractor: digits = embedded digits CNN (digits-cnn-v1, 64-d, trained on 1-channel 16x16 "
        "digits; refuses colour images), inception = pytorch-fid InceptionV3 pool3 (2048-d, comparable with "
        "published FIDs) (default: auto = digits when samples and reference are grayscale (1 channel, or 3 equal "
        "channels) and at most 32x32 px, otherwise refused: pass --feature-net inception)",
    )
    g.add_argument(
        "--inception-weights",
        help="path of pt_inception-2015-12-05-6726825d.pth (pytorch-fid's file, SHA-256 checked before it is "
        "loaded weights-only; needs torch >= 2.6) or a .safetensors conversion (default: the cache, see below)",
    )
    g.add_argument(
        "--save-stats",
        help="write the reference's statistics (mu, sigma, features, extractor "
        "name) to this .npz for later --reference use (default: not written)",
    )
    g.add_argument(
        "--kid-subsets",
        type=positive_int,
        default=100,
        help="KID: number of random subsets, an integer >= 1 (default: 100)",
    )
    g.add_argument(
        "--kid-subset-size",
        type=at_least_two_int,
        default=1000,
        help="KID: images per subset, an integer >= 2, capped at the smaller set (default: 1000)",
    )
    g = p.add_argument_group("consistency (SSIM, MSE, PSNR)")
    g.add_argument(
        "--teacher-samples",
        help="the teacher's samples from the same seed; paired with --samples "
        "by index (default: none = no SSIM)",
    )
    g = p.add_argument_group("text-image agreement (CLIP score)")
    g.add_argument(
        "--clip-score",
        action="store_true",
        help="CLIP score of --samples against the prompt each was generated from (recorded in the "
        "sample folder's sample_config.json) (default: off; on when --clip-model is given)",
    )
    g.add_argument(
        "--clip-model",
        default=None,
        help="CLIP checkpoint: a local folder (config.json, model.safetensors, tokenizer and "
        "preprocessor files) or a hub id (default: openai/clip-vit-large-patch14, torchmetrics' default)",
    )
    g = p.add_argument_group("cost (params, MACs, latency, throughput)")
    g.add_argument(
        "--model",
        help="pipeline folder of the (pruned) model, any supported family: DDPM/LDM UNet2DModel, Stable "
        "Diffusion 1/2, SDXL, DiT, PixArt, SD3; or its UNet folder; its unet/transformer is measured "
        "(default: none = no cost)",
    )
    g.add_argument(
        "--teacher-model",
        help="pipeline or UNet folder of the teacher, same family as --model (DDPM/LDM UNet2DModel, Stable "
        "Diffusion 1/2, SDXL, DiT, PixArt, SD3), for ratios (default: none)",
    )
    g.add_argument(
        "--prompt-embeds",
        help="text-conditional models: a prompt-embeddings file (diffprune encode-prompts) for the throughput "
        "run, so --model/--teacher-model load without their text encoders; its prompt 'a photograph', else its "
        "first non-empty one, is used (default: none, the pipelines' text encoders)",
    )
    g.add_argument(
        "--latency-repeats",
        type=positive_int,
        default=20,
        help="timed forward passes per model, an integer >= 1 (default: 20)",
    )
    g.add_argument(
        "--latency-warmup",
        type=non_negative_int,
        default=3,
        help="untimed warm-up passes per model, an integer >= 0 (default: 3)",
    )
    g.add_argument(
        "--latency-batch-size",
        type=positive_int,
        default=1,
        help="batch of the timed forward pass, same for both models, an integer >= 1 (default: 1)",
    )
    g.add_argument(
        "--throughput-images",
        type=non_negative_int,
        default=0,
        help="images per timed sampling run (the folder's own scheduler, as `diffprune sample` by default); "
        "0 skips throughput, an integer >= 0 (default: 0)",
    )
    g.add_argument(
        "--throughput-steps",
        type=positive_int,
        default=100,
        help="sampling steps for throughput, an integer >= 1 (default: 100, the paper's)",
    )
    g.add_argument(
        "--throughput-repeats",
        type=positive_int,
        default=2,
        help="timed sampling runs per model, an integer >= 1 (default: 2)",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--output",
        help="JSON file to write (default: <samples>/evaluation.json, or evaluation.json "
        "beside a samples .npz; without --samples nothing is written unless given)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output JSON or --save-stats file, only one that diffprune evaluate "
        "wrote (never an input) (default: off, existing files are refused)",
    )
    add_device_seed(p)
    add_hub_options(p)  # for --model and --teacher-model
    show_defaults(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from ..evaluate.stage import EvaluateConfig, evaluate, format_table
    from ..metrics.clip_score import DEFAULT_CLIP_MODEL

    resolve_device(args.device)
    config = EvaluateConfig(
        samples=args.samples,
        reference=args.reference,
        reference_split=args.reference_split,
        teacher_samples=args.teacher_samples,
        model=args.model,
        teacher_model=args.teacher_model,
        revision=args.revision,
        variant=args.variant,
        prompt_embeds=args.prompt_embeds,
        feature_net=args.feature_net,
        inception_weights=args.inception_weights,
        clip_score=args.clip_score or args.clip_model is not None,
        clip_model=args.clip_model or DEFAULT_CLIP_MODEL,
        save_stats=args.save_stats,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        latency_repeats=args.latency_repeats,
        latency_warmup=args.latency_warmup,
        latency_batch_size=args.latency_batch_size,
        throughput_images=args.throughput_images,
        throughput_steps=args.throughput_steps,
        throughput_repeats=args.throughput_repeats,
        device=args.device,
        seed=args.seed,
        output=args.output,
    )
    result = evaluate(config, overwrite=args.overwrite)
    print(format_table(result))
    for w in result["warnings"]:
        print(f"warning: {w}")
    if "output" in result:
        print(f"wrote {result['output']}")
    return result
