"""Weights files and memory, checked before a model is built (model_checks.py runs these per folder).

- weights (`*.safetensors` only): the floating tensors of one file share one dtype, and every value is
  finite; the header is read without loading the tensors.
- memory: the bytes a meta-built model will hold plus its weights file, against `DIFFPRUNE_MAX_MODEL_BYTES`
  if set, else the memory the system reports available (psutil, else /proc/meminfo `MemAvailable`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..errors import DiffpruneError
from .variants import variant_of

MEMORY_ENV = "DIFFPRUNE_MAX_MODEL_BYTES"

# safetensors dtype codes -> (bytes per element, floating point?)
_DTYPES = {"F64": (8, True), "F32": (4, True), "F16": (2, True), "BF16": (2, True), "F8_E4M3": (1, True),
           "F8_E5M2": (1, True), "I64": (8, False), "I32": (4, False), "I16": (2, False), "I8": (1, False),
           "U8": (1, False), "BOOL": (1, False)}


# --------------------------------------------------------------------------- weights files


def weights_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors files a loader reads: those of `variant` (x.fp16.safetensors, variants.py) when
    the folder has them, else those without a variant infix."""
    files = sorted(folder.glob("*.safetensors"))
    if variant is not None:
        chosen = [f for f in files if variant_of(f.name) == (True, variant)]
        if chosen:
            return chosen
    plain = [f for f in files if f.name.count(".") == 1]
    return plain or files


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (safetensors dtype code, shape)} from the file header, without reading data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise DiffpruneError(f"{path}: unreadable safetensors file ({str(err).splitlines()[0]})") from None


def check_one_float_dtype(path: Path, header: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Refuse a file whose floating tensors have more than one dtype."""
    first: dict[str, str] = {}
    for name, (code, _) in header.items():
        if _DTYPES.get(code, (0, True))[1]:
            first.setdefault(code, name)
    if len(first) > 1:
        (a, na), (b, nb) = list(first.items())[:2]
        raise DiffpruneError(f"{path}: tensor {na!r} is {a} but {nb!r} is {b}; allowed: one float dtype per "
                             "file (diffprune loads a model in one dtype and will not mix or silently round)")


def check_finite(path: Path) -> None:
    """Refuse a file holding NaN or infinite values, naming the first such tensor."""
    from safetensors import SafetensorError, safe_open

    bad = None
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)  # one tensor in memory at a time
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad = (name, tensor)
                    break
    except (SafetensorError, OSError) as err:
        raise DiffpruneError(f"{path}: unreadable safetensors file ({str(err).splitlines()[0]})") from None
    if bad is not None:
        name, tensor = bad
        count = int((~torch.isfinite(tensor)).sum())
        raise DiffpruneError(f"{path}: tensor {name!r} holds {count} NaN/infinite value(s) of "
                             f"{tensor.numel()}; allowed: finite weights only")


# --------------------------------------------------------------------------- memory


def model_bytes(model: torch.nn.Module, dtype: torch.dtype | None,
                file_shapes: dict[str, tuple[int, ...]] | None = None) -> int:
    """Bytes `model` holds once loaded in `dtype` (floating tensors; others keep theirs).

    `file_shapes` (a pruned folder) replaces the base shapes of the tensors the file holds.
    """
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    persistent = model.state_dict(keep_vars=True)
    total = 0
    for key, tensor in state.items():
        numel = tensor.numel()
        if file_shapes is not None and key in persistent and key in file_shapes:
            numel = math.prod(file_shapes[key])
        total += numel * (dtype.itemsize if dtype is not None and tensor.is_floating_point() else tensor.itemsize)
    return total


def largest_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of `model`'s largest parameter as built (its config's dtype). Loading a pruned folder builds
    the base architecture with accelerate's `init_empty_weights`, which allocates each base-width
    parameter before moving it to the meta device: an absurd base config costs that much at once."""
    return max((p.numel() * p.element_size() for p in model.parameters()), default=0)


def memory_limit() -> tuple[int | None, str]:
    """(bytes a model may need, where that number comes from); None when it cannot be known."""
    text = os.environ.get(MEMORY_ENV, "").strip()
    if text:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise DiffpruneError(f"{MEMORY_ENV}={text!r} is not allowed; allowed: a number of bytes >= 1")
        return value, f"{MEMORY_ENV}={value}"
    try:
        import psutil

        return int(psutil.virtual_memory().available), "available memory"
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available memory (MemAvailable)"
    except (OSError, ValueError, IndexError):
        pass
    return None, "unknown"


def check_memory(needs: dict[Path, int], where: Path) -> None:
    """Refuse when the model(s) described by the configs in `needs` would not fit in memory."""
    limit, source = memory_limit()
    total = sum(needs.values())
    if limit is None or total <= limit:
        return
    largest = max(needs, key=needs.get)
    parts = ", ".join(f"{p.parent.name or p}: {_size(n)}" for p, n in needs.items())
    raise DiffpruneError(f"{largest}: loading {where} needs about {_size(total)} ({parts}) but the limit is "
                         f"{_size(limit)} ({source}); allowed: models that fit (free memory or set {MEMORY_ENV})")


def _size(n: int) -> str:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"
