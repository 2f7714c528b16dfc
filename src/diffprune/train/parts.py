"""Pieces of the training loop with no loop state: seeds, the batch order, Adam, EMA, dropout, lr.

Determinism: each step's randomness is a function of (seed, step, micro-step, process index)
(`derive_seed`); the batch positions come from an epoch-wise permutation stream (`StepBatches`), so
the data seen at a step never depends on where a run was resumed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from .config import TrainingConfig


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


class IndexedDataset(torch.utils.data.Dataset):
    """(image, index) pairs, so a batch can look up its per-image prompts / class labels."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.skipped = getattr(dataset, "skipped", 0)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i], i


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


def lr_at(config: TrainingConfig, step: int) -> float:
    """Constant lr (paper) after an optional linear warmup over `warmup_steps` optimizer steps."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr


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
