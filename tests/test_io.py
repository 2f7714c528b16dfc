"""io/pipeline.py + io/structure.py: pickle-free save/load, bit-exact reloads, damaged and hostile folders."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from conftest import save_tiny_pipeline, tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline

import diffprune
from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.io import PrunedUNet2DModel, load_pipeline, load_unet, to_pruned
from diffprune.prune.importance import ImportanceResult
from diffprune.prune.pruning import prune_model_at_ratio

INFO = {"format": "diffprune-pruning", "format_version": 1, "base_class": "UNet2DModel",
        "base_model": {"id": "test", "revision": None}, "method": {"name": "magnitude"}, "kept_timesteps": []}


def _pruned(method="magnitude", ratio=0.4):
    model = tiny_unet()
    imp = ImportanceResult(method, 0.0, [], [], [], None, 0, 0.0)
    return to_pruned(prune_model_at_ratio(model, family_for(model), imp, ratio), INFO)


@pytest.fixture
def pruned_dir(tmp_path):
    pruned = _pruned()
    DDPMPipeline(unet=pruned, scheduler=DDPMScheduler(num_train_timesteps=20)).save_pretrained(
        tmp_path / "pruned", safe_serialization=True)
    return tmp_path / "pruned", pruned


def _out(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, 16, 16, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([1, 15])).sample


def test_folder_layout_is_diffusers_plus_pruning_json(pruned_dir):
    folder, _ = pruned_dir
    assert sorted(p.name for p in (folder / "unet").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "pruning.json"]
    config = json.loads((folder / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DModel" and config["block_out_channels"] == [32, 64]  # unchanged base
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"][0].startswith("diffprune") and index["unet"][1] == "PrunedUNet2DModel"


def test_reload_is_bit_exact_through_both_loaders(pruned_dir):
    folder, pruned = pruned_dir
    ours = load_pipeline(folder).unet
    plain = DiffusionPipeline.from_pretrained(folder).unet  # works because diffprune is imported
    assert isinstance(ours, PrunedUNet2DModel) and isinstance(plain, PrunedUNet2DModel)
    for reloaded in (ours, plain, load_unet(folder / "unet")):
        for (k, a), (k2, b) in zip(pruned.state_dict().items(), reloaded.state_dict().items(), strict=True):
            assert k == k2 and torch.equal(a, b)
        assert torch.equal(_out(pruned), _out(reloaded))


def test_pruning_info_survives_a_round_trip(pruned_dir, tmp_path):
    folder, _ = pruned_dir
    unet = load_unet(folder / "unet")
    assert unet.pruning_info["method"] == {"name": "magnitude"}
    unet.save_pretrained(tmp_path / "again")
    again = load_unet(tmp_path / "again")
    assert torch.equal(_out(unet), _out(again))


def test_bare_unet_folder_gets_a_default_scheduler(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "bare", safe_serialization=True)
    pipe = load_pipeline(tmp_path / "bare")
    assert isinstance(pipe.scheduler, DDPMScheduler) and torch.equal(_out(pipe.unet), _out(unet))


def _edit_info(folder, change):
    path = folder / "unet" / "pruning.json"
    info = json.loads(path.read_text())
    change(info)
    path.write_text(json.dumps(info))


@pytest.mark.parametrize("change, match", [
    (lambda i: i.update(format_version=99), "version 99"),
    (lambda i: i.pop("structure"), "missing keys"),
    (lambda i: i["structure"]["conv_in"].update(out_channels=7), "conv_in"),
    (lambda i: i["structure"]["conv_in"].update(forward="os.system"), "not one of"),
    (lambda i: i["structure"].update({"evil": {"type": "Conv2d"}}), "does not exist"),
    (lambda i: i["structure"]["mid_block.resnets.0.norm1"].update(num_groups=7), "GroupNorm|weight"),
])
def test_edited_pruning_json_fails_with_one_clear_line(pruned_dir, change, match):
    folder, _ = pruned_dir
    _edit_info(folder, change)
    with pytest.raises(DiffpruneError, match=match) as err:
        load_unet(folder / "unet")
    assert "\n" not in str(err.value) and "pruning.json" in str(err.value)


def test_truncated_weights_fail_clearly(pruned_dir):
    folder, _ = pruned_dir
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(DiffpruneError, match="safetensors"):
        load_unet(folder / "unet")


class _Payload:
    def __reduce__(self):
        return (open, ("/tmp/diffprune-pickle-ran", "w"))


def test_planted_pickle_is_never_loaded(tmp_path):
    """A folder with only a pickled checkpoint is refused and the payload never runs."""
    marker = tmp_path.parent / "diffprune-pickle-ran"
    folder = save_tiny_pipeline(tmp_path / "p", num_train_timesteps=20)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(DiffpruneError, match="safetensors"):
        load_pipeline(folder)
    with pytest.raises(DiffpruneError, match="safetensors"):
        load_unet(folder / "unet")
    assert not marker.exists() and not __import__("os").path.exists("/tmp/diffprune-pickle-ran")


@pytest.mark.parametrize("path, match", [("does/not/exist", "does not exist|hub"), ("./nope", "does not exist")])
def test_missing_model_path(path, match):
    with pytest.raises(DiffpruneError, match=match):
        load_pipeline(path)


def test_public_api_exports():
    assert diffprune.load_pipeline is load_pipeline and diffprune.PrunedUNet2DModel is PrunedUNet2DModel


def test_image_folder_is_decoded_once_and_served_from_memory(tmp_path):
    import numpy as np
    from PIL import Image

    from diffprune.data import ImageFolderDataset

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    cached = ImageFolderDataset(folder, 16, 3)
    uncached = ImageFolderDataset(folder, 16, 3, cache_bytes=0)
    decoded = [uncached[i] for i in range(3)]
    first = [cached[i] for i in range(3)]
    for i in range(3):
        assert torch.equal(first[i], decoded[i])
        (folder / f"{i}.png").unlink()  # from now on only the cache can serve it
    first[0].fill_(0)  # a caller writing into its item must not change the cache
    assert all(torch.equal(cached[i], decoded[i]) for i in range(3))
    with pytest.raises(FileNotFoundError):
        uncached[0]


# --------------------------------------------------------------------------- messages (issue 23 C)

# keys facebook/DiT-XL-2-256's transformer/config.json holds (written for Transformer2DModel by diffusers 0.12)
LEGACY_DIT_KEYS = {"_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0",
                   "cross_attention_dim": None, "norm_num_groups": 32, "num_vector_embeds": None,
                   "only_cross_attention": False,
                   "use_linear_projection": False, "attention_bias": True, "activation_fn": "gelu-approximate",
                   "norm_elementwise_affine": False, "norm_type": "ada_norm_zero", "upcast_attention": False}
IGNORED_KEYS_WARNING = "are not expected and will be ignored"


def _legacy_dit_pipeline(folder):
    """A tiny DiT pipeline folder whose transformer config is hub-style (old diffusers' Transformer2DModel)."""
    from conftest import tiny_kl
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(4)
    dit = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    DiTPipeline(transformer=dit, vae=tiny_kl(), scheduler=DDIMScheduler(num_train_timesteps=20, clip_sample=False)
                ).save_pretrained(folder, safe_serialization=True)
    path = folder / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **LEGACY_DIT_KEYS}))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "transformer": ["diffusers", "Transformer2DModel"]}))
    return folder


