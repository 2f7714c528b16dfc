"""What a pipeline adds around its denoiser, resolved once for prune / finetune / sample.

`PipelineContext` bundles the family, the latent codec (None in pixel space) and the per-image
conditioning (prompts encoded by the pipeline's text encoder, or DiT class labels), so every stage
calls the denoiser the same way: `family.predict(model, x_t, t, ctx.cond_for(indices, device))`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..errors import DiffpruneError
from .base import Family
from .dit import DiTFamily, labels_for_dataset, parse_class_labels
from .latent import LatentCodec, codec_of
from .unet2d_condition import PromptEncoder, UNet2DConditionFamily, prompts_for_dataset


@dataclasses.dataclass
class PipelineContext:
    family: Family
    model: torch.nn.Module
    codec: LatentCodec | None = None
    encoder: PromptEncoder | None = None
    prompts: list[str] | None = None  # one per dataset image (or cycled by sample index)
    labels: list[int] | None = None
    label_seed: int | None = None

    def data_size(self) -> tuple[int, int]:
        """(square size, channels) of the images the pipeline works on (pixels, before encoding)."""
        size = self.family.sample_size(self.model)
        if self.codec is None:
            return size, self.family.in_channels(self.model)
        return self.codec.image_size(size), self.codec.image_channels

    def to_model_space(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return images if self.codec is None else self.codec.encode(images, generator).to(images.device)

    def to_image_space(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.codec is None else self.codec.decode(x).to(x.device)

    def cond_for(self, indices: Sequence[int] | torch.Tensor, device) -> dict | None:
        """Conditioning for dataset (or sample) indices; lists are cycled by index."""
        idx = [int(i) for i in indices]
        if isinstance(self.family, UNet2DConditionFamily):
            return self.encoder.cond([self.prompts[i % len(self.prompts)] for i in idx], device)
        if isinstance(self.family, DiTFamily):
            if self.labels is None:
                from ..sampling import image_seed

                n = self.family.num_classes(self.model)
                labels = [int(torch.randint(0, n, (1,), generator=torch.Generator().manual_seed(
                    image_seed(self.label_seed or 0, i)))) for i in idx]
                return {"class_labels": torch.tensor(labels, dtype=torch.long, device=device)}
            return {"class_labels": torch.tensor([self.labels[i % len(self.labels)] for i in idx],
                                                 dtype=torch.long, device=device)}
        return None

    def to(self, device) -> PipelineContext:
        if self.codec is not None:
            self.codec.to(device)
        if self.encoder is not None:
            self.encoder.text_encoder.to(device)
        return self


def context_for(pipe, family: Family, model: torch.nn.Module) -> PipelineContext:
    """Codec and text encoder of `pipe` (conditioning data is attached by `attach_*`)."""
    ctx = PipelineContext(family, model, codec_of(pipe))
    if ctx.codec is not None and ctx.codec.latent_channels != family.in_channels(model):
        raise DiffpruneError(f"{type(pipe).__name__}: the autoencoder has {ctx.codec.latent_channels} latent "
                             f"channels, the {family.name} denoiser takes {family.in_channels(model)}")
    if isinstance(family, UNet2DConditionFamily):
        ctx.encoder = PromptEncoder(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None))
    return ctx


def attach_dataset(ctx: PipelineContext, dataset, data: str, *, prompt: str | None = None,
                   captions: str | None = None, class_labels=None, seed: int = 0,
                   label_fallback: str = "random") -> PipelineContext:
    """Per-image prompts / labels for `dataset` (see unet2d_condition.py and dit.py)."""
    if isinstance(ctx.family, UNet2DConditionFamily):
        ctx.prompts = prompts_for_dataset(dataset, data, prompt, captions)
    elif isinstance(ctx.family, DiTFamily):
        n = ctx.family.num_classes(ctx.model)
        ctx.labels = labels_for_dataset(dataset, data, parse_class_labels(class_labels, n), n, seed, label_fallback)
    return ctx


def attach_for_sampling(ctx: PipelineContext, *, prompt: str | list[str] | None = None,
                        class_labels=None, seed: int = 0) -> PipelineContext:
    """Prompts / labels cycled over sample indices (random labels drawn from `seed` if none)."""
    if isinstance(ctx.family, UNet2DConditionFamily):
        if not prompt:
            raise DiffpruneError("sampling a text-conditional UNet (UNet2DConditionModel) needs a prompt")
        ctx.prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    elif isinstance(ctx.family, DiTFamily):
        n = ctx.family.num_classes(ctx.model)
        labels = parse_class_labels(class_labels, n)
        ctx.labels = labels
        ctx.label_seed = seed  # labels None: image i gets a random label drawn from (seed, i)
    return ctx
