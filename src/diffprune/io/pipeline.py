"""Save and load pruned pipelines without pickles: safetensors for weights, JSON for structure.

A pruned component folder holds the *unchanged* base `config.json`, the pruned tensors in
`diffusion_pytorch_model.safetensors`, and `pruning.json` (format version, base model, method,
kept timesteps, per-module widths, library versions). Loading = build the base architecture from
the config on the meta device (no memory), impose the recorded widths (`structure.apply_structure`),
strict safetensors load of the stored tensors: the result is bit-identical to the model that was
saved, and loading never holds the unpruned model.

Every folder is checked before anything is built (`model_checks`): model_index.json entries,
config values and the memory they need, float dtypes and finite values of the weights.

The classes below are registered under the `diffprune` library name in `model_index.json`, so
`DiffusionPipeline.from_pretrained(folder)` also works once `import diffprune` has run (diffusers
0.42 only resolves libraries that are already imported, for safety). A `--portable` folder
(portable.py) also ships a module for plain diffusers (`trust_remote_code=True`); diffprune never runs it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DiTTransformer2DModel,
    ModelMixin,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from safetensors.torch import save_file

from ..errors import DiffpruneError
from ..fsutil import read_json, write_json_atomic
from .config_keys import accepted_config, quiet_ignored_config_keys
from .folder_files import (  # noqa: F401  (the file names and format: public here too)
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    PRUNING_FILE,
    REQUIRED_KEYS,
    WEIGHTS_FILE,
    check_depth_record,
    read_config,
    read_pruning_info,
    read_weights,
    resolve_folder,
    weights_name,
)
from .model_checks import (
    check_models,
    check_pipeline_folder,
    check_scheduler_folder,
    read_model_index,
    register_pruned_classes,
)
from .pretrained_options import check_fits_one_file, check_load_options, check_save_options, loading_info
from .structure import apply_structure, record_structure, restore_saved_buffers
from .variants import check_variant, copy_component, loaded_variant
from .weight_checks import weights_files

logger = logging.getLogger(__name__)

TEXT_PARTS = ("text_encoder", "tokenizer")  # components `load_pipeline(text_encoders=False)` leaves out
# diffusers finds a component's load method by looking its base classes up in the component's own
# module (`model_index.json` names `diffprune.io`), so ModelMixin must be reachable from here.
__all__ = ["ModelMixin", "PrunedDiTTransformer2DModel", "PrunedPixArtTransformer2DModel",
           "PrunedSD3Transformer2DModel", "PrunedUNet2DConditionModel", "PrunedUNet2DModel", "load_pipeline",
           "load_unet", "save_pipeline"]


def library_versions() -> dict[str, str]:
    import diffusers
    import torch_pruning

    from .. import __version__

    return {"diffprune": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "torch_pruning": torch_pruning.__version__}


class PrunedModelMixin:
    """Save/load for a pruned diffusers model. Mixed into a subclass of the base model class."""

    base_class: type = None  # the diffusers class this pruned class extends
    pruning_info: dict[str, Any]

    def save_pretrained(self, save_directory: str | Path, is_main_process: bool = True,
                        variant: str | None = None, max_shard_size: int | str | None = None, **kwargs) -> None:
        """Write config.json (base config), the weights (one safetensors file, named for `variant`:
        diffusion_pytorch_model.fp16.safetensors) and pruning.json. diffusers' other options are checked
        (pretrained_options.py): pickles, shards the weights do not fit in, a hub upload are refused."""
        variant = check_save_options(variant, max_shard_size, kwargs)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        check_fits_one_file(max_shard_size, sum(v.numel() * v.element_size() for v in state.values()))
        if not is_main_process:
            return
        import diffusers

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in dict(self.config).items() if not k.startswith("_")}
        config = {"_class_name": self.base_class.__name__, "_diffusers_version": diffusers.__version__, **config}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=list) + "\n")
        save_file(state, str(folder / weights_name(variant)), metadata={"format": "pt"})
        info = {**self.pruning_info, "structure": record_structure(self)}
        (folder / PRUNING_FILE).write_text(json.dumps(info, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, revision: str | None = None,
                        variant: str | None = None, **kwargs):
        """Rebuild from config + pruning.json, then load the safetensors strictly: the `variant` file
        (x.fp16.safetensors) if the folder has it, else the plain one. diffusers' other options are
        checked (pretrained_options.py): `dtype`, `device_map` (one device) and `output_loading_info`
        are honoured, options a strict one-file load cannot honour (pickles, offloading) refused."""
        torch_dtype, rest = check_load_options(torch_dtype, kwargs)
        folder = resolve_folder(pretrained_model_name_or_path, subfolder, revision, variant)
        info = read_pruning_info(folder)
        expected = cls.base_class.__name__
        if info["base_class"] != expected:
            raise DiffpruneError(f"{folder / PRUNING_FILE}: base_class={info['base_class']!r}, "
                                 f"but {cls.__name__} needs {expected!r}")
        config = read_config(folder)
        check_depth_record(info, config, str(folder / PRUNING_FILE))
        model = build_pruned(cls, config, info, read_weights(folder, variant), torch_dtype,
                             where=str(folder / PRUNING_FILE))
        if rest.get("device_map") is not None:
            model = model.to(rest["device_map"])
        return (model, loading_info()) if rest.get("output_loading_info") else model


def build_pruned(cls: type, config: dict, info: dict, state: dict[str, torch.Tensor],
                 torch_dtype: torch.dtype | None = None, where: str = PRUNING_FILE):
    """A `cls` instance with the structure in `info` and exactly the tensors in `state`.

    Parameters are built on the meta device and then take the tensors of `state` (`assign=True`),
    so the unpruned base is never allocated. dtype: floating tensors are cast to `torch_dtype`, else
    to the dtype the config builds (float32); `read_weights` refuses files that mix float dtypes.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # buffers outside the file (e.g. DiT pos_embed) stay real
        model = cls.from_config(accepted_config(cls, config))  # without keys an older diffusers wrote
    restore_saved_buffers(model, state, where)
    method = info.get("method")
    prune_heads = method.get("prune_heads") if isinstance(method, dict) else None
    apply_structure(model, info["structure"], {k: tuple(v.shape) for k, v in state.items()}, where,
                    prune_heads if isinstance(prune_heads, bool) else None)
    dtype = torch_dtype or next(model.parameters()).dtype
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise DiffpruneError(f"{where}: weights do not match the recorded structure: "
                             f"{first[1].strip() if len(first) > 1 else first[0]}") from None
    model.pruning_info = {k: v for k, v in info.items() if k != "structure"}
    model.eval()
    return model.to(torch_dtype) if torch_dtype is not None else model


