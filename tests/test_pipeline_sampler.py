"""The default sampler (issue 23, item 2): `diffprune sample` runs the folder's own scheduler class and
equals the diffusers pipeline's `__call__` for the same per-image generators, for every supported
scheduler (stochastic ones included: their in-`step` noise follows the per-image rule), and records
and prints what ran. The paper's samplers stay explicit choices (`--sampler ddim|ddpm`)."""

from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch
from conftest import sd_pipeline, tiny_unet
from diffusers import DDIMPipeline, DDPMPipeline

from diffprune import cli
from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.families.conditioning import attach_for_sampling, context_for
from diffprune.families.pipeline_parts import denoiser_of
from diffprune.sample.loop import image_generators, load_samples, sample
from diffprune.sample.scheduler_loop import SUPPORTED

# Each supported scheduler as a real checkpoint configures it (SD 1.5's PNDM, SDXL's Euler, PixArt's
# DPM-Solver++, ...); the SD 1.x noise schedule otherwise.
SD_BASE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHEDULERS = {
    "PNDMScheduler": dict(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
    "DDIMScheduler": dict(clip_sample=False, steps_offset=1, set_alpha_to_one=False),
    "DDPMScheduler": dict(clip_sample=False, steps_offset=1),
    "EulerDiscreteScheduler": dict(steps_offset=1, timestep_spacing="leading", interpolation_type="linear"),
    "EulerAncestralDiscreteScheduler": dict(steps_offset=1),
    "HeunDiscreteScheduler": dict(),
    "DPMSolverMultistepScheduler": dict(algorithm_type="dpmsolver++", solver_order=2),
    "DPMSolverSinglestepScheduler": dict(),
    "KDPM2DiscreteScheduler": dict(),
    "KDPM2AncestralDiscreteScheduler": dict(),
    "UniPCMultistepScheduler": dict(),
    "DEISMultistepScheduler": dict(),
    "LCMScheduler": dict(),
    "TCDScheduler": dict(),
}
EXTRA = {"DPMSolverMultistepScheduler/sde": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
         "DPMSolverMultistepScheduler/karras": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
         "EulerDiscreteScheduler/trailing-v": ("EulerDiscreteScheduler",
                                               dict(timestep_spacing="trailing", prediction_type="v_prediction"))}
CASES = {**{k: (k, v) for k, v in SCHEDULERS.items()}, **EXTRA}
STEPS = 4


def make_scheduler(name: str, **kw):
    return getattr(diffusers, name)(**{**SD_BASE, **kw})


def ours(pipe, indices, steps=STEPS, **sampling) -> np.ndarray:
    """`diffprune sample`'s images (uint8 NHWC) of `pipe` with the default sampler."""
    _, model = denoiser_of(pipe)
    ctx = attach_for_sampling(context_for(pipe, family_for(model), model), **sampling)
    return sample(model, pipe.scheduler, len(indices), indices=indices, batch_size=len(indices), steps=steps,
                  progress=False, ctx=ctx)


def reference(pipe, indices, steps=STEPS, **call) -> np.ndarray:
    with torch.no_grad():
        out = pipe(generator=image_generators(0, indices), num_inference_steps=steps, output_type="np", **call).images
    return (out * 255).round().astype(np.uint8)


def assert_equal_images(mine: np.ndarray, ref: np.ndarray) -> None:
    assert mine.shape == ref.shape
    assert ((ref > 0) & (ref < 255)).mean() > 0.5  # not a comparison of saturated pixels
    assert np.abs(mine.astype(int) - ref.astype(int)).max() <= 1


def test_every_supported_scheduler_is_tested():
    assert set(SUPPORTED) - {"FlowMatchEulerDiscreteScheduler"} == set(SCHEDULERS)  # SD3: test_sd3.py


@pytest.mark.parametrize("case", sorted(CASES))
def test_default_sampler_equals_the_stable_diffusion_pipeline(case):
    name, kw = CASES[case]
    pipe = sd_pipeline(scheduler=make_scheduler(name, **kw))
    call = dict(prompt=["a red cat"] * 3, negative_prompt=["blurry"] * 3, guidance_scale=3.0)
    mine = ours(pipe, [0, 1, 2], prompt="a red cat", negative_prompt="blurry", guidance_scale=3.0)
    assert_equal_images(mine, reference(pipe, [0, 1, 2], **call))
    # image i does not depend on the batch it is in (the per-image noise rule, also inside `step`); a batch of
    # one rounds float sums differently, so an SDE step may land one uint8 level apart
    alone = ours(pipe, [2], prompt="a red cat", negative_prompt="blurry", guidance_scale=3.0)[0]
    assert np.abs(alone.astype(int) - mine[2].astype(int)).max() <= 1


def test_pndm_differs_from_the_papers_ddim_on_the_same_folder():
    """What the issue found: SD 1.x folders ship PNDM, and DDIM read from its config is another sampler."""
    pipe = sd_pipeline(scheduler=make_scheduler("PNDMScheduler", **SCHEDULERS["PNDMScheduler"]))
    _, model = denoiser_of(pipe)
    ctx = attach_for_sampling(context_for(pipe, family_for(model), model), prompt="a red cat")
    ddim = sample(model, pipe.scheduler, 2, steps=STEPS, sampler="ddim", progress=False, ctx=ctx)
    assert np.abs(ddim.astype(int) - ours(pipe, [0, 1], prompt="a red cat").astype(int)).max() > 1


@pytest.mark.parametrize("name,kw", [("DDPMScheduler", dict(num_train_timesteps=1000)),
                                     ("DDIMScheduler", dict(num_train_timesteps=1000, clip_sample=True))])
def test_pixel_space_folders_equal_ddpm_and_ddim_pipelines(name, kw):
    unet = tiny_unet(sample_size=8, block_out_channels=(16, 32))
    scheduler = getattr(diffusers, name)(**kw)
    pipe = (DDPMPipeline if name == "DDPMScheduler" else DDIMPipeline)(unet=unet, scheduler=scheduler)
    mine = sample(unet, scheduler, 3, steps=5, progress=False)
    with torch.no_grad():
        out = pipe(batch_size=3, generator=image_generators(0, [0, 1, 2]), num_inference_steps=5,
                   output_type="np").images
    assert np.abs(mine.astype(int) - (out * 255).round().astype(int)).max() <= 1


def test_sdxl_folder_samples_with_its_euler_scheduler():
    from test_sdxl import tiny_sdxl

    pipe = tiny_sdxl()
    pipe.scheduler = make_scheduler("EulerDiscreteScheduler", **SCHEDULERS["EulerDiscreteScheduler"])
    mine = ours(pipe, [0, 1], prompt="a dog", guidance_scale=5.0)
    assert_equal_images(mine, reference(pipe, [0, 1], prompt=["a dog"] * 2, guidance_scale=5.0))


def test_pixart_folder_samples_with_its_dpm_solver():
    """PixArt ships DPMSolverMultistepScheduler: DDIM read from its config was up to 12/255 apart."""
    from test_pixart import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=20)
    mine = ours(pipe, [0, 1], prompt="a cat", guidance_scale=4.0)
    ref = reference(pipe, [0, 1], prompt=["a cat"] * 2, guidance_scale=4.0, height=16, width=16,
                    use_resolution_binning=False)
    assert_equal_images(mine, ref)


