"""Images in, tensors out: image folders and built-in datasets at a model's size and range.

Every dataset yields float tensors shaped (C, H, W) in [-1, 1], the DDPM input range, with the
channel count and square size the model expects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import DiffpruneError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
BUILTIN_DATASETS = ("digits",)
# Decoded images are kept in memory when the whole folder fits in this many bytes (float32): decoding
# a PNG batch on the training loop's critical path cost 20x reading it from memory (CIFAR size,
# benchmarks/finetune_throughput.py). 2 GiB holds CIFAR-10 (50k x 3x32x32 = 0.6 GiB) four times over.
CACHE_BYTES = 2 << 30


def find_images(folder: Path) -> list[Path]:
    """All image files under `folder`, recursively, in a stable sorted order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _to_model_range(array: np.ndarray, size: int, channels: int) -> torch.Tensor:
    """uint8 HxW or HxWxC array -> (channels, size, size) float tensor in [-1, 1]."""
    x = torch.from_numpy(np.asarray(array, dtype=np.float32) / 127.5 - 1.0)
    x = x.unsqueeze(-1) if x.ndim == 2 else x
    x = x.permute(2, 0, 1)
    return _fit(x, size, channels)


def _fit(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Convert a (C, H, W) tensor to `channels` and a square `size` (center crop, then resize)."""
    c, h, w = x.shape
    if c != channels:
        if channels == 1:
            x = x[:3].mean(0, keepdim=True) if c >= 3 else x[:1]
        else:
            x = x[:1].expand(channels, h, w) if c == 1 else x[:channels]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[:, top : top + side, left : left + side]
    if side != size:
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=side > size,
                          align_corners=False)[0]
    return x.clamp(-1, 1).contiguous()


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images found recursively under a folder; unreadable files are skipped and counted.

    Each image is decoded once and kept (per process) when the folder fits in `cache_bytes`;
    the cached tensor is exactly what decoding returns, so training is unchanged, only faster.
    """

    def __init__(self, folder: str | Path, size: int, channels: int, cache_bytes: int = CACHE_BYTES):
        folder = Path(folder)
        if not folder.is_dir():
            raise DiffpruneError(f"data folder {str(folder)!r} does not exist or is not a folder; "
                                 f"give an image folder or one of {BUILTIN_DATASETS}")
        candidates = find_images(folder)
        if not candidates:
            raise DiffpruneError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {str(folder)!r}")
        self.paths = [p for p in candidates if _readable(p)]
        self.skipped = len(candidates) - len(self.paths)
        if not self.paths:
            raise DiffpruneError(f"none of the {len(candidates)} image files under {str(folder)!r} "
                                 "could be read")
        self.size, self.channels = size, channels
        fits = len(self.paths) * channels * size * size * 4 <= cache_bytes
        self._cache: dict[int, torch.Tensor] | None = {} if fits else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._cache is not None and i in self._cache:
            return self._cache[i].clone()  # callers may write into the batch they get
        with Image.open(self.paths[i]) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            x = _to_model_range(np.array(im), self.size, self.channels)
        if self._cache is None:
            return x
        self._cache[i] = x
        return x.clone()


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return False


class TensorImageDataset(torch.utils.data.Dataset):
    """An in-memory (N, C, H, W) tensor in [-1, 1], for built-in datasets."""

    def __init__(self, images: torch.Tensor):
        self.images = images
        self.skipped = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def digits_images(size: int, channels: int, split: str = "all") -> torch.Tensor:
    """scikit-learn's 1797 handwritten digits (8x8, 0..16), upscaled to `size`, in [-1, 1].

    split: "all", "train" (first 80% in a fixed shuffled order) or "test" (the other 20%).
    """
    from sklearn.datasets import load_digits

    raw = load_digits().images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    order = np.random.default_rng(0).permutation(len(raw))
    cut = int(0.8 * len(raw))
    idx = {"all": np.arange(len(raw)), "train": order[:cut], "test": order[cut:]}.get(split)
    if idx is None:
        raise DiffpruneError(f"digits split={split!r} is not one of ('all', 'train', 'test')")
    x = torch.from_numpy(raw[np.sort(idx)])[:, None] * 2 - 1
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(-1, 1).expand(-1, channels, -1, -1).contiguous()


def digits_labels(split: str = "all") -> torch.Tensor:
    """Class labels aligned with `digits_images(split=...)`."""
    from sklearn.datasets import load_digits

    target = load_digits().target
    order = np.random.default_rng(0).permutation(len(target))
    cut = int(0.8 * len(target))
    idx = {"all": np.arange(len(target)), "train": order[:cut], "test": order[cut:]}[split]
    return torch.from_numpy(target[np.sort(idx)]).long()


def make_dataset(source: str | Path, size: int, channels: int) -> torch.utils.data.Dataset:
    """A dataset from an image folder or a built-in name (see BUILTIN_DATASETS)."""
    if str(source) in BUILTIN_DATASETS and not Path(source).exists():
        return TensorImageDataset(digits_images(size, channels))
    return ImageFolderDataset(source, size, channels)


def batch_indices(n: int, batch_size: int, seed: int) -> list[int]:
    """The dataset indices `first_batch` draws: a seeded permutation's first `batch_size`."""
    g = torch.Generator().manual_seed(seed)
    return [int(i) for i in torch.randperm(n, generator=g)[:batch_size]]


def first_batch(dataset: torch.utils.data.Dataset, batch_size: int, seed: int) -> torch.Tensor:
    """A reproducible random batch of `batch_size` images (fewer if the dataset is smaller)."""
    return torch.stack([dataset[i] for i in batch_indices(len(dataset), batch_size, seed)])
