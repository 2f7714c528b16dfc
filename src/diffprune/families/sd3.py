"""diffusers `SD3Transformer2DModel` (Stable Diffusion 3 / 3.5, `StableDiffusion3Pipeline`): the MMDiT of
Esser et al. 2024, "Scaling Rectified Flow Transformers", sec. 4: an image stream and a text (context)
stream with their own weights, one joint attention over both token sets, adaLN-Zero modulation from
`temb` = timestep MLP + pooled-text MLP (`time_text_embed`); trained by flow matching (diffusion.py).

Prunable: joint-attention heads (whole heads with `prune_heads`, else head dims). The image
projections (to_q/k/v, to_out) and the context ones (add_q/k/v_proj, to_add_out) share one head
layout (their tokens are concatenated into one attention), so they form one torch-pruning group and
lose the same heads / head dims. Head-dim pruning folds sqrt(d_new/d_old) into to_q *and* add_q_proj
(the processor scales by the current head dim, see attention.py); with qk-norm (SD3.5,
`qk_norm="rms_norm"`, normalised per head dim) only whole heads can go (the norm weights stay).
Also prunable: MLP widths of ff / ff_context, the hidden widths of the timestep and pooled-text
MLPs, and the `temb` width (the MLPs' output, read only by the adaLN linears: a pure channel removal).
SD3.5's dual-attention blocks (`attn2`, image tokens only) prune like `attn`.

Protected: the patch embedding (`pos_embed.proj`), `context_embedder` and `proj_out`, and with them
both residual widths. `--prune-residual` is refused (`configured`): the image stream (patch embedding +
a sin-cos grid cropped from `pos_embed_max_size`) and the text stream are read through adaLN-Zero
projections of 6 (2 in the last context norm and `norm_out`) chunks of the width; like DiT's
`proj_out_1` they would need chunked channel groups and the buffer slicing, not built or verified here.

Conditioning = the pipeline's three text encoders as `StableDiffusion3Pipeline.encode_prompt` uses them
(`SD3PromptEncoder`): CLIP-L and CLIP-G penultimate hidden states concatenated on features, zero-padded
to the T5 width, then T5's `max_sequence_length` tokens appended on the sequence axis (zeros when the
pipeline has no `text_encoder_3`, as the pipeline does); pooled = both CLIP projections concatenated.
"""

from __future__ import annotations

import math

import torch
from diffusers import SD3Transformer2DModel

from ..errors import DiffpruneError
from .attention import attention_modules, fix_attention, fold_scale, qkv_head_map
from .base import Family
from .prompt_embeds import CachedPrompts, PromptEmbeds

CLIP_LENGTH = 77  # the CLIP tokenizers' model_max_length in released SD3 pipelines
T5_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length
TEXT_LENGTH = CLIP_LENGTH + T5_LENGTH  # MACs are counted at the pipeline's default token count
QKV = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


class SD3Family(Family):
    name = "sd3"
    component = "transformer"
    model_classes = (SD3Transformer2DModel,)
    conditional = True
    residual_prunable = False
    text_conditional = True  # prompts through the pipeline's three text encoders (SD3PromptEncoder)

    def check(self, model):
        c = model.config
        if c.caption_projection_dim != model.inner_dim:
            raise DiffpruneError(f"SD3Transformer2DModel caption_projection_dim={c.caption_projection_dim} is not "
                                 f"allowed; allowed: {model.inner_dim} (heads x head dim, the context width)")

    def configured(self, prune_residual=False):
        if prune_residual:
            raise DiffpruneError("--prune-residual is not supported for SD3 yet: its two residual streams (image, "
                                 "with a cropped sin-cos position grid, and text) are read through 6- and 2-chunk "
                                 "adaLN projections whose channel groups are not built or verified; supported: DiT "
                                 "(DiTTransformer2DModel)")
        return self

    def example_cond(self, model, batch_size=1, device="cpu"):
        g, c, dtype = torch.Generator().manual_seed(0), model.config, _dtype(model)
        return {"encoder_hidden_states": torch.randn(batch_size, TEXT_LENGTH, int(c.joint_attention_dim),
                                                     generator=g).to(device, dtype),
                "pooled_projections": torch.randn(batch_size, int(c.pooled_projection_dim),
                                                  generator=g).to(device, dtype)}

    def example_inputs(self, model, batch_size=1, device="cpu"):
        size, dtype = self.sample_size(model), _dtype(model)
        return {"hidden_states": torch.randn(batch_size, self.in_channels(model), size, size, device=device,
                                             dtype=dtype),
                "timestep": torch.full((batch_size,), 500.0, device=device),
                **self.example_cond(model, batch_size, device)}

    def predict(self, model, x_t, t, cond=None):
        hidden, pooled = self._need(cond, "encoder_hidden_states"), self._need(cond, "pooled_projections")
        return model(hidden_states=x_t, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=t).sample

    def ignored_layers(self, model):
        # proj_out maps to output patches; pos_embed.proj and context_embedder anchor the two residual widths.
        # SD3.5's qk-norm weights (one per head dim, shared by all heads) stay whole: whole heads go around them.
        return [model.proj_out, model.pos_embed.proj, model.context_embedder, *qk_norm_weights(model)]

    def num_heads(self, model):
        return qkv_head_map(model, QKV)

    def unwrapped_parameters(self, model):
        return [(w, 0) for w in qk_norm_weights(model)]  # (head_dim,): never pruned (ignored_layers)

    def fix_after_pruning(self, model, before, prune_heads=False):
        for name, attn in attention_modules(model):
            old_inner, old_heads = int(before[name]["inner_dim"]), int(before[name]["heads"])
            fix_attention(name, attn, before[name], prune_heads=prune_heads)
            new_dim, old_dim = attn.to_q.out_features // attn.heads, old_inner // old_heads
            add_q = getattr(attn, "add_q_proj", None)
            if add_q is not None and new_dim != old_dim and attn.scale_qk:
                fold_scale(add_q, math.sqrt(new_dim / old_dim))  # the context queries, as to_q (attention.py)