class PrunedUNet2DModel(PrunedModelMixin, UNet2DModel):
    """A `UNet2DModel` whose layers have pruned widths (see module docstring)."""

    base_class = UNet2DModel


class PrunedUNet2DConditionModel(PrunedModelMixin, UNet2DConditionModel):
    """A `UNet2DConditionModel` (Stable Diffusion) whose layers have pruned widths."""

    base_class = UNet2DConditionModel


class PrunedDiTTransformer2DModel(PrunedModelMixin, DiTTransformer2DModel):
    """A `DiTTransformer2DModel` whose heads / MLP widths are pruned."""

    base_class = DiTTransformer2DModel


class PrunedPixArtTransformer2DModel(PrunedModelMixin, PixArtTransformer2DModel):
    """A `PixArtTransformer2DModel` (PixArt-alpha / sigma) whose heads / MLP / conditioning widths are pruned."""

    base_class = PixArtTransformer2DModel


class PrunedSD3Transformer2DModel(PrunedModelMixin, SD3Transformer2DModel):
    """An `SD3Transformer2DModel` (Stable Diffusion 3 / 3.5) whose heads / MLP / conditioning widths are pruned."""

    base_class = SD3Transformer2DModel


PRUNED_CLASSES: dict[type, type] = {UNet2DModel: PrunedUNet2DModel,
                                    UNet2DConditionModel: PrunedUNet2DConditionModel,
                                    DiTTransformer2DModel: PrunedDiTTransformer2DModel,
                                    PixArtTransformer2DModel: PrunedPixArtTransformer2DModel,
                                    SD3Transformer2DModel: PrunedSD3Transformer2DModel}
# model_index.json records a component's library as its class's module: keep it the public
# `diffprune.io` (which re-exports these classes and ModelMixin), as in folders saved before io/.
for _cls in PRUNED_CLASSES.values():
    _cls.__module__ = "diffprune.io"
del _cls
register_pruned_classes({"ModelMixin": ModelMixin, **{c.__name__: c for c in PRUNED_CLASSES.values()}})


