"""What Diff-Pruning's importance costs, exact sweep vs `importance.estimate_fast`, on the digits teacher.

For each seed (its own calibration batch, pool and noise) the exact sweep (`estimate`, thr 0.05,
one batch, every kept timestep backpropagated) and the fast estimator (coarse forward-only cut, then
sampled (image, t) pairs from a larger pool, capped at 10% of the exact sweep's sample-gradient
evaluations) score the teacher. Every scoring prunes the teacher at the one ratio that reaches 56% of
its MACs (torch-pruning's uniform ratio: the widths do not depend on the scores, so every row has
the same architecture and only *which* channels survive differs).

Agreement of two scorings A and B:
  * IoU of kept channels: for each pruned group, the root layer's original output-channel indices
    that survive (recorded by `prune_model_at_ratio(on_group=...)` just before each group is removed);
    sum over groups of |kept_A & kept_B| / sum of |kept_A | kept_B|.
  * Spearman: rank correlation of the per-channel group scores (torch-pruning's group importance on
    the unpruned teacher), per group, averaged with channel-count weights.
Beside fast-vs-exact: the exact sweep against itself across seeds (its own run-to-run noise, the
bar to meet), fast against itself across seeds, and magnitude-vs-exact (a floor). Before any
fine-tuning, SSIM against the teacher (same initial noise, DDIM) of every pruned model.

    python benchmarks/importance_cost.py --quick      # < 8 min on 2 cores (OMP_NUM_THREADS=1)
    python benchmarks/importance_cost.py --seeds 3    # the full run
    python benchmarks/importance_cost.py --truth      # exact-64 and fast against the "truth" (9 seeds)
    python benchmarks/importance_cost.py [--truth] --smoke --out DIR   # the code path in seconds (tiny teacher)

Writes benchmarks/results/importance_cost{_quick}.json (--truth: its "truth" key, _importance_truth.py; --out:
into that folder).

--truth: which estimate is closer to the importance Diff-Pruning tries to compute (its expectation over
calibration images and noise)? Exact sweep (batch 64) and fast (pool 512, 10% of the exact sweep's
gradient evaluations) each run at seeds 0..N-1. The truth for seed s is the
average of the other N-1 exact sweeps' gradient sums (sum_{t<=cut} dL_t/dtheta, each with its own
batch, noise and cut; N = 9 gives 8 x 64 images), so it shares no image batch or noise with the
exact-64 estimate it judges, and the fast estimate at seed s is judged against the same truth.
Against it: kept-channel IoU at the 56%-MACs prune and per-group score Spearman, mean +- std over
the N seeds, with the per-seed difference fast - exact. The truth's own noise: two disjoint
halves of the exact sweeps against each other. Gradient sums are cached (safetensors) in --work,
so a rerun resumes. Adds the key "truth" to the JSON and keeps every other key.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp
from _common import machine, smoke_teacher
from bench_args import add_smoke_options, results_dir
from scipy.stats import spearmanr

from diffprune.cli.demo_job import embedded_teacher
from diffprune.data import first_batch, make_dataset
from diffprune.families import family_for
from diffprune.io import library_versions, load_pipeline
from diffprune.metrics.ssim import ssim_per_image
from diffprune.prune.importance import ImportanceResult, estimate, estimate_fast, tp_importance
from diffprune.prune.pruning import PruneConfig, prune_model, prune_model_at_ratio
from diffprune.sample.loop import sample

THRESHOLD = 0.05
TARGET_MACS = 0.56
FAST_BUDGET = 0.10  # fast's sample-gradient evaluations <= this fraction of the exact sweep's
# The fast estimator's cut comes from a forward-only loss curve on its first `cut_batch` images: the
# default 8, and 64 (the exact sweep's batch, still forward only) to see whether the cut's noise is
# what separates fast from exact.
FAST_VARIANTS = {"fast": {"cut_batch": 8}, "fast (cut batch 64)": {"cut_batch": 64}}


@dataclasses.dataclass(frozen=True)
class Budget:
    seeds: int
    exact_batch: int
    pool: int
    pairs_per_pass: int
    ssim_images: int
    sample_steps: int


FULL = Budget(seeds=3, exact_batch=64, pool=512, pairs_per_pass=64, ssim_images=256, sample_steps=50)
QUICK = Budget(seeds=2, exact_batch=32, pool=512, pairs_per_pass=64, ssim_images=64, sample_steps=20)
SMOKE = Budget(seeds=2, exact_batch=4, pool=16, pairs_per_pass=4, ssim_images=2, sample_steps=2)  # smoke_teacher


def chosen_budget(args) -> Budget:
    """SMOKE, QUICK or FULL as --smoke / --quick select (--seeds is applied by each mode)."""
    return SMOKE if args.smoke else QUICK if args.quick else FULL


def teacher_at_target(teacher: Path):
    """The digits teacher (grad on), its family, scheduler and dataset, the magnitude importance, and the
    magnitude prune at TARGET_MACS whose uniform ratio every row of this benchmark uses."""
    pipe = load_pipeline(teacher)
    model = pipe.unet.requires_grad_(True)
    family, scheduler = family_for(model), pipe.scheduler
    dataset = make_dataset("digits", family.sample_size(model), family.in_channels(model))
    magnitude = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
    size = prune_model(model, family, PruneConfig(model="teacher", method="magnitude", target_macs=TARGET_MACS),
                 magnitude, progress=False)
    return model, family, scheduler, dataset, magnitude, size


def kept_sets(model, family, imp: ImportanceResult, ratio: float) -> tuple[dict[str, set[int]], torch.nn.Module]:
    """Root layer name -> original output channels kept, and the pruned model."""
    kept: dict[str, set[int]] = {}

    def record(name: str, removed: list[int], channels: int) -> None:
        while name in kept:  # two groups with one root layer: keep both
            name += "#"
        kept[name] = set(range(channels)) - set(removed)

    pruned = prune_model_at_ratio(model, family, imp, ratio, on_group=record)
    return kept, pruned


def group_scores(model, family, imp: ImportanceResult) -> dict[str, np.ndarray]:
    """Root layer name -> torch-pruning's per-channel group importance on the unpruned model."""
    m = copy.deepcopy(model).eval()
    if imp.grads is not None:
        for name, p in m.named_parameters():
            p.grad = imp.grads[name].clone() if name in imp.grads else torch.zeros_like(p)
    graph = tp.DependencyGraph().build_dependency(m, example_inputs=family.example_inputs(m))
    names = {mod: n for n, mod in m.named_modules()}
    scorer = tp_importance(imp.method)
    out = {}
    for group in graph.get_all_groups(ignored_layers=family.ignored_layers(m),
                                      root_module_types=[torch.nn.Conv2d, torch.nn.Linear]):
        with torch.no_grad():
            s = scorer(group)
        if s is not None:
            out[names[group[0].dep.target.module]] = s.detach().double().numpy()
    return out


