"""The train stage (layer 5): `finetune` (post-training a pruned pipeline) and `train` (a fresh
UNet2DModel) as functions. May import the shared layers, `data`, `families`, `io` and `prune`.

One loop serves both (loop.py); defaults follow the paper's post-training recipe (PAPER.md,
"Post-training recipe"). The pieces: config.py (configs), fresh_model.py (a new UNet2DModel),
parts.py (seeds, batch order, Adam, EMA), files.py (run folders, export), setup.py (building a
run), loop.py (the loop, losses, caption dropout, checkpoints), checkpoints.py (checkpoint I/O),
distillation.py (feature taps and adapters). `diffprune.train(...)` calls this package: `train` below
(see `stage_call`).
"""

from __future__ import annotations

from pathlib import Path

from ..stage_call import make_callable
from .config import (  # noqa: F401
    BETA_SCHEDULES,
    DISTILL_MODES,
    EMA_WARMUPS,
    MIXED_PRECISION,
    FinetuneConfig,
    TrainConfig,
    TrainingConfig,
    make_config,
)
from .files import LOG_KEYS, TRAIN_LOG, export_pipeline, plan_run_dir, training_inputs  # noqa: F401
from .fresh_model import build_unet, read_unet_config, scheduler_config, unet_config  # noqa: F401
from .loop import run_training
from .parts import EMA, StepBatches, batch_stream, derive_seed, make_optimizer, set_dropout  # noqa: F401

make_callable(__name__, "diffprune.train:train")


def _run_kwargs(kwargs: dict) -> dict:
    keys = ("device", "resume", "overwrite", "max_steps_this_run", "progress", "tensorboard")
    return {k: kwargs.pop(k) for k in keys if k in kwargs}


def finetune(model: str | Path, data: str | Path, output_dir: str | Path, **kwargs) -> Path:
    """Post-train a (pruned) pipeline folder; returns the output pipeline folder.

    kwargs: any FinetuneConfig field (steps, batch_size, lr, distill, teacher, ...) and
    device / resume / overwrite / max_steps_this_run / progress / tensorboard.
    """
    run_kwargs = _run_kwargs(kwargs)
    model = str(Path(model).absolute()) if Path(model).exists() else str(model)
    for key in ("teacher", "prompt_embeds"):
        if kwargs.get(key) is not None and Path(kwargs[key]).exists():
            kwargs[key] = str(Path(kwargs[key]).absolute())
    config = make_config(FinetuneConfig, model=model, data=_data_str(data), **kwargs)
    return run_training(config, output_dir, **run_kwargs)


def train(data: str | Path, output_dir: str | Path, model_config: dict | str | Path | None = None,
          scheduler: dict | None = None, **kwargs) -> Path:
    """Train a fresh UNet2DModel; returns the output pipeline folder.

    model_config: a dict of UNet2DModel arguments, a JSON file path, or None for `unet_config()`
    (the DDPM CIFAR-10 architecture); scheduler: DDPMScheduler arguments (default
    `scheduler_config()`, 1000 linear steps, epsilon). kwargs as in `finetune`.
    """
    run_kwargs = _run_kwargs(kwargs)
    if model_config is None:
        model_config = unet_config()
    elif not isinstance(model_config, dict):
        model_config = read_unet_config(model_config)
    config = make_config(TrainConfig, data=_data_str(data), model_config=dict(model_config),
                          scheduler_config=dict(scheduler or scheduler_config()), **kwargs)
    return run_training(config, output_dir, **run_kwargs)


def _data_str(data: str | Path) -> str:
    return str(Path(data).absolute()) if Path(data).exists() else str(data)
