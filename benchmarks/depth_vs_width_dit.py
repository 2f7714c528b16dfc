"""Depth against width pruning at equal MACs on a small trained DiT (issue 26 item 3, the transformer family).

depth_vs_width.py's protocol on a transformer: the 4-block DiT of _fast_pool_models.py (DiTPipeline over a
tiny random KL autoencoder, 16x16 RGB digits -> 8x8x4 latents, trained 3000 steps on the digits with
`diffprune finetune --reinit`, null class) is pruned to ~70% and ~56% of its MACs by removing channels (width,
Diff-Pruning: attention head dims, MLP and adaLN widths, the residual width kept, as `diffprune prune` does by
default), whole transformer blocks (depth: Diff-Pruning's Taylor scores, block influence or magnitude) or both
(--depth-split sqrt: blocks to sqrt(target), then width on the shallower model's own sweep; joint: one ranking
of blocks and channels by the one sweep's Taylor cost), then post-trained with the teacher's recipe.
One block is ~25% of the MACs, so depth alone lands at 0.75 / 0.51 / 0.26: at ~70% it goes to 0.51 (the same
pruned model as at ~56%, `same_as`); width rows at depth's 0.75 and 0.51 are there for equal-MACs comparisons.
Calibration (and post-training) use DiT's null class, the label the teacher trained with.
The autoencoder is tiny_kl(sharp=True): the random encoder's posterior std (~1, 3.6x the spread of its means) is
set to ~0, so that `finetune`, which trains on posterior samples, trains on the digits latents that calibration
and the loss below use (the noisy posterior, _fast_pool_models' default before 2026-12-06, makes the training
latents ~93% Gaussian noise: variance ~13 where the digits latents have 1; --noisy-posterior runs on that one).

Quality, the same for every model (the autoencoder is random and untrained, so digits-FID of decoded images
means nothing and is not reported):
  * denoising loss: epsilon MSE on fixed digits latents (digits in none of the calibration batches of seeds
    0..max(3, seeds)-1; the teacher and the post-training saw every digit: digits has no held-out split)
    x fixed stratified timesteps x fixed noise; 1.0 = predicting zero noise; also right after pruning ("before").
  * teacher consistency: student vs teacher samples from the same initial noise (DDIM eta 0, seed 0), the MSE of
    the final latents and the SSIM of the decoded images (the decoder is shared and random: a consistency
    measure, not a quality one). The teacher's samples against each other, unpaired, give the scale.
Each row runs once per seed (seed = calibration + post-training seed); rows whose pruned weights are identical
to an earlier row's (same seed) are post-trained once and marked `same_as`. CPU latency of each pruned
architecture: transformer forward at batch 1 and 8, median of interleaved teacher/student forwards, 1 torch
thread, speed-up = teacher / student (depth_vs_width.measure_latency).

    python benchmarks/depth_vs_width_dit.py --jobs 2 --work /tmp/dvw_dit      # full run: ~11 min, 2 cores (+3 teacher)
    python benchmarks/depth_vs_width_dit.py --jobs 2 --resume                 # continue an interrupted run
    python benchmarks/depth_vs_width_dit.py --jobs 2 --steps 375              # 12.5% post-training: *_375steps.*
    python benchmarks/depth_vs_width_dit.py --smoke --out DIR                 # the code path in < 60 s

Writes benchmarks/results/depth_vs_width_dit.{json,md,png} (--out: into that folder); runs in --work; the
trained teacher is cached in --models (default: --work) as <models>/dit_full_sharp/trained (fast_pool.py's cache;
--noisy-posterior: <models>/dit_full/trained).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import aggregate, finetune, machine
from _fast_pool_models import Calibration, loss_drop, trained
from bench_args import add_smoke_options, results_dir
from depth_vs_width import (
    Plan,
    Row,
    _joint_note,
    _pm,
    budget_and_rows,
    budget_suffix,
    diffprune_source,
    joint_choice,
    measure_latency,
    prune_and_record,
    run_all,
    seed_records,
    task_list,
    write_results,
)

from diffprune.fsutil import write_json_atomic
from diffprune.io import library_versions

THRESHOLD = 0.05  # Diff-Pruning's threshold (the paper's)
EVAL_SEED = 1234  # the denoising loss's timesteps and noise
CALIBRATION_SEEDS = 3  # the loss's digits are in none of seeds 0..max(this, seeds)-1's calibration batches

ROWS = (
    # depth's one-block size (0.754) and width at the same MACs
    Row("width / diff-pruning", "75%", 0.755, "width", "diff-pruning"),
    Row("depth / diff-pruning", "75%", 0.755, "depth", "diff-pruning"),
    Row("depth / block-influence", "75%", 0.755, "depth", "block-influence"),
    Row("depth / magnitude", "75%", 0.755, "depth", "magnitude"),
    Row("width / diff-pruning", "70%", 0.70, "width", "diff-pruning"),
    Row("depth / diff-pruning", "70%", 0.70, "depth", "diff-pruning"),
    Row("depth / block-influence", "70%", 0.70, "depth", "block-influence"),
    Row("depth / magnitude", "70%", 0.70, "depth", "magnitude"),
    Row("both / diff-pruning", "70%", 0.70, "both", "diff-pruning"),
    Row("both (joint) / diff-pruning", "70%", 0.70, "both", "diff-pruning", split="joint"),
    Row("width / diff-pruning", "56%", 0.56, "width", "diff-pruning"),
    Row("depth / diff-pruning", "56%", 0.56, "depth", "diff-pruning"),
    Row("depth / block-influence", "56%", 0.56, "depth", "block-influence"),
    Row("depth / magnitude", "56%", 0.56, "depth", "magnitude"),
    Row("both / diff-pruning", "56%", 0.56, "both", "diff-pruning"),
    Row("both (joint) / diff-pruning", "56%", 0.56, "both", "diff-pruning", split="joint"),
    # width at depth's two-block MACs (0.507), for the equal-MACs comparison
    Row("width / diff-pruning", "51%", 0.51, "width", "diff-pruning"),
)
BY_TAG = {r.tag: r for r in ROWS}
# --smoke: width, depth by Taylor (and at 56%: `same_as`), by block influence, both sqrt, both joint
SMOKE_ROWS = ("width_diff-pruning_56", "depth_diff-pruning_70", "depth_diff-pruning_56", "depth_block-influence_56",
              "both_diff-pruning_70", "both_diff-pruning_56_joint")
# paired comparisons (a, b): b - a per seed; the first of each group is the reference
COMPARE = (
    ("width at equal MACs (~0.75)", "width_diff-pruning_76",
     ("depth_diff-pruning_76", "depth_block-influence_76", "depth_magnitude_76")),
    ("width at equal MACs (~0.51)", "width_diff-pruning_51",
     ("depth_diff-pruning_56", "depth_block-influence_56", "depth_magnitude_56")),
    ("width at ~70%", "width_diff-pruning_70", ("both_diff-pruning_70", "both_diff-pruning_70_joint")),
    ("width at ~56%", "width_diff-pruning_56", ("both_diff-pruning_56", "both_diff-pruning_56_joint")),
    ("depth by Diff-Pruning (1 block)", "depth_diff-pruning_76", ("depth_block-influence_76", "depth_magnitude_76")),
    ("depth by Diff-Pruning (2 blocks)", "depth_diff-pruning_56", ("depth_block-influence_56", "depth_magnitude_56")),
    ("both, sqrt split (70%)", "both_diff-pruning_70", ("both_diff-pruning_70_joint",)),
    ("both, sqrt split (56%)", "both_diff-pruning_56", ("both_diff-pruning_56_joint",)),
)


@dataclasses.dataclass(frozen=True)
class Budget:
    seeds: int
    steps: int  # post-training steps
    eval_images: int  # denoising loss: digits latents ...
    eval_timesteps: int  # ... x this many stratified timesteps each
    num_samples: int  # teacher consistency: samples from the same noise
    sample_steps: int  # DDIM, eta 0
    calibration_batch: int  # block influence's images
    fast_pool: int  # Diff-Pruning's fast estimator draws its (image, t) pairs from this many images
    latency_repeats: int
    latency_warmup: int


# 150 post-training steps = 5% of the teacher's 3000, the fraction depth_vs_width.py gives the UNet (100 of 2000);
# a step of this DiT costs ~0.1 s on one thread, a Diff-Pruning sweep ~10 s: 5 seeds fit ~30 min on 2 cores
FULL = Budget(seeds=5, steps=150, eval_images=512, eval_timesteps=8, num_samples=256, sample_steps=20,
              calibration_batch=64, fast_pool=512, latency_repeats=60, latency_warmup=5)
SMOKE = Budget(seeds=1, steps=2, eval_images=16, eval_timesteps=2, num_samples=8, sample_steps=2,
               calibration_batch=4, fast_pool=8, latency_repeats=2, latency_warmup=1)


# --------------------------------------------------------------------------- the fixed evaluation


_CACHE: dict = {}  # per worker process: the evaluation set and the teacher's samples


def _null_class(teacher: Path) -> int:
    return int(json.loads((teacher / "transformer" / "config.json").read_text())["num_embeds_ada_norm"])


def eval_set(plan: Plan) -> dict:
    """The denoising loss's inputs, the same for every model: latents of the digits in none of the calibration
    batches of seeds 0..max(CALIBRATION_SEEDS, seeds)-1 (the first eval_images of them), each at eval_timesteps
    stratified timesteps (one per 1/K of [0, T)), noise and timesteps drawn from EVAL_SEED; null class."""
    if "eval" in _CACHE:
        return _CACHE["eval"]
    from diffprune.data import batch_indices
    from diffprune.families import family_for
    from diffprune.io import load_pipeline

    b = plan.budget
    pipe = load_pipeline(plan.teacher)
    model = pipe.transformer
    calib = Calibration(pipe, family_for(model), model, plan.teacher)
    n = len(calib.dataset)
    seeds = max(CALIBRATION_SEEDS, b.seeds)
    used = {i for s in range(seeds) for i in batch_indices(n, max(b.fast_pool, b.calibration_batch), s)}
    idx = [i for i in range(n) if i not in used][:b.eval_images]
    with torch.no_grad():
        x0 = calib.ctx.to_model_space(torch.stack([calib.dataset[i] for i in idx]))
    k, total = b.eval_timesteps, int(pipe.scheduler.config.num_train_timesteps)
    if pipe.scheduler.config.prediction_type != "epsilon":
        raise SystemExit(f"the DiT's scheduler predicts {pipe.scheduler.config.prediction_type!r}, not epsilon")
    g = torch.Generator().manual_seed(EVAL_SEED)
    u = torch.rand(len(idx), k, generator=g, dtype=torch.float64)
    t = ((torch.arange(k, dtype=torch.float64) + u) * total / k).long().clamp(max=total - 1).flatten()
    noise = torch.randn(len(idx) * k, *x0.shape[1:], generator=g)
    x0 = x0.repeat_interleave(k, dim=0)
    _CACHE["eval"] = {"x_t": pipe.scheduler.add_noise(x0, noise, t), "t": t, "noise": noise, "k": k,
                      "labels": torch.full((len(t),), _null_class(plan.teacher), dtype=torch.long),
                      "images": len(idx), "first_index": idx[0] if idx else None,
                      "excluded_calibration_images": len(used), "excluded_seeds": seeds,
                      "t_bin_edges": [round(j * total / k) for j in range(k + 1)]}
    return _CACHE["eval"]


@torch.no_grad()
def denoising_loss(plan: Plan, model) -> dict:
    """Epsilon MSE of `model` on eval_set: overall and per timestep stratum (K bins of [0, T))."""
    from diffprune.families import family_for

    ev, family = eval_set(plan), family_for(model)
    model.eval()
    errors = []
    for i in range(0, len(ev["t"]), 512):
        s = slice(i, i + 512)
        pred = family.predict(model, ev["x_t"][s], ev["t"][s], {"class_labels": ev["labels"][s]})
        errors.append(((pred.float() - ev["noise"][s]) ** 2).flatten(1).mean(1))
    e = torch.cat(errors).view(-1, ev["k"])
    return {"mse": float(e.mean()), "by_t": [float(v) for v in e.mean(0)], "pairs": int(e.numel()),
            "images": ev["images"]}


@torch.no_grad()
def sample_latents(plan: Plan, model, scheduler) -> torch.Tensor:
    """Final latents of num_samples samples: DDIM eta 0, sample_steps steps, image i from noise seed (0, i)."""
    from diffprune.families import family_for
    from diffprune.sample.loop import denoise, image_generators

    n, b = plan.budget.num_samples, plan.budget
    model.eval()
    gens = image_generators(0, range(n))
    size = int(model.config.sample_size)
    noise = torch.stack([torch.randn(int(model.config.in_channels), size, size, generator=g) for g in gens])
    cond = {"class_labels": torch.full((n,), _null_class(plan.teacher), dtype=torch.long)}
    return denoise(model, scheduler, noise, gens, steps=b.sample_steps, eta=0.0, sampler="ddim",
                   family=family_for(model), cond=cond).float()


def decoded(pipe, latents: torch.Tensor) -> torch.Tensor:
    """The shared (random) KL decoder's images of `latents`, clamped to [-1, 1]."""
    from diffprune.families.latent import codec_of

    return codec_of(pipe).decode(latents).clamp(-1, 1)


