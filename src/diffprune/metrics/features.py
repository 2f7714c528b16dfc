"""Feature extractors for FID/KID by name: one interface (`extractor_base`), two networks.

- `digits-cnn-v1`: the embedded digits classifier (`metrics.digits_net`), 64-d penultimate features,
  16x16 grayscale input. Used for "digits-FID": only comparable with other digits-FID numbers.
- `inception-v3-pytorch-fid`: the FID InceptionV3 of pytorch-fid (`metrics.inception`), 2048-d pool3
  features, 299x299 RGB input. Comparable with published FIDs (Heusel et al. 2017; PAPER.md).

Every extractor takes uint8 images (N, H, W, C) in [0, 255] (numpy or torch) or float tensors
(N, C, H, W) in [-1, 1] (the DDPM range) and returns float64 features (N, dim). Inputs of another
size or channel count are converted (bilinear resize; gray <-> RGB) and the conversion is recorded
in `conversions` so the caller can report it.

Which of them may judge a given set of images (`--feature-net auto`) is `feature_choice`'s rule.

Import order, one way: `extractor_base` <- `digits_net`, `inception` <- this module (the registry);
`feature_choice` (numpy only) <- this module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import DiffpruneError
from .digits_net import DigitsFeatureExtractor
from .extractor_base import FeatureExtractor, dense_nchw, resize_bilinear, to_unit_nchw  # noqa: F401  (public here)
from .feature_choice import FEATURE_NETS
from .inception import InceptionFeatureExtractor


def get_feature_extractor(
    name: str,
    *,
    device: torch.device | str = "cpu",
    inception_weights: str | None = None,
    digits_weights: str | None = None,
    batch_size: int = 64,
    allow_download: bool = True,
) -> FeatureExtractor:
    """An extractor by CLI name: 'digits' (embedded digits CNN) or 'inception' (pytorch-fid InceptionV3)."""
    builders: dict[str, Callable[[], FeatureExtractor]] = {
        "digits": lambda: _digits(device, digits_weights, batch_size),
        "inception": lambda: _inception(device, inception_weights, batch_size, allow_download),
    }
    if name not in builders:
        raise DiffpruneError(f"feature net {name!r} is not allowed; allowed: {', '.join(FEATURE_NETS)}")
    return builders[name]()


def _digits(device, weights, batch_size):
    return DigitsFeatureExtractor(weights, device=device, batch_size=batch_size)


def _inception(device, weights, batch_size, allow_download):
    return InceptionFeatureExtractor(
        weights, device=device, batch_size=batch_size, allow_download=allow_download
    )
