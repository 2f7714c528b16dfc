"""One budget, non-uniform widths (issue 16 part 3): uniform vs global vs isomorphic allocation.

Digits (the embedded teacher, Table 1's protocol): every row is pruned to the same MACs (Table 1's
target, 56% of the teacher), with Diff-Pruning importance from the fast estimator (thr 0.05, pool of
512 images) computed ONCE per seed and reused by the three allocations, then the same post-training
(Table 1's 300 steps, the teacher's recipe), sampled from the same noise and scored with digits-FID,
KID and SSIM against the teacher's samples. Only the allocation differs between rows of a seed.

DiT (a tiny random-weight DiTTransformer2DModel, like the tests build): no data, no post-training,
so it can only show structure. Per allocation at the same MACs target: per-layer widths,
params/MACs, and the pruned model's noise-prediction loss and output distance to the unpruned one
on a fixed batch. Labelled as such in the results.

    python benchmarks/allocation.py                 # Table 1 protocol: 500 samples, DDIM 100 steps
    python benchmarks/allocation.py --reduced       # 200 samples, DDIM 20 steps (labelled reduced)
    python benchmarks/allocation.py --resume        # keep the finished runs in runs/allocation/
    python benchmarks/allocation.py --smoke --out DIR   # the code path in seconds: tiny random teacher, 1 seed,
                                                        # then --search-timing's path on a tiny UNet

Writes benchmarks/results/allocation.{json,md,png} (allocation_reduced.* with --reduced; --out: into that
folder): the command, date, machine, versions. `--reuse-models runs/allocation/reduced` evaluates the reduced run's
post-trained models at the Table 1 protocol instead of training them again (the prune and post-training do not
depend on it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import FAST_POOL, TARGET_MACS, aggregate, finetune, sample_and_evaluate, smoke_teacher, teacher_recipe
from bench_args import add_smoke_options, results_dir
from size_search import ARCHS as SEARCH_ARCHS
from size_search import SMOKE_ARCH
from table1 import FULL, SMOKE, Plan

from diffprune.cli.demo_job import embedded_teacher
from diffprune.io import library_versions

ALLOCATIONS = ("uniform", "global", "isomorphic")
THRESHOLD = 0.05
METRICS = (("fid", "digits-FID", "{:.3f}"), ("kid", "KID", "{:.4f}"), ("ssim", "SSIM", "{:.4f}"))


def seed_importance(teacher: Path, seed: int):
    """The fast Diff-Pruning importance of one seed, as `diffprune prune --estimator fast` computes it."""
    from diffprune.data import first_batch, make_dataset
    from diffprune.families import family_for
    from diffprune.io import load_pipeline
    from diffprune.prune.importance import estimate_fast

    pipe = load_pipeline(teacher)
    model = pipe.unet.requires_grad_(True)
    family = family_for(model)
    images = first_batch(make_dataset("digits", family.sample_size(model), family.in_channels(model)),
                         FAST_POOL, seed)
    return estimate_fast(model, family, pipe.scheduler, images, THRESHOLD, seed, progress=False)


def ratio_above(teacher: Path, importance, allocation: str, target: float) -> float:
    """The largest ratio whose plan keeps >= `target` of the MACs: the size just above a step of the ranking
    that the target falls into (GroupNorm groups of 4 channels move in 25% steps), found on the size planner."""
    from diffprune.families import family_for
    from diffprune.io import load_pipeline
    from diffprune.prune.allocation import allocate, group_scores
    from diffprune.prune.size_search import SizePlanner

    model = load_pipeline(teacher).unet
    family = family_for(model)
    scores = group_scores(model, family, importance)
    planner = SizePlanner(model, family)
    planner.layer_ratios_for = lambda r: allocate(scores, r, allocation, None)
    lo, hi = 0.0, 0.95
    for _ in range(25):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if planner.evaluate(mid).macs_fraction >= target else (lo, mid)
    return lo


def reused_row(plan: Plan, reuse: Path, tag: str) -> dict:
    """Evaluate, at this plan's protocol, the post-trained model of another run's work folder (same prune and
    post-training: only the evaluation protocol differs); its prune facts are that run's."""
    start = time.perf_counter()
    row = json.loads((reuse / "rows" / f"{tag}.json").read_text())
    ev = sample_and_evaluate(plan, reuse / "finetuned" / tag, tag)
    return {**row, "fid": ev["fid"]["value"], "kid": ev["kid"]["mean"], "ssim": ev["consistency"]["ssim"]["mean"],
            "model_from": str(reuse / "finetuned" / tag), "wall_s": time.perf_counter() - start}


