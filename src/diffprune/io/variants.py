"""Which weights files of a component folder a loader reads, for a weights variant (e.g. fp16).

diffusers and transformers name a component's safetensors weights `diffusion_pytorch_model` / `model`:
plain `<name>.safetensors` or sharded `<name>-00001-of-00002.safetensors` with
`<name>.safetensors.index.json`; a variant puts its name in: `<name>.fp16.safetensors`,
`<name>.fp16-00001-of-00002.safetensors` with `<name>.safetensors.index.fp16.json` (and the older
`<name>-00001-of-00002.fp16.safetensors` with `<name>.safetensors.fp16.index.json`), as diffusers'
`variant_compatible_siblings` reads them. A component without the asked variant uses its plain files
(as diffusers does). Only safetensors are ever chosen: never .bin/.pt/.ckpt pickles, .onnx, .msgpack, .h5.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..errors import DiffpruneError

_PREFIX = r"(?:diffusion_pytorch_model|model)"  # diffusers' and transformers' weights names
_SHARD = r"-\d{5}-of-\d{5}"
_NAME = r"[A-Za-z0-9_]+"
_VARIANT_NAME = re.compile(rf"^{_NAME}$")
# (variant before the shard number, variant after it: the older transformers form)
_WEIGHTS = re.compile(rf"^{_PREFIX}(?:\.({_NAME}))?(?:{_SHARD})?(?:\.({_NAME}))?\.safetensors$")
_INDEX = re.compile(rf"^{_PREFIX}\.safetensors(?:\.index(?:\.({_NAME}))?|\.({_NAME})\.index)\.json$")
# An index of sharded weights in any format and variant (pytorch_model.bin.index.json, ...index.fp16.json)
_ANY_INDEX = re.compile(rf"\.index(?:\.{_NAME})?\.json$|\.{_NAME}\.index\.json$")
# Files that hold weights in some format: a folder with any of them is a model and needs safetensors.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".onnx", ".onnx_data", ".h5",
                   ".gguf", ".pb")
# Everything else a component needs: configs, tokenizer vocabularies and merges, sentencepiece models.
META_SUFFIXES = (".json", ".txt", ".model", ".tiktoken")


def check_variant(variant: str | None) -> str | None:
    """`variant` if it is a plain variant name (e.g. fp16, bf16, ema); else one line saying what is allowed."""
    if variant is None or (isinstance(variant, str) and _VARIANT_NAME.match(variant)):
        return variant
    raise DiffpruneError(f"variant={variant!r} is not a weights variant name; allowed: letters, digits and "
                         "underscores, e.g. 'fp16' (files such as diffusion_pytorch_model.fp16.safetensors)")


def variant_of(name: str) -> tuple[bool, str | None]:
    """(is a safetensors weights or index file of diffusers/transformers naming, its variant or None)."""
    for pattern in (_WEIGHTS, _INDEX):
        match = pattern.match(name)
        if match is not None and not all(match.groups()):
            return True, match.group(1) or match.group(2)
    return False, None


def is_index(name: str) -> bool:
    """A safetensors weights index of diffusers/transformers naming (any variant)."""
    return bool(_INDEX.match(name))


def is_weights_file(name: str) -> bool:
    """Weights in any format, or the index of sharded ones: what `META_SUFFIXES` alone never selects."""
    return name.endswith(WEIGHT_SUFFIXES) or bool(_ANY_INDEX.search(name))


def variants_present(names: Iterable[str]) -> set[str | None]:
    """The variants (None = plain) that have safetensors weights among the file names of one folder."""
    return {variant_of(n)[1] for n in names if _WEIGHTS.match(n) and variant_of(n)[0]}


def safetensors_of(names: Iterable[str], variant: str | None) -> list[str]:
    """The safetensors weights (and their index) of exactly `variant` among `names`; [] if it has none."""
    names = list(names)
    weights = [n for n in names if _WEIGHTS.match(n) and variant_of(n) == (True, variant)]
    index = [n for n in names if is_index(n) and variant_of(n) == (True, variant)]
    return sorted(weights + index) if weights else []


def chosen_weights(names: Iterable[str], variant: str | None) -> tuple[list[str], str | None]:
    """(the weights files a loader reads for `variant`, the variant they are): the variant's files,
    else the plain ones (diffusers' fallback); ([], None) when neither exists."""
    names = list(names)
    if variant is not None:
        files = safetensors_of(names, variant)
        if files:
            return files, variant
    return safetensors_of(names, None), None


def has_weights(names: Iterable[str]) -> bool:
    """Whether a folder holding files `names` is a model (weights in any format), not e.g. a tokenizer."""
    return any(n.endswith(WEIGHT_SUFFIXES) for n in names)


def loaded_variant(folders: Iterable[Path], variant: str | None) -> str | None:
    """`variant` if any of `folders` holds weights of it, else None (what to pass to diffusers, which
    refuses a variant no component has)."""
    if variant is None:
        return None
    for folder in folders:
        if folder.is_dir() and safetensors_of((p.name for p in folder.iterdir()), variant):
            return variant
    return None


def plain_name(name: str, variant: str | None) -> str:
    """The file name `name` (weights or index of `variant`) has without the variant."""
    if variant is None:
        return name
    for old, new in ((f".{variant}.safetensors", ".safetensors"), (f".{variant}-", "-"),
                     (f".index.{variant}.json", ".index.json"), (f".{variant}.index.json", ".index.json")):
        if old in name:
            return name.replace(old, new, 1)
    return name


def copy_component(source: Path, dest: Path, variant: str | None) -> None:
    """Copy a component folder as a loader reads it: its config/tokenizer files and the weights of
    `variant` (else plain), written under the plain names (an index's shard names too), so the copy
    loads without a variant; weights of other variants and formats (pickles) are left behind."""
    names = [p.name for p in source.iterdir() if p.is_file()]
    weights, used = chosen_weights(names, variant) if has_weights(names) else ([], None)
    if has_weights(names) and not weights:  # none a loader reads: the one variant it has, else all as it is
        present = sorted(v for v in variants_present(names) if v is not None)
        if not present:
            shutil.copytree(source, dest, dirs_exist_ok=True)
            return
        weights, used = safetensors_of(names, present[0]), present[0]
    dest.mkdir(parents=True, exist_ok=True)
    for item in sorted(source.iterdir()):
        if item.is_dir():
            shutil.copytree(item, dest / item.name, dirs_exist_ok=True)
        elif item.name in weights and is_index(item.name) and used is not None:
            index = json.loads(item.read_text(encoding="utf-8"))
            index["weight_map"] = {k: plain_name(v, used) for k, v in (index.get("weight_map") or {}).items()}
            (dest / plain_name(item.name, used)).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        elif item.name in weights:
            shutil.copy2(item, dest / plain_name(item.name, used))
        elif not is_weights_file(item.name):
            shutil.copy2(item, dest / item.name)
