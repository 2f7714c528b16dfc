"""Argument types and options shared by several subcommands (one definition each)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def number_type(kind, low=None, high=None, low_open=False, high_open=False):
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


positive_int = number_type(int, 1)
non_negative_int = number_type(int, 0)
unit_open = number_type(float, 0.0, 1.0, low_open=True, high_open=True)  # (0, 1)
unit_half_open = number_type(float, 0.0, 1.0, high_open=True)  # [0, 1)
non_negative_float = number_type(float, 0.0)
fraction = number_type(float, 0.0, 1.0, low_open=True)  # (0, 1]
at_least_two_int = number_type(int, 2)  # [2, inf): e.g. KID subset size
# classifier-free guidance scale: [0, families.guidance.MAX_GUIDANCE_SCALE] (that module imports torch)
guidance_scale_float = number_type(float, 0.0, 100.0)


def add_output_dir(parser: argparse.ArgumentParser, required: bool = True, unless: str = "") -> None:
    """--output-dir (and --overwrite); `unless` names when a non-required one may be left out."""
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", required=required,
                        help="new folder to write; never an input, a folder holding one, the current or "
                             "home directory (must not exist unless --overwrite)"
                             + ("" if required else f" (default: none; required unless {unless})"))
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
    """--prompt / --captions / --class-labels for text models and DiT; `images` names what they label."""
    group = parser.add_argument_group("conditioning (Stable Diffusion 1/2/XL/3, PixArt, DiT)")
    group.add_argument("--prompt", default=None,
                       help=f"one prompt for every {images} (text-conditional models)"
                            + (" (default: none, the captions)" if captions else " (default: none)"))
    if captions:
        group.add_argument("--captions", default=None,
                           help="captions.jsonl ({'file_name', 'text'} lines) or captions.txt (file<TAB>caption) "
                                "naming every image by its path relative to --data (default: one found in --data)")
    group.add_argument("--class-labels", default=None,
                       help=f"DiT: comma-separated class ids cycled over the {images}s "
                            "(default: integer class-folder names, else random labels)")


def add_prompt_embeds_option(parser: argparse.ArgumentParser) -> None:
    """--prompt-embeds for the stages that condition on prompts (prune, finetune, sample), in the
    conditioning group when `add_conditioning_options` made one."""
    group = next((g for g in parser._action_groups if (g.title or "").startswith("conditioning")), parser)
    group.add_argument("--prompt-embeds", "--prompt_embeds", dest="prompt_embeds", default=None,
                        help="text-conditional models: a prompt-embeddings file (safetensors, made by `diffprune "
                             "encode-prompts` or diffprune.families.prompt_embeds.write_prompt_embeds) holding "
                             "every prompt the run uses and the empty prompt; the pipeline's text encoders are "
                             "then not loaded (a folder without them works) (default: none, encode with the "
                             "pipeline's text encoders)")


def add_portable_option(parser: argparse.ArgumentParser) -> None:
    """--portable for the stages that write a pipeline folder (prune, finetune, train); see portable.py."""
    parser.add_argument("--portable", action="store_true",
                        help="also write, into each pruned component folder, a small self-contained Python module "
                             "and the model_index.json / config.json auto_map entries diffusers needs, so the "
                             "folder loads where diffprune is not installed: DiffusionPipeline.from_pretrained("
                             "FOLDER, trust_remote_code=True) (default: off, a code-free folder; loading it then "
                             "needs diffprune)")


def variant_name(text: str) -> str:
    """A weights variant such as fp16 (the infix of diffusion_pytorch_model.fp16.safetensors)."""
    if not text or not text[0].isascii() or not text[0].isalpha() \
            or not all(c.isascii() and (c.isalnum() or c == "_") for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a weights variant name; allowed: a letter, then letters, "
                                         "digits and underscores, e.g. fp16")
    return text


def add_hub_options(parser: argparse.ArgumentParser) -> None:
    """--revision and --variant for the stages that load a model (dests `revision`, `variant`), passed
    as `io.load_pipeline(..., revision=args.revision, variant=args.variant)`."""
    group = parser.add_argument_group("hub ids and weight variants")
    group.add_argument("--revision", default=None,
                       help="for a hub id: the branch, tag or commit hash to download (ignored for a local folder) "
                            "(default: the repo's main branch)")
    group.add_argument("--variant", type=variant_name, default=None,
                       help="weights variant to load, e.g. fp16: each component reads its *.fp16.safetensors files "
                            "if it has them, else its plain ones; applies to local folders too, and a hub id then "
                            "downloads only those files (default: none, the plain *.safetensors files)")


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default: X)" to every option that has a real default and whose help does not state
    one already, "(default: off)" to flags. Required options and options whose default is None show
    none here: an option resolved later says in its own help what it resolves to (e.g. --ratio)."""
    for action in parser._actions:
        if (not action.option_strings or not action.help or action.help is argparse.SUPPRESS
                or "default" in action.help or action.required or action.default in (None, argparse.SUPPRESS)):
            continue
        if action.nargs == 0:
            if action.default is False:  # store_true: off unless given
                action.help += " (default: off)"
        else:
            action.help += " (default: %(default)s)"


DIGITS_MODEL = "a 1-channel pixel-space model (the embedded digits teacher or one pruned or trained from it)"


def _denoiser_config(model: str) -> dict | None:
    """The denoiser's config.json of a local model folder (pipeline or bare), None if not readable."""
    folder = Path(model)
    for sub in ("unet", "transformer", "."):
        path = folder / sub / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(config, dict):
            return config
    return None


def is_digits_model(model: str) -> bool:
    """Whether `model` is a local 1-channel pixel-space model folder, the one kind the built-in digits set fits."""
    config = _denoiser_config(model)
    return config is not None and config.get("in_channels") == 1 and not (Path(model) / "vae").exists()


def known_not_digits(model: str) -> bool:
    """True for a local model folder that is not 1-channel pixel-space and for a hub id (not read
    here); False for a digits-like folder and for a path that is no model folder (missing, a file, no
    config: loading it fails first, with its own message)."""
    path = Path(model)
    if not path.exists():
        return "/" in model and not model.startswith((".", "/", "~"))  # a hub id, e.g. google/ddpm-cifar10-32
    return path.is_dir() and _denoiser_config(model) is not None and not is_digits_model(model)


def data_or_digits(data: str | None, model: str) -> str:
    """--data as given; omitted, the built-in digits set unless `model` is known not to fit it (then one
    line saying what to pass)."""
    from ..errors import DiffpruneError

    if data is None and known_not_digits(model):
        raise DiffpruneError(f"--data is required for --model {model}: pass a folder of images (png/jpg/jpeg/webp) "
                             f"the model was trained on; only {DIGITS_MODEL} defaults to the built-in digits set")
    return "digits" if data is None else data
