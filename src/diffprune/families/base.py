"""The interface every model-family adapter implements (one uniform signature per function).

A family adapter knows one denoiser class: its example inputs (including the conditioning it needs,
e.g. text embeddings or class labels), how to call it (`predict(model, x_t, t, cond)`), which layers
are never pruned, its attention-head maps, and the fix-ups of static attributes after pruning.
Latent autoencoders and text encoders belong to the pipeline, not the family (families/latent.py,
families/unet2d_condition.py).
"""

from __future__ import annotations

import torch

from ..errors import DiffpruneError


class Family:
    """Adapter base. Subclasses set `name`, `component`, `model_classes` and override the hooks."""

    name: str = "base"
    component: str = "unet"  # the pipeline attribute holding the denoiser
    model_classes: tuple[type, ...] = ()
    conditional: bool = False  # True when predict() needs `cond` (text embeddings, class labels)
    residual_prunable: bool = True  # False: the residual/hidden width is protected (see configured)

    def check(self, model: torch.nn.Module) -> None:
        """Raise DiffpruneError for configurations of the class this adapter does not handle."""

    def example_cond(self, model: torch.nn.Module, batch_size: int = 1,
                     device: torch.device | str = "cpu") -> dict:
        """Conditioning keyword inputs of the right shapes for tracing and MAC counting ({} if none)."""
        return {}

    def example_inputs(self, model: torch.nn.Module, batch_size: int = 1,
                       device: torch.device | str = "cpu") -> dict:
        """Keyword inputs for one forward pass at the model's own resolution."""
        raise NotImplementedError

    def predict(self, model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                cond: dict | None = None) -> torch.Tensor:
        """The model's prediction (eps, v or x0) for noisy input x_t at integer timesteps t.

        `cond` holds the family's conditioning tensors, batch-aligned with x_t (see example_cond).
        The result has x_t's shape (a learned-variance half of the output is dropped).
        """
        raise NotImplementedError

    def ignored_layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """Layers whose output channels must never be pruned (at least the output layer)."""
        raise NotImplementedError

    def num_heads(self, model: torch.nn.Module) -> dict[torch.nn.Module, int]:
        """q/k/v projections -> head count, so pruning keeps heads equal in size."""
        return {}

    def configured(self, prune_residual: bool = False) -> Family:
        """This adapter for one pruning run. `prune_residual`: also prune the residual (hidden) width
        where the family protects it by default (transformers, see `residual_prunable`); families
        that always prune every channel (UNets, as the paper does) return themselves."""
        return self

    def unwrapped_parameters(self, model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, int]]:
        """Parameters held outside a layer torch-pruning knows (e.g. PixArt's `scale_shift_table`), each
        with the dimension that is indexed by channels (torch-pruning's `unwrapped_parameters`). Default: none."""
        return []

    def out_channel_groups(self, model: torch.nn.Module) -> dict[torch.nn.Module, int]:
        """Layers whose outputs are k equal chunks of one pruned width (torch-pruning's
        `out_channel_groups`), when such a layer can be a group's root. Default: none."""
        return {}

    def before_group_prune(self, model: torch.nn.Module, group) -> None:
        """Called with each torch-pruning group just before `group.prune()`: slice what torch-pruning
        does not see (buffers, e.g. DiT's fixed position embedding). `group` holds (dep, idxs) items,
        idxs = the channels of `dep.target.module` about to be removed. Default: nothing."""

    def fix_after_pruning(self, model: torch.nn.Module, before: dict[str, dict],
                          prune_heads: bool = False) -> None:
        """Make static attributes agree with the pruned tensors. `before` = structure() pre-pruning;
        `prune_heads`: whole heads were removed (head size kept) rather than head dims."""

    def sample_size(self, model: torch.nn.Module) -> int:
        size = model.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def in_channels(self, model: torch.nn.Module) -> int:
        return int(model.config.in_channels)

    def _need(self, cond: dict | None, key: str) -> torch.Tensor:
        if not cond or cond.get(key) is None:
            raise DiffpruneError(f"{self.name} models need {key!r} as conditioning input")
        return cond[key]
