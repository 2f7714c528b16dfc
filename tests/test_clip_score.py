"""CLIP score (metrics/clip_score.py, `evaluate --clip-score`): equal to torchmetrics' CLIPScore on a tiny
CLIP model built in the test (tokenizer and image processor included), prompts read from the sample
folder's record, loading refusals in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from diffprune.errors import DiffpruneError
from diffprune.evaluate.stage import format_table
from diffprune.metrics.clip_score import clip_score, load_clip, per_image_scores, recorded_prompts

PROMPTS = ["a red square", "a small green dog", "an astronaut riding a horse on the moon", "zebra"]


def _tiny_clip(seed: int):
    """A 1-layer CLIP (16-d towers, 8-d projection), a byte-level tokenizer and a 32 px image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in bytes_to_unicode().values():
            vocab[c + suffix] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=64)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    return CLIPModel(config).eval(), CLIPProcessor(image_processor=images, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model, processor = _tiny_clip(seed=2)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _images(n: int, channels: int = 3, size: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    return base


class _Features(torch.nn.Module):
    """torchmetrics 1.9 expects tensors from get_*_features; transformers 5 returns a model output whose
    pooler_output is that tensor (Lightning-AI/torchmetrics PR #3428). Same model, same numbers."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def _torchmetrics(clip, images: np.ndarray, prompts: list[str]):
    """(per-image scores, CLIPScore.compute()) from torchmetrics on the same model and processor."""
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.multimodal.clip_score import CLIPScore

    chw = [torch.from_numpy(im).permute(2, 0, 1) for im in images]
    if images.shape[-1] == 1:
        chw = [c.repeat(3, 1, 1) for c in chw]
    model = _Features(clip.model)
    per_image, _ = _clip_score_update(chw, prompts, model, clip.processor)
    metric = CLIPScore(model_name_or_path=lambda: (model, clip.processor))
    for s in range(0, len(chw), 3):  # batched updates, as a caller streaming images would
        metric.update(chw[s:s + 3], prompts[s:s + 3])
    return per_image.detach().numpy().astype(np.float64), float(metric.compute())


@pytest.mark.parametrize("seed", [2, 5])
def test_equals_torchmetrics_clipscore(seed, tmp_path):
    model, processor = _tiny_clip(seed)
    model.save_pretrained(tmp_path / "c")
    processor.save_pretrained(tmp_path / "c")
    clip = load_clip(str(tmp_path / "c"))
    images, prompts = _images(8, seed=seed), [PROMPTS[i % 4] for i in range(8)]
    ours, truncated = per_image_scores(clip, images, prompts, batch_size=3, progress=False)
    theirs, value = _torchmetrics(clip, images, prompts)
    assert truncated == 0 and np.abs(ours - theirs).max() <= 1e-4
    assert abs(clip_score(ours) - value) <= 1e-4
    assert np.ptp(ours) > 1.0  # the images and prompts really score differently


def test_clamp_is_on_the_mean_as_torchmetrics_computes_it():
    assert clip_score(np.array([30.0, -10.0])) == pytest.approx(10.0)
    assert clip_score(np.array([5.0, -10.0])) == 0.0


def test_grayscale_images_are_scored_as_rgb(clip_dir):
    clip = load_clip(str(clip_dir))
    grey = _images(4, channels=1, seed=3)
    ours, _ = per_image_scores(clip, grey, PROMPTS, progress=False)
    theirs, _ = _torchmetrics(clip, grey, PROMPTS)
    rgb, _ = per_image_scores(clip, np.repeat(grey, 3, axis=-1), PROMPTS, progress=False)
    assert np.abs(ours - theirs).max() <= 1e-4 and np.array_equal(ours, rgb)


def test_long_prompts_are_truncated_and_counted(clip_dir):
    clip = load_clip(str(clip_dir))
    long = "a photograph of " + "many " * 40 + "cats"
    scores, truncated = per_image_scores(clip, _images(2), [long, "cat"], progress=False)
    assert truncated == 1 and np.isfinite(scores).all()


def _sample_folder(root, images, prompt, **extra):
    """A folder as `diffprune sample` writes it: numbered PNGs, samples.npz, sample_config.json."""
    root.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(root / f"{i:06d}.png")
    np.savez(root / "samples.npz", images=images, indices=np.arange(len(images)))
    record = {"stage": "sample", "version": 3, "prompt": prompt, "num_images": len(images), **extra}
    (root / "sample_config.json").write_text(json.dumps(record))
    return root


def test_evaluate_cli_writes_the_clip_score(clip_dir, tmp_path, capsys):
    images = _images(5, seed=7)
    folder = _sample_folder(tmp_path / "s", images, "a small green dog", guidance_scale=7.5,
                            negative_prompt="blurry")
    code, err = run_cli(["evaluate", "--samples", folder, "--clip-model", clip_dir], capsys)
    assert code == 0, err
    result = json.loads((folder / "evaluation.json").read_text())
    entry = result["clip_score"]
    expected, _ = per_image_scores(load_clip(str(clip_dir)), images, ["a small green dog"] * 5, progress=False)
    assert entry["value"] == pytest.approx(clip_score(expected), abs=1e-6)
    assert entry["clip_model"] == str(clip_dir) and entry["num_images"] == 5 and entry["num_prompts"] == 1
    assert entry["prompts"]["guidance_scale"] == 7.5 and entry["prompts"]["negative_prompt"] == "blurry"
    assert "torchmetrics" in entry["convention"]
    assert result["config"]["clip_score"] is True
    assert "CLIP score" in format_table(result) and str(clip_dir) in format_table(result)


def test_prompt_lists_are_cycled_by_image_index(tmp_path):
    folder = _sample_folder(tmp_path / "s", _images(3), ["cat", "dog"])
    prompts, _ = recorded_prompts(folder, [0, 1, 2, 5])
    assert prompts == ["cat", "dog", "cat", "dog"]


@pytest.mark.parametrize("prompt", [None, "", 3])
def test_samples_without_a_prompt_are_refused(prompt, clip_dir, tmp_path, capsys):
    folder = _sample_folder(tmp_path / "s", _images(2), prompt)
    code, err = run_cli(["evaluate", "--samples", folder, "--clip-model", clip_dir], capsys)
    assert code == 2 and "prompt" in err and len(err.strip().splitlines()) == 1


def test_image_folder_without_record_is_refused(clip_dir, tmp_path, capsys):
    folder = _sample_folder(tmp_path / "s", _images(2), "cat")
    (folder / "sample_config.json").unlink()
    code, err = run_cli(["evaluate", "--samples", folder, "--clip-score", "--clip-model", clip_dir], capsys)
    assert code == 2 and "sample_config.json" in err and len(err.strip().splitlines()) == 1


def test_offline_hub_id_names_the_option(monkeypatch):
    monkeypatch.setenv("DIFFPRUNE_OFFLINE", "1")
    with pytest.raises(DiffpruneError, match=r"--clip-model 'openai/clip-vit-large-patch14' is not a local "
                                             r"folder.*pass --clip-model with a local folder") as info:
        load_clip("openai/clip-vit-large-patch14")
    assert "\n" not in str(info.value)


def test_pickled_weights_are_never_read(clip_dir, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(clip_dir, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(DiffpruneError, match="safetensors only"):
        load_clip(str(folder))
    with pytest.raises(DiffpruneError, match="neither a folder nor a hub id"):
        load_clip(str(tmp_path / "missing" / "deep" / "path"))
