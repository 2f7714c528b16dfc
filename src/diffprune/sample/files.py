"""Sample folder files: one PNG per global index, samples.npz, grid.png (written atomically, read back checked).

Layout (written by `sampling.sample_to_folder`): `000000.png`, ... (global index, 6 digits),
`samples.npz` (`images`: uint8 NHWC sorted by index, `indices`), `grid.png`, `sample_config.json`.
"""

from __future__ import annotations

import io as _io
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DiffpruneError
from ..fsutil import atomic_write

NPZ_FILE = "samples.npz"
GRID_FILE = "grid.png"


def png_name(index: int) -> str:
    return f"{index:06d}.png"


def write_png_atomic(path: Path, image: np.ndarray) -> None:
    """One HWC uint8 image as PNG via temp file + rename (a reader never sees half a PNG)."""
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def read_png(path: Path, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """One PNG as HWC uint8; a damaged file or one of another shape -> DiffpruneError naming it."""
    try:
        with Image.open(path) as im:
            a = np.array(im)
    except (OSError, ValueError, SyntaxError) as err:  # PIL.UnidentifiedImageError is an OSError
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DiffpruneError(f"{path}: not a readable PNG ({why}); "
                             "delete it and rerun with --resume to regenerate it") from None
    a = a[..., None] if a.ndim == 2 else a
    if a.ndim != 3 or a.dtype != np.uint8:
        raise DiffpruneError(f"{path}: is not an 8-bit image (shape {a.shape}, {a.dtype}); "
                             "delete it and rerun with --resume")
    if a.shape[-1] != channels:
        raise DiffpruneError(f"{path}: has {a.shape[-1]} channels, expected {channels}; "
                             "the folder holds images from another model")
    if size is not None and tuple(a.shape[:2]) != tuple(size):
        raise DiffpruneError(f"{path}: is {a.shape[0]}x{a.shape[1]} pixels, expected {size[0]}x{size[1]}; "
                             "delete it and rerun with --resume")
    return a


def write_npz_atomic(path: Path, **arrays) -> None:
    buf = _io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


def load_samples(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 NHWC, indices) from a finished sample folder's samples.npz."""
    path = Path(folder) / NPZ_FILE
    if not path.is_file():
        raise DiffpruneError(f"{path}: missing; is {str(folder)!r} a finished sample folder?")
    with np.load(path, allow_pickle=False) as data:
        return data["images"], data["indices"]