def pruned_class_for(model: torch.nn.Module) -> type:
    for base, pruned in PRUNED_CLASSES.items():
        if isinstance(model, base):
            return pruned
    raise DiffpruneError(f"model family {type(model).__name__!r} cannot be saved as pruned yet; "
                         f"supported: {[c.__name__ for c in PRUNED_CLASSES]}")


def to_pruned(model: torch.nn.Module, info: dict[str, Any]):
    """Re-home a pruned model in its Pruned* class via the same path loading uses.

    Building it this way at prune time proves the recorded structure reproduces the model.
    """
    cls = pruned_class_for(model)
    base_config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    full = {**info, "structure": record_structure(model)}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = build_pruned(cls, base_config, full, state, where="pruned model")
    return out.to(next(model.parameters()).device)


def load_unet(name_or_path: str | Path, subfolder: str | None = None,
              torch_dtype: torch.dtype | None = None, revision: str | None = None,
              variant: str | None = None) -> torch.nn.Module:
    """Load a denoiser folder: pruned (pruning.json present) or a plain diffusers model.

    The folder is checked first (`model_checks.check_models`): config values, memory, weights.
    `revision`: a hub id's branch, tag or commit. `variant` (e.g. "fp16"): read x.fp16.safetensors
    where the folder has them, else the plain files (a hub id downloads only those: folder_files.py).
    """
    variant = check_variant(variant)
    folder = resolve_folder(name_or_path, subfolder, revision, variant)
    config = read_config(folder)
    class_name = config.get("_class_name")
    base = next((b for b in PRUNED_CLASSES if b.__name__ == class_name), None)
    if base is None:
        supported = [b.__name__ for b in PRUNED_CLASSES]
        raise DiffpruneError(f"model family {class_name!r} in {folder / CONFIG_FILE} is not supported yet; "
                             f"supported: {supported}")
    pruned = (folder / PRUNING_FILE).exists()
    variant = loaded_variant([folder], variant)
    if pruned or weights_files(folder, variant):
        check_models({folder: (base, pruned)}, torch_dtype, folder, variant)
    if pruned:
        return PRUNED_CLASSES[base].from_pretrained(folder, torch_dtype=torch_dtype, variant=variant)
    if not weights_files(folder, variant):
        raise DiffpruneError(f"{folder}: no {WEIGHTS_FILE}; diffprune reads safetensors weights only")
    try:
        with quiet_ignored_config_keys():
            return base.from_pretrained(folder, torch_dtype=torch_dtype, use_safetensors=True, variant=variant)
    except (OSError, ValueError, RuntimeError) as err:
        raise DiffpruneError(f"{folder}: could not load {class_name} ({str(err).splitlines()[0]})") from None


def load_pipeline(name_or_path: str | Path, device: str | torch.device = "cpu",
                  torch_dtype: torch.dtype | None = None, revision: str | None = None,
                  text_encoders: bool = True, variant: str | None = None) -> DiffusionPipeline:
    """A pipeline from a pipeline folder, a bare model folder, or a hub id.

    A bare UNet folder gets its `scheduler_config.json` if present (beside it or in ../scheduler),
    else diffusers' default DDPMScheduler (1000 linear steps), with a warning.
    `text_encoders=False` (prompts from a prompt-embeddings file): the text encoders and tokenizers
    are neither checked nor loaded (None); `save_pipeline` copies their folders back (variants.py).
    `revision`: a hub id's branch, tag or commit. `variant` (e.g. "fp16"): each component reads its
    x.fp16.safetensors if it has them, else its plain files (a hub id downloads only those files).
    """
    variant = check_variant(variant)
    folder = resolve_folder(name_or_path, revision=revision, variant=variant)
    if (folder / "model_index.json").is_file() and not _flat_layout(folder):
        pipe = _from_pipeline_folder(folder, torch_dtype, text_encoders, variant)
    elif (folder / CONFIG_FILE).is_file():
        unet = load_unet(folder, torch_dtype=torch_dtype, variant=variant)
        pipe = DDPMPipeline(unet=unet, scheduler=_scheduler_near(folder))
    else:
        raise DiffpruneError(f"{str(folder)!r} holds neither model_index.json (a pipeline) nor "
                             "config.json (a model); give a diffusers folder or hub id")
    return pipe.to(device)


def _flat_layout(folder: Path) -> bool:
    """A pipeline whose model and scheduler configs sit in the root, no unet/ or transformer/ folder
    (google/ddpm-cifar10-32 and its siblings): loaded like a bare model folder."""
    return (folder / CONFIG_FILE).is_file() and not any((folder / c).is_dir() for c in ("unet", "transformer"))


