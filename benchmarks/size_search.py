"""`--ratio` vs `--target-macs` vs `--dry-run`: wall time and peak memory of deciding a model size (issue 14).

Each (architecture, mode) runs in a fresh process (peak RSS is per process), on random weights built
from the architecture's config (sizes do not depend on weights), magnitude importance (no sweep: the
sweep costs the same in every mode and is not what this measures):

- ratio:   `prune_model(..., ratio=R)`: the size plan of R, then the one real prune;
- target:  `prune_model(..., target_macs=T)`: the ratio search on size plans, then the one real prune;
- dry-run: `search_sizes(..., target_macs=T)`: what `diffprune prune --dry-run` does after loading.

Machines here are shared: each row is the median-wall run of --repeat fresh processes (all walls kept).

Default: the CIFAR-10 DDPM UNet (google/ddpm-cifar10-32's config, fp32). `--slow` adds the Stable
Diffusion v1.5 UNet and DiT-XL/2 (full-size configs as in tests/test_families.py), in bf16 so that
a model and its pruned copy fit in a shared 24 GB machine. Prints a table and
writes benchmarks/results/size_search.json (default) or size_search_slow.json (--slow); --out: into that folder.

    OMP_NUM_THREADS=1 python benchmarks/size_search.py [--slow]
    OMP_NUM_THREADS=1 python benchmarks/size_search.py --smoke --out DIR   # the code path on a tiny UNet, 1 repeat
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

from bench_args import add_smoke_options, results_dir

SMOKE_ARCH = "tiny-unet"  # --smoke only: a 16x16 two-level UNet2DModel, fp32
ARCHS = {  # name: (ratio, target MACs fraction)
    "cifar10-ddpm-unet": (0.3, 0.56),
    "sd-v1.5-unet": (0.3, 0.5),
    "dit-xl-2": (0.3, 0.5),
    SMOKE_ARCH: (0.3, 0.56),
}
MODES = ("ratio", "target", "dry-run")


def build(arch: str):
    import torch
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

    torch.manual_seed(0)
    if arch not in ("cifar10-ddpm-unet", SMOKE_ARCH):  # bf16 throughout (weights and example inputs): fits next
        torch.set_default_dtype(torch.bfloat16)  # to other jobs
    if arch == SMOKE_ARCH:
        return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                           layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    if arch == "cifar10-ddpm-unet":
        return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                           layers_per_block=2, norm_num_groups=32, attention_head_dim=None, dropout=0.1,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")).eval()
    if arch == "sd-v1.5-unet":
        return UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                    attention_head_dim=8).eval()
    return DiTTransformer2DModel(num_layers=28, num_attention_heads=16, attention_head_dim=72, sample_size=32,
                                 patch_size=2, in_channels=4, out_channels=8, num_embeds_ada_norm=1000).eval()


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def child(arch: str, mode: str) -> dict:
    """One measurement in this process; returns the row."""
    from diffprune.families import family_for
    from diffprune.prune.importance import ImportanceResult
    from diffprune.prune.pruning import PruneConfig, prune_model
    from diffprune.prune.size_search import search_sizes

    ratio, target = ARCHS[arch]
    start = time.perf_counter()
    model = build(arch)
    family = family_for(model)
    row = {"arch": arch, "mode": mode, "build_s": time.perf_counter() - start, "model_rss_gb": _rss_gb(),
           "dtype": str(next(model.parameters()).dtype)}
    size = {"ratio": ratio} if mode == "ratio" else {"target_macs": target}
    config = PruneConfig(model=arch, method="magnitude", **size)
    start = time.perf_counter()
    plan = search_sizes(model, family, config, progress=False)
    row["search_s"] = time.perf_counter() - start
    if mode != "dry-run":
        importance = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
        prune_model(model, family, config, importance, progress=False, plan=plan)  # asserts the planned structure
        row["prune_s"] = time.perf_counter() - start - row["search_s"]
    row.update(wall_s=time.perf_counter() - start, peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
               ratio=plan.ratio, macs_fraction=plan.chosen.macs_fraction, params_fraction=plan.chosen.params_fraction,
               macs_before=plan.macs0, params_before=plan.params0, candidates=len(plan.candidates),
               graph_s=plan.setup_s)
    from diffprune.io import library_versions  # after the measurement: it does not count

    row["versions"] = library_versions()  # the parent reports them without importing diffusers itself
    return row


def measure(arch: str, mode: str, repeat: int) -> dict:
    """The run with the median wall time of `repeat` fresh processes (the others' walls kept)."""
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, __file__, "--child", arch, mode], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{arch} {mode} failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    versions = [r.pop("versions") for r in runs][0]
    row = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    return {**row, "repeats": repeat, "all_wall_s": [r["wall_s"] for r in runs],
            "max_peak_rss_gb": max(r["peak_rss_gb"] for r in runs), "versions": versions}


