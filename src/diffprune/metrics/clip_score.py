"""CLIP score of generated images against the prompts they were conditioned on (torchmetrics' CLIPScore).

Definition (torchmetrics.multimodal.CLIPScore, after Hessel et al. 2021 "CLIPScore" with w = 100):
image i and its caption are embedded by CLIP (`get_image_features` / `get_text_features`, i.e. the
projected embeddings), L2-normalised, and scored s_i = 100 * cos(E_I_i, E_C_i). The reported score is
max(mean_i s_i, 0): torchmetrics' `CLIPScore.compute` clamps the mean (its docstring writes the clamp
per pair; the two differ only when some s_i < 0, which real CLIP checkpoints practically never give).

Inputs are prepared as torchmetrics prepares them: each image is a uint8 CHW tensor handed to the
checkpoint's own `CLIPProcessor` (resize, centre crop, normalise), captions are tokenized with padding.
One difference, for long captions only: torchmetrics slices the token ids at the text model's
`max_position_embeddings`, which cuts off the end-of-text token CLIP pools at; we let the tokenizer
truncate (it keeps that token). Captions that fit (77 tokens for the usual checkpoints) score the
same; the result counts the truncated ones.

Loading (`load_clip`): a local folder or a hub id (default `openai/clip-vit-large-patch14`,
torchmetrics' default) through transformers' `CLIPModel` / `CLIPProcessor`, weights from safetensors
only (`use_safetensors=True`: a checkpoint is never unpickled). transformers >= 5 returns a model
output from `get_*_features`; its `pooler_output` is the projected embedding (torchmetrics 1.9 does
not handle that yet, Lightning-AI/torchmetrics PR #3428).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DiffpruneError

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
CONVENTION = ("torchmetrics CLIPScore: max(mean_i 100*cos(E_image_i, E_prompt_i), 0), projected CLIP "
              "embeddings, the checkpoint's CLIPProcessor")
DEFINITION = "Hessel et al. 2021 (CLIPScore, w=100) as torchmetrics.multimodal.CLIPScore computes it"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass
class ClipModel:
    """A loaded CLIP checkpoint: model (eval, float32), its processor, and where it came from."""

    model: torch.nn.Module
    processor: object
    name: str
    max_tokens: int


def _offline(allow_download: bool) -> bool:
    flags = (os.environ.get(v, "").strip().lower() for v in ("DIFFPRUNE_OFFLINE", "HF_HUB_OFFLINE"))
    return not allow_download or any(f in ("1", "true", "yes") for f in flags)


def _how_to_fix(name: str) -> str:
    return (f"pass --clip-model with a local folder holding config.json, model.safetensors and the processor "
            f"files (tokenizer, preprocessor_config.json), e.g. a download of https://huggingface.co/{name}")


def load_clip(name_or_path: str, device: str | torch.device = "cpu", allow_download: bool = True) -> ClipModel:
    """CLIPModel + CLIPProcessor from a local folder or a hub id (hub cache first; download if online)."""
    from transformers import CLIPModel, CLIPProcessor

    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise DiffpruneError(f"--clip-model {str(path)!r} is not a model folder (no config.json); "
                                 f"{_how_to_fix(DEFAULT_CLIP_MODEL)}")
        if not any(path.glob("*.safetensors")):
            raise DiffpruneError(f"--clip-model {str(path)!r} holds no .safetensors weights; CLIP weights are "
                                 "read from safetensors only, never from pickled .bin files")
        source, local, local_only = str(path), True, True
    elif _HUB_ID.match(str(name_or_path)):
        source, local, local_only = str(name_or_path), False, _offline(allow_download)
    else:
        raise DiffpruneError(f"--clip-model {str(name_or_path)!r} is neither a folder nor a hub id such as "
                             f"{DEFAULT_CLIP_MODEL!r}")
    try:
        model = CLIPModel.from_pretrained(source, use_safetensors=True, local_files_only=local_only,
                                          dtype=torch.float32)
        processor = CLIPProcessor.from_pretrained(source, local_files_only=local_only)
    except Exception as err:  # noqa: BLE001 - hub, file and config errors come in many types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        where = "its hub cache (downloads are off)" if local_only else "the hub or its cache"
        if local:
            raise DiffpruneError(f"--clip-model {source!r}: could not load a CLIP model and processor "
                                 f"({type(err).__name__}: {first})") from None
        raise DiffpruneError(f"--clip-model {source!r} is not a local folder and could not be loaded from "
                             f"{where} ({type(err).__name__}); {_how_to_fix(source)}") from None
    max_tokens = int(model.config.text_config.max_position_embeddings)
    return ClipModel(model.to(device).eval(), processor, source, max_tokens)


def _embedding(out) -> torch.Tensor:
    """Projected embeddings from `get_*_features`: a tensor (transformers < 5) or an output's pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _rgb_chw(images: np.ndarray) -> list[torch.Tensor]:
    """uint8 NHWC (1 or 3 channels) -> list of uint8 3xHxW tensors, grey repeated over RGB."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return list(x)


@torch.no_grad()
def text_embeddings(clip: ClipModel, prompts: Sequence[str]) -> tuple[torch.Tensor, int]:
    """(unit-norm embeddings of `prompts`, how many were truncated to the text model's length)."""
    device = next(clip.model.parameters()).device
    tokenizer = getattr(clip.processor, "tokenizer", clip.processor)
    truncated = sum(len(tokenizer(p)["input_ids"]) > clip.max_tokens for p in prompts)
    tok = clip.processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True,
                         max_length=clip.max_tokens)
    emb = _embedding(clip.model.get_text_features(input_ids=tok["input_ids"].to(device),
                                                  attention_mask=tok["attention_mask"].to(device)))
    return emb.float() / emb.float().norm(p=2, dim=-1, keepdim=True), int(truncated)


