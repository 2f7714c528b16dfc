"""Read a set of images for evaluation: a sample folder, an image folder or an `.npz` file.

A sample folder written by `diffprune sample` holds `000123.png` (global index, 6 digits),
`samples.npz` (`images`: uint8 NHWC sorted by index, `indices`) and `grid.png`. Each image keeps its
key (the global index, or the file stem for folders whose names are not numbers), so a teacher set
and a student set pair up by key, never by file order.

Image files are read by `diffprune.data.read_image`: sized from the header first, so a file over
`max_pixels` (default `data.MAX_IMAGE_PIXELS`) or Pillow's decompression-bomb limit is refused with
one line before it is decoded. 16-bit grayscale becomes 8-bit by rounding value / 257 (65535 -> 255);
modes without a known range (e.g. F floats) are refused.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data import find_images, read_image
from ..errors import DiffpruneError

logger = logging.getLogger(__name__)

SAMPLES_FILE = "samples.npz"
_INDEX_NAME = re.compile(r"^\d+$")


@dataclass
class ImageSet:
    """uint8 images (N, H, W, C) with one key per image (int index or str stem), sorted by key."""

    images: np.ndarray
    keys: list
    source: str
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    def describe(self) -> dict:
        h, w = self.size
        return {
            "path": self.source,
            "num_images": len(self),
            "height": h,
            "width": w,
            "channels": self.channels,
        }


def as_nhwc_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """Check/convert an image array to uint8 (N, H, W, C) with C in {1, 3}. NHW and NCHW accepted."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise DiffpruneError(
            f"{what}: images have dtype {a.dtype}; expected uint8 in [0, 255] "
            "(as written by `diffprune sample`)"
        )
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4:
        raise DiffpruneError(f"{what}: images have shape {a.shape}; expected (N, H, W, C) or (N, H, W)")
    if a.shape[-1] not in (1, 3, 4) and a.shape[1] in (1, 3, 4):
        a = a.transpose(0, 2, 3, 1)
    if a.shape[-1] == 4:
        a = a[..., :3]
    if a.shape[-1] not in (1, 3):
        raise DiffpruneError(f"{what}: images have {a.shape[-1]} channels; expected 1 (grayscale) or 3 (RGB)")
    return np.ascontiguousarray(a)


def load_image_set(path: str | Path, max_pixels: int | None = None) -> ImageSet:
    """Images from a folder (samples.npz if present, else image files) or an `.npz` file.

    In a folder, files named by a number (`000123.png`) are keyed by that number and other files
    (e.g. `grid.png`) are ignored; if no file name is a number, every image under the folder
    (recursively) is used, keyed by its relative path without suffix. Raises DiffpruneError for a
    missing path, no images, unreadable files, images over `max_pixels` pixels (default
    `data.MAX_IMAGE_PIXELS`), or images of different sizes (naming them).
    """
    p = Path(path)
    if not p.exists():
        raise DiffpruneError(
            f"image set {str(p)!r} does not exist; give a sample folder, an image "
            "folder or an .npz file with an 'images' array"
        )
    if p.is_file():
        if p.suffix.lower() != ".npz":
            raise DiffpruneError(
                f"image set {str(p)!r} is a file but not .npz; give a folder or an .npz file"
            )
        return _load_npz(p)
    if (p / SAMPLES_FILE).is_file():
        return _load_npz(p / SAMPLES_FILE, source=str(p))
    return _load_folder(p, max_pixels)


def _load_npz(file: Path, source: str | None = None) -> ImageSet:
    try:
        with np.load(file, allow_pickle=False) as data:
            if "images" not in data.files:
                raise DiffpruneError(
                    f"{file}: no 'images' array (found {sorted(data.files)}); "
                    "expected uint8 NHWC images under 'images'"
                )
            images = as_nhwc_uint8(data["images"], str(file))
            indices = data["indices"] if "indices" in data.files else np.arange(len(images))
    except (OSError, ValueError) as err:
        if isinstance(err, DiffpruneError):
            raise
        raise DiffpruneError(f"{file}: not a readable .npz file ({err})") from None
    indices = np.asarray(indices).reshape(-1)
    if len(indices) != len(images):
        raise DiffpruneError(f"{file}: {len(images)} images but {len(indices)} indices")
    keys = [int(i) for i in indices]
    if len(set(keys)) != len(keys):
        dup = sorted(k for k, c in Counter(keys).items() if c > 1)[:5]
        raise DiffpruneError(f"{file}: repeated indices {dup}; each image needs its own index")
    order = np.argsort(indices, kind="stable")
    return ImageSet(images[order], [keys[i] for i in order], source or str(file))


