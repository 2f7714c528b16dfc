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
# Under pytest-xdist (`make test` runs `-n 2`) each worker is one of two busy processes on a 2-core box: numpy /
# OpenMP in the worker and every interpreter a test starts (they inherit this) use one thread, as torch does below.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a shared 2-core box they oversubscribe
# (a 16x16 forward goes from ~13 ms to >1 s). Override with DIFFPRUNE_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("DIFFPRUNE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _one_accelerate_launch_at_a_time(request, tmp_path_factory):
    """Under pytest-xdist (`make test`), the tests that call test_sampling.launch (`accelerate launch` of 2
    processes) take turns, through a file lock the workers share: two at once would both ask torch.distributed for
    its fixed default port (29500), and 4 processes would share 2 cores. (A lock, not an xdist_group mark: with
    pytest 9.2, xdist 3.8's --dist loadgroup no longer groups anything, pytest-dev/pytest-xdist#1386.)"""
    function = getattr(request.node, "function", None)
    if not os.environ.get("PYTEST_XDIST_WORKER") or function is None or "launch" not in function.__code__.co_names:
        yield
        return
    from filelock import FileLock

    with FileLock(str(tmp_path_factory.getbasetemp().parent / "accelerate-launch.lock")):
        yield


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


# --------------------------------------------------------------------------- tiny text encoders (offline)


def byte_tokenizer(max_length: int = 12):
    """A byte-level CLIPTokenizer (every byte a token, no merges): needs no downloaded vocabulary."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in bytes_to_unicode().values():
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_clip(projection: bool = False, width: int = 16, length: int = 12, seed: int = 5):
    """A 2-layer CLIP text encoder (`CLIPTextModelWithProjection` when `projection`) for byte_tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(byte_tokenizer().get_vocab()), hidden_size=width, intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=length,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=width)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_t5(d_model: int = 32, seed: int = 5):
    """A 1-layer T5 encoder over byte_tokenizer's vocabulary."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(byte_tokenizer().get_vocab()), d_model=d_model, d_kv=8, d_ff=64,
                                   num_layers=1, num_heads=2)).eval()


def unwrapped_warnings(model, family) -> list[str]:
    """torch-pruning's "Unwrapped parameters detected" warnings for `model` traced with
    `family.unwrapped_parameters(model)` passed, as the pruner passes them."""
    import warnings

    import torch_pruning as tp

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tp.DependencyGraph().build_dependency(model, example_inputs=family.example_inputs(model),
                                              unwrapped_parameters=family.unwrapped_parameters(model))
    return [str(w.message) for w in caught if "Unwrapped parameters" in str(w.message)]


# --------------------------------------------------------------------------- tiny latent pipelines


def ae_kwargs() -> dict:
    """A 2-level autoencoder on 16x16 RGB images (8x8 latents)."""
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                norm_num_groups=8, sample_size=16)


def tiny_kl(latent_channels: int = 4, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    return AutoencoderKL(**{**ae_kwargs(), "latent_channels": latent_channels, **overrides}).eval()


def tiny_sd_unet(**kw):
    """A Stable Diffusion UNet on 8x8x4 latents with 16-wide text cross-attention."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(3)
    args = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return UNet2DConditionModel(**{**args, **kw}).eval()


