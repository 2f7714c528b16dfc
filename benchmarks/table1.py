"""The paper's Table 1, reproduced on the embedded digits teacher (PAPER.md, "Results to beat").

Every pruned row has the same size (target 56% of the teacher's MACs, the paper's 3.4G/6.1G), the
same post-training (steps, batch, lr, EMA) and the same seeds; only the importance criterion
differs. The scratch rows train the pruned architecture from fresh weights ("reinit"), once with the
same post-training budget and once with the teacher's whole training budget. All models are sampled
from the same initial noise (DDIM, eta 0) so SSIM pairs image i of the teacher with image i of each
student. Diff-Pruning's thresholds share one calibration sweep per seed (`importance.estimate_many`):
each threshold sees exactly the gradients a separate run would have accumulated.

    python benchmarks/table1.py --quick            # smoke check, < 15 min on 2 cores
    python benchmarks/table1.py --seeds 3          # the full table (hours on CPU)
    python benchmarks/table1.py --smoke --out DIR  # the code path in seconds (tiny random teacher), into DIR

Writes benchmarks/results/table1{_quick}.json and .md (--out: into that folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from pathlib import Path

from _common import Plan as BasePlan
from _common import (
    aggregate,
    finetune,
    machine,
    prune_row,
    sample_and_evaluate,
    smoke_teacher,
    teacher_recipe,
    worker_init,
)
from bench_args import add_budget_options, add_smoke_options, chosen_budget, results_dir

from diffprune.cli.demo_job import embedded_teacher
from diffprune.io import library_versions
from diffprune.prune.importance import estimate_many

THRESHOLDS = (0.0, 0.02, 0.05, 0.10)


@dataclasses.dataclass(frozen=True)
class Budget:
    """Everything that differs between --quick and the full run."""

    seeds: int
    calibration_batch: int
    finetune_fraction: float  # of the teacher's training steps
    num_images: int
    sample_steps: int
    scratch_full: bool


FULL = Budget(seeds=3, calibration_batch=64, finetune_fraction=0.15, num_images=500, sample_steps=100,
              scratch_full=True)
QUICK = Budget(seeds=1, calibration_batch=16, finetune_fraction=0.02, num_images=200, sample_steps=20,
               scratch_full=False)
SMOKE = Budget(seeds=1, calibration_batch=4, finetune_fraction=0.02, num_images=10, sample_steps=2,
               scratch_full=False)  # with smoke_teacher: 2 post-training steps; FID/KID need >= 10 images
# --smoke runs one row of each kind: scratch (no importance), the shared exact sweep, the fast estimator
SMOKE_ROWS = ("scratch (same budget)", "diff-pruning thr=0.05", "diff-pruning thr=0.05, fast estimator")


def row_specs(budget: Budget) -> list[dict]:
    """(name, method, threshold, post-training kind) of every pruned or scratch row."""
    rows = [{"name": "scratch (same budget)", "method": "reinit", "threshold": 0.0, "train": "short"}]
    if budget.scratch_full:
        rows.append({"name": "scratch (teacher budget)", "method": "reinit", "threshold": 0.0, "train": "full"})
    rows += [{"name": n, "method": m, "threshold": 0.0, "train": "short"}
             for n, m in (("random", "random"), ("magnitude", "magnitude"), ("taylor (all steps)", "taylor"))]
    rows += [{"name": f"diff-pruning thr={t:.2f}", "method": "diff-pruning", "threshold": t, "train": "short"}
             for t in THRESHOLDS]
    rows.append({"name": "diff-pruning thr=0.05, fast estimator", "method": "diff-pruning", "threshold": 0.05,
                 "train": "short", "estimator": "fast"})
    return rows


def uses_sweep(spec: dict) -> bool:
    """Rows whose importance comes from the shared exact sweep of their seed."""
    return spec["method"] in ("diff-pruning", "taylor") and spec.get("estimator", "exact") == "exact"


def run_row(plan: Plan, spec: dict, seed: int, importance) -> dict:
    """Prune -> post-train -> sample -> evaluate one row for one seed; returns its metrics."""
    tag = f"{spec['name'].replace(' ', '_').replace('=', '')}_s{seed}"
    # the fast row makes its own cut and pairs from a larger pool (importance.estimate_fast)
    report = prune_row(plan, spec["method"], spec["threshold"], seed, spec.get("estimator", "exact"),
                       plan.work / "pruned" / tag, importance)
    recipe = plan.recipe
    steps = (recipe["steps"] if spec["train"] == "full"
             else max(1, round(plan.budget.finetune_fraction * recipe["steps"])))
    tuned = finetune(plan, plan.work / "pruned" / tag, plan.work / "finetuned" / tag, steps, seed)
    ev = sample_and_evaluate(plan, tuned, tag)
    imp = report["importance"]
    return {"params": report["params"]["after"], "macs": report["macs"]["after"],
            "latency_speedup": ev["cost"]["ratios"]["latency_speedup"], "fid": ev["fid"]["value"],
            "kid": ev["kid"]["mean"], "ssim": ev["consistency"]["ssim"]["mean"], "train_steps": steps,
            "kept_timesteps": imp["num_kept_timesteps"] if spec["method"] in ("diff-pruning", "taylor") else None,
            "sample_gradient_evals": imp.get("sample_gradient_evals"),
            "prune_wall_s": report["wall_time_s"]["total"]}


def run_teacher(plan: Plan) -> dict:
    """The teacher's own samples (the SSIM reference of every row) and metrics."""
    ev = sample_and_evaluate(plan, plan.teacher, "teacher", against_teacher=False)
    return {"params": ev["cost"]["student"]["params"], "macs": ev["cost"]["student"]["macs"],
            "latency_speedup": 1.0, "fid": ev["fid"]["value"], "kid": ev["kid"]["mean"], "ssim": 1.0,
            "train_steps": None, "kept_timesteps": None, "prune_wall_s": None}


