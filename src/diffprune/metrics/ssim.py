"""SSIM consistency between teacher and student samples, plus MSE and PSNR.

PAPER.md ("Evaluation protocol"): the pre-trained and the pruned model are sampled from the same
initial noise with deterministic DDIM; image i of one is compared with image i of the other and the
SSIM is averaged over pairs. Pairs are matched by index (the file name / `indices` of samples.npz),
never by file order.

SSIM is Wang et al., "Image Quality Assessment: From Error Visibility to Structural Similarity"
(IEEE TIP 2004), eq. 13 with C1 = (K1 L)^2, C2 = (K2 L)^2, computed here in the convention of the
paper's SSIM script (pytorch_msssim.ssim(x, y, data_range=1, size_average=False)):
- images in [0, 1], data range L = 1, K1 = 0.01, K2 = 0.03;
- local statistics from a normalised 11-tap Gaussian (sigma 1.5), applied separably (rows, then
  columns) with no padding, so the SSIM map covers only the 'valid' region (H-10) x (W-10);
- per image: the mean of the SSIM map over channels and pixels.
We compute it ourselves (float64) rather than through torchmetrics, whose result changed within our
pinned range (since 1.4.2 it no longer crops the reflect-padded border: up to 0.14 apart on 16x16).
Images smaller than the window are refused: pytorch_msssim would skip the blur along such a side
(with a warning), which is no longer an 11x11-window SSIM.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DiffpruneError
from .extractor_base import to_unit_nchw
from .imageset import ImageSet, pair_sets

SSIM_KERNEL = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
PSNR_CAP_DB = 100.0  # identical pairs have infinite PSNR; JSON has no infinity
SSIM_CONVENTION = {
    "reference": "pytorch_msssim.ssim(x, y, data_range=1, size_average=False) (the paper's SSIM script)",
    "window": "gaussian",
    "kernel_size": SSIM_KERNEL,
    "sigma": SSIM_SIGMA,
    "k1": SSIM_K1,
    "k2": SSIM_K2,
    "data_range": 1.0,
    "image_range": "[0, 1]",
    "filter": "separable, no padding ('valid' region)",
    "reduction": "mean over channels and pixels, per image",
    "min_size": SSIM_KERNEL,
    "implementation": "diffprune (float64)",
}
_MAX_ELEMENTS_PER_CHUNK = 1 << 22  # ~10 float64 maps of this size stay well under 1 GB


def gaussian_window(size: int = SSIM_KERNEL, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-d Gaussian taps at offsets -(size//2) .. size//2 (Wang et al. 2004), float64."""
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    return g / g.sum()


def _blur_valid(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W), no padding: (N, C, H-k+1, W-k+1)."""
    c, k = x.shape[1], window.numel()
    x = F.conv2d(x, window.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(x, window.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def ssim_unit(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of float NCHW images in [0, 1] (SSIM_CONVENTION); float64 (N,)."""
    x, y = x.double(), y.double()
    w = gaussian_window().to(x.device)
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # (K * data_range)^2 with data_range 1
    mu_x, mu_y = _blur_valid(x, w), _blur_valid(y, w)
    var_x = _blur_valid(x * x, w) - mu_x**2
    var_y = _blur_valid(y * y, w) - mu_y**2
    cov = _blur_valid(x * y, w) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def ssim_per_image(a, b) -> np.ndarray:
    """SSIM of a[i] vs b[i]; inputs uint8 NHWC (or float NCHW in [-1, 1]) of equal shape."""
    x, y = to_unit_nchw(a), to_unit_nchw(b)
    if x.shape != y.shape:
        raise DiffpruneError(f"paired images differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if min(x.shape[-2:]) < SSIM_KERNEL:
        raise DiffpruneError(
            f"images are {x.shape[-2]}x{x.shape[-1]}; SSIM with an {SSIM_KERNEL}x{SSIM_KERNEL} "
            f"window needs at least {SSIM_KERNEL}x{SSIM_KERNEL}"
        )
    chunk = max(1, _MAX_ELEMENTS_PER_CHUNK // max(1, x[0].numel()))
    out = [ssim_unit(x[i : i + chunk], y[i : i + chunk]) for i in range(0, x.shape[0], chunk)]
    if not out:
        return np.zeros((0,), dtype=np.float64)
    return torch.cat(out).numpy()


def mse_psnr_per_image(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Per-image MSE on [0, 1] images and PSNR = 10 log10(1 / MSE) dB (capped at PSNR_CAP_DB)."""
    x, y = to_unit_nchw(a).double(), to_unit_nchw(b).double()
    mse = ((x - y) ** 2).flatten(1).mean(1).numpy()
    with np.errstate(divide="ignore"):
        psnr = np.minimum(10 * np.log10(1.0 / np.maximum(mse, 0)), PSNR_CAP_DB)
    return mse, psnr


def consistency(teacher: ImageSet, student: ImageSet) -> dict:
    """SSIM/MSE/PSNR of student image i vs teacher image i; refuses unpaired or mismatched sets.

    Returns {"ssim": {"mean", "std", "min", "max", "per_image"}, "mse": {...}, "psnr_db": {...},
    "num_pairs", "indices", "ssim_convention", "settings"}; per-image lists follow `indices`.
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
        "ssim_convention": dict(SSIM_CONVENTION),
        "settings": {"image_range": "[0, 1]", "psnr_cap_db": PSNR_CAP_DB, "pairing": "by index"},
    }


__all__ = [
    "SSIM_CONVENTION",
    "consistency",
    "gaussian_window",
    "mse_psnr_per_image",
    "ssim_per_image",
    "ssim_unit",
]
