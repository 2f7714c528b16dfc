"""The README's full-size structure table, measured: params and MACs before / after pruning, peak RSS, seconds.

Random weights of the real shapes (benchmarks/_full_size_models.py, the same configs the slow tests build:
tests/test_families.py, test_dit_residual.py, test_pixart.py, test_sdxl.py, test_sd3.py), magnitude importance
(the widths do not depend on the scores), `prune_model_at_ratio`, MACs at batch 1 and the model's own resolution
counted by diffprune's counter. Each row runs in its own subprocess, one after the other (peak RSS = that
row's ru_maxrss). SDXL and SD3-medium use the slow tests' tricks to stay under 24 GB: weights in bf16, the
pruning graph traced at 16x16 latents (the structure does not depend on the resolution), MACs counted at the
full resolution on meta-device copies (shapes only).

    python benchmarks/full_size.py [--rows sd15,dit-0.5,...]
    python benchmarks/full_size.py --smoke --out DIR      # tiny models of the same families

Writes benchmarks/results/full_size.json (--out: into that folder) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_args import add_smoke_options, results_dir  # noqa: E402

# row -> (model, ratio, prune_residual, how: "fp32" counts on the model itself, "bf16-meta" as the SDXL/SD3 tests)
ROWS = {
    "sd15-0.3": ("sd15", 0.3, False, "fp32"),
    "dit-0.5": ("dit", 0.5, False, "fp32"),
    "dit-0.5-residual": ("dit", 0.5, True, "fp32"),
    "dit-0.3-residual": ("dit", 0.3, True, "fp32"),
    "pixart-0.5": ("pixart", 0.5, False, "fp32"),
    "sdxl-0.3": ("sdxl", 0.3, False, "bf16-meta"),
    "sdxl-0.5": ("sdxl", 0.5, False, "bf16-meta"),
    "sd3-0.3": ("sd3", 0.3, False, "bf16-meta"),
    "sd3-0.5": ("sd3", 0.5, False, "bf16-meta"),
}
SMOKE_ROWS = ("sd15-0.3", "dit-0.5-residual", "sdxl-0.5", "sd3-0.5")
TRACE_SIZE = 16  # bf16-meta rows: latents the pruning graph is traced at


def _widths(model) -> dict:
    from diffprune.families.attention import attention_modules

    attn = [a for _, a in attention_modules(model)]
    out = {
        "heads": attn[0].heads if attn else None,
        "head_dim": attn[0].to_q.out_features // attn[0].heads if attn else None,
    }
    if hasattr(model, "pos_embed") and hasattr(model.pos_embed, "proj"):
        out["hidden"] = model.pos_embed.proj.out_channels
    return out


def measure_row(row: str, smoke: bool) -> dict:
    import resource

    import _full_size_models as shapes
    import torch

    from diffprune.families import family_for
    from diffprune.prune.complexity import count_macs_params
    from diffprune.prune.importance import ImportanceResult
    from diffprune.prune.pruning import prune_model_at_ratio

    name, ratio, residual, how = ROWS[row]
    start = time.perf_counter()
    magnitude = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
    size = shapes.config(name, smoke)["sample_size"]
    torch.manual_seed(0)
    if how == "fp32":  # as tests/test_families.py::_full_size_check, test_dit_residual.py, test_pixart.py
        model = shapes.build(name, smoke)
        family = family_for(model)
        example = family.example_inputs(model)
        macs0, params0 = count_macs_params(model, example)
        t0 = time.perf_counter()
        pruned = prune_model_at_ratio(model, family, magnitude, ratio, prune_residual=residual)
        macs1, params1 = count_macs_params(pruned, example)
        with torch.no_grad():
            y = family.predict(pruned, next(iter(example.values())), example["timestep"], family.example_cond(pruned))
    else:  # as tests/test_sdxl.py / test_sd3.py: bf16 weights, traced at 16x16, MACs on meta copies
        family = family_for(shapes.build(name, smoke, device="meta"))
        macs0, params0 = shapes.meta_cost(shapes.build(name, smoke, device="meta"), family, size)
        model = shapes.build(name, smoke, dtype=torch.bfloat16, sample_size=min(TRACE_SIZE, size))
        t0 = time.perf_counter()
        pruned = prune_model_at_ratio(model, family, magnitude, ratio, prune_residual=residual)
        with torch.no_grad():
            x = torch.randn(
                1, family.in_channels(pruned), min(TRACE_SIZE, size), min(TRACE_SIZE, size), dtype=torch.bfloat16
            )
            cond = {k: v.to(torch.bfloat16) for k, v in family.example_cond(pruned).items()}
            y = family.predict(pruned, x, torch.tensor([500.0 if name == "sd3" else 500]), cond)
    prune_s = time.perf_counter() - t0
    assert torch.isfinite(y).all()
    widths = _widths(pruned)
    if how != "fp32":
        macs1, params1 = shapes.meta_cost(pruned, family, size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "row": row,
        "model": name,
        "ratio": ratio,
        "prune_residual": residual,
        "method": how,
        "params_before": params0,
        "params_after": params1,
        "params_fraction": params1 / params0,
        "macs_before": macs0,
        "macs_after": macs1,
        "macs_fraction": macs1 / macs0,
        "sample_size": size,
        "widths_after": widths,
        "peak_rss_bytes": peak,
        "peak_rss_gib": peak / 2**30,
        "prune_and_forward_s": prune_s,
        "seconds": time.perf_counter() - start,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    add_smoke_options(parser, "tiny models of four of the families, one row each")
    args = parser.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(measure_row(args.child[0], args.child[1] == "smoke")), flush=True)
        return 0
    out_dir = results_dir(parser, args)
    rows = args.rows.split(",") if args.rows else list(SMOKE_ROWS if args.smoke else ROWS)
    if any(r not in ROWS for r in rows):
        parser.error(f"--rows: choose from {','.join(ROWS)}")
    path = out_dir / "full_size.json"
    result = json.loads(path.read_text()) if path.exists() and not args.smoke else {"rows": {}}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for row in rows:  # one subprocess per row, one at a time
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", row, "smoke" if args.smoke else "full"],
            capture_output=True,
            text=True,
            env=env,
            cwd=Path(__file__).parent.parent,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"row {row} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        r = json.loads(lines[0][7:])
        r["date"] = datetime.date.today().isoformat()
        result["rows"][row] = r
        print(
            f"{row:18s} params {r['params_before'] / 1e6:8.1f}M -> {r['params_after'] / 1e6:8.1f}M "
            f"({r['params_fraction']:.3f})  MACs {r['macs_before'] / 1e9:8.1f}G -> {r['macs_after'] / 1e9:8.1f}G "
            f"({r['macs_fraction']:.3f})  peak {r['peak_rss_gib']:.1f} GiB  {r['seconds']:.0f} s "
            f"(wall {time.perf_counter() - t0:.0f} s)  {r['widths_after']}",
            flush=True,
        )
        from _common import machine  # noqa: PLC0415 - heavy (torch): only once a row has run

        result["meta"] = {
            "machine": machine(),
            "threads": args.threads,
            "smoke": args.smoke,
            "load_average_at_end": os.getloadavg(),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")  # after every row: a partial run keeps its rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
