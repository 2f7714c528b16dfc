"""Hostile or damaged model folders (issue 13): each is refused with ONE line naming the file, the
bad value and what is allowed (CLI exit 2, no traceback), before any output is written, with the
input folder byte-identical afterwards. Every hostile file is made here from the tiny models of
conftest.py: a plain DDPM pipeline and a pruned one (head dims pruned: 8 heads of 4, scale 1/2).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_pipeline, tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler
from safetensors.torch import load_file, save_file

from diffprune import cli
from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.io import load_pipeline, to_pruned
from diffprune.prune.importance import ImportanceResult
from diffprune.prune.pruning import prune_model_at_ratio

INFO = {"format": "diffprune-pruning", "format_version": 1, "base_class": "UNet2DModel",
        "base_model": {"id": "test", "revision": None}, "method": {"name": "magnitude"}, "kept_timesteps": []}
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
ATTN = "mid_block.attentions.0"
GIB = 2**30


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile_sources")
    save_tiny_pipeline(root / "plain", num_train_timesteps=20)
    model = tiny_unet()
    imp = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
    pruned = to_pruned(prune_model_at_ratio(model, family_for(model), imp, 0.4), INFO)
    DDPMPipeline(unet=pruned, scheduler=DDPMScheduler(num_train_timesteps=20)).save_pretrained(
        root / "pruned", safe_serialization=True)
    attn = json.loads((root / "pruned" / "unet" / "pruning.json").read_text())["structure"][ATTN]
    assert (attn["heads"], attn["inner_dim"], attn["scale"]) == (8, 32, 0.5)  # the cases below rely on it
    return {"plain": root / "plain", "pruned": root / "pruned"}


# --------------------------------------------------------------------------- helpers


def _copy(sources, tmp_path, kind: str) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(sources[kind], folder)
    return folder


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    result = change(data)
    path.write_text(json.dumps(data if result is None else result))


def _edit_structure(folder: Path, module: str, **attrs) -> None:
    _edit_json(folder / "unet" / "pruning.json", lambda i: i["structure"][module].update(attrs))


def _edit_weights(folder: Path, change) -> None:
    path = folder / WEIGHTS
    state = load_file(path)
    change(state)
    save_file(state, path, metadata={"format": "pt"})


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _sample_argv(folder: Path, out: Path) -> list[str]:
    return ["sample", "--model", str(folder), "--output-dir", str(out), "--num-images", "1", "--steps", "2",
            "--batch-size", "1", "--no-progress"]


def _assert_refused(code: int, err: str, folder: Path, before: dict, *expect: str) -> str:
    """Exit 2, exactly one stderr line (the error), naming `expect`; input unchanged, nothing written."""
    lines = err.strip().splitlines()
    assert code == 2, (code, err[-3000:])
    assert "Traceback" not in err and len(lines) == 1 and "error:" in lines[0], err[-3000:]
    for text in expect:
        assert text in lines[0], (text, lines[0])
    assert _snapshot(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["model"]  # no output, lock or temp sibling
    return lines[0]


def _refused(folder: Path, capsys, *expect: str, argv: list[str] | None = None) -> str:
    before = _snapshot(folder)
    capsys.readouterr()  # only what this run prints counts
    code = cli.main(argv or _sample_argv(folder, folder.parent / "out"))
    return _assert_refused(code, capsys.readouterr().err, folder, before, *expect)


# --------------------------------------------------------------------------- model_index.json


def _index(change):
    return lambda folder: _edit_json(folder / "model_index.json", change)


def _write(name: str, text: str):
    return lambda folder: (folder / name).write_text(text)


DEEP = "[" * 100_000 + "]" * 100_000  # json.loads raises RecursionError on this


@pytest.mark.parametrize("edit, expect", [
    (_write("model_index.json", "{not json"), ("model_index.json", "not valid JSON")),
    (_write("model_index.json", "[1, 2]"), ("model_index.json", "JSON array, expected an object")),
    (_write("model_index.json", DEEP), ("model_index.json", "nested too deeply")),
    (_index(lambda i: i.update(scheduler="DDPMScheduler")), ("model_index.json", "'scheduler'", "allowed:")),
    (_index(lambda i: i.update(scheduler=["diffusers", "os.system"])), ("model_index.json", "os.system", "allowed:")),
    (_index(lambda i: i.update(scheduler=["diffusers", "is_torch_available"])),
     ("model_index.json", "is_torch_available", "allowed:")),
    (_index(lambda i: i.update(scheduler=["diffusers", "utils"])), ("model_index.json", "'utils'", "allowed:")),
    (_index(lambda i: i.update(scheduler=["os", "system"])), ("model_index.json", "'system'", "allowed:")),
    (_index(lambda i: i.update(_class_name="os.system")), ("model_index.json", "_class_name='os.system'", "allowed:")),
    (_index(lambda i: i.update({"../unet": ["diffusers", "UNet2DModel"]})), ("model_index.json", "'../unet'")),
], ids=["not-json", "a-list", "deeply-nested", "non-list-entry", "os.system", "module-function", "a-module",
        "os-library", "pipeline-class-os.system", "path-as-component"])
def test_hostile_model_index_is_refused_in_one_line(sources, tmp_path, capsys, edit, expect):
    folder = _copy(sources, tmp_path, "plain")
    edit(folder)
    _refused(folder, capsys, *expect)


# --------------------------------------------------------------------------- config.json / scheduler


def _config(change, name="unet/config.json"):
    return lambda folder: _edit_json(folder / name, change)


@pytest.mark.parametrize("edit, expect", [
    (_write("unet/config.json", DEEP), ("unet/config.json", "nested too deeply")),
    (_config(lambda c: c.update(sample_size=10**9)), ("unet/config.json", "sample_size=1000000000", "[1, 4096]")),
    (_config(lambda c: c.update(sample_size=[16, 10**9])), ("unet/config.json", "sample_size=[16, 1000000000]")),
    (_config(lambda c: c.update(layers_per_block=1e5)), ("unet/config.json", "layers_per_block=100000.0", "integer")),
    (_config(lambda c: c.update(norm_num_groups=0)), ("unet/config.json", "norm_num_groups=0", "allowed:")),
    (_config(lambda c: c.update(norm_num_groups=7)), ("unet/config.json", "does not describe a valid UNet2DModel")),
    (_config(lambda c: c.update(num_train_timesteps=10**12), "scheduler/scheduler_config.json"),
     ("scheduler_config.json", "num_train_timesteps=1000000000000", "allowed:")),
], ids=["deeply-nested", "absurd-sample-size", "absurd-sample-size-list", "float-layers-per-block",
        "zero-groups", "groups-not-dividing", "absurd-timesteps"])
def test_hostile_config_values_are_refused_in_one_line(sources, tmp_path, capsys, edit, expect):
    folder = _copy(sources, tmp_path, "plain")
    edit(folder)
    _refused(folder, capsys, *expect)


# --------------------------------------------------------------------------- pruning.json


@pytest.mark.parametrize("module, attrs, expect", [
    ("conv_in", {"groups": 0}, ("groups=0", "allowed: an integer")),
    ("conv_norm_out", {"num_groups": 8.0}, ("num_groups=8.0", "allowed: an integer")),
    ("conv_norm_out", {"num_groups": 4}, ("num_groups=4", "allowed: 8")),
    (ATTN, {"heads": 8.0}, ("heads=8.0", "allowed: an integer")),
    ("conv_in", {"out_channels": True}, ("out_channels=True", "allowed: an integer")),
], ids=["conv-groups-0", "float-num-groups", "other-num-groups", "float-heads", "bool-width"])
def test_pruning_json_values_are_checked_by_type_and_range(sources, tmp_path, capsys, module, attrs, expect):
    folder = _copy(sources, tmp_path, "pruned")
    _edit_structure(folder, module, **attrs)
    _refused(folder, capsys, "unet/pruning.json", *expect)


def _set_all_attentions(folder: Path, **attrs) -> None:
    def change(info):
        for entry in info["structure"].values():
            if entry["type"] == "Attention":
                entry.update(attrs)
        info["method"]["prune_heads"] = False  # what `diffprune prune` records for head-dim pruning
    _edit_json(folder / "unet" / "pruning.json", change)


@pytest.mark.parametrize("edit, expect", [
    (lambda f: _edit_structure(f, ATTN, scale=1e30), (f"'{ATTN}'", "scale=1e+30", "allowed: 0.5")),
    (lambda f: _edit_structure(f, ATTN, scale=0), (f"'{ATTN}'", "scale=0", "allowed:")),
    (lambda f: (f / "unet/pruning.json").write_text(
        (f / "unet/pruning.json").read_text().replace('"scale": 0.5', '"scale": Infinity')), ("scale=inf", "allowed:")),
    (lambda f: _edit_structure(f, ATTN, scale=0.25), (f"'{ATTN}'", "scale=0.25", "allowed: 0.5")),
    (lambda f: _edit_structure(f, ATTN, heads=2, scale=16**-0.5), (f"'{ATTN}'", "heads=2", "allowed: 8 or 4")),
    (lambda f: _edit_structure(f, ATTN, heads=4, scale=8**-0.5),
     (f"'{ATTN}'", "heads=4", "one rule for every attention")),
    (lambda f: _set_all_attentions(f, heads=4, scale=8**-0.5), ("heads=4", "prune_heads=False")),
    (lambda f: _edit_structure(f, ATTN, inner_dim=16), (f"'{ATTN}'", "inner_dim=16", "allowed: 32")),
], ids=["scale-1e30", "scale-0", "scale-infinity", "scale-other", "heads-neither-rule", "heads-mixed-rules",
        "heads-against-recorded-rule", "inner-dim"])
def test_attention_attributes_must_agree_with_tensors_and_pruning_rule(sources, tmp_path, capsys, edit, expect):
    """Edits that keep every tensor shape but would change what the attention computes."""
    folder = _copy(sources, tmp_path, "pruned")
    edit(folder)
    _refused(folder, capsys, "unet/pruning.json", *expect)


@pytest.mark.parametrize("command", ["prune", "finetune"])
def test_other_commands_refuse_before_writing(sources, tmp_path, capsys, command):
    folder = _copy(sources, tmp_path, "pruned")
    _edit_structure(folder, "conv_norm_out", num_groups=8.0)
    argv = [command, "--model", str(folder), "--data", "digits", "--output-dir", str(tmp_path / "out")]
    _refused(folder, capsys, "unet/pruning.json", "num_groups=8.0", argv=argv)


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("kind", ["plain", "pruned"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weights_are_refused_naming_the_tensor(sources, tmp_path, capsys, kind, value):
    folder = _copy(sources, tmp_path, kind)

    def poison(state):
        state["mid_block.resnets.0.conv1.weight"][0, 0, 0, 0] = value
    _edit_weights(folder, poison)
    _refused(folder, capsys, WEIGHTS, "'mid_block.resnets.0.conv1.weight'", "NaN/infinite", "allowed: finite")


@pytest.mark.parametrize("kind", ["plain", "pruned"])
def test_weights_dtype_one_float_dtype_is_cast_mixed_is_refused(sources, tmp_path, capsys, kind):
    """Decision (model_checks docstring): a file in one float dtype is loaded as the model's dtype
    (float32 here, as config.json's torch_dtype says); a file mixing float dtypes is refused."""
    folder = _copy(sources, tmp_path, kind)
    _edit_json(folder / "unet" / "config.json", lambda c: c.update(torch_dtype="float32"))
    half = {k: v.half() for k, v in load_file(folder / WEIGHTS).items()}
    save_file(half, folder / WEIGHTS, metadata={"format": "pt"})
    unet = load_pipeline(folder).unet
    for key, tensor in unet.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, half[key].float()), key

    _edit_weights(folder, lambda s: s.update({"conv_in.weight": s["conv_in.weight"].float()}))
    _refused(folder, capsys, WEIGHTS, "'conv_in.weight' is F32", "is F16", "allowed: one float dtype")


