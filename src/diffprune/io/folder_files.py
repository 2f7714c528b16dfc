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
from .variants import (
    META_SUFFIXES,
    WEIGHT_SUFFIXES,
    check_variant,
    chosen_weights,
    has_weights,
    is_weights_file,
    variants_present,
)
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


def check_depth_record(info: dict[str, Any], config: dict[str, Any], where: str) -> None:
    """A depth-then-width folder's pruning.json "depth" record (prune/depth_stage.py) must agree with its
    config.json: every recorded config change's new value is the config's value. The config alone builds
    the layers; a disagreement means one of the two files was edited."""
    depth = info.get("depth")
    if depth is None:
        return
    changes = depth.get("config_changes") if isinstance(depth, dict) else None
    if not isinstance(changes, dict) or not isinstance(depth.get("removed"), list):
        raise DiffpruneError(f"{where}: 'depth' must be an object with 'removed' (a list) and 'config_changes'")
    for key, change in changes.items():
        after = change.get("after") if isinstance(change, dict) else None
        if _plain(config.get(key)) != _plain(after):
            raise DiffpruneError(f"{where}: depth record says {key}={after!r} after removing {depth['removed']}, "
                                 f"but config.json has {config.get(key)!r}; one of the two files was edited")


def _plain(value):
    """Lists and tuples compare equal (JSON has no tuples)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def read_config(folder: Path) -> dict[str, Any]:
    """The base config; a portable folder's `auto_map` (portable.py) is for diffusers only, not a setting."""
    config = read_json(folder / CONFIG_FILE, "model config")
    config.pop("auto_map", None)
    return config


def weights_name(variant: str | None = None) -> str:
    """The weights file of a pruned folder: diffusion_pytorch_model[.<variant>].safetensors."""
    return WEIGHTS_FILE if variant is None else WEIGHTS_FILE.replace(".safetensors", f".{variant}.safetensors")


def read_weights(folder: Path, variant: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `folder`'s safetensors file (of `variant` if the folder has it, as diffusers falls
    back to the plain file); a file mixing float dtypes is refused."""
    path = folder / weights_name(variant)
    if not path.is_file():
        path = folder / WEIGHTS_FILE
    if not path.is_file():
        present = sorted(v for v in variants_present(p.name for p in folder.glob("*.safetensors")) if v)
        hint = f"; it holds variant weights {present}: allowed: variant={present[0]!r}" if present else \
            " (only safetensors are read, never pickles)"
        raise DiffpruneError(f"{folder / weights_name(variant)}: missing weights file{hint}")
    check_one_float_dtype(path, read_header(path))
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise DiffpruneError(f"{path}: unreadable safetensors file ({err})") from None


# --------------------------------------------------------------------------- resolving models

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_folder(name_or_path: str | Path, subfolder: str | None = None,
                   revision: str | None = None, variant: str | None = None) -> Path:
    """A local folder for a path or a hub id: downloaded when online (only what loading reads, see
    `hub_patterns`), else the copy in the local hub cache."""
    variant = check_variant(variant)
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
    if subfolder is not None and not _HUB_ID.match(subfolder.strip("/")):
        raise DiffpruneError(f"subfolder={subfolder!r} is not a folder name of a hub repo; allowed: e.g. 'unet'")
    return _hub_folder(str(name_or_path), subfolder.strip("/") if subfolder else None, revision, variant)


def _hub_folder(repo: str, subfolder: str | None, revision: str | None, variant: str | None) -> Path:
    import huggingface_hub as hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return _cached(repo, subfolder, revision, "HF_HUB_OFFLINE is set")
    try:
        files = hub.HfApi().list_repo_files(repo, revision=revision)
    except Exception as err:  # noqa: BLE001 - network and hub errors come in many types
        _refuse_missing(err, repo, revision)
        return _cached(repo, subfolder, revision, f"the hub is unreachable: {type(err).__name__}")
    index_name = f"{subfolder}/model_index.json" if subfolder else "model_index.json"
    index = None
    try:
        if index_name in files:
            index = read_json(hub.hf_hub_download(repo, "model_index.json", subfolder=subfolder, revision=revision),
                              "pipeline index")
        patterns = hub_patterns(files, index, subfolder, variant, repo)
        root = Path(hub.snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except DiffpruneError:
        raise
    except Exception as err:  # noqa: BLE001
        _refuse_missing(err, repo, revision)  # e.g. a gated repo lists its files but refuses the download
        first = (str(err).strip().splitlines() or [""])[0]
        raise DiffpruneError(f"model {repo!r}: download from the hub failed ({type(err).__name__}: {first}); "
                             "check the connection and disk space, then run again") from None
    return root / subfolder if subfolder else root


def _refuse_missing(err: Exception, repo: str, revision: str | None) -> None:
    """One line for a repo or revision the hub says does not exist (or is gated); other errors return."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(err, GatedRepoError):
        raise DiffpruneError(f"hub repo {repo!r} is gated: accept its terms on huggingface.co and log in "
                             "(`hf auth login`), or give a local folder") from None
    if isinstance(err, RepositoryNotFoundError):
        raise DiffpruneError(f"model {repo!r} is neither a local folder nor a hub repo you can read (not found, "
                             "or private: log in with `hf auth login`); give a diffusers folder or a hub id") from None
    if isinstance(err, RevisionNotFoundError):
        raise DiffpruneError(f"--revision {revision!r} is not in hub repo {repo!r}; allowed: one of its branches, "
                             "tags or commit hashes (default: main)") from None


