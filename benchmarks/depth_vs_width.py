"""Depth against width pruning at equal MACs on the digits teacher (issue 26 item 3).

The embedded digits teacher (UNet2DModel, 3 levels, layers_per_block=2) is pruned to ~70% and ~56% of its
MACs by removing channels (width, Diff-Pruning), whole layers (depth: `--structure depth`, one resnet(+attn)
pair per level, BK-SDM style; optionally the mid block) or both (depth to sqrt(target), then width on the
shallower model's own sweep), then post-trained with the teacher's recipe and scored like budget_curve.py's
REDUCED protocol: digits-FID/KID against the 1797 digits, SSIM against the teacher's images from the same
initial noise (DDIM eta 0). Each row runs once per seed (seed = calibration + post-training seed); rows whose
pruned weights are identical to an earlier row's (same seed) are post-trained once and marked `same_as`.
Depth targets that depth alone cannot reach are recorded as unreachable (where it stops), not run.
CPU latency of each pruned architecture: forward at batch 1 and 8, median of interleaved teacher/student
forwards in the same process (diffprune.metrics.latency.forward_latency), speed-up = teacher / student.

    python benchmarks/depth_vs_width.py --jobs 2                 # the full run (~55 min on 2 cores)
    python benchmarks/depth_vs_width.py --jobs 2 --resume        # continue an interrupted run
    python benchmarks/depth_vs_width.py --smoke --out DIR        # the code path in < 60 s (tiny 2-layer teacher)

Writes benchmarks/results/depth_vs_width.{json,md,png} (--out: into that folder); runs in --work.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from _common import Plan as BasePlan
from _common import aggregate, finetune, machine, sample_and_evaluate, teacher_recipe, worker_init, write_text_atomic
from _common import smoke_teacher as common_smoke_teacher
from bench_args import add_smoke_options, results_dir

from diffprune.cli.demo_job import embedded_teacher
from diffprune.errors import DiffpruneError
from diffprune.fsutil import write_json_atomic
from diffprune.io import library_versions

THRESHOLD = 0.05  # Diff-Pruning's threshold (the paper's)


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    budget: str  # "70%" / "56%": the MACs target it is compared at
    target: float  # target_macs
    structure: str
    method: str
    include_mid: bool = False
    ratio_rule: str = "torch-pruning"
    split: str = "sqrt"  # structure 'both': depth_split (sqrt: depth to sqrt(target), then width; joint)

    @property
    def tag(self) -> str:
        mid = "_mid" if self.include_mid else ""
        joint = "_joint" if self.split == "joint" else ""
        return f"{self.structure}{mid}_{self.method}_{round(self.target * 100)}{joint}"


# Width at 0.70 reaches 0.697 with torch-pruning's ratio rule; both at 0.56 leaves width the rest 0.56 / 0.682 =
# 0.821 after depth, which only ratio_rule='paper' reaches on this small model (the prune error says so).
ROWS = (
    Row("width / diff-pruning", "70%", 0.70, "width", "diff-pruning"),
    Row("depth / diff-pruning", "70%", 0.70, "depth", "diff-pruning"),
    Row("depth+mid / diff-pruning", "70%", 0.70, "depth", "diff-pruning", include_mid=True),
    Row("depth / block-influence", "70%", 0.70, "depth", "block-influence"),
    Row("depth+mid / block-influence", "70%", 0.70, "depth", "block-influence", include_mid=True),
    Row("depth / magnitude", "70%", 0.70, "depth", "magnitude"),
    Row("depth+mid / magnitude", "70%", 0.70, "depth", "magnitude", include_mid=True),
    Row("both / diff-pruning", "70%", 0.70, "both", "diff-pruning", ratio_rule="paper"),
    Row("width / diff-pruning", "56%", 0.56, "width", "diff-pruning"),
    Row("both / diff-pruning", "56%", 0.56, "both", "diff-pruning", ratio_rule="paper"),
    Row("both / magnitude", "56%", 0.56, "both", "magnitude", ratio_rule="paper"),
    # where depth alone cannot go: recorded (the fraction it stops at), never post-trained
    Row("depth / magnitude", "56%", 0.56, "depth", "magnitude"),
    Row("depth+mid / magnitude", "56%", 0.56, "depth", "magnitude", include_mid=True),
    # one ranking of layers and channels by the one sweep's |w g| (--depth-split joint, depth_split.py)
    Row("both (joint) / diff-pruning", "70%", 0.70, "both", "diff-pruning", ratio_rule="paper", split="joint"),
    Row("both (joint) / diff-pruning", "56%", 0.56, "both", "diff-pruning", ratio_rule="paper", split="joint"),
)
BY_TAG = {r.tag: r for r in ROWS}
# --smoke: depth by Taylor, by block influence with the mid block, both (identical to depth at 70%: `same_as`; with
# width at 56%), an unreachable depth target (plain width runs inside both_magnitude_56) and the joint split
SMOKE_ROWS = ("depth_diff-pruning_70", "depth_mid_block-influence_70",
              "both_diff-pruning_70", "both_magnitude_56", "depth_magnitude_56", "both_diff-pruning_56_joint")


@dataclasses.dataclass(frozen=True)
class Budget:
    seeds: int
    steps: int  # post-training steps
    num_images: int
    sample_steps: int  # DDIM
    calibration_batch: int  # block influence's images (the exact-estimator batch of budget_curve.py)
    fast_pool: int  # Diff-Pruning's fast estimator draws its (image, t) pairs from this many images
    latency_repeats: int
    latency_warmup: int


# budget_curve.py's REDUCED protocol (200 samples, DDIM 20) at 100 post-training steps = 5% of the teacher's 2000
FULL = Budget(seeds=3, steps=100, num_images=200, sample_steps=20, calibration_batch=64, fast_pool=512,
              latency_repeats=60, latency_warmup=5)
SMOKE = Budget(seeds=1, steps=2, num_images=10, sample_steps=2, calibration_batch=4, fast_pool=8,
               latency_repeats=2, latency_warmup=1)
# --smoke's stand-in teacher: the embedded teacher's own architecture (layers_per_block=2; _common.smoke_teacher's
# 1 layer leaves depth nothing to remove, and a narrower 2-layer one misses these targets) with random weights
SMOKE_TIMESTEPS = 20
SMOKE_RECIPE = {"steps": 100, "batch_size": 8}


@dataclasses.dataclass(frozen=True)
class Plan(BasePlan):
    rows: tuple[str, ...] = tuple(BY_TAG)

    def record(self, key: tuple) -> Path:
        return self.work / "rows" / ("_".join(str(k) for k in key) + ".json")


def smoke_teacher(folder: Path) -> Path:
    """_common.smoke_teacher on the embedded teacher's architecture (2 layers per block, so a depth unit
    exists): random weights, 20 training timesteps, the teacher's recipe with 100 steps; made once in `folder`."""
    return common_smoke_teacher(folder, teacher_recipe(embedded_teacher())["model_config"])


