"""A fresh UNet2DModel and DDPMScheduler for `train` (default: the DDPM CIFAR-10 architecture)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import diffusion
from ..errors import DiffpruneError, check_range
from ..fsutil import read_json
from .config import BETA_SCHEDULES, check_choice


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
    check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    check_choice("prediction_type", prediction_type, diffusion.PREDICTION_TYPES)
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
    from ..io.structure import validate_structure

    torch.manual_seed(seed)
    try:
        model = UNet2DModel(**config)
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError, ZeroDivisionError) as err:
        raise DiffpruneError(f"model config is not a valid UNet2DModel ({str(err).splitlines()[0]})") from None
    validate_structure(model, "model config")  # e.g. attention heads = width // head_dim = 0
    return model
