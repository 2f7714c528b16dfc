"""`--portable`: make a written pruned folder loadable with plain diffusers, where diffprune is not installed.

By default a pruned component folder is code-free: config.json (the unchanged base config),
pruning.json (widths) and safetensors weights, and loading it needs diffprune (model_index.json names
`diffprune.io`). `make_portable(folder)` adds, to each pruned component folder:

- `diffprune_pruned_model.py`, a small self-contained module (portable_template.py: torch, diffusers
  and safetensors only) that rebuilds the pruned structure from pruning.json and loads the weights;
- `auto_map: {"AutoModel": "diffprune_pruned_model.<class>"}` in config.json, so
  `diffusers.AutoModel.from_pretrained(folder/unet, trust_remote_code=True)` finds it;

and names that module as the component's library in model_index.json (a diffusers custom component),
so `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads the pipeline. Both give
the model `diffprune.load_pipeline` gives, bit for bit. diffprune itself never runs the shipped code:
it reads a portable folder with its own classes (io/pipeline.py), as it reads a code-free one.

The trade-off: anyone can load the folder, but only by allowing diffusers to execute Python from it
(`trust_remote_code=True`), and plain `DiffusionPipeline.from_pretrained(folder)` without that flag
now refuses it even where diffprune is imported.
"""

from __future__ import annotations

import contextlib
import json
import sys
import types
from pathlib import Path

from ..errors import DiffpruneError
from ..fsutil import atomic_write, read_json, write_json_atomic

PORTABLE_MODULE = "diffprune_pruned_model"  # the module file (without .py) and model_index library name
TEMPLATE = Path(__file__).with_name("portable_template.py")
# The classes portable_template.py defines (tests: the same as io.pipeline.PRUNED_CLASSES).
PORTABLE_CLASSES = ("PrunedUNet2DModel", "PrunedUNet2DConditionModel", "PrunedDiTTransformer2DModel",
                    "PrunedPixArtTransformer2DModel", "PrunedSD3Transformer2DModel")
_DIFFPRUNE_LIBRARY = "diffprune.io"
_PRUNING_FILE = "pruning.json"  # io.PRUNING_FILE (not imported: io and model_checks import this module)
_CONFIG_FILE = "config.json"


def is_portable_entry(entry) -> bool:
    """Whether a model_index.json entry names the shipped module (a portable pruned component)."""
    return isinstance(entry, list | tuple) and len(entry) == 2 and entry[0] == PORTABLE_MODULE


def portable_components(folder: Path) -> dict[str, str]:
    """{component: class name} of the portable entries of `folder`/model_index.json."""
    index = read_json(Path(folder) / "model_index.json", "pipeline index")
    return {name: entry[1] for name, entry in index.items()
            if not name.startswith("_") and is_portable_entry(entry)}


@contextlib.contextmanager
def portable_loading(folder: Path, classes: dict, torch_dtype=None):
    """For `io.load_pipeline`: yields {component: model} of the portable components, loaded by
    diffprune's own classes (`classes`, from model_checks.read_model_index) so the shipped module is
    never run, to pass to `DiffusionPipeline.from_pretrained`. diffusers checks a passed component
    against the library model_index.json declares, looked up in sys.modules (its `_get_library_or_raise`):
    meanwhile that name holds a stand-in module with those classes and ModelMixin, removed afterwards."""
    from diffusers import ModelMixin

    passed = {name: classes[name].from_pretrained(folder / name, torch_dtype=torch_dtype)
              for name in portable_components(folder)}
    stand_in = bool(passed) and PORTABLE_MODULE not in sys.modules
    if stand_in:
        module = types.ModuleType(PORTABLE_MODULE, "diffprune's stand-in while loading a portable folder")
        for model in passed.values():
            setattr(module, type(model).__name__, type(model))
        module.ModelMixin = ModelMixin
        sys.modules[PORTABLE_MODULE] = module
    try:
        yield passed
    finally:
        if stand_in:
            sys.modules.pop(PORTABLE_MODULE, None)


def make_component_portable(component: Path, class_name: str) -> None:
    """Ship the module in one pruned component folder and point its config.json at it."""
    if not (component / _PRUNING_FILE).is_file():
        raise DiffpruneError(f"{component}: no {_PRUNING_FILE}; only pruned component folders are made portable")
    if class_name not in PORTABLE_CLASSES:
        raise DiffpruneError(f"{component}: class {class_name!r} cannot be made portable; allowed: {PORTABLE_CLASSES}")
    config = read_json(component / _CONFIG_FILE, "model config")
    config["auto_map"] = {"AutoModel": f"{PORTABLE_MODULE}.{class_name}"}
    atomic_write(component / f"{PORTABLE_MODULE}.py", TEMPLATE.read_bytes())
    write_json_atomic(component / _CONFIG_FILE, config)


def make_portable(folder: str | Path) -> list[str]:
    """Make a pipeline folder (or a bare pruned model folder) written by diffprune loadable without it.

    Every component that model_index.json declares as `["diffprune.io", "Pruned..."]` gets the module
    and the `auto_map` entry, then model_index.json (written last, atomically) names the module.
    Returns the component folders changed (relative names; "." for a bare model folder). Components
    that are not pruned already load with plain diffusers and are left as they are.
    """
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        if (folder / _PRUNING_FILE).is_file():
            base = read_json(folder / _PRUNING_FILE, "pruning file").get("base_class")
            make_component_portable(folder, f"Pruned{base}")
            return ["."]
        raise DiffpruneError(f"{folder}: neither a pipeline folder (model_index.json) nor a pruned model "
                             f"folder ({_PRUNING_FILE}); nothing to make portable")
    index = read_json(index_path, "pipeline index")
    changed = []
    for name, entry in index.items():
        if name.startswith("_") or not (isinstance(entry, list) and len(entry) == 2):
            continue
        if entry[0] == _DIFFPRUNE_LIBRARY or is_portable_entry(entry):
            make_component_portable(folder / name, entry[1])
            index[name] = [PORTABLE_MODULE, entry[1]]
            changed.append(name)
    if changed:
        write_json_atomic(index_path, index)
    return changed


def describe(folder: str | Path) -> str:
    """The two lines that load a portable folder with plain diffusers (printed by the stages), naming the
    folder of its pruned model (unet/ or transformer/: the component model_index.json names)."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():  # a bare pruned model folder
        return (f"portable: AutoModel.from_pretrained({json.dumps(str(folder))}, trust_remote_code=True) loads it "
                "without diffprune")
    models = " / ".join(f"AutoModel.from_pretrained({json.dumps(str(folder / name))}, trust_remote_code=True)"
                        for name in portable_components(folder))
    return (f"portable: DiffusionPipeline.from_pretrained({json.dumps(str(folder))}, trust_remote_code=True) loads it "
            f"without diffprune" + (f" ({models} for the model alone)" if models else ""))
