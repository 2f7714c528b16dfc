"""Property test (issue 27, item 9): random but structurally valid files of every kind diffprune reads, fed to
the command that reads them, end in exit 0 or 2 with one line, never a traceback or "internal error", and a
refused run leaves no output (nor a temp or lock file) and every input byte-identical.

Files: prompt-embeddings safetensors (random dtypes, shapes, values, metadata), captions.jsonl /
captions.txt, DiT class labels (--class-labels and class-folder names), pruning.json, sample_config.json and
the JSON inputs of `report` (prune report and config, evaluation.json, finetune config and train log).
Tiny models are built once per module; examples are bounded and derandomized, so the file runs in seconds.
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, save_tiny_pipeline, sd_pipeline, tiny_kl, tiny_unet
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file
from test_report import _evaluation
from test_safety import leftovers, tree_hashes

from diffprune.errors import DiffpruneError
from diffprune.families.conditioning import encode_prompts_file
from diffprune.families.prompt_embeds import FORMAT, LAYOUTS, RANKS
from diffprune.io import load_pipeline

PROMPT = "a red cat"
SETTINGS = dict(deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
_COUNTER = itertools.count()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Inputs of every kind, written once: an SD pipeline with and without its text encoder, an image folder,
    a DDPM pipeline, it pruned, its samples and a fine-tune run, a DiT pipeline, and two evaluation files."""
    root = tmp_path_factory.mktemp("hostile_properties")
    pipe = sd_pipeline()
    pipe.save_pretrained(root / "sd_full", safe_serialization=True)
    pipe.register_modules(text_encoder=None, tokenizer=None)
    pipe.save_pretrained(root / "sd_bare", safe_serialization=True)
    encode_prompts_file(load_pipeline(root / "sd_full"), root / "e.safetensors", [PROMPT])
    images = root / "imgs"
    (images / "sub").mkdir(parents=True)
    for name in ("0.png", "sub/1.png"):
        Image.fromarray(np.full((16, 16, 3), 99, np.uint8)).save(images / name)

    unet = tiny_unet(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4)
    save_tiny_pipeline(root / "ddpm", unet=unet, num_train_timesteps=10)
    for argv in (["prune", "--model", root / "ddpm", "--output-dir", root / "pruned", "--method", "magnitude",
                  "--ratio", "0.3", "--batch-size", "2"],
                 ["sample", "--model", root / "ddpm", "--output-dir", root / "samples", "--num-images", "2",
                  "--steps", "1", "--no-progress"],
                 ["finetune", "--model", root / "pruned", "--data", "digits", "--output-dir", root / "ft",
                  "--steps", "2", "--batch-size", "2", "--no-tensorboard", "--no-progress"]):
        from diffprune.cli import main

        assert main([str(a) for a in argv]) == 0, argv
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(4)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    DiTPipeline(transformer=dit, vae=tiny_kl(), scheduler=DDIMScheduler(num_train_timesteps=10)).save_pretrained(
        root / "dit", safe_serialization=True)
    for name, student in (("student.json", True), ("teacher.json", False)):
        (root / name).write_text(json.dumps(_evaluation(student)))
    return root


def _fresh(root: Path, name: str) -> Path:
    return root / "runs" / f"{name}{next(_COUNTER)}"