# --------------------------------------------------------------------------- memory (subprocess)

# The child runs the CLI in-process and reports its own peak RSS (ru_maxrss: KiB on Linux).
CHILD = ("import resource, sys; from diffprune import cli; code = cli.main(sys.argv[1:]); "
         "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True); sys.exit(code)")


@pytest.mark.parametrize("kind, change, expect", [
    ("plain", {"block_out_channels": [2048, 4096]}, ("unet/config.json", "GiB", "DIFFPRUNE_MAX_MODEL_BYTES=")),
    # building a pruned folder's base allocates its largest base-width parameter (here 1.2 GB) at once (issue 27)
    ("pruned", {"block_out_channels": [2048, 4096]}, ("unet/config.json", "GiB", "DIFFPRUNE_MAX_MODEL_BYTES=")),
    ("plain", {"layers_per_block": 100_000}, ("unet/config.json", "more than 20000 modules", "allowed:")),
    ("pruned", {"layers_per_block": 100_000}, ("unet/config.json", "more than 20000 modules", "allowed:")),
], ids=["plain-wide", "pruned-wide", "plain-deep", "pruned-deep"])
def test_huge_configs_are_refused_before_allocating(sources, tmp_path, kind, change, expect):
    """Measured before the fix: the pruned wide case allocated ~7.5 GB, the deep one ~15 GB in 500 s."""
    folder = _copy(sources, tmp_path, kind)
    _edit_json(folder / "unet" / "config.json", lambda c: c.update(change))
    before = _snapshot(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFPRUNE_MAX_MODEL_BYTES": str(GIB)}
    proc = subprocess.run([sys.executable, "-c", CHILD, *_sample_argv(folder, tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=180)
    peak = int(next(ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("PEAK_KIB"))) * 1024
    _assert_refused(proc.returncode, proc.stderr, folder, before, *expect)
    assert peak < 1.5 * GIB, peak


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5e9"])
def test_memory_limit_override_must_be_a_byte_count(sources, tmp_path, capsys, monkeypatch, value):
    folder = _copy(sources, tmp_path, "plain")
    monkeypatch.setenv("DIFFPRUNE_MAX_MODEL_BYTES", value)
    _refused(folder, capsys, f"DIFFPRUNE_MAX_MODEL_BYTES={value!r}", "allowed: a number of bytes")


def test_memory_limit_override_refuses_a_model_just_over_it(sources, tmp_path, capsys, monkeypatch):
    folder = _copy(sources, tmp_path, "plain")
    monkeypatch.setenv("DIFFPRUNE_MAX_MODEL_BYTES", "1000000")  # the tiny UNet needs ~5.6 MB
    line = _refused(folder, capsys, "unet/config.json", "DIFFPRUNE_MAX_MODEL_BYTES=1000000")
    assert "needs about 5." in line and "MiB" in line, line


# Released folders' model_index.json, as on the hub: options that are not components (DiT's id2label
# dict, requires_safety_checker), a class from a diffusers pipeline module (the SD safety checker, a
# transformers model), an optional component left empty, a deprecated transformers name.
RELEASED_INDEXES = {
    "dit": {"_class_name": "DiTPipeline", "_diffusers_version": "0.12.0.dev0",
            "id2label": {"0": "tench, Tinca tinca", "1": "goldfish, Carassius auratus"},
            "scheduler": ["diffusers", "DDIMScheduler"], "transformer": ["diffusers", "Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"]},
    "sd15": {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
             "feature_extractor": ["transformers", "CLIPImageProcessor"],
             "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
             "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "requires_safety_checker": True, "image_encoder": [None, None]},
    "sd14": {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.2.2",
             "feature_extractor": ["transformers", "CLIPFeatureExtractor"],
             "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
             "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]},
}


@pytest.mark.parametrize("name", sorted(RELEASED_INDEXES))
def test_released_model_indexes_are_accepted(name, tmp_path):
    from diffprune.io.model_checks import read_model_index

    index = RELEASED_INDEXES[name]
    for component, entry in index.items():
        if isinstance(entry, list) and entry[0] is not None:
            (tmp_path / component).mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    classes = read_model_index(tmp_path)
    assert "id2label" not in classes and "requires_safety_checker" not in classes
    assert classes.get("image_encoder", None) is None
    if "safety_checker" in index:
        assert classes["safety_checker"].__name__ == "StableDiffusionSafetyChecker"


def test_a_module_pair_in_an_option_slot_is_still_checked(tmp_path):
    """An entry shaped like [library, class] is checked even where the pipeline expects an option."""
    from diffprune.io.model_checks import read_model_index

    for component in ("scheduler", "transformer", "vae"):
        (tmp_path / component).mkdir()
    index = {**RELEASED_INDEXES["dit"], "id2label": ["os", "system"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(DiffpruneError, match="id2label"):
        read_model_index(tmp_path)
