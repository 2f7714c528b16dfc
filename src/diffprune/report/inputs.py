"""Reading the report's inputs: other stages' files, checked and refused with one line each.

Owns: the file names the report reads, `load_*` (one per input kind), `lookup` (dotted key paths)
and `Inputs`, the one way numbers enter the report. Imports only `errors` and `fsutil`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DiffpruneError
from ..fsutil import read_json

EVALUATION_FORMAT = "diffprune-evaluation"
EVALUATION_VERSION = 1
PRUNE_REPORT = "prune_report.json"
PRUNE_LOSS_PNG = "loss_over_timesteps.png"
TRAIN_LOG = "train_log.json"
TRAIN_CONFIGS = ("finetune_config.json", "train_config.json")
SAMPLES_NPZ = "samples.npz"
SAMPLE_CONFIG = "sample_config.json"

# Human names of the inputs, used in every "source" cell.
INPUT_LABELS = {
    "prune": "prune report",
    "finetune": "train log",
    "finetune_config": "finetune config",
    "evaluation": "student evaluation",
    "teacher_evaluation": "teacher evaluation",
}


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DiffpruneError(f"{what}: {path} does not exist" if not path.exists() else
                             f"{what}: {path} is not a file")
    data = read_json(path, f"{what}:", expect=None)
    if not isinstance(data, dict):
        raise DiffpruneError(f"{what}: {path} holds a JSON {type(data).__name__}, not a diffprune result object")
    return data


def _existing_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise DiffpruneError(f"{what}: {p} does not exist")
    if not p.is_dir():
        raise DiffpruneError(f"{what}: {p} is a file; give the folder the stage wrote")
    return p


def load_prune(path: str | Path) -> tuple[dict[str, Any], Path]:
    """prune_report.json of a prune folder (or the JSON itself); refuses anything else."""
    p = Path(path)
    file = p if p.is_file() else _existing_dir(p, "--prune") / PRUNE_REPORT
    if not file.exists():
        raise DiffpruneError(f"--prune: {p} has no {PRUNE_REPORT}; is it a folder written by `diffprune prune`?")
    data = _read_json(file, "--prune")
    missing = [k for k in ("params", "macs", "importance") if k not in data]
    if missing or not isinstance(data.get("params"), dict) or not isinstance(data.get("importance"), dict):
        raise DiffpruneError(f"--prune: {file} is not a diffprune prune report (missing {missing or 'fields'})")
    return data, file


def _train_config(folder: Path) -> tuple[dict[str, Any] | None, Path | None]:
    for name in TRAIN_CONFIGS:
        if (folder / name).is_file():
            config = _read_json(folder / name, "--finetune")
            if config.get("stage") not in ("finetune", "train"):
                raise DiffpruneError(f"--finetune: {folder / name} is not a finetune/train config "
                                     f"(stage={config.get('stage')!r})")
            return config, folder / name
    return None, None


def _train_log(folder: Path) -> dict[str, Any] | None:
    if not (folder / TRAIN_LOG).is_file():
        return None
    log = _read_json(folder / TRAIN_LOG, "--finetune")
    if not isinstance(log.get("records"), list) or not all(
            isinstance(r, dict) and "step" in r and "loss" in r for r in log["records"]):
        raise DiffpruneError(f"--finetune: {folder / TRAIN_LOG} is not a diffprune train log "
                             "(needs 'records' with 'step' and 'loss')")
    return log


def load_training(path: str | Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[str], dict]:
    """(train_log, stage config, notes, files) of a finetune/train folder; either part may be missing.

    A folder with neither train_log.json nor a finetune/train config is refused.
    """
    folder = _existing_dir(path, "--finetune")
    notes: list[str] = []
    files: dict[str, Path] = {}
    config, config_file = _train_config(folder)
    if config_file is not None:
        files["finetune_config"] = config_file
    log = _train_log(folder)
    if log is not None:
        files["finetune"] = folder / TRAIN_LOG
    if log is None and config is None:
        raise DiffpruneError(f"--finetune: {folder} has neither {TRAIN_LOG} nor {' / '.join(TRAIN_CONFIGS)}; "
                             "is it a folder written by `diffprune finetune` or `diffprune train`?")
    if log is None:
        notes.append(f"training loss curve skipped: {folder / TRAIN_LOG} is missing "
                     "(the run wrote no log yet)")
    elif not log["records"]:
        notes.append(f"training loss curve skipped: {folder / TRAIN_LOG} has no records yet")
    return log, config, notes, files


def load_evaluation(path: str | Path, option: str) -> tuple[dict[str, Any], Path]:
    """An evaluation JSON (or a folder holding evaluation.json); refuses anything else."""
    p = Path(path)
    if p.is_dir():
        p = p / "evaluation.json"
        if not p.exists():
            raise DiffpruneError(f"{option}: {path} is a folder without evaluation.json; give the JSON file")
    data = _read_json(p, option)
    if data.get("format") != EVALUATION_FORMAT:
        raise DiffpruneError(f"{option}: {p} is not a diffprune evaluation (format={data.get('format')!r}, "
                             f"expected {EVALUATION_FORMAT!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or version > EVALUATION_VERSION:
        raise DiffpruneError(f"{option}: {p} has format_version={version!r}; this diffprune reads "
                             f"versions <= {EVALUATION_VERSION}")
    return data, p


@dataclasses.dataclass
class Samples:
    images: np.ndarray  # uint8 NHWC
    indices: np.ndarray  # int, one per image
    folder: Path
    config: dict[str, Any] | None


def load_samples(path: str | Path, option: str) -> Samples:
    """A sample folder's samples.npz (uint8 NHWC images + indices) and sample_config.json if present."""
    folder = _existing_dir(path, option)
    npz = folder / SAMPLES_NPZ
    if not npz.is_file():
        raise DiffpruneError(f"{option}: {folder} has no {SAMPLES_NPZ}; is it a finished `diffprune sample` folder?")
    try:
        with np.load(npz, allow_pickle=False) as data:
            images, indices = data["images"], data["indices"]
    except (OSError, ValueError, KeyError) as err:
        raise DiffpruneError(f"{option}: {npz} is not a diffprune samples file ({err})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise DiffpruneError(f"{option}: {npz} 'images' must be uint8 (N, H, W, C) with C in 1, 3, 4; "
                             f"got {images.dtype} {images.shape}")
    if indices.ndim != 1 or len(indices) != len(images):
        raise DiffpruneError(f"{option}: {npz} has {len(images)} images but indices of shape {indices.shape}")
    config = None
    if (folder / SAMPLE_CONFIG).is_file():
        config = _read_json(folder / SAMPLE_CONFIG, option)
    return Samples(images, indices.astype(np.int64), folder, config)


