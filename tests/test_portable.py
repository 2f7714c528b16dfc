"""`--portable` folders (io/portable.py, io/portable_template.py): pruned DDPM, Stable Diffusion and DiT pipelines
load with plain diffusers in a subprocess where `import diffprune` fails, through
`DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` and `AutoModel.from_pretrained(...)`,
and generate bit-identical images to `diffprune.load_pipeline`; the default stays code-free."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler
from safetensors.numpy import load_file as load_np
from test_families import INFO, build_pipeline

from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.families.pipeline_parts import denoiser_of
from diffprune.io import load_pipeline, load_unet, save_pipeline, to_pruned
from diffprune.io.portable import PORTABLE_MODULE, make_portable
from diffprune.prune.importance import ImportanceResult
from diffprune.prune.pruning import prune_model_at_ratio

MAGNITUDE = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
from test_sd3 import tiny_pipeline as tiny_sd3_pipeline  # noqa: E402 - SD3 (flow matching, MMDiT)
from test_sdxl import tiny_sdxl  # noqa: E402 - the tiny SDXL pipeline built in that test

KINDS = ("ddpm", "sd", "dit", "dit_residual", "sdxl", "sd3")
# How each kind generates: the same call in the subprocess (plain diffusers) and here (diffprune).
CALLS = {"ddpm": "dict(batch_size=2, num_inference_steps=3)",
         "sd": "dict(prompt=['a red cat', 'a dog'], negative_prompt=['blurry', ''], guidance_scale=3.0, "
               "num_inference_steps=3)",
         "dit": "dict(class_labels=[1, 7], guidance_scale=1.0, num_inference_steps=3)"}
CALLS["dit_residual"], CALLS["sdxl"], CALLS["sd3"] = CALLS["dit"], CALLS["sd"], CALLS["sd"]


def _pruned_pipeline(kind: str):
    if kind == "ddpm":
        pipe = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000))
    elif kind == "sdxl":
        pipe = tiny_sdxl()
    elif kind == "sd3":
        pipe = tiny_sd3_pipeline()
    else:
        pipe = build_pipeline("dit" if kind.startswith("dit") else kind)
    component, model = denoiser_of(pipe)
    extra = {"prune_residual": True} if kind == "dit_residual" else {}
    pruned = prune_model_at_ratio(model, family_for(model), MAGNITUDE, 0.5, **extra)
    pipe.register_modules(**{component: to_pruned(pruned, {**INFO, "base_class": type(model).__name__})})
    return pipe, component


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{kind: (portable folder, code-free folder, denoiser component)}."""
    root = tmp_path_factory.mktemp("portable")
    out = {}
    for kind in KINDS:
        pipe, component = _pruned_pipeline(kind)
        save_pipeline(pipe, root / f"{kind}_portable", portable=True)
        save_pipeline(pipe, root / f"{kind}_plain")
        out[kind] = (root / f"{kind}_portable", root / f"{kind}_plain", component)
    return out


def _generate(pipe, kind: str) -> np.ndarray:
    call = eval(CALLS[kind])  # noqa: S307 - the literal dicts above
    return pipe(**call, generator=torch.Generator().manual_seed(0), output_type="np").images


# Runs with diffusers alone: a meta-path finder makes `import diffprune` fail before anything else runs.
_BLOCKER = """
import sys

class _NoDiffprune:
    def find_spec(self, name, path=None, target=None):
        if name == "diffprune" or name.startswith("diffprune."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, _NoDiffprune())
"""

_PLAIN = """
import json, sys
import numpy as np
import torch
from safetensors.numpy import save_file

torch.set_num_threads(1)
try:
    import diffprune  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("diffprune is importable; the test would prove nothing")
from diffusers import AutoModel, DiffusionPipeline

jobs, out = json.loads(sys.argv[1]), sys.argv[2]
arrays, notes = {}, {}
for kind, (folder, component, call, resave) in jobs.items():
    try:
        DiffusionPipeline.from_pretrained(folder)
        notes[kind + "/untrusted"] = "loaded"
    except ValueError as err:
        notes[kind + "/untrusted"] = str(err)
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    model = getattr(pipe, component)
    alone = AutoModel.from_pretrained(folder + "/" + component, trust_remote_code=True)
    notes[kind + "/class"] = [type(model).__name__, type(alone).__name__]
    arrays[kind + "/images"] = pipe(**eval(call), generator=torch.Generator().manual_seed(0), output_type="np").images
    for name, tensor in alone.state_dict().items():
        arrays[kind + "/state/" + name] = tensor.numpy()
    pipe.save_pretrained(resave)  # a pipeline loaded from the portable folder saves a portable folder
    again = DiffusionPipeline.from_pretrained(resave, trust_remote_code=True)
    arrays[kind + "/resaved"] = again(**eval(call), generator=torch.Generator().manual_seed(0), output_type="np").images
    notes[kind + "/resaved_index"] = json.load(open(resave + "/model_index.json"))[component]
save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, out + "/arrays.safetensors")
json.dump({**notes, "diffprune_imported": "diffprune" in sys.modules}, open(out + "/notes.json", "w"))
"""


