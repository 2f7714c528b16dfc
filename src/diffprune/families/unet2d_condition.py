"""diffusers `UNet2DConditionModel` (Stable Diffusion 1.x / 2.x / XL UNets with text cross-attention).

Conditioning = the pipeline's own text encoder(s) applied to one prompt per image, as the pipelines'
`encode_prompt` does (tokenizer padded to `model_max_length`): SD 1.x/2.x take the last hidden state
(`StableDiffusionPipeline`); SDXL (`addition_embed_type="text_time"`, two text encoders) takes the
penultimate hidden states of both, the pooled projection of the second, and `time_ids` made of the
image sizes (`StableDiffusionXLPipeline`; families/sdxl.py). SD 2.x variants (linear projections,
v-prediction, `upcast_attention`) need nothing special. Classifier-free guidance: families/guidance.py;
fine-tuning drops captions with probability `cond_drop_prob` (the empty prompt). Cross-attention
`to_k`/`to_v` read the text embedding: their input width is never pruned (the text encoder is not a
part of the pruned graph), only their output (head) dims, together with `to_q`.

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
from .prompt_embeds import CachedPrompts, PromptEmbeds
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
            if c.get(key) and not (key == "addition_embed_type" and c[key] == "text_time"):
                raise DiffpruneError(f"UNet2DConditionModel with {key}={c[key]!r} (e.g. unCLIP, Kandinsky) is not "
                                     "supported yet; supported: Stable Diffusion 1.x/2.x/XL-style text-conditional "
                                     "UNets (addition_embed_type None or 'text_time')")
        if not isinstance(c.cross_attention_dim, int):
            raise DiffpruneError(f"UNet2DConditionModel with per-block cross_attention_dim="
                                 f"{c.cross_attention_dim!r} is not supported yet")

    def example_cond(self, model, batch_size=1, device="cpu"):
        g = torch.Generator().manual_seed(0)
        dim = int(model.config.cross_attention_dim)
        cond = {"encoder_hidden_states": torch.randn(batch_size, TEXT_LENGTH, dim, generator=g).to(device)}
        if is_text_time(model):
            from .sdxl import example_added_cond

            cond.update(example_added_cond(model, batch_size, device))
        return cond

    def example_inputs(self, model, batch_size=1, device="cpu"):
        """Keyword inputs of `model(**inputs)` in the model's float dtype (a bf16 model traces in bf16);
        SDXL's pooled text and time ids go in `added_cond_kwargs`."""
        size = self.sample_size(model)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        cond = {k: v.to(dtype) for k, v in self.example_cond(model, batch_size, device).items()}
        added = {k: cond.pop(k) for k in ("text_embeds", "time_ids") if k in cond}
        return {"sample": torch.randn(batch_size, self.in_channels(model), size, size, device=device).to(dtype),
                "timestep": torch.ones(batch_size, dtype=torch.long, device=device),
                **cond, **({"added_cond_kwargs": added} if added else {})}

    def predict(self, model, x_t, t, cond=None):
        hidden = self._need(cond, "encoder_hidden_states")
        if not is_text_time(model):
            return model(x_t, t, encoder_hidden_states=hidden).sample
        added = {"text_embeds": self._need(cond, "text_embeds"), "time_ids": self._need(cond, "time_ids")}
        return model(x_t, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


def is_text_time(model) -> bool:
    """SDXL-style UNet: pooled text embeddings and size/crop `time_ids` add to the timestep embedding."""
    return model.config.get("addition_embed_type") == "text_time"


# --------------------------------------------------------------------------- prompts


class PromptEncoder(CachedPrompts):
    """Prompts -> `encoder_hidden_states` with a pipeline's tokenizer and (frozen) text encoder, or
    from a prompt-embeddings file (`embeds`, prompt_embeds.py; then no encoder is needed)."""

    layout = "sd"

    def __init__(self, tokenizer, text_encoder, embeds: PromptEmbeds | None = None, model=None):
        self._cache: dict[str, tuple[torch.Tensor]] = {}
        self.tokenizer = self.text_encoder = None
        if embeds is not None:
            self.use_file(embeds, {"prompt_embeds": ("cross_attention_dim", int(model.config.cross_attention_dim))},
                          model)
            return
        if tokenizer is None or text_encoder is None:
            raise DiffpruneError("UNet2DConditionModel needs the pipeline's tokenizer and text_encoder to encode "
                                 "prompts (or --prompt-embeds); a bare UNet folder is not supported: give a "
                                 "Stable Diffusion pipeline folder")
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.eval().requires_grad_(False)

    def to(self, device) -> PromptEncoder:
        if self.text_encoder is not None:
            self.text_encoder.to(device)
        return self

    @torch.no_grad()
    def _encode_missing(self, missing: list[str]) -> None:
        enc = self.text_encoder
        tok = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        ids = tok.input_ids.to(enc.device)
        mask = tok.attention_mask.to(enc.device) if getattr(enc.config, "use_attention_mask", False) else None
        out = enc(ids, attention_mask=mask)[0]
        for p, e in zip(missing, out, strict=True):
            self._cache[p] = (e.detach().cpu(),)

    def encode(self, prompts: list[str], device) -> torch.Tensor:
        """(B, L, D) text embeddings, as StableDiffusionPipeline.encode_prompt (no guidance)."""
        return self.rows(prompts, device)[0]

    def cond(self, prompts: list[str], device, time_ids: torch.Tensor | None = None) -> dict:
        return {"encoder_hidden_states": self.encode(prompts, device)}

    def uncond(self, n: int, negative_prompt: str | None, device, time_ids: torch.Tensor | None = None) -> dict:
        """The unconditional branch of CFG: the negative prompt, else the empty prompt (as the pipeline)."""
        return self.cond([negative_prompt or ""] * n, device)


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
