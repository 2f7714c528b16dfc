"""The evaluate stage: FID/KID, SSIM consistency, CLIP score, params/MACs, latency and throughput in one JSON.

PAPER.md ("Evaluation protocol"): FID of the samples against reference statistics (Heusel et al.
2017), KID (Binkowski et al. 2018), SSIM consistency between teacher and student samples drawn from
the same noise (Wang et al. 2004), MACs and params of one forward pass at batch 1. We add measured
forward latency and sampling throughput (the folder's own scheduler) next to the MAC ratio, and for
text-to-image samples the CLIP score against the prompts they were generated from (metrics/clip_score.py, torchmetrics'
CLIPScore). Every number carries the name of the feature extractor it came from and the sample counts behind it.

`evaluate(EvaluateConfig(...))` is the API; `diffprune evaluate` maps its flags one to one.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from ..config import StageConfig
from ..errors import DiffpruneError, check_range
from ..fsutil import write_json_atomic
from ..metrics.clip_score import DEFAULT_CLIP_MODEL
from .cost import cost
from .outputs import DEFAULT_OUTPUT_NAME, RESULT_FORMAT, check_outputs
from .reference import check_stats_match, compare_sets, is_stats_file, load_reference

logger = logging.getLogger(__name__)

RESULT_VERSION = 1
REFERENCE_SPLITS = ("all", "train", "test")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(StageConfig):
    """Settings of one evaluation. Every metric whose inputs are given is computed.

    - FID/KID: `samples` + `reference` ("digits", an image folder, an image .npz, or a stats .npz), with
      `feature_net` "auto" (the digits net for grayscale images of at most 32 px, else refused),
      "digits" or "inception" (`metrics/feature_choice.py`).
    - SSIM/MSE/PSNR consistency: `samples` + `teacher_samples` (paired by index).
    - CLIP score: `samples` + `clip_score` (prompts from the sample folder's sample_config.json),
      with the CLIP checkpoint `clip_model` (a local folder or hub id).
    - Cost: `model` (and `teacher_model` for ratios): params, MACs, forward latency, and sampling
      throughput when `throughput_images` > 0, of the pipeline's denoiser (any supported family).
    """

    stage = "evaluate"
    version = 1

    samples: str | None = None
    reference: str | None = None
    reference_split: str = "all"
    teacher_samples: str | None = None
    model: str | None = None
    teacher_model: str | None = None
    revision: str | None = None  # hub ids of model / teacher_model: branch, tag or commit
    variant: str | None = None  # weights variant (e.g. fp16) read where a folder has it
    prompt_embeds: str | None = None  # text models' throughput without text encoders (families/prompt_embeds.py)
    feature_net: str = "auto"  # auto: digits for grayscale images <= 32 px, else refused (metrics/feature_choice.py)
    inception_weights: str | None = None
    digits_weights: str | None = None
    save_stats: str | None = None
    clip_score: bool = False
    clip_model: str = DEFAULT_CLIP_MODEL  # torchmetrics' default
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    latency_repeats: int = 20
    latency_warmup: int = 3
    latency_batch_size: int = 1
    throughput_images: int = 0
    throughput_steps: int = 100
    throughput_repeats: int = 2
    device: str = "cpu"
    seed: int = 0
    output: str | None = None
    allow_download: bool = True

    def validate(self) -> EvaluateConfig:
        from ..metrics.feature_choice import FEATURE_NET_CHOICES

        if self.feature_net not in FEATURE_NET_CHOICES:
            raise DiffpruneError(
                f"feature_net={self.feature_net!r} is not allowed; allowed: {', '.join(FEATURE_NET_CHOICES)}"
            )
        if self.reference_split not in REFERENCE_SPLITS:
            raise DiffpruneError(f"reference_split={self.reference_split!r} is not one of {REFERENCE_SPLITS}")
        for name, low in (
            ("kid_subsets", 1),
            ("kid_subset_size", 2),
            ("latency_repeats", 1),
            ("latency_warmup", 0),
            ("latency_batch_size", 1),
            ("throughput_images", 0),
            ("throughput_steps", 1),
            ("throughput_repeats", 1),
            ("seed", 0),
        ):
            check_range(name, getattr(self, name), low)
        if not any((self.samples, self.model, self.reference and self.save_stats)):
            raise DiffpruneError(
                "nothing to evaluate: give samples (FID/KID/SSIM), model (cost), or "
                "reference + save_stats (statistics only)"
            )
        if self.teacher_samples and not self.samples:
            raise DiffpruneError(
                "teacher_samples given without samples; SSIM compares samples with teacher_samples"
            )
        if self.clip_score and not self.samples:
            raise DiffpruneError("clip_score needs samples: the CLIP score compares each sample with its prompt")
        if self.teacher_model and not self.model:
            raise DiffpruneError(
                "teacher_model given without model; cost ratios compare model with teacher_model"
            )
        if self.prompt_embeds and not self.model:
            raise DiffpruneError("prompt_embeds given without model; it conditions the throughput run of model")
        return self

    def output_path(self) -> Path | None:
        """`output`, else `<samples>/evaluation.json` (beside an .npz), else None (not written)."""
        if self.output:
            return Path(self.output)
        if self.samples:
            s = Path(self.samples)
            return (s if s.is_dir() else s.parent) / DEFAULT_OUTPUT_NAME
        return None


# --------------------------------------------------------------------------- FID / KID


def _set_stats(extractor, images, what: str, warnings: list[str]):
    from ..metrics.fid import check_count, compute_stats

    warnings += check_count(len(images), extractor.dim, what)
    return compute_stats(extractor(images.images), extractor.name, source=images.source)


def fidelity(config: EvaluateConfig, samples, warnings: list[str]) -> dict[str, Any]:
    """FID and KID of `samples` (an ImageSet or None) against `config.reference`.

    The feature net is chosen (`metrics.feature_choice`) from the samples and the reference once both
    are read: with `auto`, a set the digits net does not fit is refused before any network is loaded
    and before any file is written.
    """
    from ..metrics.feature_choice import choose_feature_net
    from ..metrics.features import get_feature_extractor
    from ..metrics.fid import frechet_distance, kernel_inception_distance, save_stats

    ref_path = Path(config.reference)
    ref_is_stats = is_stats_file(ref_path)
    if ref_is_stats and config.save_stats:
        raise DiffpruneError(
            f"--reference {config.reference} is already a statistics file; --save-stats "
            "saves the statistics of an image reference (a folder, an .npz of images, or digits)"
        )
    sets = [] if samples is None else [(f"--samples {samples.source}", samples.images)]
    ref, ref_images, reference_info = load_reference(config, samples, ref_is_stats)  # its own errors first
    if ref_images is not None:
        sets.append((f"--reference {ref_images.source}", ref_images.images))
    net, why, choice_warnings = choose_feature_net(
        config.feature_net, sets, ref.feature_extractor if ref is not None else None
    )
    if ref is not None:
        check_stats_match(ref_path, ref, net)  # before the (maybe large) network is loaded
    for w in choice_warnings:
        logger.warning(w)
    warnings += choice_warnings
    extractor = get_feature_extractor(
        net,
        device=config.device,
        inception_weights=config.inception_weights,
        digits_weights=config.digits_weights,
        allow_download=config.allow_download,
    )
    notes: list[str] = []
    if ref_is_stats:
        if ref.feature_extractor != extractor.name:
            raise DiffpruneError(
                f"{ref_path} holds {ref.feature_extractor!r} statistics but --feature-net "
                f"{net} gives {extractor.name!r}; use the matching feature net"
            )
        if ref.dim != extractor.dim:
            raise DiffpruneError(
                f"{ref_path}: {ref.dim}-d statistics, but {extractor.name} gives {extractor.dim}-d"
            )
    else:
        notes += ref_images.notes
        if samples is not None:
            notes += compare_sets(samples, ref_images)
        ref = _set_stats(extractor, ref_images, f"reference {ref_images.source}", warnings)
        if config.save_stats:
            save_stats(config.save_stats, ref)
            reference_info["saved_stats"] = str(config.save_stats)
            print(
                f"wrote reference statistics ({extractor.name}, {ref.num_images} images) to {config.save_stats}"
            )
    result: dict[str, Any] = {
        "feature_extractor": extractor.name,
        "feature_net": net,
        "feature_net_choice": why,
        "feature_dim": extractor.dim,
        "reference": reference_info,
    }
    if samples is None:
        return {"reference_stats": {**result, "conversions": extractor.conversions, "notes": notes}}
    samp = _set_stats(extractor, samples, f"samples {samples.source}", warnings)
    notes += samples.notes
    if extractor.name == "inception-v3-pytorch-fid":
        result["weights"] = str(extractor.weights_path)
    base = {
        **result,
        "num_samples": samp.num_images,
        "num_reference": ref.num_images,
        "conversions": list(extractor.conversions),
        "notes": notes,
    }
    out = {
        "fid": {
            "value": frechet_distance(samp.mu, samp.sigma, ref.mu, ref.sigma),
            **base,
            "definition": "Heusel et al. 2017, Frechet distance of Gaussian fits (ddof=1)",
        }
    }
    if ref.features is None:
        msg = f"KID skipped: {ref_path} has no 'features' array (statistics saved without features)"
        warnings.append(msg)
        logger.warning(msg)
    else:
        kid = kernel_inception_distance(
            samp.features,
            ref.features,
            subsets=config.kid_subsets,
            subset_size=config.kid_subset_size,
            seed=config.seed,
        )
        out["kid"] = {
            **kid,
            **base,
            "definition": "Binkowski et al. 2018, unbiased MMD^2, kernel (x.y/d + 1)^3",
        }
    return out


# --------------------------------------------------------------------------- stage


def evaluate(config: EvaluateConfig, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run every metric whose inputs `config` names; write the JSON (see `output_path`) and return it.

    Before any work the outputs are checked (`outputs.check_outputs`): never an input file or one
    inside an input; an existing file (the JSON, `save_stats`) only if `overwrite` and evaluate wrote
    it, else one DiffpruneError line, as the other stages refuse an existing output folder.
    `progress`: the CLIP score's progress bar (the one long loop evaluate shows).
    """
    from ..io.pipeline import library_versions
    from ..metrics.imageset import load_image_set
    from ..metrics.ssim import consistency

    config.validate()
    check_outputs(config, overwrite)
    warnings: list[str] = []
    result: dict[str, Any] = {"format": RESULT_FORMAT, "format_version": RESULT_VERSION}
    samples = load_image_set(config.samples) if config.samples else None
    if samples is not None:
        result["samples"] = samples.describe()
    if config.reference:
        result.update(fidelity(config, samples, warnings))
    elif samples is not None:
        logger.info("no reference given: FID/KID skipped")
    if config.clip_score:
        from ..metrics.clip_score import clip_result

        result["clip_score"] = clip_result(samples, config.samples, config.clip_model, config.device,
                                           config.allow_download, progress=progress)
    if config.teacher_samples:
        teacher = load_image_set(config.teacher_samples)
        result["consistency"] = {
            "teacher_samples": teacher.describe(),
            "student_samples": samples.describe(),
            **consistency(teacher, samples),
        }
    if config.model:
        result["cost"] = cost(config)
    result["warnings"] = warnings
    result["config"] = config.to_dict()
    result["versions"] = library_versions()
    path = config.output_path()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, result)
        result["output"] = str(path)
    return result


