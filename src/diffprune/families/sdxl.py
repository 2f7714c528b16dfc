"""Stable Diffusion XL conditioning: two text encoders, pooled text embeddings and size `time_ids`.

As `StableDiffusionXLPipeline.encode_prompt` / `_get_add_time_ids` compute them (diffusers):
- each tokenizer pads to its `model_max_length`; each encoder's penultimate hidden state
  (`hidden_states[-2]`) is taken and the two are concatenated along the feature axis;
- the pooled embedding (`text_embeds`) is the first encoder output that is 2-D, i.e. the projection
  of `CLIPTextModelWithProjection` (text_encoder_2);
- the unconditional branch of CFG is all zeros when there is no negative prompt and the pipeline's
  `force_zeros_for_empty_prompt` is set, else the encoded negative (or empty) prompt;
- `time_ids` = original_size + crops_coords_top_left + target_size, in pixels (h, w order); sampling
  uses (H, W, 0, 0, H, W) for the output size, as the pipeline's defaults do. Fine-tuning uses each
  image's own file size and the top-left of its center crop in target pixels, as diffusers'
  train_text_to_image_sdxl.py records them (resize the short side to the target, then center-crop).
"""

from __future__ import annotations

import torch
from PIL import Image

from ..errors import DiffpruneError
from .prompt_embeds import CachedPrompts, PromptEmbeds

TIME_IDS = 6  # original (h, w), crop top-left (y, x), target (h, w)


def pooled_dim(model) -> int:
    """Width of the pooled text embedding the UNet's add_embedding expects."""
    c = model.config
    return int(c.projection_class_embeddings_input_dim) - TIME_IDS * int(c.addition_time_embed_dim)


def example_added_cond(model, batch_size: int = 1, device="cpu") -> dict:
    g = torch.Generator().manual_seed(1)
    side = 8 * (model.config.sample_size if isinstance(model.config.sample_size, int) else model.config.sample_size[0])
    ids = torch.tensor([side, side, 0, 0, side, side], dtype=torch.float32).repeat(batch_size, 1)
    return {"text_embeds": torch.randn(batch_size, pooled_dim(model), generator=g).to(device),
            "time_ids": ids.to(device)}


def default_time_ids(height: int, width: int) -> tuple[int, ...]:
    return (height, width, 0, 0, height, width)


def training_time_ids(paths, size: int) -> list[tuple[int, ...]]:
    """(orig_h, orig_w, crop_top, crop_left, size, size) per image file (header read only)."""
    out = []
    for path in paths:
        with Image.open(path) as im:
            w, h = im.size
        scale = size / min(h, w)
        top, left = (round((h * scale - size) / 2), round((w * scale - size) / 2))
        out.append((h, w, max(0, top), max(0, left), size, size))
    return out


class SDXLPromptEncoder(CachedPrompts):
    """Prompts -> {encoder_hidden_states, text_embeds, time_ids} with an SDXL pipeline's encoders, or
    from a prompt-embeddings file (`embeds`, prompt_embeds.py; then no encoder is needed)."""

    layout = "sdxl"

    def __init__(self, pipe, unet, embeds: PromptEmbeds | None = None):
        self.force_zeros = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True))
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pairs = []
        if embeds is not None:
            self.use_file(embeds, {"prompt_embeds": ("cross_attention_dim", int(unet.config.cross_attention_dim)),
                                   "pooled_prompt_embeds": ("pooled width (projection_class_embeddings_input_dim"
                                                            " - 6 x addition_time_embed_dim)", pooled_dim(unet))}, unet)
            return
        tok, enc = getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)
        tok2, enc2 = getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None)
        if tok2 is None or enc2 is None:
            raise DiffpruneError("an SDXL UNet (addition_embed_type='text_time') needs the pipeline's tokenizer_2 "
                                 "and text_encoder_2 (or --prompt-embeds); give a StableDiffusionXLPipeline folder")
        pairs = ([(tok, enc)] if tok is not None and enc is not None else []) + [(tok2, enc2)]
        self.pairs = [(t, e.eval().requires_grad_(False)) for t, e in pairs]
        width = sum(int(e.config.hidden_size) for _, e in self.pairs)
        if width != int(unet.config.cross_attention_dim):
            raise DiffpruneError(f"the text encoders give {width}-wide embeddings, the UNet's cross_attention_dim "
                                 f"is {unet.config.cross_attention_dim}; the pipeline's parts do not match")

    def to(self, device) -> SDXLPromptEncoder:
        for _, enc in self.pairs:
            enc.to(device)
        return self

    @torch.no_grad()
    def _encode_missing(self, missing: list[str]) -> None:
        hidden, pooled = [], None
        for tok, enc in self.pairs:
            ids = tok(missing, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = enc(ids.to(enc.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise DiffpruneError("text_encoder_2 gives no pooled projection; SDXL needs CLIPTextModelWithProjection")
        embeds = torch.cat(hidden, dim=-1)
        for p, e, q in zip(missing, embeds, pooled, strict=True):
            self._cache[p] = (e.detach().cpu(), q.detach().cpu())

    def encode(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = self.rows(prompts, device)  # (B, L, D), (B, pooled width)
        return hidden, pooled

    def cond(self, prompts: list[str], device, time_ids: torch.Tensor | None = None) -> dict:
        if time_ids is None:
            raise DiffpruneError("SDXL conditioning needs time_ids (image sizes)")
        hidden, pooled = self.encode(prompts, device)
        return {"encoder_hidden_states": hidden, "text_embeds": pooled, "time_ids": time_ids.to(device, hidden.dtype)}

    def uncond(self, n: int, negative_prompt: str | None, device, time_ids: torch.Tensor | None = None) -> dict:
        cond = self.cond([negative_prompt or ""] * n, device, time_ids)
        if negative_prompt is None and self.force_zeros:
            cond["encoder_hidden_states"] = torch.zeros_like(cond["encoder_hidden_states"])
            cond["text_embeds"] = torch.zeros_like(cond["text_embeds"])
        return cond