@pytest.fixture(scope="module")
def plain_run(folders, tmp_path_factory):
    """Arrays and notes from one subprocess that loads every portable folder with diffusers alone."""
    out = tmp_path_factory.mktemp("plain_out")
    (out / "sitecustomize.py").write_text(textwrap.dedent(_BLOCKER))
    jobs = {kind: (str(portable), component, CALLS[kind], str(out / f"{kind}_resaved"))
            for kind, (portable, _, component) in folders.items()}
    env = {**os.environ, "PYTHONPATH": str(out), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _PLAIN, json.dumps(jobs), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_np(str(out / "arrays.safetensors")), json.loads((out / "notes.json").read_text())


@pytest.mark.parametrize("kind", KINDS)
def test_plain_diffusers_loads_it_bit_identically(kind, folders, plain_run):
    arrays, notes = plain_run
    portable, plain, component = folders[kind]
    assert notes["diffprune_imported"] is False
    pruned_name = type(getattr(load_pipeline(plain), component)).__name__
    assert notes[f"{kind}/class"] == [pruned_name, pruned_name]
    expected = _generate(load_pipeline(plain), kind)
    assert np.array_equal(arrays[f"{kind}/images"], expected)
    assert np.array_equal(arrays[f"{kind}/resaved"], expected)
    assert notes[f"{kind}/resaved_index"] == [PORTABLE_MODULE, pruned_name]
    state = load_unet(plain / component).state_dict()
    theirs = {k[len(f"{kind}/state/"):]: v for k, v in arrays.items() if k.startswith(f"{kind}/state/")}
    assert sorted(theirs) == sorted(state)
    assert all(np.array_equal(theirs[k], v.numpy()) for k, v in state.items())
    assert "trust_remote_code=True" in notes[f"{kind}/untrusted"]  # the trade-off: code runs only when allowed


@pytest.mark.parametrize("kind", ("sd", "dit"))
def test_diffprune_reads_a_portable_folder_without_running_its_code(kind, folders, tmp_path):
    import shutil

    portable, plain, component = folders[kind]
    folder = tmp_path / "p"
    shutil.copytree(portable, folder)
    (folder / component / f"{PORTABLE_MODULE}.py").write_text("raise RuntimeError('the shipped code ran')\n")
    pipe = load_pipeline(folder)
    assert type(getattr(pipe, component)).__module__ == "diffprune.io"
    assert np.array_equal(_generate(pipe, kind), _generate(load_pipeline(plain), kind))
    assert PORTABLE_MODULE not in sys.modules
    again = load_unet(folder / component)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                 getattr(pipe, component).state_dict().values(), strict=True))


def test_plain_loading_also_works_beside_diffprune(folders):
    from diffusers import AutoModel, DiffusionPipeline

    portable, plain, component = folders["dit"]
    pipe = DiffusionPipeline.from_pretrained(portable, trust_remote_code=True)
    assert type(pipe.transformer).__module__ == PORTABLE_MODULE  # the shipped class, not diffprune's
    assert np.array_equal(_generate(pipe, "dit"), _generate(load_pipeline(plain), "dit"))
    alone = AutoModel.from_pretrained(str(portable / component), trust_remote_code=True)  # a str: diffusers joins it
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(),
                                                 pipe.transformer.state_dict().values(), strict=True))


