"""What one Diff-Pruning calibration sweep costs at full size: memory per micro-batch, seconds per sample
gradient, how many of those the exact and fast estimators need, and a 1- and 8-GPU projection.

Models (random weights of the real shapes, benchmarks/_full_size_models.py; nothing is downloaded): SD 1.5
UNet (64x64 latents, 77x768 text), SDXL UNet (128x128, 77x2048 + added cond), DiT-XL/2 (32x32, class labels),
SD3-medium transformer (128x128, 77 + 256 text tokens).

Memory: each configuration (model, micro-batch M, precision fp32 / bf16 autocast, gradient checkpointing
on / off) runs in a fresh subprocess: build the model, allocate the gradient sums (the state of every
micro-batch after the first), then ONE calibration step through diffprune's own code path
(`importance._calibration_loss(..., runtime)(t)` with `SweepRuntime(M, checkpointing, precision)`: forward +
backward of the diffusion loss on M images at one timestep). Peak = ru_maxrss; baseline = the resident
set after the build with the gradients allocated. Weights and gradient sums are params x 4 bytes each
(exact); activations = peak - baseline, fitted as a0 + M * a over the measured M (least squares), so

    peak(M) = weights + grads + a0 + M * a        (runtime overhead of this process excluded)

Where weights + gradient sums alone pass the --max-rss limit (SDXL, SD3 in fp32: 20.5 / 16.2 GB) the step
runs with every gradient dropped as soon as it is accumulated (post-accumulate hook): the activations are
measured, the gradient sums added by the formula ("grads": "added"). A configuration projected (from
the series' measured points) over the limit is not run: its row is marked projected. A watchdog ends a
run whose resident set passes the limit (row marked "over limit").

Time: seconds per sample-gradient evaluation (forward + backward of one image at one timestep), the
median of --repeats runs after the measured (warm-up) step, at M = 1. The goal check (--goal-model,
default DiT-XL/2: mid-size): a batch of B images at once vs the same B in micro-batches of 1 in the same
process, interleaved (A B B A ...), and the gradients of both (and with checkpointing, bf16) compared.

Projection to GPUs: time = evals x MACs x f x 2 / (GPU FLOP/s x utilization) / num_gpus with f = 3 (forward +
backward; 4 with checkpointing: the forward again), MACs per sample counted by diffprune's counter
(prune/complexity.py), published dense peak FLOP/s and an assumed utilization (printed); memory per GPU
= peak(M) (every GPU holds the weights and the gradient sums; micro-batches are dealt to the GPUs).

    python benchmarks/full_size_sweep.py [--models sd15,dit] [--micro-batches 1 2 4]
    python benchmarks/full_size_sweep.py --smoke --out DIR    # tiny models of the four families, < 30 s

Writes benchmarks/results/full_size_sweep.json and .md (--out: into that folder) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_args import add_smoke_options, results_dir  # noqa: E402

MODELS = ("sd15", "sdxl", "dit", "sd3")
GIB = 2**30
BATCH = 32  # the calibration batch of the exact sweep
POOL_PAIRS = 64  # the fast estimator's pairs per pass
TOTAL_T = 1000
# Published dense peak FLOP/s (no sparsity) of the 80 GB GPUs: NVIDIA A100 80GB SXM and H100 80GB SXM data sheets.
GPUS = {"A100-80GB": {"bf16": 312e12, "fp32": 19.5e12}, "H100-80GB": {"bf16": 989e12, "fp32": 67e12}}
UTILIZATION = 0.4  # assumed model FLOP utilization of the sweep's forward + backward (an assumption, not measured)
FITS = (24, 80)  # GiB of GPU memory
SWEEP_MS = (1, 2, 4, 8, 16, 32)


# ------------------------------------------------------------------------------------------------ child process


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _watchdog(limit: int) -> None:
    """End this process (exit 3) as soon as its resident set passes `limit` bytes."""
    import threading

    def watch():
        while True:
            if _rss() > limit:
                print(json.dumps({"over_limit": _rss()}), flush=True)
                os._exit(3)
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()


def _scheduler(name: str):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0) if name == "sd3" else DDPMScheduler()


def _batch(model, family, n: int):
    example = family.example_inputs(model, batch_size=n)
    return next(iter(example.values())), family.example_cond(model, batch_size=n)


def _info(name: str, smoke: bool) -> dict:
    """Params and MACs per sample (meta device), machine, evals of the estimators."""
    import _full_size_models as shapes
    import torch
    from _common import machine

    from diffprune.families import family_for
    from diffprune.prune.importance import default_passes

    model = shapes.build(name, smoke, device="meta")
    params = sum(p.numel() for p in model.parameters())
    macs, counted = shapes.meta_cost(model, family_for(model), shapes.config(name, smoke)["sample_size"])
    assert counted == params
    return {
        "params": params,
        "macs_per_sample": macs,
        "machine": machine(threads=True),
        "torch_threads": torch.get_num_threads(),
        "fast_passes": {str(k): default_passes(k, POOL_PAIRS) for k in (458, TOTAL_T)},
    }


def _measure(name: str, smoke: bool, cfg: dict) -> dict:
    """One configuration: build, allocate (or drop) the gradient sums, one calibration step, timed repeats."""
    import _full_size_models as shapes
    import torch

    from diffprune.families import family_for
    from diffprune.prune.importance import _calibration_loss
    from diffprune.prune.sweep_runtime import SweepRuntime

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = shapes.build(name, smoke)
    family = family_for(model)
    params = sum(p.numel() for p in model.parameters())
    build_s, rss_built = time.perf_counter() - t0, _rss()
    if cfg["drop_grads"]:
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
    else:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    base, peak_before = _rss(), _maxrss()
    m = cfg["m"]
    runtime = SweepRuntime(micro_batch_size=m, gradient_checkpointing=cfg["ckpt"], precision=cfg["precision"])
    images, cond = _batch(model, family, m)
    loss_at = _calibration_loss(model, family, _scheduler(name), images, 0, cond, runtime=runtime)
    times = []
    with runtime.applied(model):
        t1 = time.perf_counter()
        loss = float(loss_at(0))
        first_s, peak = time.perf_counter() - t1, _maxrss()
        for _ in range(cfg["repeats"]):
            t1 = time.perf_counter()
            loss_at(0)
            times.append(time.perf_counter() - t1)
    grad_abs = None if cfg["drop_grads"] else float(sum(p.grad.abs().sum() for p in model.parameters()))
    return {
        **cfg,
        "params": params,
        "build_s": build_s,
        "rss_after_build": rss_built,
        "baseline_rss": base,
        "maxrss_before_step": peak_before,
        "peak_rss": peak,
        "activations": max(0, peak - base),
        "first_step_s": first_s,
        "repeat_s": times,
        "loss": loss,
        "grad_abs_sum": grad_abs,
        "s_per_eval": statistics.median(times) / m if times else None,
    }


def _compare(name: str, smoke: bool, b: int, repeats: int, layers: int | None = None) -> dict:
    """The goal check: B images at once vs B in micro-batches of 1 (interleaved), and the gradients of both,
    of checkpointing and of bf16 (micro-batches of 1) against the whole batch's (every 7th parameter)."""
    import _full_size_models as shapes
    import torch

    from diffprune.families import family_for
    from diffprune.prune.importance import _calibration_loss
    from diffprune.prune.sweep_runtime import SweepRuntime

    torch.manual_seed(0)
    model = shapes.build(name, smoke, **({"num_layers": layers} if layers else {}))
    family = family_for(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    images, cond = _batch(model, family, b)
    sched = _scheduler(name)
    runtimes = {
        "whole": SweepRuntime(),
        "micro1": SweepRuntime(micro_batch_size=1),
        "micro1_ckpt": SweepRuntime(micro_batch_size=1, gradient_checkpointing=True),
        "micro1_bf16": SweepRuntime(micro_batch_size=1, precision="bf16"),
        "micro1_ckpt_bf16": SweepRuntime(micro_batch_size=1, gradient_checkpointing=True, precision="bf16"),
    }
    watched = list(model.parameters())[::7]

    def run(key: str) -> tuple[float, float, list]:
        for p in model.parameters():
            p.grad.zero_()
        rt = runtimes[key]
        with rt.applied(model):
            t1 = time.perf_counter()
            loss = float(_calibration_loss(model, family, sched, images, 0, cond, runtime=rt)(0))
            sec = time.perf_counter() - t1
        return sec, loss, [p.grad.detach().clone() for p in watched]

    run("whole"), run("micro1")  # warm-up
    times: dict[str, list[float]] = {"whole": [], "micro1": []}
    ref = None
    for i in range(repeats):
        for key in ("whole", "micro1") if i % 2 == 0 else ("micro1", "whole"):
            sec, loss, grads = run(key)
            times[key].append(sec)
            if key == "whole" and ref is None:
                ref = (loss, grads)
    out = {
        "model": name,
        "num_layers": layers,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": b,
        "repeats": repeats,
        "times_s": times,
        "load_average": os.getloadavg(),
        "median_s": {k: statistics.median(v) for k, v in times.items()},
    }
    out["micro1_over_whole"] = out["median_s"]["micro1"] / out["median_s"]["whole"]
    agreement = {}
    for key in runtimes:
        if key == "whole":
            continue
        sec, loss, grads = run(key)
        diff = max(float((g - r).abs().max()) for g, r in zip(grads, ref[1], strict=True))
        scale = max(float(r.abs().max()) for r in ref[1])
        num = sum(float(((g - r) ** 2).sum()) for g, r in zip(grads, ref[1], strict=True))
        den = sum(float((r**2).sum()) for r in ref[1])
        agreement[key] = {
            "one_run_s": sec,
            "loss": loss,
            "loss_whole": ref[0],
            "grad_max_abs_diff": diff,
            "grad_max_abs": scale,
            "grad_rel_l2_diff": math.sqrt(num / den) if den else None,
        }
    out["agreement_vs_whole"] = agreement
    return out


def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec.get("limit"):
        _watchdog(spec["limit"])
    results = []
    for job in spec["jobs"]:
        if job["kind"] == "info":
            results.append(_info(job["model"], spec["smoke"]))
        elif job["kind"] == "measure":
            results.append(_measure(job["model"], spec["smoke"], job["cfg"]))
        else:
            results.append(_compare(job["model"], spec["smoke"], job["batch"], job["repeats"], job.get("layers")))
    print("RESULT " + json.dumps(results), flush=True)


# ------------------------------------------------------------------------------------------------ parent


def run_child(spec: dict, log) -> list | None:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parent.parent,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            log(f"  ({time.perf_counter() - start:.0f} s)")
            return json.loads(line[7:])
    if proc.returncode == 3:
        log(f"  over the limit ({time.perf_counter() - start:.0f} s)")
        return None
    raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def fit(points: list[tuple[int, float]]) -> dict:
    """activations(M) = a0 + M * a, least squares over the measured (M, activations); one point: a0 = 0."""
    if len(points) == 1:
        m, y = points[0]
        return {"a0": 0.0, "a": y / m, "points": len(points), "note": "one measured M: a0 taken as 0"}
    ms, ys = [p[0] for p in points], [p[1] for p in points]
    mm, my = statistics.mean(ms), statistics.mean(ys)
    a = sum((m - mm) * (y - my) for m, y in zip(ms, ys, strict=True)) / sum((m - mm) ** 2 for m in ms)
    return {"a0": my - a * mm, "a": a, "points": len(points)}


def series_key(precision: str, ckpt: bool) -> str:
    return f"{precision}{'+ckpt' if ckpt else ''}"


def measure_model(name: str, info: dict, args, log, previous: dict | None = None) -> dict:
    """Every (precision, checkpointing) series of `name`: measured M, then the fit and projections.

    `previous`: this model's "sweep" of an earlier run (--resume): its measured rows are kept, not rerun."""
    params = info["params"]
    done = {
        (r["precision"], r["ckpt"], r["m"], r["drop_grads"]): r
        for s in (previous or {}).get("series", {}).values()
        for r in s["rows"]
        if r["status"] == "measured"
    }
    wg = 2 * 4 * params
    drop = wg + 1.0 * GIB > args.limit and not args.smoke  # weights + grads alone do not fit here
    series = {}
    for precision in args.precisions:
        for ckpt in args.checkpointing:
            rows, points = [], []
            for m in args.micro_batches:
                cfg = {
                    "m": m,
                    "precision": precision,
                    "ckpt": ckpt,
                    "drop_grads": drop,
                    "repeats": args.repeats if m == 1 and (not ckpt or args.smoke) else 0,
                }
                if (precision, ckpt, m, drop) in done:
                    row = done[(precision, ckpt, m, drop)]
                    rows.append(row)
                    points.append((m, row["activations"]))
                    log(f"{name} {series_key(precision, ckpt)} M={m}: measured in an earlier run, kept")
                    continue
                wanted = not args.only or f"{name}:{series_key(precision, ckpt)}:{m}" in args.only
                if name in args.info_only or not wanted:
                    continue
                if points:
                    f = fit(points)
                    overhead = rows[0]["baseline_rss"] - (wg if not drop else wg // 2)
                    projected = overhead + (wg if not drop else wg // 2) + f["a0"] + m * f["a"]
                    if projected > args.limit:
                        rows.append(
                            {**cfg, "status": "projected (over the limit, not run)", "projected_peak_rss": projected}
                        )
                        continue
                log(f"{name} {series_key(precision, ckpt)} M={m}{' (grads dropped)' if drop else ''}")
                out = run_child(
                    {
                        "threads": args.threads,
                        "smoke": args.smoke,
                        "limit": args.limit,
                        "jobs": [{"kind": "measure", "model": name, "cfg": cfg}],
                    },
                    log,
                )
                if out is None:
                    rows.append({**cfg, "status": "over limit (ended by the watchdog)"})
                    break
                row = {**out[0], "status": "measured", "load_average": os.getloadavg()}
                rows.append(row)
                points.append((m, row["activations"]))
                log(
                    f"    peak {row['peak_rss'] / GIB:.2f} GiB, base {row['baseline_rss'] / GIB:.2f} GiB, "
                    f"activations {row['activations'] / GIB:.2f} GiB, step {row['first_step_s']:.1f} s"
                )
            if rows:
                series[series_key(precision, ckpt)] = {"rows": rows, "fit": fit(points) if points else None}
    for key, s in (previous or {}).get("series", {}).items():  # series of an earlier run this one did not ask for
        if key not in series:
            kept = [r for r in s["rows"] if r["status"] == "measured"]
            series[key] = {"rows": kept, "fit": fit([(r["m"], r["activations"]) for r in kept]) if kept else None}
    return {
        "weights_bytes": 4 * params,
        "grads_bytes": 4 * params,
        "grads": "added" if drop else "measured",
        "series": series,
    }


def peak_at(model: dict, key: str, m: int) -> float | None:
    f = model["series"].get(key, {}).get("fit")
    if not f:
        return None
    return model["weights_bytes"] + model["grads_bytes"] + f["a0"] + m * f["a"]


def projections(models: dict, kept: int) -> dict:
    """Evals and GPU time / memory per model (formula in the JSON)."""
    from math import ceil

    out = {}
    for name, mdl in models.items():
        info = mdl["info"]
        evals = {
            "exact_kept": kept * BATCH,
            "exact_all_timesteps": TOTAL_T * BATCH,
            "fast_kept": info["fast_passes"][str(kept)] * POOL_PAIRS,
            "fast_all_timesteps": info["fast_passes"][str(TOTAL_T)] * POOL_PAIRS,
            "fast_coarse_cut_forwards": (ceil(kept / 10) + 1) * 8,
        }
        gpu = {}
        for gname, peaks in GPUS.items():
            for precision, flops in peaks.items():
                for ckpt in (False, True):
                    f = 4 if ckpt else 3
                    for ev_name in ("exact_kept", "exact_all_timesteps", "fast_kept"):
                        secs = evals[ev_name] * info["macs_per_sample"] * f * 2 / (flops * UTILIZATION)
                        for n in (1, 8):
                            gpu[f"{gname}|{series_key(precision, ckpt)}|{ev_name}|{n}"] = secs / n
        fits = {}
        for key in mdl["sweep"]["series"]:
            for cap in FITS:
                ok = [m for m in SWEEP_MS if (peak_at(mdl["sweep"], key, m) or math.inf) <= cap * GIB]
                fits[f"{key}|{cap}"] = max(ok) if ok else None
        wg = (mdl["sweep"]["weights_bytes"] + mdl["sweep"]["grads_bytes"]) / GIB
        out[name] = {
            "evals": evals,
            "gpu_seconds": gpu,
            "max_micro_batch_fitting": fits,
            "weights_grads_gib": wg,
            "activation_room_gib": {str(c): c - wg for c in FITS},
            "peak_gib": {
                key: {str(m): (peak_at(mdl["sweep"], key, m) or 0) / GIB for m in SWEEP_MS}
                for key in mdl["sweep"]["series"]
            },
        }
    return out


def cpu_rates(models: dict) -> dict:
    """Measured s/eval at M = 1 (fp32 and bf16) and the MAC rate they imply on this CPU."""
    out = {}
    for name, mdl in models.items():
        for key, s in mdl["sweep"]["series"].items():
            timed = [r for r in s["rows"] if r.get("s_per_eval")]
            if timed:
                sec = timed[0]["s_per_eval"]
                f = 4 if key.endswith("ckpt") else 3
                out[f"{name}|{key}"] = {
                    "s_per_eval": sec,
                    "repeats": timed[0]["repeat_s"],
                    "macs_per_s": mdl["info"]["macs_per_sample"] * f / sec,
                }
    return out


def write_md(result: dict, path: Path) -> None:
    lines = [
        "# Full-size calibration sweep: memory, time, projection",
        "",
        f"{result['meta']['machine']}, OMP threads {result['meta']['threads']}, {result['meta']['date']}. "
        "Random weights of the real shapes; one configuration per subprocess.",
        "",
        "peak(M) = weights + grads + a0 + M * a (GiB; weights = grads = params x 4 B, exact; a0, a fitted from "
        "the measured M; runtime overhead of the process excluded)",
        "",
        "| model | params | series | measured M: activations GiB | a0 | a / sample | peak M=1 | M=4 "
        "| M=32 (projected) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, mdl in result["models"].items():
        sw = mdl["sweep"]
        for key, s in sw["series"].items():
            meas = ", ".join(f"{r['m']}: {r['activations'] / GIB:.2f}" for r in s["rows"] if r["status"] == "measured")
            other = ", ".join(f"{r['m']}: {r['status'].split(' ')[0]}" for r in s["rows"] if r["status"] != "measured")
            f = s["fit"]
            cells = [f"{(peak_at(sw, key, m) or 0) / GIB:.1f}" for m in (1, 4, 32)] if f else ["-"] * 3
            added = " (grads added)" if sw["grads"] == "added" else ""
            lines.append(
                f"| {name} | {mdl['info']['params'] / 1e9:.3f}B | {key}{added} "
                f"| {meas or '-'}{'; ' + other if other else ''} | {f['a0'] / GIB:.2f} | {f['a'] / GIB:.2f} | "
                if f
                else f"| {name} | {mdl['info']['params'] / 1e9:.3f}B | {key} | {other} | - | - | "
            )
            lines[-1] += " | ".join(cells) + " |"
    lines += [
        "",
        "Seconds per sample-gradient evaluation (M = 1, median of the repeats after the warm-up step):",
        "",
        "| model / series | s/eval | MACs/s on this CPU (MACs x 3 or 4 / s) |",
        "|---|---|---|",
    ]
    for k, v in result["cpu"].items():
        lines.append(f"| {k} | {v['s_per_eval']:.2f} | {v['macs_per_s'] / 1e9:.1f} G |")
    for k, v in result["cpu_projected"].items():
        lines.append(
            f"| {k} (projected: MACs x 3 at {v['from_macs_per_s'] / 1e9:.1f} G MACs/s) | {v['s_per_eval']:.0f} | - |"
        )
    p = result["projection"]
    lines += [
        "",
        f"Evaluations (kept timesteps: {result['assumption']['kept_timesteps']} = "
        f"{result['assumption']['kept_source']}; bound: all {TOTAL_T}) and GPU time "
        f"({result['assumption']['formula']}; utilization {UTILIZATION}, bf16 autocast, no checkpointing):",
        "",
        "| model | exact evals (kept / all) | fast evals | H100 1 GPU exact | H100 8 GPUs exact "
        "| H100 8 GPUs all t | A100 1 GPU exact | H100 1 GPU fast |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, pr in p.items():
        g, ev = pr["gpu_seconds"], pr["evals"]

        def h(s):
            return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min"

        lines.append(
            f"| {name} | {ev['exact_kept']} / {ev['exact_all_timesteps']} | {ev['fast_kept']} | "
            f"{h(g['H100-80GB|bf16|exact_kept|1'])} | {h(g['H100-80GB|bf16|exact_kept|8'])} | "
            f"{h(g['H100-80GB|bf16|exact_all_timesteps|8'])} | {h(g['A100-80GB|bf16|exact_kept|1'])} | "
            f"{h(g['H100-80GB|bf16|fast_kept|1'])} |"
        )
    keys = list(dict.fromkeys(k for pr in p.values() for k in pr["peak_gib"]))
    lines += [
        "",
        "Largest micro-batch M (of 1, 2, 4, ..., 32) whose peak(M) fits (- = none; n/m = series not measured):",
        "",
        "| model | " + " | ".join(f"{k} {c} GiB" for k in keys for c in FITS) + " |",
    ]
    lines.append("|---|" + "---|" * (len(keys) * len(FITS)))
    for name, pr in p.items():
        cells = [
            (str(pr["max_micro_batch_fitting"].get(f"{k}|{c}") or "-") if k in pr["peak_gib"] else "n/m")
            for k in keys
            for c in FITS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Weights + gradient sums (params x 8 B, exact) and what is left for activations (GiB):",
        "",
        "| model | weights + grads | room in 24 GiB | room in 80 GiB |",
        "|---|---|---|---|",
    ]
    for name, pr in p.items():
        room = pr["activation_room_gib"]
        lines.append(f"| {name} | {pr['weights_grads_gib']:.1f} | {room['24']:.1f} | {room['80']:.1f} |")
    lines += ["", "Goals: " + json.dumps(result["goals"])]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--checkpointing", type=lambda v: v == "on", nargs="+", default=[False, True], metavar="on|off")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the warm-up step (M = 1)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--max-rss-gb", type=float, default=15.0, help="per-process resident-set limit (GB)")
    parser.add_argument("--goal-model", default="dit", help="model of the micro-batching speed check ('' = skip)")
    parser.add_argument("--goal-batch", type=int, default=4)
    parser.add_argument(
        "--goal-layers",
        type=int,
        default=None,
        help="blocks of the goal model (a mid-size model: DiT-XL/2 widths with fewer blocks)",
    )
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        metavar="MODEL:SERIES:M",
        help="run only these configurations (e.g. sd15:fp32+ckpt:1); the others are skipped",
    )
    parser.add_argument("--info-only", default="", help="models whose params / MACs are counted but not swept")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the measured configurations of the existing JSON in --out, run the others",
    )
    parser.add_argument(
        "--kept",
        type=int,
        default=458,
        help="kept timesteps assumed (digits teacher at thr 0.05: importance_cost.json)",
    )
    add_smoke_options(parser, "tiny models of the four families, all configurations in one subprocess")
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    out_dir = results_dir(parser, args)
    args.limit = int(args.max_rss_gb * 1e9)
    args.info_only = [n for n in args.info_only.split(",") if n]
    names = [n for n in args.models.split(",") if n]
    if any(n not in MODELS for n in names):
        parser.error(f"--models: choose from {MODELS}")
    start = time.perf_counter()

    def log(msg):
        print(msg, flush=True)

    models = {}
    if args.smoke:  # one subprocess for everything: the code path in seconds, numbers meaningless
        jobs = [{"kind": "info", "model": n} for n in names]
        cfgs = [
            (n, {"m": m, "precision": p, "ckpt": c, "drop_grads": False, "repeats": 1 if m == 1 else 0})
            for n in names
            for m in (1, 2)
            for p in ("fp32", "bf16")
            for c in (False, True)
        ]
        jobs += [{"kind": "measure", "model": n, "cfg": c} for n, c in cfgs]
        jobs += [{"kind": "compare", "model": args.goal_model or "dit", "batch": 2, "repeats": 2}]
        out = run_child({"threads": args.threads, "smoke": True, "limit": None, "jobs": jobs}, log)
        infos, measured, compare = out[: len(names)], out[len(names) : -1], out[-1]
        for n, info in zip(names, infos, strict=True):
            series = {}
            for (cn, c), r in zip(cfgs, measured, strict=True):
                if cn == n:
                    s = series.setdefault(series_key(c["precision"], c["ckpt"]), {"rows": []})
                    s["rows"].append({**r, "status": "measured"})
            for s in series.values():
                s["fit"] = fit([(r["m"], r["activations"]) for r in s["rows"]])
            models[n] = {
                "info": info,
                "sweep": {
                    "weights_bytes": 4 * info["params"],
                    "grads_bytes": 4 * info["params"],
                    "grads": "measured",
                    "series": series,
                },
            }
    else:
        old = {}
        if args.resume and (out_dir / "full_size_sweep.json").exists():
            old = json.loads((out_dir / "full_size_sweep.json").read_text())
        infos = {n: old["models"][n]["info"] for n in names if n in old.get("models", {})}
        missing = [n for n in names if n not in infos]
        if missing:  # one subprocess counts them all (meta device: no memory)
            log(f"params and MACs of {', '.join(missing)}")
            infos.update(
                zip(
                    missing,
                    run_child(
                        {
                            "threads": args.threads,
                            "smoke": False,
                            "limit": args.limit,
                            "jobs": [{"kind": "info", "model": n} for n in missing],
                        },
                        log,
                    ),
                    strict=True,
                )
            )
        for n in names:
            prev = old.get("models", {}).get(n)
            models[n] = {"info": infos[n], "sweep": measure_model(n, infos[n], args, log, prev and prev["sweep"])}
        compare = old.get("compare") if args.resume and not args.goal_model else None
        if args.goal_model:
            log(f"goal check on {args.goal_model}: batch {args.goal_batch} at once vs micro-batches of 1")
            compare = run_child(
                {
                    "threads": args.threads,
                    "smoke": False,
                    "limit": args.limit,
                    "jobs": [
                        {
                            "kind": "compare",
                            "model": args.goal_model,
                            "batch": args.goal_batch,
                            "repeats": 2,
                            "layers": args.goal_layers,
                        }
                    ],
                },
                log,
            )[0]
    info0 = next(iter(models.values()))["info"]
    result = {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "machine": info0["machine"],
            "threads": args.threads,
            "smoke": args.smoke,
            "limit_bytes": args.limit,
            "load_average_at_end": os.getloadavg(),
            "wall_time_s": None,
        },
        "assumption": {
            "kept_timesteps": args.kept,
            "kept_source": "digits teacher at threshold 0.05, mean of 3 seeds "
            "(benchmarks/results/importance_cost.json cost.exact.kept_timesteps)",
            "batch": BATCH,
            "fast_pairs_per_pass": POOL_PAIRS,
            "gpu_peak_flops": GPUS,
            "utilization": UTILIZATION,
            "formula": "seconds = evals x MACs/sample x f x 2 FLOP/MAC / (GPU peak FLOP/s x "
            "utilization) / num_gpus; f = 3 (forward + backward), 4 with checkpointing",
            "memory_formula": "peak(M) per GPU = params x 4 (weights) + params x 4 (gradient sums) "
            "+ a0 + M x a (fitted on this CPU; CUDA context not included)",
        },
        "models": models,
    }
    result["cpu"] = cpu_rates(models)
    ref = next((v for k, v in result["cpu"].items() if k.endswith("|fp32")), None)
    result["cpu_projected"] = {  # models without a measured s/eval: MACs x 3 at the first fp32 MAC rate measured
        f"{n}|fp32": {
            "s_per_eval": m["info"]["macs_per_sample"] * 3 / ref["macs_per_s"],
            "status": "projected",
            "from_macs_per_s": ref["macs_per_s"],
        }
        for n, m in models.items()
        if ref and f"{n}|fp32" not in result["cpu"]
    }
    result["projection"] = projections(models, args.kept)
    gpu_vs_cpu = {}
    for k, v in result["cpu"].items():
        precision = "bf16" if "bf16" in k else "fp32"
        gpu_vs_cpu[k] = {g: GPUS[g][precision] * UTILIZATION / (2 * v["macs_per_s"]) for g in GPUS}
    result["assumption"]["gpu_effective_over_this_cpu"] = gpu_vs_cpu
    goals = {}
    if compare:
        goals["micro_batching_time"] = {
            "goal": "micro-batches of 1 <= 1.10 x one batch at equal work",
            "model": compare["model"],
            "num_layers": compare.get("num_layers"),
            "params": compare.get("params"),
            "batch": compare["batch"],
            "ratio": compare["micro1_over_whole"],
            "holds": compare["micro1_over_whole"] <= 1.10,
        }
        result["compare"] = compare
    if "sd15" in models:
        sw = models["sd15"]["sweep"]
        key = "fp32" if "fp32" in sw["series"] else next(iter(sw["series"]))
        p1, p32 = peak_at(sw, key, 1), peak_at(sw, key, BATCH)
        if p1 and p32:
            goals["memory_m1_vs_batch32"] = {
                "goal": "peak(M=1) <= peak(batch 32 at once) / 4 (SD 1.5)",
                "series": key,
                "peak_m1_gib": p1 / GIB,
                "peak_b32_gib_projected": p32 / GIB,
                "ratio": p1 / p32,
                "holds": 0 < p1 / p32 <= 0.25,
            }
    result["goals"] = goals
    result["meta"]["wall_time_s"] = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "full_size_sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    write_md(result, out_dir / "full_size_sweep.md")
    print((out_dir / "full_size_sweep.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
