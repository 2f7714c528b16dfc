"""bf16 autocast sweep against the fp32 sweep (issue 24 item 3): does `--sweep-precision bf16` prune the same channels?

For each trained model folder (default: the embedded digits teacher; `--models` adds more, e.g. the DiT that
benchmarks/fast_pool.py trains on digits) and seed: the calibration batch exactly as `diffprune prune` reads it,
then Diff-Pruning's importance four ways (exact and fast estimator, each in fp32 and in bf16 autocast), and per
estimator the agreement of bf16 with fp32: the cut step, the kept-channel IoU of the uniform prune at 56% of the
MACs (the ratio the size search gives), and the relative gradient-sum difference. Also the sweep's wall time
ratio bf16 / fp32 (same process, side by side; on a CPU without bf16 units autocast is usually slower).

    python benchmarks/sweep_precision.py --models benchmarks/.work/dit_full_sharp/trained  # sweep_precision.json/.md
    python benchmarks/sweep_precision.py --smoke --out DIR                         # the code path in seconds

--reuse-teacher keeps the digits teacher's row of the existing results file (same batch, pool and seeds) and
measures only --models, e.g. after retraining the DiT.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, smoke_teacher  # noqa: E402
from bench_args import add_smoke_options, results_dir  # noqa: E402
from importance_cost import iou, kept_sets  # noqa: E402

from diffprune.cli.demo_job import embedded_teacher  # noqa: E402
from diffprune.families import family_for  # noqa: E402
from diffprune.families.pipeline_parts import denoiser_of  # noqa: E402
from diffprune.fsutil import write_json_atomic  # noqa: E402
from diffprune.io import library_versions, load_pipeline  # noqa: E402
from diffprune.prune.config import PruneConfig  # noqa: E402
from diffprune.prune.importance import cond_rows, estimate, estimate_fast  # noqa: E402
from diffprune.prune.size_search import search_sizes  # noqa: E402
from diffprune.prune.stage import calibration_batch  # noqa: E402
from diffprune.prune.sweep_runtime import SweepRuntime  # noqa: E402

TARGET_MACS = 0.56
THRESHOLD = 0.05


def sweeps(model, family, scheduler, batch: tuple, pool: tuple, seed: int) -> dict:
    """{(estimator, precision): ImportanceResult}: exact on `batch`, fast on `pool` ((samples, cond) each)."""
    out = {}
    for precision in ("fp32", "bf16"):
        runtime = SweepRuntime(precision=precision)
        out["exact", precision] = estimate(model, family, scheduler, batch[0], "diff-pruning", THRESHOLD, seed,
                                           progress=False, cond=batch[1], runtime=runtime)
        out["fast", precision] = estimate_fast(model, family, scheduler, pool[0], THRESHOLD, seed, progress=False,
                                               cond=pool[1], runtime=runtime)
    return out


def _first(samples: torch.Tensor, cond: dict | None, n: int) -> tuple:
    return samples[:n], cond_rows(cond, slice(0, n), samples.shape[0])


def rel_difference(a: dict, b: dict) -> float:
    """max |a - b| / max |a| over all gradient sums."""
    scale = max(float(v.abs().max()) for v in a.values())
    return max(float((a[k] - b[k]).abs().max()) for k in a) / scale


def measure(folder: Path, seeds: int, batch: int, pool: int) -> dict:
    pipe = load_pipeline(str(folder))
    _, model = denoiser_of(pipe)
    family = family_for(model)
    model.requires_grad_(True)
    config = PruneConfig(model=str(folder), data="digits", target_macs=TARGET_MACS, batch_size=max(batch, pool))
    ratio = search_sizes(model, family, config, progress=False).ratio
    rows = []
    for seed in range(seeds):
        config = PruneConfig(model=str(folder), data="digits", target_macs=TARGET_MACS,
                             batch_size=max(batch, pool), seed=seed)
        samples, cond, _ = calibration_batch(config, pipe, family, model, None, torch.device("cpu"))
        res = sweeps(model, family, pipe.scheduler, _first(samples, cond, batch), _first(samples, cond, pool), seed)
        for estimator in ("exact", "fast"):
            a, b = res[estimator, "fp32"], res[estimator, "bf16"]
            rows.append({"seed": seed, "estimator": estimator, "cut_fp32": a.cut, "cut_bf16": b.cut,
                         "kept_iou": iou(kept_sets(model, family, a, ratio)[0], kept_sets(model, family, b, ratio)[0]),
                         "grad_rel_difference": rel_difference(a.grads, b.grads),
                         "time_ratio_bf16_over_fp32": b.wall_time_s / a.wall_time_s})
    return {"model": str(folder), "family": family.name, "class": type(model).__name__, "ratio": ratio,
            "rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> dict:
    out = {}
    for estimator in ("exact", "fast"):
        sel = [r for r in rows if r["estimator"] == estimator]
        ious = np.array([r["kept_iou"] for r in sel])
        out[estimator] = {"kept_iou_mean": float(ious.mean()), "kept_iou_min": float(ious.min()),
                          "same_cut": sum(r["cut_fp32"] == r["cut_bf16"] for r in sel), "seeds": len(sel),
                          "max_cut_shift": max(abs((r["cut_fp32"] or 0) - (r["cut_bf16"] or 0)) for r in sel),
                          "grad_rel_difference_max": max(r["grad_rel_difference"] for r in sel),
                          "time_ratio_median": float(np.median([r["time_ratio_bf16_over_fp32"] for r in sel]))}
    return out


def table(results: list[dict]) -> str:
    lines = ["| model | estimator | kept-channel IoU bf16 vs fp32 (mean, min) | same cut | max cut shift "
             "| max rel. gradient diff | time bf16/fp32 |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for estimator, s in r["summary"].items():
            lines.append(f"| {r['class']} ({Path(r['model']).name}) | {estimator} | {s['kept_iou_mean']:.3f}, "
                         f"{s['kept_iou_min']:.3f} | {s['same_cut']}/{s['seeds']} | {s['max_cut_shift']} | "
                         f"{s['grad_rel_difference_max']:.2e} | {s['time_ratio_median']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", type=Path, default=[],
                        help="more trained pipeline folders (the embedded digits teacher is always first)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="exact sweep's calibration batch")
    parser.add_argument("--pool", type=int, default=128, help="the fast estimator's image pool")
    parser.add_argument("--reuse-teacher", action="store_true",
                        help="keep the embedded teacher's row of the existing sweep_precision.json (same batch, pool, "
                             "seeds) and measure only --models")
    add_smoke_options(parser, "a tiny random teacher, 1 seed, batch 4")
    args = parser.parse_args()
    out = results_dir(parser, args)
    torch.set_num_threads(1)
    if args.smoke:
        folders, seeds, batch, pool = [smoke_teacher(out / "work" / "teacher")], 1, 4, 4
    else:
        folders, seeds, batch, pool = [embedded_teacher(), *args.models], args.seeds, args.batch_size, args.pool
    start = time.perf_counter()
    reused = []
    if args.reuse_teacher and not args.smoke:
        old = json.loads((out / "sweep_precision.json").read_text())
        if (old["batch_size"], old["pool"], old["seeds"]) != (batch, pool, seeds):
            parser.error(f"--reuse-teacher: the existing results used batch {old['batch_size']}, pool {old['pool']}, "
                         f"seeds {old['seeds']}")
        reused = [r for r in old["models"] if r["model"] == str(folders[0])][:1]
        if not reused:
            parser.error("--reuse-teacher: the existing results have no row for the embedded teacher")
        folders = folders[1:]
    results = reused + [measure(f, seeds, batch, pool) for f in folders]
    doc = {"benchmark": "sweep_precision", "date": datetime.date.today().isoformat(), "machine": machine(),
           "versions": library_versions(), "threshold": THRESHOLD, "target_macs": TARGET_MACS,
           "batch_size": batch, "pool": pool, "seeds": seeds, "torch_threads": 1, "models": results,
           "wall_time_s": time.perf_counter() - start,
           "command": "python benchmarks/sweep_precision.py " + " ".join(sys.argv[1:]),
           "teacher_row_reused_from": old["date"] if reused else None}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "sweep_precision.json", json.loads(json.dumps(doc, default=str)))
    text = table(results)
    (out / "sweep_precision.md").write_text(text + "\n")
    print(text)
    print(f"wrote {out / 'sweep_precision.json'}")


if __name__ == "__main__":
    main()
