"""Load a diffprune-pruned diffusers model without diffprune (written by `diffprune ... --portable`).

This file is copied verbatim into a pruned component folder (e.g. `unet/diffprune_pruned_model.py`)
next to `config.json` (the unchanged base config plus an `auto_map` entry), `pruning.json` (the
per-module widths) and `diffusion_pytorch_model.safetensors` (the pruned weights). With it,

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    AutoModel.from_pretrained(folder + "/unet", trust_remote_code=True)

load the pruned model with diffusers alone: the base architecture is built from config.json (on
PyTorch's meta device when accelerate is installed), the recorded widths are imposed, and the
safetensors weights are loaded strictly. The result equals `diffprune.load_pipeline(folder)` bit for bit.

It needs torch, diffusers and safetensors only, reads JSON and safetensors (never a pickle), and sets
only the size attributes listed in SHAPE_ATTRS. It is generated code: edit diffprune instead.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import shutil
from pathlib import Path

import torch
from diffusers import (
    DiTTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from safetensors.torch import load_file, save_file

PRUNING_FILE = "pruning.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = ("diffprune-pruning", 1)
MAX_INT = 2**31 - 1

# The attributes that define a module's size, by class name (the same table as diffprune.io.structure).
SHAPE_ATTRS: dict[str, tuple[str, ...]] = {
    "Conv2d": ("in_channels", "out_channels", "groups"),
    "Conv1d": ("in_channels", "out_channels", "groups"),
    "ConvTranspose2d": ("in_channels", "out_channels", "groups"),
    "Linear": ("in_features", "out_features"),
    "GroupNorm": ("num_groups", "num_channels"),
    "LayerNorm": ("normalized_shape",),
    "Attention": ("heads", "inner_dim", "inner_kv_dim", "scale", "query_dim", "out_dim"),
    "Upsample2D": ("channels", "out_channels"),
    "Downsample2D": ("channels", "out_channels"),
    "ResnetBlock2D": ("in_channels", "out_channels"),
    "Embedding": ("num_embeddings", "embedding_dim"),
    "Transformer2DModel": ("in_channels", "inner_dim", "out_channels"),
}


def _folder(path, subfolder, options: dict) -> Path:
    """A local folder holding the three files: `path[/subfolder]`, or their hub download."""
    folder = Path(path) / subfolder if subfolder else Path(path)
    if folder.is_dir():
        return folder
    from huggingface_hub import hf_hub_download

    hub = {k: options.get(k) for k in ("revision", "cache_dir", "token", "force_download", "proxies")
           if options.get(k) is not None}
    files = [hf_hub_download(str(path), name, subfolder=subfolder, local_files_only=bool(options.get(
        "local_files_only")), **hub) for name in (CONFIG_FILE, PRUNING_FILE, WEIGHTS_FILE)]
    return Path(files[0]).parent


def _read_json(path: Path) -> dict:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _valid(attr: str, value) -> bool:
    def size(v):
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_INT

    if attr == "normalized_shape":
        return isinstance(value, list) and len(value) > 0 and all(size(v) for v in value)
    if attr == "scale":
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return size(value)


def apply_widths(model: torch.nn.Module, structure: dict, shapes: dict, where: str) -> None:
    """Set the recorded size attributes and give every tensor the shape the weights file holds."""
    modules = dict(model.named_modules())
    for name, entry in structure.items():
        module = modules.get(name)
        if module is None or not isinstance(entry, dict) or entry.get("type") != type(module).__name__:
            raise ValueError(f"{where}: module {name!r} does not match the base architecture")
        allowed = SHAPE_ATTRS.get(type(module).__name__, ())
        for attr, value in entry.items():
            if attr == "type":
                continue
            if attr not in allowed or not _valid(attr, value):
                raise ValueError(f"{where}: {name!r} {attr}={value!r} is not allowed")
            setattr(module, attr, tuple(value) if attr == "normalized_shape" else value)
    for key in shapes:  # buffers built non-persistent that the file holds (a residual-pruned DiT's pos_embed)
        owner_name, _, leaf = key.rpartition(".")
        owner = modules.get(owner_name)
        if owner is not None and leaf in owner._non_persistent_buffers_set and owner._buffers.get(leaf) is not None:
            owner.register_buffer(leaf, owner._buffers[leaf], persistent=True)
    for key, tensor in list(model.state_dict(keep_vars=True).items()):
        if key in shapes and tuple(tensor.shape) != tuple(shapes[key]):
            owner_name, _, leaf = key.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            old = getattr(owner, leaf)
            new = torch.empty(tuple(shapes[key]), dtype=old.dtype, device=old.device)
            if isinstance(old, torch.nn.Parameter):
                setattr(owner, leaf, torch.nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                owner._buffers[leaf] = new


def _empty_weights():
    """accelerate's meta-device init (parameters only; buffers stay real), else a normal build."""
    try:
        return importlib.import_module("accelerate").init_empty_weights(include_buffers=False)
    except ImportError:
        return contextlib.nullcontext()


