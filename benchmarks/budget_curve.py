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

Writes benchmarks/results/budget_curve{_quick}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_args import add_budget_options, chosen_budget
from safetensors.torch import load_file
from table1 import _worker_init, aggregate, machine, teacher_recipe

from diffprune.cli.demo_job import embedded_teacher
from diffprune.evaluate import EvaluateConfig, evaluate
from diffprune.fsutil import write_json_atomic
from diffprune.io import library_versions
from diffprune.prune.pruning import PruneConfig
from diffprune.prune.stage import run_prune
from diffprune.sample.loop import sample_to_folder
from diffprune.train import FinetuneConfig, run_training
from diffprune.train.checkpoints import checkpoint_dirs

THRESHOLD = 0.05
FAST_POOL = 512  # as in table1.py
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


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every task needs; picklable for the worker processes."""

    teacher: Path
    recipe: dict
    budget: Budget
    work: Path
    exact_cache: Path | None = None  # importance_cost.py --truth's folder of exact sweeps, reused if there

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
    fast = estimator == "fast"
    report = run_prune(PruneConfig(model=str(plan.teacher), data="digits", method=method, target_macs=0.56,
                                   threshold=THRESHOLD if method == "diff-pruning" else 0.0, seed=seed,
                                   estimator=estimator,
                                   batch_size=FAST_POOL if fast else plan.budget.calibration_batch),
                       plan.work / "pruned" / plan.tag(name, seed), overwrite=True, progress=False,
                       importance=importance)
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
    from importance_cost import cached_scoring

    return cached_scoring(cache, f"exact_s{seed}", None)


def _prune_task(plan: Plan, name: str, seed: int) -> dict:
    reuse = name == "diff-pruning thr=0.05" and plan.budget.calibration_batch == 64  # the cache's batch
    cached = cached_exact(plan.exact_cache, seed) if reuse else None
    return {**prune_one(plan, name, seed, cached), "importance_from_cache": cached is not None}


def train_to(plan: Plan, pruned: Path, out: Path, steps: int, seed: int, resume: bool) -> Path:
    r = plan.recipe
    cfg = FinetuneConfig(model=str(pruned), data="digits", steps=steps, batch_size=r["batch_size"], lr=r["lr"],
                         ema_decay=r["ema_decay"], ema_warmup=r["ema_warmup"], dropout=r["dropout"], seed=seed,
                         checkpoint_every=steps, keep_checkpoints=1)
    return run_training(cfg, out, resume=resume, overwrite=not resume, progress=False, tensorboard=False)


def _stage_task(plan: Plan, name: str, seed: int, steps: int) -> dict:
    """Continue (method, seed)'s post-training run to `steps`, then sample and evaluate it."""
    tag = plan.tag(name, seed)
    tuned = plan.work / "finetuned" / tag
    ckpts = checkpoint_dirs(tuned)
    if ckpts and int(ckpts[-1].name[5:]) > steps:
        raise SystemExit(f"{tuned} is already past step {steps}; remove it to rerun this chain")
    start = time.perf_counter()
    train_to(plan, plan.work / "pruned" / tag, tuned, steps, seed, resume=bool(ckpts))
    train_s = time.perf_counter() - start
    samples = sample_to_folder(tuned, plan.work / "samples" / f"{tag}_{steps}", plan.budget.num_images,
                               batch_size=250, steps=plan.budget.sample_steps, seed=0, overwrite=True,
                               progress=False)
    ev = evaluate(EvaluateConfig(samples=str(samples), reference="digits",
                                 teacher_samples=str(plan.work / "samples" / "teacher"), model=str(tuned),
                                 teacher_model=str(plan.teacher), allow_download=False,
                                 output=str(plan.work / "evaluation" / f"{tag}_{steps}.json")))
    return {"steps": steps, "fid": ev["fid"]["value"], "kid": ev["kid"]["mean"],
            "ssim": ev["consistency"]["ssim"]["mean"], "resumed": bool(ckpts), "train_wall_s": train_s,
            "eval_wall_s": time.perf_counter() - start - train_s, "weights_sha256": weights_digest(tuned)}


