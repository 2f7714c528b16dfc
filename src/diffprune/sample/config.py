"""The sample stage's config and its folder rules: what decides a sample folder's content
(`SampleConfig`, versioned), which settings a `--resume` must agree on, and where a run writes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import StageConfig
from ..errors import DiffpruneError, check_range
from ..families.guidance import check_guidance
from ..fsutil import check_output_dir, read_json
from .scheduler_loop import PIPELINE, SAMPLERS
from .schedules import CLIP_MODES, SPACINGS

CONFIG_FILE = "sample_config.json"
# Settings that change image content: a --resume run must agree on all of them.
# "version": version 1 ignored the scheduler's steps_offset / timestep_spacing / set_alpha_to_one.
# Version 3 added classifier-free guidance; a version-2 folder equals version 3 with guidance off.
# Version 4 made the folder's own scheduler the default sampler ("pipeline") and records its class
# ("scheduler", informational: the model and sampler decide it); versions 1-3 name "ddim" or "ddpm".
CONTENT_KEYS = ("version", "model", "model_fingerprint", "seed", "steps", "eta", "sampler", "spacing",
                "clip_sample", "prompt", "class_labels", "guidance_scale", "negative_prompt", "guidance_rescale")
GUIDANCE_OFF = {"guidance_scale": 1.0, "negative_prompt": None, "guidance_rescale": 0.0}


@dataclasses.dataclass(frozen=True)
class SampleConfig(StageConfig):
    """Everything that decides a sample folder's content (plus batch size, which does not).

    Version 2: "uniform" follows the scheduler config's steps_offset / timestep_spacing /
    set_alpha_to_one / thresholding (version 1 ignored them), and `clip_sample` was added.
    Version 3: classifier-free guidance (`guidance_scale`, `negative_prompt`, `guidance_rescale`).
    Version 4: sampler "pipeline" (the default: the folder's own scheduler class, `set_timesteps` + `step`,
    as the diffusers pipeline runs it) and `scheduler`, the sampler that actually ran, in words.
    """

    stage = "sample"
    version = 4

    model: str
    num_images: int
    batch_size: int = 64
    steps: int = 100
    eta: float = 0.0
    sampler: str = PIPELINE  # "pipeline" (the folder's scheduler), or the paper's "ddim" / "ddpm"
    spacing: str = "uniform"
    seed: int = 0
    model_fingerprint: str = ""
    prompt: str | None = None  # text-conditional UNets: the prompt of every image
    class_labels: str | None = None  # DiT: labels cycled over image indices (default: random per index)
    clip_sample: str = "auto"  # predicted x0: "auto" (the scheduler config), "on" or "off"
    guidance_scale: float = 1.0  # classifier-free guidance scale s (on when s > 1, as diffusers)
    negative_prompt: str | None = None  # text-conditional UNets: the unconditional branch's prompt
    guidance_rescale: float = 0.0  # diffusers' guidance_rescale (Lin et al. 2024, sec. 3.4)
    prompt_embeds: str | None = None  # the prompt-embeddings file read instead of the text encoders
    revision: str | None = None  # the hub revision of a hub-id model (recorded; the fingerprint decides content)
    variant: str | None = None  # the weights variant read, e.g. "fp16" (recorded; the fingerprint decides content)
    scheduler: str = ""  # what ran, e.g. "PNDMScheduler (the folder's own), 50 steps" (scheduler_loop.sampler_label)

    def __post_init__(self):
        check_range("num_images", self.num_images, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("steps", self.steps, 1)
        check_range("eta", self.eta, 0.0)
        check_range("seed", self.seed, 0)
        if self.sampler not in SAMPLERS:
            raise DiffpruneError(f"sampler={self.sampler!r} is not supported; allowed: {SAMPLERS}")
        if self.spacing not in SPACINGS:
            raise DiffpruneError(f"spacing={self.spacing!r} is not supported; allowed: {SPACINGS}")
        if self.clip_sample not in CLIP_MODES:
            raise DiffpruneError(f"clip_sample={self.clip_sample!r} is not supported; allowed: {CLIP_MODES}")
        check_guidance(self.guidance_scale, self.guidance_rescale, self.negative_prompt)

    @classmethod
    def from_dict(cls, data):
        """Also reads versions 1 and 2 (no guidance: scale 1, no negative prompt, rescale 0). Version 1
        has no clip_sample key (it clipped as the config says, i.e. "auto"); its "uniform" images equal
        later versions' only for schedulers with steps_offset 0, "leading", set_alpha_to_one true and no
        thresholding, so a --resume refuses to mix them (CONTENT_KEYS); version 2 equals version 3."""
        data = upgrade_v2(data)
        if data.get("stage", cls.stage) == cls.stage and data.get("version") == 1:
            data.update(version=cls.version, clip_sample=data.get("clip_sample", "auto"), **GUIDANCE_OFF)
        return super().from_dict(data)


def upgrade_v2(data: dict) -> dict:
    """A version-2 or -3 sample config as the current one of the same images: version 2 had no guidance
    (off), version 3 no "pipeline" sampler (its "ddim" / "ddpm" mean what they mean now)."""
    data = dict(data)
    if data.get("stage", SampleConfig.stage) != SampleConfig.stage:
        return data
    if data.get("version") == 2:
        data.update(version=3, **{k: data.get(k, v) for k, v in GUIDANCE_OFF.items()})
    if data.get("version") == 3:
        data.update(version=SampleConfig.version)
    return data


def check_resume(folder: Path, config: SampleConfig) -> None:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise DiffpruneError(f"--resume: {path} is missing; {str(folder)!r} is not a sample folder "
                             "(choose another --output-dir)")
    old = upgrade_v2(read_json(path, "--resume: sample config"))
    new = config.to_dict()
    diff = [k for k in CONTENT_KEYS if old.get(k) != new.get(k)]
    if diff:
        k = diff[0]
        raise DiffpruneError(f"--resume: {str(folder)!r} was sampled with {k}={old.get(k)!r}, this run has "
                             f"{k}={new.get(k)!r}; use the same settings or --overwrite")


def plan_folder(output_dir: Path, overwrite: bool, resume: bool, config: SampleConfig) -> Path:
    """Where this run writes: the output itself (fresh or resume) or a staging sibling (overwrite)."""
    exists = output_dir.is_dir() and any(output_dir.iterdir())
    if resume and exists:
        check_resume(output_dir, config)
        return output_dir
    if exists and overwrite:
        check_output_dir(output_dir, True, SampleConfig.stage)  # only a folder `sample` wrote
        return output_dir.parent / f".{output_dir.name}.sampling"
    if exists:
        raise DiffpruneError(f"output dir {str(output_dir)!r} already exists; pass --resume to fill in "
                             "missing images or --overwrite to replace it")
    check_output_dir(output_dir, False, SampleConfig.stage)
    return output_dir