def sd_pipeline(scheduler=None, **unet_kw):
    """A tiny StableDiffusionPipeline (default scheduler: DDIM over 20 steps, steps_offset 1)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if scheduler is None:
        scheduler = DDIMScheduler(num_train_timesteps=20, clip_sample=False, steps_offset=1)
    return StableDiffusionPipeline(vae=tiny_kl(), text_encoder=tiny_clip(), tokenizer=byte_tokenizer(),
                                   unet=tiny_sd_unet(**unet_kw), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def guided_latents(pipe, model, indices, steps: int, **sampling):
    """(noise, final latents, context) of our sampler on `pipe`'s denoiser with `sampling` (prompt,
    class_labels, guidance_scale, ...), from the per-image noise `diffprune sample` draws (8x8x4)."""
    from diffprune.families import family_for
    from diffprune.families.conditioning import attach_for_sampling, context_for
    from diffprune.sample.loop import denoise, image_generators

    ctx = attach_for_sampling(context_for(pipe, family_for(model), model), **sampling)
    noise = torch.stack([torch.randn(4, 8, 8, generator=g) for g in image_generators(0, indices)])
    with torch.no_grad():
        x = denoise(model, pipe.scheduler, noise, image_generators(0, indices), steps=steps, family=ctx.family,
                    cond=ctx.cond_for(indices, "cpu"), uncond=ctx.uncond_for(indices, "cpu"),
                    guidance_scale=ctx.guidance_scale, guidance_rescale=ctx.guidance_rescale)
    return noise, x, ctx


@torch.no_grad()
def zeroed_channels(model, removed, table: dict):
    """A copy of `model` with the channels each pruning group removed set to zero, to compare with the
    pruned model (a pure channel removal computes the same). `removed`: (root name, indices) per group, as
    `prune_model_at_ratio(on_group=...)` reports them; `table[root suffix]` = (writers, readers), names relative
    to the root's prefix: rows (and bias) of the writers and columns of the readers are zeroed (a name
    missing from the model is skipped, e.g. the last SD3 block's to_add_out)."""
    import copy

    ref = copy.deepcopy(model)
    for root, idxs in removed:
        suffix = next(s for s in table if root.endswith(s))
        prefix, idx = root[: len(root) - len(suffix)], torch.tensor(idxs)
        writers, readers = table[suffix]
        for name, rows in [(n, True) for n in writers] + [(n, False) for n in readers]:
            try:
                layer = ref.get_submodule(prefix + name)
            except AttributeError:
                continue
            if rows:
                layer.weight[idx] = 0
                if layer.bias is not None:
                    layer.bias[idx] = 0
            else:
                layer.weight[:, idx] = 0
    return ref


def captioned_pipeline_dir(root, pipe, n: int = 4, size: int = 16):
    """root/pipe (the saved pipeline) and root/imgs (n random RGB images with captions.jsonl); returns root."""
    import json

    import numpy as np
    from PIL import Image

    pipe.save_pretrained(root / "pipe", safe_serialization=True)
    images, rows = root / "imgs", []
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(images / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a photo of thing {i}"})
    (images / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def check_pruned_reload(folder, pipe, pruned, pipeline_cls, predict, generate) -> None:
    """Save `pipe` holding `pruned` as its transformer into `folder`; every loader (diffprune, DiffusionPipeline,
    the plain `pipeline_cls`) gives bit-identical weights, structure and predictions, and the plain pipeline
    generates exactly the images of the saved one."""
    import json

    import numpy as np
    from diffusers import DiffusionPipeline

    from diffprune.io import load_pipeline
    from diffprune.io.structure import record_structure

    name = type(pruned).__name__
    pipe.register_modules(transformer=pruned)
    pipe.save_pretrained(folder, safe_serialization=True)
    assert json.loads((folder / "model_index.json").read_text())["transformer"] == ["diffprune.io", name]
    expected, images = predict(pruned), generate(pipe)
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    for again in (load_pipeline(folder), DiffusionPipeline.from_pretrained(folder),
                  pipeline_cls.from_pretrained(folder)):
        other = again.transformer
        assert type(other).__name__ == name
        mine, theirs = pruned.state_dict(), other.state_dict()
        assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert record_structure(other) == record_structure(pruned)
        assert torch.equal(predict(other), expected)
    assert np.array_equal(generate(pipeline_cls.from_pretrained(folder)), images)


def full_size_models():
    """benchmarks/_full_size_models.py: the full-size shapes the slow tests share with benchmarks/full_size.py
    (loaded from its path: benchmarks/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_full_size_models.py"
    spec = importlib.util.spec_from_file_location("_full_size_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
