"""Precomputed text embeddings (`--prompt-embeds FILE`): prompts encoded once, elsewhere, then the
denoiser alone prunes / fine-tunes / samples (a pipeline folder without its text encoders will do).

The file is safetensors (never a pickle). Tensors, one row per prompt, named as diffusers'
`encode_prompt` returns them (so its outputs can be saved as they are):

- `sd` (SD 1.x/2.x UNet, `PromptEncoder`): `prompt_embeds` (N, L, cross_attention_dim);
- `sdxl` (SDXL UNet, `SDXLPromptEncoder`): `prompt_embeds` (N, L, cross_attention_dim) and
  `pooled_prompt_embeds` (N, the UNet's pooled width);
- `pixart` (PixArt-alpha/sigma, `PixArtPromptEncoder`): `prompt_embeds` (N, L, caption_channels) and
  `prompt_attention_mask` (N, L);
- `sd3` (SD3 / 3.5, `SD3PromptEncoder`): `prompt_embeds` (N, L, joint_attention_dim) and
  `pooled_prompt_embeds` (N, pooled_projection_dim).

Metadata (strings; JSON where structured): `format` = "diffprune-prompt-embeds", `format_version` =
"1", `layout`, `prompts` (JSON list of the N distinct prompts, row order), `keys` (JSON list of the
tensor names), `source` (JSON object: what encoded them, informational). Row i is exactly what the
family's encoder gives prompt i (PixArt: after its caption cleaning; SDXL / SD3: the pooled
projection of the CLIP encoder(s); SD3 without T5: zero T5 tokens), so conditioning read from the
file equals encoding with the same encoders bit for bit.

Dtypes: `prompt_embeds` / `pooled_prompt_embeds` are float16, bfloat16, float32 or float64 and finite;
they are cast to the denoiser's dtype when a stage uses them (said once on stderr), and refused if a
value does not fit that dtype (e.g. 1e5 in float16). `prompt_attention_mask` holds 0 / 1 as bool, an
integer or a float dtype (the tokenizer gives int64; PixArt turns it into a bias of (1 - mask) * -10000
in the denoiser's dtype), read as int64. Anything else is refused in one line when the file is read.

Required prompts: the empty prompt "" always (the unconditional branch of guidance and caption
dropout), every caption / --prompt a stage uses, and a --negative-prompt when one is given. A
prompt that is not in the file is refused in one line naming it, before any work where possible.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from ..errors import DiffpruneError

FORMAT, FORMAT_VERSION = "diffprune-prompt-embeds", 1
LAYOUTS = {"sd": ("prompt_embeds",), "sdxl": ("prompt_embeds", "pooled_prompt_embeds"),
           "pixart": ("prompt_embeds", "prompt_attention_mask"), "sd3": ("prompt_embeds", "pooled_prompt_embeds")}
RANKS = {"prompt_embeds": 3, "pooled_prompt_embeds": 2, "prompt_attention_mask": 2}  # with the prompt axis
EMPTY = ""  # the unconditional prompt: must be in every file
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MASK = "prompt_attention_mask"
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PromptEmbeds:
    """The contents of a prompt-embeddings file; `tensors[name][i]` belongs to `prompts[i]`."""

    path: str
    layout: str
    prompts: tuple[str, ...]
    tensors: dict[str, torch.Tensor]
    source: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _validate(self)

    def by_prompt(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """{prompt: (its tensors, in LAYOUTS[layout] order)}, the encoders' cache entries."""
        names = LAYOUTS[self.layout]
        return {p: tuple(self.tensors[n][i] for n in names) for i, p in enumerate(self.prompts)}

    def missing(self, prompt: str) -> DiffpruneError:
        what = "the empty prompt" if prompt == EMPTY else f"prompt {prompt!r}"
        return DiffpruneError(f"{what} is not in the prompt embeddings {self.path!r} ({len(self.prompts)} prompts); "
                              "encode every prompt the run uses (diffprune encode-prompts)")

    def require(self, prompts: Iterable[str | None]) -> None:
        """Refuse (one line, the first missing one named) prompts the file does not hold; None is skipped."""
        known = set(self.prompts)
        for p in prompts:
            if p is not None and p not in known:
                raise self.missing(p)

    def cast(self, dtype: torch.dtype) -> PromptEmbeds:
        """The embeddings in the denoiser's float `dtype` (the mask as int64, the tokenizer's dtype); a
        value that does not fit `dtype` (1e5 in float16) is refused."""
        floats = {n: t for n, t in self.tensors.items() if n != MASK}
        cast = {n: t.to(dtype) for n, t in floats.items()}
        for name, t in cast.items():
            if not bool(torch.isfinite(t).all()):
                big = float(floats[name].double().abs().max())
                raise DiffpruneError(f"{self.path}: {name} holds values up to {big:.3g} in magnitude, beyond the "
                                     f"range of the denoiser's {_dtype_name(dtype)} (largest "
                                     f"{torch.finfo(dtype).max:.3g}); allowed: values that fit it")
        if MASK in self.tensors:
            cast[MASK] = self.tensors[MASK].to(torch.int64)
        return dataclasses.replace(self, tensors=cast)

    def check(self, layout: str, widths: Mapping[str, tuple[str, int]]) -> None:
        """The file is for `layout` and each tensor's last dim equals the denoiser's: widths[name] =
        (config key, width), e.g. {"prompt_embeds": ("cross_attention_dim", 768)}."""
        if self.layout != layout:
            raise DiffpruneError(f"{self.path}: prompt embeddings for layout {self.layout!r}, the model needs "
                                 f"{layout!r} ({', '.join(LAYOUTS[layout])})")
        for name, (key, width) in widths.items():
            got = int(self.tensors[name].shape[-1])
            if got != int(width):
                raise DiffpruneError(f"{self.path}: {name} is {got} wide, the denoiser's {key} is {width}; the "
                                     "embeddings were made for another model")


