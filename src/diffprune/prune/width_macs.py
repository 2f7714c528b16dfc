"""MACs as a function of the layer widths, counted as torch-pruning's op counter counts them.

The size planner (size_search.py) prices each candidate width in microseconds with it, instead of a
forward pass of the op counter per candidate.
"""

from __future__ import annotations

import math

import torch
import torch_pruning as tp
from torch import nn

_COUNTED = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm,
            nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


class WidthMacs:
    """torch-pruning's op counter (tp.utils.op_counter, hooks on layers) as a function of the widths.

    Pruning changes channel widths only, never batch, positions or tokens: one forward of the
    unpruned model records each counted layer's input size and output positions per call, and
    `count` applies the counter's per-layer formulas (linear: inputs x out + bias; conv: kernel x
    in x out/groups x positions + bias; norms: inputs, x2 when affine) to the current widths.
    """

    def __init__(self, calls: dict, widths: dict):
        self.calls, self.widths = calls, widths
    @classmethod
    def build(cls, model: nn.Module, example: dict, macs0: int) -> WidthMacs | None:
        """The counter, or None if a counted layer is not `_COUNTED` or it does not give `macs0` unpruned."""
        calls: dict[str, list] = {}
        hooks = []
        for name, m in model.named_modules():
            if tp.utils.op_counter.is_supported_instance(m):
                if not isinstance(m, _COUNTED):
                    return None
                hooks.append(m.register_forward_hook(
                    lambda mod, inp, out, name=name: calls.setdefault(name, []).append(
                        (inp[0].numel(), out.numel() // out.shape[1] if out.dim() > 1 else 1))))
        try:
            with torch.no_grad():
                model(**example)
        finally:
            [h.remove() for h in hooks]
        counter = cls(calls, {n: cls._width(model.get_submodule(n)) for n in calls})
        return counter if counter.count(model) == macs0 else None

    @staticmethod
    def _width(m: nn.Module) -> int:  # the input width its count scales with (convs: unused)
        return m.in_features if isinstance(m, nn.Linear) else math.prod(m.normalized_shape) if isinstance(
            m, nn.LayerNorm) else m.num_channels if isinstance(m, nn.GroupNorm) else getattr(m, "num_features", 1)

    def count(self, model: nn.Module) -> int:
        modules, total = dict(model.named_modules()), 0
        for name, records in self.calls.items():
            m, w0 = modules[name], self.widths[name]
            for inputs, positions in records:
                if isinstance(m, nn.Linear):
                    bias = m.out_features if m.bias is not None else 0
                    total += inputs // w0 * m.in_features * m.out_features + bias
                elif isinstance(m, nn.modules.conv._ConvNd):
                    bias = m.out_channels * positions if m.bias is not None else 0
                    total += math.prod(m.kernel_size) * m.in_channels * (m.out_channels // m.groups) * positions + bias
                else:
                    affine = m.elementwise_affine if isinstance(m, nn.LayerNorm) else m.affine
                    total += inputs // w0 * self._width(m) * (2 if affine else 1)
        return total