@torch.no_grad()
def image_embeddings(clip: ClipModel, images: np.ndarray) -> torch.Tensor:
    """Unit-norm embeddings of uint8 NHWC images, through the checkpoint's processor."""
    device = next(clip.model.parameters()).device
    pixels = clip.processor(images=_rgb_chw(images), return_tensors="pt")["pixel_values"]
    emb = _embedding(clip.model.get_image_features(pixel_values=pixels.to(device)))
    return emb.float() / emb.float().norm(p=2, dim=-1, keepdim=True)


def per_image_scores(clip: ClipModel, images: np.ndarray, prompts: Sequence[str], batch_size: int = 32,
                     progress: bool = True) -> tuple[np.ndarray, int]:
    """(100 * cos(image_i, prompt_i) for every image, number of prompts truncated); each distinct
    prompt is embedded once."""
    if len(images) != len(prompts):
        raise DiffpruneError(f"CLIP score: {len(images)} images but {len(prompts)} prompts")
    unique = list(dict.fromkeys(prompts))
    text, truncated = text_embeddings(clip, unique)
    row = {p: k for k, p in enumerate(unique)}
    scores = []
    starts = range(0, len(images), batch_size)
    for s in tqdm(starts, desc="CLIP score", unit="batch", disable=not progress or len(starts) < 2):
        emb = image_embeddings(clip, images[s:s + batch_size])
        t = text[[row[p] for p in prompts[s:s + batch_size]]]
        scores.append((100 * (emb * t).sum(dim=-1)).cpu().numpy())
    return np.concatenate(scores).astype(np.float64), truncated


def clip_score(per_image: np.ndarray) -> float:
    """torchmetrics' CLIPScore.compute: the mean of the per-image scores, clamped at 0."""
    return max(float(np.mean(per_image)), 0.0)


def recorded_prompts(samples: str | Path, keys: Sequence) -> tuple[list[str], dict]:
    """The prompt each image was generated from, by its index, from the sample folder's sample_config.json.

    `prompt` is one string (every image) or a list cycled over image indices, as sampling uses it
    (`families.conditioning.PipelineContext.cond_for`). Returns (prompts, the guidance settings recorded).
    """
    from ..fsutil import read_json

    folder = Path(samples) if Path(samples).is_dir() else Path(samples).parent
    record = folder / "sample_config.json"
    if not record.is_file():
        raise DiffpruneError(f"--clip-score: {record} is missing; the CLIP score compares each image with the "
                             "prompt it was generated from, which `diffprune sample` records there")
    config = read_json(record, "sample config")
    prompt = config.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) and p for p in prompts)):
        raise DiffpruneError(f"--clip-score: {record} records prompt={str(prompt)[:60]!r}; allowed: samples of a "
                             "text-conditional model (a non-empty prompt string or list of strings)")
    if not all(isinstance(k, int) and k >= 0 for k in keys):
        raise DiffpruneError(f"--clip-score: the images in {folder} are not named by sample index")
    settings = {k: config[k] for k in ("negative_prompt", "guidance_scale", "guidance_rescale") if k in config}
    return [prompts[k % len(prompts)] for k in keys], {"record": str(record), **settings}


def clip_result(samples, samples_path: str, name_or_path: str, device, allow_download: bool = True,
                progress: bool = True) -> dict:
    """The `clip_score` entry of evaluation.json for an ImageSet read from `samples_path`."""
    prompts, record = recorded_prompts(samples_path, samples.keys)
    clip = load_clip(name_or_path, device, allow_download)
    scores, truncated = per_image_scores(clip, samples.images, prompts, progress=progress)
    return {
        "value": clip_score(scores),
        "clip_model": clip.name,
        "convention": CONVENTION,
        "definition": DEFINITION,
        "num_images": int(len(scores)),
        "num_prompts": len(set(prompts)),
        "per_image": {"mean": float(scores.mean()), "std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
                      "min": float(scores.min()), "max": float(scores.max())},
        "truncated_prompts": truncated,
        "max_prompt_tokens": clip.max_tokens,
        "prompts": record,
    }
