"""What a pipeline adds around its denoiser, resolved once for prune / finetune / sample.

`PipelineContext` bundles the family, the latent codec (None in pixel space), the per-image
conditioning (prompts encoded by the pipeline's text encoder(s), or DiT class labels) and the
classifier-free-guidance settings, so every stage calls the denoiser the same way:
`family.predict(model, x_t, t, ctx.cond_for(indices, device))`, or with guidance
`guidance.guided_predict(..., cond, ctx.uncond_for(indices, device), scale, rescale)`.
`cond_for(..., drop=mask)` replaces the conditioning of the masked images by the empty prompt /
DiT's null class (caption dropout for fine-tuning, so the unconditional branch is trained).
Text encoders: SD 1/2 (unet2d_condition.py), SDXL (sdxl.py), PixArt's T5 (pixart.py), SD3's CLIP-L +
CLIP-G + T5 (sd3.py; a pipeline saved without text_encoder_3 gets zero T5 tokens, as its own __call__).
Or, with `embeds` (a prompt-embeddings file, prompt_embeds.py: `--prompt-embeds`), the conditioning
comes from precomputed `prompt_embeds` and the pipeline's text encoders are not used (nor loaded:
io.pipeline.load_pipeline(text_encoders=False)); `encode_prompts_file` writes such a file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import DiffpruneError
from .base import Family
from .dit import DiTFamily, labels_for_dataset, parse_class_labels
from .guidance import check_guidance, guidance_on
from .latent import LatentCodec, codec_of
from .pipeline_parts import image_seed
from .prompt_embeds import EMPTY, PromptEmbeds, read_prompt_embeds, write_prompt_embeds
from .sd3 import SD3Family, SD3PromptEncoder
from .unet2d_condition import PromptEncoder, UNet2DConditionFamily, is_text_time, prompts_for_dataset


@dataclasses.dataclass
class PipelineContext:
    family: Family
    model: torch.nn.Module
    codec: LatentCodec | None = None
    encoder: object | None = None  # PromptEncoder, sdxl.SDXLPromptEncoder, PixArtPromptEncoder, SD3PromptEncoder
    prompts: list[str] | None = None  # one per dataset image (or cycled by sample index)
    labels: list[int] | None = None
    label_seed: int | None = None
    time_ids: list[tuple[int, ...]] | None = None  # SDXL: per dataset image (default: the output size)
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    negative_prompt: str | None = None

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

    @property
    def text(self) -> bool:
        return is_text_family(self.family)

    def _time_ids(self, idx: list[int]) -> torch.Tensor | None:
        if not (self.text and is_text_time(self.model)):
            return None
        if self.time_ids is None:
            from .sdxl import default_time_ids

            side = self.data_size()[0]
            return torch.tensor([default_time_ids(side, side)] * len(idx), dtype=torch.float32)
        return torch.tensor([self.time_ids[i % len(self.time_ids)] for i in idx], dtype=torch.float32)

    def cond_for(self, indices: Sequence[int] | torch.Tensor, device,
                 drop: Sequence[bool] | None = None) -> dict | None:
        """Conditioning for dataset (or sample) indices; lists are cycled by index. `drop[b]` True:
        image b gets the empty prompt (text) or the null class (DiT) instead."""
        idx = [int(i) for i in indices]
        keep = [True] * len(idx) if drop is None else [not bool(d) for d in drop]
        if self.text:
            prompts = [self.prompts[i % len(self.prompts)] if k else "" for i, k in zip(idx, keep, strict=True)]
            return self.encoder.cond(prompts, device, self._time_ids(idx))
        if isinstance(self.family, DiTFamily):
            n = self.family.num_classes(self.model)
            if self.labels is None:
                labels = [int(torch.randint(0, n, (1,), generator=torch.Generator().manual_seed(
                    image_seed(self.label_seed or 0, i)))) for i in idx]
            else:
                labels = [self.labels[i % len(self.labels)] for i in idx]
            labels = [label if k else n for label, k in zip(labels, keep, strict=True)]
            return {"class_labels": torch.tensor(labels, dtype=torch.long, device=device)}
        return None

    def uncond_for(self, indices: Sequence[int] | torch.Tensor, device) -> dict | None:
        """The unconditional branch of CFG (None when guidance is off): the negative / empty prompt
        (SDXL: zeros, as its pipeline, when there is no negative prompt) or DiT's null class."""
        if not guidance_on(self.guidance_scale):
            return None
        idx = [int(i) for i in indices]
        if self.text:
            return self.encoder.uncond(len(idx), self.negative_prompt, device, self._time_ids(idx))
        if isinstance(self.family, DiTFamily):
            null = self.family.num_classes(self.model)
            return {"class_labels": torch.full((len(idx),), null, dtype=torch.long, device=device)}
        return None

    def to(self, device) -> PipelineContext:
        if self.codec is not None:
            self.codec.to(device)
        if self.encoder is not None:
            self.encoder.to(device)
        return self


def is_text_family(family: Family) -> bool:
    """Prompt-conditioned: Stable Diffusion UNets and families that say so (`text_conditional`, PixArt)."""
    return isinstance(family, UNet2DConditionFamily) or bool(getattr(family, "text_conditional", False))


