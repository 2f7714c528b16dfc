"""`--structure depth|both` in the prune stage: score the depth units, plan to the size target, remove them.

Depth (depth.py, depth_scores.py): whole layers go, BK-SDM style for UNets (one resnet+attention pair
per level in the down and the mirrored up block, optionally the mid block), whole transformer blocks
for DiT / PixArt / SD3 (TinyFusion, ShortGPT). Every removal is a config change (`num_layers`,
`layers_per_block`, `mid_block_type`), so a depth-only result is a plain diffusers model.

- `depth`: remove the lowest-scored units until the target fraction of MACs (or params) is reached.
- `both`: `depth_split` "sqrt": depth first to the square root of the target (half the reduction in
  log size), then a new calibration sweep on the shallower model and width pruning to the rest of the
  target (the stage); "joint": the split whose removed layers and channels cost the least Taylor
  importance of the one sweep, width pruned with that sweep's gradients (depth_split.py).

Scores (`--method`): diff-pruning / taylor = the Taylor importance of the calibration sweep summed per
unit, per parameter; magnitude; block-influence (1 - cos(input, output) of each layer on calibration
inputs: the calibration images noised at timesteps stratified over all T, the sweep's seeded noise).
"""

from __future__ import annotations

import math

import torch

from ..diffusion import model_timesteps, noisy_and_target, num_train_timesteps
from ..errors import DiffpruneError
from .config import PruneConfig
from .depth import remove_units
from .depth_scores import plan_depth, scored_units, size_counter
from .depth_split import joint_plan
from .importance import cond_rows
from .threshold_rule import stratified_timesteps


def depth_fraction(config: PruneConfig) -> float:
    """The size fraction depth pruning aims at: the target (depth) or its square root (both)."""
    target = config.target_macs if config.target_macs is not None else config.target_params
    return target if config.structure == "depth" else math.sqrt(target)


def size_kind(config: PruneConfig) -> str:
    return "macs" if config.target_macs is not None else "params"


def influence_inputs(family, scheduler, samples: torch.Tensor, cond: dict | None, seed: int,
                     micro_batch_size: int | None) -> list[tuple]:
    """Block influence's calibration inputs [(x_t, t, cond), ...]: each image noised once, at timesteps
    stratified over all T (seeded), in batches of `micro_batch_size` (default: all at once)."""
    g = torch.Generator().manual_seed(seed)
    n, device = samples.shape[0], samples.device
    ts = stratified_timesteps(num_train_timesteps(scheduler), n, g).to(device)
    noise = torch.randn(samples.shape, generator=g).to(device)
    x_t, _ = noisy_and_target(scheduler, samples, noise, ts)
    steps, size = model_timesteps(scheduler, ts), micro_batch_size or n
    out = []
    for start in range(0, n, size):
        rows = slice(start, min(start + size, n))
        out.append((x_t[rows], steps[rows], cond_rows(cond, rows, n)))
    return out


def prune_depth(model: torch.nn.Module, family, config: PruneConfig, importance, inputs) -> tuple:
    """(the model without its lowest-scored units, the depth record for prune_report / pruning.json).

    `importance`: the sweep's result (diff-pruning / taylor scores); `inputs`: block influence's
    calibration inputs. `depth` refuses a target depth alone cannot reach; `both` takes what it gets.
    """
    method = config.method
    units, scores = scored_units(model, method, include_mid=config.depth_include_mid, importance=importance,
                                 inputs=inputs, family=family)
    count = size_counter(model, size_kind(config))
    split = None
    if config.structure == "both" and config.depth_split == "joint":
        plan, split = joint_plan(model, family, config, importance, units, scores, count)
    else:
        plan = plan_depth(units, scores, count, depth_fraction(config))
    if config.structure == "depth" and not plan.reached:
        raise DiffpruneError(f"--structure depth: {plan.message}; allowed: a larger target, --depth-include-mid, "
                             "or --structure both")
    shallow = remove_units(model, plan.removed)
    changed = {k: shallow.config[k] for k in shallow.config if not k.startswith("_")
               and k in model.config and shallow.config[k] != model.config[k]}
    record = {**plan.summary(), "method": method, "include_mid": config.depth_include_mid, "kind": size_kind(config),
              "scores": {name: float(s) for name, s in sorted(scores.items(), key=lambda kv: kv[1])},
              "config_changes": {k: {"before": model.config[k], "after": v} for k, v in changed.items()},
              "units": [u.name for u in units], "split": split or {"mode": "sqrt" if config.structure == "both"
                                                                   else None}}
    return shallow, record


def depth_dry_run(model: torch.nn.Module, family, config: PruneConfig) -> tuple:
    """(the shallower model, its depth record) that `--structure depth|both` would give on magnitude
    scores (no calibration data). The real run's units follow `--method`'s scores: transformer blocks
    are all the same size, so there the size is exact; UNet levels differ, so it may differ slightly."""
    import dataclasses

    dry = dataclasses.replace(config, method="magnitude", estimator="exact")
    return prune_depth(model, family, dry, None, None)
