"""Small TRAINED transformer families for fast_pool.py and flow_threshold.py (issue 24, items 6 and 7).

`diffprune train` only builds UNet2DModel, so a DiT (DiTPipeline, DDIM/DDPM epsilon schedule, 1000 steps)
and an SD3-shaped flow-matching transformer (StableDiffusion3Pipeline, FlowMatchEulerDiscreteScheduler,
1000 steps, shift 3) are built here with random weights and trained with diffprune's own loop:
`diffprune finetune --reinit --data digits` (train.finetune). Both are latent models over a tiny random
KL autoencoder (16x16 RGB digits -> 8x8x4 latents) whose scaling factor (and SD3's shift factor) are
set from the digits latents so that the scaled latents have mean 0 and std 1, as SD's 0.18215 is chosen.
The DiT trains unconditionally: finetune gives unlabelled images DiT's null class (num_embeds_ada_norm),
and the calibration here uses the same null class. The SD3 model trains on one constant prompt encoded
by tiny offline byte-level CLIP/T5 encoders (as tests/test_sd3.py builds them).

The autoencoder's posterior is made sharp by default (tiny_kl(sharp=True)), so the models train on the digits
latents themselves rather than on posterior samples that are ~93% noise (see tiny_kl).
Trained folders are cached under WORK/<name>_<size>[_sharp]/trained; `trained` returns the pipeline folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

PROMPT = "a handwritten digit"
# Full size: a few hundred K parameters, trained in a few minutes on one thread. Smoke: a few K, a few steps.
DIT = {"full": dict(num_attention_heads=4, attention_head_dim=24, num_layers=4),
       "smoke": dict(num_attention_heads=2, attention_head_dim=8, num_layers=1)}
SD3 = {"full": dict(num_attention_heads=4, attention_head_dim=24, num_layers=4),
       "smoke": dict(num_attention_heads=2, attention_head_dim=8, num_layers=1)}
TRAIN = {"full": dict(steps=3000, batch_size=64, lr=1e-3, warmup_steps=200, ema_decay=0.999, ema_warmup="ratio"),
         "smoke": dict(steps=4, batch_size=8, lr=1e-3, warmup_steps=0, ema_decay=0.0, ema_warmup="none")}
SD3_STEPS = {"steps": 1200}  # SD3: 1.4x the cost of a DiT step; 1200 steps fit the time on a shared CPU
TIMESTEPS = {"full": 1000, "smoke": 20}
# depth_vs_width_dit.py --smoke: the smoke DiT with the full one's 4 blocks (1 block leaves depth nothing to remove)
DIT["smoke_depth"] = {**DIT["smoke"], "num_layers": 4}
TRAIN["smoke_depth"], TIMESTEPS["smoke_depth"] = TRAIN["smoke"], TIMESTEPS["smoke"]


def byte_tokenizer(max_length: int = 12):
    """A byte-level CLIPTokenizer (every byte a token, no merges): needs no downloaded vocabulary."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in bytes_to_unicode().values():
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_clip(seed: int, width: int = 16, length: int = 12):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(byte_tokenizer().get_vocab()), hidden_size=width, intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=length,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=width)
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval()


def tiny_t5(d_model: int = 32, seed: int = 5):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(byte_tokenizer().get_vocab()), d_model=d_model, d_kv=8, d_ff=64,
                                   num_layers=1, num_heads=2)).eval()


def tiny_kl(shift: bool, sharp: bool = True):
    """A 2-level KL autoencoder on 16x16 RGB (8x8x4 latents), its scale (and shift) fitted to the digits.

    The random encoder's posterior std is ~1 everywhere, ~3.6x the spread of its means: after the scaling (fitted
    to the means, which calibration uses) a posterior sample, what `finetune` trains on, is ~93% Gaussian noise
    (variance ~14.7 against 1). `sharp`: the posterior's log-variance set to -30 (diffusers' clamp; std 3e-7), so
    a posterior sample is its mean and the model trains on the digits latents; the means are unchanged. The
    default; sharp=False is the noisy posterior the benchmarks' teachers trained on before 2026-12-06."""
    from diffusers import AutoencoderKL

    from diffprune.data import digits_images

    torch.manual_seed(2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        norm_num_groups=8, sample_size=16, latent_channels=4).eval()
    if sharp:
        with torch.no_grad():  # quant_conv's second half of outputs is the log-variance
            c = vae.config.latent_channels
            vae.quant_conv.weight[c:] = 0.0
            vae.quant_conv.bias[c:] = -30.0
    with torch.no_grad():
        z = vae.encode(digits_images(16, 3)[:512]).latent_dist.mean
    mean = float(z.mean()) if shift else 0.0
    vae.register_to_config(scaling_factor=1.0 / float((z - mean).std()), shift_factor=mean if shift else None)
    return vae


def build_dit(folder: Path, size: str, sharp: bool = True) -> Path:
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(in_channels=4, out_channels=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                norm_num_groups=4, **DIT[size]).eval()
    sched = DDIMScheduler(num_train_timesteps=TIMESTEPS[size], beta_schedule="linear", clip_sample=False)
    DiTPipeline(transformer=dit, vae=tiny_kl(shift=False, sharp=sharp), scheduler=sched).save_pretrained(
        folder, safe_serialization=True)
    return folder


