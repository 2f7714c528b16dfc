"""SSIM consistency between teacher and student samples, plus MSE and PSNR.

PAPER.md ("Evaluation protocol"): the pre-trained and the pruned model are sampled from the same
initial noise with deterministic DDIM; image i of one is compared with image i of the other and the
SSIM is averaged over pairs. SSIM is Wang et al., "Image Quality Assessment: From Error Visibility
to Structural Similarity" (IEEE TIP 2004), with the usual settings: 11x11 Gaussian window, sigma 1.5,
K1 = 0.01, K2 = 0.03, data range 1 (images scaled to [0, 1]); RGB images average the channels.
Computed by torchmetrics' `structural_similarity_index_measure`. Pairs are matched by index (the
file name / `indices` of samples.npz), never by file order.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DiffpruneError
from .features import to_unit_nchw
from .imageset import ImageSet, pair_sets

SSIM_KERNEL = 11
SSIM_SIGMA = 1.5
PSNR_CAP_DB = 100.0  # identical pairs have infinite PSNR; JSON has no infinity


def ssim_per_image(a, b, batch_size: int = 256) -> np.ndarray:
    """SSIM of a[i] vs b[i]; inputs uint8 NHWC (or float NCHW in [-1, 1]) of equal shape."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = to_unit_nchw(a), to_unit_nchw(b)
    if x.shape != y.shape:
        raise DiffpruneError(f"paired images differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if min(x.shape[-2:]) < SSIM_KERNEL:
        raise DiffpruneError(
            f"images are {x.shape[-2]}x{x.shape[-1]}; SSIM with an {SSIM_KERNEL}x{SSIM_KERNEL} "
            f"window needs at least {SSIM_KERNEL}x{SSIM_KERNEL}"
        )
    out = []
    for i in range(0, x.shape[0], batch_size):
        out.append(
            structural_similarity_index_measure(
                x[i : i + batch_size].double(),
                y[i : i + batch_size].double(),
                gaussian_kernel=True,
                sigma=SSIM_SIGMA,
                kernel_size=SSIM_KERNEL,
                data_range=1.0,
                reduction="none",
            )
        )
    return torch.cat(out).numpy().astype(np.float64)


def mse_psnr_per_image(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Per-image MSE on [0, 1] images and PSNR = 10 log10(1 / MSE) dB (capped at PSNR_CAP_DB)."""
    x, y = to_unit_nchw(a).double(), to_unit_nchw(b).double()
    mse = ((x - y) ** 2).flatten(1).mean(1).numpy()
    with np.errstate(divide="ignore"):
        psnr = np.minimum(10 * np.log10(1.0 / np.maximum(mse, 0)), PSNR_CAP_DB)
    return mse, psnr


def consistency(teacher: ImageSet, student: ImageSet) -> dict:
    """SSIM/MSE/PSNR of student image i vs teacher image i; refuses unpaired or mismatched sets.

    Returns {"ssim": {"mean", "std", "min", "per_image"}, "mse": {...}, "psnr_db": {...},
    "num_pairs", "indices", "settings"}; per-image lists follow `indices`.
    """
    a, b, keys = pair_sets(teacher, student)
    ssim = ssim_per_image(a, b)
    mse, psnr = mse_psnr_per_image(a, b)

    def summary(v: np.ndarray) -> dict:
        return {
            "mean": float(v.mean()),
            "std": float(v.std()),
            "min": float(v.min()),
            "max": float(v.max()),
            "per_image": [float(x) for x in v],
        }

    return {
        "num_pairs": len(keys),
        "indices": keys,
        "ssim": summary(ssim),
        "mse": summary(mse),
        "psnr_db": summary(psnr),
        "settings": {
            "window": "gaussian",
            "kernel_size": SSIM_KERNEL,
            "sigma": SSIM_SIGMA,
            "k1": 0.01,
            "k2": 0.03,
            "data_range": 1.0,
            "image_range": "[0, 1]",
            "psnr_cap_db": PSNR_CAP_DB,
            "implementation": "torchmetrics",
            "pairing": "by index",
        },
    }


__all__ = ["consistency", "mse_psnr_per_image", "ssim_per_image"]
