"""Building a training run: accelerator, model, teacher, adapters, data, conditioning, checkpoint state.

Everything the loop (loop.py) touches is gathered once in a `Run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import DiffpruneError
from ..fsutil import output_lock, write_json_atomic
from ..io.structure import model_fingerprint
from .checkpoints import (
    check_resumable,
    first_line,
    optimizer_from_files,
    read_checkpoint,
)
from .config import COND_DROP_TEXT, FinetuneConfig, TrainingConfig
from .distillation import FeatureTap, Student, feature_points, make_adapters, sample_size_of
from .files import discard_unresumable, plan_run_dir
from .fresh_model import build_unet
from .parts import EMA, IndexedDataset, derive_seed, make_optimizer, reinit_weights, set_dropout


@dataclasses.dataclass
class Run:
    """Everything the loop touches, built once by `setup_run`."""

    config: TrainingConfig
    accelerator: Any
    work: Path
    output_dir: Path
    pipe: Any  # the pipeline whose unet is trained (exported with the EMA weights)
    unet: Any
    scheduler: Any
    dataset: Any
    teacher: Any = None
    teacher_tap: FeatureTap | None = None
    student: Student | None = None
    optimizer: Any = None
    ema: EMA | None = None
    start_step: int = 0
    history: list = dataclasses.field(default_factory=list)
    fingerprint: str = ""
    ctx: Any = None  # families.conditioning.PipelineContext: family, latent codec, conditioning
    existed: bool = True  # the work folder existed before this run (files.discard_unresumable keeps it)


def on_main(acc, fn, what: str) -> None:
    """Run `fn` on the main process; if it raises DiffpruneError, every process raises (no hang)."""
    error = None
    if acc.is_main_process:
        try:
            fn()
        except DiffpruneError as err:
            error = err
    failed = acc.reduce(torch.tensor([1.0 if error else 0.0], device=acc.device), "sum")
    if error is not None:
        raise error
    if float(failed.item()) > 0:
        raise DiffpruneError(f"the main process {what}; see its message")


def _make_accelerator(config: TrainingConfig, device: torch.device, work: Path, tensorboard: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if config.mixed_precision == "fp16" and device.type == "cpu":
        raise DiffpruneError("mixed_precision='fp16' needs a GPU (--device cuda); on CPU use 'no' or 'bf16'")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process: a fresh state, so repeated in-process runs may use other devices/precisions.
        AcceleratorState._reset_state(reset_partial_state=True)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=config.mixed_precision,
                       log_with="tensorboard" if tensorboard else None, project_dir=str(work / "logs"))


def _load_model(config: TrainingConfig):
    """(pipeline, unet, scheduler) to train, before any checkpoint is applied."""
    from diffusers import DDPMPipeline, DDPMScheduler

    from ..io.pipeline import load_pipeline

    if isinstance(config, FinetuneConfig):
        from ..families.pipeline_parts import denoiser_of

        pipe = load_pipeline(config.model, device="cpu", text_encoders=config.prompt_embeds is None,
                             revision=config.revision, variant=config.variant)
        _, unet = denoiser_of(pipe)  # any supported family; raises naming the supported ones
        if config.reinit:
            reinit_weights(unet, config.seed)
        return pipe, unet, pipe.scheduler
    unet = build_unet(dict(config.model_config), config.seed)
    try:
        scheduler = DDPMScheduler(**config.scheduler_config)
    except (TypeError, ValueError, NotImplementedError) as err:
        raise DiffpruneError(f"scheduler config is invalid ({str(err).splitlines()[0]})") from None
    return DDPMPipeline(unet=unet, scheduler=scheduler), unet, scheduler


def _load_teacher(config: FinetuneConfig, unet, device):
    from ..io.pipeline import load_pipeline

    path = config.teacher
    if path is None:
        base = (getattr(unet, "pruning_info", None) or {}).get("base_model", {}) or {}
        path = base.get("id")
        if not path or not Path(path).is_dir():
            raise DiffpruneError(f"--distill={config.distill} needs --teacher: the model records no local "
                                 f"base model folder (base_model id={path!r})")
    from ..families.pipeline_parts import denoiser_of

    _, teacher = denoiser_of(load_pipeline(path, device="cpu", text_encoders=False,  # its denoiser only
                                           variant=config.variant))
    for key in ("in_channels", "out_channels", "sample_size"):
        if teacher.config[key] != unet.config[key]:
            raise DiffpruneError(f"teacher {path!r} has {key}={teacher.config[key]!r}, the student "
                                 f"{unet.config[key]!r}; distillation needs the same inputs and outputs")
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def setup_run(config, output_dir, device, resume, overwrite, tensorboard, locks: contextlib.ExitStack) -> Run:
    """The Run for `run_training`: output locked (into `locks`), run folder planned (fresh, resume, overwrite),
    model, data, teacher, EMA and optimizer built, a checkpoint applied when resuming."""
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if single:  # lock before planning, so a second run names the lock, not the half-written folder
        locks.enter_context(output_lock(output_dir))
    work, ckpt = plan_run_dir(output_dir, overwrite, resume, config.stage)
    existed = work == output_dir and work.is_dir()  # an empty folder the user made stays
    acc = _make_accelerator(config, device, work, tensorboard)
    if not single:  # every process learns if the main one could not lock (no hang)
        on_main(acc, lambda: locks.enter_context(output_lock(output_dir)), "could not lock the output dir")
    if acc.is_main_process and ckpt is None and work != output_dir:
        shutil.rmtree(work, ignore_errors=True)  # a stale staging folder of an interrupted --overwrite run
    pipe, unet, scheduler = _load_model(config)
    ctx = _context(config, pipe, unet)
    config = resolve_cond_drop(config, ctx)
    dataset = _dataset(config, unet, ctx)
    run = Run(config, acc, work, output_dir, pipe, unet, scheduler, dataset,
              fingerprint=model_fingerprint(unet), ctx=ctx, existed=existed)
    state = tensors = meta = None
    if ckpt is not None:
        state, tensors, meta = read_checkpoint(ckpt)
        check_resumable(state, config, run.fingerprint, acc.num_processes, ckpt)
    set_dropout(unet, config.dropout)
    unet.to(acc.device).train()
    ctx.to(acc.device)
    names, adapters = [], None
    if isinstance(config, FinetuneConfig) and config.distill != "none":
        run.teacher = _load_teacher(config, unet, acc.device)
        if config.distill in ("features", "both"):
            if not hasattr(unet, "down_blocks"):
                raise DiffpruneError(f"--distill={config.distill}: feature distillation needs a UNet; "
                                     f"{type(unet).__name__} has no down/up blocks (use --distill output)")
            names = feature_points(unet)
            torch.manual_seed(derive_seed(config.seed, 4242))  # adapter init: same on every run/process
            adapters = make_adapters(unet, run.teacher, names, acc.device, ctx.family)
            run.teacher_tap = FeatureTap(run.teacher, names)
    run.student = Student(unet, adapters, names, ctx.family)
    if tensors is not None:
        _apply_checkpoint(run, state, tensors, meta)
    run.ema = run.ema or EMA(unet, config.ema_decay, config.ema_warmup)
    run.optimizer = run.optimizer or make_optimizer(run.student, config.lr)
    try:
        if acc.is_main_process:
            (work / "logs").mkdir(parents=True, exist_ok=True)
            write_json_atomic(work / f"{config.stage}_config.json", config.to_dict())
        acc.wait_for_everyone()
        run.student, run.optimizer = acc.prepare(run.student, run.optimizer)
        if tensorboard:
            acc.init_trackers("diffprune")
    except BaseException:
        if acc.is_main_process:
            discard_unresumable(work, output_dir, existed)
        raise
    return run


def resolve_cond_drop(config: TrainingConfig, ctx) -> TrainingConfig:
    """The config with `cond_drop_prob` resolved: None -> COND_DROP_TEXT for text-conditional UNets,
    0 otherwise; a probability > 0 for an unconditional model is refused."""
    if not isinstance(config, FinetuneConfig):
        return config
    text = ctx.text
    p = config.cond_drop_prob
    if p is None:
        return dataclasses.replace(config, cond_drop_prob=COND_DROP_TEXT if text else 0.0)
    if p > 0 and not ctx.family.conditional:
        raise DiffpruneError(f"cond_drop_prob={p} applies to conditional models (Stable Diffusion, DiT); "
                             f"{type(ctx.model).__name__} is unconditional: use 0")
    return config


def _context(config: TrainingConfig, pipe, unet):
    """Family, latent codec and conditioning source of the trained denoiser (families/conditioning.py):
    the pipeline's text encoders, or the prompt-embeddings file `prompt_embeds` (finetune)."""
    from ..families import family_for
    from ..families.conditioning import context_for, load_prompt_embeds

    embeds = load_prompt_embeds(getattr(config, "prompt_embeds", None))
    return context_for(pipe, family_for(unet), unet, embeds)