def digests(pipeline: Path, component: str = "unet") -> tuple[str, str]:
    """(architecture digest: the denoiser's tensor names + shapes, weights digest: names + values)."""
    from safetensors.torch import load_file

    arch, weights = hashlib.sha256(), hashlib.sha256()
    tensors = load_file(str(pipeline / component / "diffusion_pytorch_model.safetensors"))
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        arch.update(f"{name}{tuple(t.shape)}".encode())
        weights.update(name.encode())
        weights.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return arch.hexdigest(), weights.hexdigest()


def _prune_task(plan: Plan, tag: str, seed: int) -> dict:
    from diffprune.prune.pruning import PruneConfig

    row = BY_TAG[tag]
    dp = row.method == "diff-pruning"
    config = PruneConfig(model=str(plan.teacher), data="digits", method=row.method, structure=row.structure,
                         depth_include_mid=row.include_mid, target_macs=row.target, ratio_rule=row.ratio_rule,
                         depth_split=row.split,
                         threshold=THRESHOLD if dp else 0.0, seed=seed, estimator="fast" if dp else "exact",
                         batch_size=plan.budget.fast_pool if dp else plan.budget.calibration_batch)
    return prune_and_record(config, plan.work / "pruned" / f"{tag}_s{seed}")


def prune_and_record(config, out: Path, component: str = "unet") -> dict:
    """`run_prune(config)` into `out` and the per-seed record of it (sizes, depth record, wall times, digests of
    the pruned `component`); a depth target depth alone cannot reach is recorded as unreachable."""
    from diffprune.prune.stage import run_prune

    try:
        report = run_prune(config, out, overwrite=True, progress=False)
    except DiffpruneError as err:
        if config.structure != "depth":
            raise
        return {"reached": False, "error": str(err), "config": config.to_dict()}
    arch, weights = digests(out, component)
    depth = report["depth"]
    return {"reached": True, "params": report["params"]["after"], "params_teacher": report["params"]["before"],
            "params_fraction": report["params"]["fraction"], "macs": report["macs"]["after"],
            "macs_teacher": report["macs"]["before"], "macs_fraction": report["macs"]["fraction"],
            "width_ratio": report["ratio"], "estimator": report["estimator"],
            "depth": None if depth is None else {k: depth[k] for k in ("removed", "modules", "fraction", "target",
                                                                        "scores", "include_mid", "split")},
            "importance_wall_s": report["wall_time_s"]["importance"], "prune_wall_s": report["wall_time_s"]["total"],
            "arch_sha256": arch, "pruned_sha256": weights, "config": config.to_dict()}