def run_digits_row(plan: Plan, allocation: str, seed: int, importance) -> dict:
    from diffprune.errors import DiffpruneError
    from diffprune.prune.config import PruneConfig
    from diffprune.prune.stage import run_prune

    tag = f"{allocation}_s{seed}"
    start = time.perf_counter()
    size: dict = {"target_macs": TARGET_MACS}
    common = dict(model=str(plan.teacher), data="digits", method="diff-pruning", threshold=THRESHOLD, seed=seed,
                  estimator="fast", batch_size=FAST_POOL, allocation=allocation)
    try:
        report = run_prune(PruneConfig(**common, **size), plan.work / "pruned" / tag, overwrite=True,
                           progress=False, importance=importance)
    except DiffpruneError as err:  # the target falls between two sizes: take the one above (more MACs)
        if "falls between two sizes" not in str(err):
            raise
        size = {"ratio": ratio_above(plan.teacher, importance, allocation, TARGET_MACS)}
        print(f"[seed {seed}] {allocation}: {err}; pruning at ratio {size['ratio']:.4f} instead", flush=True)
        report = run_prune(PruneConfig(**common, **size), plan.work / "pruned" / tag, overwrite=True,
                           progress=False, importance=importance)
    steps = max(1, round(plan.budget.finetune_fraction * plan.recipe["steps"]))
    tuned = finetune(plan, plan.work / "pruned" / tag, plan.work / "finetuned" / tag, steps, seed)
    ev = sample_and_evaluate(plan, tuned, tag)
    return {"params": report["params"]["after"], "macs": report["macs"]["after"],
            "macs_fraction": report["macs"]["fraction"], "ratio": report["ratio"],
            "fid": ev["fid"]["value"], "kid": ev["kid"]["mean"], "ssim": ev["consistency"]["ssim"]["mean"],
            "train_steps": steps, "estimator": report["estimator"], "groups": report["allocation"]["groups"],
            "size": size,  # target_macs, or the ratio just above an unreachable target
            "wall_s": time.perf_counter() - start}


def run_digits(plan: Plan, reuse: Path | None = None) -> dict[str, list[dict]]:
    """Teacher samples, then per seed one importance and the three allocations; each run cached.
    `reuse`: evaluate that work folder's post-trained models instead of pruning and post-training again."""
    rows = plan.work / "rows"
    rows.mkdir(parents=True, exist_ok=True)
    if not (rows / "teacher.json").exists():
        t0 = time.perf_counter()
        sample_and_evaluate(plan, plan.teacher, "teacher", against_teacher=False)
        (rows / "teacher.json").write_text(json.dumps({"wall_s": time.perf_counter() - t0}) + "\n")
    results: dict[str, list[dict]] = {a: [] for a in ALLOCATIONS}
    for seed in range(plan.budget.seeds):
        importance = None
        for allocation in ALLOCATIONS:
            path = rows / f"{allocation}_s{seed}.json"
            if not path.exists() and reuse is not None:
                path.write_text(json.dumps(reused_row(plan, reuse, f"{allocation}_s{seed}"), indent=2) + "\n")
            if not path.exists():
                if importance is None:
                    t0 = time.perf_counter()
                    importance = seed_importance(plan.teacher, seed)
                    print(f"[seed {seed}] importance {time.perf_counter() - t0:.0f}s", flush=True)
                row = run_digits_row(plan, allocation, seed, importance)
                path.write_text(json.dumps(row, indent=2) + "\n")
                print(f"[seed {seed}] {allocation}: FID {row['fid']:.3f} KID {row['kid']:.4f} "
                      f"SSIM {row['ssim']:.4f} MACs {row['macs_fraction']:.3f} ({row['wall_s']:.0f}s)", flush=True)
            results[allocation].append(json.loads(path.read_text()))
    return results