class PortablePrunedMixin:
    """from_pretrained / save_pretrained of a pruned model: base config + pruning.json + safetensors."""

    base_class: type = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, torch_dtype=None, **kwargs):
        folder = _folder(pretrained_model_name_or_path, subfolder, kwargs)
        info = _read_json(folder / PRUNING_FILE)
        if (info.get("format"), info.get("format_version")) != FORMAT or not isinstance(info.get("structure"), dict):
            raise ValueError(f"{folder / PRUNING_FILE}: not a {FORMAT[0]} version {FORMAT[1]} record")
        if info.get("base_class") != cls.base_class.__name__:
            raise ValueError(f"{folder / PRUNING_FILE}: base_class={info.get('base_class')!r}, "
                             f"{cls.__name__} needs {cls.base_class.__name__!r}")
        config = {k: v for k, v in _read_json(folder / CONFIG_FILE).items() if k != "auto_map"}
        state = load_file(str(folder / WEIGHTS_FILE))
        with _empty_weights():
            model = cls.from_config(config)
        apply_widths(model, info["structure"], {k: tuple(v.shape) for k, v in state.items()},
                     str(folder / PRUNING_FILE))
        dtype = torch_dtype or next(model.parameters()).dtype
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        model.pruning_info = {k: v for k, v in info.items() if k != "structure"}
        model.eval()
        return model.to(torch_dtype) if torch_dtype is not None else model

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write the same portable folder again (this file included), never a plain diffusers folder
        whose config would not describe the pruned widths."""
        import diffusers

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        here = Path(__file__)
        config = {k: v for k, v in dict(self.config).items() if not k.startswith("_")}
        config = {"_class_name": self.base_class.__name__, "_diffusers_version": diffusers.__version__,
                  **config, "auto_map": {"AutoModel": f"{here.stem}.{type(self).__name__}"}}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=list) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        structure = {}
        for name, module in self.named_modules():
            attrs = SHAPE_ATTRS.get(type(module).__name__, ())
            if attrs:
                entry = {"type": type(module).__name__}
                for attr in attrs:
                    value = getattr(module, attr, None)
                    value = list(value) if isinstance(value, tuple | torch.Size) else value
                    if isinstance(value, int | float | list) and not isinstance(value, bool):
                        entry[attr] = value
                structure[name] = entry
        (folder / PRUNING_FILE).write_text(json.dumps({**self.pruning_info, "structure": structure}, indent=2) + "\n")
        if here.resolve() != (folder / here.name).resolve():
            shutil.copyfile(here, folder / here.name)


class PrunedUNet2DModel(PortablePrunedMixin, UNet2DModel):
    base_class = UNet2DModel


class PrunedUNet2DConditionModel(PortablePrunedMixin, UNet2DConditionModel):
    base_class = UNet2DConditionModel


class PrunedDiTTransformer2DModel(PortablePrunedMixin, DiTTransformer2DModel):
    base_class = DiTTransformer2DModel


class PrunedPixArtTransformer2DModel(PortablePrunedMixin, PixArtTransformer2DModel):
    base_class = PixArtTransformer2DModel


class PrunedSD3Transformer2DModel(PortablePrunedMixin, SD3Transformer2DModel):
    base_class = SD3Transformer2DModel


# A pipeline saved with these classes names this file's module in model_index.json, as it was loaded.
for _cls in (PrunedUNet2DModel, PrunedUNet2DConditionModel, PrunedDiTTransformer2DModel, PrunedPixArtTransformer2DModel,
             PrunedSD3Transformer2DModel):
    _cls.__module__ = __name__.rpartition(".")[2]