def context_for(pipe, family: Family, model: torch.nn.Module,
                embeds: PromptEmbeds | None = None) -> PipelineContext:
    """Codec and text encoder(s) of `pipe`, or the prompt embeddings `embeds` (checked against the
    denoiser's config) instead of the encoders (conditioning data is attached by `attach_*`)."""
    ctx = PipelineContext(family, model, codec_of(pipe))
    if ctx.codec is not None and ctx.codec.latent_channels != family.in_channels(model):
        raise DiffpruneError(f"{type(pipe).__name__}: the autoencoder has {ctx.codec.latent_channels} latent "
                             f"channels, the {family.name} denoiser takes {family.in_channels(model)}")
    if embeds is not None and not is_text_family(family):
        raise DiffpruneError(f"prompt embeddings {embeds.path!r} apply to text-conditional models; "
                             f"{type(model).__name__} takes no prompts")
    if isinstance(family, UNet2DConditionFamily):
        if is_text_time(model):
            from .sdxl import SDXLPromptEncoder

            ctx.encoder = SDXLPromptEncoder(pipe, model, embeds)
        else:
            ctx.encoder = PromptEncoder(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None),
                                        embeds, model)
    elif isinstance(family, SD3Family):
        ctx.encoder = SD3PromptEncoder(pipe, model, embeds=embeds)
    elif is_text_family(family):
        from .pixart import PixArtPromptEncoder

        side = float(ctx.data_size()[0])  # micro-conditions: the image size in pixels (PixArt-alpha 1024px)
        ctx.encoder = PixArtPromptEncoder(pipe, micro=(side, side) if model.use_additional_conditions else None,
                                          embeds=embeds, model=model)
    return ctx


def load_prompt_embeds(path: str | None) -> PromptEmbeds | None:
    """The checked prompt-embeddings file at `path` (prompt_embeds.py), None for None."""
    return None if path is None else read_prompt_embeds(path)


def _require(ctx: PipelineContext, prompts) -> None:
    """Prompts the run will use must be in the embeddings file, if conditioning comes from one."""
    embeds = getattr(ctx.encoder, "embeds", None)
    if embeds is not None:
        embeds.require(prompts)


def encode_prompts_file(pipe, path, prompts) -> Path:
    """Encode the distinct `prompts` (and the empty prompt) with `pipe`'s own text encoder(s), as each
    family's encoder does, and write them as a prompt-embeddings file (prompt_embeds.py) at `path`."""
    from . import family_for
    from .pipeline_parts import denoiser_of

    _, model = denoiser_of(pipe)
    family = family_for(model)
    if not is_text_family(family):
        raise DiffpruneError(f"{type(model).__name__} takes no prompts; prompt embeddings are for text-conditional "
                             "pipelines (Stable Diffusion 1/2/XL/3, PixArt)")
    encoder = context_for(pipe, family, model).encoder
    distinct = list(dict.fromkeys([EMPTY, *prompts]))
    source = {"pipeline": type(pipe).__name__, "denoiser": type(model).__name__,
              "encoders": {k: type(v).__name__ for k, v in pipe.components.items()
                           if k.startswith("text_encoder") and v is not None}}
    return write_prompt_embeds(path, encoder.layout, distinct, encoder.embeddings(distinct), source)


def attach_dataset(ctx: PipelineContext, dataset, data: str, *, prompt: str | None = None,
                   captions: str | None = None, class_labels=None, seed: int = 0,
                   label_fallback: str = "random") -> PipelineContext:
    """Per-image prompts / labels (SDXL: and time_ids) for `dataset` (unet2d_condition.py, dit.py, sdxl.py)."""
    if ctx.text:
        ctx.prompts = prompts_for_dataset(dataset, data, prompt, captions)
        _require(ctx, ctx.prompts)
        paths = getattr(dataset, "paths", None)
        if is_text_time(ctx.model) and paths:
            from .sdxl import training_time_ids

            ctx.time_ids = training_time_ids(paths, ctx.data_size()[0])
    elif isinstance(ctx.family, DiTFamily):
        n = ctx.family.num_classes(ctx.model)
        ctx.labels = labels_for_dataset(dataset, data, parse_class_labels(class_labels, n), n, seed, label_fallback)
    return ctx


def attach_for_sampling(ctx: PipelineContext, *, prompt: str | list[str] | None = None,
                        class_labels=None, seed: int = 0, guidance_scale: float = 1.0,
                        negative_prompt: str | None = None, guidance_rescale: float = 0.0) -> PipelineContext:
    """Prompts / labels cycled over sample indices (random labels drawn from `seed` if none), and
    the classifier-free-guidance settings (families/guidance.py)."""
    check_guidance(guidance_scale, guidance_rescale, negative_prompt)
    if ctx.text:
        if not prompt:
            raise DiffpruneError(f"sampling a text-conditional model ({type(ctx.model).__name__}) needs a prompt")
        ctx.prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        _require(ctx, [*ctx.prompts, negative_prompt])
    elif isinstance(ctx.family, DiTFamily):
        n = ctx.family.num_classes(ctx.model)
        labels = parse_class_labels(class_labels, n)
        ctx.labels = labels
        ctx.label_seed = seed  # labels None: image i gets a random label drawn from (seed, i)
    if negative_prompt is not None and not ctx.text:
        raise DiffpruneError("negative_prompt applies to text-conditional models only")
    if guidance_on(guidance_scale) and not ctx.family.conditional:
        raise DiffpruneError(f"guidance_scale={guidance_scale} needs a conditional model (Stable Diffusion, DiT); "
                             f"{type(ctx.model).__name__} is unconditional: use guidance_scale 1")
    ctx.guidance_scale, ctx.negative_prompt, ctx.guidance_rescale = float(guidance_scale), negative_prompt, \
        float(guidance_rescale)
    return ctx
