"""diffusers `DiTTransformer2DModel` (class-conditional DiT, `DiTPipeline`).

Prunable: attention heads (whole heads with `prune_heads`, else head dims), MLP hidden widths, the
per-block adaLN conditioning width (timestep MLP + class embedding table + its modulation input),
and with `prune_residual` (`--prune-residual`) the residual (hidden) width too.

Residual width: one torch-pruning group couples every tensor indexed by residual channels: the patch
embedding conv's outputs, each block's attention q/k/v inputs and output projection, MLP input and
output, the six adaLN-Zero modulation chunks (`norm1.linear` rows), the final adaLN's two chunks
(`proj_out_1`), `proj_out_2`'s inputs and the affine-free LayerNorms. One tensor is not a parameter:
the fixed 2-D sin-cos position buffer `pos_embed.pos_embed` (Peebles & Xie, "Scalable Diffusion
Models with Transformers", ICCV 2023, sec. 3.2), which torch-pruning does not see. It is sliced
with the same kept channels (`before_group_prune`) and made persistent, so it is saved in the
weights file and loaded back: diffusers rebuilds this buffer from the width at construction, and a
fresh sin-cos of the pruned width is a different function from the sliced one. (diffusers also
rebuilds it when the input size differs from `sample_size`; a residual-pruned DiT must be run at
its `sample_size`, as DiTPipeline does.)
The LayerNorms normalise over the kept channels: what a removed channel contributed to their mean
and variance is gone, as the paper's GroupNorm statistics change for UNets (tests/test_dit_residual.py
states exactly what is equivalent). Off by default: the default keeps the width and the folder format
older diffprune versions read.

Class labels: DiT's label table has `num_embeds_ada_norm` classes plus one null class (index
`num_embeds_ada_norm`, used for classifier-free guidance). Labels come from `--class-labels`, from
integer class subfolder names of the image folder, or are drawn at random.
"""

from __future__ import annotations

import copy

import torch
from diffusers import DiTTransformer2DModel

from ..errors import DiffpruneError
from .attention import attention_modules, fix_attention, fix_attention_io, qkv_head_map
from .base import Family