def _teacher_task(plan: Plan) -> dict:
    samples = sample_to_folder(plan.teacher, plan.work / "samples" / "teacher", plan.budget.num_images,
                               batch_size=250, steps=plan.budget.sample_steps, seed=0, overwrite=True,
                               progress=False)
    ev = evaluate(EvaluateConfig(samples=str(samples), reference="digits", model=str(plan.teacher),
                                 allow_download=False, output=str(plan.work / "evaluation" / "teacher.json")))
    return {"fid": ev["fid"]["value"], "kid": ev["kid"]["mean"], "ssim": 1.0}


def _verify_task(plan: Plan, steps: int, resumed_digest: str) -> dict:
    """A fresh run of `steps` steps (magnitude, seed 0) against the resumed chain's weights at `steps`."""
    tag = plan.tag("magnitude", 0)
    fresh = train_to(plan, plan.work / "pruned" / tag, plan.work / "verify" / tag, steps, 0, resume=False)
    digest = weights_digest(fresh)
    return {"case": f"magnitude seed 0, {steps} steps", "fresh_sha256": digest, "resumed_sha256": resumed_digest,
            "identical": digest == resumed_digest}


def task_list(plan: Plan, only: str | None, skip: str | None) -> list[tuple]:
    """Every task, budget by budget so that short budgets finish first."""
    seeds = range(plan.budget.seeds)
    names = [r[0] for r in ROWS if (only is None or only in r[0]) and (skip is None or skip not in r[0])]
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
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init) as pool:
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


def collect(plan: Plan) -> dict:
    """Everything finished in the work folder: teacher, prune records, stage rows, identity check."""
    seeds = range(plan.budget.seeds)
    read = lambda k: json.loads(plan.record(k).read_text()) if plan.record(k).exists() else None  # noqa: E731
    prunes = {}
    for s in seeds:
        for name, *_ in ROWS:
            if rec := read(("prune", name, s)):
                prunes.setdefault(name, []).append({"seed": s, **rec})
    stages = {name: {k: [{"seed": s, **r} for s in seeds if (r := read(("stage", name, s, k)))]
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
                        help="reuse Diff-Pruning's exact sweeps from importance_cost.py --truth (runs/importance_cost/truth)")
    parser.add_argument("--report-only", action="store_true", help="run nothing: tabulate what is finished")
    parser.add_argument("--fractions", default=None, metavar="F,F,...",
                        help="post-training budgets as fractions of the teacher's steps (default 0.01,0.02,0.05,"
                             "0.15,0.5); a resumed run may add larger ones")
    parser.add_argument("--num-images", type=int, default=None, help="samples per model (default 500; quick 64)")
    parser.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default 100; quick 20)")
    args = parser.parse_args()
    budget = chosen_budget(parser, args, QUICK, FULL)
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
    teacher = embedded_teacher()
    work = args.work / ("quick" if args.quick else "full")
    if work.exists() and not (args.resume or args.report_only):
        raise SystemExit(f"{work} exists; remove it first or pass --resume")
    plan = Plan(teacher, teacher_recipe(teacher), budget, work, args.exact_cache)
    command = "python benchmarks/budget_curve.py " + " ".join(sys.argv[1:])
    if not args.report_only:
        log = work / "rows" / "commands.json"
        log.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(log, (json.loads(log.read_text()) if log.exists() else []) + [command])
        run_all(plan, args.jobs, args.only, args.skip)
    found = collect(plan)
    meta = {"budget": dataclasses.asdict(budget), "post_train_steps": plan.steps,
            "teacher_steps": plan.recipe["steps"], "table1_protocol": (budget.num_images, budget.sample_steps) == (
                FULL.num_images, FULL.sample_steps), "date": datetime.date.today().isoformat(),
            "machine": machine(), "jobs": args.jobs, "wall_time_s": time.perf_counter() - start,
            "report_only": args.report_only, "command": command,
            "versions": library_versions()}
    write_report(found, meta, Path(__file__).parent / "results" / f"budget_curve{'_quick' if args.quick else ''}")


# --------------------------------------------------------------------------- report

REFS = ("diff-pruning thr=0.05", "diff-pruning thr=0.05, fast")
TARGET_DELTAS = (0.5, 1.0, 2.0)  # FID targets: the teacher's FID plus these


