"""PixArt-alpha/sigma (`PixArtTransformer2DModel`) as a family (issue 16 part 2), on a tiny
PixArtAlphaPipeline built here: a byte-level tokenizer, a 1-layer T5 encoder, a tiny KL autoencoder.

Heads / head dims, MLP widths, the caption-projection and adaLN-single timestep-MLP hidden widths
prune; the residual width stays (families/pixart.py says why). The pruned model equals the unpruned
one with the removed channels zeroed (a pure channel removal: no norm covers a pruned width), the
folder reloads bit-exactly, plain diffusers generates from it, and prompts are encoded exactly as
`PixArtAlphaPipeline.encode_prompt`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import (
    byte_tokenizer,
    captioned_pipeline_dir,
    check_pruned_reload,
    full_size_models,
    run_cli,
    tiny_kl,
    tiny_t5,
    unwrapped_warnings,
    zeroed_channels,
)
from diffusers import (
    DDIMScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
)

import diffprune  # noqa: F401 - registers the pruned classes for plain diffusers loading
from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.families.attention import attention_modules
from diffprune.families.pixart import PixArtFamily, PixArtPromptEncoder
from diffprune.io import load_pipeline, to_pruned
from diffprune.io.structure import validate_structure
from diffprune.prune.complexity import count_macs_params
from diffprune.prune.importance import ImportanceResult
from diffprune.prune.pruning import prune_model_at_ratio

INFO = {"format": "diffprune-pruning", "format_version": 1, "base_model": {"id": "test", "revision": None},
        "method": {"name": "magnitude"}, "kept_timesteps": [], "base_class": "PixArtTransformer2DModel"}
MAGNITUDE = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
TEXT_LENGTH = 16


def tiny_pixart(micro=False):
    torch.manual_seed(0)
    return PixArtTransformer2DModel(num_attention_heads=4, attention_head_dim=6, in_channels=4, out_channels=8,
                                    num_layers=2, cross_attention_dim=24, caption_channels=32, sample_size=8,
                                    patch_size=2, use_additional_conditions=micro).eval()


def tiny_pipeline():
    """Byte-level tokenizer (no sentencepiece needed), 1-layer T5, tiny KL autoencoder, DDIM."""
    return PixArtAlphaPipeline(tokenizer=byte_tokenizer(TEXT_LENGTH), text_encoder=tiny_t5(), vae=tiny_kl(),
                               transformer=tiny_pixart(),
                               scheduler=DDIMScheduler(num_train_timesteps=20, clip_sample=False, steps_offset=1))


def _cond(model, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    mask = torch.ones(n, TEXT_LENGTH)
    mask[0, 5:] = 0  # a padded caption: the mask must reach the cross-attention
    cond = {"encoder_hidden_states": torch.randn(n, TEXT_LENGTH, 32, generator=g), "encoder_attention_mask": mask}
    if model.use_additional_conditions:
        cond.update({"resolution": torch.tensor([[64.0, 64.0]] * n), "aspect_ratio": torch.ones(n, 1)})
    return x, torch.tensor([3, 17][:n]), cond


def _predict(model, seed=0):
    x, t, cond = _cond(model, seed=seed)
    with torch.no_grad():
        return PixArtFamily().predict(model, x, t, cond)


# ZERO[root suffix] = (layers whose output rows go, layers whose input columns go) for a group rooted there
ZERO = {"attn1.to_out.0": (("attn1.to_q", "attn1.to_k", "attn1.to_v"), ("attn1.to_out.0",)),
        "attn2.to_out.0": (("attn2.to_q", "attn2.to_k", "attn2.to_v"), ("attn2.to_out.0",)),
        "ff.net.0.proj": (("ff.net.0.proj",), ("ff.net.2",)),
        "linear_1": (("linear_1",), ("linear_2",))}


@pytest.mark.parametrize("micro", [False, True], ids=["alpha-512", "micro-conditions"])
@pytest.mark.parametrize("prune_heads", [False, True], ids=["head-dims", "whole-heads"])
def test_pruned_pixart_equals_the_zeroed_model(prune_heads, micro):
    model = tiny_pixart(micro)
    fam = family_for(model)
    assert isinstance(fam, PixArtFamily)
    removed = []
    pruned = prune_model_at_ratio(model, fam, MAGNITUDE, 0.5, prune_heads=prune_heads,
                              on_group=lambda root, idxs, _: removed.append((root, idxs)))
    validate_structure(pruned)
    blk = pruned.transformer_blocks[0]
    for attn in (blk.attn1, blk.attn2):
        assert attn.to_q.out_features == 12 and attn.to_k.in_features == 24  # text width stays
        assert attn.heads == (2 if prune_heads else 4)
    assert blk.ff.net[2].in_features == 48
    caption = pruned.caption_projection
    assert caption.linear_1.out_features == 12 and caption.linear_2.out_features == 24
    assert pruned.adaln_single.emb.timestep_embedder.linear_1.out_features == 12
    assert pruned.pos_embed.proj.out_channels == 24 and pruned.adaln_single.linear.out_features == 144
    if micro:
        assert pruned.adaln_single.emb.resolution_embedder.linear_1.out_features == 4
    assert len(removed) == 2 * 3 + 2 + (2 if micro else 0)  # 3 groups a block, caption, timestep (+ sizes)
    expected = _predict(zeroed_channels(model, removed, ZERO))
    assert (_predict(pruned) - expected).abs().max() <= 1e-5
    assert (_predict(pruned) - _predict(model)).abs().max() > 1e-3  # the removed channels did matter


def test_scale_shift_tables_are_given_to_torch_pruning_with_their_channel_dim():
    model = tiny_pixart()
    dims = {tuple(p.shape): d for p, d in PixArtFamily().unwrapped_parameters(model)}
    assert dims == {(6, 24): 1, (2, 24): 1}  # per block and at the output: the residual channels are the last dim
    assert len(PixArtFamily().unwrapped_parameters(model)) == 3 and unwrapped_warnings(model, PixArtFamily()) == []


def test_residual_pruning_is_refused_with_one_line():
    with pytest.raises(DiffpruneError, match="--prune-residual is not supported for PixArt"):
        PixArtFamily().configured(prune_residual=True)
    assert PixArtFamily().configured(False).residual_prunable is False


def test_prompts_are_encoded_as_the_pipeline_does():
    pipe = tiny_pipeline()
    encoder = PixArtPromptEncoder(pipe, max_length=TEXT_LENGTH)
    prompts = ["A Cat on a mat", "two dogs", "A Cat on a mat"]
    cond = encoder.cond(prompts, "cpu")
    embeds, mask, neg, neg_mask = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, negative_prompt="",
                                                     device="cpu", clean_caption=True,
                                                     max_sequence_length=TEXT_LENGTH)
    assert torch.equal(cond["encoder_hidden_states"], embeds) and torch.equal(cond["encoder_attention_mask"], mask)
    uncond = encoder.uncond(3, None, "cpu")
    assert torch.equal(uncond["encoder_hidden_states"], neg) and torch.equal(uncond["encoder_attention_mask"], neg_mask)
    assert PixArtPromptEncoder(pipe).max_length == 120  # PixArtAlphaPipeline's max_sequence_length


def _generate(pipe):
    return pipe(["a cat", "a dog"], num_inference_steps=3, height=16, width=16, use_resolution_binning=False,
                max_sequence_length=TEXT_LENGTH, guidance_scale=3.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_reload_is_bit_exact_and_plain_diffusers_generates(tmp_path):
    pipe = tiny_pipeline()
    pruned = to_pruned(prune_model_at_ratio(pipe.transformer, PixArtFamily(), MAGNITUDE, 0.5), INFO)
    check_pruned_reload(tmp_path / "p", pipe, pruned, PixArtAlphaPipeline, _predict, _generate)


# --------------------------------------------------------------------------- CLI (needs the conditioning glue)


@pytest.fixture(scope="module")
def pixart_dirs(tmp_path_factory):
    return captioned_pipeline_dir(tmp_path_factory.mktemp("pixart"), tiny_pipeline())


def test_cli_prune_from_captions_then_plain_diffusers_generates(pixart_dirs, tmp_path, capsys):
    from diffprune.families.conditioning import context_for

    pipe = load_pipeline(pixart_dirs / "pipe")
    assert context_for(pipe, PixArtFamily(), pipe.transformer).encoder is not None  # PixArt prompts are encoded
    out = tmp_path / "pruned"
    code, err = run_cli(["prune", "--model", pixart_dirs / "pipe", "--data", pixart_dirs / "imgs", "--method",
                         "diff-pruning", "--ratio", "0.5", "--batch-size", "4", "--output-dir", out], capsys)
    assert code == 0, err
    report = json.loads((out / "prune_report.json").read_text())
    assert report["family"] == "pixart" and report["macs"]["fraction"] < 0.9
    assert report["importance"]["num_kept_timesteps"] >= 1
    images = _generate(PixArtAlphaPipeline.from_pretrained(out))
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


# --------------------------------------------------------------------------- full size (slow)




@pytest.mark.slow
def test_full_size_pixart_alpha_structure_numbers():
    """PixArt-XL-2-512x512's transformer (random weights; 64x64 latents, 120 T5 tokens of 4096 dims)."""
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**full_size_models().PIXART_ALPHA).eval()
    fam = family_for(model)
    example = fam.example_inputs(model)
    macs0, params0 = count_macs_params(model, example)
    pruned = prune_model_at_ratio(model, fam, MAGNITUDE, 0.5)
    macs1, params1 = count_macs_params(pruned, example)
    print(f"\nPixArt-alpha XL/2 512: params {params0 / 1e6:.1f}M -> {params1 / 1e6:.1f}M ({params1 / params0:.3f}), "
          f"MACs {macs0 / 1e9:.1f}G -> {macs1 / 1e9:.1f}G ({macs1 / macs0:.3f}) at ratio 0.5, residual kept")
    # exact, as README "Full-size structure checks" quotes them (benchmarks/results/full_size.json, pixart-0.5)
    assert (params0, macs0, params1, macs1) == (610856096, 542488981280, 309588512, 271311046304)
    for _, attn in attention_modules(pruned):
        assert attn.heads == 16 and attn.to_q.out_features == 576
    assert pruned.caption_projection.linear_1.out_features == 576 and pruned.pos_embed.proj.out_channels == 1152
