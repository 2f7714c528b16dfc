"""Stable Diffusion XL (issue 15): a tiny StableDiffusionXLPipeline built in the test (two CLIP text
encoders with tokenizers, `addition_embed_type="text_time"`, linear projections, two transformer layers
in one block) goes through prune, finetune (caption dropout, distillation), sample with guidance and
evaluate on the CLI; the pruned and fine-tuned folders run with the plain StableDiffusionXLPipeline, and
our guided samples equal its `__call__`. The slow test prints full-size SDXL UNet structure numbers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import byte_tokenizer, full_size_models, guided_latents, run_cli, sd_pipeline, tiny_clip, tiny_kl
from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image

from diffprune.families import family_for
from diffprune.families.conditioning import attach_dataset, context_for
from diffprune.io import load_pipeline
from diffprune.sample.loop import image_generators, load_samples

TOL = 1e-4
TEXT_WIDTH = 16  # each text encoder's hidden size; the UNet's cross_attention_dim is their sum
TIME_DIM = 8  # addition_time_embed_dim


def tiny_sdxl_unet(seed: int = 3, **kw):
    torch.manual_seed(seed)
    args = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                norm_num_groups=8, cross_attention_dim=2 * TEXT_WIDTH, attention_head_dim=(2, 4),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
                projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * TIME_DIM, use_linear_projection=True)
    return UNet2DConditionModel(**{**args, **kw}).eval()


def tiny_text_encoders():
    """Byte-level CLIP tokenizers (no merges), a CLIPTextModel and a CLIPTextModelWithProjection."""
    return byte_tokenizer(), tiny_clip(width=TEXT_WIDTH), byte_tokenizer(), tiny_clip(True, TEXT_WIDTH, seed=6)


def tiny_sdxl(unet=None, **scheduler_kw) -> StableDiffusionXLPipeline:
    tok, enc, tok2, enc2 = tiny_text_encoders()
    scheduler = DDIMScheduler(num_train_timesteps=20, clip_sample=False, steps_offset=1, **scheduler_kw)
    return StableDiffusionXLPipeline(vae=tiny_kl(), text_encoder=enc, text_encoder_2=enc2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet if unet is not None else tiny_sdxl_unet(),
                                     scheduler=scheduler)


@pytest.fixture(scope="module")
def sdxl_inputs(tmp_path_factory):
    """A tiny SDXL pipeline folder and 8 captioned RGB images of mixed sizes."""
    root = tmp_path_factory.mktemp("sdxl")
    rng = np.random.default_rng(0)
    rows = []
    (root / "imgs").mkdir()
    for i in range(8):
        h, w = (16, 24) if i % 2 else (20, 16)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a photo of thing {i}"})
    (root / "imgs" / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny_sdxl().save_pretrained(root / "sdxl", safe_serialization=True)
    return root


@pytest.mark.parametrize("scale,negative,rescale,zeros", [(5.0, None, 0.0, True), (5.0, None, 0.0, False),
                                                          (3.0, "blurry", 0.7, True), (1.0, None, 0.0, True)])
def test_sdxl_guidance_equals_the_pipeline(scale, negative, rescale, zeros):
    pipe = tiny_sdxl()
    pipe.register_to_config(force_zeros_for_empty_prompt=zeros)
    noise, x, _ = guided_latents(pipe, pipe.unet, [0, 1], 4, prompt="a red cat", guidance_scale=scale,
                              negative_prompt=negative, guidance_rescale=rescale)
    with torch.no_grad():
        ref = pipe(prompt=["a red cat"] * 2, negative_prompt=None if negative is None else [negative] * 2,
                   latents=noise.clone(), num_inference_steps=4, guidance_scale=scale, guidance_rescale=rescale,
                   output_type="latent").images
    assert (x - ref).abs().max() <= TOL
    if scale > 1:
        _, plain, _ = guided_latents(pipe, pipe.unet, [0, 1], 4, prompt="a red cat")
        assert (plain - ref).abs().max() > 100 * TOL


def test_training_time_ids_are_the_sizes_and_center_crop_of_each_image(sdxl_inputs):
    from diffprune.data import make_dataset

    pipe = load_pipeline(sdxl_inputs / "sdxl")
    ctx = context_for(pipe, family_for(pipe.unet), pipe.unet)
    dataset = make_dataset(str(sdxl_inputs / "imgs"), 16, 3)
    attach_dataset(ctx, dataset, str(sdxl_inputs / "imgs"))
    ids = ctx.cond_for([0, 1], "cpu")["time_ids"].tolist()
    sizes = [Image.open(p).size for p in dataset.paths[:2]]
    # (orig h, orig w, crop top, crop left, 16, 16): short side resized to 16, then center-cropped
    for (w, h), row in zip(sizes, ids, strict=True):
        top, left = round((h * 16 / min(h, w) - 16) / 2), round((w * 16 / min(h, w) - 16) / 2)
        assert row == [h, w, top, left, 16, 16]
    assert {tuple(r[:2]) for r in ctx.cond_for(range(8), "cpu")["time_ids"].tolist()} == {(20, 16), (16, 24)}
    cond = ctx.cond_for([0], "cpu")
    assert cond["encoder_hidden_states"].shape == (1, 12, 2 * TEXT_WIDTH) and cond["text_embeds"].shape == (1, 16)


def sd2_style():
    """SD 2.x: linear proj_in/proj_out, upcast attention, per-level head dims, v-prediction, "trailing"."""
    return sd_pipeline(DDIMScheduler(num_train_timesteps=20, clip_sample=False, steps_offset=1,
                                     prediction_type="v_prediction", timestep_spacing="trailing"),
                       use_linear_projection=True, upcast_attention=True, attention_head_dim=(2, 4))


def sd1_style():
    """SD 1.x: conv proj_in/proj_out, one head dim, epsilon prediction, "leading" spacing with steps_offset."""
    return sd_pipeline(DDIMScheduler(num_train_timesteps=20, clip_sample=False, steps_offset=1, set_alpha_to_one=False))


@pytest.mark.parametrize("kind", ["sdxl", "sd2", "sd1"])
def test_cli_prune_finetune_sample_evaluate_and_the_plain_pipeline(kind, sdxl_inputs, tmp_path, capsys):
    """Every CLI stage with guidance and caption dropout; the pruned and fine-tuned folders are run by
    the plain pipeline class, whose guided output our samples equal (to a uint8 rounding)."""
    root, data = sdxl_inputs, sdxl_inputs / "imgs"
    if kind in ("sd1", "sd2"):
        (sd2_style() if kind == "sd2" else sd1_style()).save_pretrained(tmp_path / "base", safe_serialization=True)
    base = root / "sdxl" if kind == "sdxl" else tmp_path / "base"
    method = ["--method", "diff-pruning", "--estimator", "fast"] if kind == "sdxl" else ["--method", "magnitude"]
    code, err = run_cli(["prune", "--model", base, "--data", data, "--output-dir", tmp_path / "pruned", *method,
                         "--ratio", "0.3", "--batch-size", "4"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "pruned" / "prune_report.json").read_text())
    assert report["params"]["fraction"] < 0.95
    code, err = run_cli(["finetune", "--model", tmp_path / "pruned", "--data", data, "--output-dir",
                         tmp_path / "tuned", "--steps", "2", "--batch-size", "2", "--distill", "output",
                         "--teacher", base, "--cond-drop-prob", "0.5", "--ema-decay", "0", "--no-progress",
                         "--no-tensorboard"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "tuned" / "finetune_config.json").read_text())["cond_drop_prob"] == 0.5
    args = ["sample", "--num-images", "2", "--batch-size", "2", "--steps", "3", "--prompt", "a red cat",
            "--guidance-scale", "5", "--negative-prompt", "blurry", "--guidance-rescale", "0.5", "--no-progress"]
    pipeline_class = StableDiffusionXLPipeline if kind == "sdxl" else type(sd1_style())
    for name in ("pruned", "tuned"):
        code, err = run_cli([*args, "--model", tmp_path / name, "--output-dir", tmp_path / f"s_{name}"], capsys)
        assert code == 0, err
        images, _ = load_samples(tmp_path / f"s_{name}")
        pipe = load_pipeline(tmp_path / name)
        assert type(pipe) is pipeline_class and type(pipe.unet).__name__ == "PrunedUNet2DConditionModel"
        noise = torch.stack([torch.randn(4, 8, 8, generator=g) for g in image_generators(0, [0, 1])])
        with torch.no_grad():
            ref = pipe(prompt=["a red cat"] * 2, negative_prompt=["blurry"] * 2, latents=noise, num_inference_steps=3,
                       guidance_scale=5.0, guidance_rescale=0.5, output_type="np").images
        assert ref.shape == (2, 16, 16, 3) and ((images > 0) & (images < 255)).mean() > 0.5
        assert np.abs(images.astype(float) - np.round(ref * 255)).max() <= 1
    code, err = run_cli(["evaluate", "--samples", tmp_path / "s_tuned", "--teacher-samples", tmp_path / "s_pruned",
                         "--model", tmp_path / "tuned", "--teacher-model", base, "--latency-repeats", "1",
                         "--latency-warmup", "0", "--throughput-images", "0", "--output", tmp_path / "eval.json"],
                        capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "eval.json").read_text())
    assert 0 < result["consistency"]["ssim"]["mean"] < 1  # fine-tuning changed the samples
    cost = result["cost"]
    assert cost["student"]["params"] < 0.95 * cost["teacher"]["params"]
    assert cost["student"]["macs"] < 0.95 * cost["teacher"]["macs"]
    code, err = run_cli(["report", "--prune", tmp_path / "pruned", "--finetune", tmp_path / "tuned", "--evaluation",
                         tmp_path / "eval.json", "--teacher-samples", tmp_path / "s_pruned", "--student-samples",
                         tmp_path / "s_tuned", "--output-dir", tmp_path / "report"], capsys)
    assert code == 0, err
    assert any((tmp_path / "report").glob("*.html"))


# --------------------------------------------------------------------------- full-size structure (slow)




SDXL_UNET = full_size_models().SDXL_UNET  # stabilityai/stable-diffusion-xl-base-1.0 unet (structure)


def _meta_cost(model, family):
    """(MACs, params) at the SDXL resolution (128x128 latents), counted on a meta-device copy: shapes only."""
    from diffprune.prune.complexity import count_macs_params

    meta = model.to("meta")
    meta.register_to_config(sample_size=128)
    return count_macs_params(meta, family.example_inputs(meta, device="meta"))


@pytest.mark.slow
def test_full_size_sdxl_unet_structure_numbers():
    """Random-weight SDXL UNet (2.57B params) pruned at two ratios in bf16 on CPU, under 24 GB of RAM:
    the weights live in bf16 (5.1 GB, twice while the pruned copy is made), the pruning graph is traced
    at 16x16 latents (the structure does not depend on the resolution), and MACs are counted at the
    model's 128x128 latents on meta-device copies (shapes only). Prints params / MACs before and after,
    peak resident memory and wall time."""
    import resource
    import time

    from diffprune.prune.importance import ImportanceResult
    from diffprune.prune.pruning import prune_model_at_ratio

    start = time.perf_counter()
    with torch.device("meta"):
        meta = UNet2DConditionModel(**SDXL_UNET)
    family = family_for(meta)
    macs0, params0 = _meta_cost(meta, family)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = UNet2DConditionModel(**{**SDXL_UNET, "sample_size": 16}).eval()
    finally:
        torch.set_default_dtype(default)
    print(f"\nSDXL UNet: params {params0 / 1e9:.3f}B, MACs {macs0 / 1e12:.3f}T (128x128 latents, batch 1); "
          f"built in {time.perf_counter() - start:.0f} s")
    imp = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
    rows = []
    for ratio in (0.3, 0.5):
        t0 = time.perf_counter()
        pruned = prune_model_at_ratio(model, family, imp, ratio)
        with torch.no_grad():
            y = family.predict(pruned, torch.randn(1, 4, 16, 16, dtype=torch.bfloat16), torch.tensor([500]),
                               {k: v.to(torch.bfloat16) for k, v in family.example_cond(pruned).items()})
        assert y.shape == (1, 4, 16, 16) and torch.isfinite(y).all()
        seconds = time.perf_counter() - t0
        macs, params = _meta_cost(pruned, family)
        del pruned
        rows.append((ratio, params, macs, seconds))
        print(f"ratio {ratio}: params {params / 1e9:.3f}B ({params / params0:.3f}), MACs {macs / 1e12:.3f}T "
              f"({macs / macs0:.3f}); prune + one forward {seconds:.0f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"peak resident memory {peak:.1f} GiB; total {time.perf_counter() - start:.0f} s")
    # exact, as README "Full-size structure checks" quotes them (benchmarks/results/full_size.json, sdxl-0.3 / -0.5)
    assert (params0, macs0) == (2567463684, 2989751375296) and peak < 24
    assert [(r[1], r[2]) for r in rows] == [(1321166980, 1464304289184), (728467844, 754366126816)]
