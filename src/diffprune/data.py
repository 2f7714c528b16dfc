"""Images in, tensors out: image folders and built-in datasets at a model's size and range.

Every dataset yields float tensors shaped (C, H, W) in [-1, 1], the DDPM input range, with the
channel count and square size the model expects.

Image files are sized from their header before any pixel is decoded: an image over
`MAX_IMAGE_PIXELS` (64 Mi pixels, e.g. 8192x8192), or over Pillow's decompression-bomb limit, is
never decoded (skipped and counted in a data folder, refused by `read_image`). Pixel modes map to a
fixed range: 8-bit modes (1, L, LA, P, PA, RGB, RGBA, RGBX, RGBa, CMYK, YCbCr) to 0..255 through
Pillow's conversion to L or RGB (alpha dropped, as torchvision's `ImageFolder` does with
`convert("RGB")`); 16-bit grayscale (I;16, I;16L, I;16B, I;16N, and I holding values 0..65535) to
0..65535; anything else (F floats, LAB, HSV, ...) is refused with one line. An image at least
2 * REDUCING_GAP times the model's size is decoded reduced before it is converted to floats.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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
# Largest image (width x height) that is decoded at all. 64 Mi pixels decode to at most 256 MiB (Pillow
# keeps RGB in 4 bytes a pixel), so one file cannot make loading need gigabytes; override per call
# with `max_pixels`.
MAX_IMAGE_PIXELS = 1 << 26
# An image whose short side is at least 2 * REDUCING_GAP times the target size is first shrunk by an
# integer factor (JPEG DCT scaling via Image.draft, then Image.reduce's box average) to no less than
# REDUCING_GAP times the target, then resized as usual; the same idea as Pillow's
# `Image.thumbnail(reducing_gap=2.0)`. Smaller images skip this and resize exactly as before.
REDUCING_GAP = 2
# JPEG DCT scaling stops at DRAFT_GAP times the target. Measured on a 1700x2100 JPEG resized to 32:
# drafting down to 2x (1/8 scale: DC coefficients only) moved pixels by up to 0.037 (of the range 2)
# against full decoding; stopping at 8x and box-reducing the rest, by 0.008, as for PNG.
DRAFT_GAP = 8
_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_GRAY_MODES = ("1", "L", "LA", *_SIXTEEN_BIT_MODES)
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError)


def find_images(folder: Path) -> list[Path]:
    """All image files under `folder`, recursively, in a stable sorted order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@contextmanager
def open_image(path: Path, max_pixels: int | None = None) -> Iterator[Image.Image]:
    """`path` opened with only its header read; DiffpruneError (one line naming the file) when it is
    no image, holds a pixel mode without a fixed range, or is larger than `max_pixels`
    (default MAX_IMAGE_PIXELS) or Pillow's decompression-bomb limit."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings(), _content_errors(path, "cannot read image"):
            # Pillow warns from 89 Mpx on; our own limit below is the one that decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError:
        raise DiffpruneError(f"{path}: image over Pillow's decompression-bomb limit of "
                             f"{2 * Image.MAX_IMAGE_PIXELS} pixels; at most {limit} pixels are read") from None
    with im:
        w, h = im.size
        if w * h > limit:
            raise DiffpruneError(f"{path}: {w}x{h} image has {w * h} pixels, over the limit of {limit}; "
                                 "shrink it first")
        if im.mode not in _EIGHT_BIT_MODES + _SIXTEEN_BIT_MODES:
            raise DiffpruneError(f"{path}: pixel mode {im.mode!r} has no supported range; save it as "
                                 "8-bit gray/RGB(A)/palette or 16-bit grayscale")
        yield im


def read_image(path: Path, channels: int | None = None, min_side: int | None = None,
               max_pixels: int | None = None) -> tuple[np.ndarray, int]:
    """The pixels of `path` as an (H, W, channels) integer array and the value of full white.

    Full white is 255 for 8-bit modes and 65535 for 16-bit grayscale. channels: 1 or 3, or None
    for the file's own (1 for grayscale modes, 3 otherwise). min_side: the size the caller resizes
    to; an image at least 2 * REDUCING_GAP times larger is decoded reduced (see REDUCING_GAP).
    """
    with open_image(path, max_pixels) as im:
        channels = channels or (1 if im.mode in _GRAY_MODES else 3)
        if min_side:
            _draft(im, min_side)
        _load(im, path)
        im, full = _canonical(im, channels, path)
        if min_side:
            im = _reduce(im, min_side)
        array = np.array(im)
    array = array[..., None] if array.ndim == 2 else array
    if array.shape[2] != channels:  # 16-bit grayscale, which Pillow cannot convert to RGB losslessly
        array = np.repeat(array, channels, axis=2)
    return array, full


def _load(im: Image.Image, path: Path) -> None:
    """Decode `im`'s pixels; DiffpruneError naming `path` when its data is damaged."""
    with _content_errors(path, "cannot decode image"):
        im.load()


@contextmanager
def _content_errors(path: Path, what: str) -> Iterator[None]:
    """Pillow's errors about a file's content -> DiffpruneError "`path`: `what` (error)".

    OSErrors with an errno (missing file, permission, I/O) are the file system's, not the image's,
    and pass unchanged for the caller (or the CLI) to report as such.
    """
    try:
        yield
    except DiffpruneError:
        raise
    except _DECODE_ERRORS as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise
        said = str(err)  # UnidentifiedImageError's only repeats the path
        detail = f": {said}" if said and "\n" not in said and not isinstance(err, UnidentifiedImageError) else ""
        raise DiffpruneError(f"{path}: {what} ({type(err).__name__}{detail})") from None


