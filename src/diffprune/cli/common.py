"""Argument types and options shared by several subcommands (one definition each)."""

from __future__ import annotations

import argparse
import math


def _number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type accepting `kind` values inside an interval; the message names both."""

    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    interval = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not finite; allowed: {interval}")
        if kind is int and high is None and value > MAX_INT:  # e.g. a seed torch cannot take, a list that never ends
            raise argparse.ArgumentTypeError(f"{text!r} is too large; allowed: {interval[:-4]}{MAX_INT}]")
        bad = (low is not None and (value <= low if low_open else value < low)) or \
              (high is not None and (value >= high if high_open else value > high))
        if bad:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range; allowed: {interval}")
        return value

    parse.__name__ = f"{kind.__name__} in {interval}"
    parse.kind, parse.low, parse.high, parse.low_open, parse.high_open = kind, low, high, low_open, high_open
    return parse


MAX_INT = 2**31 - 1  # the largest integer an unbounded integer option takes


positive_int = _number(int, 1)
non_negative_int = _number(int, 0)
unit_open = _number(float, 0.0, 1.0, low_open=True, high_open=True)  # (0, 1)
unit_half_open = _number(float, 0.0, 1.0, high_open=True)  # [0, 1)
positive_float = _number(float, 0.0, low_open=True)
non_negative_float = _number(float, 0.0)
fraction = _number(float, 0.0, 1.0, low_open=True)  # (0, 1]
at_least_two_int = _number(int, 2)  # [2, inf): e.g. KID subset size


def add_output_dir(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", required=required,
                        help="new folder to write; never an input, a folder holding one, the current or "
                             "home directory (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output folder that this same subcommand wrote (its "
                             "<stage>_config.json says so), only once the new one is complete")


def add_device_seed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed, an integer >= 0 (default: 0)")


def resolve_device(name: str):
    import torch

    from ..errors import DiffpruneError

    try:
        device = torch.device(name)
    except RuntimeError:
        raise DiffpruneError(f"--device={name!r} is not a torch device; e.g. cpu, cuda, cuda:0") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffpruneError(f"--device={name!r} but CUDA is not available here; use --device cpu")
    return device


def add_conditioning_options(parser: argparse.ArgumentParser, images: str, captions: bool = True) -> None:
    """--prompt / --captions / --class-labels for Stable Diffusion UNets and DiT; `images` names what they label."""
    group = parser.add_argument_group("conditioning (Stable Diffusion UNets, DiT)")
    group.add_argument("--prompt", default=None, help=f"one prompt for every {images} (text-conditional UNets)")
    if captions:
        group.add_argument("--captions", default=None,
                           help="captions.jsonl ({'file_name', 'text'} lines) or captions.txt (file<TAB>caption) "
                                "naming every image by its path relative to --data (default: one found in --data)")
    group.add_argument("--class-labels", default=None,
                       help=f"DiT: comma-separated class ids cycled over the {images}s "
                            "(default: integer class-folder names, else random labels)")


def add_portable_option(parser: argparse.ArgumentParser) -> None:
    """--portable for the stages that write a pipeline folder (prune, finetune, train); see portable.py."""
    parser.add_argument("--portable", action="store_true",
                        help="also write, into each pruned component folder, a small self-contained Python module "
                             "and the model_index.json / config.json auto_map entries diffusers needs, so the "
                             "folder loads where diffprune is not installed: DiffusionPipeline.from_pretrained("
                             "FOLDER, trust_remote_code=True) (default: off, a code-free folder; loading it then "
                             "needs diffprune)")
