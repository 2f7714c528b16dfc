"""Checks of a model folder made before anything is built from it.

A bad folder gives one DiffpruneError line naming the file, the value and what is allowed, before
any output is written and before any memory is spent on a model that cannot load:

- `model_index.json`: a JSON object whose `_class_name` is a diffusers pipeline class and whose
  components are `[library, class]` pairs naming a class diffusers knows how to load (a model,
  scheduler, tokenizer, ... as in diffusers' `LOADABLE_CLASSES`); never another attribute such as
  `["diffusers", "os.system"]`, a function or a module.
- `config.json`: every size is an integer >= 1 (a JSON float such as `1e5` is refused), and
  `sample_size` is at most MAX_SAMPLE_SIZE pixels/latents per side (larger than any released
  diffusers checkpoint: pixel UNets go to 1024, latent denoisers to 128). The model is then built on
  PyTorch's meta device (no memory) with at most MAX_MODULES submodules, and the bytes it will hold
  plus its weights file are compared with the memory limit: `DIFFPRUNE_MAX_MODEL_BYTES` if set,
  else the memory the system reports available (psutil, else /proc/meminfo `MemAvailable`).
- weights (`*.safetensors` only): the floating tensors of one file share one dtype, and every
  value is finite. A model is loaded in one dtype, `torch_dtype` if given, else the dtype its config
  builds (float32): a file in another (uniform) float dtype is cast to it, a file that mixes float
  dtypes is refused rather than silently mixed or rounded.
- `scheduler_config.json`: readable JSON, `num_train_timesteps` an integer in [1, MAX_TRAIN_TIMESTEPS].
"""

from __future__ import annotations

import importlib
import reprlib
from pathlib import Path
from types import ModuleType

import torch

from ..errors import DiffpruneError
from ..fsutil import read_json
from .config_keys import accepted_config
from .variants import variants_present
from .weight_checks import (  # noqa: F401  (public here too)
    MEMORY_ENV,
    check_finite,
    check_memory,
    check_one_float_dtype,
    largest_parameter_bytes,
    memory_limit,
    model_bytes,
    read_header,
    weights_files,
)

INDEX_FILE = "model_index.json"
CONFIG_FILE = "config.json"
SCHEDULER_FILE = "scheduler_config.json"
MAX_SAMPLE_SIZE = 4096
MAX_MODULES = 20_000  # an SDXL UNet has ~2k; a meta-built module costs ~5 KB and ~0.2 ms
MAX_TRAIN_TIMESTEPS = 100_000  # released schedulers use 1000; each step costs a few floats per table
MAX_INT = 2**31 - 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Config keys that are sizes: an integer >= 1, or a (nested) list of them; None = the class default.
SIZE_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "norm_num_groups",
             "attention_head_dim", "num_attention_heads", "num_layers", "patch_size", "cross_attention_dim",
             "transformer_layers_per_block", "latent_channels", "num_vq_embeddings", "vq_embed_dim",
             "num_embeds_ada_norm", "num_class_embeds", "time_embedding_dim", "hidden_size",
             "intermediate_size", "num_hidden_layers", "vocab_size", "max_position_embeddings")



# --------------------------------------------------------------------------- model_index.json


def read_model_index(folder: Path) -> dict[str, type | None]:
    """{component: class (None for an absent optional component)} from `folder/model_index.json`.

    Entries that are not components of the pipeline class may be plain options (JSON scalars).
    """
    path = folder / INDEX_FILE
    index = read_json(path, "pipeline index")
    pipeline = _pipeline_class(index.get("_class_name"), path)
    classes: dict[str, type | None] = {}
    for name, entry in index.items():
        if name.startswith("_") or (name not in _component_names(pipeline) and _is_option(entry)):
            continue  # a pipeline option such as requires_safety_checker: false or DiT's id2label
        if not name.isidentifier():
            raise DiffpruneError(f"{path}: component name {reprlib.repr(name)} is not a plain folder name; allowed: "
                                 "identifiers such as 'unet' or 'text_encoder'")
        classes[name] = _component_class(name, entry, path)
        if classes[name] is not None and not (folder / name).is_dir():
            raise DiffpruneError(f"{path}: component {name!r} is declared but folder {str(folder / name)!r} "
                                 "does not exist")
    return classes


