"""Model families beyond the DDPM UNet: latent diffusion (VQ and KL autoencoders), Stable Diffusion
UNets (text cross-attention), DiT. Tiny models are built in the test (no hub): every method prunes,
folders reload bit-exactly through both loaders, a finetune step and sampling run, bad input fails
with one line.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch_pruning as tp
from conftest import ae_kwargs, byte_tokenizer, full_size_models, tiny_clip, tiny_kl, tiny_sd_unet  # noqa: F401
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    LDMPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from PIL import Image

import diffprune
from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.families.attention import attention_modules, fix_attention, qkv_head_map
from diffprune.families.conditioning import attach_for_sampling, context_for
from diffprune.families.pipeline_parts import denoiser_of
from diffprune.io import load_pipeline, load_unet, to_pruned
from diffprune.io.structure import record_structure, validate_structure
from diffprune.prune.complexity import count_macs_params
from diffprune.prune.importance import METHODS, ImportanceResult
from diffprune.prune.pruning import PruneConfig, head_ratio_dict, prune_model_at_ratio
from diffprune.prune.stage import run_prune

FAMILIES = ("ldm", "sd", "dit")
PRUNED = {"ldm": "PrunedUNet2DModel", "sd": "PrunedUNet2DConditionModel", "dit": "PrunedDiTTransformer2DModel"}
INFO = {"format": "diffprune-pruning", "format_version": 1, "base_model": {"id": "test", "revision": None},
        "method": {"name": "magnitude"}, "kept_timesteps": []}


# --------------------------------------------------------------------------- tiny models


def tiny_vq():
    torch.manual_seed(1)
    return VQModel(**ae_kwargs(), latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3).eval()


def tiny_dit():
    torch.manual_seed(4)
    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def tiny_text():
    """A byte-level CLIP tokenizer (no merges) and a 2-layer CLIPTextModel with 16-dim output."""
    return byte_tokenizer(), tiny_clip()


def build_pipeline(kind: str):
    scheduler = DDIMScheduler(num_train_timesteps=20, clip_sample=False, steps_offset=1)  # latent-space config
    if kind == "ldm":
        torch.manual_seed(6)
        unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                           layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
        return LDMPipeline(vqvae=tiny_vq(), unet=unet, scheduler=scheduler)
    if kind == "sd":
        tokenizer, text_encoder = tiny_text()
        return StableDiffusionPipeline(vae=tiny_kl(), text_encoder=text_encoder, tokenizer=tokenizer,
                                       unet=tiny_sd_unet(), scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    return DiTPipeline(transformer=tiny_dit(), vae=tiny_kl(), scheduler=scheduler)


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    for kind in FAMILIES:
        build_pipeline(kind).save_pretrained(root / kind, safe_serialization=True)
    return root


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """8 RGB 16x16 images in integer class folders, with a captions.jsonl naming each of them."""
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        sub = folder / str(i % 2)
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(sub / f"{i}.png")
        rows.append({"file_name": f"{i % 2}/{i}.png", "text": f"a picture of {'cats' if i % 2 else 'dogs'} {i}"})
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _predict(pipe, seed=0):
    _, model = denoiser_of(pipe)
    fam = family_for(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, fam.in_channels(model), fam.sample_size(model), fam.sample_size(model), generator=g)
    with torch.no_grad():
        return fam.predict(model, x, torch.tensor([1, 15]), fam.example_cond(model, 2))


# --------------------------------------------------------------------------- prune + reload


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", FAMILIES)
def test_every_method_prunes_each_family(kind, method, pipeline_dirs, image_dir, tmp_path):
    out = tmp_path / "pruned"
    config = PruneConfig(model=str(pipeline_dirs / kind), data=str(image_dir), method=method, ratio=0.3,
                         batch_size=4, threshold=0.05, class_labels="1,3" if kind == "dit" else None)
    report = run_prune(config, out, progress=False)
    assert report["params"]["fraction"] < 0.95 and report["macs"]["fraction"] < 0.95
    assert report["family"] == {"ldm": "unet2d", "sd": "unet2d_condition", "dit": "dit"}[kind]
    if method in ("diff-pruning", "taylor"):
        assert report["importance"]["num_kept_timesteps"] >= 1
    pipe = load_pipeline(out)
    component, model = denoiser_of(pipe)
    assert type(model).__name__ == PRUNED[kind] and model.pruning_info["method"]["name"] == method
    assert model.pruning_info["method"]["latent"] is True
    validate_structure(model)
    y = _predict(pipe)
    assert y.shape[1] == family_for(model).in_channels(model) and torch.isfinite(y).all()
    index = json.loads((out / "model_index.json").read_text())
    assert index[component] == ["diffprune.io", PRUNED[kind]]


@pytest.mark.parametrize("prune_heads", [False, True], ids=["head-dims", "whole-heads"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_reload_is_bit_exact_through_every_loader(kind, prune_heads, tmp_path):
    pipe = build_pipeline(kind)
    component, model = denoiser_of(pipe)
    fam = family_for(model)
    imp = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
    pruned = to_pruned(prune_model_at_ratio(model, fam, imp, 0.5, prune_heads=prune_heads),
                       {**INFO, "base_class": type(model).__name__})
    heads = {n: (a.heads, a.to_q.out_features // a.heads) for n, a in attention_modules(pruned)}
    before = {n: (a.heads, a.to_q.out_features // a.heads) for n, a in attention_modules(model)}
    for name, (h, d) in heads.items():
        if prune_heads:
            assert d == before[name][1] and h < before[name][0]  # whole heads go, head size stays
        else:
            assert h == before[name][0] and d < before[name][1]  # head count stays, dims go
    pipe.register_modules(**{component: pruned})
    pipe.save_pretrained(tmp_path / "p", safe_serialization=True)
    expected = _predict(pipe)
    loaded = [load_pipeline(tmp_path / "p"), DiffusionPipeline.from_pretrained(tmp_path / "p")]
    for again in loaded:
        other = getattr(again, component)
        assert type(other).__name__ == PRUNED[kind]
        for (k, a), (k2, b) in zip(pruned.state_dict().items(), other.state_dict().items(), strict=True):
            assert k == k2 and torch.equal(a, b)
        assert record_structure(other) == record_structure(pruned)
        assert torch.equal(_predict(again), expected)
    bare = load_unet(tmp_path / "p" / component)
    assert torch.equal(bare.state_dict()[next(iter(bare.state_dict()))],
                       pruned.state_dict()[next(iter(pruned.state_dict()))])


def test_public_api_exports_the_pruned_classes():
    assert diffprune.PrunedUNet2DConditionModel.__name__ == PRUNED["sd"]
    assert diffprune.PrunedDiTTransformer2DModel.__name__ == PRUNED["dit"]


def test_dit_keeps_the_residual_width_and_prunes_mlp_and_heads():
    model = tiny_dit()
    imp = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
    pruned = prune_model_at_ratio(model, family_for(model), imp, 0.5, prune_heads=True)
    block = pruned.transformer_blocks[0]
    assert pruned.pos_embed.proj.out_channels == 32 and pruned.pos_embed.pos_embed.shape[-1] == 32
    assert block.ff.net[2].in_features == 64 and block.attn1.heads == 2 and block.attn1.to_q.out_features == 16
    assert pruned.proj_out_2.out_features == model.proj_out_2.out_features


def test_sd_cross_attention_keeps_the_text_width():
    model = tiny_sd_unet()
    imp = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
    for heads in (False, True):
        pruned = prune_model_at_ratio(model, family_for(model), imp, 0.5, prune_heads=heads)
        attn2 = [a for n, a in attention_modules(pruned) if n.endswith("attn2")]
        assert attn2 and all(a.to_k.in_features == 16 and a.to_v.in_features == 16 for a in attn2)
        assert all(a.to_q.out_features < 32 for a in attn2 if a.query_dim == 32)


# --------------------------------------------------------------------------- attention reference


class _CrossAttn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(24, 64)
        self.attn = Attention(query_dim=64, cross_attention_dim=16, heads=8, dim_head=8, bias=True)
        self.out = torch.nn.Linear(64, 24)

    def forward(self, x, ctx):
        return self.out(self.attn(self.inp(x), encoder_hidden_states=ctx))


@pytest.mark.parametrize("prune_heads", [False, True], ids=["head-dims", "whole-heads"])
def test_pruned_cross_attention_matches_the_reference(prune_heads):
    """Zero 2 of 8 heads (or 3 of 8 dims in every head) in q/k/v/out, prune them through
    torch-pruning with our head maps, fix the module: outputs must not change, for every processor
    (so heads, inner dims and the softmax scale 1/sqrt(8) are consistent), and the text side of
    to_k/to_v keeps its 16 input features."""
    torch.manual_seed(0)
    w = _CrossAttn().eval()
    drop = [h * 8 + d for h in (2, 5) for d in range(8)] if prune_heads else \
        [h * 8 + d for h in range(8) for d in (1, 4, 6)]
    with torch.no_grad():
        for p in (w.attn.to_q, w.attn.to_k, w.attn.to_v):
            p.weight[drop] = 0
            p.bias[drop] = 0
        w.attn.to_out[0].weight[:, drop] = 0
    x, ctx = torch.randn(2, 10, 24), torch.randn(2, 7, 16)
    with torch.no_grad():
        expected = w(x, ctx)
    before = record_structure(w)["attn"]
    heads = qkv_head_map(w)
    pruner = tp.pruner.MetaPruner(
        w, {"x": x, "ctx": ctx}, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.0,
        pruning_ratio_dict={p: 3 / 8 for p in heads}, ignored_layers=[w.out, w.inp], num_heads=heads,
        prune_head_dims=not prune_heads, prune_num_heads=prune_heads,
        head_pruning_ratio_dict=head_ratio_dict(heads, 0.25) if prune_heads else None)
    with torch.no_grad():
        for group in pruner.step(interactive=True):
            group.prune()
    fix_attention("attn", w.attn, before, prune_heads=prune_heads)
    assert (w.attn.heads, w.attn.inner_dim) == ((6, 48) if prune_heads else (8, 40))
    assert w.attn.to_k.in_features == 16 and w.attn.to_v.in_features == 16
    for proc in (AttnProcessor(), AttnProcessor2_0()):
        w.attn.set_processor(proc)
        with torch.no_grad():
            torch.testing.assert_close(w(x, ctx), expected, rtol=1e-5, atol=1e-5)


def _reference_attention(attn, x, ctx):
    """softmax(q k^T * attn.scale) v per head, from the module's own weights and attributes."""
    q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
    b, h = x.shape[0], attn.heads
    split = lambda t: t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2)  # noqa: E731
    w = torch.softmax(split(q) @ split(k).transpose(-1, -2) * attn.scale, dim=-1)
    out = (w @ split(v)).transpose(1, 2).reshape(b, -1, h * (v.shape[-1] // h))
    return attn.to_out[0](out)


@pytest.mark.parametrize("prune_heads", [False, True], ids=["head-dims", "whole-heads"])
def test_every_attention_of_a_pruned_sd_unet_is_consistent(prune_heads):
    model = tiny_sd_unet()
    imp = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
    pruned = prune_model_at_ratio(model, family_for(model), imp, 0.5, prune_heads=prune_heads)
    torch.manual_seed(0)
    for name, attn in attention_modules(pruned):
        x = torch.randn(2, 5, attn.to_q.in_features)
        ctx = torch.randn(2, 3, attn.to_k.in_features) if name.endswith("attn2") else x
        with torch.no_grad():
            got = attn(x, encoder_hidden_states=ctx if name.endswith("attn2") else None)
            torch.testing.assert_close(got, _reference_attention(attn, x, ctx), rtol=1e-5, atol=1e-5)
        assert attn.inner_dim == attn.to_q.out_features == attn.to_out[0].in_features


# --------------------------------------------------------------------------- finetune + sample


@pytest.mark.parametrize("kind", FAMILIES)
def test_finetune_step_and_sampling(kind, pipeline_dirs, image_dir, tmp_path):
    from diffprune.sample.loop import sample_to_folder
    from diffprune.train import finetune

    pruned = tmp_path / "pruned"
    run_prune(PruneConfig(model=str(pipeline_dirs / kind), data=str(image_dir), method="magnitude", ratio=0.3,
                          batch_size=4), pruned, progress=False)
    tuned = finetune(pruned, image_dir, tmp_path / "tuned", steps=1, batch_size=2, checkpoint_every=1,
                     progress=False, tensorboard=False)
    pipe = load_pipeline(tuned)
    component, model = denoiser_of(pipe)
    assert type(model).__name__ == PRUNED[kind]
    before = getattr(load_pipeline(pruned), component)
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), model.state_dict().values(),
                                                     strict=True))
    samples = sample_to_folder(tuned, tmp_path / "samples", 3, batch_size=2, steps=2, progress=False,
                               prompt="a cat" if kind == "sd" else None)
    images = np.load(samples / "samples.npz")["images"]
    assert images.shape == (3, 16, 16, 3)  # decoded from 8x8 latents by the autoencoder
    again = sample_to_folder(tuned, tmp_path / "samples2", 3, batch_size=3, steps=2, progress=False,
                             prompt="a cat" if kind == "sd" else None)
    # Per-image seeds: the same images whatever the batch size. A DiT forward differs by ~1e-7 between
    # batch sizes (its own arithmetic), which can move a pixel across a uint8 rounding boundary.
    diff = np.abs(np.load(again / "samples.npz")["images"].astype(int) - images.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_dit_sampling_labels_are_per_image():
    model = tiny_dit()
    ctx = attach_for_sampling(context_for(DiTPipeline(transformer=model, vae=tiny_kl(),
                                                      scheduler=DDIMScheduler()), family_for(model), model), seed=3)
    a = ctx.cond_for([0, 1, 2, 3], "cpu")["class_labels"]
    assert torch.equal(ctx.cond_for([2, 3], "cpu")["class_labels"], a[2:])
    assert int(a.max()) < 10


# --------------------------------------------------------------------------- bad input


def test_unsupported_family_names_it_and_the_supported_ones():
    from diffusers import DanceDiffusionPipeline, UNet1DModel

    pipe = DanceDiffusionPipeline(unet=UNet1DModel(block_out_channels=(32, 32, 64), sample_size=64),
                                  scheduler=DDIMScheduler())
    with pytest.raises(DiffpruneError) as err:
        denoiser_of(pipe)
    msg = str(err.value)
    assert "UNet1DModel" in msg and all(n in msg for n in ("UNet2DModel", "UNet2DConditionModel",
                                                             "DiTTransformer2DModel"))


def test_unsupported_unet2d_condition_variants_are_refused_clearly():
    with pytest.raises(DiffpruneError, match="class_embed_type"):
        family_for(tiny_sd_unet(class_embed_type="timestep"))


def test_sd_calibration_needs_prompts(pipeline_dirs, image_dir, tmp_path):
    bare = tmp_path / "imgs"
    bare.mkdir()
    for p in sorted(image_dir.rglob("*.png"))[:3]:
        (bare / p.name).write_bytes(p.read_bytes())
    config = PruneConfig(model=str(pipeline_dirs / "sd"), data=str(bare), method="magnitude", ratio=0.3)
    with pytest.raises(DiffpruneError, match="--prompt") as err:
        run_prune(config, tmp_path / "o", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "o").exists()
    report = run_prune(PruneConfig(model=str(pipeline_dirs / "sd"), data=str(bare), method="magnitude", ratio=0.3,
                                   prompt="a photo"), tmp_path / "ok", progress=False)
    assert report["params"]["fraction"] < 1


@pytest.mark.parametrize("edit, match", [
    (lambda rows: rows[:-1], "no caption for 1 of 8"),
    (lambda rows: rows + [{"file_name": "nope.png", "text": "x"}], "not images"),
    (lambda rows: rows[:2] + ["{broken"], "expected a JSON object"),
])
def test_mismatched_captions_fail_with_one_line(edit, match, pipeline_dirs, image_dir, tmp_path):
    rows = [json.loads(line) for line in (image_dir / "captions.jsonl").read_text().splitlines()]
    bad = tmp_path / "captions.jsonl"
    bad.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in edit(rows)))
    config = PruneConfig(model=str(pipeline_dirs / "sd"), data=str(image_dir), method="magnitude", ratio=0.3,
                         captions=str(bad))
    with pytest.raises(DiffpruneError, match=match) as err:
        run_prune(config, tmp_path / "o", progress=False)
    assert "\n" not in str(err.value)


