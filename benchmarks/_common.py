"""Helpers shared by the seeded digits benchmarks (table1.py, budget_curve.py, importance_cost.py, ...).

One definition of each protocol step, so that every benchmark prunes, post-trains, samples and
evaluates a row the same way: prune to 56% of the teacher's MACs (the paper's 3.4G/6.1G), post-train
with the teacher's own recipe (train_config.json), sample from the same initial noise (DDIM, eta 0,
seed 0) so SSIM pairs image i of the teacher with image i of each student, and score digits-FID/KID.
`--smoke` runs put `smoke_teacher` in the embedded teacher's place.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from diffprune.evaluate.stage import EvaluateConfig, evaluate
from diffprune.metrics.latency import cpu_model
from diffprune.prune.pruning import PruneConfig
from diffprune.prune.stage import run_prune
from diffprune.sample.loop import sample_to_folder
from diffprune.train import FinetuneConfig, run_training

TARGET_MACS = 0.56
FAST_POOL = 512  # calibration images the fast estimator draws its (image, t) pairs from
# --smoke's stand-in teacher: the embedded teacher's image size and channels (16x16 grayscale, so digits-FID/KID
# and SSIM apply), 2 levels of 16/32 channels, random weights, 20 training timesteps (the sweeps cost 1/50 of the
# real ones), and the teacher's recipe with 100 steps (post-training fractions of 1-2% stay >= 1 distinct step).
SMOKE_UNET = dict(sample_size=16, in_channels=1, block_out_channels=(16, 32), layers_per_block=1, attention_levels=(1,),
                  norm_num_groups=4, attention_head_dim=8)
SMOKE_TIMESTEPS = 20
SMOKE_RECIPE = {"steps": 100, "batch_size": 8}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every task of a seeded benchmark needs; picklable so worker processes receive it."""

    teacher: Path
    recipe: dict  # the teacher's train_config.json
    budget: object  # the benchmark's Budget dataclass (num_images, sample_steps, calibration_batch, ...)
    work: Path


def teacher_recipe(teacher: Path) -> dict:
    """The embedded teacher's own training settings (its train_config.json)."""
    import json

    return json.loads((teacher / "train_config.json").read_text())


def smoke_teacher(folder: Path, model_config: dict | None = None) -> Path:
    """A tiny random-weight digits-shaped teacher pipeline in `folder` (made once) for --smoke runs: every
    protocol step (sweeps, prune, post-training, sampling, evaluation) runs in seconds; its numbers mean nothing.
    `model_config`: another UNet2DModel config (default SMOKE_UNET's), e.g. the embedded teacher's own."""
    import json

    from diffusers import DDPMPipeline, DDPMScheduler

    from diffprune.cli.demo_job import embedded_teacher
    from diffprune.io import save_pipeline
    from diffprune.train.fresh_model import build_unet, unet_config

    if (folder / "train_config.json").exists():
        return folder
    real = embedded_teacher()
    config = unet_config(**SMOKE_UNET) if model_config is None else model_config
    scheduler = DDPMScheduler.from_pretrained(real / "scheduler")
    scheduler = DDPMScheduler.from_config(scheduler.config, num_train_timesteps=SMOKE_TIMESTEPS)
    folder.mkdir(parents=True, exist_ok=True)
    save_pipeline(DDPMPipeline(unet=build_unet(config, seed=0).eval(), scheduler=scheduler), folder)
    recipe = teacher_recipe(real)
    recipe.update(SMOKE_RECIPE, model_config=config,
                  scheduler_config={**recipe["scheduler_config"], "num_train_timesteps": SMOKE_TIMESTEPS})
    write_text_atomic(folder / "train_config.json", json.dumps(recipe, indent=2) + "\n")
    return folder


def machine(threads: bool = False) -> str:
    """CPU model and core count (and torch's thread count with `threads`), for the reports."""
    text = f"{cpu_model()} ({os.cpu_count()} cores"
    if threads:
        import torch

        text += f", torch threads {torch.get_num_threads()}"
    return text + ")"


def worker_init() -> None:
    """Each worker process computes on one torch thread (the benchmarks run `--jobs` of them)."""
    import torch

    torch.set_num_threads(1)


def aggregate(values: list) -> dict:
    """mean / sample std / n / values over seeds, None entries left out."""
    nums = [v for v in values if v is not None]
    if not nums:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(nums)), "std": float(np.std(nums, ddof=1)) if len(nums) > 1 else 0.0,
            "n": len(nums), "values": nums}


def prune_row(plan: Plan, method: str, threshold: float, seed: int, estimator: str, out: Path,
              importance=None) -> dict:
    """`diffprune prune` of the teacher to TARGET_MACS; the estimator is always named (never a default).

    The fast estimator draws its pairs from FAST_POOL images, the exact sweep uses one calibration batch.
    """
    fast = estimator == "fast"
    return run_prune(PruneConfig(model=str(plan.teacher), data="digits", method=method, target_macs=TARGET_MACS,
                                 threshold=threshold, seed=seed, estimator=estimator,
                                 batch_size=FAST_POOL if fast else plan.budget.calibration_batch),
                     out, overwrite=True, progress=False, importance=importance)


def finetune(plan: Plan, pruned: Path, out: Path, steps: int, seed: int, resume: bool = False) -> Path:
    """Post-train `pruned` for `steps` steps with the teacher's recipe (batch, lr, EMA, dropout)."""
    r = plan.recipe
    cfg = FinetuneConfig(model=str(pruned), data="digits", steps=steps, batch_size=r["batch_size"], lr=r["lr"],
                         ema_decay=r["ema_decay"], ema_warmup=r["ema_warmup"], dropout=r["dropout"], seed=seed,
                         checkpoint_every=steps, keep_checkpoints=1)
    return run_training(cfg, out, resume=resume, overwrite=not resume, progress=False, tensorboard=False)


def sample_and_evaluate(plan: Plan, model: Path, name: str, against_teacher: bool = True) -> dict:
    """Sample `model` into work/samples/<name> (seed-0 noise, the budget's DDIM steps) and evaluate it.

    FID/KID against the 1797 digits; with `against_teacher`, SSIM against work/samples/teacher (which
    the teacher's own call, `against_teacher=False`, writes). The evaluation lands in work/evaluation.
    """
    b = plan.budget
    samples = sample_to_folder(model, plan.work / "samples" / name, b.num_images, batch_size=250,
                               steps=b.sample_steps, sampler="ddim", seed=0, overwrite=True, progress=False)
    pair = ({"teacher_samples": str(plan.work / "samples" / "teacher"), "teacher_model": str(plan.teacher)}
            if against_teacher else {})
    return evaluate(EvaluateConfig(samples=str(samples), reference="digits", model=str(model), allow_download=False,
                                   output=str(plan.work / "evaluation" / f"{name}.json"), **pair),
                    overwrite=True)  # a rerun in the same work folder re-evaluates, as it re-samples


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