def _check(code, err: str, outputs: list[Path], inputs: dict, roots: list[Path]) -> None:
    """Exit 0 or 2; no traceback, no internal error; refused: one line, no output; inputs untouched."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    event(f"exit {code}")  # pytest --hypothesis-show-statistics: how often each outcome is reached
    assert code in (0, 2), (code, err[-2000:])
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    if code == 2:
        assert len(lines) == 1 and "error:" in lines[0], err[-2000:]
        assert not any(p.exists() for p in outputs), (outputs, lines)
    assert tree_hashes(*roots) == inputs
    for root in roots:
        assert not leftovers(root.parent), leftovers(root.parent)


# --------------------------------------------------------------------------- JSON values and mutations


JSON_SCALARS = (st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=8)
                | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0, 1, -1, 1.5, "", "1", 2**63]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                              max_size=3),
                           max_leaves=6)


@st.composite
def mutated(draw, document):
    """`document` (parsed JSON) with one value replaced, one key deleted or one key added, at a random depth."""
    doc = copy.deepcopy(document)
    node = doc
    for _ in range(draw(st.integers(0, 3))):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        nested = [k for k in keys if isinstance(node[k], dict | list) and node[k]]
        if not nested:
            break
        node = node[draw(st.sampled_from(nested))]
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if action == "add" or not keys:
        if isinstance(node, dict):
            node[draw(st.text(max_size=6))] = draw(JSON_VALUES)
        else:
            node.append(draw(JSON_VALUES))
    elif action == "delete":
        del node[draw(st.sampled_from(keys))]
    else:
        node[draw(st.sampled_from(keys))] = draw(JSON_VALUES)
    return doc


def _mutate_file(data, path: Path, document) -> None:
    path.write_text(json.dumps(data.draw(mutated(document))))


# --------------------------------------------------------------------------- prompt embeddings


FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
OTHER_DTYPES = [torch.int64, torch.uint8, torch.bool, torch.int8, torch.float8_e4m3fn]
VALUES = {"normal": lambda s: torch.randn(s), "zeros": torch.zeros, "ten": lambda s: torch.full(s, 10.0)}
BAD_VALUES = {"inf": lambda s: torch.full(s, float("inf")), "nan": lambda s: torch.full(s, float("nan")),
              "1e5": lambda s: torch.full(s, 1e5)}
PARTS = ("layout", "prompts", "names", "rank", "rows", "width", "dtype", "values", "format", "version",
         "meta_prompts", "keys", "source", "drop")


@st.composite
def embeddings_files(draw):
    """(tensors, metadata) of a prompt-embeddings file for the tiny SD UNet: right, except for 0-2 parts
    (PARTS) drawn at random, each then made wrong in a random way; dtypes and values vary anyway."""
    broken = set(draw(st.lists(st.sampled_from(PARTS), max_size=2, unique=True)))
    layout = draw(st.sampled_from(["sdxl", "pixart", "sd3", "junk"])) if "layout" in broken else "sd"
    prompts = ["", PROMPT, *draw(st.lists(st.text(max_size=6), max_size=2, unique=True))]
    prompts = list(dict.fromkeys(draw(st.permutations(prompts))))
    if "prompts" in broken:
        prompts = draw(st.lists(st.text(max_size=6), max_size=3, unique=True))
    names = list(LAYOUTS.get(layout, ("prompt_embeds",)))
    if "names" in broken:
        names = names[:-1] if len(names) > 1 else [*names, "pooled_prompt_embeds"]
    tensors = {}
    for name in names:
        rank = RANKS[name] + (draw(st.sampled_from([-1, 1])) if "rank" in broken else 0)
        dims = [draw(st.integers(0, 5)) if "rows" in broken else len(prompts)]
        for i in range(1, rank):
            if i == 1 and rank == 3:
                dims.append(draw(st.sampled_from([12, 3, 1, 0] if "width" in broken else [12, 3, 1])))
            else:
                dims.append(draw(st.sampled_from([8, 15, 0])) if "width" in broken else 16)
        kind = draw(st.sampled_from(sorted(BAD_VALUES))) if "values" in broken else draw(st.sampled_from(
            sorted(VALUES)))
        torch.manual_seed(draw(st.integers(0, 9)))
        values = {**VALUES, **BAD_VALUES}[kind](tuple(dims))
        dtype = draw(st.sampled_from(OTHER_DTYPES if "dtype" in broken else FLOATS))
        tensors[name] = values.to(dtype) if name != "prompt_attention_mask" else (values > 0).to(dtype)
    meta = {"format": draw(st.sampled_from(["pt", "", FORMAT + "x"])) if "format" in broken else FORMAT,
            "format_version": draw(st.sampled_from(["2", "x", "1.0"])) if "version" in broken else "1",
            "layout": layout,
            "prompts": draw(st.sampled_from(["{", "{}", "[1]", '"x"'])) if "meta_prompts" in broken
            else json.dumps(prompts),
            "keys": draw(st.sampled_from(["[", "[]", "3", '["x"]'])) if "keys" in broken else json.dumps(names),
            "source": draw(st.sampled_from(["[]", "nope", "1"])) if "source" in broken else "{}"}
    drop = draw(st.sampled_from(sorted(meta))) if "drop" in broken else None
    return tensors, {k: v for k, v in meta.items() if k != drop}


@settings(max_examples=30, **SETTINGS)
@given(data=embeddings_files())
def test_random_prompt_embeddings_files(made, capsys, data):
    tensors, meta = data
    path = _fresh(made, "embeds")
    path.parent.mkdir(exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    out = _fresh(made, "sample")
    before = tree_hashes(made / "sd_bare")
    code, err = run_cli(["sample", "--model", made / "sd_bare", "--prompt-embeds", path, "--prompt", PROMPT,
                         "--num-images", "1", "--steps", "1", "--no-progress", "--output-dir", out], capsys)
    _check(code, err, [out], before, [made / "sd_bare"])


# --------------------------------------------------------------------------- captions


CAPTION_NAMES = st.sampled_from(["0.png", "sub/1.png", "0.png", "missing.png", "sub", "", " 0.png", "../0.png"])


@st.composite
def captions_files(draw):
    """(file name, text) of a captions.jsonl or captions.txt beside the images."""
    if draw(st.booleans()):
        rows = draw(st.lists(st.one_of(
            st.builds(lambda n, t: json.dumps({"file_name": n, "text": t}), CAPTION_NAMES, st.text(max_size=12)),
            st.builds(lambda n, t: json.dumps({"file_name": n, "text": t}), CAPTION_NAMES, JSON_VALUES),
            JSON_VALUES.map(json.dumps), st.text(max_size=10), st.just("")), min_size=0, max_size=4))
        return "captions.jsonl", "\n".join(rows) + "\n"
    rows = draw(st.lists(st.one_of(st.builds(lambda n, t: f"{n}\t{t}", CAPTION_NAMES, st.text(max_size=12)),
                                   st.text(max_size=10)), max_size=4))
    return "captions.txt", "\n".join(rows) + "\n"


@settings(max_examples=15, **SETTINGS)
@given(data=captions_files())
def test_random_captions_files(made, capsys, data):
    name, text = data
    folder = _fresh(made, "imgs")
    shutil.copytree(made / "imgs", folder)
    (folder / name).write_text(text, encoding="utf-8", errors="surrogatepass")
    out = _fresh(made, "captions") / "e.safetensors"
    out.parent.mkdir(parents=True)
    before = tree_hashes(folder, made / "sd_full")
    code, err = run_cli(["encode-prompts", "--model", made / "sd_full", "--data", folder, "--output", out], capsys)
    _check(code, err, [out], before, [folder, made / "sd_full"])


# --------------------------------------------------------------------------- class labels


LABEL_TEXT = st.one_of(st.lists(st.integers(-2, 12), min_size=1, max_size=4).map(lambda v: ",".join(map(str, v))),
                       st.text(alphabet="0123456789,, -+_.x²٣١", max_size=8))


@settings(max_examples=12, **SETTINGS)
@given(labels=LABEL_TEXT)
def test_random_class_labels(made, capsys, labels):
    out = _fresh(made, "dit")
    before = tree_hashes(made / "dit")
    code, err = run_cli(["sample", "--model", made / "dit", "--class-labels", labels, "--num-images", "1",
                         "--steps", "1", "--no-progress", "--output-dir", out], capsys)
    _check(code, err, [out], before, [made / "dit"])


@settings(max_examples=60, **SETTINGS)
@given(names=st.lists(st.text(alphabet="0123456789²٣x-", min_size=0, max_size=4), min_size=1, max_size=4),
       classes=st.integers(1, 20), fallback=st.sampled_from(["random", "null"]))
def test_random_class_folder_names(tmp_path, names, classes, fallback):
    from diffprune.families.dit import labels_for_dataset

    paths = [tmp_path / n / f"{i}.png" if n else tmp_path / f"{i}.png" for i, n in enumerate(names)]
    dataset = type("Images", (), {"paths": paths, "__len__": lambda self: len(paths)})()
    labels = labels_for_dataset(dataset, str(tmp_path), None, classes, seed=0, fallback=fallback)
    assert len(labels) == len(names) and all(0 <= v <= classes for v in labels)


# --------------------------------------------------------------------------- pruning.json, sample_config.json


@settings(max_examples=20, **SETTINGS)
@given(data=st.data())
def test_random_pruning_json(made, capsys, data):
    folder = _fresh(made, "pruned")
    shutil.copytree(made / "pruned", folder)
    record = folder / "unet" / "pruning.json"
    _mutate_file(data, record, json.loads(record.read_text()))
    out = _fresh(made, "sample")
    before = tree_hashes(folder)
    code, err = run_cli(["sample", "--model", folder, "--num-images", "1", "--steps", "1", "--no-progress",
                         "--output-dir", out], capsys)
    _check(code, err, [out], before, [folder])


@settings(max_examples=15, **SETTINGS)
@given(data=st.data())
def test_random_sample_config_json(made, capsys, data):
    folder = _fresh(made, "samples")
    shutil.copytree(made / "samples", folder)
    config = folder / "sample_config.json"
    _mutate_file(data, config, json.loads(config.read_text()))
    before = tree_hashes(folder)
    out = _fresh(made, "report")
    code, err = run_cli(["report", "--teacher-samples", folder, "--student-samples", folder, "--output-dir", out],
                        capsys)
    _check(code, err, [out], before, [folder])
    code, err = run_cli(["sample", "--model", made / "ddpm", "--output-dir", folder, "--num-images", "2",
                         "--steps", "1", "--no-progress", "--resume"], capsys)
    if code != 0:  # a refused resume leaves the folder as it was
        _check(code, err, [], before, [folder])
    else:
        assert "Traceback" not in err and (folder / "samples.npz").is_file()


# --------------------------------------------------------------------------- the JSON inputs of report


REPORT_FILES = ["pruned/prune_report.json", "pruned/prune_config.json", "ft/finetune_config.json",
                "ft/train_log.json", "student.json", "teacher.json"]


@settings(max_examples=8, **SETTINGS)  # a report run costs ~1.3 s (figures)
@given(which=st.sampled_from(REPORT_FILES), data=st.data())
def test_random_report_inputs(made, capsys, which, data):
    root = _fresh(made, "reportin")
    root.mkdir(parents=True)
    for name in ("pruned", "ft"):
        (root / name).mkdir()
        for f in (made / name).glob("*.json"):
            shutil.copy(f, root / name / f.name)
    for name in ("student.json", "teacher.json"):
        shutil.copy(made / name, root / name)
    _mutate_file(data, root / which, json.loads((root / which).read_text()))
    before = tree_hashes(root)
    out = _fresh(made, "report")
    code, err = run_cli(["report", "--prune", root / "pruned", "--finetune", root / "ft", "--evaluation",
                         root / "student.json", "--teacher-evaluation", root / "teacher.json", "--output-dir", out,
                         "--title", data.draw(st.text(max_size=20) | st.just("<script>alert(1)</script>"))], capsys)
    _check(code, err, [out], before, [root])
    if code == 0:
        assert "<" not in (out / "report.md").read_text()  # every text is escaped (issue 27)


def test_a_refusal_is_a_diffprune_error(made):
    """The strategies reach the refusals they are meant to (a sanity check of the generators)."""
    from diffprune.families.prompt_embeds import read_prompt_embeds

    path = made / "runs" / "bool.safetensors"
    path.parent.mkdir(exist_ok=True)
    tensors = {"prompt_embeds": torch.zeros(2, 12, 16, dtype=torch.bool)}
    save_file(tensors, str(path), metadata={"format": FORMAT, "format_version": "1", "layout": "sd",
                                            "prompts": json.dumps(["", PROMPT]), "keys": '["prompt_embeds"]',
                                            "source": "{}"})
    with pytest.raises(DiffpruneError, match="prompt_embeds is bool"):
        read_prompt_embeds(path)