def compare(a: torch.Tensor, b: torch.Tensor, images_a: torch.Tensor, images_b: torch.Tensor) -> dict:
    from diffprune.metrics.ssim import ssim_per_image

    mse = ((a - b) ** 2).flatten(1).mean(1)
    ssim = ssim_per_image(images_a, images_b)
    return {"latent_mse": float(mse.mean()), "latent_mse_std": float(mse.std()) if len(mse) > 1 else 0.0,
            "ssim": float(ssim.mean()), "ssim_std": float(ssim.std())}


def teacher_samples(plan: Plan) -> dict:
    """The teacher's sample latents and decoded images (written by the teacher task, read by each stage)."""
    if "teacher" not in _CACHE:
        _CACHE["teacher"] = torch.load(plan.work / "samples" / "teacher.pt")
    return _CACHE["teacher"]


# --------------------------------------------------------------------------- tasks (spawned workers)


def _teacher_task(plan: Plan) -> dict:
    from diffprune.io import load_pipeline

    start = time.perf_counter()
    pipe = load_pipeline(plan.teacher)
    loss = denoising_loss(plan, pipe.transformer)
    latents = sample_latents(plan, pipe.transformer, pipe.scheduler)
    images = decoded(pipe, latents)
    (plan.work / "samples").mkdir(parents=True, exist_ok=True)
    torch.save({"latents": latents, "images": images}, plan.work / "samples" / "teacher.pt")
    # the scale: teacher sample i against teacher sample i+1 (different noise, no pairing)
    unpaired = compare(latents, latents.roll(1, 0), images, images.roll(1, 0))
    return {"loss": loss["mse"], "loss_by_t": loss["by_t"], "loss_pairs": loss["pairs"],
            "loss_images": loss["images"], "latent_var": float(latents.var()), "unpaired": unpaired,
            "latent_mse": 0.0, "ssim": 1.0, "eval": {k: v for k, v in eval_set(plan).items()
                                                    if k in ("images", "first_index", "excluded_calibration_images",
                                                             "excluded_seeds", "k", "t_bin_edges")},
            "wall_s": time.perf_counter() - start}


