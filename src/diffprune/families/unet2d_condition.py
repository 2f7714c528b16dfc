"""diffusers `UNet2DConditionModel` (Stable Diffusion 1.x/2.x UNets with text cross-attention).

Conditioning = the pipeline's own text encoder applied to one prompt per image, as
`StableDiffusionPipeline.encode_prompt` does without guidance (tokenizer padded to
`model_max_length`, last hidden state). Calibration and fine-tuning use the plain conditional loss
(no classifier-free-guidance dropout). Cross-attention `to_k`/`to_v` read the text embedding: their
input width is never pruned (the text encoder is not a part of the pruned graph), only their
output (head) dims, together with `to_q`.

Prompts come from `captions.jsonl` (lines `{"file_name": "a/b.png", "text": "..."}`, the Hugging Face
imagefolder convention) or `captions.txt` (lines `a/b.png<TAB>caption`) beside the images, or one
prompt for every image.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ..errors import DiffpruneError
from .unet2d import UNet2DFamily

CAPTION_FILES = ("captions.jsonl", "captions.txt")
TEXT_LENGTH = 77  # CLIP's model_max_length; only shapes for tracing and MAC counting depend on it


class UNet2DConditionFamily(UNet2DFamily):
    """Same layers, protections and fix-ups as UNet2DModel; adds the text conditioning."""

    name = "unet2d_condition"
    component = "unet"
    model_classes = (UNet2DConditionModel,)
    conditional = True

    def check(self, model):
        c = model.config
        for key in ("addition_embed_type", "class_embed_type", "encoder_hid_dim_type", "num_class_embeds"):
            if c.get(key):
                raise DiffpruneError(f"UNet2DConditionModel with {key}={c[key]!r} (e.g. SDXL, unCLIP) is not "
                                     "supported yet; supported: Stable Diffusion 1.x/2.x-style text-conditional UNets")
        if not isinstance(c.cross_attention_dim, int):
            raise DiffpruneError(f"UNet2DConditionModel with per-block cross_attention_dim="
                                 f"{c.cross_attention_dim!r} is not supported yet")

    def example_cond(self, model, batch_size=1, device="cpu"):
        g = torch.Generator().manual_seed(0)
        dim = int(model.config.cross_attention_dim)
        return {"encoder_hidden_states": torch.randn(batch_size, TEXT_LENGTH, dim, generator=g).to(device)}

    def example_inputs(self, model, batch_size=1, device="cpu"):
        size = self.sample_size(model)
        return {"sample": torch.randn(batch_size, self.in_channels(model), size, size, device=device),
                "timestep": torch.ones(batch_size, dtype=torch.long, device=device),
                **self.example_cond(model, batch_size, device)}

    def predict(self, model, x_t, t, cond=None):
        return model(x_t, t, encoder_hidden_states=self._need(cond, "encoder_hidden_states")).sample



# --------------------------------------------------------------------------- prompts


class PromptEncoder:
    """Prompts -> `encoder_hidden_states` with a pipeline's tokenizer and (frozen) text encoder."""

    def __init__(self, tokenizer, text_encoder):
        if tokenizer is None or text_encoder is None:
            raise DiffpruneError("UNet2DConditionModel needs the pipeline's tokenizer and text_encoder to encode "
                                 "prompts; a bare UNet folder is not supported: give a Stable Diffusion "
                                 "pipeline folder")
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.eval().requires_grad_(False)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode(self, prompts: list[str], device) -> torch.Tensor:
        """(B, L, D) text embeddings, as StableDiffusionPipeline.encode_prompt (no guidance)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            enc = self.text_encoder
            tok = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt")
            ids = tok.input_ids.to(enc.device)
            mask = tok.attention_mask.to(enc.device) if getattr(enc.config, "use_attention_mask", False) else None
            out = enc(ids, attention_mask=mask)[0]
            for p, e in zip(missing, out, strict=True):
                self._cache[p] = e.detach().cpu()
        return torch.stack([self._cache[p] for p in prompts]).to(device)

    def cond(self, prompts: list[str], device) -> dict:
        return {"encoder_hidden_states": self.encode(prompts, device)}


def read_captions(path: str | Path) -> dict[str, str]:
    """{relative file name: caption} from captions.jsonl or captions.txt (see module docstring)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DiffpruneError(f"captions file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DiffpruneError(f"captions file {str(path)!r} is unreadable ({err})") from None
    out: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
                name, text = row["file_name"], row["text"]
            except (json.JSONDecodeError, KeyError, TypeError, RecursionError):  # Recursion: nested too deeply
                raise DiffpruneError(f"{path}:{n}: expected a JSON object with 'file_name' and 'text'") from None
        else:
            if "\t" not in line:
                raise DiffpruneError(f"{path}:{n}: expected 'file<TAB>caption'")
            name, text = line.split("\t", 1)
        if not isinstance(name, str) or not isinstance(text, str) or not name.strip():
            raise DiffpruneError(f"{path}:{n}: file name and caption must be non-empty strings")
        out[Path(name.strip()).as_posix()] = text.strip()
    if not out:
        raise DiffpruneError(f"captions file {str(path)!r} holds no captions")
    return out


def find_captions_file(data_folder: str | Path) -> Path | None:
    folder = Path(data_folder)
    if not folder.is_dir():
        return None
    return next((folder / n for n in CAPTION_FILES if (folder / n).is_file()), None)


def prompts_for_dataset(dataset, data: str, prompt: str | None, captions: str | None) -> list[str]:
    """One prompt per dataset image: `prompt` for all, or captions matched by relative path."""
    if prompt is not None and captions is not None:
        raise DiffpruneError("give either a prompt or a captions file, not both")
    if prompt is not None:
        if not prompt.strip():
            raise DiffpruneError("prompt is empty; give a non-empty --prompt")
        return [prompt] * len(dataset)
    paths = getattr(dataset, "paths", None)
    path = Path(captions) if captions is not None else (find_captions_file(data) if paths else None)
    if path is None:
        raise DiffpruneError(f"text-conditional UNets need prompts: give --prompt, or --captions / a "
                             f"captions.jsonl or captions.txt beside the images in {data!r}")
    if paths is None:
        raise DiffpruneError(f"captions need an image folder; {data!r} is a built-in dataset (use --prompt)")
    table = read_captions(path)
    root = Path(data)
    rel = [p.relative_to(root).as_posix() for p in paths]
    missing = [r for r in rel if r not in table]
    if missing:
        raise DiffpruneError(f"{path}: no caption for {len(missing)} of {len(rel)} images (first: {missing[0]!r}); "
                             "captions must name every image by its path relative to the data folder")
    from ..data import find_images

    unknown = sorted(set(table) - {p.relative_to(root).as_posix() for p in find_images(root)})
    if unknown:
        raise DiffpruneError(f"{path}: captions for {len(unknown)} files that are not images in "
                             f"{data!r} (first: {unknown[0]!r}); the captions file does not match the folder")
    return [table[r] for r in rel]