def _validate(e: PromptEmbeds) -> None:
    where = e.path
    if e.layout not in LAYOUTS:
        raise DiffpruneError(f"{where}: layout {e.layout!r} is not known; allowed: {sorted(LAYOUTS)}")
    prompts = e.prompts
    if not all(isinstance(p, str) for p in prompts) or len(set(prompts)) != len(prompts):
        raise DiffpruneError(f"{where}: 'prompts' must be distinct strings")
    if EMPTY not in prompts:
        raise DiffpruneError(f"{where}: the empty prompt \"\" is missing; every file needs it (the unconditional "
                             "branch of guidance and caption dropout)")
    names = LAYOUTS[e.layout]
    if sorted(e.tensors) != sorted(names):
        raise DiffpruneError(f"{where}: tensors {sorted(e.tensors)}; layout {e.layout!r} needs exactly {list(names)}")
    for name in names:
        t = e.tensors[name]
        if t.dim() != RANKS[name] or t.shape[0] != len(prompts) or 0 in t.shape:
            raise DiffpruneError(f"{where}: {name} has shape {tuple(t.shape)}; allowed: {RANKS[name]} non-empty dims, "
                                 f"the first = the {len(prompts)} prompts")
        _check_values(where, name, t)
    mask = e.tensors.get("prompt_attention_mask")
    if mask is not None and tuple(mask.shape) != tuple(e.tensors["prompt_embeds"].shape[:2]):
        raise DiffpruneError(f"{where}: prompt_attention_mask has shape {tuple(mask.shape)}, prompt_embeds "
                             f"{tuple(e.tensors['prompt_embeds'].shape)}; they must agree on (prompts, tokens)")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_values(where: str, name: str, t: torch.Tensor) -> None:
    """Embeddings: a float dtype of FLOAT_DTYPES, finite; the mask: 0 / 1 in bool, an integer or a float dtype."""
    if name != MASK:
        if t.dtype not in FLOAT_DTYPES:
            raise DiffpruneError(f"{where}: {name} is {_dtype_name(t.dtype)}; allowed: "
                                 f"{', '.join(_dtype_name(d) for d in FLOAT_DTYPES)} (cast to the denoiser's dtype)")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise DiffpruneError(f"{where}: {name} holds non-finite values ({bad} NaN/inf of {t.numel()}); "
                                 "allowed: finite values only")
        return
    if t.is_complex():
        raise DiffpruneError(f"{where}: {name} is {_dtype_name(t.dtype)}; allowed: bool or an integer / float dtype "
                             "holding 0 and 1")
    if t.dtype != torch.bool and not bool(((t == 0) | (t == 1)).all()):
        raise DiffpruneError(f"{where}: {name} holds values other than 0 and 1; allowed: 1 for a token the "
                             "denoiser attends to, 0 for padding")