def _prune_task(plan: Plan, tag: str, seed: int) -> dict:
    from diffprune.io import load_pipeline
    from diffprune.prune.pruning import PruneConfig

    row = BY_TAG[tag]
    dp = row.method == "diff-pruning"
    config = PruneConfig(model=str(plan.teacher), data="digits", method=row.method, structure=row.structure,
                         target_macs=row.target, ratio_rule=row.ratio_rule, depth_split=row.split,
                         threshold=THRESHOLD if dp else 0.0, seed=seed, estimator="fast" if dp else "exact",
                         batch_size=plan.budget.fast_pool if dp else plan.budget.calibration_batch,
                         class_labels=str(_null_class(plan.teacher)))
    out = plan.work / "pruned" / f"{tag}_s{seed}"
    rec = prune_and_record(config, out, component="transformer")
    if rec["reached"]:
        start = time.perf_counter()
        loss = denoising_loss(plan, load_pipeline(out).transformer)
        rec.update(loss_before=loss["mse"], loss_before_by_t=loss["by_t"], loss_wall_s=time.perf_counter() - start)
    return rec


def _stage_task(plan: Plan, tag: str, seed: int) -> dict:
    from diffprune.io import load_pipeline

    start = time.perf_counter()
    out = plan.work / "finetuned" / f"{tag}_s{seed}"
    tuned = finetune(plan, plan.work / "pruned" / f"{tag}_s{seed}", out, plan.budget.steps, seed)
    train_s = time.perf_counter() - start
    log = next((p for p in (Path(tuned) / "train_log.json", out / "train_log.json") if p.exists()), None)
    pipe = load_pipeline(tuned)
    loss = denoising_loss(plan, pipe.transformer)
    latents = sample_latents(plan, pipe.transformer, pipe.scheduler)
    ref = teacher_samples(plan)
    vs = compare(ref["latents"], latents, ref["images"], decoded(pipe, latents))
    return {"loss": loss["mse"], "loss_by_t": loss["by_t"], **vs, "steps": plan.budget.steps,
            "train_loss": loss_drop(json.loads(log.read_text())) if log else None,
            "train_wall_s": train_s, "eval_wall_s": time.perf_counter() - start - train_s, "machine": machine()}


