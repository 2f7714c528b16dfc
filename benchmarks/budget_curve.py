"""Quality against post-training budget on the digits teacher: where Diff-Pruning wins (issue 18).

The teacher is pruned to 56% of its MACs by random, magnitude, Taylor (all steps), Diff-Pruning
thr 0.05 (exact sweep, batch 64) and Diff-Pruning thr 0.05 with the fast estimator, and scratch (the
pruned architecture re-initialised), each ONCE per seed; each pruned model is then post-trained with
the Table 1 recipe (batch 64, lr 1e-3 constant, EMA 0.999 with ratio warm-up, dropout 0.1; the
teacher's train_config.json) and evaluated after 1, 2, 5, 15 and 50% of the teacher's 2000 steps
(digits-FID/KID vs the 1797 digits, SSIM vs the teacher's images from the same initial noise, DDIM
eta 0), as in benchmarks/table1.py.

One run per (method, seed) serves every budget: the run stops at each budget (its pipeline = the EMA
weights at that step), is evaluated, then resumed to the next. This equals separate runs of k steps
because the recipe's lr is constant, the EMA decay depends only on the step, and every step's data,
timesteps, noise and dropout are a function of (seed, step) (diffprune.training); the run checks it
once (a fresh run of the second budget against the resumed one, weight digest) and records it.

    python benchmarks/budget_curve.py --quick              # smoke check, a few minutes
    python benchmarks/budget_curve.py --seeds 3 --jobs 2   # the full curve (many hours on CPU)
    python benchmarks/budget_curve.py ... --only taylor --merge --work runs/budget_curve_taylor
        # add one row to finished results: run it alone, merge it into the JSON's per-seed records
    python benchmarks/budget_curve.py --smoke --out DIR    # the code path in seconds (tiny random teacher)

Writes benchmarks/results/budget_curve{_quick}.{json,md,png} (_budget_report.py tabulates; --out: into that
folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from _budget_report import merge_found, write_report
from _common import Plan as BasePlan
from _common import finetune, machine, prune_row, sample_and_evaluate, smoke_teacher, teacher_recipe, worker_init
from bench_args import add_budget_options, add_smoke_options, chosen_budget, results_dir
from safetensors.torch import load_file

from diffprune.cli.demo_job import embedded_teacher
from diffprune.fsutil import write_json_atomic
from diffprune.io import library_versions
from diffprune.train.checkpoints import checkpoint_dirs

THRESHOLD = 0.05
# (row name, prune method, estimator)
ROWS = (("random", "random", "exact"), ("magnitude", "magnitude", "exact"),
        ("taylor (all steps)", "taylor", "exact"), ("diff-pruning thr=0.05", "diff-pruning", "exact"),
        ("diff-pruning thr=0.05, fast", "diff-pruning", "fast"), ("scratch", "reinit", "exact"))
HEAVY = "taylor (all steps)"  # its exact sweep covers all 1000 timesteps


@dataclasses.dataclass(frozen=True)
class Budget:
    seeds: int
    calibration_batch: int
    fractions: tuple[float, ...]  # of the teacher's training steps
    num_images: int
    sample_steps: int


FULL = Budget(seeds=3, calibration_batch=64, fractions=(0.01, 0.02, 0.05, 0.15, 0.5), num_images=500,
              sample_steps=100)
QUICK = Budget(seeds=1, calibration_batch=16, fractions=(0.01, 0.02), num_images=64, sample_steps=20)
SMOKE = Budget(seeds=1, calibration_batch=4, fractions=(0.01, 0.02), num_images=10, sample_steps=2)
# --smoke: magnitude (the identity check's row) and a Diff-Pruning reference row (its lead over the others)
SMOKE_ROWS = ("magnitude", "diff-pruning thr=0.05")


@dataclasses.dataclass(frozen=True)
class Plan(BasePlan):
    """_common.Plan with the budgets' step counts, the task records and the exact-sweep cache."""

    exact_cache: Path | None = None  # importance_cost.py --truth's folder of exact sweeps, reused if there
    rows: tuple[str, ...] | None = None  # the row names this run may cover (None: all; --smoke: SMOKE_ROWS)

    @property
    def steps(self) -> list[int]:
        return [max(1, round(f * self.recipe["steps"])) for f in self.budget.fractions]

    def tag(self, name: str, seed: int) -> str:
        return name.replace(" ", "_").replace("=", "").replace(",", "") + f"_s{seed}"

    def record(self, key: tuple) -> Path:
        """The JSON that marks a task done (teacher, prune/sweep, stage, verify)."""
        if key[0] == "stage":
            return self.work / "rows" / f"{self.tag(key[1], key[2])}_{key[3]}.json"
        if key[0] == "prune":
            return self.work / "rows" / f"prune_{self.tag(key[1], key[2])}.json"
        return self.work / "rows" / f"{key[0]}.json"


