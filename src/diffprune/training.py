"""One training loop for `finetune` (post-training a pruned model) and `train` (a fresh UNet2DModel).

Defaults follow the paper's post-training recipe (PAPER.md, "Post-training recipe"): Adam, lr 2e-4
constant (optional linear warmup), EMA 0.9999, dropout 0.1 on the ResNet blocks, grad-norm clip 1.0,
the DDPM noise-prediction loss L_t = ||target - model(x_t, t)||^2 with t ~ U{0, ..., T-1}
(`diffusion.noisy_and_target`; the target follows the scheduler's prediction type). The output
pipeline holds the EMA weights, since the paper evaluates EMA; raw weights stay in the checkpoints.

Optional knowledge distillation from the unpruned teacher (not in the paper's main results):
- "output": + distill_weight * ||student(x_t, t) - teacher(x_t, t)||^2 on the same x_t.
- "features": + feature_weight * mean over the outputs of down_blocks[i], mid_block, up_blocks[i] of
  ||A(student feature) - teacher feature||^2, where A is a learnable 1x1 conv (student width ->
  teacher width; pruning changes widths). Adapters train jointly, are checkpointed for resuming,
  and are not part of the saved model. Taps and adapters: distillation.py.

Determinism: each step's randomness is a function of (seed, step, micro-step, process index): the
batch positions (an epoch-wise permutation stream), the timesteps and the noise come from a generator
seeded from those numbers, and `torch.manual_seed` is reset from them before each forward (dropout).
Hence resuming from a checkpoint reproduces an uninterrupted run bit for bit (on CPU; CUDA kernels
may add their own nondeterminism).

Run folder: `<out>/checkpoints/step_XXXXXX/` (layout, writing and resume checks: checkpoints.py),
`<out>/logs/` (TensorBoard), `<out>/train_log.json`, `<out>/<stage>_config.json`, and at the end the
pipeline files (model_index.json, unet/, scheduler/) with the EMA weights.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from tqdm.auto import tqdm

from . import diffusion
from .checkpoints import (
    CHECKPOINTS,
    STATE_FILE,
    STATE_VERSION,
    _first_line,
    check_resumable,
    checkpoint_dirs,
    optimizer_from_files,
    optimizer_to_files,
    read_checkpoint,
    write_checkpoint,
)
from .config import StageConfig
from .distillation import FeatureTap, Student, _size, feature_points, make_adapters
from .errors import DiffpruneError, check_range, write_error
from .fsutil import (
    check_output_dir,
    check_output_location,
    output_lock,
    read_json,
    replace_dir,
    write_json_atomic,
)

DISTILL_MODES = ("none", "output", "features", "both")
EMA_WARMUPS = ("none", "ratio", "power")
MIXED_PRECISION = ("no", "fp16", "bf16")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
TRAIN_LOG = "train_log.json"
LOG_KEYS = ("step", "loss", "loss_task", "loss_output_kd", "loss_feature_kd", "lr", "ema_decay",
            "steps_per_s", "elapsed_s")


# --------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingConfig(StageConfig):
    """Settings shared by `finetune` and `train` (the paper's recipe as defaults)."""

    stage = "training"
    version = 1

    data: str
    steps: int = 1000
    batch_size: int = 128
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: str = "none"
    dropout: float = 0.1
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    num_workers: int = 0

    def __post_init__(self):
        check_range("steps", self.steps, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("grad_accum", self.grad_accum, 1)
        check_range("lr", self.lr, 0.0, 1.0, low_open=True)
        check_range("warmup_steps", self.warmup_steps, 0)
        check_range("max_grad_norm", self.max_grad_norm, 0.0)
        check_range("ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        check_range("dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_range("seed", self.seed, 0)
        check_range("checkpoint_every", self.checkpoint_every, 1)
        check_range("keep_checkpoints", self.keep_checkpoints, 1)
        check_range("log_every", self.log_every, 1)
        check_range("num_workers", self.num_workers, 0)
        _check_choice("ema_warmup", self.ema_warmup, EMA_WARMUPS)
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        for name in ("steps", "batch_size", "grad_accum", "warmup_steps", "seed", "checkpoint_every",
                     "keep_checkpoints", "log_every", "num_workers"):
            if int(getattr(self, name)) != getattr(self, name):
                raise DiffpruneError(f"{name}={getattr(self, name)!r} must be an integer")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig(TrainingConfig):
    """Post-training of a (pruned) pipeline folder, optionally distilled from a teacher."""

    stage = "finetune"

    model: str
    teacher: str | None = None
    distill: str = "none"
    distill_weight: float = 1.0
    feature_weight: float = 1.0
    reinit: bool = False
    prompt: str | None = None  # text-conditional UNets: one prompt for every image
    captions: str | None = None  # or a captions file (default: captions.jsonl/.txt in the data folder)
    class_labels: str | None = None  # DiT: labels cycled over images (default: class folders, else null)

    def __post_init__(self):
        super().__post_init__()
        _check_choice("distill", self.distill, DISTILL_MODES)
        check_range("distill_weight", self.distill_weight, 0.0)
        check_range("feature_weight", self.feature_weight, 0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(TrainingConfig):
    """Training a fresh UNet2DModel from its config and a DDPMScheduler config."""

    stage = "train"

    model_config: dict
    scheduler_config: dict


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise DiffpruneError(f"{name}={value!r} is not supported; allowed: {allowed}")


# --------------------------------------------------------------------------- fresh models


def unet_config(*, sample_size: int = 32, in_channels: int = 3, out_channels: int | None = None,
                block_out_channels: tuple[int, ...] = (128, 256, 256, 256), layers_per_block: int = 2,
                attention_levels: tuple[int, ...] = (1,), norm_num_groups: int = 32,
                attention_head_dim: int | None = None) -> dict[str, Any]:
    """A UNet2DModel config; the defaults are the DDPM CIFAR-10 architecture (35.7M params).

    Attention sits at the levels in `attention_levels` (0 = full resolution); `attention_head_dim`
    None means one head spanning all channels, as in DDPM.
    """
    levels = len(block_out_channels)
    check_range("sample_size", sample_size, 1)
    check_range("in_channels", in_channels, 1)
    check_range("layers_per_block", layers_per_block, 1)
    check_range("norm_num_groups", norm_num_groups, 1)
    if levels < 1 or any(int(c) < 1 for c in block_out_channels):
        raise DiffpruneError(f"block_out_channels={list(block_out_channels)} must be positive integers")
    bad = [c for c in block_out_channels if c % norm_num_groups]
    if bad:
        raise DiffpruneError(f"block_out_channels={list(block_out_channels)}: {bad[0]} is not divisible by "
                             f"norm_num_groups={norm_num_groups}")
    if sample_size % (2 ** (levels - 1)):
        raise DiffpruneError(f"sample_size={sample_size} must be divisible by 2^(levels-1)={2 ** (levels - 1)} "
                             f"for {levels} levels")
    wrong = [a for a in attention_levels if not 0 <= a < levels]
    if wrong:
        raise DiffpruneError(f"attention_levels={list(attention_levels)}: {wrong[0]} is not a level index in "
                             f"[0, {levels - 1}]")
    if attention_head_dim is not None:
        check_range("attention_head_dim", attention_head_dim, 1)
        # diffusers makes width // head_dim heads; the mid block (last width) always has attention
        narrow = min([block_out_channels[a] for a in attention_levels] + [block_out_channels[-1]])
        if attention_head_dim > narrow:
            raise DiffpruneError(f"attention_head_dim={attention_head_dim} is wider than the narrowest "
                                 f"attention level ({narrow} channels, mid block included); allowed: [1, {narrow}]")
    down = ["AttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in range(levels)]
    up = ["AttnUpBlock2D" if i in attention_levels else "UpBlock2D" for i in reversed(range(levels))]
    return {"sample_size": sample_size, "in_channels": in_channels,
            "out_channels": in_channels if out_channels is None else out_channels,
            "block_out_channels": list(block_out_channels), "layers_per_block": layers_per_block,
            "down_block_types": down, "up_block_types": up, "norm_num_groups": norm_num_groups,
            "attention_head_dim": attention_head_dim, "flip_sin_to_cos": False, "freq_shift": 1,
            "downsample_padding": 0}


def read_unet_config(path: str | Path) -> dict[str, Any]:
    """A UNet2DModel config from a JSON file (a diffusers config.json works; `_` keys are dropped)."""
    data = read_json(path, "model config")
    return {k: v for k, v in data.items() if not k.startswith("_")}


def scheduler_config(num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                     prediction_type: str = "epsilon") -> dict[str, Any]:
    check_range("num_train_timesteps", num_train_timesteps, 2)
    _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    _check_choice("prediction_type", prediction_type, diffusion.PREDICTION_TYPES)
    return {"num_train_timesteps": int(num_train_timesteps), "beta_schedule": beta_schedule,
            "prediction_type": prediction_type}


def build_unet(config: dict[str, Any], seed: int):
    """UNet2DModel(**config) with weights drawn under `seed`; bad keys/values -> DiffpruneError."""
    import inspect

    from diffusers import UNet2DModel

    allowed = set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise DiffpruneError(f"model config has unknown keys {unknown} for UNet2DModel")
    from .structure import validate_structure

    torch.manual_seed(seed)
    try:
        model = UNet2DModel(**config)
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError, ZeroDivisionError) as err:
        raise DiffpruneError(f"model config is not a valid UNet2DModel ({str(err).splitlines()[0]})") from None
    validate_structure(model, "model config")  # e.g. attention heads = width // head_dim = 0
    return model


# --------------------------------------------------------------------------- seeds and data


def derive_seed(*numbers: int) -> int:
    """A 63-bit seed that is a fixed function of `numbers` (e.g. seed, step, micro-step, rank)."""
    state = np.random.SeedSequence([int(n) for n in numbers]).generate_state(1, np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


class StepBatches(torch.utils.data.Sampler):
    """Index lists for micro-steps start, start+1, ...: an endless stream of per-epoch permutations.

    Micro-step m on process r of w takes stream positions [(m*w + r)*B, (m*w + r + 1)*B), so the
    data seen at a step depends only on (seed, step, r, w), never on where a run was resumed.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int, world: int, start: int):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world, self.start = rank, world, start
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(derive_seed(self.seed, 7919, epoch))
            self._perms[epoch] = torch.randperm(self.size, generator=g)
        return self._perms[epoch]

    def __iter__(self) -> Iterator[list[int]]:
        micro = self.start
        while True:
            base = (micro * self.world + self.rank) * self.batch_size
            yield [int(self._perm(p // self.size)[p % self.size]) for p in range(base, base + self.batch_size)]
            micro += 1


def batch_stream(dataset, config: TrainingConfig, rank: int, world: int, start_micro: int):
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatches(len(dataset), config.batch_size, config.seed, rank, world,
                                           start_micro),
        num_workers=config.num_workers)
    return iter(loader)


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Adam:
    """Adam (the paper's optimizer), fused into one kernel where torch has one for the device.

    Fused Adam computes the same update as the default foreach loop (up to float rounding) at a
    fraction of its cost: 26 vs 70 ms per step on CPU for the CIFAR-size UNet (2.7x)
    (benchmarks/finetune_throughput.py). Resumed runs build it the same way.
    """
    params = list(model.parameters())
    devices = {p.device.type for p in params}
    fused = len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


# --------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a model's floating tensors, kept in float32.

    Decay at update k (0-based): "none" -> decay (the paper's constant 0.9999); "ratio" ->
    min(decay, (1 + k) / (10 + k)) (diffusers' EMAModel default); "power" -> min(decay,
    1 - (1 + k)^(-2/3)) (diffusers' use_ema_warmup, inv_gamma 1, power 2/3).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: str = "none"):
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                       for k, v in model.state_dict().items()}

    def decay_at(self, k: int) -> float:
        if self.warmup == "ratio":
            return min(self.decay, (1 + k) / (10 + k))
        if self.warmup == "power":
            return min(self.decay, 1 - (1 + k) ** (-2 / 3))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, k: int) -> float:
        """shadow <- shadow + (1 - decay) * (value - shadow), one fused foreach kernel per dtype group."""
        decay = self.decay_at(k)
        floats, values = [], []
        for name, value in model.state_dict().items():
            shadow = self.shadow[name]
            if shadow.is_floating_point():
                floats.append(shadow)
                values.append(value.detach().float())
            else:
                shadow.copy_(value)
        if floats:
            torch._foreach_lerp_(floats, values, 1 - decay)
        return decay

    def state_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The shadow cast to `model`'s dtypes, ready for load_state_dict."""
        ref = model.state_dict()
        return {k: v.to(ref[k].dtype) for k, v in self.shadow.items()}


# --------------------------------------------------------------------------- model setup


def set_dropout(unet: nn.Module, p: float) -> int:
    """Set the dropout of every ResnetBlock2D (DDPM's dropout site); returns how many were set."""
    n = 0
    for module in unet.modules():
        if type(module).__name__ == "ResnetBlock2D" and isinstance(getattr(module, "dropout", None), nn.Dropout):
            module.dropout.p = p
            n += 1
    return n


def reinit_weights(unet: nn.Module, seed: int) -> None:
    """Fresh default initialisation of every layer (the paper's "scratch" baseline on a pruned arch)."""
    torch.manual_seed(seed)
    for module in unet.modules():
        if hasattr(module, "reset_parameters") and module is not unet:
            module.reset_parameters()


# --------------------------------------------------------------------------- run folders


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


def training_inputs(config: TrainingConfig) -> dict[str, str | None]:
    """Every path a finetune/train run reads, by option name (fsutil.check_output_location).

    Distillation without --teacher reads the base model the pruned folder records (`_load_teacher`):
    that folder is an input too.
    """
    inputs = {"--model": getattr(config, "model", None), "--teacher": getattr(config, "teacher", None),
              "--data": config.data, "--captions": getattr(config, "captions", None)}
    if getattr(config, "distill", "none") != "none" and inputs["--teacher"] is None and inputs["--model"]:
        inputs["the recorded base model"] = _recorded_base_model(Path(inputs["--model"]))
    return inputs


def _recorded_base_model(model: Path) -> str | None:
    """base_model.id of the first pruning.json in a pipeline folder's components, if any."""
    from .io import PRUNING_FILE

    for record in sorted(model.glob(f"*/{PRUNING_FILE}")) if model.is_dir() else []:
        with contextlib.suppress(DiffpruneError):
            base = (read_json(record, "pruning record", dict).get("base_model") or {})
            if isinstance(base, dict) and isinstance(base.get("id"), str):
                return base["id"]
    return None


def export_pipeline(pipe, unet, run_dir: Path, component: str = "unet") -> None:
    """Write `pipe` with `unet` as a pipeline folder into run_dir; model_index.json goes in last."""
    from .io import save_pipeline

    pipe = copy.copy(pipe)
    pipe.register_modules(**{component: unet})
    tmp = run_dir / f".pipeline.tmp-{os.getpid()}"
    for stale in run_dir.glob(".pipeline.tmp-*"):  # left by a killed run (the output dir is locked)
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        save_pipeline(pipe, tmp)
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


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class _Run:
    """Everything the loop touches, built once by `_setup`."""

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


def lr_at(config: TrainingConfig, step: int) -> float:
    """Constant lr (paper) after an optional linear warmup over `warmup_steps` optimizer steps."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr


def run_training(config: TrainingConfig, output_dir: str | Path, *, device: str | torch.device = "cpu",
                 resume: bool = False, overwrite: bool = False, max_steps_this_run: int | None = None,
                 progress: bool = True, tensorboard: bool = True) -> Path:
    """Train per `config` into `output_dir` (layout in the module docstring); returns output_dir.

    `max_steps_this_run` stops after that many steps with a checkpoint (resume later with
    `resume=True`); the pipeline files are written only when `config.steps` is reached.
    """
    if max_steps_this_run is not None:
        check_range("max_steps_this_run", max_steps_this_run, 1)
    output_dir = check_output_location(output_dir, training_inputs(config))  # before any work, whatever the flags
    locks = contextlib.ExitStack()  # the output-dir lock (main process), held until the run ends
    try:
        run = _setup(config, output_dir, torch.device(device), resume, overwrite, tensorboard,
                     locks)
    except BaseException:
        locks.close()
        raise
    acc = run.accelerator
    end = config.steps if max_steps_this_run is None else min(config.steps, run.start_step + max_steps_this_run)
    finished = False
    try:
        _loop(run, end, progress and acc.is_main_process)
        _remove_taps(run)
        if end < config.steps:
            if acc.is_main_process:
                print(f"stopped at step {end} of {config.steps}; checkpoint in {run.work / CHECKPOINTS}; "
                      "continue with --resume")
        else:
            _check_in_sync(acc, acc.unwrap_model(run.student))
            for tracker in acc.trackers:
                tracker.finish()  # close the TensorBoard files before the folder may be renamed
            _on_main(acc, lambda: _finish(run), "could not write the final pipeline")
        finished = True
    finally:
        _remove_taps(run)
        _release(run, barrier=finished)
        locks.close()
    return run.output_dir


def _release(run: _Run, barrier: bool) -> None:
    """Free the DDP-wrapped model on every process, then end the process group.

    Destroying DDP after the group is gone, or while a peer already tore its group down, can hang
    (seen with gloo), hence free -> barrier -> end_training. No barrier after an error, which may
    have reached only some processes.
    """
    acc = run.accelerator
    run.student = run.optimizer = None
    acc.free_memory()
    gc.collect()
    if barrier:
        acc.wait_for_everyone()
    acc.end_training()


def _remove_taps(run: _Run) -> None:
    student = run.accelerator.unwrap_model(run.student) if run.student is not None else None
    for tap in (run.teacher_tap, getattr(student, "tap", None)):
        if tap is not None:
            tap.remove()


def _on_main(acc, fn, what: str) -> None:
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


def _check_in_sync(acc, model: nn.Module) -> None:
    """Every process must end with the same weights (DDP invariant); a mismatch is a bug, not bad input."""
    if acc.num_processes == 1:
        return
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64).sin()
        stats = torch.stack([flat.sum(), (flat * weights).sum()]).reshape(1, 2)
    gathered = acc.gather(stats)
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise RuntimeError(f"processes ended with different weights: {gathered.tolist()}")


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

    from .io import load_pipeline

    if isinstance(config, FinetuneConfig):
        from .prune_job import denoiser_of

        pipe = load_pipeline(config.model, device="cpu")
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
    from .io import load_pipeline

    path = config.teacher
    if path is None:
        base = (getattr(unet, "pruning_info", None) or {}).get("base_model", {}) or {}
        path = base.get("id")
        if not path or not Path(path).is_dir():
            raise DiffpruneError(f"--distill={config.distill} needs --teacher: the model records no local "
                                 f"base model folder (base_model id={path!r})")
    from .prune_job import denoiser_of

    _, teacher = denoiser_of(load_pipeline(path, device="cpu"))
    for key in ("in_channels", "out_channels", "sample_size"):
        if teacher.config[key] != unet.config[key]:
            raise DiffpruneError(f"teacher {path!r} has {key}={teacher.config[key]!r}, the student "
                                 f"{unet.config[key]!r}; distillation needs the same inputs and outputs")
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def _setup(config, output_dir, device, resume, overwrite, tensorboard, locks: contextlib.ExitStack) -> _Run:
    from .sampling import model_fingerprint

    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if single:  # lock before planning, so a second run names the lock, not the half-written folder
        locks.enter_context(output_lock(output_dir))
    work, ckpt = plan_run_dir(output_dir, overwrite, resume, config.stage)
    acc = _make_accelerator(config, device, work, tensorboard)
    if not single:  # every process learns if the main one could not lock (no hang)
        _on_main(acc, lambda: locks.enter_context(output_lock(output_dir)), "could not lock the output dir")
    if acc.is_main_process and ckpt is None and work != output_dir:
        shutil.rmtree(work, ignore_errors=True)  # a stale staging folder of an interrupted --overwrite run
    pipe, unet, scheduler = _load_model(config)
    ctx = _context(config, pipe, unet)
    dataset = _dataset(config, unet, ctx)
    run = _Run(config, acc, work, output_dir, pipe, unet, scheduler, dataset,
               fingerprint=model_fingerprint(unet), ctx=ctx)
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
    if acc.is_main_process:
        (work / "logs").mkdir(parents=True, exist_ok=True)
        write_json_atomic(work / f"{config.stage}_config.json", config.to_dict())
    acc.wait_for_everyone()
    run.student, run.optimizer = acc.prepare(run.student, run.optimizer)
    if tensorboard:
        acc.init_trackers("diffprune")
    return run


def _context(config: TrainingConfig, pipe, unet):
    """Family, latent codec and conditioning source of the trained denoiser (families/conditioning.py)."""
    from .families import family_for
    from .families.conditioning import context_for

    return context_for(pipe, family_for(unet), unet)


class IndexedDataset(torch.utils.data.Dataset):
    """(image, index) pairs, so a batch can look up its per-image prompts / class labels."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.skipped = getattr(dataset, "skipped", 0)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i], i


def _dataset(config: TrainingConfig, unet, ctx=None):
    from .data import make_dataset

    size = _size(unet)
    if size[0] != size[1]:
        raise DiffpruneError(f"sample_size={list(size)}: only square models can be trained yet")
    pixels, channels = ctx.data_size() if ctx is not None else (size[0], int(unet.config.in_channels))
    dataset = make_dataset(config.data, pixels, channels)
    if len(dataset) == 0:
        raise DiffpruneError(f"data {config.data!r} holds no images")
    if ctx is not None and ctx.family.conditional:
        from .families.conditioning import attach_dataset

        attach_dataset(ctx, dataset, str(config.data), prompt=getattr(config, "prompt", None),
                       captions=getattr(config, "captions", None),
                       class_labels=getattr(config, "class_labels", None), seed=config.seed, label_fallback="null")
        return IndexedDataset(dataset)
    return dataset


def _apply_checkpoint(run: _Run, state: dict, tensors: dict, meta: dict) -> None:
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
        raise DiffpruneError(f"--resume: optimizer state does not fit this model ({_first_line(err)})") from None
    run.optimizer = opt
    run.start_step = int(state["step"])
    run.history = [r for r in state.get("history", []) if r["step"] <= run.start_step]
    if "scaler" in meta and run.accelerator.scaler is not None:
        run.accelerator.scaler.load_state_dict(meta["scaler"])


def _micro_batch(run: _Run, batches, step: int, micro: int):
    """(x_t, t, target, cond) for one micro-step; all randomness from (seed, step, micro, rank).

    Latent pipelines train on encoded images (a posterior sample drawn from its own generator);
    conditional families look up each image's prompt / class label by dataset index.
    """
    acc, config = run.accelerator, run.config
    batch = next(batches)
    x0, idx = batch if isinstance(batch, list | tuple) else (batch, None)
    x0 = x0.to(acc.device)
    cond = run.ctx.cond_for(idx, acc.device) if run.ctx is not None and idx is not None else None
    if run.ctx is not None and run.ctx.codec is not None:
        g_latent = torch.Generator().manual_seed(derive_seed(config.seed, step, micro, acc.process_index, 2))
        x0 = run.ctx.to_model_space(x0, g_latent)
    g = torch.Generator().manual_seed(derive_seed(config.seed, step, micro, acc.process_index))
    T = diffusion.num_train_timesteps(run.scheduler)
    t = torch.randint(0, T, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    torch.manual_seed(derive_seed(config.seed, step, micro, acc.process_index, 1))  # dropout
    t, noise = t.to(acc.device), noise.to(acc.device)
    x_t, target = diffusion.noisy_and_target(run.scheduler, x0, noise, t)
    return x_t, t, target, cond


def _losses(run: _Run, x_t, t, target, cond=None) -> dict[str, torch.Tensor]:
    """Task loss plus the chosen distillation terms (see module docstring)."""
    config = run.config
    with run.accelerator.autocast():
        pred, feats = run.student(x_t, t, cond)
    losses = {"loss_task": F.mse_loss(pred.float(), target.float())}
    distill = getattr(config, "distill", "none")
    if distill != "none":
        with torch.no_grad(), run.accelerator.autocast():
            teacher_out = run.teacher(x_t, t).sample if run.ctx is None else \
                run.ctx.family.predict(run.teacher, x_t, t, cond)
        if distill in ("output", "both"):
            losses["loss_output_kd"] = F.mse_loss(pred.float(), teacher_out.float())
        if distill in ("features", "both"):
            targets = run.teacher_tap.take()
            terms = [F.mse_loss(f.float(), g.float()) for f, g in zip(feats, targets, strict=True)]
            losses["loss_feature_kd"] = torch.stack(terms).mean()
    total = losses["loss_task"]
    total = total + getattr(config, "distill_weight", 0.0) * losses.get("loss_output_kd", 0.0)
    total = total + getattr(config, "feature_weight", 0.0) * losses.get("loss_feature_kd", 0.0)
    losses["loss"] = total
    return losses


def _settle(run: _Run, window: list[dict], done: int) -> None:
    """Turn the window's pending loss tensors into process means, in place; stop at a NaN/inf.

    The losses stay on the device during the steps (no host sync per step) and are reduced over
    processes here in one all-reduce, at every log and checkpoint step, so a non-finite loss is
    named by its step and never reaches a checkpoint. `done` is the step the window ends at.
    """
    pending = [i for i, w in enumerate(window) if isinstance(w["loss"], torch.Tensor)]
    if not pending:
        return
    keys = sorted(k for k, v in window[pending[0]].items() if isinstance(v, torch.Tensor))
    values = torch.stack([torch.stack([window[i][k] for k in keys]) for i in pending])
    means = run.accelerator.reduce(values, "mean").tolist()
    for i, row in zip(pending, means, strict=True):
        window[i].update(zip(keys, row, strict=True))
        if not math.isfinite(window[i]["loss"]):
            step = done - len(window) + i + 1
            good = checkpoint_dirs(run.work)
            kept = f"last good checkpoint: {good[-1]}" if good else "no checkpoint was written yet"
            raise DiffpruneError(f"loss is {window[i]['loss']} at step {step}; training stopped ({kept}); "
                                 "try a lower --lr or check the data")


def _train_step(run: _Run, batches, step: int) -> dict:
    """One optimizer step (grad_accum micro-steps), clip, Adam, EMA; returns its losses (device tensors)."""
    config, acc = run.config, run.accelerator
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(config, step)
    sums: dict[str, torch.Tensor] = {}
    for micro in range(config.grad_accum):
        x_t, t, target, cond = _micro_batch(run, batches, step, micro)
        sync = micro == config.grad_accum - 1
        with contextlib.nullcontext() if sync else acc.no_sync(run.student):
            losses = _losses(run, x_t, t, target, cond)
            for k, v in losses.items():
                v = v.detach().float().reshape(()) / config.grad_accum
                sums[k] = sums[k] + v if k in sums else v
            acc.backward(losses["loss"] / config.grad_accum)
    if config.max_grad_norm > 0:
        acc.clip_grad_norm_(run.student.parameters(), config.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {**sums, "ema_decay": run.ema.update(acc.unwrap_model(run.student).unet, step), "lr": lr_at(config, step)}


def _loop(run: _Run, end: int, progress: bool) -> None:
    config, acc = run.config, run.accelerator
    batches = batch_stream(run.dataset, config, acc.process_index, acc.num_processes,
                           run.start_step * config.grad_accum)
    bar = tqdm(total=config.steps, initial=run.start_step, desc=config.stage, unit="step", disable=not progress)
    window: list[dict[str, float]] = []
    t0 = t_window = time.perf_counter()
    elapsed0 = run.history[-1]["elapsed_s"] if run.history else 0.0
    try:
        for step in range(run.start_step, end):
            window.append(_train_step(run, batches, step))
            done = step + 1
            if done % config.log_every == 0 or done % config.checkpoint_every == 0 or done == end:
                _settle(run, window, done)
            if done % config.log_every == 0 or done == end:
                now = time.perf_counter()
                record = _record(window, done, len(window) / max(now - t_window, 1e-9), elapsed0 + now - t0)
                run.history.append(record)
                acc.log({k: v for k, v in record.items() if k != "step"}, step=done)
                bar.set_postfix(loss=f"{record['loss']:.4f}", steps_s=f"{record['steps_per_s']:.2f}")
                window, t_window = [], now
            bar.update(1)
            if done % config.checkpoint_every == 0 or done == end:
                _save(run, done)
    except DiffpruneError:
        if acc.is_main_process:
            _write_log(run)
        raise
    finally:
        bar.close()


def _record(window: list[dict[str, float]], step: int, steps_per_s: float, elapsed: float) -> dict[str, float]:
    keys = [k for k in LOG_KEYS if k in window[-1]]
    rec = {"step": step, **{k: sum(w[k] for w in window) / len(window) for k in keys if k != "step"}}
    rec["lr"], rec["ema_decay"] = window[-1]["lr"], window[-1]["ema_decay"]
    rec["steps_per_s"], rec["elapsed_s"] = steps_per_s, elapsed
    return rec


def _save(run: _Run, step: int) -> None:
    """Main process writes the checkpoint and log; every process learns whether it worked."""

    def write():
        _write_run_checkpoint(run, step)
        _write_log(run)

    _on_main(run.accelerator, write, f"could not write the checkpoint at step {step}")


def _write_run_checkpoint(run: _Run, step: int) -> Path:
    acc = run.accelerator
    student = acc.unwrap_model(run.student)
    opt_tensors, opt_meta = optimizer_to_files(run.optimizer.optimizer if hasattr(run.optimizer, "optimizer")
                                               else run.optimizer)
    if acc.scaler is not None:
        opt_meta["scaler"] = acc.scaler.state_dict()
    files = {"model.safetensors": _cpu(student.unet.state_dict()),
             "ema.safetensors": _cpu(run.ema.shadow),
             "optimizer.safetensors": opt_tensors}
    if len(student.adapters):
        files["adapters.safetensors"] = _cpu(student.adapters.state_dict())
    state = {"version": STATE_VERSION, "step": step, "config": run.config.to_dict(), "num_processes": acc.num_processes,
             "model_fingerprint": run.fingerprint, "history": run.history}
    return write_checkpoint(run.work, step, files, {"optimizer.json": opt_meta, STATE_FILE: state},
                            run.config.keep_checkpoints)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _write_log(run: _Run) -> None:
    data = {"stage": run.config.stage, "log_every": run.config.log_every, "keys": list(LOG_KEYS),
            "records": run.history}
    try:
        write_json_atomic(run.work / TRAIN_LOG, data)
    except OSError as err:
        raise write_error(err, f"could not write {run.work / TRAIN_LOG}") from None


def _finish(run: _Run) -> None:
    """Export the EMA weights as the pipeline's unet; swap a staging folder into place."""
    unet = run.accelerator.unwrap_model(run.student).unet
    final = copy.deepcopy(unet).to("cpu")
    final.load_state_dict({k: v.cpu() for k, v in run.ema.state_for(final).items()}, strict=True)
    final.eval()
    try:
        export_pipeline(run.pipe, final, run.work, run.ctx.family.component if run.ctx is not None else "unet")
        _write_log(run)
        if run.work != run.output_dir:
            replace_dir(run.work, run.output_dir)
    except (OSError, SafetensorError) as err:
        raise write_error(err, f"could not write the final pipeline to {run.work}",
                          "; checkpoints are kept") from None
    out = run.output_dir
    print(f"wrote pipeline (EMA weights) to {out} (model_index.json, unet/, scheduler/)")
    print(f"wrote checkpoints to {out / CHECKPOINTS}, log to {out / TRAIN_LOG}, TensorBoard to {out / 'logs'}, "
          f"config to {out / (run.config.stage + '_config.json')}")


# --------------------------------------------------------------------------- public API


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
    if kwargs.get("teacher") is not None and Path(kwargs["teacher"]).exists():
        kwargs["teacher"] = str(Path(kwargs["teacher"]).absolute())
    config = _make_config(FinetuneConfig, model=model, data=_data_str(data), **kwargs)
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
    config = _make_config(TrainConfig, data=_data_str(data), model_config=dict(model_config),
                          scheduler_config=dict(scheduler or scheduler_config()), **kwargs)
    return run_training(config, output_dir, **run_kwargs)


def _data_str(data: str | Path) -> str:
    return str(Path(data).absolute()) if Path(data).exists() else str(data)


def _make_config(cls, **kwargs):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise DiffpruneError(f"unknown {cls.stage} option(s) {unknown}; allowed: {sorted(names)}")
    return cls(**kwargs)
