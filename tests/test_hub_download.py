"""A hub id downloads only what loading reads (issue 23 A): one variant of each component's safetensors,
its config and tokenizer files; never .ckpt/.bin/.onnx/.msgpack, root single-file checkpoints or a
second variant. The hub is faked: listings shaped like the real repos, allow_patterns applied exactly
as huggingface_hub applies them (`filter_repo_objects`), no network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import save_tiny_pipeline, tiny_unet
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import filter_repo_objects

from diffprune.errors import DiffpruneError
from diffprune.io import load_pipeline, load_unet
from diffprune.io.folder_files import resolve_folder
from diffprune.io.variants import variant_of

FORBIDDEN = (".ckpt", ".bin", ".pt", ".pth", ".onnx", ".onnx_data", ".msgpack", ".h5", ".xml", ".yaml", ".md", ".png")

# runwayml/stable-diffusion-v1-5 (main), as the hub lists it
SD15_FILES = """
.gitattributes README.md model_index.json v1-5-pruned.ckpt v1-5-pruned.safetensors v1-5-pruned-emaonly.ckpt
v1-5-pruned-emaonly.safetensors v1-inference.yaml
feature_extractor/preprocessor_config.json
safety_checker/config.json safety_checker/model.fp16.safetensors safety_checker/model.safetensors
safety_checker/pytorch_model.bin safety_checker/pytorch_model.fp16.bin safety_checker/flax_model.msgpack
scheduler/scheduler_config.json
text_encoder/config.json text_encoder/model.fp16.safetensors text_encoder/model.safetensors
text_encoder/pytorch_model.bin text_encoder/pytorch_model.fp16.bin text_encoder/flax_model.msgpack
text_encoder/model.onnx
tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json tokenizer/vocab.json
unet/config.json unet/diffusion_flax_model.msgpack unet/diffusion_pytorch_model.bin
unet/diffusion_pytorch_model.fp16.bin unet/diffusion_pytorch_model.fp16.safetensors
unet/diffusion_pytorch_model.non_ema.bin unet/diffusion_pytorch_model.non_ema.safetensors
unet/diffusion_pytorch_model.safetensors unet/model.onnx
vae/config.json vae/diffusion_flax_model.msgpack vae/diffusion_pytorch_model.bin vae/diffusion_pytorch_model.fp16.bin
vae/diffusion_pytorch_model.fp16.safetensors vae/diffusion_pytorch_model.safetensors
vae_decoder/config.json vae_decoder/model.onnx
""".split()
SD15_INDEX = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
              "feature_extractor": ["transformers", "CLIPImageProcessor"],
              "requires_safety_checker": True,
              "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
              "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
              "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
              "vae": ["diffusers", "AutoencoderKL"]}
SD15_PLAIN = {"model_index.json", "feature_extractor/preprocessor_config.json", "safety_checker/config.json",
              "safety_checker/model.safetensors", "scheduler/scheduler_config.json", "text_encoder/config.json",
              "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
              "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
              "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"}

# stabilityai/stable-diffusion-xl-base-1.0 (main)
_TOKENIZER = "merges.txt special_tokens_map.json tokenizer_config.json vocab.json".split()
_OPENVINO = ["openvino_model.bin", "openvino_model.xml"]
SDXL_FILES = (
    ".gitattributes 01.png LICENSE.md README.md comparison.png model_index.json pipeline.png "
    "sd_xl_base_1.0.safetensors sd_xl_base_1.0_0.9vae.safetensors sd_xl_offset_example-lora_1.0.safetensors "
    "scheduler/scheduler_config.json").split() + [
    f"{enc}/{f}" for enc in ("text_encoder", "text_encoder_2") for f in
    ["config.json", "flax_model.msgpack", "model.fp16.safetensors", "model.onnx", "model.safetensors", *_OPENVINO]
] + ["text_encoder_2/model.onnx_data"] + [f"{tok}/{f}" for tok in ("tokenizer", "tokenizer_2") for f in _TOKENIZER] + [
    f"unet/{f}" for f in ["config.json", "diffusion_flax_model.msgpack", "diffusion_pytorch_model.fp16.safetensors",
                          "diffusion_pytorch_model.safetensors", "model.onnx", "model.onnx_data", *_OPENVINO]
] + [f"{vae}/{f}" for vae in ("vae", "vae_1_0") for f in
     ["config.json", "diffusion_flax_model.msgpack", "diffusion_pytorch_model.fp16.safetensors",
      "diffusion_pytorch_model.safetensors"]
     ] + [f"{part}/{f}" for part in ("vae_decoder", "vae_encoder") for f in ["config.json", "model.onnx", *_OPENVINO]]
SDXL_INDEX = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
              "force_zeros_for_empty_prompt": True, "feature_extractor": [None, None], "image_encoder": [None, None],
              "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
              "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
              "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
              "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}

# SD 3.5-style: sharded weights (diffusers' and transformers' variant forms), a sentencepiece tokenizer
SHARDED_FILES = """
model_index.json sd3.5_large.safetensors scheduler/scheduler_config.json
transformer/config.json transformer/diffusion_pytorch_model-00001-of-00002.safetensors
transformer/diffusion_pytorch_model-00002-of-00002.safetensors
transformer/diffusion_pytorch_model.safetensors.index.json
transformer/diffusion_pytorch_model.fp16-00001-of-00002.safetensors
transformer/diffusion_pytorch_model.fp16-00002-of-00002.safetensors
transformer/diffusion_pytorch_model.safetensors.index.fp16.json
transformer/diffusion_pytorch_model.bin.index.json transformer/diffusion_pytorch_model-00001-of-00002.bin
text_encoder_3/config.json text_encoder_3/model-00001-of-00002.safetensors
text_encoder_3/model-00002-of-00002.safetensors
text_encoder_3/model.safetensors.index.json text_encoder_3/model-00001-of-00002.fp16.safetensors
text_encoder_3/model-00002-of-00002.fp16.safetensors text_encoder_3/model.safetensors.fp16.index.json
text_encoder_3/pytorch_model.bin.index.json
tokenizer_3/special_tokens_map.json tokenizer_3/spiece.model tokenizer_3/tokenizer.json
tokenizer_3/tokenizer_config.json
vae/config.json vae/diffusion_pytorch_model.safetensors
""".split()
SHARDED_INDEX = {"_class_name": "StableDiffusion3Pipeline",
                 "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                 "text_encoder_3": ["transformers", "T5EncoderModel"],
                 "tokenizer_3": ["transformers", "T5TokenizerFast"],
                 "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}


class FakeHub:
    """list_repo_files / hf_hub_download / snapshot_download over one listing; records every call.

    `source`: a local folder holding the repo's files, copied into the snapshot (only those fetched)."""

    def __init__(self, monkeypatch, tmp_path: Path, files: list[str], index: dict | None = None,
                 source: Path | None = None, list_error: Exception | None = None, cached: bool = False,
                 offline: bool = False):
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)  # whatever the caller's environment says
        self.files, self.index, self.source, self.root = files, index, source, tmp_path / "snapshot"
        self.calls: list[tuple[str, dict]] = []
        self.fetched: set[str] | None = None
        self.list_error, self.cached = list_error, cached
        hub = self

        class Api:
            def list_repo_files(self, repo_id, revision=None, **kwargs):
                hub.calls.append(("list_repo_files", {"repo_id": repo_id, "revision": revision, **kwargs}))
                if hub.list_error is not None:
                    raise hub.list_error
                return list(hub.files)

        monkeypatch.setattr(huggingface_hub, "HfApi", Api)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)

    def hf_hub_download(self, repo_id, filename, subfolder=None, revision=None, **kwargs):
        self.calls.append(("hf_hub_download", {"repo_id": repo_id, "filename": filename, "subfolder": subfolder,
                                               "revision": revision, **kwargs}))
        name = f"{subfolder}/{filename}" if subfolder else filename
        assert name in self.files
        path = self.root.parent / "downloads" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.source is not None:
            shutil.copy(self.source / name, path)
        else:
            path.write_text(json.dumps(self.index))
        return str(path)

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
        self.calls.append(("snapshot_download", {"repo_id": repo_id, "revision": revision,
                                                 "allow_patterns": allow_patterns,
                                                 "local_files_only": local_files_only, **kwargs}))
        if local_files_only:
            if not self.cached:
                raise LocalEntryNotFoundError("not in the cache")
            self.root.mkdir(parents=True, exist_ok=True)
            return str(self.root)
        self.fetched = set(filter_repo_objects(self.files, allow_patterns=allow_patterns))
        for name in self.fetched:
            path = self.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if self.source is not None:
                shutil.copy(self.source / name, path)
            else:
                path.write_bytes(b"")
        return str(self.root)