def _dtype(model) -> torch.dtype:
    """The model's floating dtype (example inputs match it: a bf16 model is traced with bf16 inputs)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def qk_norm_weights(model) -> list[torch.nn.Parameter]:
    """The affine weights of the q/k norms (torch-pruning sees them as unwrapped parameters of the head dim)."""
    return [norm.weight for _, attn in attention_modules(model)
            for norm in (getattr(attn, n, None) for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"))
            if isinstance(getattr(norm, "weight", None), torch.nn.Parameter)]


class SD3PromptEncoder(CachedPrompts):
    """Prompts -> {encoder_hidden_states, pooled_projections}, as `StableDiffusion3Pipeline.encode_prompt`
    (no clip_skip, the same prompt for all three encoders; the negative prompt is encoded the same way),
    or from a prompt-embeddings file (`embeds`, prompt_embeds.py; then no encoder is needed)."""

    layout = "sd3"

    def __init__(self, pipe, model, max_sequence_length: int = T5_LENGTH, embeds: PromptEmbeds | None = None):
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.clip, self.t5, self.t5_tokenizer = [], None, None
        self.max_length, self.width = int(max_sequence_length), int(model.config.joint_attention_dim)
        if embeds is not None:
            self.use_file(embeds, {"prompt_embeds": ("joint_attention_dim", self.width), "pooled_prompt_embeds": (
                "pooled_projection_dim", int(model.config.pooled_projection_dim))}, model)
            return
        pairs = [(getattr(pipe, f"tokenizer{s}", None), getattr(pipe, f"text_encoder{s}", None)) for s in ("", "_2")]
        if any(t is None or e is None for t, e in pairs):
            raise DiffpruneError("SD3 needs the pipeline's tokenizer, text_encoder, tokenizer_2 and text_encoder_2 "
                                 "(CLIP-L, CLIP-G) or --prompt-embeds; give a StableDiffusion3Pipeline folder")
        self.clip = [(t, e.eval().requires_grad_(False)) for t, e in pairs]
        self.t5 = getattr(pipe, "text_encoder_3", None)
        self.t5_tokenizer = getattr(pipe, "tokenizer_3", None)
        if self.t5 is not None:
            if self.t5_tokenizer is None:
                raise DiffpruneError("the SD3 pipeline has text_encoder_3 but no tokenizer_3")
            self.t5.eval().requires_grad_(False)
        self.clip_length = int(pairs[0][0].model_max_length)  # the pipeline's tokenizer_max_length

    def to(self, device) -> SD3PromptEncoder:
        for _, enc in self.clip:
            enc.to(device)
        if self.t5 is not None:
            self.t5.to(device)
        return self

    def _t5(self, prompts: list[str], like: torch.Tensor) -> torch.Tensor:
        if self.t5 is None:  # the pipeline's zeros when T5 is left out
            return torch.zeros(len(prompts), self.max_length, self.width, dtype=like.dtype, device=like.device)
        ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt").input_ids
        return self.t5(ids.to(self.t5.device))[0].to(like.device)

    @torch.no_grad()
    def _encode_missing(self, missing: list[str]) -> None:
        hidden, pooled = [], []
        for tok, enc in self.clip:
            ids = tok(missing, padding="max_length", max_length=self.clip_length, truncation=True,
                      return_tensors="pt").input_ids
            out = enc(ids.to(enc.device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        clip = torch.cat(hidden, dim=-1)
        t5 = self._t5(missing, clip)
        if clip.shape[-1] > t5.shape[-1]:
            raise DiffpruneError(f"the CLIP embeddings are {clip.shape[-1]} wide, wider than T5's {t5.shape[-1]}; "
                                 "the pipeline's text encoders do not match")
        embeds = torch.cat([torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5], dim=-2)
        for p, e, q in zip(missing, embeds, torch.cat(pooled, dim=-1), strict=True):
            self._cache[p] = (e.detach().cpu(), q.detach().cpu())

    def cond(self, prompts: list[str], device, time_ids=None) -> dict:
        hidden, pooled = self.rows(prompts, device)
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    def uncond(self, n: int, negative_prompt: str | None, device, time_ids=None) -> dict:
        """The unconditional branch of CFG: the negative prompt, else the empty prompt (as the pipeline)."""
        return self.cond([negative_prompt or ""] * n, device)