def describe(key: tuple, result: dict) -> str:
    if key[0] == "stage" and "loss" in result:
        return f" loss {result['loss']:.4f} latent MSE {result['latent_mse']:.4f} SSIM {result['ssim']:.3f}"
    if key[0] == "prune" and "loss_before" in result:
        return f" loss before {result['loss_before']:.4f}"
    return ""


# --------------------------------------------------------------------------- tabulating

METRICS = ("loss", "latent_mse", "ssim")


def collect(plan: Plan) -> dict:
    read = lambda k: json.loads(plan.record(k).read_text()) if plan.record(k).exists() else None  # noqa: E731
    rows = []
    for tag in plan.rows:
        row = BY_TAG[tag]
        seeds = seed_records(plan, tag)
        reached = [x for x in seeds if x["prune"]["reached"]]
        evaluated = [x for x in reached if x["stage"] and "loss" in x["stage"]]
        p = reached[0]["prune"] if reached else {}
        out = {"name": row.name, "tag": tag, "budget": row.budget, "target_macs": row.target,
               "structure": row.structure, "method": row.method,
               "ratio_rule": row.ratio_rule if row.structure != "depth" else None,
               "split": row.split if row.structure == "both" else None,
               "reached": bool(reached) if seeds else None,
               "unreachable": seeds[0]["prune"]["error"] if seeds and not reached else None,
               "same_as": sorted({x["stage"]["same_as"] for x in evaluated if "same_as" in x["stage"]}) or None,
               # in how many seeds: an earlier row's pruned model (same_as), these layers removed
               "same_as_seeds": _counts(x["stage"]["same_as"] for x in evaluated if "same_as" in x["stage"]),
               "depth_removed_seeds": _counts(" + ".join(sorted(x["prune"]["depth"]["removed"])) for x in reached
                                              if x["prune"]["depth"] and x["prune"]["depth"]["removed"]),
               "seeds_evaluated": len(evaluated),
               "latency": read(("latency", tag)),
               "params": aggregate([x["prune"]["params"] for x in reached]),
               "params_fraction": aggregate([x["prune"]["params_fraction"] for x in reached]),
               "macs_fraction": aggregate([x["prune"]["macs_fraction"] for x in reached]),
               "params_teacher": p.get("params_teacher"), "macs_teacher": p.get("macs_teacher"),
               "width_ratio": aggregate([x["prune"]["width_ratio"] for x in reached]),
               "depth_removed": sorted({" + ".join(sorted(x["prune"]["depth"]["removed"])) for x in reached
                                        if x["prune"]["depth"] and x["prune"]["depth"]["removed"]}),
               "joint": [c for x in reached if (c := joint_choice(x["prune"])) is not None] or None,
               "loss_before": aggregate([x["prune"].get("loss_before") for x in reached]),
               "importance_wall_s": aggregate([x["prune"]["importance_wall_s"] for x in reached]),
               "train_wall_s": aggregate([x["stage"]["train_wall_s"] for x in evaluated]),
               "seeds": seeds}
        for m in METRICS:
            out[m] = aggregate([x["stage"][m] for x in evaluated])
        bins = [x["stage"]["loss_by_t"] for x in evaluated]
        out["loss_by_t"] = [sum(b[i] for b in bins) / len(bins) for i in range(len(bins[0]))] if bins else None
        rows.append(out)
    log = plan.work / "rows" / "commands.json"
    return {"teacher": read(("teacher",)), "rows": rows, "comparisons": comparisons(rows),
            "commands": json.loads(log.read_text()) if log.exists() else []}


