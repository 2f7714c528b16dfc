"""diffusers `PixArtTransformer2DModel` (PixArt-alpha / PixArt-sigma, `PixArtAlphaPipeline`,
`PixArtSigmaPipeline`): a DiT with T5 text cross-attention and adaLN-single (Chen et al.,
"PixArt-alpha", ICLR 2024, sec. 2.3: one timestep MLP shared by all blocks, per-block learned
`scale_shift_table` offsets).

Prunable: self- and cross-attention heads (whole heads with `prune_heads`, else head dims, the
softmax scale kept as for DiT), MLP hidden widths, the hidden width of the caption projection
(`caption_projection.linear_1`) and of the adaLN-single timestep MLP (`adaln_single.emb.
timestep_embedder.linear_1`; with micro-conditions also the resolution / aspect-ratio MLPs).
Not prunable: the residual (hidden) width. Besides the position buffer (see dit.py), the caption
projection's output is reshaped to the residual width (`view(batch, -1, hidden_states.shape[-1])`),
a coupling torch-pruning does not trace; pruning one without the other would silently fold caption
tokens together. `caption_projection.linear_2` and `pos_embed.proj` therefore stay whole, and
with them every residual-coupled tensor (the adaLN-single output, both `scale_shift_table`s).

Conditioning = the pipeline's own T5 encoder applied as `PixArtAlphaPipeline.encode_prompt` does
(caption cleaning when its optional packages are installed, `max_sequence_length` tokens padded, the
attention mask passed to the encoder and to the transformer); micro-conditions (`resolution`,
`aspect_ratio`, PixArt-alpha 1024px) are the image size in pixels and height / width.
"""

from __future__ import annotations

import torch
from diffusers import PixArtTransformer2DModel

from ..errors import DiffpruneError
from .attention import attention_modules, fix_attention, qkv_head_map
from .base import Family
from .prompt_embeds import CachedPrompts, PromptEmbeds

TEXT_LENGTH = 120  # PixArtAlphaPipeline's max_sequence_length; MACs are counted at it
SIGMA_TEXT_LENGTH = 300  # PixArtSigmaPipeline's
VAE_SCALE = 8  # pixels per latent (the pipelines' vae_scale_factor for every released PixArt)


class PixArtFamily(Family):
    name = "pixart"
    component = "transformer"
    model_classes = (PixArtTransformer2DModel,)
    conditional = True
    residual_prunable = False
    text_conditional = True  # prompts through the pipeline's text encoder (PixArtPromptEncoder)

    def check(self, model):
        c = model.config
        if c.caption_channels is None:
            raise DiffpruneError("PixArtTransformer2DModel without caption_channels (no caption projection) is "
                                 "not supported; supported: PixArt-alpha/sigma transformers")
        if c.cross_attention_dim != model.inner_dim:
            raise DiffpruneError(f"PixArtTransformer2DModel cross_attention_dim={c.cross_attention_dim} is not "
                                 f"allowed; allowed: {model.inner_dim} (the caption projection's width)")

    def configured(self, prune_residual=False):
        if prune_residual:
            raise DiffpruneError("--prune-residual is not supported for PixArt yet: its caption projection is "
                                 "reshaped to the residual width, a coupling torch-pruning does not trace; "
                                 "supported: DiT (DiTTransformer2DModel)")
        return self

    def example_cond(self, model, batch_size=1, device="cpu"):
        g = torch.Generator().manual_seed(0)
        cond = {"encoder_hidden_states": torch.randn(batch_size, TEXT_LENGTH, int(model.config.caption_channels),
                                                     generator=g).to(device),
                "encoder_attention_mask": torch.ones(batch_size, TEXT_LENGTH, device=device)}
        if model.use_additional_conditions:
            side = float(self.sample_size(model) * VAE_SCALE)
            cond.update(micro_conditions(batch_size, side, side, device))
        return cond

    def example_inputs(self, model, batch_size=1, device="cpu"):
        size = self.sample_size(model)
        cond = self.example_cond(model, batch_size, device)
        added = {k: cond.pop(k, None) for k in ("resolution", "aspect_ratio")}
        return {"hidden_states": torch.randn(batch_size, self.in_channels(model), size, size, device=device),
                "timestep": torch.ones(batch_size, dtype=torch.long, device=device),
                "added_cond_kwargs": added, **cond}

    def predict(self, model, x_t, t, cond=None):
        hidden = self._need(cond, "encoder_hidden_states")
        added = {"resolution": None, "aspect_ratio": None}
        if model.use_additional_conditions:
            added = {k: self._need(cond, k) for k in added}
        out = model(x_t, encoder_hidden_states=hidden, encoder_attention_mask=cond.get("encoder_attention_mask"),
                    timestep=t, added_cond_kwargs=added).sample
        c = x_t.shape[1]
        return out[:, :c] if out.shape[1] == 2 * c else out  # drop the learned-sigma half, as the pipeline

    def ignored_layers(self, model):
        # proj_out maps to output patches; pos_embed.proj and caption_projection.linear_2 anchor the residual.
        return [model.proj_out, model.pos_embed.proj, model.caption_projection.linear_2]

    def num_heads(self, model):
        return qkv_head_map(model)

    def unwrapped_parameters(self, model):
        # the adaLN-single offsets: (6, width) per block and (2, width) at the output, indexed by residual channels
        return [(p, p.dim() - 1) for name, p in model.named_parameters() if name.endswith("scale_shift_table")]

    def fix_after_pruning(self, model, before, prune_heads=False):
        for name, attn in attention_modules(model):
            fix_attention(name, attn, before[name], prune_heads=prune_heads)


