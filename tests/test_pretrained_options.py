"""Pruned* save_pretrained / from_pretrained take diffusers' keyword arguments (io/pretrained_options.py):
honoured where a one-file safetensors folder can (variant, dtype, one device, loading info), else one
DiffpruneError line naming the value and what is allowed; never silently dropped."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline

from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.io import PrunedUNet2DModel, load_pipeline, load_unet, to_pruned
from diffprune.prune.importance import ImportanceResult
from diffprune.prune.pruning import prune_model_at_ratio

INFO = {"format": "diffprune-pruning", "format_version": 1, "base_class": "UNet2DModel",
        "base_model": {"id": "test", "revision": None}, "method": {"name": "magnitude"}, "kept_timesteps": []}


@pytest.fixture(scope="module")
def pruned():
    model = tiny_unet()
    imp = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
    return to_pruned(prune_model_at_ratio(model, family_for(model), imp, 0.4), INFO)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def test_save_with_variant_fp16_round_trips_with_torch_dtype(pruned, tmp_path):
    half = PrunedUNet2DModel.from_pretrained(_saved(pruned, tmp_path / "plain"), torch_dtype=torch.float16)
    half.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert sorted(p.name for p in (tmp_path / "fp16").iterdir()) == [
        "config.json", "diffusion_pytorch_model.fp16.safetensors", "pruning.json"]
    for loaded in (PrunedUNet2DModel.from_pretrained(tmp_path / "fp16", variant="fp16", torch_dtype=torch.float16),
                   load_unet(tmp_path / "fp16", variant="fp16", torch_dtype=torch.float16)):
        assert isinstance(loaded, PrunedUNet2DModel) and _same(loaded, half)
    as_float = load_unet(tmp_path / "fp16", variant="fp16")  # no dtype asked: float32, as diffusers loads
    assert next(as_float.parameters()).dtype == torch.float32 and _same(as_float.half(), half)
    with pytest.raises(DiffpruneError, match="fp16"):  # the plain file is not there: say which variant is
        PrunedUNet2DModel.from_pretrained(tmp_path / "fp16")
    with pytest.raises(DiffpruneError, match="fp16"):
        load_unet(tmp_path / "fp16")


def _saved(model, folder):
    model.save_pretrained(folder)
    return folder


def test_pipeline_save_with_variant_reaches_the_pruned_component(pruned, tmp_path):
    pipe = DDPMPipeline(unet=pruned, scheduler=DDPMScheduler(num_train_timesteps=20))
    pipe.save_pretrained(tmp_path / "pipe", variant="fp16")
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert _same(load_pipeline(tmp_path / "pipe", variant="fp16").unet, pruned)
    assert _same(DiffusionPipeline.from_pretrained(tmp_path / "pipe", variant="fp16").unet, pruned)


def test_dtype_device_map_and_loading_info_are_honoured(pruned, tmp_path):
    folder = _saved(pruned, tmp_path / "m")
    assert next(PrunedUNet2DModel.from_pretrained(folder, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16
    model, info = PrunedUNet2DModel.from_pretrained(folder, device_map="cpu", output_loading_info=True,
                                                    low_cpu_mem_usage=False, use_safetensors=True)
    assert _same(model, pruned) and info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [],
                                             "error_msgs": []}


@pytest.mark.parametrize(("options", "named"), [
    ({"safe_serialization": False}, "safe_serialization=False .*allowed: True"),
    ({"push_to_hub": True}, "push_to_hub=True .*allowed: False"),
    ({"save_function": torch.save}, "save_function=.*allowed: None"),
    ({"max_shard_size": "1KB"}, "max_shard_size='1KB' .*allowed: None or at least"),
    ({"max_shard_size": "lots"}, "max_shard_size='lots' is not a size"),
    ({"variant": "fp 16"}, "variant='fp 16'"),
    ({"colour": "red"}, r"unexpected keyword argument\(s\) \['colour'\].*allowed: "),
])
def test_save_refuses_what_it_cannot_honour_in_one_line(pruned, tmp_path, options, named):
    with pytest.raises(DiffpruneError, match=named) as err:
        pruned.save_pretrained(tmp_path / "out", **options)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_save_with_a_big_enough_shard_size_or_off_the_main_process(pruned, tmp_path):
    pruned.save_pretrained(tmp_path / "one", max_shard_size="10GB", safe_serialization=True)
    assert _same(load_unet(tmp_path / "one"), pruned)
    pruned.save_pretrained(tmp_path / "none", is_main_process=False)
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(("options", "named"), [
    ({"use_safetensors": False}, "use_safetensors=False .*allowed: None or True"),
    ({"device_map": "auto"}, "device_map='auto' .*allowed: one device"),
    ({"device_map": {"": "cpu"}}, "device_map=.*allowed: one device"),
    ({"quantization_config": object()}, "quantization_config=.*allowed: None"),
    ({"offload_folder": "/tmp/x"}, "offload_folder='/tmp/x' .*allowed: None"),
    ({"ignore_mismatched_sizes": True}, "ignore_mismatched_sizes=True .*allowed: False"),
    ({"token": "hf_x"}, "token='hf_x' .*allowed: None"),
    ({"torch_dtype": "float16"}, "torch_dtype='float16' is not a floating torch dtype"),
    ({"torch_dtype": torch.int8}, "torch_dtype=torch.int8 is not a floating torch dtype"),
    ({"colour": "red"}, r"unexpected keyword argument\(s\) \['colour'\].*allowed: "),
])
def test_load_refuses_what_it_cannot_honour_in_one_line(pruned, tmp_path, options, named):
    folder = _saved(pruned, tmp_path / "m")
    with pytest.raises(DiffpruneError, match=named) as err:
        PrunedUNet2DModel.from_pretrained(folder, **options)
    assert "\n" not in str(err.value)