def _dataset(config: TrainingConfig, unet, ctx=None):
    from ..data import make_dataset

    size = sample_size_of(unet)
    if size[0] != size[1]:
        raise DiffpruneError(f"sample_size={list(size)}: only square models can be trained yet")
    pixels, channels = ctx.data_size() if ctx is not None else (size[0], int(unet.config.in_channels))
    dataset = make_dataset(config.data, pixels, channels)
    if len(dataset) == 0:
        raise DiffpruneError(f"data {config.data!r} holds no images")
    if ctx is not None and ctx.family.conditional:
        from ..families.conditioning import attach_dataset

        attach_dataset(ctx, dataset, str(config.data), prompt=getattr(config, "prompt", None),
                       captions=getattr(config, "captions", None),
                       class_labels=getattr(config, "class_labels", None), seed=config.seed, label_fallback="null")
        return IndexedDataset(dataset)
    return dataset


def _apply_checkpoint(run: Run, state: dict, tensors: dict, meta: dict) -> None:
    """Load weights, EMA, adapters and optimizer state of a checkpoint into the (unprepared) run."""
    unet, where = run.unet, tensors
    try:
        unet.load_state_dict(where["model.safetensors"], strict=True)
        if "adapters.safetensors" in where:
            run.student.adapters.load_state_dict(where["adapters.safetensors"], strict=True)
    except RuntimeError as err:
        raise DiffpruneError(f"--resume: checkpoint weights do not fit this model "
                             f"({str(err).strip().splitlines()[0]})") from None
    ema = EMA(unet, run.config.ema_decay, run.config.ema_warmup)
    missing = set(ema.shadow) ^ set(where["ema.safetensors"])
    if missing:
        raise DiffpruneError(f"--resume: ema.safetensors does not fit this model (e.g. {sorted(missing)[0]})")
    ema.shadow = {k: v.to(unet.device) for k, v in where["ema.safetensors"].items()}
    run.ema = ema
    opt = make_optimizer(run.student, run.config.lr)
    try:
        opt.load_state_dict(optimizer_from_files(where["optimizer.safetensors"], meta))
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError, IndexError) as err:
        raise DiffpruneError(f"--resume: optimizer state does not fit this model ({first_line(err)})") from None
    run.optimizer = opt
    run.start_step = int(state["step"])
    run.history = [r for r in state.get("history", []) if r["step"] <= run.start_step]
    if "scaler" in meta and run.accelerator.scaler is not None:
        run.accelerator.scaler.load_state_dict(meta["scaler"])
