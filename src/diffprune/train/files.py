"""Run folders of `finetune` / `train`: planning (fresh, --resume, --overwrite), inputs, pipeline export, log.

Run folder: `<out>/checkpoints/step_XXXXXX/` (checkpoints.py), `<out>/logs/` (TensorBoard),
`<out>/train_log.json`, `<out>/<stage>_config.json`, and at the end the pipeline files
(model_index.json, the denoiser's unet/ or transformer/, scheduler/, ...) with the EMA weights.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from pathlib import Path

from ..errors import DiffpruneError
from ..fsutil import check_output_dir, read_json, replace_dir
from .checkpoints import checkpoint_dirs
from .config import TrainingConfig

TRAIN_LOG = "train_log.json"
LOG_KEYS = ("step", "loss", "loss_task", "loss_output_kd", "loss_feature_kd", "lr", "ema_decay",
            "steps_per_s", "elapsed_s")


def plan_run_dir(output_dir: Path, overwrite: bool, resume: bool,
                 stage: str | None = None) -> tuple[Path, Path | None]:
    """(work dir, checkpoint to resume from or None). Read-only, so every process may call it.

    --overwrite of an existing folder (only one `stage` wrote: fsutil.check_output_dir) trains in a
    sibling `.<name>.new` that replaces it only when the run completes; --resume looks there first.
    """
    staging = output_dir.parent / f".{output_dir.name}.new"
    exists = output_dir.is_dir() and any(output_dir.iterdir())
    if resume:
        for cand in (staging, output_dir):
            ckpts = checkpoint_dirs(cand)
            if ckpts:
                return cand, ckpts[-1]
        if exists:
            raise DiffpruneError(f"--resume: no checkpoint under {str(output_dir)!r}; nothing to resume "
                                 "(use --overwrite to start over)")
        check_output_dir(output_dir, False, stage)
        return output_dir, None
    if exists and overwrite:
        check_output_dir(output_dir, True, stage)
        return staging, None
    if exists:
        raise DiffpruneError(f"output dir {str(output_dir)!r} already exists; pass --resume to continue "
                             "its run or --overwrite to replace it")
    check_output_dir(output_dir, False, stage)
    return output_dir, None


def discard_unresumable(work: Path, output_dir: Path, existed: bool) -> None:
    """A run that failed or was interrupted before its first checkpoint leaves nothing behind (a folder
    without a checkpoint could not be resumed): a staging folder is removed, and so is what the run
    wrote into the output folder (the folder itself too, unless it existed, empty, before the run)."""
    if not work.is_dir() or checkpoint_dirs(work):
        return
    if work != output_dir or not existed:
        shutil.rmtree(work, ignore_errors=True)
        return
    for item in work.iterdir():
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                item.unlink()


def training_inputs(config: TrainingConfig) -> dict[str, str | None]:
    """Every path a finetune/train run reads, by option name (fsutil.check_output_location).

    Distillation without --teacher reads the base model the pruned folder records (`_load_teacher`):
    that folder is an input too.
    """
    inputs = {"--model": getattr(config, "model", None), "--teacher": getattr(config, "teacher", None),
              "--data": config.data, "--captions": getattr(config, "captions", None),
              "--prompt-embeds": getattr(config, "prompt_embeds", None)}
    if getattr(config, "distill", "none") != "none" and inputs["--teacher"] is None and inputs["--model"]:
        inputs["the recorded base model"] = _recorded_base_model(Path(inputs["--model"]))
    return inputs


def _recorded_base_model(model: Path) -> str | None:
    """base_model.id of the first pruning.json in a pipeline folder's components, if any."""
    from ..io.pipeline import PRUNING_FILE

    for record in sorted(model.glob(f"*/{PRUNING_FILE}")) if model.is_dir() else []:
        with contextlib.suppress(DiffpruneError):
            base = (read_json(record, "pruning record", dict).get("base_model") or {})
            if isinstance(base, dict) and isinstance(base.get("id"), str):
                return base["id"]
    return None


def export_pipeline(pipe, unet, run_dir: Path, component: str = "unet", portable: bool = False) -> None:
    """Write `pipe` with `unet` as a pipeline folder into run_dir; model_index.json goes in last.

    `portable`: a pruned `unet` also gets the code plain diffusers needs (portable.make_portable)."""
    from ..io.pipeline import save_pipeline

    pipe = copy.copy(pipe)
    pipe.register_modules(**{component: unet})
    tmp = run_dir / f".pipeline.tmp-{os.getpid()}"
    for stale in run_dir.glob(".pipeline.tmp-*"):  # left by a killed run (the output dir is locked)
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        save_pipeline(pipe, tmp, portable=portable)
        (run_dir / "model_index.json").unlink(missing_ok=True)
        for item in sorted(tmp.iterdir()):
            if item.name != "model_index.json":
                if item.is_dir():
                    replace_dir(item, run_dir / item.name)
                else:
                    os.replace(item, run_dir / item.name)
        os.replace(tmp / "model_index.json", run_dir / "model_index.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
