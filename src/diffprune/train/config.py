"""The configs of `finetune` and `train` (frozen, versioned; written as <stage>_config.json).

Defaults follow the paper's post-training recipe (PAPER.md, "Post-training recipe"): Adam, lr 2e-4
constant, EMA 0.9999, dropout 0.1, grad-norm clip 1.0. `cond_drop_prob`: see loop.py.
"""

from __future__ import annotations

import dataclasses

from ..config import StageConfig
from ..errors import DiffpruneError, check_range

DISTILL_MODES = ("none", "output", "features", "both")
EMA_WARMUPS = ("none", "ratio", "power")
MIXED_PRECISION = ("no", "fp16", "bf16")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
COND_DROP_TEXT = 0.1  # default caption dropout of text-conditional UNets (issue 15; SD v1 trained with 10%)


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
    portable: bool = False  # also write the code plain diffusers needs to load a pruned folder (portable.py)

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
        check_choice("ema_warmup", self.ema_warmup, EMA_WARMUPS)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        for name in ("steps", "batch_size", "grad_accum", "warmup_steps", "seed", "checkpoint_every",
                     "keep_checkpoints", "log_every", "num_workers"):
            if int(getattr(self, name)) != getattr(self, name):
                raise DiffpruneError(f"{name}={getattr(self, name)!r} must be an integer")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig(TrainingConfig):
    """Post-training of a (pruned) pipeline folder, optionally distilled from a teacher.

    Version 2 added `cond_drop_prob` (version 1 never dropped conditioning: it reads as 0.0).
    None means the family's default, resolved when the run starts and recorded resolved:
    COND_DROP_TEXT for text-conditional UNets, 0 otherwise.
    """

    stage = "finetune"
    version = 2

    model: str
    teacher: str | None = None
    distill: str = "none"
    distill_weight: float = 1.0
    feature_weight: float = 1.0
    reinit: bool = False
    prompt: str | None = None  # text-conditional UNets: one prompt for every image
    captions: str | None = None  # or a captions file (default: captions.jsonl/.txt in the data folder)
    class_labels: str | None = None  # DiT: labels cycled over images (default: class folders, else null)
    cond_drop_prob: float | None = None  # caption dropout: the empty prompt / DiT null class with this prob.
    prompt_embeds: str | None = None  # a prompt-embeddings file read instead of the text encoders (not loaded)
    revision: str | None = None  # a hub id's branch, tag or commit (io.load_pipeline); None: main
    variant: str | None = None  # weights variant read by model and teacher, e.g. "fp16" (io/variants.py)

    def __post_init__(self):
        super().__post_init__()
        check_choice("distill", self.distill, DISTILL_MODES)
        check_range("distill_weight", self.distill_weight, 0.0)
        check_range("feature_weight", self.feature_weight, 0.0)
        if self.cond_drop_prob is not None:
            check_range("cond_drop_prob", self.cond_drop_prob, 0.0, 1.0)

    @classmethod
    def from_dict(cls, data):
        return super().from_dict(upgrade_config_dict(data))


def upgrade_config_dict(data: dict) -> dict:
    """A version-1 finetune config as the version-2 one of the same run (no caption dropout)."""
    data = dict(data)
    if data.get("stage") == FinetuneConfig.stage and data.get("version") == 1:
        data.update(version=FinetuneConfig.version, cond_drop_prob=data.get("cond_drop_prob", 0.0))
    return data


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(TrainingConfig):
    """Training a fresh UNet2DModel from its config and a DDPMScheduler config."""

    stage = "train"

    model_config: dict
    scheduler_config: dict


def check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise DiffpruneError(f"{name}={value!r} is not supported; allowed: {allowed}")


def make_config(cls, **kwargs):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise DiffpruneError(f"unknown {cls.stage} option(s) {unknown}; allowed: {sorted(names)}")
    return cls(**kwargs)