def test_dit_folder_samples_with_its_scheduler():
    from test_guidance import dit_pipeline

    pipe = dit_pipeline()
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=20)
    mine = ours(pipe, [0, 1], class_labels="3,999", guidance_scale=4.0)
    assert_equal_images(mine, reference(pipe, [0, 1], class_labels=[3, 999], guidance_scale=4.0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(spacing="quad"), "pass --sampler ddim"),
    (dict(eta=0.5), "only DDIMScheduler takes eta"),
    (dict(clip_sample="on"), "has no x0 clipping"),
])
def test_settings_the_scheduler_has_no_meaning_for_are_one_line_errors(kwargs, match):
    pipe = sd_pipeline(scheduler=make_scheduler("EulerDiscreteScheduler"))
    with pytest.raises(DiffpruneError, match=match):
        sample(pipe.unet, pipe.scheduler, 1, steps=2, progress=False, **kwargs)


def test_unsupported_scheduler_is_refused_naming_the_alternative():
    pipe = sd_pipeline(scheduler=make_scheduler("LMSDiscreteScheduler"))
    with pytest.raises(DiffpruneError, match="LMSDiscreteScheduler is not supported.*--sampler ddim"):
        sample(pipe.unet, pipe.scheduler, 1, steps=2, progress=False)


