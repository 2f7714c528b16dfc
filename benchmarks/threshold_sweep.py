"""The paper's ablation of the kept range (Sec. 4.3, Fig. 3/4), on the embedded digits teacher.

Prune the teacher to 56% of its MACs with the Taylor importance summed over the fixed timesteps
[0, k) only, for k across the whole range, and measure, WITHOUT post-training, how close the
pruned model's samples stay to the teacher's (SSIM, same noise, paired by index) and their
digits-FID. The cuts that the threshold rule picks (thr 0.02 / 0.05 / 0.10) are marked, and
magnitude / random pruning at the same size are drawn as reference lines. One calibration sweep
per seed serves every k (`importance.estimate_many(prefixes=...)`).

    python benchmarks/threshold_sweep.py --quick      # 1 seed, coarse grid, ~5 min
    python benchmarks/threshold_sweep.py --jobs 2     # 3 seeds (about 35 CPU-minutes)
    python benchmarks/threshold_sweep.py --smoke --out DIR   # the code path in seconds (tiny random teacher)

Writes benchmarks/results/threshold_sweep{_quick}.json and .png (--out: into that folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from _common import smoke_teacher
from bench_args import add_budget_options, add_smoke_options, chosen_budget, results_dir

from diffprune.cli.demo_job import embedded_teacher
from diffprune.evaluate.stage import EvaluateConfig, evaluate
from diffprune.io import library_versions
from diffprune.metrics.latency import cpu_model
from diffprune.prune.pruning import PruneConfig
from diffprune.prune.stage import run_prune
from diffprune.sample.loop import sample_to_folder

THRESHOLDS = (0.02, 0.05, 0.10)
TARGET_MACS = 0.56


@dataclasses.dataclass(frozen=True)
class Budget:
    seeds: int
    calibration_batch: int
    prefixes: tuple[int, ...]
    num_images: int
    sample_steps: int


FULL = Budget(seeds=3, calibration_batch=64, num_images=128, sample_steps=50,
              prefixes=(5, 10, 25, 50, 100, 200, 300, 400, 500, 600, 800, 1000))
QUICK = Budget(seeds=1, calibration_batch=16, num_images=128, sample_steps=20, prefixes=(10, 100, 300, 600, 1000))
SMOKE = Budget(seeds=1, calibration_batch=4, num_images=10, sample_steps=2, prefixes=(10,))  # smoke_teacher: 20 t


def measure(name: str, method: str, importance, seed: int, budget: Budget, work: Path, teacher: Path,
            teacher_samples: Path) -> dict:
    """Prune (no post-training), sample from the shared noise, score against the teacher's samples.

    A point whose evaluation JSON is already in the work folder is read back instead (an
    interrupted run continues where it stopped; the sweep itself is recomputed).
    """
    done = work / "evaluation" / f"{name}.json"
    if not done.exists():
        run_prune(PruneConfig(model=str(teacher), data="digits", method=method, target_macs=TARGET_MACS,
                              threshold=importance.threshold if importance else 0.0,
                              batch_size=budget.calibration_batch, seed=seed, estimator="exact"),
                  work / "pruned" / name, overwrite=True, progress=False, importance=importance)
        samples = sample_to_folder(work / "pruned" / name, work / "samples" / name, budget.num_images,
                                   batch_size=256, steps=budget.sample_steps, sampler="ddim", seed=0, overwrite=True,
                                   progress=False)
        evaluate(EvaluateConfig(samples=str(samples), reference="digits", teacher_samples=str(teacher_samples),
                                allow_download=False, output=str(done)))
        shutil.rmtree(work / "pruned" / name)  # keep the disk small; the samples stay
    ev = json.loads(done.read_text())
    return {"ssim": ev["consistency"]["ssim"]["mean"], "fid": ev["fid"]["value"]}


def run_seed(seed: int, budget: Budget, work: Path, teacher: Path) -> dict:
    """One calibration sweep, then every prefix k, the threshold cuts and the magnitude/random lines."""
    import torch

    from diffprune.data import first_batch, make_dataset
    from diffprune.families import family_for
    from diffprune.io import load_pipeline
    from diffprune.prune.importance import estimate_many

    torch.set_num_threads(1)
    teacher_samples = work / "samples" / "teacher"
    pipe = load_pipeline(teacher)
    model = pipe.unet.requires_grad_(True)
    family = family_for(model)
    images = first_batch(make_dataset("digits", family.sample_size(model), family.in_channels(model)),
                         budget.calibration_batch, seed)
    start = time.perf_counter()
    sweeps = estimate_many(model, family, pipe.scheduler, images, THRESHOLDS, seed=seed, progress=False,
                           prefixes=budget.prefixes)
    sweep_s = time.perf_counter() - start
    out = {"seed": seed, "sweep_s": sweep_s, "losses": sweeps[("taylor", 0.0)].losses, "prefix": {}, "threshold": {}}
    for k in budget.prefixes:
        out["prefix"][k] = measure(f"k{k}_s{seed}", "diff-pruning", sweeps[("prefix", k)], seed, budget, work,
                                   teacher, teacher_samples)
        print(f"[seed {seed}] k={k}: SSIM {out['prefix'][k]['ssim']:.3f}", flush=True)
    for thr in THRESHOLDS:
        result = sweeps[("diff-pruning", thr)]
        row = measure(f"thr{thr}_s{seed}", "diff-pruning", result, seed, budget, work, teacher, teacher_samples)
        out["threshold"][thr] = {**row, "cut": result.cut}
    for method in ("magnitude", "random"):
        out[method] = measure(f"{method}_s{seed}", method, None, seed, budget, work, teacher, teacher_samples)
    return out


def summarize(runs: list[dict], budget: Budget) -> dict:
    def stat(values: list[float]) -> dict:
        return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}

    return {
        "prefix": {k: {m: stat([r["prefix"][k][m] for r in runs]) for m in ("ssim", "fid")} for k in budget.prefixes},
        "threshold": {thr: {"cut": stat([r["losses"][-1][0] if r["threshold"][thr]["cut"] is None  # all kept
                                            else r["threshold"][thr]["cut"] for r in runs]),
                            **{m: stat([r["threshold"][thr][m] for r in runs]) for m in ("ssim", "fid")}}
                      for thr in THRESHOLDS},
        **{method: {m: stat([r[method][m] for r in runs]) for m in ("ssim", "fid")}
           for method in ("magnitude", "random")},
    }


def plot(summary: dict, runs: list[dict], path: Path) -> None:
    from diffprune.plots import figure

    fig = figure((6.4, 6.0), dpi=120)
    ax, ax_loss = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ks = sorted(summary["prefix"])
    mean = np.array([summary["prefix"][k]["ssim"]["mean"] for k in ks])
    std = np.array([summary["prefix"][k]["ssim"]["std"] for k in ks])
    ax.plot(ks, mean, "o-", color="C0", label="Taylor over t in [0, k)")
    ax.fill_between(ks, mean - std, mean + std, color="C0", alpha=0.2)
    for i, (thr, row) in enumerate(summary["threshold"].items()):
        cut = row["cut"]["mean"]
        ax.axvline(cut, color=f"C{3 + i}", ls="--", lw=1)
        ax.plot([cut], [row["ssim"]["mean"]], "s", color=f"C{3 + i}",
                label=f"threshold rule thr={thr}: cut {cut:.0f}, SSIM {row['ssim']['mean']:.3f}")
    for method, color in (("magnitude", "C1"), ("random", "C7")):
        ax.axhline(summary[method]["ssim"]["mean"], color=color, ls=":", label=f"{method} (same size)")
    ax.set_ylabel("SSIM vs teacher (no post-training)")
    ax.set_title(f"Kept range ablation: digits teacher pruned to {TARGET_MACS:.0%} MACs, {len(runs)} seed(s)")
    ax.legend(fontsize=7)
    for r in runs:
        losses = np.array(r["losses"], dtype=float)
        ax_loss.plot(losses[:, 0], losses[:, 1], lw=0.8, alpha=0.7)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("k (timesteps [0, k) used for the importance)")
    ax_loss.set_ylabel("calibration L_t")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_budget_options(parser, "1 seed, coarse grid, small batches", "runs/threshold_sweep")
    add_smoke_options(parser, "a tiny random teacher with 20 timesteps, 1 seed, k = 10, 10 images, DDIM 2")
    args = parser.parse_args()
    budget = chosen_budget(parser, args, QUICK, FULL, SMOKE)
    out = results_dir(parser, args)
    work = args.work / ("smoke" if args.smoke else "quick" if args.quick else "full")
    start = time.perf_counter()
    teacher = smoke_teacher(out / "teacher") if args.smoke else embedded_teacher()
    sample_to_folder(teacher, work / "samples" / "teacher", budget.num_images, batch_size=256,
                     steps=budget.sample_steps, sampler="ddim", seed=0, overwrite=True, progress=False)
    if args.jobs == 1:
        runs = [run_seed(seed, budget, work, teacher) for seed in range(budget.seeds)]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = list(pool.map(run_seed, range(budget.seeds), [budget] * budget.seeds, [work] * budget.seeds,
                                 [teacher] * budget.seeds))
    summary = summarize(runs, budget)
    suffix = "_quick" if args.quick and not args.smoke else ""
    out.mkdir(parents=True, exist_ok=True)
    plot(summary, runs, out / f"threshold_sweep{suffix}.png")
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{cpu_model()} ({os.cpu_count()} cores)",
            "wall_time_s": time.perf_counter() - start, "jobs": args.jobs, "target_macs": TARGET_MACS,
            "budget": dataclasses.asdict(budget), "versions": library_versions()}
    (out / f"threshold_sweep{suffix}.json").write_text(
        json.dumps({"summary": summary, "runs": runs, "meta": meta}, indent=2) + "\n")
    print(f"{'k':>6} | SSIM (no post-training) | digits-FID")
    for k, row in summary["prefix"].items():
        print(f"{k:>6} | {row['ssim']['mean']:.3f} ± {row['ssim']['std']:.3f} | {row['fid']['mean']:.1f}")
    for thr, row in summary["threshold"].items():
        print(f"thr {thr}: cut {row['cut']['mean']:.0f}, SSIM {row['ssim']['mean']:.3f} ± {row['ssim']['std']:.3f}")
    for method in ("magnitude", "random"):
        print(f"{method}: SSIM {summary[method]['ssim']['mean']:.3f} ± {summary[method]['ssim']['std']:.3f}")
    print(f"wrote {out / f'threshold_sweep{suffix}.json'} and .png in {meta['wall_time_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