def paired(results: dict[str, list[dict]]) -> dict:
    """Per metric, allocation - uniform per seed: mean, std, the per-seed values, and a verdict.

    "better beyond the seed spread": every seed better and |mean| > the std of the differences.
    """
    out = {}
    for allocation in ALLOCATIONS[1:]:
        out[allocation] = {}
        for key, _, _ in METRICS:
            diffs = [a[key] - u[key] for a, u in zip(results[allocation], results["uniform"], strict=True)]
            stat = aggregate(diffs)
            sign = 1 if key == "ssim" else -1  # lower FID/KID is better, higher SSIM
            better = all(sign * d > 0 for d in diffs) and abs(stat["mean"]) > stat["std"]
            worse = all(sign * d < 0 for d in diffs) and abs(stat["mean"]) > stat["std"]
            stat["verdict"] = "better beyond the seed spread" if better else (
                "worse beyond the seed spread" if worse else "within the seed spread")
            out[allocation][key] = stat
    return out


def run_dit(seed: int = 0, smoke: bool = False) -> dict:
    """Structure on a tiny random DiT: widths, params/MACs and the loss at the same MACs target, no post-training.
    `smoke`: 2 layers, a pool of 16 latents, 2 importance passes (seconds; numbers meaningless)."""
    import torch
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    from diffprune.diffusion import noisy_and_target
    from diffprune.families import family_for
    from diffprune.io.structure import widths
    from diffprune.prune.importance import estimate_fast
    from diffprune.prune.pruning import PruneConfig, prune_model

    torch.manual_seed(seed)
    layers, size = (2, 16) if smoke else (4, 64)
    model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=layers, sample_size=16, patch_size=2, num_embeds_ada_norm=10)
    with torch.no_grad():  # diffusers zero-initialises adaLN-Zero: give every tensor a say in the output
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.2)
    model.requires_grad_(True)
    family, scheduler = family_for(model), DDPMScheduler(num_train_timesteps=100)
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(size, 4, 16, 16, generator=g)
    labels = torch.randint(0, 10, (size,), generator=g)
    imp = estimate_fast(model, family, scheduler, pool, THRESHOLD, seed, progress=False,
                        cond={"class_labels": labels}, passes=2 if smoke else None)
    x0, noise = pool[:16], torch.randn(16, 4, 16, 16, generator=g)
    t = torch.linspace(0, 99, 16).long()
    x_t, target = noisy_and_target(scheduler, x0, noise, t)
    cond = {"class_labels": labels[:16]}
    model.eval()
    with torch.no_grad():
        ref = family.predict(model, x_t, t, cond)
    out = {"model": f"DiTTransformer2DModel(heads 4 x 16, {layers} layers, 16x16x4 latents, patch 2, 10 classes), "
                    "random init with adaLN-Zero weights drawn N(0, 0.2)",
           "teacher_loss": float(torch.nn.functional.mse_loss(ref[:, :4], target)), "rows": {}}
    for allocation in ALLOCATIONS:
        cfg = PruneConfig(model="dit", target_macs=TARGET_MACS, threshold=THRESHOLD, seed=seed, estimator="fast",
                          allocation=allocation)
        res = prune_model(model, family, cfg, imp, progress=False)
        res.model.eval()
        with torch.no_grad():
            pred = family.predict(res.model, x_t, t, cond)
        before, after = widths(res.widths_before), widths(res.widths_after)
        out["rows"][allocation] = {
            "params": res.params[1], "params_fraction": res.params[1] / res.params[0], "macs": res.macs[1],
            "macs_fraction": res.macs[1] / res.macs[0], "ratio": res.ratio,
            "loss": float(torch.nn.functional.mse_loss(pred[:, :4], target)),
            "output_mse_to_unpruned": float(torch.nn.functional.mse_loss(pred, ref)),
            "widths": {n: [after[n], before[n]] for n in before if after.get(n) != before[n]}}
    return out