def table(rows: list[dict]) -> str:
    lines = [f"{'architecture':<20}{'mode':<9}{'wall s':>8}{'search s':>9}{'prune s':>9}{'peak GB':>9}"
             f"{'model GB':>9}{'ratio':>8}{'MACs':>7}{'params':>7}{'cands':>6}"]
    for r in rows:
        lines.append(f"{r['arch']:<20}{r['mode']:<9}{r['wall_s']:>8.1f}{r['search_s']:>9.1f}"
                     f"{r.get('prune_s', 0):>9.1f}{r['peak_rss_gb']:>9.2f}{r['model_rss_gb']:>9.2f}"
                     f"{r['ratio']:>8.4f}{r['macs_fraction']:>7.3f}{r['params_fraction']:>7.3f}{r['candidates']:>6}")
    return "\n".join(lines)


def goals(rows: list[dict]) -> dict:
    """Per architecture: target/ratio wall time and peak memory (goals <= 1.5x and <= 1.2x), dry-run seconds."""
    out = {}
    for arch in dict.fromkeys(r["arch"] for r in rows):
        by = {r["mode"]: r for r in rows if r["arch"] == arch}
        out[arch] = {"target_over_ratio_time": by["target"]["wall_s"] / by["ratio"]["wall_s"],
                     "target_over_ratio_peak_rss": by["target"]["peak_rss_gb"] / by["ratio"]["peak_rss_gb"],
                     "dry_run_s": by["dry-run"]["wall_s"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow", action="store_true", help="add the SD v1.5 UNet and DiT-XL/2 (full size)")
    parser.add_argument("--only", choices=tuple(ARCHS), default=None, help="one architecture only")
    parser.add_argument("--repeat", type=int, default=None,
                        help="fresh processes per (architecture, mode), median wall reported (default 3, --slow 1)")
    parser.add_argument("--child", nargs=2, metavar=("ARCH", "MODE"), help=argparse.SUPPRESS)
    add_smoke_options(parser, f"the {SMOKE_ARCH} architecture only, 1 fresh process per mode")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    out_dir = results_dir(parser, args)
    archs = ([args.only] if args.only else [SMOKE_ARCH] if args.smoke else
             ["cifar10-ddpm-unet"] + (["sd-v1.5-unet", "dit-xl-2"] if args.slow else []))
    load = os.getloadavg()
    rows = []
    for arch in archs:
        for mode in MODES:
            repeat = args.repeat or (3 if arch == "cifar10-ddpm-unet" and not args.smoke else 1)
            rows.append(measure(arch, mode, repeat))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    versions = rows[0]["versions"]
    for r in rows:
        r.pop("versions")
    result = {"rows": rows, "goals": goals(rows), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": platform.platform(), "cpus": os.cpu_count(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "load_average_at_start": load, "load_average_at_end": os.getloadavg(), "python": sys.version.split()[0],
              "versions": versions}
    path = out_dir / ("size_search_slow.json" if args.slow and not args.smoke else "size_search.json")
    if args.only:
        path = path.with_name(f"size_search_{args.only}.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["goals"], indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
