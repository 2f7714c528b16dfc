"""diffusers `DiTTransformer2DModel` (class-conditional DiT, `DiTPipeline`).

Prunable: attention heads (whole heads with `prune_heads`, else head dims), MLP hidden widths, and the
per-block adaLN conditioning width (timestep MLP + class embedding table + its modulation input).
Not prunable: the residual (hidden) width. The patch embedding adds a fixed sin-cos position buffer
(`pos_embed.pos_embed`, not a parameter) of that width, which torch-pruning does not slice; keeping
`pos_embed.proj` in the ignored layers leaves every residual-coupled group untouched.

Class labels: DiT's label table has `num_embeds_ada_norm` classes plus one null class (index
`num_embeds_ada_norm`, used for classifier-free guidance). Labels come from `--class-labels`, from
integer class subfolder names of the image folder, or are drawn at random.
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel

from ..errors import DiffpruneError
from .attention import attention_modules, fix_attention, qkv_head_map
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

    def ignored_layers(self, model):
        # proj_out_2 maps to patches of the output channels; pos_embed.proj anchors the residual width.
        return [model.proj_out_2, model.pos_embed.proj]

    def num_heads(self, model):
        return qkv_head_map(model)

    def fix_after_pruning(self, model, before, prune_heads=False):
        for name, attn in attention_modules(model):
            fix_attention(name, attn, before[name], prune_heads=prune_heads)


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
        if all(s.isdigit() and int(s) < num_classes for s in names):
            return [int(s) for s in names]
    if fallback == "null":
        return [num_classes] * n
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (n,), generator=g).tolist()