def weights_digest(pipeline: Path) -> str:
    """sha256 over the unet's tensors (names sorted): equal digests = identical weights."""
    h = hashlib.sha256()
    tensors = load_file(str(pipeline / "unet" / "diffusion_pytorch_model.safetensors"))
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def prune_one(plan: Plan, name: str, seed: int, importance=None) -> dict:
    method, estimator = next((m, e) for n, m, e in ROWS if n == name)
    report = prune_row(plan, method, THRESHOLD if method == "diff-pruning" else 0.0, seed, estimator,
                       plan.work / "pruned" / plan.tag(name, seed), importance)
    imp = report["importance"]
    gradient = method in ("taylor", "diff-pruning")
    return {"params": report["params"]["after"], "macs": report["macs"]["after"],
            "macs_fraction": report["macs"]["after"] / report["macs"]["before"],
            "kept_timesteps": imp["num_kept_timesteps"] if gradient else None,
            "sample_gradient_evals": imp.get("sample_gradient_evals"), "importance_wall_s": imp.get("wall_time_s"),
            "prune_wall_s": report["wall_time_s"]["total"]}


def cached_exact(cache: Path | None, seed: int):
    """Diff-Pruning thr 0.05's exact importance for `seed` from `importance_cost.py --truth`'s cache, or None.

    That cache's exact_s<seed> is `estimate(teacher, first_batch(digits, 64, seed), thr 0.05, seed)`:
    the very sweep run_prune would make here (same images, noise and threshold), so it is reused.
    """
    if cache is None or not (cache / f"exact_s{seed}.json").exists():
        return None
    from _importance_truth import cached_scoring

    return cached_scoring(cache, f"exact_s{seed}", None)


def _prune_task(plan: Plan, name: str, seed: int) -> dict:
    reuse = name == "diff-pruning thr=0.05" and plan.budget.calibration_batch == 64  # the cache's batch
    cached = cached_exact(plan.exact_cache, seed) if reuse else None
    return {**prune_one(plan, name, seed, cached), "importance_from_cache": cached is not None}


def _stage_task(plan: Plan, name: str, seed: int, steps: int) -> dict:
    """Continue (method, seed)'s post-training run to `steps`, then sample and evaluate it."""
    tag = plan.tag(name, seed)
    tuned = plan.work / "finetuned" / tag
    ckpts = checkpoint_dirs(tuned)
    if ckpts and int(ckpts[-1].name[5:]) > steps:
        raise SystemExit(f"{tuned} is already past step {steps}; remove it to rerun this chain")
    start = time.perf_counter()
    finetune(plan, plan.work / "pruned" / tag, tuned, steps, seed, resume=bool(ckpts))
    train_s = time.perf_counter() - start
    ev = sample_and_evaluate(plan, tuned, f"{tag}_{steps}")
    return {"steps": steps, "fid": ev["fid"]["value"], "kid": ev["kid"]["mean"],
            "ssim": ev["consistency"]["ssim"]["mean"], "resumed": bool(ckpts), "train_wall_s": train_s,
            "eval_wall_s": time.perf_counter() - start - train_s, "weights_sha256": weights_digest(tuned),
            "machine": machine()}


def _teacher_task(plan: Plan) -> dict:
    ev = sample_and_evaluate(plan, plan.teacher, "teacher", against_teacher=False)
    return {"fid": ev["fid"]["value"], "kid": ev["kid"]["mean"], "ssim": 1.0}


def _verify_task(plan: Plan, steps: int, resumed_digest: str) -> dict:
    """A fresh run of `steps` steps (magnitude, seed 0) against the resumed chain's weights at `steps`."""
    tag = plan.tag("magnitude", 0)
    fresh = finetune(plan, plan.work / "pruned" / tag, plan.work / "verify" / tag, steps, 0)
    digest = weights_digest(fresh)
    return {"case": f"magnitude seed 0, {steps} steps", "fresh_sha256": digest, "resumed_sha256": resumed_digest,
            "identical": digest == resumed_digest}