def _cached(repo: str, subfolder: str | None, revision: str | None, reason: str) -> Path:
    """The copy of `repo` a previous run left in the local hub cache, or one line saying there is none."""
    import huggingface_hub as hub

    try:
        root = Path(hub.snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and friends
        at = f" at revision {revision!r}" if revision else ""
        raise DiffpruneError(f"model {repo!r} is not a local folder, {reason}, and the local hub cache has no "
                             f"copy of it{at}; run once online (HF_HUB_OFFLINE unset) or give a local folder") from None
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise DiffpruneError(f"model {repo!r}: the cached copy ({reason}) has no folder {subfolder!r}")
    return folder


def hub_patterns(files: list[str], index: dict | None, subfolder: str | None, variant: str | None,
                 repo: str = "the hub repo") -> list[str]:
    """The files of a hub repo listing (`files`) that loading reads, as exact `allow_patterns`.

    A pipeline (`index` = its model_index.json): model_index.json, then for each component it names
    (a [library, class] pair) that component folder's config / tokenizer files (variants.META_SUFFIXES)
    and, for a model, its safetensors weights of one variant (variants.chosen_weights: `variant`, else
    the plain files); a component folder absent from a repo with config.json in its root is read from
    the root, as diffusers does (google/ddpm-* repos; otherwise loading names the missing folder).
    A bare model (`index` None): config.json's folder the same way. Never pickles (.bin/.pt/.ckpt),
    .onnx/.msgpack/.h5, single-file checkpoints at the root, other variants, or folders
    model_index.json does not name. A model folder with no safetensors: one line naming it.
    """
    prefix = f"{subfolder}/" if subfolder else ""
    folders: dict[str, list[str]] = {}
    for name in files:
        if name.startswith(prefix):
            folder, _, base = name[len(prefix):].rpartition("/")
            folders.setdefault(folder, []).append(base)
    if index is None:
        if "config.json" not in folders.get("", []):
            raise DiffpruneError(f"hub repo {repo!r} holds neither model_index.json (a pipeline) nor config.json "
                                 f"(a model) in {prefix or 'its root'}; give a diffusers repo or folder")
        components = [""]
    else:
        named = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
                 and all(isinstance(x, str) for x in v) and k.isidentifier()]  # others: refused when loading
        flat = "config.json" in folders.get("", [])  # components in the root: skip none; else missing ones
        components = ["model_index.json"] + [n if n in folders else "" for n in named if n in folders or flat]
    wanted: list[str] = []
    for component in dict.fromkeys(components):
        if component == "model_index.json":
            wanted.append(prefix + component)
            continue
        at = prefix + (f"{component}/" if component else "")
        names = _component_files(folders.get(component, []), variant, repo, at or "the repo root")
        wanted += [at + name for name in names]
    return [_escape(name) for name in dict.fromkeys(wanted)]


def _component_files(names: list[str], variant: str | None, repo: str, where: str) -> list[str]:
    meta = sorted(n for n in names if n.endswith(META_SUFFIXES) and not is_weights_file(n))
    if not has_weights(names):
        return meta  # a scheduler, tokenizer or feature extractor
    weights, _ = chosen_weights(names, variant)
    if weights:
        return meta + weights
    present = sorted(v for v in variants_present(names) if v is not None)
    if present:
        asked = f"variant {variant!r} or plain" if variant else "plain (non-variant)"
        raise DiffpruneError(f"hub repo {repo!r}: {where} has no {asked} safetensors weights, only variant(s) "
                             f"{present}; allowed: --variant {present[0]}")
    formats = ", ".join(sorted({"." + n.rpartition(".")[2] for n in names if n.endswith(WEIGHT_SUFFIXES)}))
    raise DiffpruneError(f"hub repo {repo!r}: {where} has no safetensors weights (only {formats}); diffprune "
                         "never reads pickled (.bin/.pt/.ckpt) or other formats")


def _escape(name: str) -> str:
    """An exact file name as an fnmatch pattern (huggingface_hub's allow_patterns)."""
    return re.sub(r"([*?[])", r"[\1]", name)
