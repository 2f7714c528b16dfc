"""sample/loop.py: agreement with diffusers' schedulers and the DDIM reference sampler, per-image seeds,
folders, resume, sharding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import save_tiny_pipeline, tiny_unet
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, PNDMScheduler
from diffusers.models.unets.unet_2d import UNet2DOutput

from diffprune import cli
from diffprune.errors import DiffpruneError
from diffprune.sample.loop import (
    SampleConfig,
    _randn,
    denoise,
    image_generators,
    load_samples,
    sample,
    sample_to_folder,
    timestep_sequence,
    to_uint8,
)

SHAPE = (1, 8, 8)
DDPM_STYLE = dict(num_train_timesteps=1000)  # linear betas, clip_sample, "leading", offset 0
SD_STYLE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, set_alpha_to_one=False, clip_sample=False)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


class NearNoise(torch.nn.Module):
    """out(x, t) = x + 0.1 * unet(x, t): an 8x8 tiny UNet kept near "x is all noise", so unclipped
    chains stay within a few units. A bare random UNet sends them to |x| ~ 50, where float32 spacing
    is 4e-6 and a 1e-5 comparison would test rounding rather than the sampler's arithmetic."""

    def __init__(self):
        super().__init__()
        self.unet = tiny_unet(sample_size=8, block_out_channels=(16, 32))

    def forward(self, x, t):
        return UNet2DOutput(sample=x + 0.1 * self.unet(x, t).sample)


@pytest.fixture(scope="module")
def small():
    """The scheduler comparisons run many chains: a small model."""
    return NearNoise().eval()


def _ours(unet, scheduler, steps, sampler="ddim", eta=0.0, clip_sample="auto", seed=0, n=2, spacing="uniform"):
    gens = image_generators(seed, range(n))
    noise = _randn(gens, SHAPE, "cpu", torch.float32)
    x = denoise(unet, scheduler, noise, gens, steps=steps, eta=eta, sampler=sampler, spacing=spacing,
                clip_sample=clip_sample)
    return x, noise


def _diffusers(unet, scheduler, steps, sampler="ddim", eta=0.0, seed=0, n=2, **overrides):
    """diffusers' own loop (set_timesteps + step) on image i's noise; per-step noise drawn by diffusers'
    randn_tensor from image i's generator (a list of generators draws one image from each)."""
    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    sched = cls.from_config(scheduler.config, **overrides)
    sched.set_timesteps(steps)
    gens = image_generators(seed, range(n))
    x = torch.stack([torch.randn(SHAPE, generator=g) for g in gens])
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(x, t).sample
            x = (sched.step(out, t, x, eta=eta, generator=gens) if sampler == "ddim"
                 else sched.step(out, t, x, generator=gens)).prev_sample
    return x


def _scheduler(style, cls=DDIMScheduler, **kw):
    base = dict(style)
    if cls is not DDIMScheduler:
        base.pop("set_alpha_to_one", None)
    return cls(**{**base, **kw})