COLUMNS = (("params", "params", 1e6, "{:.3f}M"), ("macs", "MACs", 1e6, "{:.1f}M"),
           ("latency_speedup", "latency x", 1, "{:.2f}"), ("fid", "digits-FID", 1, "{:.2f}"),
           ("kid", "KID", 1, "{:.4f}"), ("ssim", "SSIM", 1, "{:.3f}"), ("train_steps", "post-train steps", 1, "{:.0f}"),
           ("kept_timesteps", "kept t", 1, "{:.0f}"), ("prune_wall_s", "prune s", 1, "{:.1f}"))


def cell(stat: dict, scale: float, fmt: str) -> str:
    if stat["mean"] is None:
        return "-"
    text = fmt.format(stat["mean"] / scale)
    return text + (f" ± {fmt.format(stat['std'] / scale)}" if stat["n"] > 1 and stat["std"] else "")


def markdown(table: dict, meta: dict) -> str:
    head = "| method | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, stats in table.items():
        lines.append(f"| {name} | {stats['fid']['n']} | "
                     + " | ".join(cell(stats[k], s, f) for k, _, s, f in COLUMNS) + " |")
    notes = [f"Seeds: {meta['seeds']}; mean ± std over seeds. Samples: {meta['num_images']} per model, "
             f"DDIM {meta['sample_steps']} steps, eta 0, same noise for every model. FID/KID: "
             f"digits-cnn-v1 features vs the 1797 digits. Latency x: teacher/student median forward time, "
             f"batch 1, CPU. Post-training: {meta['finetune_steps']} steps "
             f"({meta['finetune_fraction']:.0%} of the teacher's {meta['teacher_steps']}).",
             (f"Tabulated {meta['date']} from the finished rows of a run on {meta['machine']}."
              if meta.get("report_only") else
              f"Ran {meta['date']} on {meta['machine']} in {meta['wall_time_s'] / 60:.1f} min"
              f" ({meta.get('jobs', 1)} worker process(es), one thread each).")]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def spread_notes(table: dict) -> list[str]:
    """Which FID/SSIM differences from diff-pruning thr=0.05 exceed the seed spread (|d| > s1 + s2)."""
    ref = table.get("diff-pruning thr=0.05")
    notes = []
    if not ref or ref["fid"]["n"] < 2:
        return ["fewer than 2 seeds: no spread, no difference can be called significant"]
    for name, stats in table.items():
        if name in ("teacher", "diff-pruning thr=0.05") or stats["fid"]["n"] < 2:
            continue
        for key in ("fid", "ssim"):
            d = stats[key]["mean"] - ref[key]["mean"]
            if abs(d) > stats[key]["std"] + ref[key]["std"]:
                notes.append(f"{name}: {key} differs from diff-pruning thr=0.05 by {d:+.4f} (beyond the spread)")
    return notes or ["no FID/SSIM difference from diff-pruning thr=0.05 exceeds the seed spread"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_budget_options(parser, "smoke-check budget (1 seed, short runs)", "runs/table1")
    parser.add_argument("--resume", action="store_true", help="keep the finished rows found in the work folder")
    parser.add_argument("--only", default=None, metavar="TEXT",
                        help="run only the rows whose name contains TEXT (the others are tabulated if finished)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: tabulate the finished rows in the work folder (cells say how many seeds)")
    add_smoke_options(parser, "a tiny random teacher with 20 timesteps, 1 seed, 10 images, DDIM 2")
    args = parser.parse_args()
    budget = chosen_budget(parser, args, QUICK, FULL, SMOKE)
    out = results_dir(parser, args)
    start = time.perf_counter()
    teacher = smoke_teacher(out / "teacher") if args.smoke else embedded_teacher()
    recipe = teacher_recipe(teacher)
    work = args.work / ("smoke" if args.smoke else "quick" if args.quick else "full")
    if work.exists() and not (args.resume or args.report_only):
        raise SystemExit(f"{work} exists; remove it first or pass --resume")
    plan = Plan(teacher, recipe, budget, work, SMOKE_ROWS if args.smoke else None)
    results = finished_rows(plan) if args.report_only else run_all(plan, args.jobs, args.only)
    table = {name: {k: aggregate([r[k] for r in runs]) for k, *_ in COLUMNS} for name, runs in results.items()}
    meta = {"seeds": budget.seeds, "num_images": budget.num_images, "sample_steps": budget.sample_steps,
            "finetune_fraction": budget.finetune_fraction, "teacher_steps": recipe["steps"],
            "finetune_steps": max(1, round(budget.finetune_fraction * recipe["steps"])),
            "date": datetime.date.today().isoformat(), "machine": machine(), "jobs": args.jobs,
            "wall_time_s": time.perf_counter() - start, "resumed": args.resume, "report_only": args.report_only,
            "seeds_per_row": {name: len(runs) for name, runs in results.items()},
            "budget": dataclasses.asdict(budget), "versions": library_versions()}
    notes = spread_notes(table)
    suffix = "_quick" if args.quick and not args.smoke else ""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"table1{suffix}.json").write_text(json.dumps({"table": table, "runs": results, "meta": meta,
                                                          "spread_notes": notes}, indent=2) + "\n")
    md = markdown(table, meta) + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (out / f"table1{suffix}.md").write_text(md)
    print(md)


