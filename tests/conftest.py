"""Shared fixtures: tiny diffusers models built in the test, no network."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Hermetic environment, set before anything imports huggingface_hub/diffusers (they read these
# variables once, at import): whatever HF_HUB_OFFLINE, HF_HOME or DIFFPRUNE_* the caller has set
# (offline CI machines commonly set HF_HUB_OFFLINE=1), every test starts from the same state.
# Tests that need a variable set it themselves with monkeypatch. Subprocesses inherit this.
_KEEP = {"DIFFPRUNE_TEST_THREADS"}
_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "DIFFPRUNE_", "ACCELERATE_")
for _name in [n for n in os.environ if n.startswith(_PREFIXES) and n not in _KEEP]:
    del os.environ[_name]
_HERMETIC_HOME = tempfile.mkdtemp(prefix="diffprune-test-home-")
os.environ["HF_HOME"] = os.path.join(_HERMETIC_HOME, "hf")  # never the user's hub cache
os.environ["DIFFPRUNE_CACHE"] = os.path.join(_HERMETIC_HOME, "diffprune")  # nor their weights cache
atexit.register(shutil.rmtree, _HERMETIC_HOME, True)

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a shared 2-core box they oversubscribe
# (a 16x16 forward goes from ~13 ms to >1 s). Override with DIFFPRUNE_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("DIFFPRUNE_TEST_THREADS", "1")))


def run_cli(argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of `diffprune ARGV` run in-process; argparse usage errors included."""
    from diffprune.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    return code, capsys.readouterr().err


def tiny_unet(seed: int = 0, **overrides):
    """A 16x16 one-channel UNet2DModel small enough for CPU tests (two levels, attention on level 1)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    kwargs = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                  layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
    kwargs.update(overrides)
    return UNet2DModel(**kwargs).eval()


def save_tiny_pipeline(folder, unet=None, **scheduler_kwargs):
    """Write a DDPMPipeline(unet, DDPMScheduler(1000 steps)) folder with safetensors; returns it."""
    from diffusers import DDPMPipeline, DDPMScheduler

    scheduler = DDPMScheduler(**{"num_train_timesteps": 1000, **scheduler_kwargs})
    DDPMPipeline(unet=unet if unet is not None else tiny_unet(), scheduler=scheduler).save_pretrained(
        folder, safe_serialization=True)
    return folder


@pytest.fixture
def tiny_pipeline_dir(tmp_path):
    """Path of a freshly saved tiny pipeline folder."""
    return save_tiny_pipeline(tmp_path / "tiny_pipeline")