def _counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def comparisons(rows: list[dict]) -> list[dict]:
    """COMPARE's pairs, seed by seed: b - a of each metric, and in how many seeds b is better (lower loss and
    latent MSE, higher SSIM)."""
    by_tag = {r["tag"]: r for r in rows}
    out = []
    for label, ref, others in COMPARE:
        for other in others:
            a, b = by_tag.get(ref), by_tag.get(other)
            if not a or not b:
                continue
            sa = {x["seed"]: x["stage"] for x in a["seeds"] if x["stage"] and "loss" in x["stage"]}
            sb = {x["seed"]: x["stage"] for x in b["seeds"] if x["stage"] and "loss" in x["stage"]}
            common = sorted(set(sa) & set(sb))
            if not common:
                continue
            rec = {"reference": label, "a": ref, "b": other, "seeds": common}
            for m in METRICS:
                d = [sb[s][m] - sa[s][m] for s in common]
                better = sum((x > 0) if m == "ssim" else (x < 0) for x in d)
                rec[m] = {**aggregate(d), "b_better": better}
            out.append(rec)
    return out


COLUMNS = ("budget", "structure", "method", "params", "MACs frac", "MACs x", "loss before", "loss", "latent MSE",
           "SSIM", "b1 x", "b8 x", "note")


