"""Training checkpoints: atomic writing, pickle-free reading, and the checks before resuming.

Layout: `<run>/checkpoints/step_XXXXXX/` holds model.safetensors (raw weights), ema.safetensors,
optimizer.safetensors + optimizer.json (the optimizer state split into tensors and JSON; the AMP
scaler state, if any, under "scaler"), [adapters.safetensors] (feature-distillation adapters) and
trainer_state.json (version, step, config, num_processes, model_fingerprint, history). A checkpoint
is written into a temp folder `.step_XXXXXX.tmp-<pid>` and renamed into place, so a folder with a
trainer_state.json is complete; only the newest `keep_checkpoints` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import DiffpruneError, write_error
from ..fsutil import json_default, read_json, replace_dir

if TYPE_CHECKING:
    from .config import TrainingConfig

# Config keys a --resume run may change without changing the result.
RESUME_FREE_KEYS = ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "num_workers")
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
STATE_VERSION = 1
STATE_KEYS = ("step", "config", "num_processes", "model_fingerprint")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temp folders are ignored)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON for the rest."""
    sd = optimizer.state_dict()
    tensors, other = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                other.setdefault(str(idx), {})[key] = value
    return tensors, {"class": type(optimizer).__name__, "param_groups": sd["param_groups"], "state": other}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta.get("state", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def write_checkpoint(run_dir: Path, step: int, files: dict[str, dict[str, torch.Tensor]],
                     json_files: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step_XXXXXX atomically (temp folder + rename), then drop all but `keep`.

    A failure leaves every earlier checkpoint untouched and raises DiffpruneError.
    """
    root = run_dir / CHECKPOINTS
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step_*.tmp-*"):  # left by a killed run (the output dir is locked)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        for name, tensors in files.items():
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        for name, data in json_files.items():
            (tmp / name).write_text(json.dumps(data, indent=2, default=json_default) + "\n")
        replace_dir(tmp, final)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        good = checkpoint_dirs(run_dir)
        kept = f"the last good checkpoint {good[-1]} is kept" if good else "no earlier checkpoint exists"
        raise write_error(err, f"could not write checkpoint {final} at step {step}", f"; {kept}") from None
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict]:
    """(trainer_state, {file: tensors}, optimizer meta) of a checkpoint folder.

    Only the named safetensors and JSON files are read (never a pickle); any damage -> one
    DiffpruneError line naming the file.
    """
    hint = "delete this checkpoint to resume from an earlier one"

    def read_object(name: str) -> dict:
        if not (path / name).is_file():
            raise DiffpruneError(f"checkpoint file {path / name} is missing; {hint}")
        try:
            return read_json(path / name, "checkpoint file")
        except DiffpruneError as err:
            raise DiffpruneError(f"{err}; {hint}") from None

    state = read_object(STATE_FILE)
    _check_state(state, path / STATE_FILE, hint)
    meta = read_object("optimizer.json")
    if not isinstance(meta.get("param_groups"), list) or not isinstance(meta.get("state", {}), dict):
        raise DiffpruneError(f"checkpoint file {path / 'optimizer.json'} lacks a valid 'param_groups' list; {hint}")
    tensors = {}
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "adapters.safetensors"):
        if not (path / name).is_file():
            if name != "adapters.safetensors":
                raise DiffpruneError(f"checkpoint {path} lacks {name}; {hint}")
            continue
        try:
            tensors[name] = load_file(str(path / name))
        except (OSError, SafetensorError, ValueError) as err:
            raise DiffpruneError(f"checkpoint file {path / name} is not a readable safetensors file "
                                 f"({first_line(err)}); {hint}") from None
    return state, tensors, meta


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_state(state: dict, where: Path, hint: str) -> None:
    """trainer_state.json must have a known version and the keys resuming reads, with sane types."""
    version = state.get("version", STATE_VERSION)  # files written before the field existed are version 1
    if version != STATE_VERSION:
        raise DiffpruneError(f"{where}: version {version!r} is not supported; this diffprune reads "
                             f"version {STATE_VERSION}; {hint}")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise DiffpruneError(f"{where}: missing keys {missing}; {hint}")
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise DiffpruneError(f"{where}: step={step!r} is not an integer >= 1; {hint}")
    if not isinstance(state["config"], dict):
        raise DiffpruneError(f"{where}: 'config' must be a JSON object; {hint}")
    history = state.get("history", [])
    if not isinstance(history, list) or not all(isinstance(r, dict) and isinstance(r.get("step"), int | float)
                                                for r in history):
        raise DiffpruneError(f"{where}: 'history' must be a list of records with a 'step'; {hint}")


def check_resumable(state: dict, config: TrainingConfig, fingerprint: str, world: int, path: Path) -> None:
    """Refuse a checkpoint made for another model, config or process count (one line, first difference)."""
    from .config import upgrade_config_dict

    old = upgrade_config_dict(state.get("config", {}))
    if old.get("stage") != config.stage:
        raise DiffpruneError(f"--resume: {path} comes from a {old.get('stage')!r} run, not {config.stage!r}")
    new = config.to_dict()
    for key in sorted(set(old) | set(new)):
        if key not in RESUME_FREE_KEYS and old.get(key) != new.get(key):
            raise DiffpruneError(f"--resume: checkpoint {path} was made with {key}={old.get(key)!r}, this run "
                                 f"has {key}={new.get(key)!r}; use the same settings or a new --output-dir")
    if state.get("model_fingerprint") != fingerprint:
        raise DiffpruneError(f"--resume: checkpoint {path} was made for a different model (the weights at "
                             f"{new.get('model', 'the model config')!r} changed); use a new --output-dir")
    if state.get("num_processes") != world:
        raise DiffpruneError(f"--resume: checkpoint {path} was made with {state.get('num_processes')} "
                             f"processes, this run has {world}; the data order depends on it")
    if int(state.get("step", -1)) > config.steps:
        raise DiffpruneError(f"--resume: checkpoint {path} is at step {state['step']}, beyond "
                             f"--steps={config.steps}")