def _stage_task(plan: Plan, tag: str, seed: int) -> dict:
    start = time.perf_counter()
    tuned = finetune(plan, plan.work / "pruned" / f"{tag}_s{seed}", plan.work / "finetuned" / f"{tag}_s{seed}",
                     plan.budget.steps, seed)
    train_s = time.perf_counter() - start
    ev = sample_and_evaluate(plan, tuned, f"{tag}_s{seed}")
    return {"fid": ev["fid"]["value"], "kid": ev["kid"]["mean"], "ssim": ev["consistency"]["ssim"]["mean"],
            "steps": plan.budget.steps, "train_wall_s": train_s, "eval_wall_s": time.perf_counter() - start - train_s,
            "machine": machine()}


def _teacher_task(plan: Plan) -> dict:
    ev = sample_and_evaluate(plan, plan.teacher, "teacher", against_teacher=False)
    return {"fid": ev["fid"]["value"], "kid": ev["kid"]["mean"], "ssim": 1.0}


def task_list(plan: Plan) -> list[tuple]:
    keys = [("teacher",)]
    for s in range(plan.budget.seeds):
        keys += [("prune", t, s) for t in plan.rows] + [("stage", t, s) for t in plan.rows]
    return keys


def deps(plan: Plan, key: tuple) -> list[tuple]:
    """A stage waits for the teacher's samples and the prunes of its seed up to its row (for `same_as`)."""
    if key[0] != "stage":
        return []
    return [("teacher",)] + [("prune", t, key[2]) for t in plan.rows[:plan.rows.index(key[1]) + 1]]


def stage_without_work(plan: Plan, key: tuple, done: dict) -> dict | None:
    """The stage record when nothing needs to run: the prune was unreachable, or an earlier row of the
    same seed has identical pruned weights (same seed -> identical post-training and samples)."""
    _, tag, seed = key
    pruned = done[("prune", tag, seed)]
    if not pruned["reached"]:
        return {"skipped": "unreachable"}
    for other in plan.rows[:plan.rows.index(tag)]:
        o = done[("prune", other, seed)]
        if o["reached"] and o["pruned_sha256"] == pruned["pruned_sha256"]:
            return {"same_as": other}
    return None


def run_all(plan: Plan, jobs: int, tasks: dict | None = None, describe=None) -> None:
    """Every unfinished task on `jobs` spawned processes (one torch thread each), each when its deps are done.
    `tasks`: the function of each task kind (default this script's); `describe(key, result)`: the metrics
    printed for a finished task (default this script's FID / SSIM)."""
    tasks = tasks or {"teacher": _teacher_task, "prune": _prune_task, "stage": _stage_task}
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    keys = task_list(plan)
    done = {k: json.loads(plan.record(k).read_text()) for k in keys if plan.record(k).exists()}
    pending = [k for k in keys if k not in done]
    running: dict = {}

    def finish(key, result, began):
        done[key] = result
        plan.record(key).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(plan.record(key), result)
        if describe is not None:
            extra = describe(key, result)
        else:
            extra = f" FID {result['fid']:.3f} SSIM {result['ssim']:.3f}" if "fid" in result and key[0] == "stage" \
                else ""
        extra += f" MACs {result['macs_fraction']:.3f}" if "macs_fraction" in result else ""
        extra += "".join(f" {k}={result[k]}" for k in ("same_as", "skipped") if k in result)
        extra += " UNREACHABLE" if result.get("reached") is False else ""
        print(f"[done {time.perf_counter() - began:.0f}s] {key}{extra}", flush=True)

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=worker_init) as pool:
        while pending or running:
            for key in [k for k in pending if all(d in done for d in deps(plan, k))]:
                if key[0] == "stage" and (rec := stage_without_work(plan, key, done)) is not None:
                    pending.remove(key)
                    finish(key, rec, time.perf_counter())
                    continue
                if len(running) >= jobs:
                    break
                pending.remove(key)
                print(f"[start {datetime.datetime.now():%H:%M:%S}] {key}", flush=True)
                fn = tasks[key[0]]
                running[pool.submit(fn, plan, *key[1:])] = (key, time.perf_counter())
            if not running:
                if pending:
                    raise SystemExit(f"nothing can start: {pending[:3]}")
                break
            finished, _ = wait(running, timeout=60, return_when=FIRST_COMPLETED)
            for future in finished:
                key, began = running.pop(future)
                finish(key, future.result(), began)


