"""FID and KID between two feature sets, and feature statistics files.

- FID (Heusel et al., NeurIPS 2017): the Frechet distance between Gaussians fitted to the features,
  d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}), with sample covariances (ddof=1) as in
  pytorch-fid. Tr((S1 S2)^{1/2}) is computed as the sum of sqrt(eigenvalues) of the symmetric PSD
  matrix S1^{1/2} S2 S1^{1/2} (same eigenvalues as S1 S2): algebraically identical to pytorch-fid's
  `scipy.linalg.sqrtm`, real by construction and robust for rank-deficient covariances (few samples).
- KID (Binkowski et al., "Demystifying MMD GANs", ICLR 2018): the unbiased MMD^2 estimate with the
  cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets; defaults as in
  torch-fidelity / torchmetrics (100 subsets of 1000, capped here at the smaller set's size); the
  std is over subsets (ddof=0, as torchmetrics).

We do not use torchmetrics' FID class: it probes custom extractors with 299x299 RGB dummy inputs and
keeps no statistics file; its `_compute_fid` is used in the tests as a cross-check instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DiffpruneError
from ..fsutil import atomic_write

logger = logging.getLogger(__name__)

MIN_IMAGES = 10  # below this, FID/KID are refused: the covariance of <10 points says nothing
STATS_FORMAT = "diffprune-fid-stats"
STATS_VERSION = 1
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
# The extractor behind a pytorch-fid statistics file (mu/sigma only); `inception.EXTRACTOR_NAME` is this name.
PYTORCH_FID_EXTRACTOR = "inception-v3-pytorch-fid"


@dataclass
class FeatureStats:
    """Mean and covariance of a feature set (+ the features, for KID), labelled with the extractor."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    feature_extractor: str
    features: np.ndarray | None = None
    source: str = ""

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def check_count(n: int, dim: int, what: str) -> list[str]:
    """Refuse n < MIN_IMAGES; warn (and return the warning) when n < dim + 1 (singular covariance)."""
    if n < MIN_IMAGES:
        raise DiffpruneError(
            f"{what} has {n} images; FID/KID need at least {MIN_IMAGES} (published FIDs use 50,000)"
        )
    if n <= dim:
        msg = (
            f"{what} has {n} images, fewer than the feature dimension {dim} + 1: the covariance is "
            "singular and FID is biased upwards; compare only FIDs computed from the same counts"
        )
        logger.warning(msg)
        return [msg]
    return []


def compute_stats(
    features: np.ndarray, feature_extractor: str, keep_features: bool = True, source: str = ""
) -> FeatureStats:
    """mu and sigma (np.cov, ddof=1, as pytorch-fid) of (N, dim) features."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise DiffpruneError(f"features of shape {f.shape}: need (N >= 2, dim)")
    return FeatureStats(
        f.mean(0),
        np.cov(f, rowvar=False),
        int(f.shape[0]),
        feature_extractor,
        f if keep_features else None,
        source,
    )


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise DiffpruneError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} "
            f"vs {s2.shape}; were they made with the same feature extractor?"
        )
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean), 0.0)


def _poly_kernel(a: np.ndarray, b: np.ndarray, degree: int, gamma: float | None, coef: float) -> np.ndarray:
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    return (a @ b.T * gamma + coef) ** degree


def _mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    m = k_xx.shape[0]
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2 * k_xy.sum() / m**2)


def kernel_inception_distance(
    f1: np.ndarray,
    f2: np.ndarray,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 0,
) -> dict:
    """KID (Binkowski et al. 2018): mean and std of unbiased MMD^2 over random subsets.

    `subset_size` is capped at the smaller set's size (the cap is reported). Returns
    {"mean", "std", "subsets", "subset_size"}.
    """
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if f1.shape[1:] != f2.shape[1:]:
        raise DiffpruneError(f"KID features differ in dimension: {f1.shape[1:]} vs {f2.shape[1:]}")
    size = min(int(subset_size), f1.shape[0], f2.shape[0])
    if size < 2:
        raise DiffpruneError(f"KID needs at least 2 images per set, got {f1.shape[0]} and {f2.shape[0]}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(subsets)):
        a = f1[rng.permutation(f1.shape[0])[:size]]
        b = f2[rng.permutation(f2.shape[0])[:size]]
        values.append(
            _mmd2_unbiased(
                _poly_kernel(a, a, degree, gamma, coef),
                _poly_kernel(a, b, degree, gamma, coef),
                _poly_kernel(b, b, degree, gamma, coef),
            )
        )
    v = np.asarray(values)
    return {"mean": float(v.mean()), "std": float(v.std()), "subsets": int(subsets), "subset_size": size}


def save_stats(path: str | Path, stats: FeatureStats, keep_features: bool = True) -> Path:
    """Write mu, sigma (float64), features (float32, for KID), extractor name and count to `.npz`, atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise DiffpruneError(f"--save-stats {str(path)!r} must end in .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "mu": stats.mu,
        "sigma": stats.sigma,
        "num_images": np.int64(stats.num_images),
        "feature_extractor": np.array(stats.feature_extractor),
        "format": np.array(STATS_FORMAT),
        "format_version": np.int64(STATS_VERSION),
    }
    if keep_features and stats.features is not None:
        arrays["features"] = stats.features.astype(np.float32)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a bare path
            np.savez(fh, **arrays)

    return atomic_write(path, write)


def load_stats(path: str | Path) -> FeatureStats:
    """Read a statistics `.npz` (ours, or pytorch-fid's with mu/sigma only: extractor assumed Inception)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            files = set(data.files)
            if not {"mu", "sigma"} <= files:
                raise DiffpruneError(
                    f"{path}: not a statistics file (needs 'mu' and 'sigma', found {sorted(files)})"
                )
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            if "feature_extractor" in files:
                extractor = str(data["feature_extractor"])
            else:
                extractor = PYTORCH_FID_EXTRACTOR
                logger.warning(
                    "%s has no feature_extractor field; assuming pytorch-fid Inception pool3", path
                )
            features = data["features"].astype(np.float64) if "features" in files else None
            n = (
                int(data["num_images"])
                if "num_images" in files
                else (len(features) if features is not None else 0)
            )
    except (OSError, ValueError) as err:
        if isinstance(err, DiffpruneError):
            raise
        raise DiffpruneError(f"{path}: not a readable statistics .npz ({err})") from None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise DiffpruneError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    return FeatureStats(mu, sigma, n, extractor, features, str(path))


__all__ = [
    "FeatureStats",
    "MIN_IMAGES",
    "check_count",
    "compute_stats",
    "frechet_distance",
    "kernel_inception_distance",
    "load_stats",
    "save_stats",
]