def _canonical(im: Image.Image, channels: int, path: Path) -> tuple[Image.Image, int]:
    """`im` as 8-bit L/RGB (full white 255) or 16-bit values in mode I (full white 65535)."""
    if im.mode in _SIXTEEN_BIT_MODES:
        _check_sixteen_bit(im, path)
        return im.convert("I"), 65535  # value-preserving; I;16 has no reduce
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # same colors; converting straight from P warns about transparency
    mode = "L" if channels == 1 else "RGB"
    return (im if im.mode == mode else im.convert(mode)), 255  # convert() to its own mode would copy


def _check_sixteen_bit(im: Image.Image, path: Path) -> None:
    """Mode I holds 32-bit integers; only 0..65535 (a 16-bit file read as I) has a known full white."""
    if im.mode == "I":
        low, high = im.getextrema()
        if low < 0 or high > 65535:
            raise DiffpruneError(f"{path}: 32-bit integer pixels span {low}..{high}; only 16-bit values "
                                 "0..65535 have a known range")


def _draft(im: Image.Image, min_side: int) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale, keeping its short side >= DRAFT_GAP * min_side."""
    factor = min(im.size) // (DRAFT_GAP * min_side)
    if factor >= 2:
        w, h = im.size
        im.draft(im.mode, (-(-w // factor), -(-h // factor)))  # Pillow picks the largest scale <= factor


def _reduce(im: Image.Image, min_side: int) -> Image.Image:
    """The center square of `im` box-averaged by an integer factor that keeps its side
    >= REDUCING_GAP * min_side (`im` itself when no factor >= 2 does).

    The square is `_fit`'s center crop less `side % factor` pixels, so each reduced pixel averages
    exactly factor x factor pixels; the factor (between half the largest allowed and the largest)
    is the one leaving the fewest pixels out, so the resize after it sees nearly the same geometry.
    """
    w, h = im.size
    side = min(w, h)
    largest = side // (REDUCING_GAP * min_side)
    if largest < 2:
        return im
    factor = min(range(max(2, largest // 2), largest + 1), key=lambda f: (side % f, -f))
    side -= side % factor
    left, top = (w - side) // 2, (h - side) // 2
    return im.reduce(factor, box=(left, top, left + side, top + side))


def _to_model_range(array: np.ndarray, size: int, channels: int, full: int = 255) -> torch.Tensor:
    """Integer HxW or HxWxC array (0..`full`) -> (channels, size, size) float tensor in [-1, 1]."""
    x = torch.from_numpy(np.asarray(array, dtype=np.float32) / (full / 2) - 1.0)
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

    Unreadable: not an image, a damaged PNG (chunk CRCs) or JPEG (decoded at 1/8 scale), a pixel
    mode without a known range, or more than `max_pixels` (default MAX_IMAGE_PIXELS) pixels; checked
    without a full-size decode. `skip_reasons` holds one line per skipped file.
    Each image is decoded once and kept (per process) when the folder fits in `cache_bytes`;
    the cached tensor is exactly what decoding returns, so training is unchanged, only faster.
    """

    def __init__(self, folder: str | Path, size: int, channels: int, cache_bytes: int = CACHE_BYTES,
                 max_pixels: int | None = None):
        folder = Path(folder)
        if not folder.is_dir():
            raise DiffpruneError(f"data folder {str(folder)!r} does not exist or is not a folder; "
                                 f"give an image folder or one of {BUILTIN_DATASETS}")
        candidates = find_images(folder)
        if not candidates:
            raise DiffpruneError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {str(folder)!r}")
        self.max_pixels = max_pixels
        reasons = {p: _unreadable_reason(p, max_pixels) for p in candidates}
        self.paths = [p for p in candidates if reasons[p] is None]
        self.skip_reasons = [r for r in reasons.values() if r is not None]
        self.skipped = len(self.skip_reasons)
        if not self.paths:
            raise DiffpruneError(f"none of the {len(candidates)} image files under {str(folder)!r} "
                                 f"could be read (e.g. {self.skip_reasons[0]})")
        self.size, self.channels = size, channels
        fits = len(self.paths) * channels * size * size * 4 <= cache_bytes
        self._cache: dict[int, torch.Tensor] | None = {} if fits else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._cache is not None and i in self._cache:
            return self._cache[i].clone()  # callers may write into the batch they get
        array, full = read_image(self.paths[i], self.channels, self.size, self.max_pixels)
        x = _to_model_range(array, self.size, self.channels, full)
        if self._cache is None:
            return x
        self._cache[i] = x
        return x.clone()


def _unreadable_reason(path: Path, max_pixels: int | None) -> str | None:
    """Why `path` cannot be used (one line), or None; decodes no 8- or 16-bit image at full size."""
    try:
        with open_image(path, max_pixels) as im:
            if im.mode == "I":  # its range depends on the values
                _load(im, path)
                _check_sixteen_bit(im, path)
            elif im.format == "JPEG":
                im.draft(im.mode, (1, 1))  # 1/8 scale still reads every entropy-coded byte
                _load(im, path)
            else:
                with _content_errors(path, "damaged image"):
                    im.verify()  # PNG: the CRC of every chunk, nothing inflated; others: no-op
    except DiffpruneError as err:
        return str(err)
    except OSError as err:
        return f"{path}: {err.strerror or err}"
    return None


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