def measure_latency(plan: Plan, done_prunes: dict) -> None:
    """Per row (its first seed's pruned architecture; every seed's is checked to be the same): forward latency of
    teacher and student at batch 1 and 8, interleaved, in this process with one torch thread."""
    from diffprune.families import family_for
    from diffprune.families.pipeline_parts import denoiser_of
    from diffprune.io import load_pipeline
    from diffprune.metrics.latency import forward_latency, ratio

    b = plan.budget
    teacher = denoiser_of(load_pipeline(plan.teacher))[1].eval()
    family = family_for(teacher)
    measured: dict[str, dict] = {}  # arch digest -> result (identical architectures measured once)
    for tag in plan.rows:
        key = ("latency", tag)
        recs = [(s, done_prunes[(tag, s)]) for s in range(b.seeds) if done_prunes.get((tag, s), {}).get("reached")]
        if plan.record(key).exists() or not recs:
            continue
        seed, arch = recs[0][0], recs[0][1]["arch_sha256"]
        if arch not in measured:
            start = time.perf_counter()
            student = denoiser_of(load_pipeline(plan.work / "pruned" / f"{tag}_s{seed}"))[1].eval()
            out = {}
            for bs in (1, 8):
                torch.manual_seed(bs)
                inputs = family.example_inputs(teacher, batch_size=bs)
                res = forward_latency({"teacher": teacher, "student": student}, inputs, repeats=b.latency_repeats,
                                      warmup=b.latency_warmup)
                out[str(bs)] = {"teacher_ms": res["teacher"]["median_ms"], "student_ms": res["student"]["median_ms"],
                                "teacher_iqr_ms": res["teacher"]["iqr_ms"], "student_iqr_ms": res["student"]["iqr_ms"],
                                "speedup": ratio(res["teacher"]["median_ms"], res["student"]["median_ms"])}
            measured[arch] = {"forward": out, "settings": res["settings"], "measured_for": tag,
                              "wall_s": time.perf_counter() - start}
            print(f"[latency] {tag}: b1 x{out['1']['speedup']:.2f}, b8 x{out['8']['speedup']:.2f}", flush=True)
        rec = {**measured[arch], "arch_sha256": arch,
               "measured_seed": seed,
               "same_architecture_all_seeds": len({r["arch_sha256"] for _, r in recs}) == 1}
        write_json_atomic(plan.record(key), rec)


def seed_records(plan: Plan, tag: str) -> list[dict]:
    """[{seed, prune, stage}] of row `tag`'s finished prunes; a `same_as` stage is the record it points to."""
    read = lambda k: json.loads(plan.record(k).read_text()) if plan.record(k).exists() else None  # noqa: E731
    seeds = []
    for s in range(plan.budget.seeds):
        pruned, stage = read(("prune", tag, s)), read(("stage", tag, s))
        if pruned is None:
            continue
        if stage and "same_as" in stage:
            stage = {**(read(("stage", stage["same_as"], s)) or {}), "same_as": stage["same_as"]}
        seeds.append({"seed": s, "prune": pruned, "stage": stage})
    return seeds