def _load_folder(folder: Path, max_pixels: int | None) -> ImageSet:
    files = find_images(folder)
    numbered = [f for f in files if f.parent == folder and _INDEX_NAME.match(f.stem)]
    if numbered:
        ignored = len(files) - len(numbered)
        if ignored:
            logger.info(
                "%s: using %d numbered images, ignoring %d other image files (e.g. grid.png)",
                folder,
                len(numbered),
                ignored,
            )
        keyed = sorted(((int(f.stem), f) for f in numbered), key=lambda kf: kf[0])
        dup = sorted(k for k, c in Counter(k for k, _ in keyed).items() if c > 1)
        if dup:
            raise DiffpruneError(f"{folder}: several files share index {dup[:5]} (e.g. 1.png and 0001.png)")
    else:
        keyed = [(str(f.relative_to(folder).with_suffix("")), f) for f in files]
    if not keyed:
        raise DiffpruneError(
            f"no images (.png, .jpg, .jpeg, .webp) and no {SAMPLES_FILE} found in {str(folder)!r}"
        )
    arrays, sizes, modes = [], Counter(), {}
    for _, f in keyed:
        arr = _as_uint8(*read_image(f, max_pixels=max_pixels))
        arrays.append(arr)
        sizes[arr.shape[:2]] += 1
        modes.setdefault(arr.shape[2], f.name)
    if len(sizes) > 1:
        examples = {}
        for (_, f), a in zip(keyed, arrays, strict=True):
            examples.setdefault(a.shape[:2], f.name)
        desc = ", ".join(f"{h}x{w} ({n} files, e.g. {examples[(h, w)]})" for (h, w), n in sizes.most_common())
        raise DiffpruneError(
            f"{folder}: images have different sizes: {desc}; all images of a set must have one size"
        )
    notes = []
    if len(modes) > 1:
        notes.append(
            f"{folder}: mixed grayscale and RGB files (e.g. {modes[1]} and {modes[3]}); "
            "grayscale files converted to RGB"
        )
        logger.warning(notes[-1])
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    return ImageSet(np.stack(arrays).astype(np.uint8), [k for k, _ in keyed], str(folder), notes)


def _as_uint8(array: np.ndarray, full: int) -> np.ndarray:
    """Pixels with full white `full` (255 or 65535) as uint8; 16-bit rounds value / 257 (257 * 255 = 65535)."""
    if full == 255:
        return array.astype(np.uint8, copy=False)
    return np.rint(array / (full / 255)).astype(np.uint8)


def pair_sets(a: ImageSet, b: ImageSet) -> tuple[np.ndarray, np.ndarray, list]:
    """The images of `a` and `b` aligned by key; refuses different key sets, sizes or channels.

    SSIM consistency (PAPER.md, "Evaluation protocol") compares image i of the teacher with image i
    of the student, both sampled from the same initial noise, so the sets must hold the same keys.
    """
    if a.keys != b.keys:
        ka, kb = set(a.keys), set(b.keys)
        only_a, only_b = sorted(ka - kb, key=str), sorted(kb - ka, key=str)
        if not only_a and not only_b:
            raise DiffpruneError(f"{a.source} and {b.source} hold the same keys in a different order")
        raise DiffpruneError(
            f"unpaired image sets: {a.source} has {len(a)} images, {b.source} has {len(b)}; "
            f"only in the first: {_few(only_a)}; only in the second: {_few(only_b)}. Sample both "
            "models with the same seed and indices (diffprune sample --seed ...)"
        )
    if a.size != b.size:
        raise DiffpruneError(
            f"image sizes differ: {a.source} is {a.size[0]}x{a.size[1]}, "
            f"{b.source} is {b.size[0]}x{b.size[1]}; paired metrics need one size"
        )
    if a.channels != b.channels:
        raise DiffpruneError(
            f"channel counts differ: {a.source} has {a.channels}, {b.source} has "
            f"{b.channels}; paired metrics need the same (1 = grayscale, 3 = RGB)"
        )
    return a.images, b.images, list(a.keys)


def _few(keys: list, n: int = 5) -> str:
    if not keys:
        return "none"
    shown = ", ".join(str(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)})"
