"""The cost half of `evaluate`: params, MACs, latency and sampling throughput of any family's denoiser.

The denoiser is found with the family machinery (`families.pipeline_parts.denoiser_of`, `families.family_for`), so
UNet2DModel, Stable Diffusion UNets, latent pipelines and DiT transformers are measured alike; MACs
are torch-pruning's count at batch 1 and the model's resolution.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from ..errors import DiffpruneError

if TYPE_CHECKING:
    from .stage import EvaluateConfig


THROUGHPUT_PROMPT = "a photograph"  # text-conditional models: sampling cost does not depend on the words


@dataclasses.dataclass
class _Denoiser:
    """A pipeline's denoiser with what cost needs to call and sample it."""

    path: str
    component: str
    model: torch.nn.Module
    family: Any
    scheduler: Any
    ctx: Any  # families.conditioning.PipelineContext

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "component": self.component,
            "family": self.family.name,
            "class": type(self.model).__name__,
            "latent": self.ctx.codec is not None,
        }


def _load_denoiser(path: str, device, seed: int, embeds=None, revision=None, variant=None) -> _Denoiser:
    """The denoiser of any supported pipeline (UNet, SD UNet, DiT; pixel or latent), via the families.

    `embeds` (families.prompt_embeds.PromptEmbeds): text models are conditioned from the file and the
    pipeline's text encoders are not loaded; the throughput prompt is then `THROUGHPUT_PROMPT` if the
    file holds it, else its first non-empty prompt (sampling cost does not depend on the words).
    """
    from ..families import family_for
    from ..families.conditioning import attach_for_sampling, context_for
    from ..families.pipeline_parts import denoiser_of
    from ..io.pipeline import load_pipeline

    pipe = load_pipeline(path, device="cpu", text_encoders=embeds is None, revision=revision, variant=variant)
    component, model = denoiser_of(pipe)
    family = family_for(model)
    ctx = context_for(pipe, family, model, embeds)
    # Throughput only: DiT draws a random label per image from `seed`; text models get one fixed prompt.
    ctx = attach_for_sampling(ctx, prompt=_throughput_prompt(embeds) if ctx.encoder is not None else None,
                              seed=seed)
    return _Denoiser(str(path), component, model.to(device).eval(), family, pipe.scheduler, ctx)


def _throughput_prompt(embeds) -> str:
    if embeds is None or THROUGHPUT_PROMPT in embeds.prompts:
        return THROUGHPUT_PROMPT
    prompt = next((p for p in embeds.prompts if p), None)
    if prompt is None:
        raise DiffpruneError(f"--prompt-embeds {embeds.path!r} holds only the empty prompt; the throughput run "
                             f"needs one more (e.g. {THROUGHPUT_PROMPT!r}: diffprune encode-prompts --prompt ...)")
    return prompt


def _conditioning_note(d: _Denoiser) -> str:
    if d.ctx.encoder is not None:
        return f"prompt {d.ctx.prompts[0]!r}" if d.ctx.prompts else f"prompt {THROUGHPUT_PROMPT!r}"
    if d.ctx.label_seed is not None and d.family.conditional:
        return "random class label per image (drawn from the seed)"
    return "none"


def cost(config: EvaluateConfig) -> dict[str, Any]:
    """Params, MACs (batch 1) and measured latency of `model` (and `teacher_model`), with ratios.

    Every family works (families.family_for): the denoiser is the pipeline's `unet` or `transformer`
    (families.pipeline_parts.denoiser_of); for latent pipelines it is counted and timed in latent space, and the
    throughput (the folder's own scheduler, as `diffprune sample`) includes the autoencoder's decode.
    """
    from ..families.conditioning import load_prompt_embeds
    from ..metrics.latency import forward_latency, image_sampler, ratio, sampling_throughput
    from ..prune.complexity import count_macs_params
    from ..sample.scheduler_loop import sampler_label

    embeds = load_prompt_embeds(config.prompt_embeds)  # a bad file fails before any model loads
    device = torch.device(config.device)
    models: dict[str, _Denoiser] = {}
    if config.teacher_model:
        models["teacher"] = _load_denoiser(config.teacher_model, device, config.seed, embeds, config.revision,
                                            config.variant)
    models["student"] = _load_denoiser(config.model, device, config.seed, embeds, config.revision, config.variant)
    out: dict[str, Any] = {}
    shapes = {}
    for name, d in models.items():
        macs, params = count_macs_params(d.model, d.family.example_inputs(d.model, 1, device))
        shapes[name] = (d.family.name, d.family.in_channels(d.model), d.family.sample_size(d.model))
        out[name] = {**d.describe(), "params": params, "macs": macs}
    if len(set(shapes.values())) > 1:
        raise DiffpruneError(
            f"teacher and student take different inputs {shapes}; cost ratios need the same "
            "(family, channels, resolution)"
        )
    student = models["student"]
    torch.manual_seed(config.seed)
    inputs = student.family.example_inputs(student.model, config.latency_batch_size, device)
    out["macs_protocol"] = (
        "one denoiser forward pass, batch 1, model resolution (latent resolution for latent pipelines) (PAPER.md)"
    )
    out["latency"] = forward_latency(
        {n: d.model for n, d in models.items()},
        inputs,
        repeats=config.latency_repeats,
        warmup=config.latency_warmup,
        device=device,
    )
    if config.throughput_images > 0:
        samplers = {
            n: image_sampler(
                d.model,
                d.scheduler,
                config.throughput_images,
                steps=config.throughput_steps,
                device=device,
                seed=config.seed,
                ctx=d.ctx,
            )
            for n, d in models.items()
        }
        out["throughput"] = sampling_throughput(
            samplers, repeats=config.throughput_repeats, warmup=1, device=device
        )
        labels = {n: sampler_label(type(d.scheduler).__name__, "pipeline", "uniform", config.throughput_steps)
                  for n, d in models.items()}
        for n, label in labels.items():
            out["throughput"][n]["scheduler"] = label
        out["throughput"]["settings"].update(
            {
                "sampler": "pipeline",
                "scheduler": " / ".join(dict.fromkeys(labels.values())),  # one label unless teacher's differs
                "eta": 0.0,
                "spacing": "uniform",
                "steps": config.throughput_steps,
                "images_per_call": config.throughput_images,
                "conditioning": _conditioning_note(student),
                "decode": "autoencoder decode included"
                if student.ctx.codec is not None
                else "none (pixel space)",
            }
        )
    if "teacher" in models:
        t, s = out["teacher"], out["student"]
        out["ratios"] = {
            "params_student_over_teacher": ratio(s["params"], t["params"]),
            "macs_student_over_teacher": ratio(s["macs"], t["macs"]),
            "macs_speedup_teacher_over_student": ratio(t["macs"], s["macs"]),
            "latency_speedup": ratio(
                out["latency"]["teacher"]["median_ms"], out["latency"]["student"]["median_ms"]
            ),
        }
        if "throughput" in out:
            out["ratios"]["throughput_speedup"] = ratio(
                out["throughput"]["student"]["images_per_s"], out["throughput"]["teacher"]["images_per_s"]
            )
    return out