def summarize(found: dict) -> dict:
    """name -> steps -> metric -> mean/std/n over seeds (rows with no finished budget left out)."""
    table = {name: {k: {m: aggregate([r[m] for r in rows]) for m in ("fid", "kid", "ssim")}
                    for k, rows in by_k.items() if rows} for name, by_k in found["stages"].items()}
    return {name: by_k for name, by_k in table.items() if by_k}


def compare(table: dict) -> tuple[list[str], dict]:
    """Per budget and Diff-Pruning row: every FID/SSIM difference from a non-Diff-Pruning row beyond the
    seed spread (|d| > s1 + s2, as table1.py), and the FID lead over the best of random/magnitude/taylor."""
    notes, lead = [], {}
    for ref in REFS:
        for k, a in sorted(table.get(ref, {}).items()):
            others = {n: v[k] for n, v in table.items() if n not in REFS and k in v}
            for name, b in others.items():
                for m, sign in (("fid", -1), ("ssim", 1)):
                    d = a[m]["mean"] - b[m]["mean"]
                    if min(a[m]["n"], b[m]["n"]) > 1 and abs(d) > a[m]["std"] + b[m]["std"]:
                        notes.append(f"{k} steps: {ref} {'ahead of' if d * sign > 0 else 'behind'} {name} in "
                                     f"{m.upper()} by {abs(d):.4f} (spread {a[m]['std'] + b[m]['std']:.4f})")
            best = min((n for n in others if n != "scratch"), key=lambda n: others[n]["fid"]["mean"], default=None)
            if best:
                lead.setdefault(ref, {})[k] = {"best_other": best, "spread": others[best]["fid"]["std"] + a["fid"]["std"],
                                               "fid_margin": others[best]["fid"]["mean"] - a["fid"]["mean"]}
    return notes, lead


def crossing(steps: list[int], fids: list[float | None], target: float) -> float | None:
    """Steps at which FID first reaches `target`: linear in log(steps) between the budgets around the
    first one at or below it; steps[0] if already there; None if not within the curve."""
    for i, f in enumerate(fids):
        if f is not None and f <= target:
            if i == 0 or fids[i - 1] is None:
                return float(steps[i])
            f0, x0, x1 = fids[i - 1], np.log(steps[i - 1]), np.log(steps[i])
            return float(np.exp(x0 + (f0 - target) / (f0 - f) * (x1 - x0)))
    return None


def steps_to_target(found: dict, table: dict, steps: list[int], target: float) -> dict:
    """Per row: the crossing of the seed-mean FID curve, and of each seed's own curve."""
    out = {}
    for name, by_k in table.items():
        fid = {(r["seed"], k): r["fid"] for k in steps for r in found["stages"][name][k]}
        mean = [by_k[k]["fid"]["mean"] if k in by_k else None for k in steps]
        out[name] = {"mean_curve": crossing(steps, mean, target), "evaluated_up_to": max(by_k), "per_seed": {
            s: crossing(steps, [fid.get((s, k)) for k in steps], target) for s in sorted({s for s, _ in fid})}}
    return out