def search_timing(arch: str, allocation: str = "global") -> dict:
    """Wall time of a non-uniform plan on a full-size architecture (random weights, magnitude scores, no sweep):
    the group scores (allocation.group_scores) and the target search on them (size_search.search_sizes)."""
    import torch
    from size_search import ARCHS, build  # the full-size configs and targets of benchmarks/size_search.py

    from diffprune.families import family_for
    from diffprune.prune.allocation import group_scores
    from diffprune.prune.config import PruneConfig
    from diffprune.prune.importance import ImportanceResult
    from diffprune.prune.size_search import search_sizes

    model, target = build(arch), ARCHS[arch][1]  # size_search.py's targets (CIFAR: Table 1's 0.56)
    family, imp = family_for(model), ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
    row = {"arch": arch, "dtype": str(next(model.parameters()).dtype), "allocation": allocation, "target": target}
    for alloc in ("uniform", allocation):
        t0 = time.perf_counter()
        scores = group_scores(model, family, imp) if alloc != "uniform" else None
        t1 = time.perf_counter()
        cfg = PruneConfig(model=arch, method="magnitude", target_macs=target, allocation=alloc)
        plan = search_sizes(model, family, cfg, progress=False, scores=scores)
        row[alloc] = {"scores_s": t1 - t0, "search_s": time.perf_counter() - t1, "setup_s": plan.setup_s,
                      "candidates": len(plan.candidates), "macs_fraction": plan.chosen.macs_fraction,
                      "params_fraction": plan.chosen.params_fraction}
    torch.set_default_dtype(torch.float32)
    return row