def test_cli_records_and_prints_the_scheduler_and_keeps_the_papers_sampler(tmp_path, capsys):
    pipe = sd_pipeline(scheduler=make_scheduler("PNDMScheduler", **SCHEDULERS["PNDMScheduler"]))
    pipe.save_pretrained(tmp_path / "sd", safe_serialization=True)
    base = ["sample", "--model", str(tmp_path / "sd"), "--prompt", "a red cat", "--num-images", "2", "--steps",
            str(STEPS), "--no-progress"]
    assert cli.main([*base, "--output-dir", str(tmp_path / "own")]) == 0
    out = capsys.readouterr().out
    config = json.loads((tmp_path / "own" / "sample_config.json").read_text())
    assert config["version"] == 4 and config["sampler"] == "pipeline"
    assert config["scheduler"] == f"PNDMScheduler (the folder's own), {STEPS} steps"
    assert f"sampler: PNDMScheduler (the folder's own), {STEPS} steps" in out
    images, _ = load_samples(tmp_path / "own")
    assert_equal_images(images, reference(pipe, [0, 1], prompt=["a red cat"] * 2, guidance_scale=1.0))
    assert cli.main([*base, "--sampler", "ddim", "--output-dir", str(tmp_path / "ddim")]) == 0
    config = json.loads((tmp_path / "ddim" / "sample_config.json").read_text())
    assert config["sampler"] == "ddim" and config["scheduler"].startswith("DDIM (diffprune), uniform spacing")
    assert "sampler: DDIM (diffprune)" in capsys.readouterr().out


def test_version_3_folders_resume_with_their_recorded_sampler(tmp_path, capsys):
    """A folder written before version 4 recorded sampler "ddim": resuming it keeps DDIM."""
    unet = tiny_unet(sample_size=8, block_out_channels=(16, 32))
    DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path / "p")
    base = ["sample", "--model", str(tmp_path / "p"), "--num-images", "2", "--steps", "3", "--no-progress",
            "--output-dir", str(tmp_path / "s")]
    assert cli.main([*base, "--sampler", "ddim"]) == 0
    first, _ = load_samples(tmp_path / "s")
    path = tmp_path / "s" / "sample_config.json"
    old = json.loads(path.read_text())
    old.update(version=3)
    old.pop("scheduler")
    path.write_text(json.dumps(old))
    (tmp_path / "s" / "000001.png").unlink()
    assert cli.main([*base, "--sampler", "ddim", "--resume"]) == 0
    assert np.array_equal(load_samples(tmp_path / "s")[0], first)
    assert cli.main([*base, "--resume"]) == 2  # the new default is another sampler: refused, not mixed
    assert "sampler='ddim'" in capsys.readouterr().err


def test_noise_rule_documented_in_the_readme_reproduces_image_noise():
    """The README's recipe for image i's starting noise, outside diffprune, equals what sample draws."""
    import numpy as np_

    seed, i = 7, 5
    state = np_.random.SeedSequence([seed, i]).generate_state(1, np_.uint64)[0]
    g = torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))
    readme = torch.randn((1, 4, 8, 8), generator=g)
    assert torch.equal(readme[0], torch.randn((4, 8, 8), generator=image_generators(seed, [i])[0]))