def write_prompt_embeds(path: str | Path, layout: str, prompts: Sequence[str], tensors: Mapping[str, torch.Tensor],
                        source: Mapping | None = None) -> Path:
    """Write a prompt-embeddings file atomically (fsutil.atomic_write); `tensors[name]` has one row per
    prompt, in `prompts` order (module docstring). Validated first: an invalid file is never written."""
    from safetensors.torch import save_file

    from ..fsutil import atomic_write

    embeds = PromptEmbeds(str(path), layout, tuple(prompts), {k: v.detach().cpu().contiguous()
                                                              for k, v in tensors.items()}, dict(source or {}))
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "layout": layout,
            "prompts": json.dumps(list(embeds.prompts)), "keys": json.dumps(list(LAYOUTS[layout])),
            "source": json.dumps(embeds.source, default=str)}
    return atomic_write(path, lambda tmp: save_file(embeds.tensors, str(tmp), metadata=meta))


def read_prompt_embeds(path: str | Path) -> PromptEmbeds:
    """A checked prompt-embeddings file; any problem is one DiffpruneError line naming the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise DiffpruneError(f"prompt embeddings {str(path)!r} do not exist (or are not a file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DiffpruneError(f"{path}: unreadable safetensors file ({str(err).splitlines()[0][:200]})") from None
    if meta.get("format") != FORMAT:
        raise DiffpruneError(f"{path}: not a diffprune prompt-embeddings file (metadata format="
                             f"{meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise DiffpruneError(f"{path}: format_version {meta.get('format_version')!r} is not supported; this "
                             f"diffprune reads {FORMAT_VERSION}")
    prompts, keys, source = (_json_meta(path, meta, k, t) for k, t in (("prompts", list), ("keys", list),
                                                                        ("source", dict)))
    layout = meta.get("layout")
    if layout in LAYOUTS and keys != list(LAYOUTS[layout]):
        raise DiffpruneError(f"{path}: metadata keys {keys}; layout {layout!r} has {list(LAYOUTS[layout])}")
    return PromptEmbeds(str(path), str(layout), tuple(prompts), tensors, source)


def _json_meta(path: Path, meta: dict, key: str, kind: type):
    try:
        value = json.loads(meta[key])
    except (KeyError, TypeError, ValueError, RecursionError):
        raise DiffpruneError(f"{path}: metadata {key!r} is missing or not JSON") from None
    if not isinstance(value, kind):
        raise DiffpruneError(f"{path}: metadata {key!r} must be a JSON {kind.__name__}")
    return value


class CachedPrompts:
    """Mixin of the prompt encoders: per-prompt tensors (LAYOUTS[layout] order) in `_cache`, filled by
    the pipeline's encoders (`_encode_missing`) or, with `use_file`, by a prompt-embeddings file only."""

    layout: str
    embeds: PromptEmbeds | None = None
    _cast_note: str | None = None  # what use_file cast, logged on first use

    def use_file(self, embeds: PromptEmbeds, widths: Mapping[str, tuple[str, int]], model: torch.nn.Module) -> None:
        """Conditioning from `embeds`, checked against the denoiser `model` (layout, widths) and cast to its
        float dtype (PromptEmbeds.cast)."""
        embeds.check(self.layout, widths)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.embeds = embeds.cast(dtype)
        self._cache = self.embeds.by_prompt()
        changed = sorted({_dtype_name(t.dtype) for n, t in embeds.tensors.items() if n != MASK and t.dtype != dtype})
        if changed:  # said once, when the run first uses them (a run refused before that stays one line)
            self._cast_note = f"prompt embeddings {embeds.path} are {', '.join(changed)}; cast to the denoiser's " \
                              f"{_dtype_name(dtype)}"

    def _encode_missing(self, prompts: list[str]) -> None:
        raise NotImplementedError

    def rows(self, prompts: list[str], device) -> list[torch.Tensor]:
        """Per tensor name, the rows of `prompts` stacked (B, ...) on `device`. Each new prompt is encoded
        alone (a batch of one): float matmuls round differently at other batch sizes, so a prompt's
        embedding would otherwise depend on the prompts it happened to be batched with, and a file
        written elsewhere could not equal it bit for bit."""
        if self._cast_note:
            logger.warning("%s", self._cast_note)
            self._cast_note = None
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing and self.embeds is not None:
            raise self.embeds.missing(missing[0])
        for p in missing:
            self._encode_missing([p])
        return [torch.stack([self._cache[p][k] for p in prompts]).to(device)
                for k in range(len(LAYOUTS[self.layout]))]

    def embeddings(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """{tensor name: (N, ...) on the CPU} for distinct `prompts`, as `write_prompt_embeds` takes them."""
        return dict(zip(LAYOUTS[self.layout], self.rows(list(prompts), "cpu"), strict=True))