@pytest.mark.parametrize("style", ["ddpm", "sd"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_uniform_matches_diffusers_for_every_spacing(small, style, spacing, sampler, eta):
    scheduler = _scheduler(DDPM_STYLE if style == "ddpm" else SD_STYLE, timestep_spacing=spacing)
    ours, _ = _ours(small, scheduler, 7, sampler, eta)  # 7 does not divide 1000: trailing's t - T//N is off-grid
    theirs = _diffusers(small, scheduler, 7, sampler, eta)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip", ["on", "off"])
@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_prediction_types_and_clipping_match_diffusers(small, prediction_type, clip, sampler, eta):
    scheduler = _scheduler(SD_STYLE, timestep_spacing="trailing", prediction_type=prediction_type,
                           clip_sample=clip == "on", clip_sample_range=1.5)
    ours, _ = _ours(small, scheduler, 5, sampler, eta)
    torch.testing.assert_close(ours, _diffusers(small, scheduler, 5, sampler, eta), rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_thresholding_matches_diffusers(small, sampler, eta):
    scheduler = _scheduler(SD_STYLE, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
                           prediction_type="v_prediction")
    ours, _ = _ours(small, scheduler, 5, sampler, eta, n=3)
    theirs = _diffusers(small, scheduler, 5, sampler, eta, n=3)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    plain, _ = _ours(small, scheduler, 5, sampler, eta, clip_sample="off", n=3)
    assert (plain - ours).abs().max() > 1e-3  # thresholding did act on this model


def test_clip_sample_on_and_off_override_the_config(small):
    clipping = _scheduler(DDPM_STYLE, clip_sample=True, clip_sample_range=0.5)
    off, _ = _ours(small, clipping, 5, clip_sample="off")
    torch.testing.assert_close(off, _diffusers(small, clipping, 5, clip_sample=False), rtol=0, atol=1e-5)
    auto, _ = _ours(small, clipping, 5)
    assert (auto - off).abs().max() > 1e-3  # the clamp did act on this model
    plain = _scheduler(SD_STYLE, clip_sample=False, clip_sample_range=0.5,
                       thresholding=True)  # "on" clamps even where the config would threshold
    on, _ = _ours(small, plain, 5, clip_sample="on")
    expected = _diffusers(small, plain, 5, clip_sample=True, thresholding=False)
    torch.testing.assert_close(on, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variance_type", ["fixed_large", "fixed_small_log"])
def test_ddpm_variance_types_match_diffusers(small, variance_type):
    scheduler = _scheduler(SD_STYLE, cls=DDPMScheduler, variance_type=variance_type, timestep_spacing="linspace")
    ours, _ = _ours(small, scheduler, 6, "ddpm")
    torch.testing.assert_close(ours, _diffusers(small, scheduler, 6, "ddpm"), rtol=0, atol=1e-5)


def test_pndm_config_samples_as_ddim_from_its_config_without_clipping(small):
    """Stable Diffusion folders ship a PNDMScheduler (no clip_sample key): its alphas, steps_offset,
    set_alpha_to_one and spacing are used, x0 is not clipped (documented in sample/loop.py)."""
    pndm = PNDMScheduler(**{k: v for k, v in SD_STYLE.items() if k != "clip_sample"}, skip_prk_steps=True)
    ours, _ = _ours(small, pndm, 5)
    theirs = _diffusers(small, pndm, 5, clip_sample=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def generalized_steps(unet, x, seq, betas, eta, noise_fn):
    """The DDIM reference code's sampler (Song et al., `generalized_steps`), from its formulas:
    alpha_bar with beta = 0 prepended (t = -1 -> 1), x0 never clipped,
    c1 = eta sqrt((1 - at/at_next)(1 - at_next)/(1 - at)), c2 = sqrt(1 - at_next - c1^2)."""
    abar = (1 - torch.cat([torch.zeros(1), betas])).cumprod(0)
    with torch.no_grad():
        for t, t_next in zip(reversed(seq), reversed([-1, *seq[:-1]]), strict=True):
            at, at_next = abar[t + 1], abar[t_next + 1]
            et = unet(x, torch.full((x.shape[0],), t)).sample
            x0_t = (x - et * (1 - at).sqrt()) / at.sqrt()
            c1 = eta * ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt()
            c2 = ((1 - at_next) - c1**2).sqrt()
            x = at_next.sqrt() * x0_t + c1 * noise_fn() + c2 * et
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_quad_with_clip_off_is_the_ddim_reference_sampler(small, eta):
    scheduler = _scheduler(DDPM_STYLE, cls=DDPMScheduler)  # clip_sample=True, as google/ddpm-cifar10-32
    steps = 10
    seq = [int(s) for s in np.linspace(0, np.sqrt(1000 * 0.8), steps) ** 2]
    assert timestep_sequence(1000, steps, "quad") == seq
    ours, noise = _ours(small, scheduler, steps, eta=eta, clip_sample="off", spacing="quad")
    gens = image_generators(0, range(2))
    [torch.randn(SHAPE, generator=g) for g in gens]  # the initial noise; per-step noise follows
    ref = generalized_steps(small, noise, seq, scheduler.betas, eta,
                            lambda: torch.stack([torch.randn(SHAPE, generator=g) for g in gens]))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    clipped, _ = _ours(small, scheduler, steps, eta=eta, spacing="quad")  # auto: the config clips
    assert (clipped - ref).abs().max() > 1e-3


@pytest.mark.parametrize("timestep_spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_uniform_timesteps_are_diffusers_set_timesteps(timestep_spacing, steps_offset):
    for cls in (DDIMScheduler, DDPMScheduler):
        sched = cls(num_train_timesteps=1000, timestep_spacing=timestep_spacing, steps_offset=steps_offset)
        for steps in (1, 3, 7, 10, 100, 999):
            sched.set_timesteps(steps)
            ours = timestep_sequence(1000, steps, "uniform", timestep_spacing=timestep_spacing,
                                     steps_offset=steps_offset)
            assert ours == sorted(sched.timesteps.tolist()), (cls.__name__, steps)


def test_trailing_stops_after_n_timesteps_where_numpy_arange_adds_one():
    sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    sched.set_timesteps(61)
    assert len(sched.timesteps) == 62 and sched.timesteps[-1] == -1  # diffusers' float-arange artefact
    assert timestep_sequence(1000, 61, timestep_spacing="trailing") == sorted(sched.timesteps.tolist()[:61])


def test_leading_offset_past_the_last_timestep_is_refused(unet):
    scheduler = _scheduler(SD_STYLE)
    with pytest.raises(DiffpruneError, match=r"steps=1000 with the scheduler's steps_offset=1 reaches timestep "
                                             r"1000; allowed: timesteps < num_train_timesteps=1000") as info:
        sample(unet, scheduler, 1, steps=1000, progress=False)
    assert "\n" not in str(info.value)


def test_quad_spacing_is_the_ddim_reference():
    seq = timestep_sequence(1000, 100, "quad")
    assert seq == [int(s) for s in np.linspace(0, np.sqrt(800), 100) ** 2]
    assert len(seq) == 100 and seq[:6] == [0, 0, 0, 0, 1, 2] and seq[-1] in (799, 800)
    assert seq == sorted(seq)


@pytest.mark.parametrize("sampler,eta,config", [
    ("ddim", 0.0, DDPM_STYLE),
    ("ddim", 1.0, DDPM_STYLE),
    ("ddpm", 0.0, DDPM_STYLE),
    ("ddim", 1.0, {**SD_STYLE, "timestep_spacing": "trailing", "thresholding": True, "sample_max_value": 1.5}),
])
def test_image_depends_only_on_seed_and_index(unet, sampler, eta, config):
    scheduler = DDIMScheduler(**config)
    kw = dict(seed=5, steps=3, sampler=sampler, eta=eta, progress=False)
    one = sample(unet, scheduler, 4, batch_size=1, **kw)
    three = sample(unet, scheduler, 4, batch_size=3, **kw)
    alone = sample(unet, scheduler, 1, batch_size=2, indices=[2], **kw)
    other_seed = sample(unet, scheduler, 1, batch_size=1, indices=[0], **{**kw, "seed": 6})
    assert one.dtype == np.uint8 and one.shape == (4, 16, 16, 1)
    np.testing.assert_array_equal(one, three)
    np.testing.assert_array_equal(alone[0], one[2])
    assert not np.array_equal(other_seed[0], one[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps=0"),
    (dict(steps=1001), r"steps=1001 is out of range; allowed: \[1, 1000\]"),
    (dict(eta=-1.0), "eta=-1.0"),
    (dict(sampler="euler"), "sampler='euler'"),
    (dict(spacing="cosine"), "spacing='cosine'"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(clip_sample="maybe"), r"clip_sample='maybe' is not supported; allowed: \('auto', 'on', 'off'\)"),
])
def test_bad_arguments_are_one_line_errors(unet, kwargs, match):
    args = {"batch_size": 1, "steps": 2, "progress": False, **kwargs}
    with pytest.raises(DiffpruneError, match=match) as info:
        sample(unet, DDPMScheduler(num_train_timesteps=1000), 1, **args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key,value,match", [
    ("timestep_spacing", "karras", r"scheduler timestep_spacing='karras' is not supported; allowed: "),
    ("variance_type", "learned_range", r"scheduler variance_type='learned_range' is not supported"),
])
def test_unsupported_scheduler_keys_are_one_line_errors(unet, key, value, match):
    scheduler = DDPMScheduler(num_train_timesteps=1000, **{key: value})
    with pytest.raises(DiffpruneError, match=match) as info:
        sample(unet, scheduler, 1, steps=2, sampler="ddpm", progress=False)
    assert "\n" not in str(info.value)


def test_sample_config_version_4_records_clip_sample_and_guidance_and_reads_versions_1_to_3():
    config = SampleConfig(model="m", num_images=2, clip_sample="off")
    d = config.to_dict()
    assert d["version"] == 4 and d["sampler"] == "pipeline" and d["clip_sample"] == "off" and d["guidance_scale"] == 1.0
    assert SampleConfig.from_dict(d) == config
    guidance = ("guidance_scale", "negative_prompt", "guidance_rescale")
    v2 = {k: v for k, v in d.items() if k not in guidance} | {"version": 2}
    assert SampleConfig.from_dict(v2) == config  # version 2 = no guidance
    old = {k: v for k, v in v2.items() if k != "clip_sample"} | {"version": 1}
    assert SampleConfig.from_dict(old).clip_sample == "auto"
    assert SampleConfig.from_dict(old).guidance_scale == 1.0
    with pytest.raises(DiffpruneError, match="clip_sample='sometimes' is not supported"):
        SampleConfig(model="m", num_images=2, clip_sample="sometimes")


def test_folder_layout_resume_and_overwrite(tmp_path):
    model = save_tiny_pipeline(tmp_path / "pipe")
    out = tmp_path / "samples"
    kw = dict(batch_size=2, steps=2, seed=1, progress=False)
    sample_to_folder(model, out, 5, **kw)
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{i:06d}.png" for i in range(5)] + ["grid.png", "sample_config.json", "samples.npz"]
    images, indices = load_samples(out)
    assert images.shape == (5, 16, 16, 1) and images.dtype == np.uint8
    assert indices.tolist() == list(range(5))
    config = json.loads((out / "sample_config.json").read_text())
    assert config["stage"] == "sample" and config["steps"] == 2 and config["seed"] == 1
    assert config["version"] == 4 and config["clip_sample"] == "auto" and config["guidance_scale"] == 1.0

    with pytest.raises(DiffpruneError, match="--resume"):
        sample_to_folder(model, out, 5, **kw)
    # A partial folder: resume fills in only the missing images (and may grow num_images).
    (out / "000001.png").unlink()
    (out / "000003.png").unlink()
    (out / "samples.npz").unlink()
    sample_to_folder(model, out, 6, resume=True, **{**kw, "batch_size": 3})
    resumed, _ = load_samples(out)
    np.testing.assert_array_equal(resumed[:5], images)
    assert resumed.shape[0] == 6
    with pytest.raises(DiffpruneError, match="steps=2, this run has steps=3"):
        sample_to_folder(model, out, 6, resume=True, **{**kw, "steps": 3})
    with pytest.raises(DiffpruneError, match="clip_sample='auto', this run has clip_sample='off'"):
        sample_to_folder(model, out, 6, resume=True, clip_sample="off", **kw)
    # A version-1 folder (uniform spacing ignored steps_offset & co.) is not mixed with later images.
    guidance = ("guidance_scale", "negative_prompt", "guidance_rescale")
    v3 = json.loads((out / "sample_config.json").read_text())
    v1 = {k: v for k, v in v3.items() if k != "clip_sample" and k not in guidance}
    (out / "sample_config.json").write_text(json.dumps({**v1, "version": 1}))
    with pytest.raises(DiffpruneError, match="version=1, this run has version=4"):
        sample_to_folder(model, out, 6, resume=True, **kw)
    # A version-2 folder (no guidance keys) holds the same images as version 3 unguided: it resumes.
    (out / "sample_config.json").write_text(json.dumps({**v1, "clip_sample": "auto", "version": 2}))
    (out / "000005.png").unlink()
    sample_to_folder(model, out, 6, resume=True, **kw)
    np.testing.assert_array_equal(load_samples(out)[0], resumed)
    assert not list(out.glob(".*tmp*"))

    sample_to_folder(model, out, 2, overwrite=True, **{**kw, "seed": 2})
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png", "grid.png"]
    assert not list(tmp_path.glob(".samples*"))


def test_cli_sample_and_errors(tmp_path, capsys):
    model = save_tiny_pipeline(tmp_path / "pipe")
    out = tmp_path / "s"
    assert cli.main(["sample", "--model", str(model), "--output-dir", str(out), "--num-images", "2",
                     "--steps", "2", "--no-progress"]) == 0
    assert str(out) in capsys.readouterr().out
    assert cli.main(["sample", "--model", str(model), "--output_dir", str(tmp_path / "t"), "--num-images", "1",
                     "--steps", "5000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: diffusers' loading bar
    assert err.startswith("diffprune sample: error: steps=5000") and "[1, 1000]" in err
    with pytest.raises(SystemExit) as info:
        cli.main(["sample", "--model", str(model), "--output-dir", str(out), "--steps", "0"])
    assert info.value.code == 2
    assert cli.main(["sample", "--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "u")]) == 2


def test_cli_sample_sd_style_matches_diffusers(tmp_path):
    """`diffprune sample` on a folder whose DDIMScheduler has SD-style keys equals diffusers' loop."""
    config = {**SD_STYLE, "timestep_spacing": "trailing", "clip_sample": True}  # clipping keeps pixels in range
    unet = tiny_unet(sample_size=8, block_out_channels=(16, 32))
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler(**config)).save_pretrained(tmp_path / "pipe",
                                                                             safe_serialization=True)
    args = ["sample", "--model", str(tmp_path / "pipe"), "--num-images", "3", "--batch-size", "2", "--steps", "5",
            "--eta", "1", "--seed", "3", "--no-progress"]
    assert cli.main([*args, "--output-dir", str(tmp_path / "auto")]) == 0
    images, _ = load_samples(tmp_path / "auto")
    expected = to_uint8(_diffusers(unet, DDIMScheduler(**config), 5, eta=1.0, seed=3, n=3))
    assert ((images > 0) & (images < 255)).mean() > 0.5  # not a comparison of saturated pixels
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1  # 1e-6 apart, a .5 tie may round apart
    assert (images == expected).mean() > 0.99
    assert cli.main([*args, "--output-dir", str(tmp_path / "off"), "--clip-sample", "off"]) == 0
    assert json.loads((tmp_path / "off" / "sample_config.json").read_text())["clip_sample"] == "off"
    assert not np.array_equal(load_samples(tmp_path / "off")[0], images)


def launch(args, nproc, cwd):
    """`accelerate launch` N CPU processes (gloo). accelerate's `--cpu` flag would start only one
    process; `--multi_gpu` with no visible GPU gives MULTI_CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "diffprune.cli", *args]
    # Own session, so a hung run can be killed with its torchrun workers (no orphans left behind).
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"accelerate launch timed out after 180 s: {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_two_processes_split_indices_and_match_one_process(tmp_path):
    model = save_tiny_pipeline(tmp_path / "pipe")
    args = ["--model", str(model), "--num-images", "5", "--batch-size", "2", "--steps", "2", "--seed", "4",
            "--no-progress"]
    proc = launch(["sample", *args, "--output-dir", str(tmp_path / "two")], 2, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with 2 processes" in proc.stdout
    sample_to_folder(model, tmp_path / "one", 5, batch_size=5, steps=2, seed=4, progress=False)
    two, idx = load_samples(tmp_path / "two")
    one, _ = load_samples(tmp_path / "one")
    assert idx.tolist() == list(range(5))
    assert sorted(p.name for p in (tmp_path / "two").glob("0*.png")) == [f"{i:06d}.png" for i in range(5)]
    np.testing.assert_array_equal(two, one)