@dataclasses.dataclass(frozen=True)
class Plan(BasePlan):
    """_common.Plan with the rows it runs and where each finished row is recorded."""

    rows: tuple[str, ...] | None = None  # the names of row_specs this run covers (None: all)

    def specs(self) -> list[dict]:
        return [s for s in row_specs(self.budget) if self.rows is None or s["name"] in self.rows]

    def row_file(self, name: str, seed: int | None) -> Path:
        tag = name.replace(" ", "_").replace("=", "") + ("" if seed is None else f"_s{seed}")
        return self.work / "rows" / f"{tag}.json"


def _teacher_task(plan: Plan) -> dict:
    return run_teacher(plan)


def _sweep_task(plan: Plan, seed: int) -> dict:
    return estimate_many_for_seed(plan.teacher, plan.budget, seed, progress=False)


def _row_task(plan: Plan, spec: dict, seed: int, importance) -> dict:
    return run_row(plan, spec, seed, importance)


def run_all(plan: Plan, jobs: int, only: str | None = None) -> dict[str, list[dict]]:
    """Run the teacher, the per-seed sweeps and every (row, seed) on `jobs` processes.

    A task starts once what it needs is done (rows need the teacher's samples for SSIM and, for
    gradient methods, their seed's sweep); the longest tasks are queued first. Each finished row is
    written to work/rows/*.json, so `--resume` skips it after an interruption.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    done: dict[tuple, object] = {}
    for key, path in [(("teacher",), plan.row_file("teacher", None))] + [
            (("row", spec["name"], seed), plan.row_file(spec["name"], seed))
            for seed in range(plan.budget.seeds) for spec in plan.specs()]:
        if path.exists():
            done[key] = json.loads(path.read_text())
    pending = [("sweep", seed) for seed in range(plan.budget.seeds)] + [("teacher",)]
    pending += [("row", s["name"], seed) for s in plan.specs() if s["train"] == "full"
                for seed in range(plan.budget.seeds)]
    pending += [("row", s["name"], seed) for seed in range(plan.budget.seeds) for s in plan.specs()
                if s["train"] != "full"]
    pending = [k for k in pending if k not in done and (only is None or k[0] != "row" or only in k[1])]
    specs = {s["name"]: s for s in plan.specs()}
    needs_sweep = {k[2] for k in pending if k[0] == "row" and uses_sweep(specs[k[1]])}
    pending = [k for k in pending if k[0] != "sweep" or k[1] in needs_sweep]

    def deps(key: tuple) -> list[tuple]:
        if key[0] != "row":
            return []
        sweep = [("sweep", key[2])] if uses_sweep(specs[key[1]]) else []
        return [("teacher",)] + sweep

    def submit(pool, key: tuple):
        print(f"[start] {key}", flush=True)
        if key[0] == "teacher":
            return pool.submit(_teacher_task, plan)
        if key[0] == "sweep":
            return pool.submit(_sweep_task, plan, key[1])
        spec = specs[key[1]]
        sweep = done.get(("sweep", key[2]), {}) if uses_sweep(spec) else {}  # the fast row makes its own
        return pool.submit(_row_task, plan, spec, key[2], sweep.get((spec["method"], spec["threshold"])))

    running: dict = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=worker_init) as pool:
        while pending or running:
            for key in [k for k in pending if all(d in done for d in deps(k))][:jobs - len(running)]:
                pending.remove(key)
                running[submit(pool, key)] = (key, time.perf_counter())
            if not running:
                raise SystemExit(f"nothing can start: {pending[:3]} wait for tasks that are neither done nor queued")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                key, began = running.pop(future)
                done[key] = future.result()
                print(f"[done {time.perf_counter() - began:.0f}s] {key}", flush=True)
                if key[0] != "sweep":
                    path = plan.row_file(key[1] if key[0] == "row" else "teacher",
                                         key[2] if key[0] == "row" else None)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(done[key], indent=2) + "\n")
    return finished_rows(plan)


def finished_rows(plan: Plan) -> dict[str, list[dict]]:
    """Row name -> the per-seed results found in work/rows (all of them after a complete run)."""
    results: dict[str, list[dict]] = {}
    for name, seed in [("teacher", None)] + [(spec["name"], seed) for spec in plan.specs()
                                              for seed in range(plan.budget.seeds)]:
        path = plan.row_file(name, seed)
        if path.exists():
            results.setdefault(name, []).append(json.loads(path.read_text()))
    return results


def estimate_many_for_seed(teacher: Path, budget: Budget, seed: int, progress: bool = True) -> dict:
    """One calibration sweep per seed shared by taylor and every diff-pruning threshold."""
    from diffprune.data import first_batch, make_dataset
    from diffprune.families import family_for
    from diffprune.io import load_pipeline

    pipe = load_pipeline(teacher)
    model = pipe.unet.requires_grad_(True)
    family = family_for(model)
    images = first_batch(make_dataset("digits", family.sample_size(model), family.in_channels(model)),
                         budget.calibration_batch, seed)
    return estimate_many(model, family, pipe.scheduler, images, THRESHOLDS, seed=seed, progress=progress)


if __name__ == "__main__":
    main()
