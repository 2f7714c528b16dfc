"""Precomputed prompt embeddings (`--prompt-embeds`, families/prompt_embeds.py): for SD, SDXL, PixArt and SD3,
conditioning from the file equals encoding with the pipeline's encoders bit for bit, and fine-tuning / sampling
a folder without text encoders gives exactly the weights and images of the folder with them (issue 16)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli, sd_pipeline, tiny_unet
from PIL import Image
from safetensors.torch import save_file

from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.families.conditioning import attach_for_sampling, context_for
from diffprune.families.prompt_embeds import read_prompt_embeds, write_prompt_embeds
from diffprune.io import load_pipeline
from diffprune.sample.loop import load_samples

TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
PROMPT, NEGATIVE = "a red cat", "blurry"


def _builder(family: str):
    if family == "sd":
        return sd_pipeline()
    if family == "sdxl":
        from test_sdxl import tiny_sdxl

        return tiny_sdxl()
    if family == "pixart":
        from test_pixart import tiny_pipeline

        return tiny_pipeline()
    from test_sd3 import tiny_pipeline

    return tiny_pipeline()


@pytest.fixture(scope="module", params=["sd", "sdxl", "pixart", "sd3"])
def made(request, tmp_path_factory):
    """(family, root): root/full (with encoders), root/bare (without), root/imgs (captioned), root/e.safetensors."""
    root = tmp_path_factory.mktemp(request.param)
    pipe = _builder(request.param)
    pipe.save_pretrained(root / "full", safe_serialization=True)
    pipe.register_modules(**{k: None for k in TEXT_PARTS if k in pipe.components})
    pipe.save_pretrained(root / "bare", safe_serialization=True)
    (root / "imgs").mkdir()
    rng, rows = np.random.default_rng(0), []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a photo of thing {i % 2}"})
    (root / "imgs" / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return request.param, root


def _encode(root, capsys, *extra):
    code, err = run_cli(["encode-prompts", "--model", root / "full", "--data", root / "imgs", "--prompt", PROMPT,
                         "--negative-prompt", NEGATIVE, "--output", root / "e.safetensors", *extra], capsys)
    assert code == 0, err
    return read_prompt_embeds(root / "e.safetensors")


def _ctx(folder, embeds=None, **sampling):
    pipe = load_pipeline(folder, text_encoders=embeds is None)
    model = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    return attach_for_sampling(context_for(pipe, family_for(model), model, embeds), **sampling), pipe


def test_the_file_gives_exactly_the_encoders_conditioning(made, capsys):
    family, root = made
    embeds = _encode(root, capsys, "--overwrite")
    assert embeds.layout == family and embeds.prompts == ("", PROMPT, "a photo of thing 0", "a photo of thing 1",
                                                         NEGATIVE)
    bare, pipe = _ctx(root / "bare", embeds, prompt=[PROMPT, "a photo of thing 1"], guidance_scale=3.0,
                      negative_prompt=NEGATIVE)
    assert all(getattr(pipe, k, None) is None for k in TEXT_PARTS)
    full, _ = _ctx(root / "full", prompt=[PROMPT, "a photo of thing 1"], guidance_scale=3.0, negative_prompt=NEGATIVE)
    for got, want in ((bare.cond_for([0, 1], "cpu", drop=[False, True]), full.cond_for([0, 1], "cpu",
                                                                                         drop=[False, True])),
                      (bare.uncond_for([0, 1], "cpu"), full.uncond_for([0, 1], "cpu"))):
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def _weights(folder):
    from safetensors.torch import load_file

    (path,) = [p for p in folder.glob("*/diffusion_pytorch_model.safetensors") if p.parent.name != "vae"]
    return load_file(str(path))


def test_finetune_and_sample_without_encoders_equal_the_pipeline_with_them(made, tmp_path, capsys):
    family, root = made
    if not (root / "e.safetensors").exists():
        _encode(root, capsys)
    tune = ["finetune", "--data", root / "imgs", "--steps", "2", "--batch-size", "2", "--no-tensorboard",
            "--no-progress", "--ema-decay", "0.5", "--cond-drop-prob", "0.5"]
    code, err = run_cli([*tune, "--model", root / "full", "--output-dir", tmp_path / "f_enc"], capsys)
    assert code == 0, err
    code, err = run_cli([*tune, "--model", root / "bare", "--prompt-embeds", root / "e.safetensors",
                         "--output-dir", tmp_path / "f_file"], capsys)
    assert code == 0, err
    mine, theirs = _weights(tmp_path / "f_file"), _weights(tmp_path / "f_enc")
    assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    config = json.loads((tmp_path / "f_file" / "finetune_config.json").read_text())
    assert config["prompt_embeds"] == str((root / "e.safetensors").absolute())
    steps = "3"
    sample = ["sample", "--num-images", "2", "--batch-size", "2", "--steps", steps, "--prompt", PROMPT,
              "--guidance-scale", "3", "--negative-prompt", NEGATIVE, "--no-progress"]
    assert run_cli([*sample, "--model", tmp_path / "f_enc", "--output-dir", tmp_path / "s_enc"], capsys)[0] == 0
    code, err = run_cli([*sample, "--model", tmp_path / "f_file", "--prompt-embeds", root / "e.safetensors",
                         "--output-dir", tmp_path / "s_file"], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(load_samples(tmp_path / "s_file")[0], load_samples(tmp_path / "s_enc")[0])
    index = json.loads((tmp_path / "f_file" / "model_index.json").read_text())
    assert index["text_encoder"] in (None, [None, None])  # a bare input stays bare


def _one_line(err: str, needle: str) -> bool:
    lines = [line for line in err.splitlines() if line.startswith("diffprune ")]
    return len(lines) == 1 and needle in lines[0]


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_errors")
    pipe = sd_pipeline()
    pipe.save_pretrained(root / "full", safe_serialization=True)
    pipe.register_modules(text_encoder=None, tokenizer=None)
    pipe.save_pretrained(root / "bare", safe_serialization=True)
    full = load_pipeline(root / "full")
    from diffprune.families.conditioning import encode_prompts_file

    encode_prompts_file(full, root / "e.safetensors", [PROMPT])
    return root


def _sample(root, tmp_path, capsys, *extra, model="bare"):
    return run_cli(["sample", "--model", root / model, "--num-images", "1", "--steps", "2", "--no-progress",
                    "--output-dir", tmp_path / "s", *extra], capsys)


def test_a_full_folder_with_the_file_loads_no_encoder_and_keeps_them_in_the_output(sd_dirs, tmp_path, capsys,
                                                                                  monkeypatch):
    from transformers import CLIPTextModel

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder was loaded")

    monkeypatch.setattr(CLIPTextModel, "from_pretrained", classmethod(refuse))
    out = tmp_path / "tuned"
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(images / "0.png")
    code, err = run_cli(["finetune", "--model", sd_dirs / "full", "--prompt-embeds", sd_dirs / "e.safetensors",
                         "--data", images, "--prompt", PROMPT, "--steps", "1", "--batch-size", "1",
                         "--no-tensorboard", "--no-progress", "--output-dir", out], capsys)
    assert code == 0, err
    monkeypatch.undo()
    index, source = (json.loads((f / "model_index.json").read_text()) for f in (out, sd_dirs / "full"))
    assert index["text_encoder"] == source["text_encoder"] and index["tokenizer"] == source["tokenizer"]
    again = load_pipeline(out)
    assert type(again.text_encoder).__name__ == "CLIPTextModel" and again.tokenizer is not None


@pytest.mark.parametrize("extra,needle", [
    (["--prompt", "a blue dog"], "prompt 'a blue dog' is not in the prompt embeddings"),
    (["--prompt", PROMPT, "--guidance-scale", "2", "--negative-prompt", "ugly"], "prompt 'ugly' is not in"),
])
def test_a_prompt_missing_from_the_file_is_one_line(sd_dirs, tmp_path, capsys, extra, needle):
    code, err = _sample(sd_dirs, tmp_path, capsys, "--prompt-embeds", sd_dirs / "e.safetensors", *extra)
    assert code == 2 and _one_line(err, needle), err
    assert not (tmp_path / "s").exists()


def test_finetune_refuses_a_caption_missing_from_the_file_before_training(sd_dirs, tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(images / "0.png")
    code, err = run_cli(["finetune", "--model", sd_dirs / "bare", "--prompt-embeds", sd_dirs / "e.safetensors",
                         "--data", images, "--prompt", "not encoded", "--steps", "1", "--batch-size", "1",
                         "--no-tensorboard", "--no-progress", "--output-dir", tmp_path / "t"], capsys)
    assert code == 2 and _one_line(err, "prompt 'not encoded' is not in the prompt embeddings"), err


def _write(path, layout, tensors, prompts=("", PROMPT)):
    return write_prompt_embeds(path, layout, list(prompts), tensors)


@pytest.mark.parametrize("case,needle", [
    ("width", "prompt_embeds is 8 wide, the denoiser's cross_attention_dim is 16"),
    ("layout", "prompt embeddings for layout 'sdxl', the model needs 'sd'"),
    ("truncated", "unreadable safetensors file"),
    ("foreign", "not a diffprune prompt-embeddings file"),
    ("missing", "do not exist"),
])
def test_a_wrong_or_broken_file_is_one_line(sd_dirs, tmp_path, capsys, case, needle):
    path = tmp_path / "bad.safetensors"
    if case == "width":
        _write(path, "sd", {"prompt_embeds": torch.zeros(2, 12, 8)})
    elif case == "layout":
        _write(path, "sdxl", {"prompt_embeds": torch.zeros(2, 12, 16), "pooled_prompt_embeds": torch.zeros(2, 16)})
    elif case == "truncated":
        data = (sd_dirs / "e.safetensors").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "foreign":
        save_file({"prompt_embeds": torch.zeros(2, 12, 16)}, str(path), metadata={"format": "pt"})
    code, err = _sample(sd_dirs, tmp_path, capsys, "--prompt-embeds", path, "--prompt", PROMPT)
    assert code == 2 and _one_line(err, needle), err


def test_the_writer_refuses_files_that_could_not_be_read(tmp_path):
    ok = {"prompt_embeds": torch.zeros(2, 12, 16)}
    with pytest.raises(DiffpruneError, match="the empty prompt"):
        _write(tmp_path / "a", "sd", ok, prompts=("x", PROMPT))
    with pytest.raises(DiffpruneError, match="non-finite"):
        _write(tmp_path / "a", "sd", {"prompt_embeds": torch.full((2, 12, 16), float("nan"))})
    with pytest.raises(DiffpruneError, match="needs exactly"):
        _write(tmp_path / "a", "sd3", ok)
    with pytest.raises(DiffpruneError, match="must agree"):
        _write(tmp_path / "a", "pixart", {**ok, "prompt_attention_mask": torch.ones(2, 5, dtype=torch.long)})
    assert not (tmp_path / "a").exists()
    back = read_prompt_embeds(_write(tmp_path / "b", "sd", ok))
    assert back.prompts == ("", PROMPT) and torch.equal(back.tensors["prompt_embeds"], ok["prompt_embeds"])


def test_without_encoders_or_file_and_for_models_without_prompts_it_is_one_line(sd_dirs, tmp_path, capsys):
    code, err = _sample(sd_dirs, tmp_path, capsys, "--prompt", PROMPT)
    assert code == 2 and _one_line(err, "needs the pipeline's tokenizer and text_encoder"), err
    tiny = tmp_path / "ddpm"
    from conftest import save_tiny_pipeline

    save_tiny_pipeline(tiny, tiny_unet())
    code, err = _sample(tmp_path, tmp_path, capsys, "--prompt-embeds", sd_dirs / "e.safetensors", model="ddpm")
    assert code == 2 and _one_line(err, "apply to text-conditional models"), err
    code, err = run_cli(["encode-prompts", "--model", tiny, "--prompt", PROMPT, "--output", tmp_path / "e"], capsys)
    assert code == 2 and _one_line(err, "takes no prompts"), err
    code, err = run_cli(["encode-prompts", "--model", sd_dirs / "full", "--output", tmp_path / "e"], capsys)
    assert code == 2 and _one_line(err, "nothing to encode"), err


def test_evaluate_cost_of_a_folder_without_encoders_reads_the_file(sd_dirs, tmp_path, capsys):
    """evaluate --model (throughput run) of a bare folder: one line without the file, measured with it,
    conditioned on the file's prompt and equal in params/MACs to the folder with encoders."""
    common = ["--throughput-images", "1", "--throughput-steps", "2", "--throughput-repeats", "1",
              "--latency-repeats", "1", "--latency-warmup", "0"]
    code, err = run_cli(["evaluate", "--model", sd_dirs / "bare", "--output", tmp_path / "no.json", *common], capsys)
    assert code == 2 and _one_line(err, "needs the pipeline's tokenizer and text_encoder"), err
    results = {}
    for name, extra in (("bare", ["--prompt-embeds", sd_dirs / "e.safetensors"]), ("full", [])):
        out = tmp_path / f"{name}.json"
        code, err = run_cli(["evaluate", "--model", sd_dirs / name, "--output", out, *common, *extra], capsys)
        assert code == 0, err
        results[name] = json.loads(out.read_text())
    bare, full = (results[k]["cost"] for k in ("bare", "full"))
    assert bare["student"]["params"] == full["student"]["params"] and bare["student"]["macs"] == full["student"]["macs"]
    assert PROMPT in json.dumps(bare) and "a photograph" in json.dumps(full)
    only_empty = tmp_path / "empty.safetensors"
    embeds = read_prompt_embeds(sd_dirs / "e.safetensors")
    write_prompt_embeds(only_empty, "sd", [""], {k: v[:1] for k, v in embeds.tensors.items()})
    code, err = run_cli(["evaluate", "--model", sd_dirs / "bare", "--prompt-embeds", only_empty,
                         "--output", tmp_path / "e.json", *common], capsys)
    assert code == 2 and _one_line(err, "holds only the empty prompt"), err


def test_prune_from_the_file_equals_prune_with_the_encoders(made, tmp_path, capsys):
    """prune --prompt-embeds on a folder without text encoders: the same pruned weights as with them."""
    family, root = made
    if not (root / "e.safetensors").exists():
        _encode(root, capsys)
    prune = ["prune", "--data", root / "imgs", "--method", "diff-pruning", "--threshold", "0.5", "--ratio", "0.3",
             "--batch-size", "2"]
    code, err = run_cli([*prune, "--model", root / "full", "--output-dir", tmp_path / "p_enc"], capsys)
    assert code == 0, err
    code, err = run_cli([*prune, "--model", root / "bare", "--prompt-embeds", root / "e.safetensors",
                         "--output-dir", tmp_path / "p_file"], capsys)
    assert code == 0, err
    mine, theirs = _weights(tmp_path / "p_file"), _weights(tmp_path / "p_enc")
    assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    config = json.loads((tmp_path / "p_file" / "prune_config.json").read_text())
    assert config["prompt_embeds"] == str((root / "e.safetensors").absolute())
