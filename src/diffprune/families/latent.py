"""Latent diffusion: the pipeline's autoencoder maps images to the denoiser's space and back.

Only the denoiser is pruned; calibration, fine-tuning and sampling happen in latent space. Scaling
follows diffusers' pipelines: they decode `latents / scaling_factor (+ shift_factor)` (LDMPipeline:
`vqvae.config.scaling_factor`; Stable Diffusion / DiT: `vae.config.scaling_factor`), so encoding
is `(z - shift_factor) * scaling_factor`, with z the VQ encoder output (pre-quantisation, as
VQModel.decode quantises) or the KL posterior (its mean for calibration, a sample for training).
"""

from __future__ import annotations

import torch

from ..errors import DiffpruneError

AUTOENCODER_COMPONENTS = ("vqvae", "vae")


class LatentCodec:
    """Encode images (B, C, H, W in [-1, 1]) to scaled latents and decode them back."""

    def __init__(self, autoencoder: torch.nn.Module, component: str):
        self.autoencoder, self.component = autoencoder.eval().requires_grad_(False), component
        config = autoencoder.config
        self.scaling = float(getattr(config, "scaling_factor", None) or 1.0)
        self.shift = float(getattr(config, "shift_factor", None) or 0.0)
        self.factor = 2 ** (len(config.block_out_channels) - 1)  # as the pipelines' vae_scale_factor
        self.image_channels = int(config.in_channels)
        self.latent_channels = int(config.latent_channels)

    def image_size(self, latent_size: int) -> int:
        return int(latent_size) * self.factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents; `generator` None = the KL posterior mean (deterministic)."""
        ae = self.autoencoder
        images = images.to(device=ae.device, dtype=ae.dtype)
        out = ae.encode(images)
        if hasattr(out, "latent_dist"):
            dist = out.latent_dist
            z = dist.mean if generator is None else dist.mean + dist.std * torch.randn(
                dist.mean.shape, generator=generator).to(dist.mean)
        else:
            z = out.latents
        return (z.float() - self.shift) * self.scaling

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        ae = self.autoencoder
        z = latents.to(device=ae.device, dtype=ae.dtype) / self.scaling + self.shift
        return ae.decode(z).sample.float()

    def to(self, device) -> LatentCodec:
        self.autoencoder.to(device)
        return self


def codec_of(pipe) -> LatentCodec | None:
    """The pipeline's autoencoder as a codec, or None for a pixel-space pipeline."""
    for name in AUTOENCODER_COMPONENTS:
        ae = getattr(pipe, name, None)
        if ae is not None:
            if not hasattr(ae, "encode") or not hasattr(ae, "decode"):
                raise DiffpruneError(f"{type(pipe).__name__}.{name} ({type(ae).__name__}) is not an autoencoder "
                                     "with encode/decode; supported: VQModel, AutoencoderKL")
            return LatentCodec(ae, name)
    return None
