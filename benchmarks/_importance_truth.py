"""importance_cost.py --truth: exact-64 and fast against the "truth" importance (issue 18).

Which estimate is closer to the importance Diff-Pruning tries to compute (its expectation over
calibration images and noise)? See importance_cost.py's docstring for the protocol; this module holds
the cache of gradient sums, the leave-one-out truth and its report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time
from functools import partial
from pathlib import Path

import torch
from _common import machine
from importance_cost import (
    FAST_BUDGET,
    FAST_VARIANTS,
    TARGET_MACS,
    THRESHOLD,
    chosen_budget,
    group_scores,
    iou,
    kept_sets,
    spearman,
    stats,
    teacher_at_target,
)
from safetensors.torch import load_file, save_file

from diffprune.data import first_batch
from diffprune.fsutil import write_json_atomic
from diffprune.io import library_versions
from diffprune.prune.importance import ImportanceResult, estimate, estimate_fast


def cached_scoring(work: Path, name: str, compute) -> ImportanceResult:
    """`compute()` once; its gradient sums and summary are kept in work/<name>.{safetensors,json}."""
    tensors, info = work / f"{name}.safetensors", work / f"{name}.json"
    if tensors.exists() and info.exists():
        d = json.loads(info.read_text())
        return ImportanceResult("diff-pruning", d["threshold"], list(range(d["kept"])), [], [], load_file(tensors),
                                d["sample_gradient_evals"], d["wall_time_s"], d["estimator"], d["cut"])
    imp = compute()
    work.mkdir(parents=True, exist_ok=True)
    tmp = tensors.with_name(f".{tensors.name}.tmp")
    save_file({k: v.contiguous() for k, v in imp.grads.items()}, str(tmp))
    os.replace(tmp, tensors)
    write_json_atomic(info, {"threshold": imp.threshold, "kept": len(imp.kept_timesteps), "cut": imp.cut,
                             "sample_gradient_evals": imp.sample_gradient_evals, "wall_time_s": imp.wall_time_s,
                             "estimator": imp.estimator})
    return imp


def mean_of(scorings: list[ImportanceResult]) -> ImportanceResult:
    """The average of several exact sweeps' gradient sums, as one scoring (the truth)."""
    grads = {k: torch.stack([s.grads[k] for s in scorings]).mean(0) for k in scorings[0].grads}
    return ImportanceResult("diff-pruning", THRESHOLD, [], [], [], grads,
                            sum(s.sample_gradient_evals for s in scorings), 0.0)