def _from_pipeline_folder(folder: Path, torch_dtype, text_encoders: bool = True,
                          variant: str | None = None) -> DiffusionPipeline:
    classes = read_model_index(folder)
    unloaded = [] if text_encoders else [n for n, c in classes.items() if c is not None and n.startswith(TEXT_PARTS)]
    classes = {n: None if n in unloaded else c for n, c in classes.items()}
    has_safetensors = any(folder.glob("*/*.safetensors"))
    if not has_safetensors:
        raise DiffpruneError(f"{folder}: no safetensors weights found; diffprune never loads pickled "
                             "(.bin/.pt) checkpoints. Convert with save_pretrained(safe_serialization=True)")
    for component, cls in classes.items():
        if cls is not None and (folder / component / PRUNING_FILE).exists() and not issubclass(cls, PrunedModelMixin):
            raise DiffpruneError(f"{folder / 'model_index.json'}: {component} has pruning.json but is "
                                 f"declared as {cls.__name__}; expected ['diffprune.io' or "
                                 "'diffprune_pruned_model' (--portable), 'Pruned...']")
    # diffusers refuses a variant that no component has (e.g. a folder diffprune wrote): then none
    asked, variant = variant, loaded_variant([folder / n for n, c in classes.items() if c is not None], variant)
    check_pipeline_folder(folder, classes, torch_dtype, PRUNING_FILE, variant)
    from diffusers.utils import logging as diffusers_logging

    from .portable import portable_loading

    bars_were_on = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # a per-component bar is noise in our commands' output
    try:  # a portable folder's shipped code is never run: its pruned components load with our classes
        with portable_loading(folder, classes, torch_dtype) as passed, quiet_ignored_config_keys():
            # a component saved as null (SD3 without its T5 encoder) is passed as None: diffusers requires
            # every non-optional component by name, even one the pipeline runs without
            absent = {name: None for name, cls in classes.items() if cls is None and name not in passed}
            pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch_dtype, use_safetensors=True,
                                                     variant=variant, **absent, **passed)
            pipe._diffprune_unloaded = (folder, unloaded, asked)  # for save_pipeline: copied back
            return pipe
    except DiffpruneError:
        raise
    except (OSError, ValueError, RuntimeError, AttributeError, IndexError) as err:  # IndexError: a variant scan
        raise DiffpruneError(f"{folder}: could not load pipeline ({str(err).splitlines()[0]})") from None
    finally:
        if bars_were_on:
            diffusers_logging.enable_progress_bar()


def _copy_unloaded(source: Path, names: list[str], folder: Path, variant: str | None = None) -> None:
    """Components loaded as None (`text_encoders=False`) and still None: their folders and
    model_index.json entries copied from the folder they were not loaded from (the weights of the
    variant loading would have read, under the plain names: the copy loads without a variant)."""
    index, theirs = (read_json(f / "model_index.json", "pipeline index") for f in (folder, source))
    for name in names:
        if index.get(name) in (None, [None, None]) and (source / name).is_dir():
            copy_component(source / name, folder / name, variant)
            index[name] = theirs[name]
    write_json_atomic(folder / "model_index.json", index)  # keys keep the sorted order diffusers wrote


def _scheduler_near(folder: Path):
    for cand in (folder / "scheduler_config.json", folder.parent / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            check_scheduler_folder(cand.parent)
            return DDPMScheduler.from_pretrained(cand.parent, subfolder=None)
    logger.warning("no scheduler config next to %s; using DDPMScheduler defaults (1000 linear steps)", folder)
    return DDPMScheduler()


def save_pipeline(pipe: DiffusionPipeline, folder: str | Path, portable: bool = False) -> Path:
    """Write `pipe` as a diffusers pipeline folder (safetensors only) into an existing folder.

    `portable`: pruned components also get the code plain diffusers needs (portable.make_portable),
    so the folder loads with `trust_remote_code=True` where diffprune is not installed.
    """
    folder = Path(folder)
    source, unloaded, variant = getattr(pipe, "_diffprune_unloaded", (None, [], None))
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    if unloaded:  # diffusers warns that each None component "cannot be saved": they are copied below
        diffusers_logging.set_verbosity_error()
    try:
        pipe.save_pretrained(folder, safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(level)
    if unloaded:
        _copy_unloaded(Path(source), unloaded, folder, variant)
    if portable:
        from .portable import make_portable

        make_portable(folder)
    return folder