def format_table(result: dict[str, Any]) -> str:
    """A short human-readable summary of an evaluation result."""
    rows: list[tuple[str, str, str]] = []
    if "fid" in result:
        f = result["fid"]
        rows.append(
            (
                "FID",
                f"{f['value']:.4f}",
                f"{f['feature_extractor']}, {f['num_samples']} vs {f['num_reference']} images",
            )
        )
    if "kid" in result:
        k = result["kid"]
        rows.append(
            ("KID", f"{k['mean']:.5f} +- {k['std']:.5f}", f"{k['subsets']} subsets of {k['subset_size']}")
        )
    if "consistency" in result:
        c = result["consistency"]
        rows.append(
            ("SSIM", f"{c['ssim']['mean']:.4f} +- {c['ssim']['std']:.4f}", f"{c['num_pairs']} pairs by index")
        )
        rows.append(("PSNR", f"{c['psnr_db']['mean']:.2f} dB", f"MSE {c['mse']['mean']:.5f}"))
    if "clip_score" in result:
        c = result["clip_score"]
        rows.append(("CLIP score", f"{c['value']:.4f}", f"{c['clip_model']}, {c['num_images']} images, "
                                                        f"{c['num_prompts']} prompt(s)"))
    if "cost" in result:
        c = result["cost"]
        for name in ("teacher", "student"):
            if name in c:
                lat = c["latency"][name]
                rows.append(
                    (
                        f"{name} params/MACs",
                        f"{c[name]['params'] / 1e6:.3f}M / {c[name]['macs'] / 1e9:.4f}G",
                        f"latency {lat['median_ms']:.2f} ms (p10 {lat['p10_ms']:.2f}, p90 {lat['p90_ms']:.2f})",
                    )
                )
                if "throughput" in c:
                    rows.append(
                        (
                            f"{name} throughput",
                            f"{c['throughput'][name]['images_per_s']:.2f} img/s",
                            c["throughput"][name].get("scheduler", f"{c['throughput']['settings']['steps']} steps"),
                        )
                    )
        if "ratios" in c:
            r = c["ratios"]
            rows.append(
                (
                    "speed-up",
                    f"x{r['latency_speedup']:.2f} measured",
                    f"x{r['macs_speedup_teacher_over_student']:.2f} by MACs, "
                    f"{c['latency']['settings']['torch_threads']} threads, batch {c['latency']['batch_size']}",
                )
            )
    if "reference_stats" in result:
        r = result["reference_stats"]
        rows.append(("reference stats", r["feature_extractor"], str(r["reference"].get("saved_stats", ""))))
    if not rows:
        return "(no metrics)"
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)


__all__ = ["EvaluateConfig", "evaluate", "format_table"]