def iou(a: dict[str, set[int]], b: dict[str, set[int]]) -> float:
    inter = sum(len(a.get(k, set()) & b.get(k, set())) for k in set(a) | set(b))
    union = sum(len(a.get(k, set()) | b.get(k, set())) for k in set(a) | set(b))
    return inter / union if union else 1.0


def spearman(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    num = den = 0.0
    for k in set(a) & set(b):
        if len(a[k]) < 3 or np.ptp(a[k]) == 0 or np.ptp(b[k]) == 0:
            continue
        rho = spearmanr(a[k], b[k]).statistic
        if math.isfinite(rho):
            num, den = num + rho * len(a[k]), den + len(a[k])
    return num / den if den else float("nan")


def stats(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": len(v)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-check budget (2 seeds, exact batch 32)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 3, quick: 2)")
    parser.add_argument("--truth", action="store_true",
                        help="exact-64 and fast against the truth (mean of the other seeds' exact sweeps); "
                             "default 9 seeds")
    parser.add_argument("--work", type=Path, default=Path("runs/importance_cost"),
                        help="--truth: folder caching each seed's gradient sums")
    parser.add_argument("--compute-seeds", type=lambda v: [int(x) for x in v.split(",")], default=None,
                        metavar="S,S", help="--truth: only compute and cache these seeds' scorings (run beside "
                                            "the main --truth process to share the work), then exit")
    add_smoke_options(parser, "a tiny random teacher with 20 timesteps, exact batch 4, pool 16, 2 images")
    args = parser.parse_args()
    out_dir = results_dir(parser, args)
    teacher = smoke_teacher(out_dir / "teacher") if args.smoke else embedded_teacher()
    if args.truth:
        from _importance_truth import main_truth

        return main_truth(args, teacher, out_dir)
    budget = chosen_budget(args)
    if args.seeds:
        budget = dataclasses.replace(budget, seeds=args.seeds)
    if budget.seeds < 2:
        raise SystemExit("--seeds must be >= 2 (run-to-run agreement needs two seeds)")
    start = time.perf_counter()
    model, family, scheduler, dataset, magnitude, size = teacher_at_target(teacher)
    ratio = size.ratio
    print(f"ratio {ratio:.4f} -> MACs {size.macs[1] / size.macs[0]:.3f}, params {size.params[1] / size.params[0]:.3f}",
          flush=True)

    teacher_images = sample(model, scheduler, budget.ssim_images, steps=budget.sample_steps, sampler="ddim", seed=0,
                            progress=False)

    def ssim_of(pruned) -> float:
        imgs = sample(pruned, scheduler, budget.ssim_images, steps=budget.sample_steps, sampler="ddim", seed=0,
                      progress=False)
        return float(ssim_per_image(teacher_images, imgs).mean())

    names = ["exact", *FAST_VARIANTS]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    kept: dict[str, list] = {name: [] for name in names}
    scores: dict[str, list] = {name: [] for name in names}
    for seed in range(budget.seeds):
        images = first_batch(dataset, budget.exact_batch, seed)
        scorings = {"exact": estimate(model, family, scheduler, images, "diff-pruning", THRESHOLD, seed=seed,
                                      progress=False)}
        passes = max(1, math.floor(FAST_BUDGET * scorings["exact"].sample_gradient_evals / budget.pairs_per_pass))
        pool = first_batch(dataset, budget.pool, seed)
        for name, kwargs in FAST_VARIANTS.items():
            scorings[name] = estimate_fast(model, family, scheduler, pool, THRESHOLD, seed=seed,
                                           pairs_per_pass=budget.pairs_per_pass, passes=passes, progress=False,
                                           **kwargs)
        for name, imp in scorings.items():
            k, pruned = kept_sets(model, family, imp, ratio)
            kept[name].append(k)
            scores[name].append(group_scores(model, family, imp))
            runs[name].append({"seed": seed, "cut": imp.cut, "kept_timesteps": len(imp.kept_timesteps),
                               "sample_gradient_evals": imp.sample_gradient_evals, "wall_time_s": imp.wall_time_s,
                               "ssim_vs_teacher": ssim_of(pruned),
                               "calibration_images": images.shape[0] if name == "exact" else pool.shape[0]})
        print(f"[seed {seed}] " + " | ".join(
            f"{name}: cut {imp.cut} evals {imp.sample_gradient_evals} {imp.wall_time_s:.1f}s "
            f"SSIM {runs[name][-1]['ssim_vs_teacher']:.3f}"
            + (f" IoU vs exact {iou(kept['exact'][-1], kept[name][-1]):.3f}" if name != "exact" else "")
            for name, imp in scorings.items()), flush=True)

    mag_kept, mag_pruned = kept_sets(model, family, magnitude, ratio)
    mag_scores = group_scores(model, family, magnitude)
    seeds = range(budget.seeds)
    pairs = list(itertools.combinations(seeds, 2))
    agreement = {}
    for name in FAST_VARIANTS:
        agreement[f"{name} vs exact (same seed)"] = {
            "iou": stats([iou(kept[name][s], kept["exact"][s]) for s in seeds]),
            "spearman": stats([spearman(scores[name][s], scores["exact"][s]) for s in seeds])}
        agreement[f"{name} vs exact (other seed)"] = {
            "iou": stats([iou(kept[name][a], kept["exact"][b]) for a in seeds for b in seeds if a != b]),
            "spearman": stats([spearman(scores[name][a], scores["exact"][b]) for a in seeds for b in seeds if a != b])}
    for name in names:
        agreement[f"{name} vs itself (across seeds)"] = {
            "iou": stats([iou(kept[name][a], kept[name][b]) for a, b in pairs]),
            "spearman": stats([spearman(scores[name][a], scores[name][b]) for a, b in pairs])}
    agreement["magnitude vs exact"] = {
        "iou": stats([iou(mag_kept, kept["exact"][s]) for s in seeds]),
        "spearman": stats([spearman(mag_scores, scores["exact"][s]) for s in seeds])}
    cost = {name: {"sample_gradient_evals": stats([r["sample_gradient_evals"] for r in runs[name]]),
                   "wall_time_s": stats([r["wall_time_s"] for r in runs[name]]),
                   "kept_timesteps": stats([r["kept_timesteps"] for r in runs[name]]),
                   "ssim_vs_teacher": stats([r["ssim_vs_teacher"] for r in runs[name]])} for name in runs}
    cost["magnitude"] = {"ssim_vs_teacher": stats([ssim_of(mag_pruned)])}
    ratios = {f"{key}_{name}_over_exact": stats([f[field] / e[field] for f, e in zip(runs[name], runs["exact"],
                                                                                    strict=True)])
              for name in FAST_VARIANTS for key, field in (("evals", "sample_gradient_evals"), ("wall", "wall_time_s"))}
    meta = {"quick": args.quick, **({"smoke": True} if args.smoke else {}),
            "budget": dataclasses.asdict(budget), "threshold": THRESHOLD,
            "target_macs": TARGET_MACS, "ratio": ratio, "macs_fraction": size.macs[1] / size.macs[0],
            "params_fraction": size.params[1] / size.params[0], "fast_budget": FAST_BUDGET,
            "date": datetime.date.today().isoformat(), "machine": machine(threads=True),
            "wall_time_s": time.perf_counter() - start, "versions": library_versions()}
    print(table(cost, ratios, agreement, meta))
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"importance_cost{'_quick' if args.quick and not args.smoke else ''}.json"
    out.write_text(json.dumps({"cost": cost, "ratios": ratios, "agreement": agreement, "runs": runs,
                               "meta": meta}, indent=2) + "\n")
    print(f"wrote {out}")


def table(cost: dict, ratios: dict, agreement: dict, meta: dict) -> str:
    m = lambda s: f"{s['mean']:.3f} +- {s['std']:.3f}"  # noqa: E731
    b = meta["budget"]
    lines = [f"importance cost on the digits teacher, ratio {meta['ratio']:.4f} (MACs {meta['macs_fraction']:.3f}), "
             f"thr {meta['threshold']}, {b['seeds']} seeds, exact batch {b['exact_batch']}, fast pool {b['pool']}"
             + (" [QUICK]" if meta["quick"] else ""),
             f"{'estimator':<20}{'evals':>12}{'wall s':>12}{'kept t':>10}{'SSIM vs teacher':>22}"]
    for name in ("exact", *FAST_VARIANTS):
        c = cost[name]
        lines.append(f"{name:<20}{c['sample_gradient_evals']['mean']:>12.0f}{c['wall_time_s']['mean']:>12.1f}"
                     f"{c['kept_timesteps']['mean']:>10.0f}{m(c['ssim_vs_teacher']):>22}")
    lines.append(f"{'magnitude':<20}{0:>12}{'-':>12}{'-':>10}{m(cost['magnitude']['ssim_vs_teacher']):>22}")
    for name in FAST_VARIANTS:
        lines.append(f"{name} / exact: evals {m(ratios[f'evals_{name}_over_exact'])}, "
                     f"wall {m(ratios[f'wall_{name}_over_exact'])}")
    lines.append(f"{'agreement':<40}{'IoU kept channels':>22}{'Spearman':>22}")
    for name, a in agreement.items():
        lines.append(f"{name:<40}{m(a['iou']):>22}{m(a['spearman']):>22}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