def selected(only: str | None, skip: str | None, rows: tuple[str, ...] | None = None) -> list[str]:
    """The row names that --only / --skip leave (of `rows`, if given)."""
    return [r[0] for r in ROWS if (only is None or only in r[0]) and (skip is None or skip not in r[0])
            and (rows is None or r[0] in rows)]


def task_list(plan: Plan, only: str | None, skip: str | None) -> list[tuple]:
    """Every task, budget by budget so that short budgets finish first."""
    seeds = range(plan.budget.seeds)
    names = selected(only, skip, plan.rows)
    keys = [("prune", n, s) for s in seeds for n in names if n == HEAVY] + [("teacher",)]
    keys += [("prune", n, s) for s in seeds for n in names if n != HEAVY]
    keys += [("stage", n, s, k) for k in plan.steps for s in seeds for n in names]
    if len(plan.steps) > 1 and "magnitude" in names:
        keys.insert(keys.index(("stage", "magnitude", 0, plan.steps[1])) + 1, ("verify",))
    return keys


def deps(plan: Plan, key: tuple) -> list[tuple]:
    if key[0] == "verify":
        return [("stage", "magnitude", 0, plan.steps[1])]
    if key[0] != "stage":
        return []
    _, name, seed, steps = key
    i = plan.steps.index(steps)
    return [("teacher",), ("prune", name, seed)] + ([("stage", name, seed, plan.steps[i - 1])] if i else [])


def submit(pool, plan: Plan, key: tuple, done: dict):
    if key[0] == "teacher":
        return pool.submit(_teacher_task, plan)
    if key[0] == "prune":
        return pool.submit(_prune_task, plan, key[1], key[2])
    if key[0] == "verify":
        return pool.submit(_verify_task, plan, plan.steps[1],
                           done[("stage", "magnitude", 0, plan.steps[1])]["weights_sha256"])
    return pool.submit(_stage_task, plan, *key[1:])