def collect(plan: Plan) -> dict:
    read = lambda k: json.loads(plan.record(k).read_text()) if plan.record(k).exists() else None  # noqa: E731
    rows = []
    for tag in plan.rows:
        row = BY_TAG[tag]
        seeds = seed_records(plan, tag)
        reached = [x for x in seeds if x["prune"]["reached"]]
        evaluated = [x for x in reached if x["stage"] and "fid" in x["stage"]]
        same_as = sorted({x["stage"]["same_as"] for x in evaluated if "same_as" in x["stage"]})
        out = {"name": row.name, "tag": tag, "budget": row.budget, "target_macs": row.target,
               "structure": row.structure, "method": row.method, "include_mid": row.include_mid,
               "ratio_rule": row.ratio_rule if row.structure != "depth" else None,
               "split": row.split if row.structure == "both" else None, "merged_from": None, "same_weights_as": None,
               "reached": bool(reached) if seeds else None, "same_as": same_as or None,
               "latency": read(("latency", tag)),
               "seeds": seeds}
        if reached:
            p = reached[0]["prune"]
            out.update(params=aggregate([x["prune"]["params"] for x in reached]),
                       macs_fraction=aggregate([x["prune"]["macs_fraction"] for x in reached]),
                       params_fraction=aggregate([x["prune"]["params_fraction"] for x in reached]),
                       params_teacher=p["params_teacher"], macs_teacher=p["macs_teacher"],
                       depth_removed=sorted({" + ".join(x["prune"]["depth"]["removed"]) for x in reached
                                             if x["prune"]["depth"]}),
                       depth_modules=[x["prune"]["depth"]["modules"] for x in reached if x["prune"]["depth"]],
                       joint=[c for x in reached if (c := joint_choice(x["prune"])) is not None] or None)
            for m in ("fid", "kid", "ssim"):
                out[m] = aggregate([x["stage"][m] for x in evaluated])
        elif seeds:
            out["unreachable"] = seeds[0]["prune"]["error"]
        rows.append(out)
    log = plan.work / "rows" / "commands.json"
    return {"teacher": read(("teacher",)), "rows": rows,
            "commands": json.loads(log.read_text()) if log.exists() else [], "merged": None}


def joint_choice(prune: dict) -> dict | None:
    """What --depth-split joint chose for one pruned model, against pruning channels only (k = 0)."""
    split = (prune.get("depth") or {}).get("split") or {}
    if split.get("mode") != "joint":
        return None
    candidates = split["candidates"]
    chosen, width_only = candidates[split["chosen"]], candidates[0]
    return {"removed": chosen["removed"], "cost": chosen["cost"], "width_target": chosen["width_target"],
            "cost_width_only": width_only.get("cost"), "tried": len(candidates)}


def merge(found: dict, previous: dict, source: Path) -> dict:
    """`found` with the rows of an earlier result (`previous`, read from `source`) that this run did not run,
    in ROWS order, each marked with where it came from; that run's teacher and meta are kept beside."""
    ran = {r["tag"] for r in found["rows"] if r.get("reached") is not None}
    where = previous["meta"]["diffprune_source"]
    commit = where.split("git archive of ")[-1].rstrip(")")[:7] if "git archive of " in where else None
    origin = {"file": str(source), "date": previous["meta"]["date"], "diffprune_source": where,
              "label": f"{previous['meta']['date']} run (diffprune {commit})" if commit else previous["meta"]["date"]}
    kept = {r["tag"]: {**r, "merged_from": r.get("merged_from") or origin}
            for r in previous["rows"] if r["tag"] not in ran}
    mine = {r["tag"]: r for r in found["rows"] if r["tag"] in ran}
    for r in mine.values():  # pruned weights identical, seed by seed, to a kept row's: the same model
        r["same_weights_as"] = [t for t, k in kept.items() if k.get("reached") and _weights(k) == _weights(r)] or None
    rows = [mine.get(t) or kept[t] for t in BY_TAG if t in mine or t in kept]
    return {**found, "rows": rows, "merged": {**origin, "teacher": previous["teacher"],
                                              "commands": previous["meta"]["commands"],
                                              "budget": previous["meta"]["budget"]}}


def _weights(row: dict) -> list:
    return [(x["seed"], x["prune"].get("pruned_sha256")) for x in row["seeds"]]


