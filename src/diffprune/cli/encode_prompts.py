"""`diffprune encode-prompts`: prompts -> a prompt-embeddings file (families/prompt_embeds.py) made with
a pipeline's own text encoders, e.g. on a machine where they fit, for `--prompt-embeds` elsewhere."""

from __future__ import annotations

import argparse

from .common import add_hub_options, resolve_device, show_defaults


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "encode-prompts", help="encode prompts with a pipeline's text encoders into a file for --prompt-embeds",
        description="Encode prompts exactly as prune / finetune / sample encode them (Stable Diffusion 1/2/XL/3, "
                    "PixArt) and write one safetensors file (one row per distinct prompt, the empty prompt "
                    "always included) that those stages read with --prompt-embeds instead of loading the text "
                    "encoders. Give every prompt the later runs use: the captions of the training / calibration "
                    "images, the sampling --prompt and any --negative-prompt.")
    p.add_argument("--model", required=True, help="pipeline folder (or hub id) that has its text encoders")
    p.add_argument("--output", required=True, help="the .safetensors file to write (must not exist unless "
                                                    "--overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output that is a diffprune prompt-embeddings file")
    group = p.add_argument_group("prompts (at least one source; all are encoded, duplicates once)")
    group.add_argument("--prompt", action="append", default=None,
                       help="a prompt to encode; repeat the option for more (default: none)")
    group.add_argument("--captions", default=None,
                       help="captions.jsonl ({'file_name', 'text'} lines) or captions.txt (file<TAB>caption): "
                            "every caption in it (default: none)")
    group.add_argument("--data", default=None,
                       help="an image folder: the captions.jsonl / captions.txt in it (default: none)")
    group.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", action="append",
                       default=None, help="a negative prompt sampling will use; repeatable (default: none)")
    p.add_argument("--device", default="cpu", help="torch device of the text encoders, e.g. cpu, cuda")
    add_hub_options(p)
    show_defaults(p)
    p.set_defaults(func=run)


def _prompts(args: argparse.Namespace) -> list[str]:
    from ..errors import DiffpruneError
    from ..families.unet2d_condition import find_captions_file, read_captions

    prompts = list(args.prompt or [])
    files = [args.captions] if args.captions is not None else []
    if args.data is not None:
        found = find_captions_file(args.data)
        if found is None:
            raise DiffpruneError(f"--data {args.data!r}: no captions.jsonl or captions.txt in it (or not a folder)")
        files.append(found)
    for path in files:
        prompts += list(read_captions(path).values())
    prompts += list(args.negative_prompt or [])
    if not prompts:
        raise DiffpruneError("nothing to encode: give --prompt, --captions or --data (a folder with captions)")
    return prompts


def _is_prompt_embeds(path) -> bool:
    from ..errors import DiffpruneError
    from ..families.prompt_embeds import read_prompt_embeds

    try:
        read_prompt_embeds(path)
    except DiffpruneError:
        return False
    return True


def run(args: argparse.Namespace) -> None:
    from ..families.conditioning import encode_prompts_file
    from ..families.prompt_embeds import read_prompt_embeds
    from ..fslock import output_lock
    from ..fsutil import check_output_file
    from ..io.pipeline import load_pipeline

    prompts = _prompts(args)
    inputs = {"--model": args.model, "--captions": args.captions, "--data": args.data}
    out = check_output_file(args.output, args.overwrite, inputs, _is_prompt_embeds,
                            "a diffprune prompt-embeddings file")
    pipe = load_pipeline(args.model, device=resolve_device(args.device), revision=args.revision, variant=args.variant)
    with output_lock(out):
        encode_prompts_file(pipe, out, prompts)
    embeds = read_prompt_embeds(out)
    shapes = ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in embeds.tensors.items())
    print(f"wrote {out}: {len(embeds.prompts)} prompts (the empty prompt included), layout {embeds.layout}: {shapes}")