def test_a_portable_entry_naming_another_class_is_refused(folders, tmp_path):
    import shutil

    portable, _, component = folders["sd"]
    folder = tmp_path / "p"
    shutil.copytree(portable, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index[component] = [PORTABLE_MODULE, "ModelMixin"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(DiffpruneError, match="declared as ModelMixin") as info:
        load_pipeline(folder)
    assert "\n" not in str(info.value)
    (folder / component / "pruning.json").unlink()
    with pytest.raises(DiffpruneError, match="ModelMixin") as info:
        load_pipeline(folder)
    assert "\n" not in str(info.value)


def test_default_is_code_free(folders):
    _, plain, component = folders["sd"]
    assert not list(plain.rglob("*.py"))
    assert json.loads((plain / "model_index.json").read_text())[component][0] == "diffprune.io"
    assert "auto_map" not in json.loads((plain / component / "config.json").read_text())


def test_portable_files(folders):
    portable, _, component = folders["sd"]
    index = json.loads((portable / "model_index.json").read_text())
    assert index[component] == [PORTABLE_MODULE, "PrunedUNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]  # unpruned components are left as they are
    config = json.loads((portable / component / "config.json").read_text())
    assert config["auto_map"] == {"AutoModel": f"{PORTABLE_MODULE}.PrunedUNet2DConditionModel"}
    code = (portable / component / f"{PORTABLE_MODULE}.py").read_text()
    assert "import diffprune" not in code and "from diffprune" not in code
    assert [p.name for p in portable.rglob("*.py")] == [f"{PORTABLE_MODULE}.py"]


def test_template_matches_diffprune():
    from diffprune import io
    from diffprune.io import portable_template, structure
    from diffprune.io.portable import PORTABLE_CLASSES

    assert portable_template.SHAPE_ATTRS == structure.SHAPE_ATTRS
    assert (portable_template.PRUNING_FILE, portable_template.WEIGHTS_FILE, portable_template.CONFIG_FILE) == \
        (io.PRUNING_FILE, io.WEIGHTS_FILE, io.CONFIG_FILE)
    assert portable_template.FORMAT == (io.FORMAT_NAME, io.FORMAT_VERSION)
    assert sorted(PORTABLE_CLASSES) == sorted(c.__name__ for c in io.PRUNED_CLASSES.values())
    assert all(getattr(portable_template, name).base_class is getattr(io, name).base_class for name in PORTABLE_CLASSES)


def test_template_reads_a_hub_repository(folders, monkeypatch):
    """A portable folder pushed to the hub: the shipped module fetches its three files by name."""
    import huggingface_hub

    from diffprune.io import portable_template

    portable, plain, component = folders["sd"]
    calls = []

    def fake_download(repo_id, filename, subfolder=None, **kwargs):
        calls.append((repo_id, filename, subfolder, kwargs))
        return str(portable / subfolder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = portable_template.PrunedUNet2DConditionModel.from_pretrained("someone/pruned-sd", subfolder=component,
                                                                         revision="v1", cache_dir=None)
    assert [c[1] for c in calls] == ["config.json", "pruning.json", "diffusion_pytorch_model.safetensors"]
    assert all(c[0] == "someone/pruned-sd" and c[2] == component and c[3]["revision"] == "v1" for c in calls)
    expected = load_unet(plain / component).state_dict()
    assert all(torch.equal(a, expected[k]) for k, a in model.state_dict().items())


def test_make_portable_on_other_folders(tiny_pipeline_dir, tmp_path):
    assert make_portable(tiny_pipeline_dir) == []  # nothing pruned: already loads with plain diffusers
    assert not list(tiny_pipeline_dir.rglob("*.py"))
    with pytest.raises(DiffpruneError, match="nothing to make portable"):
        make_portable(tmp_path)


def test_prune_and_finetune_cli_write_portable_folders(tiny_pipeline_dir, tmp_path, capsys):
    from conftest import run_cli

    pruned, tuned = tmp_path / "pruned", tmp_path / "tuned"
    code, err = run_cli(["prune", "--model", tiny_pipeline_dir, "--method", "magnitude", "--ratio", "0.3",
                         "--batch-size", "4", "--portable", "--output-dir", pruned], capsys)
    assert code == 0, err
    code, err = run_cli(["finetune", "--model", pruned, "--data", "digits", "--steps", "1", "--batch-size", "2",
                         "--no-progress", "--no-tensorboard", "--portable", "--output-dir", tuned], capsys)
    assert code == 0, err  # a portable folder is also an input diffprune reads
    for folder, stage in ((pruned, "prune"), (tuned, "finetune")):
        assert json.loads((folder / "model_index.json").read_text())["unet"] == [PORTABLE_MODULE, "PrunedUNet2DModel"]
        assert (folder / "unet" / f"{PORTABLE_MODULE}.py").is_file()
        assert json.loads((folder / f"{stage}_config.json").read_text())["portable"] is True
        assert type(load_pipeline(folder).unet).__name__ == "PrunedUNet2DModel"
