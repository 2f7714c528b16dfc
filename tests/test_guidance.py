"""Classifier-free guidance (issue 15): `diffprune sample --guidance-scale` equals diffusers' own
StableDiffusionPipeline / DiTPipeline `__call__` for the same latents and settings, and fine-tuning
drops captions (empty prompt / DiT null class) at the requested rate, with the teacher seeing the
same dropped conditioning.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import guided_latents, sd_pipeline, tiny_kl
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from diffprune import cli
from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.families.conditioning import attach_for_sampling, context_for
from diffprune.families.guidance import guided_predict, rescale_noise_cfg
from diffprune.sample.loop import image_generators, load_samples, sample_to_folder

TOL = 1e-4


def dit_pipeline():
    """DiTPipeline hard-codes the null class as 1000 (ImageNet), so the tiny DiT has 1000 classes."""
    torch.manual_seed(4)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    return DiTPipeline(transformer=dit, vae=tiny_kl(),
                       scheduler=DDIMScheduler(num_train_timesteps=20, clip_sample=False, steps_offset=1))


ours = guided_latents  # (noise, latents, context) of our sampler (conftest)


@pytest.mark.parametrize("scale,negative,rescale", [(7.5, None, 0.0), (3.0, "blurry", 0.7), (1.0, None, 0.0),
                                                    (0.5, None, 0.0)])
def test_sd_guidance_equals_stable_diffusion_pipeline(scale, negative, rescale):
    pipe = sd_pipeline()
    noise, x, _ = ours(pipe, pipe.unet, [0, 1], 4, prompt="a red cat", guidance_scale=scale,
                       negative_prompt=negative, guidance_rescale=rescale)
    with torch.no_grad():
        ref = pipe(prompt=["a red cat"] * 2, negative_prompt=None if negative is None else [negative] * 2,
                   latents=noise.clone(), num_inference_steps=4, guidance_scale=scale, guidance_rescale=rescale,
                   output_type="latent").images
    assert (x - ref).abs().max() <= TOL
    if scale > 1:  # guidance changed something
        _, plain, _ = ours(pipe, pipe.unet, [0, 1], 4, prompt="a red cat")
        assert (plain - ref).abs().max() > 100 * TOL


@pytest.mark.parametrize("prediction_type", ["v_prediction"])
def test_sd2_style_v_prediction_linear_projection_guidance_equals_pipeline(prediction_type):
    """SD 2.x: linear proj_in/proj_out, upcast attention, v-prediction, guidance_rescale."""
    pipe = sd_pipeline(use_linear_projection=True, upcast_attention=True)
    pipe.scheduler = DDIMScheduler(num_train_timesteps=20, clip_sample=False, steps_offset=1,
                                   prediction_type=prediction_type, timestep_spacing="trailing")
    noise, x, _ = ours(pipe, pipe.unet, [3], 3, prompt="a dog", guidance_scale=5.0, guidance_rescale=0.7)
    with torch.no_grad():
        ref = pipe(prompt="a dog", latents=noise.clone(), num_inference_steps=3, guidance_scale=5.0,
                   guidance_rescale=0.7, output_type="latent").images
    assert (x - ref).abs().max() <= TOL


@pytest.mark.parametrize("scale", [4.0, 1.0])
def test_dit_guidance_equals_dit_pipeline(scale):
    pipe = dit_pipeline()
    labels = [3, 999]
    noise, x, ctx = ours(pipe, pipe.transformer, [0, 1], 3, class_labels="3,999", guidance_scale=scale)
    with torch.no_grad():
        ref = pipe(class_labels=labels, guidance_scale=scale, generator=image_generators(0, [0, 1]),
                   num_inference_steps=3, output_type="np").images
    mine = ctx.to_image_space(x)
    mine = (mine / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(mine - ref).max() <= TOL
    if scale > 1:
        _, plain, _ = ours(pipe, pipe.transformer, [0, 1], 3, class_labels="3,999")
        assert (plain - x).abs().max() > 100 * TOL


@pytest.mark.parametrize("scale,negative", [(4.0, None), (3.0, "blurry")])
def test_pixart_guidance_equals_pixart_alpha_pipeline(scale, negative):
    from test_pixart import tiny_pipeline

    pipe = tiny_pipeline()
    noise, x, _ = ours(pipe, pipe.transformer, [0, 1], 3, prompt="a cat", guidance_scale=scale,
                       negative_prompt=negative)
    with torch.no_grad():
        ref = pipe(["a cat"] * 2, negative_prompt=negative or "", latents=noise.clone(), num_inference_steps=3,
                   height=16, width=16, use_resolution_binning=False, guidance_scale=scale,
                   output_type="latent").images
    assert (x - ref).abs().max() <= TOL


def test_rescale_noise_cfg_is_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as reference

    g = torch.Generator().manual_seed(0)
    cfg, text = torch.randn(3, 4, 5, 5, generator=g) * 3, torch.randn(3, 4, 5, 5, generator=g)
    for r in (0.0, 0.3, 1.0):
        torch.testing.assert_close(rescale_noise_cfg(cfg, text, r), reference(cfg, text, guidance_rescale=r))


def test_guidance_off_is_one_conditional_call():
    pipe = sd_pipeline()
    ctx = attach_for_sampling(context_for(pipe, family_for(pipe.unet), pipe.unet), prompt="x")
    assert ctx.uncond_for([0], "cpu") is None
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([5])
    with torch.no_grad():
        torch.testing.assert_close(guided_predict(ctx.family, pipe.unet, x, t, ctx.cond_for([0], "cpu"), None, 7.0),
                                   ctx.family.predict(pipe.unet, x, t, ctx.cond_for([0], "cpu")), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(guidance_scale=-1.0), r"guidance_scale=-1.0 is out of range"),
    (dict(guidance_scale=float("inf")), r"guidance_scale=inf is not finite"),
    (dict(guidance_scale=3.0, guidance_rescale=1.5), r"guidance_rescale=1.5 is out of range"),
    (dict(negative_prompt="ugly"), r"negative_prompt has no effect with guidance_scale=1.0"),
    (dict(guidance_rescale=0.5), r"guidance_rescale=0.5 has no effect"),
])
def test_bad_guidance_settings_are_one_line_errors(kwargs, match):
    pipe = sd_pipeline()
    with pytest.raises(DiffpruneError, match=match) as info:
        attach_for_sampling(context_for(pipe, family_for(pipe.unet), pipe.unet), prompt="x", **kwargs)
    assert "\n" not in str(info.value)


def test_guidance_needs_a_conditional_model(tmp_path):
    from conftest import save_tiny_pipeline

    model = save_tiny_pipeline(tmp_path / "pipe")
    with pytest.raises(DiffpruneError, match="needs a conditional model"):
        sample_to_folder(model, tmp_path / "s", 1, steps=1, guidance_scale=2.0, progress=False)


def test_cli_sample_with_guidance_records_settings_and_resume_refuses_to_mix(tmp_path, capsys):
    pipe = sd_pipeline()
    pipe.save_pretrained(tmp_path / "sd", safe_serialization=True)
    out = tmp_path / "s"
    args = ["sample", "--model", tmp_path / "sd", "--num-images", "2", "--batch-size", "2", "--steps", "3",
            "--prompt", "a red cat", "--no-progress"]
    guided = ["--guidance-scale", "6", "--negative-prompt", "blurry", "--guidance-rescale", "0.2"]
    assert cli.main([str(a) for a in [*args, "--output-dir", out, *guided]]) == 0
    config = json.loads((out / "sample_config.json").read_text())
    assert config["version"] == 4 and config["guidance_scale"] == 6.0
    assert config["negative_prompt"] == "blurry" and config["guidance_rescale"] == 0.2
    images, _ = load_samples(out)
    # the same images through diffusers' pipeline (decoded, rounded as our PNGs)
    noise = torch.stack([torch.randn(4, 8, 8, generator=g) for g in image_generators(0, [0, 1])])
    with torch.no_grad():
        ref = pipe(prompt=["a red cat"] * 2, negative_prompt=["blurry"] * 2, latents=noise, num_inference_steps=3,
                   guidance_scale=6.0, guidance_rescale=0.2, output_type="np").images
    assert np.abs(images.astype(float) - np.round(ref * 255)).max() <= 1
    (out / "000001.png").unlink()
    code = cli.main([str(a) for a in [*args, "--output-dir", out, "--resume", "--guidance-scale", "5",
                                      "--negative-prompt", "blurry", "--guidance-rescale", "0.2"]])
    assert code == 2 and "guidance_scale=6.0, this run has guidance_scale=5.0" in capsys.readouterr().err
    assert cli.main([str(a) for a in [*args, "--output-dir", out, "--resume", *guided]]) == 0
    np.testing.assert_array_equal(load_samples(out)[0], images)


# --------------------------------------------------------------------------- caption dropout in fine-tuning


@pytest.fixture(scope="module")
def tuning_inputs(tmp_path_factory):
    """A tiny SD and DiT pipeline folder, 8 captioned RGB images in class folders."""
    from PIL import Image
    from test_families import build_pipeline

    root = tmp_path_factory.mktemp("guidance_ft")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        (root / "imgs" / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "imgs" / str(i % 2) / f"{i}.png")
        rows.append({"file_name": f"{i % 2}/{i}.png", "text": f"a picture {i}"})
    (root / "imgs" / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for kind in ("sd", "dit"):
        build_pipeline(kind).save_pretrained(root / kind, safe_serialization=True)
    return root


FT = dict(steps=2, batch_size=4, progress=False, tensorboard=False, ema_decay=0.5)


def test_cond_drops_at_the_requested_rate_from_their_own_seeded_stream():
    from diffprune.train.config import FinetuneConfig
    from diffprune.train.loop import cond_drops

    config = FinetuneConfig(model="m", data="d", cond_drop_prob=0.25, seed=3)
    masks = [cond_drops(config, 10, step, 0, 0) for step in range(400)]
    rate = np.mean(masks)
    assert abs(rate - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 4000)  # 4 binomial standard deviations
    assert masks == [cond_drops(config, 10, step, 0, 0) for step in range(400)]  # seeded
    assert masks[:5] != [cond_drops(FinetuneConfig(model="m", data="d", cond_drop_prob=0.25, seed=4), 10, s, 0, 0)
                         for s in range(5)]
    assert cond_drops(FinetuneConfig(model="m", data="d", cond_drop_prob=0.0), 10, 0, 0, 0) is None
    assert all(cond_drops(FinetuneConfig(model="m", data="d", cond_drop_prob=1.0), 10, 0, 0, 0))


def test_dropped_images_get_the_empty_prompt_or_the_null_class(tuning_inputs):
    from diffprune.io import load_pipeline

    for kind in ("sd", "dit"):
        pipe = load_pipeline(tuning_inputs / kind)
        model = pipe.unet if kind == "sd" else pipe.transformer
        ctx = attach_for_sampling(context_for(pipe, family_for(model), model),
                                  **({"prompt": ["a cat", "a dog"]} if kind == "sd" else {"class_labels": "3,4"}))
        cond = ctx.cond_for([0, 1], "cpu", drop=[False, True])
        if kind == "sd":
            empty = ctx.encoder.encode([""], "cpu")[0]
            torch.testing.assert_close(cond["encoder_hidden_states"][1], empty, rtol=0, atol=0)
            torch.testing.assert_close(cond["encoder_hidden_states"][0], ctx.encoder.encode(["a cat"], "cpu")[0])
        else:
            assert cond["class_labels"].tolist() == [3, 10]  # 10 = the tiny DiT's null class


def _weights(folder, component="unet"):
    from safetensors.torch import load_file

    return load_file(str(next((folder / component).glob("*.safetensors"))))


def test_zero_drop_probability_trains_exactly_as_without_caption_dropout(tuning_inputs, tmp_path, monkeypatch):
    """P=0 takes no draw; a run whose drop stream is consumed but drops nothing gives the same weights,
    so the drop stream never shifts the data / timestep / noise / dropout draws."""
    import diffprune.train.loop as loop
    from diffprune.train import finetune

    a = finetune(tuning_inputs / "sd", tuning_inputs / "imgs", tmp_path / "a", cond_drop_prob=0.0, **FT)
    assert json.loads((a / "finetune_config.json").read_text())["cond_drop_prob"] == 0.0
    real = loop.cond_drops
    monkeypatch.setattr(loop, "cond_drops", lambda config, n, *r: [False] * len(real(config, n, *r)))
    b = finetune(tuning_inputs / "sd", tuning_inputs / "imgs", tmp_path / "b", cond_drop_prob=0.9, **FT)
    monkeypatch.undo()
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = finetune(tuning_inputs / "sd", tuning_inputs / "imgs", tmp_path / "c", cond_drop_prob=0.9, **FT)
    assert any(not torch.equal(wa[k], _weights(c)[k]) for k in wa)


@pytest.mark.parametrize("distill", ["output", "features"])
def test_distillation_teacher_sees_the_same_dropped_conditioning(tuning_inputs, tmp_path, monkeypatch, distill):
    from diffprune.families.unet2d_condition import UNet2DConditionFamily
    from diffprune.train import finetune

    calls = []
    real = UNet2DConditionFamily.predict

    def spy(self, model, x_t, t, cond=None):
        calls.append((model.training, x_t.clone(), t.clone(), cond["encoder_hidden_states"].clone()))
        return real(self, model, x_t, t, cond)

    monkeypatch.setattr(UNet2DConditionFamily, "predict", spy)
    finetune(tuning_inputs / "sd", tuning_inputs / "imgs", tmp_path / "kd", cond_drop_prob=0.5, distill=distill,
             teacher=str(tuning_inputs / "sd"), **FT)
    monkeypatch.undo()
    steps = [c for c in calls if c[1].shape[0] == FT["batch_size"]]  # adapters' width probes use batch 1
    student, teacher = steps[0::2], steps[1::2]
    assert len(student) == len(teacher) == FT["steps"]
    assert all(s[0] and not t[0] for s, t in zip(student, teacher, strict=True))  # train-mode student, eval teacher
    for s, t in zip(student, teacher, strict=True):
        assert torch.equal(s[1], t[1]) and torch.equal(s[2], t[2]) and torch.equal(s[3], t[3])
    pipe_ctx = _sd_context(tuning_inputs / "sd")
    empty = pipe_ctx.encoder.encode([""], "cpu")[0]
    rows = torch.cat([s[3] for s in student])
    dropped = [bool(torch.equal(r, empty)) for r in rows]
    assert any(dropped) and not all(dropped)


def _sd_context(folder):
    from diffprune.io import load_pipeline

    pipe = load_pipeline(folder)
    return attach_for_sampling(context_for(pipe, family_for(pipe.unet), pipe.unet), prompt="x")


def test_cli_finetune_records_cond_drop_defaults_and_refuses_it_for_unconditional_models(tuning_inputs, tmp_path,
                                                                                         capsys):
    from conftest import save_tiny_pipeline

    base = ["finetune", "--data", tuning_inputs / "imgs", "--steps", "1", "--batch-size", "2", "--no-progress",
            "--no-tensorboard"]
    assert cli.main([str(a) for a in [*base, "--model", tuning_inputs / "sd", "--output-dir", tmp_path / "sd"]]) == 0
    assert json.loads((tmp_path / "sd" / "finetune_config.json").read_text())["cond_drop_prob"] == 0.1
    assert cli.main([str(a) for a in [*base, "--model", tuning_inputs / "dit", "--output-dir", tmp_path / "dit",
                                      "--cond-drop-prob", "0.3"]]) == 0
    config = json.loads((tmp_path / "dit" / "finetune_config.json").read_text())
    assert config["cond_drop_prob"] == 0.3 and config["version"] == 2
    save_tiny_pipeline(tmp_path / "uncond")
    code = cli.main([str(a) for a in ["finetune", "--data", "digits", "--steps", "1", "--batch-size", "2",
                                      "--no-progress", "--model", tmp_path / "uncond", "--output-dir", tmp_path / "u",
                                      "--cond-drop-prob", "0.5"]])
    assert code == 2 and "cond_drop_prob=0.5 applies to conditional models" in capsys.readouterr().err


def test_version_1_finetune_config_reads_and_resumes_as_no_caption_dropout():
    from diffprune.train.checkpoints import check_resumable
    from diffprune.train.config import FinetuneConfig

    new = FinetuneConfig(model="m", data="d", cond_drop_prob=0.0)
    old = {k: v for k, v in new.to_dict().items() if k != "cond_drop_prob"} | {"version": 1}
    assert FinetuneConfig.from_dict(old) == new
    state = {"config": old, "model_fingerprint": "f", "num_processes": 1, "step": 1}
    check_resumable(state, new, "f", 1, "ckpt")  # no error: same run
    with pytest.raises(DiffpruneError, match="cond_drop_prob=0.0, this run has cond_drop_prob=0.1"):
        check_resumable(state, FinetuneConfig(model="m", data="d", cond_drop_prob=0.1), "f", 1, "ckpt")
