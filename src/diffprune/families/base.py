"""The interface every model-family adapter implements (one uniform signature per function)."""

from __future__ import annotations

import torch


class Family:
    """Adapter base. Subclasses set `name`, `component`, `model_classes` and override the hooks."""

    name: str = "base"
    component: str = "unet"  # the pipeline attribute holding the denoiser
    model_classes: tuple[type, ...] = ()

    def example_inputs(self, model: torch.nn.Module, batch_size: int = 1,
                       device: torch.device | str = "cpu") -> dict:
        """Keyword inputs for one forward pass at the model's own resolution."""
        raise NotImplementedError

    def predict(self, model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                cond: dict | None = None) -> torch.Tensor:
        """The model's prediction (eps, v or x0) for noisy input x_t at integer timesteps t."""
        raise NotImplementedError

    def ignored_layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """Layers whose output channels must never be pruned (at least the output layer)."""
        raise NotImplementedError

    def num_heads(self, model: torch.nn.Module) -> dict[torch.nn.Module, int]:
        """q/k/v projections -> head count, so pruning keeps heads equal in size."""
        return {}

    def fix_after_pruning(self, model: torch.nn.Module, before: dict[str, dict]) -> None:
        """Make static attributes agree with the pruned tensors. `before` = structure() pre-pruning."""

    def sample_size(self, model: torch.nn.Module) -> int:
        size = model.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def in_channels(self, model: torch.nn.Module) -> int:
        return int(model.config.in_channels)