def plot_widths(results: dict[str, list[dict]], dit: dict, path: Path) -> Path:
    """Kept fraction of each ranked group under each allocation: digits (mean over seeds) and the DiT."""
    from diffprune.plots import figure

    fig = figure((11, 7), dpi=90)
    axes = fig.subplots(2, 1)
    names = [g["layer"] for g in results["uniform"][0]["groups"]]
    x = np.arange(len(names))
    for k, a in enumerate(ALLOCATIONS):
        kept = [np.mean([next(g["kept"] / g["total"] for g in r["groups"] if g["layer"] == n) for r in results[a]])
                for n in names]
        axes[0].bar(x + (k - 1) * 0.27, kept, width=0.27, label=a)
    axes[0].set_xticks(x, names, rotation=90, fontsize=5)
    axes[0].set_ylabel("kept / total")
    axes[0].set_title(f"digits teacher at {TARGET_MACS:.0%} MACs: kept width per ranked group (mean over seeds)",
                      fontsize=9)
    axes[0].legend(fontsize=7)
    layers = sorted({n for r in dit["rows"].values() for n in r["widths"]})
    x = np.arange(len(layers))
    for k, (a, r) in enumerate(dit["rows"].items()):
        axes[1].bar(x + (k - 1) * 0.27, [r["widths"][n][0] / r["widths"][n][1] if n in r["widths"] else 1.0
                                         for n in layers], width=0.27, label=a)
    axes[1].set_xticks(x, [n.replace("transformer_blocks.", "b") for n in layers], rotation=90, fontsize=5)
    axes[1].set_ylabel("kept / total")
    axes[1].set_title(f"tiny random DiT at {TARGET_MACS:.0%} MACs (structure only)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


def table_md(results: dict, stats: dict, diffs: dict, meta: dict) -> str:
    lines = [f"# Allocation: uniform vs global vs isomorphic ({meta['protocol']})", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}; machine: {meta['machine']}; "
             f"torch threads {meta.get('threads', 1)}; seeds {meta['seeds']}; "
             f"wall of this invocation {meta['wall_time_s'] / 60:.1f} min, "
             f"of the digits rows (prune + post-train + sample + evaluate, all runs) "
             f"{meta['rows_wall_s'] / 60:.1f} min on a shared machine"
             + (f"; post-trained models from `{meta['models_from']}`" if meta.get("models_from") else ""), "",
             f"Digits teacher pruned to {TARGET_MACS:.0%} MACs, Diff-Pruning fast estimator (thr {THRESHOLD}, "
             f"pool {FAST_POOL}) computed once per seed, {meta['finetune_steps']} post-training steps, "
             f"{meta['num_images']} samples, DDIM {meta['sample_steps']} steps. mean ± std over seeds.", "",
             "| allocation | MACs | MACs fraction | params | " + " | ".join(t for _, t, _ in METRICS) + " |",
             "|---|---|---|---|" + "---|" * len(METRICS)]
    for a in ALLOCATIONS:
        s = stats[a]
        cells = [f"{fmt.format(s[k]['mean'])} ± {fmt.format(s[k]['std'])}" for k, _, fmt in METRICS]
        lines.append(f"| {a} | {s['macs']['mean'] / 1e6:.2f}M | {s['macs_fraction']['mean']:.3f} | "
                     f"{s['params']['mean'] / 1e6:.3f}M | "
                     + " | ".join(cells) + " |")
    for a in ALLOCATIONS:
        fallback = [(k, r) for k, r in enumerate(results[a]) if "ratio" in r.get("size", {})]
        if fallback:
            sizes = ", ".join(f"{r['macs_fraction']:.3f}" for _, r in fallback)
            lines += ["", f"{a}: the target {TARGET_MACS:.0%} ± 2% falls between two sizes of its ranking on seed(s) "
                      f"{', '.join(str(k) for k, _ in fallback)} (GroupNorm groups of 4 channels move in 25% steps); "
                      f"pruned at the size just above instead: MACs fraction "
                      f"{sizes} (more MACs than the target)."]
    lines += ["", "Paired difference to uniform (same seed: same importance, same post-training seed):", "",
              "| allocation | " + " | ".join(f"Δ {t}" for _, t, _ in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for a, d in diffs.items():
        lines.append(f"| {a} | " + " | ".join(f"{fmt.format(d[k]['mean'])} ± {fmt.format(d[k]['std'])} "
                                              f"({d[k]['verdict']})" for k, _, fmt in METRICS) + " |")
    return "\n".join(lines) + "\n"


def dit_md(dit: dict) -> str:
    lines = ["", "## DiT (structure only: random weights, no data, no post-training)", "",
             f"{dit['model']}; unpruned noise-prediction loss on the fixed batch {dit['teacher_loss']:.4f}.", "",
             "| allocation | MACs | params | loss (fixed batch) | output MSE to unpruned "
             "| widths changed (kept/total) |",
             "|---|---|---|---|---|---|"]
    for a, r in dit["rows"].items():
        changed = list(r["widths"].items())[:8]
        w = ", ".join(f"{n.replace('transformer_blocks.', 'b')} {k}/{t}" for n, (k, t) in changed)
        lines.append(f"| {a} | {r['macs_fraction']:.3f} | {r['params_fraction']:.3f} | {r['loss']:.4f} | "
                     f"{r['output_mse_to_unpruned']:.4f} | {w}{' ...' if len(r['widths']) > 8 else ''} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    import os

    return f"{model} ({os.cpu_count()} cores)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="200 samples, DDIM 20 steps (labelled reduced)")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (--smoke: 1)")
    parser.add_argument("--jobs", type=int, default=1, choices=(1,), help="runs one after another on one thread")
    parser.add_argument("--work", type=Path, default=Path("runs/allocation"))
    parser.add_argument("--resume", action="store_true", help="keep the finished runs in the work folder")
    parser.add_argument("--reuse-models", type=Path, default=None,
                        help="a finished work folder (e.g. runs/allocation/reduced): evaluate its post-trained "
                             "models at this protocol instead of pruning and post-training them again (same seeds, "
                             "same recipe)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--skip-digits", action="store_true",
                        help="only the DiT structure measurement, printed (no results files written)")
    parser.add_argument("--search-timing", choices=tuple(SEARCH_ARCHS), default=None,
                        help=f"only time a global plan on this full-size architecture (prints JSON; {SMOKE_ARCH}: "
                             "benchmarks/size_search.py's tiny smoke UNet)")
    add_smoke_options(parser, "a tiny random teacher with 20 timesteps, 1 seed, 10 images, DDIM 2, 2 post-training "
                              f"steps; then --search-timing {SMOKE_ARCH}")
    args = parser.parse_args()
    out_dir = results_dir(parser, args)
    import torch

    torch.set_num_threads(args.threads)
    if args.search_timing:  # one architecture per call, collected in results/allocation_search_timing.json
        write_search_timing(args.search_timing, args.threads, out_dir)
        return
    start = time.perf_counter()
    budget = dataclasses.replace(SMOKE if args.smoke else FULL, seeds=args.seeds or (1 if args.smoke else 3))
    if args.reduced and not args.smoke:
        budget = dataclasses.replace(budget, num_images=200, sample_steps=20)
    teacher = smoke_teacher(out_dir / "teacher") if args.smoke else embedded_teacher()
    recipe = teacher_recipe(teacher)
    work = args.work / ("smoke" if args.smoke else "reduced" if args.reduced else "full")
    if work.exists() and not args.resume and not args.skip_digits:
        raise SystemExit(f"{work} exists; remove it first or pass --resume")
    plan = Plan(teacher, recipe, budget, work)
    meta = {"command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(),
            "machine": machine(), "seeds": budget.seeds, "num_images": budget.num_images,
            "sample_steps": budget.sample_steps, "protocol": "SMOKE run: tiny random teacher, numbers meaningless"
            if args.smoke else "REDUCED protocol: 200 samples, DDIM 20 steps"
            if args.reduced else "Table 1 protocol: 500 samples, DDIM 100 steps",
            "finetune_steps": max(1, round(budget.finetune_fraction * recipe["steps"])), "jobs": 1,
            "threads": args.threads, "models_from": str(args.reuse_models) if args.reuse_models else None,
            "versions": library_versions()}
    out: dict = {"meta": meta}
    md = ""
    if not args.skip_digits:
        results = run_digits(plan, args.reuse_models)
        keys = ("params", "macs", "macs_fraction", "fid", "kid", "ssim")
        stats = {a: {k: aggregate([r[k] for r in runs]) for k in keys} for a, runs in results.items()}
        diffs = paired(results)
        out.update(digits={"table": stats, "paired_vs_uniform": diffs, "runs": results})
        meta["wall_time_s"] = time.perf_counter() - start
        meta["rows_wall_s"] = sum(r["wall_s"] for runs in results.values() for r in runs)  # across resumes
        md = table_md(results, stats, diffs, meta)
    dit = run_dit(smoke=args.smoke)
    out["dit"] = dit
    meta["wall_time_s"] = time.perf_counter() - start
    md += dit_md(dit)
    if args.skip_digits:  # a look at the DiT alone: printed, the results files stay those of a whole run
        print(md)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    # the reduced run keeps its own files
    stem = "allocation_reduced" if args.reduced and not args.smoke else "allocation"
    (out_dir / f"{stem}.json").write_text(json.dumps(out, indent=2, default=_np) + "\n")
    plot_widths(out["digits"]["runs"], dit, out_dir / f"{stem}.png")
    md += f"\n![kept width per group]({stem}.png)\n"
    (out_dir / f"{stem}.md").write_text(md)
    print(md)
    if args.smoke:
        write_search_timing(SMOKE_ARCH, args.threads, out_dir)


def write_search_timing(arch: str, threads: int, out_dir: Path) -> None:
    """Time a global plan on `arch` and record it under its name in out_dir/allocation_search_timing.json."""
    row = {**search_timing(arch), "date": datetime.date.today().isoformat(), "machine": machine(),
           "threads": threads, "command": "python " + " ".join(sys.argv)}
    path = out_dir / "allocation_search_timing.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    rows[arch] = row
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(row, indent=2))


def _np(v):
    return v.item() if isinstance(v, np.generic) else str(v)


if __name__ == "__main__":
    main()