def main_truth(args: argparse.Namespace, teacher: Path, out_dir: Path) -> None:
    budget = chosen_budget(args)
    n = args.seeds or (3 if args.quick or args.smoke else 9)
    if n < 3:
        raise SystemExit(f"--truth needs --seeds >= 3 (a truth of >= 2 other sweeps), got {n}")
    start = time.perf_counter()
    model, family, scheduler, dataset, magnitude, size = teacher_at_target(teacher)
    ratio = size.ratio
    work = args.work / ("truth_smoke" if args.smoke else "truth_quick" if args.quick else "truth")
    exact, fast = [], []
    for seed in args.compute_seeds or range(n):  # --compute-seeds: fill the cache only (a parallel process)
        images = first_batch(dataset, budget.exact_batch, seed)
        exact.append(cached_scoring(work, f"exact_s{seed}", partial(
            estimate, model, family, scheduler, images, "diff-pruning", THRESHOLD, seed=seed, progress=False)))
        passes = max(1, math.floor(FAST_BUDGET * exact[-1].sample_gradient_evals / budget.pairs_per_pass))
        pool = first_batch(dataset, budget.pool, seed)
        fast.append(cached_scoring(work, f"fast_s{seed}", partial(
            estimate_fast, model, family, scheduler, pool, THRESHOLD, seed=seed, pairs_per_pass=budget.pairs_per_pass,
            passes=passes, progress=False, **FAST_VARIANTS["fast"])))
        print(f"[seed {seed}] exact cut {exact[-1].cut} evals {exact[-1].sample_gradient_evals} "
              f"{exact[-1].wall_time_s:.0f}s | fast cut {fast[-1].cut} evals {fast[-1].sample_gradient_evals} "
              f"{fast[-1].wall_time_s:.0f}s", flush=True)
    if args.compute_seeds:
        return
    kept = {k: [kept_sets(model, family, s, ratio)[0] for s in v] for k, v in (("exact", exact), ("fast", fast))}
    scores = {k: [group_scores(model, family, s) for s in v] for k, v in (("exact", exact), ("fast", fast))}
    per_seed = []
    for seed in range(n):
        truth = mean_of([e for i, e in enumerate(exact) if i != seed])
        t_kept, t_scores = kept_sets(model, family, truth, ratio)[0], group_scores(model, family, truth)
        per_seed.append({"seed": seed, **{f"{k}_iou": iou(kept[k][seed], t_kept) for k in kept},
                         **{f"{k}_spearman": spearman(scores[k][seed], t_scores) for k in scores}})
        print(f"[truth without seed {seed}] " + ", ".join(f"{k} {v:.3f}" for k, v in per_seed[-1].items()
                                                          if k != "seed"), flush=True)
    half, full = n // 2, mean_of(exact)
    halves = [mean_of(exact[:half]), mean_of(exact[half:2 * half])]
    result = {"vs_truth": {f"{k} {m}": stats([r[f"{k}_{m}"] for r in per_seed])
                           for k in ("exact", "fast") for m in ("iou", "spearman")},
              "fast_minus_exact": {m: stats([r[f"fast_{m}"] - r[f"exact_{m}"] for r in per_seed])
                                   for m in ("iou", "spearman")},
              "truth_halves": {"iou": iou(*[kept_sets(model, family, h, ratio)[0] for h in halves]),
                               "spearman": spearman(*[group_scores(model, family, h) for h in halves]),
                               "sweeps_per_half": half},
              "magnitude_vs_truth_all": {"iou": iou(kept_sets(model, family, magnitude, ratio)[0],
                                                    kept_sets(model, family, full, ratio)[0]),
                                         "spearman": spearman(group_scores(model, family, magnitude),
                                                              group_scores(model, family, full))},
              "per_seed": per_seed,
              "cost": {k: {"sample_gradient_evals": stats([s.sample_gradient_evals for s in v]),
                           "wall_time_s": stats([s.wall_time_s for s in v]), "cut": stats([s.cut for s in v])}
                       for k, v in (("exact", exact), ("fast", fast))}}
    result["verdict"] = truth_verdict(result)
    result["meta"] = {"seeds": n, "truth": f"mean of the other {n - 1} exact sweeps (batch {budget.exact_batch} "
                      f"each, own noise and cut)", "exact_batch": budget.exact_batch, "fast_pool": budget.pool,
                      "fast_cut_batch": FAST_VARIANTS["fast"]["cut_batch"], "fast_budget": FAST_BUDGET,
                      "threshold": THRESHOLD, "target_macs": TARGET_MACS, "ratio": ratio, "quick": args.quick,
                      **({"smoke": True} if args.smoke else {}),
                      "date": datetime.date.today().isoformat(), "machine": machine(threads=True),
                      "command": "python benchmarks/importance_cost.py --truth" + (" --quick" if args.quick else "")
                      + (" --smoke" if args.smoke else "")
                      + (f" --seeds {args.seeds}" if args.seeds else ""),
                      "wall_time_s": time.perf_counter() - start, "versions": library_versions()}
    print(truth_table(result))
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"importance_cost{'_quick' if args.quick and not args.smoke else ''}.json"
    data = json.loads(out.read_text()) if out.exists() else {}
    data["truth"] = result
    write_json_atomic(out, data)
    print(f"wrote key 'truth' into {out}")


def truth_verdict(r: dict) -> str:
    """Is fast closer to the truth than exact-64 beyond the spread (|d| > s_fast + s_exact)?"""
    parts = []
    for m in ("iou", "spearman"):
        e, f = r["vs_truth"][f"exact {m}"], r["vs_truth"][f"fast {m}"]
        d = f["mean"] - e["mean"]
        beyond = abs(d) > e["std"] + f["std"]
        parts.append(f"{m}: fast {f['mean']:.3f} vs exact-64 {e['mean']:.3f} (fast - exact {d:+.3f}, "
                     f"{'beyond' if beyond else 'within'} the spread {e['std'] + f['std']:.3f}; paired "
                     f"{r['fast_minus_exact'][m]['mean']:+.3f} +- {r['fast_minus_exact'][m]['std']:.3f})")
    return "; ".join(parts)


def truth_table(r: dict) -> str:
    m = lambda s: f"{s['mean']:.3f} +- {s['std']:.3f}"  # noqa: E731
    lines = [f"against the truth ({r['meta']['truth']}), {r['meta']['seeds']} seeds",
             f"{'estimator':<12}{'evals':>10}{'IoU kept channels':>22}{'Spearman':>22}"]
    for k in ("exact", "fast"):
        lines.append(f"{k:<12}{r['cost'][k]['sample_gradient_evals']['mean']:>10.0f}"
                     f"{m(r['vs_truth'][f'{k} iou']):>22}{m(r['vs_truth'][f'{k} spearman']):>22}")
    lines.append(f"{'fast - exact':<12}{'':>10}{m(r['fast_minus_exact']['iou']):>22}"
                 f"{m(r['fast_minus_exact']['spearman']):>22}")
    h = r["truth_halves"]
    lines.append(f"truth noise: two disjoint {h['sweeps_per_half']}-sweep halves agree at IoU {h['iou']:.3f}, "
                 f"Spearman {h['spearman']:.3f}; magnitude vs truth IoU {r['magnitude_vs_truth_all']['iou']:.3f}")
    lines.append(r["verdict"])
    return "\n".join(lines)