def micro_conditions(batch_size: int, height: float, width: float, device="cpu") -> dict:
    """PixArt-alpha's size conditioning, as PixArtAlphaPipeline builds it: resolution (H, W) in
    pixels and the aspect ratio H / W, one row per image."""
    return {"resolution": torch.tensor([[height, width]] * batch_size, device=device),
            "aspect_ratio": torch.tensor([[height / width]] * batch_size, device=device)}


class PixArtPromptEncoder(CachedPrompts):
    """Prompts -> T5 `encoder_hidden_states` + `encoder_attention_mask`, as `encode_prompt` of
    PixArtAlphaPipeline / PixArtSigmaPipeline (no guidance; the negative prompt is encoded the same way),
    or from a prompt-embeddings file (`embeds`, prompt_embeds.py; then no encoder is needed)."""

    layout = "pixart"

    def __init__(self, pipe, max_length: int | None = None, micro: tuple[float, float] | None = None,
                 embeds: PromptEmbeds | None = None, model=None):
        self.micro, self._cache = micro, {}
        self.tokenizer = self.text_encoder = None
        if embeds is not None:
            self.use_file(embeds, {"prompt_embeds": ("caption_channels", int(model.config.caption_channels))}, model)
            self.max_length = int(embeds.tensors["prompt_embeds"].shape[1])
            return
        tokenizer, encoder = getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)
        if tokenizer is None or encoder is None:
            raise DiffpruneError("PixArt needs the pipeline's tokenizer and text_encoder to encode prompts (or "
                                 "--prompt-embeds); give a PixArtAlphaPipeline / PixArtSigmaPipeline folder")
        self.tokenizer, self.text_encoder = tokenizer, encoder.eval().requires_grad_(False)
        self.preprocess = getattr(pipe, "_text_preprocessing", None)  # the pipeline's caption cleaning
        if max_length is None:  # the pipeline's own default max_sequence_length
            max_length = SIGMA_TEXT_LENGTH if type(pipe).__name__ == "PixArtSigmaPipeline" else TEXT_LENGTH
        self.max_length = int(max_length)

    def to(self, device) -> PixArtPromptEncoder:
        if self.text_encoder is not None:
            self.text_encoder.to(device)
        return self

    def _preprocess(self, prompts: list[str]) -> list[str]:
        """The pipeline's `_text_preprocessing(clean_caption=True)`, as its `__call__` runs it; without
        beautifulsoup4 / ftfy the pipeline falls back (with a warning per call) to lower().strip()."""
        from diffusers.utils import is_bs4_available, is_ftfy_available

        if self.preprocess is not None and is_bs4_available() and is_ftfy_available():
            return self.preprocess(prompts, clean_caption=True)
        return [p.lower().strip() for p in prompts]

    @torch.no_grad()
    def _encode_missing(self, missing: list[str]) -> None:
        texts = self._preprocess(missing)
        tok = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        enc = self.text_encoder
        mask = tok.attention_mask.to(enc.device)
        out = enc(tok.input_ids.to(enc.device), attention_mask=mask)[0]
        for p, e, m in zip(missing, out, mask, strict=True):
            self._cache[p] = (e.detach().cpu(), m.detach().cpu())

    def encode(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, mask = self.rows(prompts, device)
        return hidden, mask

    def cond(self, prompts: list[str], device, time_ids=None) -> dict:
        hidden, mask = self.encode(prompts, device)
        out = {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}
        if self.micro is not None:
            out.update(micro_conditions(len(prompts), *self.micro, device=device))
        return out

    def uncond(self, n: int, negative_prompt: str | None, device, time_ids=None) -> dict:
        """The unconditional branch of CFG: the negative prompt, else the empty prompt (as the pipeline)."""
        return self.cond([negative_prompt or ""] * n, device)