class DiTFamily(Family):
    name = "dit"
    component = "transformer"
    model_classes = (DiTTransformer2DModel,)
    conditional = True
    residual_prunable = False

    def num_classes(self, model) -> int:
        return int(model.config.num_embeds_ada_norm)

    def example_cond(self, model, batch_size=1, device="cpu"):
        return {"class_labels": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def example_inputs(self, model, batch_size=1, device="cpu"):
        size = self.sample_size(model)
        return {"hidden_states": torch.randn(batch_size, self.in_channels(model), size, size, device=device),
                "timestep": torch.ones(batch_size, dtype=torch.long, device=device),
                **self.example_cond(model, batch_size, device)}

    def predict(self, model, x_t, t, cond=None):
        labels = self._need(cond, "class_labels")
        out = model(x_t, timestep=t, class_labels=labels).sample
        c = x_t.shape[1]
        return out[:, :c] if out.shape[1] == 2 * c else out  # drop the learned-sigma half

    def configured(self, prune_residual=False):
        if bool(prune_residual) == self.residual_prunable:
            return self
        family = copy.copy(self)
        family.residual_prunable = bool(prune_residual)
        return family

    def ignored_layers(self, model):
        # proj_out_2 maps to patches of the output channels; pos_embed.proj anchors the residual width.
        return [model.proj_out_2] if self.residual_prunable else [model.proj_out_2, model.pos_embed.proj]

    def num_heads(self, model):
        return qkv_head_map(model)

    def out_channel_groups(self, model):
        # torch-pruning roots the residual group at the first layer it traced back from the output:
        # proj_out_1, whose 2*width outputs are (shift, scale). Ranked as 2 chunks of the width, the
        # same channel goes from both; ranked as one 2*width layer, the group fails its own check.
        return {model.proj_out_1: 2} if self.residual_prunable else {}

    def before_group_prune(self, model, group):
        if self.residual_prunable:
            slice_position_buffer(model.pos_embed, removed_channels(group, model.pos_embed.proj))

    def fix_after_pruning(self, model, before, prune_heads=False):
        for name, attn in attention_modules(model):
            fix_attention(name, attn, before[name], prune_heads=prune_heads)
            fix_attention_io(attn)
        check_position_buffer(model.pos_embed)


def removed_channels(group, module: torch.nn.Module) -> list[int] | None:
    """The output channels of `module` that torch-pruning `group` removes (None: not in the group)."""
    for dep, idxs in group:
        if dep.target.module is module and getattr(dep.handler, "__name__", "") == "prune_out_channels":
            return sorted(int(getattr(i, "idx", i)) for i in idxs)
    return None


@torch.no_grad()
def slice_position_buffer(patch_embed: torch.nn.Module, removed: list[int] | None) -> None:
    """Drop the `removed` channels of a PatchEmbed's fixed position buffer (last dim) and make the
    buffer persistent, so the pruned folder stores the sliced values (io.structure.restore_saved_buffers)."""
    buffer = getattr(patch_embed, "pos_embed", None)
    if not removed or buffer is None:
        return
    gone = set(removed)
    keep = torch.tensor([i for i in range(buffer.shape[-1]) if i not in gone], device=buffer.device)
    patch_embed.register_buffer("pos_embed", buffer.index_select(-1, keep).contiguous(), persistent=True)


def check_position_buffer(patch_embed: torch.nn.Module) -> None:
    """The position buffer must be as wide as the patch embedding's output (it is added to it).

    A weightless (meta) copy, as the size planner prunes, has no values to slice: its buffer only
    takes the width, persistent as in the real prune."""
    buffer = getattr(patch_embed, "pos_embed", None)
    width = patch_embed.proj.out_channels
    if buffer is not None and buffer.is_meta and buffer.shape[-1] != width:
        patch_embed.register_buffer("pos_embed", torch.empty(*buffer.shape[:-1], width, device="meta"),
                                    persistent=True)
    elif buffer is not None and buffer.shape[-1] != width:
        raise RuntimeError(f"position buffer width {buffer.shape[-1]} != patch embedding width "
                           f"{patch_embed.proj.out_channels}: the residual group was pruned without it")


def parse_class_labels(text: str | list[int] | None, num_classes: int) -> list[int] | None:
    """'1,2,3' or [1, 2, 3] -> [1, 2, 3], each in [0, num_classes] (num_classes = DiT's null class)."""
    if text is None:
        return None
    if isinstance(text, str):
        try:
            labels = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
        except ValueError:
            raise DiffpruneError(f"class labels {text!r} must be comma-separated integers") from None
    else:
        labels = [int(v) for v in text]
    if not labels:
        raise DiffpruneError("class labels are empty; give comma-separated integers")
    bad = [v for v in labels if not 0 <= v <= num_classes]
    if bad:
        raise DiffpruneError(f"class label {bad[0]} is out of range; allowed: [0, {num_classes}] "
                             f"({num_classes} = the null class)")
    return labels


def labels_for_dataset(dataset, data: str, labels: list[int] | None, num_classes: int,
                       seed: int, fallback: str = "random") -> list[int]:
    """One label per dataset image: `labels` cycled, integer class-folder names, else `fallback`:
    "random" labels (calibration: scores over all classes) or the "null" class (fine-tuning on
    unlabelled images trains the unconditional branch rather than teaching wrong labels)."""
    n = len(dataset)
    if labels is not None:
        return [labels[i % len(labels)] for i in range(n)]
    paths = getattr(dataset, "paths", None)
    if paths:
        from pathlib import Path

        root = Path(data)
        names = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in paths]
        if all(s.isdecimal() and int(s) < num_classes for s in names):  # isdigit() takes '²', which int() refuses
            return [int(s) for s in names]
    if fallback == "null":
        return [num_classes] * n
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (n,), generator=g).tolist()