def test_cli_prune_heads_and_prompt(pipeline_dirs, image_dir, tmp_path, capsys):
    from diffprune.cli import main

    out = tmp_path / "o"
    code = main(["prune", "--model", str(pipeline_dirs / "sd"), "--data", str(image_dir), "--method", "magnitude",
                 "--ratio", "0.5", "--prune-heads", "--prompt", "a cat", "--output-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / "unet" / "pruning.json").read_text())
    assert info["method"]["prune_heads"] is True
    attn = [e for n, e in info["structure"].items() if e["type"] == "Attention"]
    assert attn and all(e["inner_dim"] // e["heads"] in (8, 16) and e["heads"] < 4 for e in attn)
    code = main(["prune", "--model", str(pipeline_dirs / "ldm"), "--data", str(image_dir), "--prompt", "x",
                 "--method", "magnitude", "--output-dir", str(tmp_path / "o2")])
    assert code == 2 and "unconditional" in capsys.readouterr().err


# --------------------------------------------------------------------------- full size (slow)




# (params, MACs) before and after, exact: README "Full-size structure checks" (benchmarks/full_size.py rows sd15-0.3,
# dit-0.5); the widths do not depend on the random weights
FULL_SIZE_NUMBERS = {"sd": (859520964, 338831618304, 425374884, 166403786112),
                     "dit": (749826464, 114456637472, 365781920, 57234457760)}


def _full_size_check(model, kind):
    fam = family_for(model)
    example = fam.example_inputs(model)
    macs0, params0 = count_macs_params(model, example)
    imp = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
    pruned = prune_model_at_ratio(model, fam, imp, 0.3 if kind == "sd" else 0.5)
    macs1, params1 = count_macs_params(pruned, example)
    print(f"\n{kind}: params {params0 / 1e6:.1f}M -> {params1 / 1e6:.1f}M ({params1 / params0:.3f}), "
          f"MACs {macs0 / 1e9:.1f}G -> {macs1 / 1e9:.1f}G ({macs1 / macs0:.3f})")
    assert (params0, macs0, params1, macs1) == FULL_SIZE_NUMBERS[kind]  # benchmarks/results/full_size.json
    with torch.no_grad():
        y = fam.predict(pruned, next(iter(example.values())), example["timestep"], fam.example_cond(pruned))
    assert torch.isfinite(y).all()
    pruned = to_pruned(pruned, {**INFO, "base_class": type(model).__name__})
    return pruned


@pytest.mark.slow
def test_full_size_sd15_unet_prunes_to_half_the_macs(tmp_path):
    torch.manual_seed(0)
    model = UNet2DConditionModel(**full_size_models().SD15_UNET).eval()
    pruned = _full_size_check(model, "sd")
    del model
    pruned.save_pretrained(tmp_path / "unet")
    again = load_unet(tmp_path / "unet")
    assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), again.state_dict().values(),
                                                 strict=True))


@pytest.mark.slow
def test_full_size_dit_xl2_prunes_to_half_the_macs(tmp_path):
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**full_size_models().DIT_XL2).eval()
    pruned = _full_size_check(model, "dit")
    del model
    pruned.save_pretrained(tmp_path / "transformer")
    again = load_unet(tmp_path / "transformer")
    assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), again.state_dict().values(),
                                                 strict=True))
    attn = again.transformer_blocks[0].attn1
    assert attn.heads == 16 and math.isclose(attn.scale, (attn.inner_dim // 16) ** -0.5)  # head dims pruned