def build_sd3(folder: Path, size: str, sharp: bool = True) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, joint_attention_dim=32,
                                caption_projection_dim=SD3[size]["num_attention_heads"]
                                * SD3[size]["attention_head_dim"], pooled_projection_dim=32, pos_embed_max_size=8,
                                **SD3[size]).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=sd3, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=TIMESTEPS[size], shift=3.0),
        vae=tiny_kl(shift=True, sharp=sharp), text_encoder=tiny_clip(5), tokenizer=byte_tokenizer(),
        text_encoder_2=tiny_clip(6), tokenizer_2=byte_tokenizer(), text_encoder_3=tiny_t5(),
        tokenizer_3=byte_tokenizer())
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


CONTEXT_TOKENS = 16  # SD3 pads T5 to 256 tokens: keep the 12 CLIP tokens and 4 T5 ones (a constant prompt)


def shorten_context(path: Path) -> None:
    """Rewrite an SD3 prompt-embeddings file with only its first CONTEXT_TOKENS context tokens, so joint
    attention runs over 16 + 16 tokens rather than 16 + 268 (training 5x faster on one thread)."""
    from diffprune.families.prompt_embeds import read_prompt_embeds, write_prompt_embeds

    e = read_prompt_embeds(path)
    tensors = {k: v[:, :CONTEXT_TOKENS] if k == "prompt_embeds" else v for k, v in e.tensors.items()}
    write_prompt_embeds(path, e.layout, e.prompts, tensors, {**e.source, "context_tokens": CONTEXT_TOKENS})


def trained(work: Path, name: str, size: str, seed: int = 0, sharp: bool = True) -> tuple[Path, dict]:
    """The trained pipeline folder of family `name` ("dit" or "sd3") and its training record (cached);
    `sharp` (default): over tiny_kl(sharp=True), trained on the digits latents themselves (cached as
    <name>_<size>_sharp); sharp=False: on tiny_kl's noisy posterior samples (cached as <name>_<size>)."""
    from diffprune.train import finetune

    root = work / f"{name}_{size}{'_sharp' if sharp else ''}"
    out, record = root / "trained", root / "training.json"
    if record.exists() and out.exists():
        return out, json.loads(record.read_text())
    init = (build_dit if name == "dit" else build_sd3)(root / "init", size, sharp)
    start = time.perf_counter()
    extra = {}
    if name == "sd3":  # the constant prompt, encoded once (`diffprune encode-prompts`), not at every step
        from diffprune.cli import main

        embeds = root / "prompt_embeds.safetensors"
        if main(["encode-prompts", "--model", str(init), "--prompt", PROMPT, "--output", str(embeds)]) != 0:
            raise SystemExit("diffprune encode-prompts failed")
        shorten_context(embeds)
        extra = {"prompt": PROMPT, "prompt_embeds": str(embeds)}
    train = {**TRAIN[size], **(SD3_STEPS if name == "sd3" and size == "full" else {})}
    finetune(init, "digits", out, reinit=True, seed=seed, dropout=0.0, checkpoint_every=10**6, keep_checkpoints=1,
             log_every=50, progress=False, tensorboard=False, overwrite=True, **train, **extra)
    wall = time.perf_counter() - start
    log = json.loads((out / "train_log.json").read_text())
    rec = {"family": name, "size": size, "train": train, "arch": (DIT if name == "dit" else SD3)[size],
           "num_train_timesteps": TIMESTEPS[size], "train_wall_time_s": wall, "seed": seed, "sharp_posterior": sharp,
           "params": sum(p.numel() for p in _denoiser(out).parameters()), "log": log}
    record.write_text(json.dumps(rec, indent=2) + "\n")
    return out, rec


def _denoiser(folder: Path):
    from diffprune.io import load_pipeline

    pipe = load_pipeline(folder)
    return pipe.transformer


class Calibration:
    """Model-space calibration samples and conditioning, as `diffprune prune` reads them (prune/stage.py);
    DiT: the null class, the label the unlabelled digits were trained with (finetune's fallback); SD3: the
    training prompt from the trained folder's prompt-embeddings file (../prompt_embeds.safetensors)."""

    def __init__(self, pipe, family, model, folder: Path):
        from diffprune.data import make_dataset
        from diffprune.families.conditioning import attach_dataset, context_for
        from diffprune.families.prompt_embeds import read_prompt_embeds

        file = Path(folder).parent / "prompt_embeds.safetensors"
        embeds = read_prompt_embeds(file) if file.exists() else None
        self.ctx = context_for(pipe, family, model, embeds)
        size, channels = self.ctx.data_size()
        self.dataset = make_dataset("digits", size, channels)
        if family.conditional:
            attach_dataset(self.ctx, self.dataset, "digits", prompt=PROMPT if embeds is not None else None, seed=0,
                           label_fallback="null")

    def batch(self, n: int, seed: int) -> tuple[torch.Tensor, dict | None]:
        from diffprune.data import batch_indices, first_batch

        images = first_batch(self.dataset, n, seed)
        cond = self.ctx.cond_for(batch_indices(len(self.dataset), n, seed), "cpu") if self.ctx.family.conditional \
            else None
        with torch.no_grad():
            return self.ctx.to_model_space(images), cond


def loss_drop(log) -> dict:
    """First and last logged training losses (train_log.json's records)."""
    rows = log if isinstance(log, list) else log.get("records", log.get("log", []))
    losses = [r["loss"] for r in rows if isinstance(r, dict) and "loss" in r]
    return {"first": losses[0], "last": losses[-1], "records": len(losses)} if losses else {}
