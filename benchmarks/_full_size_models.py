"""The full-size model shapes (random weights, structure only) shared by the slow structure tests
(tests/test_families.py, test_sdxl.py, test_pixart.py, test_sd3.py, test_dit_residual.py) and the full-size
benchmarks (benchmarks/full_size.py, benchmarks/full_size_sweep.py), plus tiny stand-ins of the same families
for the benchmarks' --smoke runs. Nothing is downloaded: each config is the structure of the public model's
config.json; the weights are random (sizes, MACs and memory do not depend on their values).
"""

from __future__ import annotations

import torch

# stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json (64x64 latents, 77 CLIP tokens of 768 dims)
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
)
# facebook/DiT-XL-2-256 transformer/config.json (32x32 latents, class-conditional)
DIT_XL2 = dict(
    num_layers=28,
    num_attention_heads=16,
    attention_head_dim=72,
    sample_size=32,
    patch_size=2,
    in_channels=4,
    out_channels=8,
    num_embeds_ada_norm=1000,
)
# PixArt-alpha/PixArt-XL-2-512x512 transformer/config.json (64x64 latents, 120 T5 tokens of 4096 dims)
PIXART_ALPHA = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    cross_attention_dim=1152,
    caption_channels=4096,
    sample_size=64,
    patch_size=2,
)
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (structure only, random weights)
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)
SD3_MEDIUM = dict(  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json (structure only)
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)

# --smoke stand-ins: the same four families of the sweep benchmark, a few thousand to ~100k parameters
SMOKE = {
    "sd15": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "sdxl": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
        use_linear_projection=True,
    ),
    "dit": dict(
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_embeds_ada_norm=1000,
    ),
    "sd3": dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=16,
    ),
}
FULL = {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "dit": DIT_XL2, "pixart": PIXART_ALPHA, "sd3": SD3_MEDIUM}
LABELS = {
    "sd15": "Stable Diffusion v1.5 UNet (64x64 latent, 77x768 text)",
    "sdxl": "SDXL UNet (128x128 latent, 77x2048 text + added cond)",
    "dit": "DiT-XL/2 (32x32 latent, class-conditional)",
    "pixart": "PixArt-alpha XL/2 (512 px, 64x64 latent, 120 T5 tokens)",
    "sd3": "SD3-medium transformer (128x128 latent, 77 + 256 text tokens)",
}


def model_class(name: str):
    """The diffusers class of family `name` (sd15, sdxl, dit, pixart, sd3)."""
    import diffusers

    return getattr(
        diffusers,
        {
            "sd15": "UNet2DConditionModel",
            "sdxl": "UNet2DConditionModel",
            "dit": "DiTTransformer2DModel",
            "pixart": "PixArtTransformer2DModel",
            "sd3": "SD3Transformer2DModel",
        }[name],
    )


def config(name: str, smoke: bool = False, **overrides) -> dict:
    return {**(SMOKE if smoke else FULL)[name], **overrides}


def build(
    name: str, smoke: bool = False, dtype: torch.dtype | None = None, device: str | None = None, **overrides
) -> torch.nn.Module:
    """A random-weight model of family `name` in eval mode (seed it with torch.manual_seed beforehand).

    `dtype` builds it in that default dtype (bf16: half the memory of fp32 while it is made);
    `device="meta"` builds shapes only; `overrides` change config entries (e.g. sample_size)."""
    default = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        if device is not None:
            with torch.device(device):
                return model_class(name)(**config(name, smoke, **overrides)).eval()
        return model_class(name)(**config(name, smoke, **overrides)).eval()
    finally:
        torch.set_default_dtype(default)


def meta_cost(model: torch.nn.Module, family, sample_size: int) -> tuple[int, int]:
    """(MACs, params) at `sample_size` latents, batch 1, counted on the meta device (shapes only).

    A model not already on the meta device is MOVED there (in place: its weights are gone afterwards)."""
    from diffprune.prune.complexity import count_macs_params

    meta = model.to("meta")
    meta.register_to_config(sample_size=sample_size)
    return count_macs_params(meta, family.example_inputs(meta, device="meta"))
