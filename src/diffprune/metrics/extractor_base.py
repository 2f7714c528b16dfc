"""The feature-extractor interface of FID/KID and its input conversions (no network of its own).

`FeatureExtractor` takes uint8 images (N, H, W, C) in [0, 255] (numpy or torch) or float tensors
(N, C, H, W) in [-1, 1] (the DDPM range) and returns float64 features (N, dim); gray <-> RGB
conversions are recorded in `conversions`. The networks (`digits_net`, `inception`) subclass it;
`features.get_feature_extractor` picks one by name. Imports nothing from the other metrics modules,
so every extractor can import it without a cycle.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DiffpruneError

logger = logging.getLogger("diffprune.metrics.features")


def dense_nchw(x: torch.Tensor) -> torch.Tensor:
    """`x` with row-major strides (what torch.stack gives), copied only when its strides differ.

    `.contiguous()` is not enough: a permuted 1-channel batch counts as contiguous while keeping a
    channels-last stride, and convolutions pick their kernel (and rounding) from the strides.
    """
    shape, strides, step = tuple(x.shape), [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    if x.stride() == tuple(reversed(strides)):
        return x
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    out.copy_(x)
    return out


def to_unit_nchw(images) -> torch.Tensor:
    """uint8 NHWC [0, 255] or float NCHW [-1, 1] -> float32 NCHW in [0, 1] with row-major strides.

    uint8 gives exactly the batch of pytorch-fid's ImagePathDataset (torchvision `to_tensor` per
    image: CHW, float32, / 255; then torch.stack): the same values in the same memory layout. The
    layout matters: a channels-last view makes the convolutions use other kernels, and FID features
    then differ from pytorch-fid's in the last digits.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise DiffpruneError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise DiffpruneError(
            f"images must be 4-d (uint8 NHWC or float NCHW), got shape {tuple(images.shape)}"
        )
    if images.dtype == torch.uint8:
        return dense_nchw(images.permute(0, 3, 1, 2).float()).div(255)
    if not images.is_floating_point():
        raise DiffpruneError(
            f"images have dtype {images.dtype}; expected uint8 NHWC or float NCHW in [-1, 1]"
        )
    return dense_nchw(((images.float() + 1) / 2).clamp(0, 1))


class FeatureExtractor:
    """Base: `name`, `dim`, `input_size` (H = W), `input_channels`; call returns float64 (N, dim)."""

    name: str = "base"
    dim: int = 0
    input_size: int = 0
    input_channels: int = 3

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 64):
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.conversions: list[str] = []

    def _note(self, msg: str) -> None:
        if msg not in self.conversions:
            self.conversions.append(msg)
            logger.warning(msg)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """float NCHW [0, 1] -> the network's input (size, channels, range). Override for the range."""
        n, c, h, w = x.shape
        if c != self.input_channels:
            if self.input_channels == 1:
                self._note(
                    f"{self.name}: RGB images converted to grayscale (channel mean) for the feature net"
                )
                x = x.mean(1, keepdim=True)
            else:
                self._note(
                    f"{self.name}: grayscale images converted to RGB (channel repeated) for the feature net"
                )
                x = x.expand(n, self.input_channels, h, w)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        x_all = to_unit_nchw(images)
        out = []
        for start in range(0, x_all.shape[0], self.batch_size):
            # e.g. the expanded gray -> RGB view: the net always gets a row-major batch
            x = dense_nchw(self.prepare(x_all[start : start + self.batch_size].to(self.device)))
            out.append(self.forward_features(x).double().cpu())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float64)
        return torch.cat(out).numpy()


def resize_bilinear(x: torch.Tensor, size: int, antialias: bool) -> torch.Tensor:
    """Square bilinear resize (align_corners=False); a no-op at the target size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
