"""The FID/KID reference of `evaluate`: built-in digits, an image set, or a statistics .npz.

Read before the feature network is chosen and built (`metrics.feature_choice`): the choice looks at
the reference images, and a statistics file must match the chosen network before it is loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DiffpruneError
from ..metrics.feature_choice import INCEPTION_EXTRACTOR

logger = logging.getLogger("diffprune.evaluate.stage")


def digits_reference(size: int, channels: int, split: str):
    """The built-in digits as an ImageSet at the samples' size and channel count."""
    from ..data import digits_images
    from ..metrics.imageset import ImageSet

    x = digits_images(size, channels, split)
    images = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return ImageSet(images, list(range(len(images))), f"digits ({split} split, {size}x{size}, {channels} ch)")


def is_stats_file(path: Path) -> bool:
    """An .npz with `mu` and `sigma` (written by --save-stats or pytorch-fid)."""
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            return "mu" in data.files and "sigma" in data.files
    except (OSError, ValueError):
        return False


def load_reference(config, samples, ref_is_stats: bool) -> tuple[Any, Any, dict[str, Any]]:
    """(statistics or None, ImageSet or None, the reference's description for the JSON)."""
    from ..metrics.fid import load_stats
    from ..metrics.imageset import load_image_set

    ref_path = Path(config.reference)
    if ref_is_stats:
        ref = load_stats(ref_path)
        return ref, None, {"kind": "statistics", "path": str(ref_path), "num_images": ref.num_images}
    if str(config.reference) == "digits" and not ref_path.exists():
        h, c = (samples.size[0], samples.channels) if samples is not None else (16, 1)
        images = digits_reference(h, c, config.reference_split)
        return None, images, {"kind": "builtin", "name": "digits", "split": config.reference_split,
                              **images.describe()}
    images = load_image_set(ref_path)
    return None, images, {"kind": "images", **images.describe()}


def check_stats_match(ref_path: Path, ref, net: str) -> None:
    """Refuse statistics of another extractor than `net` gives, before that network is built.

    Only the Inception name is fixed here; the digits net's name comes from its weights folder (a
    custom --digits-weights may name itself), so that case is checked once the net is built.
    """
    if (net == "inception") != (ref.feature_extractor == INCEPTION_EXTRACTOR):
        raise DiffpruneError(
            f"{ref_path} holds {ref.feature_extractor!r} statistics but --feature-net {net} does not give "
            "them; use the matching feature net"
        )


def compare_sets(samples, ref) -> list[str]:
    """Notes on channel or size differences between samples and reference (both are converted)."""
    notes = []
    if samples.channels != ref.channels:
        kind = {1: "grayscale", 3: "RGB"}
        notes.append(
            f"samples are {kind[samples.channels]} ({samples.channels} ch) but the reference is "
            f"{kind[ref.channels]} ({ref.channels} ch); both are converted to the feature net's input"
        )
    if samples.size != ref.size:
        notes.append(
            f"samples are {samples.size[0]}x{samples.size[1]} but the reference is "
            f"{ref.size[0]}x{ref.size[1]}; both are resized to the feature net's input"
        )
    for n in notes:
        logger.warning(n)
    return notes