def run_all(plan: Plan, jobs: int, only: str | None, skip: str | None) -> None:
    """Run every unfinished task on `jobs` processes, each as soon as what it needs is done."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    keys = task_list(plan, only, skip)
    done = {k: json.loads(plan.record(k).read_text()) for k in keys if plan.record(k).exists()}
    pending = [k for k in keys if k not in done]
    running: dict = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=worker_init) as pool:
        while pending or running:
            ready = [k for k in pending if all(d in done for d in deps(plan, k))]
            cached_soon = [k for k in ready if k[0] == "prune" and k[1] == "diff-pruning thr=0.05" and
                           plan.exact_cache and not (plan.exact_cache / f"exact_s{k[2]}.json").exists()]
            if running or len(cached_soon) < len(ready):  # its sweep is on its way into the cache: wait for it
                ready = [k for k in ready if k not in cached_soon]
            for key in ready:
                if len(running) >= jobs:
                    break
                if key[0] == "prune" and key[1] == HEAVY and any(k[1:2] == (HEAVY,) for k, _ in running.values()):
                    continue  # one Taylor sweep at a time, so the other workers post-train meanwhile
                pending.remove(key)
                print(f"[start {datetime.datetime.now():%H:%M:%S}] {key}", flush=True)
                running[submit(pool, plan, key, done)] = (key, time.perf_counter())
            if not running:
                raise SystemExit(f"nothing can start: {pending[:3]} wait for tasks that are neither done nor queued")
            finished, _ = wait(running, timeout=60, return_when=FIRST_COMPLETED)
            for future in finished:
                key, began = running.pop(future)
                done[key] = future.result()
                plan.record(key).parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(plan.record(key), done[key])
                extra = f" FID {done[key]['fid']:.3f} SSIM {done[key]['ssim']:.3f}" if key[0] == "stage" else ""
                print(f"[done {time.perf_counter() - began:.0f}s] {key}{extra}", flush=True)


def collect(plan: Plan, names: list[str]) -> dict:
    """Everything finished in the work folder for rows `names` (the others empty): teacher, prune
    records, stage rows, identity check."""
    seeds = range(plan.budget.seeds)
    read = lambda k: json.loads(plan.record(k).read_text()) if plan.record(k).exists() else None  # noqa: E731
    prunes = {}
    for s in seeds:
        for name in names:
            if rec := read(("prune", name, s)):
                prunes.setdefault(name, []).append({"seed": s, **rec})
    stages = {name: {k: [{"seed": s, **r} for s in seeds if name in names and (r := read(("stage", name, s, k)))]
                     for k in plan.steps} for name, *_ in ROWS}
    log = plan.work / "rows" / "commands.json"
    return {"teacher": read(("teacher",)), "prune": prunes, "stages": stages, "verify": read(("verify",)),
            "commands": json.loads(log.read_text()) if log.exists() else []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_budget_options(parser, "smoke-check budget (1 seed, 1%% and 2%%, 64 images, DDIM 20)", "runs/budget_curve")
    parser.add_argument("--resume", action="store_true", help="keep the finished tasks found in the work folder")
    parser.add_argument("--only", default=None, metavar="TEXT", help="run only the rows whose name contains TEXT")
    parser.add_argument("--skip", default=None, metavar="TEXT", help="do not run the rows whose name contains TEXT")
    parser.add_argument("--exact-cache", type=Path, default=None, metavar="DIR",
                        help="reuse Diff-Pruning's exact sweeps from importance_cost.py --truth "
                             "(runs/importance_cost/truth)")
    parser.add_argument("--report-only", action="store_true", help="run nothing: tabulate what is finished")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of the existing results JSON that this work folder (after --only/--skip) "
                             "lacks, with their per-seed records and where they ran, and tabulate all of them")
    parser.add_argument("--fractions", default=None, metavar="F,F,...",
                        help="post-training budgets as fractions of the teacher's steps (default 0.01,0.02,0.05,"
                             "0.15,0.5); a resumed run may add larger ones")
    parser.add_argument("--num-images", type=int, default=None, help="samples per model (default 500; quick 64)")
    parser.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default 100; quick 20)")
    add_smoke_options(parser, "a tiny random teacher with 20 timesteps, 1 seed, 2 rows, 10 images, DDIM 2")
    args = parser.parse_args()
    budget = chosen_budget(parser, args, QUICK, FULL, SMOKE)
    out = results_dir(parser, args)
    try:
        fractions = tuple(sorted(float(f) for f in args.fractions.split(","))) if args.fractions else budget.fractions
    except ValueError:
        parser.error(f"--fractions must be comma-separated numbers in (0, 1], got {args.fractions!r}")
    if not all(0 < f <= 1 for f in fractions):
        parser.error(f"--fractions must be in (0, 1], got {args.fractions!r}")
    for opt in ("num_images", "sample_steps"):
        if getattr(args, opt) is not None and getattr(args, opt) < 1:
            parser.error(f"--{opt.replace('_', '-')} must be >= 1, got {getattr(args, opt)}")
    budget = dataclasses.replace(budget, fractions=fractions, num_images=args.num_images or budget.num_images,
                                 sample_steps=args.sample_steps or budget.sample_steps)
    start = time.perf_counter()
    teacher = smoke_teacher(out / "teacher") if args.smoke else embedded_teacher()
    work = args.work / ("smoke" if args.smoke else "quick" if args.quick else "full")
    if work.exists() and not (args.resume or args.report_only):
        raise SystemExit(f"{work} exists; remove it first or pass --resume")
    plan = Plan(teacher, teacher_recipe(teacher), budget, work, args.exact_cache, SMOKE_ROWS if args.smoke else None)
    command = "python benchmarks/budget_curve.py " + " ".join(sys.argv[1:])
    if not args.report_only:
        log = work / "rows" / "commands.json"
        log.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(log, (json.loads(log.read_text()) if log.exists() else []) + [command])
        run_all(plan, args.jobs, args.only, args.skip)
    found = collect(plan, selected(args.only, args.skip, plan.rows))
    meta = {"budget": dataclasses.asdict(budget), "post_train_steps": plan.steps,
            "teacher_steps": plan.recipe["steps"], "table1_protocol": (budget.num_images, budget.sample_steps) == (
                FULL.num_images, FULL.sample_steps), "date": datetime.date.today().isoformat(),
            "machine": machine(), "jobs": args.jobs, "wall_time_s": time.perf_counter() - start,
            "report_only": args.report_only, "command": command,
            "versions": library_versions()}
    stem = out / f"budget_curve{'_quick' if args.quick and not args.smoke else ''}"
    if args.merge:
        if not stem.with_suffix(".json").exists():
            raise SystemExit(f"--merge: {stem.with_suffix('.json')} does not exist")
        found = merge_found(found, meta, json.loads(stem.with_suffix(".json").read_text()))
    if found["teacher"] is None:
        raise SystemExit(f"nothing to tabulate: the teacher's task is not finished in {work}")
    write_report(found, meta, stem)


if __name__ == "__main__":
    main()