def lookup(data: Any, path: str) -> Any:
    """Value at a dotted key path ('cost.ratios.latency_speedup', 'records.-1.step'); None if absent."""
    cur = data
    for key in path.split("."):
        if isinstance(cur, dict):
            cur = cur.get(key)
        elif isinstance(cur, list):
            try:
                cur = cur[int(key)]
            except (ValueError, IndexError):
                return None
        else:
            return None
        if cur is None:
            return None
    return cur


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


class Inputs:
    """The loaded JSON inputs by name; `value(name, path)` is the only way numbers enter the report."""

    def __init__(self):
        self.data: dict[str, dict] = {}
        self.files: dict[str, Path] = {}

    def get(self, name: str, path: str) -> Any:
        return lookup(self.data[name], path) if name in self.data else None

    def number(self, name: str, path: str) -> float | None:
        v = self.get(name, path)
        return v if is_number(v) else None

    def first(self, *candidates: tuple[str, str]) -> tuple[float, str, str] | None:
        """The first (value, input, path) among candidates that holds a finite number."""
        for name, path in candidates:
            v = self.number(name, path)
            if v is not None:
                return v, name, path
        return None


def input_name(name: str, files: dict[str, Path]) -> str:
    label = INPUT_LABELS.get(name, name)
    return f"{label} ({files[name].name})" if name in files else label