def _component_names(pipeline: type) -> set[str]:
    """The entries diffusers loads as modules: required __init__ arguments plus optional components
    (`DiffusionPipeline.from_pretrained` passes every other entry to __init__ as a plain option)."""
    required, optional = pipeline._get_signature_keys(pipeline)
    return set(required) | (set(optional) & set(getattr(pipeline, "_optional_components", ()) or ()))


def _is_option(value) -> bool:
    """A plain option value: anything but a [library, class] pair of names (a pair names a module)."""
    is_pair = isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, str) for v in value)
    return not is_pair


def _pipeline_class(class_name, path: Path) -> type:
    from diffusers import DiffusionPipeline

    cls = _attribute(_import("diffusers"), class_name)
    if not (isinstance(cls, type) and issubclass(cls, DiffusionPipeline)):
        raise DiffpruneError(f"{path}: _class_name={reprlib.repr(class_name)} is not a diffusers pipeline class; "
                             "allowed: e.g. 'DDPMPipeline', 'StableDiffusionPipeline'")
    return cls


def _component_class(name: str, entry, path: Path) -> type | None:
    """The class `entry` = [library, class] names, if it is one diffusers may load; else raise."""
    allowed = "[library, class] with a loadable class, e.g. ['diffusers', 'UNet2DModel'], or [null, null]"
    if not (isinstance(entry, list) and len(entry) == 2):
        raise DiffpruneError(f"{path}: component {name!r} is {reprlib.repr(entry)}; allowed: {allowed}")
    library, class_name = entry
    if library is None and class_name is None:
        return None
    module = _library(library) if isinstance(library, str) else None
    if library == "transformers" and isinstance(class_name, str):
        class_name = _remapped_transformers_class(class_name)
    cls = _attribute(module, class_name) if module is not None else None
    bases = _loadable_bases(library) if module is not None else ()
    if not (isinstance(cls, type) and issubclass(cls, bases)):
        raise DiffpruneError(f"{path}: component {name!r} is {reprlib.repr(entry)}, which names no loadable class; "
                             f"allowed: {allowed}")
    return cls


# The classes model_index.json may name under library `diffprune.io` (io/pipeline.py registers its
# Pruned* classes and ModelMixin at import; `diffprune.io` imports pipeline, so they are always here).
_PRUNED_LIBRARY = ModuleType("diffprune.io")


def register_pruned_classes(classes: dict[str, type]) -> None:
    """Make `classes` loadable under the `diffprune.io` library name (called by io/pipeline.py)."""
    for name, cls in classes.items():
        setattr(_PRUNED_LIBRARY, name, cls)


def _library(library: str) -> ModuleType | None:
    """The module a model_index library name refers to, as diffusers resolves it; None if unknown."""
    if library in ("diffusers", "transformers"):
        return _import(library)
    from .portable import PORTABLE_MODULE  # a --portable component: diffprune never runs its shipped module

    if library in ("diffprune.io", PORTABLE_MODULE):
        return _PRUNED_LIBRARY
    if not library.isidentifier():
        return None
    module = getattr(_import("diffusers").pipelines, library, None)  # e.g. "stable_diffusion"
    return module if isinstance(module, ModuleType) else None


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DiffpruneError(f"this model needs the {name!r} package; install it with pip") from None


def _attribute(module: ModuleType | None, name):
    if module is None or not isinstance(name, str) or not name.isidentifier():
        return None
    try:
        return getattr(module, name, None)
    except Exception:  # noqa: BLE001 - lazy modules may fail to import an optional backend
        return None