def _components(fetched: set[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in fetched:
        folder, _, base = name.rpartition("/")
        out.setdefault(folder, []).append(base)
    return out


def _check_fetched(fetched: set[str], variant: str | None) -> None:
    """No pickle/onnx/flax/openvino file, nothing at the root but model_index.json, exactly one variant
    of safetensors weights per component, and no variant at all without one."""
    assert not [n for n in fetched if n.endswith(FORBIDDEN)], sorted(fetched)
    assert _components(fetched).get("", []) in ([], ["model_index.json"]), sorted(fetched)
    for folder, names in _components(fetched).items():
        variants = {variant_of(n)[1] for n in names if n.endswith(".safetensors")}
        assert len(variants) <= 1, (folder, names)
        assert variants <= {variant, None}, (folder, names)
        if variant is None:
            assert variants <= {None}, (folder, names)


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sd15_fetches_one_variant_of_what_the_pipeline_loads(monkeypatch, tmp_path, variant):
    hub = FakeHub(monkeypatch, tmp_path, SD15_FILES, SD15_INDEX)
    folder = resolve_folder("runwayml/stable-diffusion-v1-5", revision="39593d5", variant=variant)
    assert folder == hub.root
    expected = SD15_PLAIN if variant is None else {
        n.replace(".safetensors", ".fp16.safetensors") if n.endswith(".safetensors") else n for n in SD15_PLAIN}
    assert hub.fetched == expected
    _check_fetched(hub.fetched, variant)
    assert [c[0] for c in hub.calls] == ["list_repo_files", "hf_hub_download", "snapshot_download"]
    assert all(kw["revision"] == "39593d5" for _, kw in hub.calls)
    assert hub.calls[1][1]["filename"] == "model_index.json"


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sdxl_fetches_two_encoders_and_no_root_checkpoint_or_extra_folder(monkeypatch, tmp_path, variant):
    hub = FakeHub(monkeypatch, tmp_path, SDXL_FILES, SDXL_INDEX)
    resolve_folder("stabilityai/stable-diffusion-xl-base-1.0", variant=variant)
    _check_fetched(hub.fetched, variant)
    suffix = ".fp16.safetensors" if variant else ".safetensors"
    weights = {n for n in hub.fetched if n.endswith(".safetensors")}
    assert weights == {"text_encoder/model" + suffix, "text_encoder_2/model" + suffix,
                       "unet/diffusion_pytorch_model" + suffix, "vae/diffusion_pytorch_model" + suffix}
    assert {n.split("/")[0] for n in hub.fetched} == {"model_index.json", "scheduler", "text_encoder", "text_encoder_2",
                                                      "tokenizer", "tokenizer_2", "unet", "vae"}
    assert hub.calls[-1][1]["revision"] is None


def test_sharded_weights_bring_their_index_of_the_same_variant(monkeypatch, tmp_path):
    hub = FakeHub(monkeypatch, tmp_path, SHARDED_FILES, SHARDED_INDEX)
    resolve_folder("someone/sd35-like", variant="fp16")
    _check_fetched(hub.fetched, "fp16")
    assert {n for n in hub.fetched if n.startswith(("transformer/", "text_encoder_3/"))} == {
        "transformer/config.json", "transformer/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.fp16.json",
        "text_encoder_3/config.json", "text_encoder_3/model-00001-of-00002.fp16.safetensors",
        "text_encoder_3/model-00002-of-00002.fp16.safetensors", "text_encoder_3/model.safetensors.fp16.index.json"}
    assert "tokenizer_3/spiece.model" in hub.fetched and "vae/diffusion_pytorch_model.safetensors" in hub.fetched
    hub = FakeHub(monkeypatch, tmp_path, SHARDED_FILES, SHARDED_INDEX)
    resolve_folder("someone/sd35-like")
    assert "transformer/diffusion_pytorch_model.safetensors.index.json" in hub.fetched
    assert not any(".index.fp16" in n or ".fp16.index" in n or ".bin" in n for n in hub.fetched)


def test_a_component_without_the_variant_falls_back_to_its_plain_files(monkeypatch, tmp_path):
    files = [n for n in SD15_FILES if n != "vae/diffusion_pytorch_model.fp16.safetensors"]
    hub = FakeHub(monkeypatch, tmp_path, files, SD15_INDEX)
    resolve_folder("runwayml/stable-diffusion-v1-5", variant="fp16")
    assert "vae/diffusion_pytorch_model.safetensors" in hub.fetched
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in hub.fetched
    _check_fetched(hub.fetched, "fp16")


def test_bare_model_repo_and_subfolder(monkeypatch, tmp_path):
    vae = ["README.md", "config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors",
           "vae-ft-mse-840000-ema-pruned.ckpt", "vae-ft-mse-840000-ema-pruned.safetensors"]
    hub = FakeHub(monkeypatch, tmp_path, vae)
    assert resolve_folder("stabilityai/sd-vae-ft-mse") == hub.root
    assert hub.fetched == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert [c[0] for c in hub.calls] == ["list_repo_files", "snapshot_download"]  # no model_index.json to read
    hub = FakeHub(monkeypatch, tmp_path, SD15_FILES, SD15_INDEX)
    assert resolve_folder("runwayml/stable-diffusion-v1-5", subfolder="unet", revision="v1") == hub.root / "unet"
    assert hub.fetched == {"unet/config.json", "unet/diffusion_pytorch_model.safetensors"}
    assert all(kw["revision"] == "v1" for _, kw in hub.calls)


@pytest.mark.parametrize("files, variant, match", [
    (["model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "unet/diffusion_pytorch_model.bin"],
     None, r"unet/ has no safetensors weights \(only \.bin\)"),
    (["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
      "unet/diffusion_pytorch_model.fp16.safetensors"], None, "unet/ has no plain .*--variant fp16"),
    (["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
      "unet/diffusion_pytorch_model.ema.safetensors"], "fp16", "variant 'fp16' or plain .*--variant ema"),
    (["README.md", "v1-5-pruned.ckpt"], None, "neither model_index.json .* nor config.json"),
])
def test_what_cannot_load_is_refused_before_any_download(monkeypatch, tmp_path, files, variant, match):
    hub = FakeHub(monkeypatch, tmp_path, files, {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                                 "scheduler": ["diffusers", "DDPMScheduler"]})
    with pytest.raises(DiffpruneError, match=match) as err:
        resolve_folder("someone/repo", variant=variant)
    assert "\n" not in str(err.value) and "someone/repo" in str(err.value)
    assert hub.fetched is None


def _missing(cls, text: str):
    err = cls.__new__(cls)
    Exception.__init__(err, text)
    return err


def test_offline_and_unreachable_hub_use_the_cache_or_refuse_in_one_line(monkeypatch, tmp_path):
    hub = FakeHub(monkeypatch, tmp_path, SD15_FILES, SD15_INDEX, offline=True)
    with pytest.raises(DiffpruneError, match="HF_HUB_OFFLINE is set, and the local hub cache has no copy") as err:
        resolve_folder("runwayml/stable-diffusion-v1-5", revision="v2")
    assert "\n" not in str(err.value) and "'v2'" in str(err.value)
    assert [c[0] for c in hub.calls] == ["snapshot_download"] and hub.calls[0][1]["local_files_only"]
    hub.cached = True
    assert resolve_folder("runwayml/stable-diffusion-v1-5") == hub.root
    hub = FakeHub(monkeypatch, tmp_path, SD15_FILES, SD15_INDEX, list_error=ConnectionError("no route"), cached=True)
    assert resolve_folder("runwayml/stable-diffusion-v1-5") == hub.root
    assert hub.calls[-1][1]["local_files_only"] and hub.fetched is None


@pytest.mark.parametrize("error, match", [
    (_missing(RepositoryNotFoundError, "404"), "neither a local folder nor a hub repo you can read"),
    (_missing(RevisionNotFoundError, "404"), "--revision 'nope' is not in hub repo"),
])
def test_missing_repo_or_revision_is_named(monkeypatch, tmp_path, error, match):
    hub = FakeHub(monkeypatch, tmp_path, SD15_FILES, SD15_INDEX, list_error=error, cached=True)
    with pytest.raises(DiffpruneError, match=match):
        resolve_folder("someone/missing", revision="nope")
    assert not any(kw.get("local_files_only") for _, kw in hub.calls)  # not hidden behind a stale cache


def test_bad_variant_name_is_refused():
    with pytest.raises(DiffpruneError, match="variant='../x' is not a weights variant name"):
        resolve_folder("someone/repo", variant="../x")


# --------------------------------------------------------------------------- end to end through the loaders


def _pickle_bomb(path: Path) -> None:
    path.write_bytes(b"\x80\x04 not a checkpoint: fetching or reading it fails the test")


def test_flat_ddpm_repo_loads_without_its_pickles(monkeypatch, tmp_path):
    """google/ddpm-cifar10-32's layout: model_index.json, config.json, scheduler_config.json and the
    weights in the root (no unet/ folder); diffusers reads the components from there, and so does diffprune."""
    from diffusers import DDPMScheduler

    repo = tmp_path / "repo"
    unet = tiny_unet()
    unet.save_pretrained(repo, safe_serialization=True)
    DDPMScheduler(num_train_timesteps=50).save_pretrained(repo)
    (repo / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "scheduler": [
        "diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}))
    _pickle_bomb(repo / "diffusion_pytorch_model.bin")
    (repo / "README.md").write_text("readme")
    files = sorted(p.name for p in repo.iterdir())
    hub = FakeHub(monkeypatch, tmp_path, files, source=repo)
    pipe = load_pipeline("google/ddpm-cifar10-32")
    assert hub.fetched == {"model_index.json", "config.json", "scheduler_config.json",
                           "diffusion_pytorch_model.safetensors"}
    assert pipe.scheduler.config.num_train_timesteps == 50
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), unet.state_dict().values(),
                                                  strict=True))


def _two_variant_folder(folder: Path):
    """A DDPM pipeline folder with plain weights of one UNet and fp16 weights of another (told apart by value)."""
    plain, half = tiny_unet(seed=0), tiny_unet(seed=1)
    save_tiny_pipeline(folder, unet=plain)
    half.to(torch.float16).save_pretrained(folder / "unet", safe_serialization=True, variant="fp16")
    _pickle_bomb(folder / "unet" / "diffusion_pytorch_model.bin")
    return plain, half


def _same(model, reference) -> bool:
    ref = {k: v.to(torch.float16).float() for k, v in reference.state_dict().items()}
    return all(torch.equal(v.to(torch.float16).float(), ref[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("hub_id", [False, True])
def test_variant_reaches_the_loaders(monkeypatch, tmp_path, hub_id):
    folder = tmp_path / "two"
    plain, half = _two_variant_folder(folder)
    model = str(folder)
    if hub_id:
        files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
        hub = FakeHub(monkeypatch, tmp_path, files, source=folder)
        model = "someone/two-variants"
    pipe = load_pipeline(model, variant="fp16", revision="r1")
    assert _same(pipe.unet, half) and not _same(pipe.unet, plain)
    if hub_id:
        assert "unet/diffusion_pytorch_model.fp16.safetensors" in hub.fetched
        assert "unet/diffusion_pytorch_model.safetensors" not in hub.fetched
        assert all(kw["revision"] == "r1" for _, kw in hub.calls)
        _check_fetched(hub.fetched, "fp16")
        model = str(folder)
    assert _same(load_pipeline(model).unet, plain)
    assert _same(load_unet(Path(model) / "unet", variant="fp16"), half)
    assert _same(load_unet(Path(model) / "unet"), plain)


def test_a_folder_diffprune_wrote_loads_with_any_variant(tmp_path):
    """Pruned / saved folders have plain weights only: asking for fp16 falls back to them (diffusers
    itself would refuse a variant no component has)."""
    folder = save_tiny_pipeline(tmp_path / "plain")
    assert load_pipeline(folder, variant="fp16").unet is not None
    assert load_unet(folder / "unet", variant="fp16") is not None


def test_only_variant_weights_without_variant_names_the_option(tmp_path):
    folder = tmp_path / "only16"
    save_tiny_pipeline(folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(
        folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(DiffpruneError, match="--variant fp16") as err:
        load_pipeline(folder)
    assert "\n" not in str(err.value)
    assert load_pipeline(folder, variant="fp16").unet is not None


def test_unloaded_text_encoders_are_copied_as_plain_files(tmp_path):
    """`text_encoders=False` with a variant: the text encoder folder is copied back with the weights of
    that variant under the plain names, so the written folder loads without --variant."""
    from conftest import sd_pipeline

    from diffprune.io import save_pipeline

    source = tmp_path / "sd"
    sd_pipeline().save_pretrained(source, safe_serialization=True)
    encoder = source / "text_encoder" / "model.safetensors"
    encoder.rename(source / "text_encoder" / "model.fp16.safetensors")
    _pickle_bomb(source / "text_encoder" / "pytorch_model.bin")
    pipe = load_pipeline(source, text_encoders=False, variant="fp16")
    assert pipe.text_encoder is None
    out = tmp_path / "out"
    out.mkdir()
    save_pipeline(pipe, out)
    assert sorted(p.name for p in (out / "text_encoder").iterdir()) == ["config.json", "model.safetensors"]
    again = load_pipeline(out)
    reference = load_pipeline(source, variant="fp16")
    assert all(torch.equal(a, b) for a, b in zip(again.text_encoder.state_dict().values(),
                                                  reference.text_encoder.state_dict().values(), strict=True))


@pytest.mark.parametrize("argv, target", [
    (["prune", "--method", "magnitude", "--output-dir", "{tmp}/o"], "diffprune.prune.stage.load_pipeline"),
    (["prune", "--method", "magnitude", "--dry-run"], "diffprune.prune.dry_run.load_pipeline"),
    (["finetune", "--data", "digits", "--output-dir", "{tmp}/o", "--no-tensorboard"],
     "diffprune.io.pipeline.load_pipeline"),
    (["encode-prompts", "--prompt", "a cat", "--output", "{tmp}/e.safetensors"],
     "diffprune.io.pipeline.load_pipeline"),
    (["sample", "--output-dir", "{tmp}/o"], "diffprune.io.pipeline.load_pipeline"),
    (["evaluate", "--output", "{tmp}/e.json"], "diffprune.io.pipeline.load_pipeline"),
])
def test_revision_and_variant_reach_the_loader(monkeypatch, tmp_path, capsys, argv, target):
    import importlib

    from conftest import run_cli

    seen = []

    def fake_load_pipeline(name, *args, **kwargs):
        seen.append((name, kwargs))
        raise DiffpruneError("stop here")

    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, fake_load_pipeline)
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, err = run_cli(args[:1] + ["--model", "someone/model", "--revision", "v2", "--variant", "fp16"] + args[1:],
                        capsys)
    assert code == 2 and "stop here" in err
    assert seen and seen[0][0] == "someone/model"
    assert seen[0][1]["revision"] == "v2" and seen[0][1]["variant"] == "fp16"


def test_bad_variant_option_is_one_line(capsys):
    from conftest import run_cli

    code, err = run_cli(["prune", "--model", "m", "--method", "magnitude", "--dry-run", "--variant", "fp16/../x"],
                        capsys)
    assert code == 2 and "not a weights variant name" in err and err.count("error:") == 1