def _joint_note(choices: list[dict]) -> str:
    """What --depth-split joint chose over the seeds, with the mean Taylor cost of that and of width only."""
    removed = sorted({" + ".join(c["removed"]) or "no layer" for c in choices})
    cost = sum(c["cost"] for c in choices) / len(choices)
    alone = [c["cost_width_only"] for c in choices if c["cost_width_only"] is not None]
    versus = f"{sum(alone) / len(alone):.2f} width only" if len(alone) == len(choices) else \
        f"width only unreachable in {len(choices) - len(alone)} of {len(choices)}"
    return f"joint chose {' / '.join(removed)} ({len(choices)} seeds; Taylor cost {cost:.2f} vs {versus}, mean)"


def diffprune_source() -> str:
    """Where the diffprune that ran was imported from (a snapshot folder on PYTHONPATH names its commit in
    COMMIT, two levels above the package)."""
    import diffprune

    pkg = Path(diffprune.__file__).parent
    commit = pkg.parent.parent / "COMMIT"
    return str(pkg) + (f" (git archive of {commit.read_text().strip()})" if commit.exists() else "")


def _pm(agg: dict | None, fmt: str) -> str:
    if not agg or agg.get("mean") is None:
        return "-"
    return f"{agg['mean']:{fmt}} ± {agg['std']:{fmt}}"


def _merged_line(found: dict) -> str:
    merged = found.get("merged")
    if not merged:
        return ""
    return (f" Rows marked 'from the {merged['label']}' are that run's ({merged['diffprune_source']}; its teacher "
            f"FID {merged['teacher']['fid']:.2f}), kept with --merge; the others ran here.")


COLUMNS = ("budget", "structure", "method", "mid", "params", "MACs frac", "MACs x", "FID", "KID", "SSIM", "b1 x",
           "b8 x", "note")


