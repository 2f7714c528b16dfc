"""The files of a pruned component folder, read with checks, and where a model name resolves to.

A pruned component folder (pipeline.py writes it): the unchanged base `config.json`, the pruned tensors in
`diffusion_pytorch_model.safetensors`, and `pruning.json` (format, base class, per-module widths).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import DiffpruneError
from ..fsutil import read_json
from .weight_checks import check_one_float_dtype, read_header

PRUNING_FILE = "pruning.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_NAME = "diffprune-pruning"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "base_class", "structure")


# --------------------------------------------------------------------------- reading files


def read_pruning_info(folder: Path) -> dict[str, Any]:
    path = folder / PRUNING_FILE
    if not path.is_file():
        raise DiffpruneError(f"{path}: missing; this is not a diffprune pruned model folder")
    info = read_json(path, "pruning file")
    missing = [k for k in REQUIRED_KEYS if k not in info]
    if missing:
        raise DiffpruneError(f"{path}: missing keys {missing}")
    if info["format"] != FORMAT_NAME or info["format_version"] != FORMAT_VERSION:
        raise DiffpruneError(f"{path}: format {info['format']!r} version {info['format_version']!r} "
                             f"is not supported; this diffprune reads {FORMAT_NAME!r} version {FORMAT_VERSION}")
    if not isinstance(info["structure"], dict):
        raise DiffpruneError(f"{path}: 'structure' must be an object of module entries")
    return info


def read_config(folder: Path) -> dict[str, Any]:
    """The base config; a portable folder's `auto_map` (portable.py) is for diffusers only, not a setting."""
    config = read_json(folder / CONFIG_FILE, "model config")
    config.pop("auto_map", None)
    return config


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of `folder`'s safetensors file; a file mixing float dtypes is refused."""
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise DiffpruneError(f"{path}: missing weights file (only safetensors are read, never pickles)")
    check_one_float_dtype(path, read_header(path))
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise DiffpruneError(f"{path}: unreadable safetensors file ({err})") from None


# --------------------------------------------------------------------------- resolving models

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_folder(name_or_path: str | Path, subfolder: str | None = None,
                   revision: str | None = None) -> Path:
    """A local folder for a path or a hub id (downloaded when online)."""
    path = Path(name_or_path)
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise DiffpruneError(f"model folder {str(folder)!r} does not exist")
        return folder
    if path.exists():
        raise DiffpruneError(f"model {str(name_or_path)!r} is a file; give a diffusers folder or a hub id")
    if not _HUB_ID.match(str(name_or_path)) or str(name_or_path).startswith((".", "/", "~")):
        raise DiffpruneError(f"model path {str(name_or_path)!r} does not exist; give a diffusers folder "
                             "or a hub id such as 'google/ddpm-cifar10-32'")
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(str(name_or_path), revision=revision,
                                 allow_patterns=[f"{subfolder}/*"] if subfolder else None)
    except Exception as err:  # noqa: BLE001 - network and hub errors come in many types
        raise DiffpruneError(f"model {str(name_or_path)!r} is not a local folder and could not be "
                             f"fetched from the hub ({type(err).__name__}); check the id or go online") from None
    return Path(root) / subfolder if subfolder else Path(root)
