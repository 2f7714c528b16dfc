"""sampling.py: agreement with diffusers' schedulers, per-image seeds, folders, resume, sharding."""

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
from diffusers import DDIMScheduler, DDPMScheduler

from diffprune import cli
from diffprune.errors import DiffpruneError
from diffprune.sampling import (
    _randn,
    denoise,
    image_generators,
    load_samples,
    sample,
    sample_to_folder,
    timestep_sequence,
)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _diffusers_ddim(unet, scheduler, noise, steps):
    ddim = DDIMScheduler.from_config(scheduler.config)  # set_alpha_to_one=True, "leading", offset 0
    ddim.set_timesteps(steps)
    x = noise.clone()
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [True, False])
def test_uniform_ddim_matches_diffusers(unet, prediction_type, clip_sample):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=clip_sample)
    gens = image_generators(0, [0, 1])
    noise = _randn(gens, (1, 16, 16), "cpu", torch.float32)
    ours = denoise(unet, scheduler, noise.clone(), gens, steps=4)
    theirs = _diffusers_ddim(unet, scheduler, noise, 4)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_ddpm_matches_diffusers(unet):
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    gens = image_generators(3, [0])
    noise = _randn(gens, (1, 16, 16), "cpu", torch.float32)
    ours = denoise(unet, scheduler, noise.clone(), gens, steps=4, sampler="ddpm")
    gens = image_generators(3, [0])  # same stream: initial noise, then one draw per step with t > 0
    x = _randn(gens, (1, 16, 16), "cpu", torch.float32)
    ddpm = DDPMScheduler.from_config(scheduler.config)
    ddpm.set_timesteps(4)
    with torch.no_grad():
        for t in ddpm.timesteps:
            x = ddpm.step(unet(x, t).sample, t, x, generator=gens[0]).prev_sample
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-4)


def test_uniform_spacing_is_diffusers_leading():
    ddim = DDIMScheduler(num_train_timesteps=1000)
    for steps in (1, 7, 100, 1000):
        ddim.set_timesteps(steps)
        assert timestep_sequence(1000, steps, "uniform") == sorted(ddim.timesteps.tolist())


def test_quad_spacing_is_the_ddim_reference():
    seq = timestep_sequence(1000, 100, "quad")
    assert seq == [int(s) for s in np.linspace(0, np.sqrt(800), 100) ** 2]
    assert len(seq) == 100 and seq[:6] == [0, 0, 0, 0, 1, 2] and seq[-1] in (799, 800)
    assert seq == sorted(seq)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_image_depends_only_on_seed_and_index(unet, sampler, eta):
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    kw = dict(seed=5, steps=3, sampler=sampler, eta=eta, progress=False)
    one = sample(unet, scheduler, 4, batch_size=1, **kw)
    three = sample(unet, scheduler, 4, batch_size=3, **kw)
    alone = sample(unet, scheduler, 1, batch_size=2, indices=[2], **kw)
    other_seed = sample(unet, scheduler, 1, batch_size=1, indices=[0], **{**kw, "seed": 6})
    assert one.dtype == np.uint8 and one.shape == (4, 16, 16, 1)
    np.testing.assert_array_equal(one, three)
    np.testing.assert_array_equal(alone[0], one[2])
    assert not np.array_equal(other_seed[0], one[0])


def test_quad_spacing_runs(unet):
    out = sample(unet, DDPMScheduler(num_train_timesteps=1000), 2, batch_size=2, steps=5, spacing="quad",
                 progress=False)
    assert out.shape == (2, 16, 16, 1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps=0"),
    (dict(steps=1001), r"steps=1001 is out of range; allowed: \[1, 1000\]"),
    (dict(eta=-1.0), "eta=-1.0"),
    (dict(sampler="euler"), "sampler='euler'"),
    (dict(spacing="cosine"), "spacing='cosine'"),
    (dict(batch_size=0), "batch_size=0"),
])
def test_bad_arguments_are_one_line_errors(unet, kwargs, match):
    args = {"batch_size": 1, "steps": 2, "progress": False, **kwargs}
    with pytest.raises(DiffpruneError, match=match) as info:
        sample(unet, DDPMScheduler(num_train_timesteps=1000), 1, **args)
    assert "\n" not in str(info.value)


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