def _loadable_bases(library: str) -> tuple[type, ...]:
    """Base classes diffusers can load for `library` (its own table, `LOADABLE_CLASSES`)."""
    from diffusers import ModelMixin
    from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES

    from .portable import PORTABLE_MODULE

    if library in ("diffprune.io", PORTABLE_MODULE):
        return (ModelMixin,)
    # A class in a diffusers pipeline module (e.g. ["stable_diffusion", "StableDiffusionSafetyChecker"])
    # may derive from any library's loadable base, as diffusers' ALL_IMPORTABLE_CLASSES allows.
    tables = [library] if library in ("diffusers", "transformers") else ["diffusers", "transformers"]
    bases = []
    for table in tables:
        module = _import(table)
        bases += [b for b in (_attribute(module, n) for n in LOADABLE_CLASSES[table]) if isinstance(b, type)]
    return tuple(bases)


def _remapped_transformers_class(class_name: str) -> str:
    """The name diffusers loads for a deprecated transformers class (e.g. CLIPFeatureExtractor)."""
    try:
        from diffusers.pipelines.pipeline_loading_utils import _maybe_remap_transformers_class
    except ImportError:  # older diffusers: no remapping
        return class_name
    return _maybe_remap_transformers_class(class_name) or class_name


def is_model_class(cls: type | None) -> bool:
    """A torch model (diffusers ModelMixin or transformers PreTrainedModel), not a scheduler or tokenizer."""
    return isinstance(cls, type) and issubclass(cls, torch.nn.Module)


def is_scheduler_class(cls: type | None) -> bool:
    from diffusers import SchedulerMixin

    return isinstance(cls, type) and issubclass(cls, SchedulerMixin)


# --------------------------------------------------------------------------- config values


def check_config_values(config: dict, path: Path) -> None:
    """Sizes are integers >= 1 (or lists of them), sample_size in [1, MAX_SAMPLE_SIZE]."""
    for key in SIZE_KEYS:
        value = config.get(key)
        if value is not None and not _ints_in(value, 1, MAX_INT):
            raise DiffpruneError(f"{path}: {key}={reprlib.repr(value)} is not allowed; "
                                 f"allowed: an integer in [1, {MAX_INT}] or a list of them")
    size = config.get("sample_size")
    if size is not None and not (_ints_in(size, 1, MAX_SAMPLE_SIZE) and (not isinstance(size, list) or
                                                                        len(size) in (1, 2))):
        raise DiffpruneError(f"{path}: sample_size={reprlib.repr(size)} is not allowed; allowed: an integer in "
                             f"[1, {MAX_SAMPLE_SIZE}] or a list of two")


