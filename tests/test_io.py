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
from diffprune.prune.pruning import prune_with_ratio

INFO = {"format": "diffprune-pruning", "format_version": 1, "base_class": "UNet2DModel",
        "base_model": {"id": "test", "revision": None}, "method": {"name": "magnitude"}, "kept_timesteps": []}


def _pruned(method="magnitude", ratio=0.4):
    model = tiny_unet()
    imp = ImportanceResult(method, 0.0, [], [], [], None, 0, 0.0)
    return to_pruned(prune_with_ratio(model, family_for(model), imp, ratio), INFO)


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