def markdown(found: dict, meta: dict) -> str:
    t = found["teacher"] or {}
    b = meta["budget"]
    lines = [f"Digits teacher ({found['rows'][0].get('params_teacher', 0) / 1e6:.2f}M params) pruned to ~70% / ~56% "
             f"of its MACs; post-trained {b['steps']} steps ({meta['post_train_fraction']:.0%} of the teacher's "
             f"{meta['teacher_steps']}) with its recipe; {b['num_images']} samples, DDIM {b['sample_steps']} "
             f"(budget_curve.py's reduced protocol); mean ± std over {b['seeds']} seeds (seed = calibration + "
             f"post-training). Teacher FID {t.get('fid', float('nan')):.2f}, KID {t.get('kid', float('nan')):.4f}. "
             "Latency: CPU forward, median of interleaved teacher/student runs, 1 torch thread; x = teacher / "
             "student (MACs x: the counted ideal)." + _merged_line(found), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in found["rows"]:
        lat = (r.get("latency") or {}).get("forward", {})
        mid = "yes" if r["include_mid"] else "-" if r["structure"] == "width" else "no"
        head = [r["budget"], r["structure"] + (" (joint)" if r.get("split") == "joint" else ""), r["method"], mid]
        if r.get("unreachable"):
            note = "unreachable: " + r["unreachable"].split(";")[0].replace("--structure depth: ", "")
            lines.append("| " + " | ".join(head + ["-"] * (len(COLUMNS) - 5) + [note]) + " |")
            continue
        if r.get("reached") is None:
            continue
        notes = []
        if r["same_as"]:
            notes.append("same pruned model as " + ", ".join(BY_TAG[s].name for s in r["same_as"]))
        if r.get("depth_removed"):
            notes.append("removed " + " / ".join(r["depth_removed"]))
        if r.get("joint"):
            notes.append(_joint_note(r["joint"]))
        if r.get("same_weights_as"):
            notes.append("same pruned weights as " + ", ".join(BY_TAG[t].name for t in r["same_weights_as"]) +
                         " (every seed)")
        if r.get("merged_from"):
            notes.append(f"from the {r['merged_from']['label']}")
        if r["structure"] == "both":
            ratio = r["seeds"][0]["prune"]["width_ratio"]
            notes.append(f"then width ratio {ratio:.3f} ({r['ratio_rule']} rule)" if ratio else "no width step")
        frac = r["macs_fraction"]["mean"]
        cells = [f"{r['params']['mean'] / 1e6:.3f}M", f"{frac:.3f}", f"{1 / frac:.2f}", _pm(r.get("fid"), ".2f"),
                 _pm(r.get("kid"), ".4f"), _pm(r.get("ssim"), ".3f")]
        cells += [f"{lat[bs]['speedup']:.2f}" if bs in lat else "-" for bs in ("1", "8")]
        lines.append("| " + " | ".join(head + cells + ["; ".join(notes)]) + " |")
    return "\n".join(lines) + "\n"


def plot(found: dict, path: Path) -> None:
    from diffprune.plots import figure

    colors = {"width": "tab:blue", "depth": "tab:red", "both": "tab:green", "both (joint)": "tab:olive"}
    markers = {"diff-pruning": "o", "block-influence": "s", "magnitude": "^", "taylor": "D"}
    # rows at the same MACs fraction (0.682: five) drawn side by side; the table has the exact fractions
    JITTER = {"diff-pruning": -0.002, "block-influence": 0.0, "magnitude": 0.002, "taylor": 0.004}  # noqa: N806
    fig = figure((14, 5))
    a, b = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1]})
    rows = [r for r in found["rows"] if r.get("fid") and r["fid"]["mean"] is not None]
    for r in rows:
        structure = r["structure"] + (" (joint)" if r.get("split") == "joint" else "")
        label = f"{structure}{'+mid' if r['include_mid'] else ''} / {r['method']}"
        face = "none" if r["include_mid"] else colors[structure]
        x = r["macs_fraction"]["mean"] + JITTER[r["method"]] + (0.001 if r["include_mid"] else 0.0) + \
            (0.004 if r.get("split") == "joint" else 0.0)
        a.errorbar(x, r["fid"]["mean"], yerr=r["fid"]["std"], fmt=markers[r["method"]],
                   color=colors[structure], mfc=face, capsize=3, label=label, alpha=0.85)
        lat = (r.get("latency") or {}).get("forward", {})
        if "1" in lat and "8" in lat:
            b.scatter(lat["1"]["speedup"], lat["8"]["speedup"], marker=markers[r["method"]],
                      color=colors[structure], facecolors=face, s=60, label=label)
            b.annotate(f"{r['macs_fraction']['mean']:.2f}", (lat["1"]["speedup"], lat["8"]["speedup"]),
                       textcoords="offset points", xytext=(5, 3), fontsize=7)
    if found["teacher"]:
        a.axhline(found["teacher"]["fid"], color="gray", ls=":", label="teacher")
    a.set_xlabel("MACs fraction of the teacher (methods offset by ±0.002 to stay apart)")
    a.set_ylabel("digits-FID after post-training (mean ± std)")
    a.set_title("FID vs MACs by structure")
    handles, labels = a.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    a.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    lo = min([1.0] + [c.get_offsets()[:, :].min() for c in b.collections if len(c.get_offsets())])
    hi = max([1.0] + [c.get_offsets()[:, :].max() for c in b.collections if len(c.get_offsets())])
    b.plot([lo * 0.95, hi * 1.05], [lo * 0.95, hi * 1.05], color="gray", ls=":", lw=1)
    b.set_xlabel("CPU speed-up at batch 1 (teacher / student)")
    b.set_ylabel("CPU speed-up at batch 8")
    b.set_title("Latency speed-up (labels: MACs fraction)")
    handles, labels = b.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    b.legend(uniq.values(), uniq.keys(), fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def budget_and_rows(parser: argparse.ArgumentParser, args: argparse.Namespace, budget, options: Sequence[str],
                    smoke_rows: Sequence[str], by_tag: Mapping[str, Row]) -> tuple:
    """(the budget with the command line's `options` applied, the rows to run) after checking --jobs, each
    option (>= 1) and --only's tags (a usage error naming what is allowed otherwise)."""
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    for opt in options:
        value = getattr(args, opt)
        if value is not None:
            if value < 1:
                parser.error(f"--{opt.replace('_', '-')} must be >= 1, got {value}")
            budget = dataclasses.replace(budget, **{opt: value})
    rows = tuple(args.only.split(",")) if args.only else tuple(smoke_rows) if args.smoke else tuple(by_tag)
    if unknown := [t for t in rows if t not in by_tag]:
        parser.error(f"--only: unknown rows {unknown}; allowed: {', '.join(by_tag)}")
    return budget, rows


def budget_suffix(budget, default) -> str:
    """"" for the default post-training budget, else "_<steps>steps": a second budget gets its own results files."""
    return "" if budget.steps == default.steps else f"_{budget.steps}steps"


def write_results(stem: Path, found: dict, meta: dict, markdown, plot, start: float) -> None:
    """STEM.json (found + meta), STEM.md (`markdown(found, meta)`, also printed) and STEM.png (`plot`)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stem.with_suffix(".json"), {**found, "meta": meta})
    text = markdown(found, meta)
    write_text_atomic(stem.with_suffix(".md"), text)
    plot(found, stem.with_suffix(".png"))
    print(text)
    print(f"wrote {stem}.{{json,md,png}} ({time.perf_counter() - start:.0f}s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="seeds per row (default 3)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one torch thread each (2 on 2 cores)")
    parser.add_argument("--work", type=Path, default=Path("runs/depth_vs_width"),
                        help="scratch folder for all runs (--smoke: OUT/work)")
    parser.add_argument("--resume", action="store_true", help="keep the finished tasks found in the work folder")
    parser.add_argument("--steps", type=int, default=None, help="post-training steps (default 100 = 5%% of 2000)")
    parser.add_argument("--num-images", type=int, default=None, help="samples per model (default 200)")
    parser.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default 20)")
    parser.add_argument("--only", default=None, metavar="TAG,TAG",
                        help=f"run only these rows (tags: {', '.join(BY_TAG)}); for a timing run")
    parser.add_argument("--report-only", action="store_true", help="run nothing: tabulate what is finished")
    parser.add_argument("--merge", type=Path, default=None, metavar="JSON",
                        help="an earlier depth_vs_width.json: its rows this run does not run are kept (marked)")
    parser.add_argument("--note", default=None, help="a line recorded in the JSON (how the budget was chosen)")
    add_smoke_options(parser, "the teacher architecture, random weights (20 timesteps), 1 seed, 6 rows, 2 "
                              "steps, 10 images, DDIM 2")
    args = parser.parse_args()
    out = results_dir(parser, args)
    budget, rows = budget_and_rows(parser, args, SMOKE if args.smoke else FULL,
                                   ("seeds", "steps", "num_images", "sample_steps"), SMOKE_ROWS, BY_TAG)
    torch.set_num_threads(1)  # the latency measurement, like the workers: one thread
    start = time.perf_counter()
    teacher = smoke_teacher(out / "teacher") if args.smoke else embedded_teacher()
    work = args.work / (("smoke" if args.smoke else "full") + budget_suffix(budget, SMOKE if args.smoke else FULL))
    if work.exists() and not (args.resume or args.report_only):
        raise SystemExit(f"{work} exists; remove it first or pass --resume")
    plan = Plan(teacher, teacher_recipe(teacher), budget, work, rows)
    command = "python benchmarks/depth_vs_width.py " + " ".join(sys.argv[1:])
    if not args.report_only:
        log = work / "rows" / "commands.json"
        log.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(log, (json.loads(log.read_text()) if log.exists() else []) + [command])
        run_all(plan, args.jobs)
        prunes = {(k[1], k[2]): json.loads(plan.record(k).read_text()) for k in task_list(plan)
                  if k[0] == "prune" and plan.record(k).exists()}
        measure_latency(plan, prunes)
    found = collect(plan)
    if found["teacher"] is None:
        raise SystemExit(f"nothing to tabulate: the teacher's task is not finished in {work}")
    if args.merge is not None:
        found = merge(found, json.loads(args.merge.read_text()), args.merge)
    meta = {"budget": dataclasses.asdict(budget), "teacher_steps": plan.recipe["steps"],
            "post_train_fraction": budget.steps / plan.recipe["steps"],
            "protocol": "budget_curve.py's reduced protocol: digits-FID/KID vs the 1797 digits and SSIM vs the "
                        "teacher's samples from the same seed-0 noise, DDIM eta 0; Diff-Pruning thr 0.05 with the "
                        f"fast estimator (pool {budget.fast_pool}); block influence on {budget.calibration_batch} "
                        "calibration images; seed = calibration + post-training seed",
            "smoke": args.smoke, "note": args.note, "date": datetime.date.today().isoformat(),
            "machine": machine(threads=True), "jobs": args.jobs, "wall_time_s": time.perf_counter() - start,
            "report_only": args.report_only, "command": command, "commands": found.pop("commands"),
            "versions": library_versions(), "diffprune_source": diffprune_source()}
    stem = out / ("depth_vs_width" + budget_suffix(budget, SMOKE if args.smoke else FULL))
    write_results(stem, found, meta, markdown, plot, start)


if __name__ == "__main__":
    main()