def _ints_in(value, low: int, high: int) -> bool:
    if isinstance(value, list):
        return len(value) > 0 and all(_ints_in(v, low, high) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_scheduler_folder(folder: Path) -> None:
    """`folder/scheduler_config.json` is a JSON object with a sane num_train_timesteps."""
    path = folder / SCHEDULER_FILE
    config = read_json(path, "scheduler config")
    steps = config.get("num_train_timesteps")
    if steps is not None and not _ints_in(steps, 1, MAX_TRAIN_TIMESTEPS):
        raise DiffpruneError(f"{path}: num_train_timesteps={reprlib.repr(steps)} is not allowed; allowed: an integer "
                             f"in [1, {MAX_TRAIN_TIMESTEPS}]")


# --------------------------------------------------------------------------- building on meta


class _TooManyModules(Exception):
    pass


def meta_model(cls: type, config: dict, path: Path) -> torch.nn.Module:
    """`cls` built from `config` on the meta device: shapes without memory, at most MAX_MODULES modules."""
    from torch.nn.modules.module import register_module_module_registration_hook

    count = 0

    def limit(module, name, submodule):
        nonlocal count
        count += 1
        if count > MAX_MODULES:
            raise _TooManyModules

    handle = register_module_module_registration_hook(limit)
    try:
        with torch.device("meta"):
            return _from_config(cls, config)
    except _TooManyModules:
        depth = {k: config[k] for k in ("layers_per_block", "num_layers", "transformer_layers_per_block",
                                        "num_hidden_layers") if k in config}
        raise DiffpruneError(f"{path}: the config describes a model of more than {MAX_MODULES} modules "
                             f"({reprlib.repr(depth)}); allowed: at most {MAX_MODULES}") from None
    except DiffpruneError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to build from a user's config is bad input
        first = (str(err).strip().splitlines() or [""])[0]
        raise DiffpruneError(f"{path}: does not describe a valid {cls.__name__} "
                             f"({type(err).__name__}: {first})") from None
    finally:
        handle.remove()


def _from_config(cls: type, config: dict) -> torch.nn.Module:
    from diffusers import ModelMixin

    if issubclass(cls, ModelMixin):
        return cls.from_config(accepted_config(cls, config))  # no warning for keys an older diffusers wrote
    return cls(cls.config_class.from_dict(config))  # transformers PreTrainedModel


# --------------------------------------------------------------------------- one model folder


def check_model_folder(folder: Path, cls: type, torch_dtype: torch.dtype | None = None,
                       pruned: bool = False, variant: str | None = None) -> int:
    """Check config, meta-built size and weights of the model in `folder`; return the bytes it needs.

    `pruned`: the folder's tensors (not the base config's) are what the loaded model holds. Memory is
    checked by the caller (`check_memory`) over all components before the finite-value scan.
    `variant`: the weights files of that variant are checked where the folder has them (variants.py).
    """
    path = folder / CONFIG_FILE
    config = read_json(path, "model config")
    config.pop("auto_map", None)  # a --portable folder's pointer to its shipped module, not a setting
    check_config_values(config, path)
    meta = meta_model(cls, config, path)
    check_variant_weights(folder, variant)
    files = weights_files(folder, variant)
    if not files:  # refused here, before diffusers' own "error while trying to fetch" line and any loading
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        what = f"holds only pickled weights ({', '.join(pickled)})" if pickled else "holds no weights file"
        raise DiffpruneError(f"{folder}: {what}; allowed: *.safetensors (diffprune never loads pickled checkpoints; "
                             "convert with save_pretrained(safe_serialization=True))")
    headers = {f: read_header(f) for f in files}
    for f, header in headers.items():
        check_one_float_dtype(f, header)
    shapes = {k: shape for h in headers.values() for k, (_, shape) in h.items()} if pruned else None
    dtype = torch_dtype or next((p.dtype for p in meta.parameters() if p.is_floating_point()), None)
    # pruned: the tensors the file holds at their pruned widths (structure.apply_structure checks they agree
    # with pruning.json), plus the one base-width parameter building the base allocates at a time
    building = largest_parameter_bytes(meta) if pruned else 0
    return model_bytes(meta, dtype, shapes) + building + sum(f.stat().st_size for f in files)


def check_variant_weights(folder: Path, variant: str | None) -> None:
    """Without a variant, a model folder holding only variant weights (x.fp16.safetensors) cannot load:
    say which variant to ask for, rather than diffusers' missing-file error."""
    if variant is not None:
        return
    present = variants_present(f.name for f in folder.glob("*.safetensors"))
    if present and None not in present:
        first = sorted(present)[0]
        raise DiffpruneError(f"{folder}: holds only variant weights {sorted(present)} (e.g. *.{first}.safetensors), "
                             f"no plain ones; allowed: --variant {first} (variant={first!r})")


def check_models(models: dict[Path, tuple[type, bool]], torch_dtype: torch.dtype | None, where: Path,
                 variant: str | None = None) -> None:
    """Check every model folder {folder: (class, pruned?)}, then their memory together, then the
    weights' values (a full read, done last: only for models that will be loaded)."""
    needs = {folder / CONFIG_FILE: check_model_folder(folder, cls, torch_dtype, pruned, variant)
             for folder, (cls, pruned) in models.items()}
    check_memory(needs, where)
    for folder in models:
        for f in weights_files(folder, variant):
            check_finite(f)


def check_pipeline_folder(folder: Path, classes: dict[str, type | None], torch_dtype: torch.dtype | None,
                          pruning_file: str, variant: str | None = None) -> None:
    """All checks for the components of a pipeline folder (see `read_model_index`) before any is built."""
    for name, cls in classes.items():
        if is_scheduler_class(cls):
            check_scheduler_folder(folder / name)
    models = {folder / name: (cls, (folder / name / pruning_file).is_file())
              for name, cls in classes.items() if is_model_class(cls)}
    check_models(models, torch_dtype, folder, variant)
