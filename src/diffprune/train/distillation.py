"""Feature distillation: taps on a UNet's block outputs and 1x1 adapters from student to teacher widths.

`feature_points` names the matched modules (every down block, the mid block, every up block);
`FeatureTap` keeps their latest outputs; `make_adapters` builds one learnable 1x1 conv per point
(student width -> teacher width, identity where the widths agree); `Student` wraps the trained unet
and its adapters as one module so DDP syncs both. The loss itself lives in loop.py.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DiffpruneError


def feature_points(unet) -> list[str]:
    """Module names whose outputs feature distillation matches: every down block, mid, every up block."""
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    names += ["mid_block"] if getattr(unet, "mid_block", None) is not None else []
    return names + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


class FeatureTap:
    """Forward hooks that keep the latest output of the named modules (first element of tuples)."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.names, self.outputs = names, {}
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def take(self) -> list[torch.Tensor]:
        out = [self.outputs.pop(n) for n in self.names]
        self.outputs.clear()
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _adapter_key(name: str) -> str:
    return name.replace(".", "_")


def make_adapters(student, teacher, names: list[str], device, family=None) -> nn.ModuleDict:
    """1x1 convs student width -> teacher width per feature point (identity where widths agree)."""
    widths = []
    for model in (student, teacher):
        tap = FeatureTap(model, names)
        shape = (1, model.config.in_channels, *sample_size_of(model))
        with torch.no_grad():
            x, t = torch.zeros(shape, device=device), torch.zeros(1, dtype=torch.long, device=device)
            if family is None:
                model(x, t)
            else:
                family.predict(model, x, t, family.example_cond(model, 1, device))
        widths.append([f.shape[1] for f in tap.take()])
        tap.remove()
    adapters = nn.ModuleDict()
    for name, cs, ct in zip(names, *widths, strict=True):
        conv = nn.Conv2d(cs, ct, 1)
        if cs == ct:
            with torch.no_grad():
                conv.weight.copy_(torch.eye(cs)[:, :, None, None])
                conv.bias.zero_()
        adapters[_adapter_key(name)] = conv
    return adapters.to(device)


class Student(nn.Module):
    """The trained unet plus feature adapters, as one module so DDP syncs both.

    forward(x_t, t, cond) -> (prediction, [adapted features]) (the list is empty without adapters);
    with a `family`, the call goes through `family.predict(unet, x_t, t, cond)`.
    """

    def __init__(self, unet, adapters: nn.ModuleDict | None = None, names: list[str] | None = None,
                 family=None):
        super().__init__()
        self.unet = unet
        self.family = family
        self.adapters = adapters if adapters is not None else nn.ModuleDict()
        self.names = list(names or [])
        self.tap = FeatureTap(unet, self.names) if self.names else None

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict | None = None):
        out = self.unet(x_t, t).sample if self.family is None else self.family.predict(self.unet, x_t, t, cond)
        if self.tap is None:
            return out, []
        feats = self.tap.take()
        return out, [self.adapters[_adapter_key(n)](f) for n, f in zip(self.names, feats, strict=True)]


def sample_size_of(unet) -> tuple[int, int]:
    """The (height, width) a model trains at: its config's sample_size (one int: square)."""
    s = unet.config.sample_size
    if s is None:
        raise DiffpruneError("the model's config has no sample_size; cannot choose the training size")
    return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))