def _structure(r: dict) -> str:
    return r["structure"] + (" (joint)" if r.get("split") == "joint" else "")


def markdown(found: dict, meta: dict) -> str:
    t = found["teacher"] or {}
    b = meta["budget"]
    un = t.get("unpaired", {})
    first = next((r for r in found["rows"] if r.get("params_teacher")), {})
    nan = float("nan")
    lines = [f"DiT ({(first.get('params_teacher') or 0) / 1e6:.3f}M params, 4 blocks, trained {meta['teacher_steps']}"
             " steps on the digits latents, null class) pruned to ~70% / ~56% of its MACs, and to depth's one- and "
             "two-block sizes (0.75, 0.51) by width for equal-MACs comparisons; post-trained "
             f"{b['steps']} steps ({meta['post_train_fraction']:.0%} of the teacher's) with its recipe; mean ± std "
             f"over {b['seeds']} seeds (seed = calibration + post-training). loss: epsilon MSE on "
             f"{t.get('loss_images')} fixed digits latents x {b['eval_timesteps']} stratified timesteps (fixed "
             f"noise; 1.0 = predicting zero), 'before' = right after pruning; teacher {t.get('loss', nan):.4f}. "
             "latent MSE / SSIM: student vs teacher samples from the same noise "
             f"({b['num_samples']} samples, DDIM {b['sample_steps']}, eta 0), SSIM of images decoded by the shared "
             "random KL decoder: a consistency measure, not quality (unpaired teacher samples: latent MSE "
             f"{un.get('latent_mse', nan):.3f}, SSIM {un.get('ssim', nan):.3f}). Latency: CPU transformer forward, "
             "median of interleaved teacher/student runs, 1 torch thread; x = teacher / student (MACs x: the counted "
             "ideal).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    names = {r["tag"]: f"{_structure(r)} / {r['method']} ({r['budget']})" for r in found["rows"]}
    for r in found["rows"]:
        lat = (r.get("latency") or {}).get("forward", {})
        head = [r["budget"], _structure(r), r["method"]]
        if r.get("unreachable"):
            note = "unreachable: " + r["unreachable"].split(";")[0].replace("--structure depth: ", "")
            lines.append("| " + " | ".join(head + ["-"] * (len(COLUMNS) - 4) + [note]) + " |")
            continue
        if not r.get("reached"):
            continue
        notes = []
        n = r["seeds_evaluated"]
        if r["same_as"]:
            notes.append("same pruned model as " + ", ".join(f"{names.get(t, t)} ({k}/{n} seeds)"
                                                             for t, k in r["same_as_seeds"].items()))
        if r["depth_removed"]:
            removed = r["depth_removed_seeds"]
            notes.append("removed " + " / ".join(b.replace("transformer_blocks.", "block ") +
                                                 (f" ({k}/{n} seeds)" if len(removed) > 1 else "")
                                                 for b, k in sorted(removed.items())))
        if r.get("joint"):
            notes.append(_joint_note(r["joint"]))
        if r["structure"] == "both":
            ratio = r["width_ratio"]["mean"]
            notes.append(f"then width ratio {ratio:.3f}" if ratio else "no width step")
        frac = r["macs_fraction"]["mean"]
        cells = [f"{r['params']['mean'] / 1e6:.3f}M", f"{frac:.3f}", f"{1 / frac:.2f}", _pm(r["loss_before"], ".4f"),
                 _pm(r["loss"], ".4f"), _pm(r["latent_mse"], ".4f"), _pm(r["ssim"], ".3f")]
        cells += [f"{lat[bs]['speedup']:.2f}" if bs in lat else "-" for bs in ("1", "8")]
        lines.append("| " + " | ".join(head + cells + ["; ".join(notes)]) + " |")
    if found["comparisons"]:
        lines += ["", "Paired by seed (b - a; 'b better': seeds where b has the lower loss / latent MSE, the higher "
                  "SSIM):", "", "| a | b | Δ loss | b better | Δ latent MSE | b better | Δ SSIM | b better |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in found["comparisons"]:
            n = len(c["seeds"])
            cells = [names.get(c["a"], c["a"]), names.get(c["b"], c["b"])]
            for m, fmt in (("loss", "+.4f"), ("latent_mse", "+.4f"), ("ssim", "+.3f")):
                cells += [f"{c[m]['mean']:{fmt}} ± {c[m]['std']:.4f}", f"{c[m]['b_better']}/{n}"]
            lines.append("| " + " | ".join(cells) + " |")
    if meta.get("note"):
        lines += ["", f"Note: {meta['note']}"]
    return "\n".join(lines) + "\n"


def plot(found: dict, path: Path) -> None:
    from diffprune.plots import figure

    colors = {"width": "tab:blue", "depth": "tab:red", "both": "tab:green", "both (joint)": "tab:olive"}
    markers = {"diff-pruning": "o", "block-influence": "s", "magnitude": "^"}
    jitter = {"diff-pruning": -0.003, "block-influence": 0.0, "magnitude": 0.003}
    fig = figure((16, 5))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1]})
    rows = [r for r in found["rows"] if r.get("loss") and r["loss"]["mean"] is not None  # a row identical to
            and sum(r["same_as_seeds"].values()) < r["seeds_evaluated"]]  # an earlier one in every seed: not drawn
    teacher = found["teacher"] or {}
    for ax, metric, label in ((axes[0], "loss", "denoising loss after post-training (epsilon MSE)"),
                              (axes[1], "ssim", "SSIM vs teacher samples (same noise; decoded)")):
        for r in rows:
            s = _structure(r)
            x = r["macs_fraction"]["mean"] + jitter[r["method"]] + (0.006 if r.get("split") == "joint" else 0.0)
            ax.errorbar(x, r[metric]["mean"], yerr=r[metric]["std"], fmt=markers[r["method"]], color=colors[s],
                        capsize=3, label=f"{s} / {r['method']}", alpha=0.85)
        if metric == "loss" and teacher.get("loss") is not None:
            ax.axhline(teacher["loss"], color="gray", ls=":", label="teacher")
        ax.set_xlabel("MACs fraction of the teacher (methods offset to stay apart)")
        ax.set_ylabel(label)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    axes[0].set_title("Denoising loss vs MACs (mean ± std over seeds)")
    axes[1].set_title("Teacher consistency vs MACs")
    b = axes[2]
    for r in rows:
        lat = (r.get("latency") or {}).get("forward", {})
        if "1" in lat and "8" in lat:
            s = _structure(r)
            b.scatter(lat["1"]["speedup"], lat["8"]["speedup"], marker=markers[r["method"]], color=colors[s], s=60,
                      label=f"{s} / {r['method']}")
            b.annotate(f"{r['macs_fraction']['mean']:.2f}", (lat["1"]["speedup"], lat["8"]["speedup"]),
                       textcoords="offset points", xytext=(5, 3), fontsize=7)
    pts = [v for c in b.collections for v in c.get_offsets().ravel()] or [1.0]
    lo, hi = min([1.0, *pts]), max([1.0, *pts])
    b.plot([lo * 0.95, hi * 1.05], [lo * 0.95, hi * 1.05], color="gray", ls=":", lw=1)
    b.set_xlabel("CPU speed-up at batch 1 (teacher / student)")
    b.set_ylabel("CPU speed-up at batch 8")
    b.set_title("Latency speed-up (labels: MACs fraction)")
    handles, labels = b.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    b.legend(uniq.values(), uniq.keys(), fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="seeds per row (default 5)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one torch thread each (2 on 2 cores)")
    parser.add_argument("--work", type=Path, default=Path("runs/depth_vs_width_dit"),
                        help="scratch folder for all runs (--smoke: OUT/work)")
    parser.add_argument("--models", type=Path, default=None,
                        help="where the trained DiT is cached as dit_<size>_sharp/trained (default: --work)")
    parser.add_argument("--noisy-posterior", action="store_true",
                        help="the DiT over the noisy autoencoder (posterior std ~1: it trains on latents that "
                             "are ~93%% noise, while calibration and the loss use the posterior means)")
    parser.add_argument("--train-threads", type=int, default=None,
                        help="torch threads while the teacher trains, if it is not cached (default --jobs)")
    parser.add_argument("--resume", action="store_true", help="keep the finished tasks found in the work folder")
    parser.add_argument("--steps", type=int, default=None, help="post-training steps (default 150 = 5%% of 3000)")
    parser.add_argument("--num-samples", type=int, default=None, help="consistency samples per model (default 256)")
    parser.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default 20)")
    parser.add_argument("--only", default=None, metavar="TAG,TAG",
                        help=f"run only these rows (tags: {', '.join(BY_TAG)}); for a timing run")
    parser.add_argument("--report-only", action="store_true", help="run nothing: tabulate what is finished")
    parser.add_argument("--note", default=None, help="a line recorded in the JSON (how the budget was chosen)")
    add_smoke_options(parser, "a 4-block DiT of width 16 trained 4 steps (20 timesteps), 1 seed, 6 rows, 2 steps, "
                              "8 samples, DDIM 2")
    args = parser.parse_args()
    out = results_dir(parser, args)
    budget, rows = budget_and_rows(parser, args, SMOKE if args.smoke else FULL,
                                   ("seeds", "steps", "num_samples", "sample_steps"), SMOKE_ROWS, BY_TAG)
    start = time.perf_counter()
    size = "smoke_depth" if args.smoke else "full"
    models = args.models or args.work
    torch.set_num_threads(args.train_threads or args.jobs)  # the teacher's training, if it is not cached yet
    teacher, training = trained(models, "dit", size, sharp=not args.noisy_posterior)
    torch.set_num_threads(1)  # the latency measurement, like the workers: one thread
    work = args.work / (("smoke" if args.smoke else "full") + budget_suffix(budget, SMOKE if args.smoke else FULL))
    if work.exists() and not (args.resume or args.report_only):
        raise SystemExit(f"{work} exists; remove it first or pass --resume")
    recipe = {**training["train"], "dropout": 0.0}  # _fast_pool_models trains the DiT without dropout
    plan = Plan(teacher, recipe, budget, work, rows)
    command = "python benchmarks/depth_vs_width_dit.py " + " ".join(sys.argv[1:])
    if not args.report_only:
        log = work / "rows" / "commands.json"
        log.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(log, (json.loads(log.read_text()) if log.exists() else []) + [command])
        run_all(plan, args.jobs, {"teacher": _teacher_task, "prune": _prune_task, "stage": _stage_task}, describe)
        prunes = {(k[1], k[2]): json.loads(plan.record(k).read_text()) for k in task_list(plan)
                  if k[0] == "prune" and plan.record(k).exists()}
        measure_latency(plan, prunes)
    found = collect(plan)
    if found["teacher"] is None:
        raise SystemExit(f"nothing to tabulate: the teacher's task is not finished in {work}")
    meta = {"budget": dataclasses.asdict(budget), "teacher_steps": training["train"]["steps"],
            "post_train_fraction": budget.steps / training["train"]["steps"],
            "post_train_recipe": {k: recipe[k] for k in ("batch_size", "lr", "ema_decay", "ema_warmup", "dropout")}
            | {"warmup_steps": 0, "note": "_common.finetune: the teacher's batch, lr, EMA and dropout, no lr warmup "
                                          "(as depth_vs_width.py post-trains the UNet)"},
            "teacher": {"folder": str(teacher), "sharp_posterior": not args.noisy_posterior,
                        **{k: v for k, v in training.items() if k != "log"},
                        "train_loss": loss_drop(training["log"])},
            "protocol": "Diff-Pruning thr 0.05 with the fast estimator (pool "
                        f"{budget.fast_pool}); block influence on {budget.calibration_batch} calibration images; "
                        "calibration and post-training with DiT's null class; seed = calibration + post-training "
                        "seed; loss on the digits outside the calibration batches of seeds "
                        f"0-{max(CALIBRATION_SEEDS, budget.seeds) - 1} "
                        f"(timesteps and noise from seed {EVAL_SEED}); consistency vs the teacher's samples from "
                        "the same seed-0 noise, DDIM eta 0",
            "smoke": args.smoke, "note": args.note, "date": datetime.date.today().isoformat(),
            "machine": machine(threads=True), "jobs": args.jobs, "wall_time_s": time.perf_counter() - start,
            "report_only": args.report_only, "command": command, "commands": found.pop("commands"),
            "versions": library_versions(), "diffprune_source": diffprune_source(), "git_commit": git_commit()}
    stem = out / ("depth_vs_width_dit" + budget_suffix(budget, SMOKE if args.smoke else FULL))
    write_results(stem, found, meta, markdown, plot, start)


if __name__ == "__main__":
    main()
