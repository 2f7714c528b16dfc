"""Which feature network may judge a set of images: `--feature-net auto|digits|inception` (issue 23).

The digits network (`digits_net`, "digits-cnn-v1") was trained on 1-channel 16x16 digits (sklearn's
8x8 digits upsampled). It takes any image, but only by converting it: RGB -> channel mean, other
sizes -> a bilinear resize to 16x16. Its features, and the "digits-FID" made from them, mean
something only for images it could have been trained on. So:

- `auto` (the default) picks `digits` only when every image set it will see (samples, reference) is
  grayscale (1 channel, or 3 channels that are equal in every pixel: nothing is lost by the channel
  mean) and at most `DIGITS_MAX_SIDE` (32) px on each side, i.e. at most a 2x shrink to the net's
  16x16 input; a statistics file of another extractor, RGB images or larger images are refused in
  one line naming `--feature-net inception` (pytorch-fid's InceptionV3, 299x299 RGB) before the
  network is built and before any output is written. `auto` never picks Inception by itself (it
  needs a 92 MB weights file that may have to be downloaded).
- `digits`, given explicitly, refuses colour images (RGB whose channels differ) the same way; larger
  grayscale images are scored, with a warning in the result.
- `inception` takes anything (grayscale is repeated to RGB, every size resized to 299x299).

numpy only: the choice is made from the decoded uint8 arrays, before any torch work.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import DiffpruneError

FEATURE_NETS = ("digits", "inception")
FEATURE_NET_CHOICES = ("auto", *FEATURE_NETS)
DIGITS_MAX_SIDE = 32  # the digits net's input is 16x16; at most a 2x shrink keeps a digit's strokes
DIGITS_EXTRACTOR = "digits-cnn-v1"
INCEPTION_EXTRACTOR = "inception-v3-pytorch-fid"
_USE_INCEPTION = "use --feature-net inception (pytorch-fid InceptionV3; weights via --inception-weights PATH)"


def is_grayscale(images: np.ndarray) -> bool:
    """True for uint8 NHWC images with 1 channel, or 3 channels equal in every pixel (gray saved as RGB)."""
    if images.shape[-1] == 1:
        return True
    return bool(np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 0], images[..., 2]))


def _describe(label: str, images: np.ndarray) -> str:
    h, w, c = images.shape[1:4]
    kind = "grayscale" if is_grayscale(images) else f"colour ({c}-channel RGB)"
    return f"{label} are {h}x{w} {kind} images"


def _digits_fits(images: np.ndarray) -> bool:
    return is_grayscale(images) and max(images.shape[1], images.shape[2]) <= DIGITS_MAX_SIDE


def choose_feature_net(
    requested: str, sets: Sequence[tuple[str, np.ndarray]], stats_extractor: str | None = None
) -> tuple[str, str, list[str]]:
    """(feature net, why it was chosen, warnings) for `requested` and the image sets it will judge.

    `sets`: (label, uint8 NHWC images) of every set features are computed for, e.g.
    ("--samples out/student", images). `stats_extractor`: the extractor named in a statistics file
    used as reference, if any. Raises a one-line DiffpruneError when the digits net does not fit.
    """
    if requested not in FEATURE_NET_CHOICES:
        raise DiffpruneError(f"--feature-net {requested!r} is not allowed; allowed: {', '.join(FEATURE_NET_CHOICES)}")
    if requested == "inception":
        return "inception", "given (--feature-net inception)", []
    if requested == "digits":
        warnings = []
        for label, images in sets:
            if not is_grayscale(images):
                raise DiffpruneError(
                    f"--feature-net digits: {_describe(label, images)}, but the digits network was trained on "
                    f"1-channel 16x16 digits and would see only their channel mean; {_USE_INCEPTION}"
                )
            if not _digits_fits(images):
                warnings.append(
                    f"--feature-net digits on {_describe(label, images)}: the digits network resizes them to "
                    f"16x16; its FID is meaningful only for digits-like images of at most "
                    f"{DIGITS_MAX_SIDE}x{DIGITS_MAX_SIDE} px"
                )
        return "digits", "given (--feature-net digits)", warnings
    if stats_extractor is not None and stats_extractor != DIGITS_EXTRACTOR:
        wanted = "inception" if stats_extractor == INCEPTION_EXTRACTOR else None
        hint = f"--feature-net {wanted}" if wanted else f"one of --feature-net {', '.join(FEATURE_NETS)}"
        raise DiffpruneError(
            f"--feature-net auto: the reference holds {stats_extractor!r} statistics, which --feature-net auto "
            f"never picks by itself; use the matching feature net: {hint}"
        )
    for label, images in sets:
        if not _digits_fits(images):
            also = "" if not is_grayscale(images) else ", or --feature-net digits to score them with the digits net"
            raise DiffpruneError(
                f"--feature-net auto: {_describe(label, images)}; auto picks the digits network only for "
                f"grayscale images of at most {DIGITS_MAX_SIDE}x{DIGITS_MAX_SIDE} px; {_USE_INCEPTION}{also}"
            )
    if sets:
        why = f"auto: grayscale images of at most {DIGITS_MAX_SIDE}x{DIGITS_MAX_SIDE} px"
    else:
        why = f"auto: the reference holds {DIGITS_EXTRACTOR} statistics"
    return "digits", why, []


__all__ = ["DIGITS_MAX_SIDE", "FEATURE_NETS", "FEATURE_NET_CHOICES", "choose_feature_net", "is_grayscale"]