@pytest.fixture
def diffusers_log():
    """Every message logged under diffusers' loggers while the test runs (they do not propagate to root)."""
    import logging

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.messages = []

        def emit(self, record):
            if record.levelno >= logging.WARNING:
                self.messages.append(record.getMessage())

    keep, target = Keep(), logging.getLogger("diffusers")
    target.addHandler(keep)
    yield keep.messages
    target.removeHandler(keep)


def test_hub_style_dit_runs_without_config_warnings_and_names_transformer(tmp_path, capfd, diffusers_log):
    """Loading, pruning (--portable), finetuning and reloading a DiT whose config an older diffusers wrote
    print no "config attributes ... will be ignored" line; the hints name transformer/, not unet/."""
    import numpy as np
    from PIL import Image

    from diffprune.cli import main

    base = _legacy_dit_pipeline(tmp_path / "dit")
    images = tmp_path / "imgs"
    for i in range(4):
        (images / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(images / str(i % 2) / f"{i}.png")
    pruned, tuned = tmp_path / "pruned", tmp_path / "tuned"
    code = main(["prune", "--model", str(base), "--method", "magnitude", "--ratio", "0.3", "--portable",
                 "--output-dir", str(pruned)])
    out = capfd.readouterr()
    assert code == 0, out.err
    assert f"AutoModel.from_pretrained({json.dumps(str(pruned / 'transformer'))}" in out.out and "/unet" not in out.out
    assert "use_linear_projection" not in json.loads((pruned / "transformer" / "config.json").read_text())
    code = main(["finetune", "--model", str(pruned), "--data", str(images), "--steps", "1", "--batch-size", "2",
                 "--no-progress", "--no-tensorboard", "--portable", "--output-dir", str(tuned)])
    out = capfd.readouterr()
    assert code == 0, out.err
    assert "(model_index.json, transformer/, scheduler/)" in out.out and "unet/" not in out.out
    assert str(tuned / "transformer") in out.out  # the --portable hint
    for folder in (base, pruned, tuned):
        load_pipeline(folder)
    load_unet(tuned / "transformer")
    seen = capfd.readouterr()
    assert IGNORED_KEYS_WARNING not in seen.out + seen.err + out.out + out.err
    assert not [m for m in diffusers_log if IGNORED_KEYS_WARNING in m], diffusers_log


def test_unpruned_folder_with_extra_config_keys_loads_quietly(tmp_path, capfd, diffusers_log):
    """A plain (unpruned) model folder still holding such keys: diffusers' own loader runs, quietly."""
    folder = _legacy_dit_pipeline(tmp_path / "dit")
    pipe = load_pipeline(folder)
    pipe.save_pretrained(tmp_path / "resaved", safe_serialization=True)  # diffusers keeps the keys it ignored
    assert "use_linear_projection" in json.loads((tmp_path / "resaved" / "transformer" / "config.json").read_text())
    load_pipeline(tmp_path / "resaved")
    load_unet(tmp_path / "resaved" / "transformer")
    seen = capfd.readouterr()
    assert IGNORED_KEYS_WARNING not in seen.out + seen.err
    assert not [m for m in diffusers_log if IGNORED_KEYS_WARNING in m], diffusers_log


def test_portable_hint_names_the_denoiser_folder(tmp_path):
    from diffprune.io.portable import describe

    for component in ("unet", "transformer"):
        folder = tmp_path / f"pruned_{component[0]}"
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", component: [
            "diffprune_pruned_model", "PrunedDiTTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))
        text = describe(folder)
        assert f"AutoModel.from_pretrained({json.dumps(str(folder / component))}" in text
        assert "<folder>" not in text and "vae" not in text
        assert ("unet" in text) == (component == "unet")