def plot(table: dict, teacher: dict, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, by_k in table.items():
        ks = sorted(by_k)
        for ax, m in zip(axes, ("fid", "ssim"), strict=True):
            mean, std = (np.array([by_k[k][m][x] for k in ks]) for x in ("mean", "std"))
            line, = ax.plot(ks, mean, marker="o", label=name)
            ax.fill_between(ks, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    axes[0].axhline(teacher["fid"], color="k", lw=0.8, label="teacher")
    axes[0].axhline(target, color="k", lw=0.8, ls="--", label="teacher + 0.5")
    for ax, label in zip(axes, ("digits-FID (log scale)", "SSIM vs teacher"), strict=True):
        ax.set(xscale="log", xlabel="post-training steps (teacher: 2000)", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("mean over seeds, band = +- std")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cell(stat: dict, fmt: str, seeds: int) -> str:
    return (fmt.format(stat["mean"]) + (f" ± {fmt.format(stat['std'])}" if stat["n"] > 1 else "")
            + (f" (n={stat['n']})" if stat["n"] < seeds else ""))


def write_report(found: dict, meta: dict, stem: Path) -> None:
    """budget_curve{_quick}.json / .md / .png from the finished tasks (the teacher's must be among them)."""
    steps, table, teacher, b, v = meta["post_train_steps"], summarize(found), found["teacher"], meta["budget"], found["verify"]
    target = teacher["fid"] + 0.5
    reach = {d: steps_to_target(found, table, steps, teacher["fid"] + d) for d in TARGET_DELTAS}
    notes, lead = compare(table)
    stem.parent.mkdir(exist_ok=True)
    write_json_atomic(stem.with_suffix(".json"), {
        "table": {n: {str(k): v for k, v in by_k.items()} for n, by_k in table.items()}, "teacher": teacher,
        "steps_to_target": {f"teacher + {d}": {"fid": teacher["fid"] + d, **r} for d, r in reach.items()}, "fid_lead": lead, "spread_notes": notes,
        "prune": found["prune"], "runs": found["stages"], "identity_check": v, "meta": {**meta, "commands": found["commands"]}})
    plot(table, teacher, target, stem.with_suffix(".png"))
    lines = []
    for m, fmt in (("fid", "{:.2f}"), ("ssim", "{:.3f}"), ("kid", "{:.4f}")):
        lines += [f"**{m.upper()}** (mean ± std over seeds; teacher {fmt.format(teacher[m])})", "",
                  "| method | " + " | ".join(f"{k} steps ({k / meta['teacher_steps']:.0%})" for k in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        lines += [f"| {name} | " + " | ".join(cell(by_k[k][m], fmt, b["seeds"]) if k in by_k else "-" for k in steps)
                  + " |" for name, by_k in table.items()] + [""]
    show = lambda x, r: f"> {r['evaluated_up_to']}" if x is None else f"{x:.0f}"  # noqa: E731
    lines += ["**Post-training steps to reach the teacher's FID + 0.5 (+ 1, + 2)** (interpolated linearly in log "
              "steps between the budgets around the first one at or below the target, not measured; seed-mean "
              "curve, then each seed's own curve)", "",
              "| method | " + " | ".join(f"FID {teacher['fid'] + d:.2f}: mean curve | each seed" for d in TARGET_DELTAS)
              + " |", "|---|" + "---|---|" * len(TARGET_DELTAS)]
    lines += [f"| {n} | " + " | ".join(f"{show(reach[d][n]['mean_curve'], reach[d][n])} | "
                                       f"{', '.join(show(x, reach[d][n]) for x in reach[d][n]['per_seed'].values())}"
                                       for d in TARGET_DELTAS) + " |" for n in table] + [""]
    lines += [f"Protocol: {b['num_images']} samples per model, DDIM {b['sample_steps']} steps, eta 0, same noise for "
              "every model; FID/KID: digits-cnn-v1 features vs the 1797 digits; SSIM vs the teacher's images. "
              + ("This is Table 1's protocol." if meta["table1_protocol"] else
                 "REDUCED from Table 1's protocol (500 samples, DDIM 100): not comparable to table1.md."),
              f"Budgets: {steps} post-training steps of the teacher's {meta['teacher_steps']}; {b['seeds']} seeds "
              "(n= marks a cell with fewer). One post-training run per (method, seed), evaluated at each budget on "
              "its way: " + (f"a fresh {v['case']} run has {'IDENTICAL' if v['identical'] else 'DIFFERENT'} weights "
                             "to the resumed one (sha256 of the EMA unet)." if v else "not checked."),
              "Run: " + "; ".join(f"`{c}`" for c in found["commands"]) + f"; tabulated by `{meta['command']}`, "
              f"{meta['date']}, {meta['machine']}, one torch thread per worker.", ""]
    lines += [f"- {n}" for n in notes] or ["- no Diff-Pruning difference exceeds the seed spread"]
    for ref, by_k in lead.items():
        k = max(by_k, key=lambda k: by_k[k]["fid_margin"])
        lines.append(f"- largest FID lead of {ref} over the best of random/magnitude/taylor: {k} steps, "
                     f"{by_k[k]['fid_margin']:+.2f} (spread {by_k[k]['spread']:.2f}, best other {by_k[k]['best_other']})")
    write_text_atomic(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
