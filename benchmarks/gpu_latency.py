"""Teacher vs pruned UNet forward latency on a GPU: dtype, channels_last, torch.compile, round_to.

One script for a lent GPU machine (offline; torch with CUDA; `pip install -e .` of this repo), meant
to finish in under 5 minutes on an H100. Models (random weights; speed does not depend on values):
- cifar10: google/ddpm-cifar10-32 (35.7M params, 6.1G MACs);
- celeba64: the paper's CelebA 64x64 DDPM (78.7M, 23.9G);
- church256: google/ddpm-church-256 (113.7M, 248.7G).
Each is pruned with `--ratio 0.3 --ratio-rule paper` (~56% of the MACs, the paper's CIFAR setting)
and round_to None/8/16/32 (identical architectures are measured once). Per configuration (dtype
fp16/bf16 x channels_last off/on x eager/compiled) teacher and student run interleaved (AB BA ...)
after warm-up; each call is timed with CUDA events after a device sync; medians in ms. Speed-up =
teacher / student median; efficiency = speed-up / MACs speed-up. Compiled configurations (first dtype,
round_to None students) run last and only while the time budget lasts; any failure (e.g. a compile
error) is recorded and skipped.

    python benchmarks/gpu_latency.py                 # on the GPU machine
    python benchmarks/gpu_latency.py --device cpu --quick   # smoke test of the code path
    python benchmarks/gpu_latency.py --smoke --out DIR      # the same on a tiny UNet, seconds, no GPU needed

Prints one table; writes --output, else DIR/gpu_latency.json (--out DIR), else $OUT/gpu_latency.json if $OUT is
set, else benchmarks/results/gpu_latency.json. Without a CUDA device (and no --device cpu / --smoke) it refuses
with a one-line message.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from diffusers import UNet2DModel

sys.path.insert(0, str(Path(__file__).parent))
from bench_args import add_smoke_options, results_dir  # noqa: E402

from diffprune.families import family_for  # noqa: E402
from diffprune.io import library_versions  # noqa: E402
from diffprune.prune.importance import ImportanceResult  # noqa: E402
from diffprune.prune.pruning import PruneConfig, prune_model  # noqa: E402

DOWN, ATTN_DOWN, UP, ATTN_UP = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"
MODELS = {  # name: (UNet2DModel kwargs, batch sizes)
    "cifar10": (dict(sample_size=32, block_out_channels=(128, 256, 256, 256),
                     down_block_types=(DOWN, ATTN_DOWN, DOWN, DOWN), up_block_types=(UP, UP, ATTN_UP, UP)), (1, 128)),
    "celeba64": (dict(sample_size=64, block_out_channels=(128, 256, 256, 256, 512),
                      down_block_types=(DOWN, DOWN, ATTN_DOWN, DOWN, DOWN),
                      up_block_types=(UP, UP, ATTN_UP, UP, UP)), (1, 64)),
    "church256": (dict(sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
                       down_block_types=(DOWN, DOWN, DOWN, DOWN, ATTN_DOWN, DOWN),
                       up_block_types=(UP, ATTN_UP, UP, UP, UP, UP)), (1, 16)),
}
SMOKE_MODELS = {"tiny": (dict(sample_size=16, block_out_channels=(64, 64), down_block_types=(DOWN, ATTN_DOWN),
                              up_block_types=(ATTN_UP, UP)), (1,))}  # --smoke only
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build(name: str) -> UNet2DModel:
    kwargs, _ = {**MODELS, **SMOKE_MODELS}[name]
    torch.manual_seed(0)
    return UNet2DModel(in_channels=3, out_channels=3, layers_per_block=2, norm_num_groups=32,
                       attention_head_dim=None, **kwargs).eval()


def students(teacher: UNet2DModel, round_tos: list) -> list[dict]:
    """Pruned copies (ratio 0.3, paper rule) per round_to; repeats of an architecture are dropped."""
    family, seen, out = family_for(teacher), set(), []
    importance = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
    for rt in round_tos:
        config = PruneConfig(model="config", method="magnitude", ratio=0.3, ratio_rule="paper", round_to=rt)
        res = prune_model(teacher, family, config, importance, progress=False)
        key = tuple(tuple(p.shape) for p in res.model.parameters())
        if key in seen:
            continue
        seen.add(key)
        out.append({"round_to": rt, "model": res.model.eval(), "params": res.params, "macs": res.macs})
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device) -> float:
    """Milliseconds of one call: CUDA events after a sync on GPU, perf_counter on CPU."""
    sync(device)
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def variant(model: torch.nn.Module, dtype: torch.dtype, channels_last: bool, compiled: bool, mode: str):
    """A converted copy of `model`, compiled if asked (compilation happens on the first call)."""
    m = copy.deepcopy(model).to(dtype=dtype)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    return torch.compile(m, mode=mode) if compiled else m


@torch.no_grad()
def measure_pair(teacher, student, batch: int, cfg: dict, args, device) -> dict:
    """Interleaved teacher/student medians (ms) for one configuration; first-call time when compiled."""
    dtype = DTYPES[cfg["dtype"]]
    size = teacher.config.sample_size
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    if cfg["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    if cfg["compiled"]:
        torch._dynamo.reset()  # fresh caches: no recompile limit across models
    models = {n: variant(m, dtype, cfg["channels_last"], cfg["compiled"], args.compile_mode)
              for n, m in (("teacher", teacher), ("student", student))}
    fns = {n: functools.partial(m, x, t, return_dict=False) for n, m in models.items()}
    first = {n: time_call(f, device) for n, f in fns.items()}  # includes compilation when compiled
    for _ in range(args.warmup):
        for f in fns.values():
            f()
    times = {n: [] for n in fns}
    for r in range(args.repeats):
        for n in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            times[n].append(time_call(fns[n], device))
    med = {n: statistics.median(v) for n, v in times.items()}
    return {"teacher_ms": med["teacher"], "student_ms": med["student"], "speedup": med["teacher"] / med["student"],
            "first_call_ms": first}


def configs(args) -> list[dict]:
    """Eager configurations first, then compiled ones (first dtype only; cut first when time runs out)."""
    eager = [{"dtype": d, "channels_last": cl, "compiled": False} for d in args.dtypes for cl in (False, True)]
    compiled = [{"dtype": args.dtypes[0], "channels_last": cl, "compiled": True}
                for cl in (True, False)] if args.compile else []
    return eager + compiled


def run_all(args, device, log) -> tuple[list[dict], dict]:
    """Every (model, student, configuration, batch) row; failures and skips are recorded, not raised."""
    rows, info, start = [], {}, time.perf_counter()
    pairs = []
    for name in args.models:
        teacher = build(name).to(device)
        studs = students(teacher, args.round_to)
        info[name] = {"params": studs[0]["params"][0], "macs": studs[0]["macs"][0]}
        log(f"{name}: teacher {info[name]['params'] / 1e6:.1f}M / {info[name]['macs'] / 1e9:.1f}G; students "
            + ", ".join(f"rt={s['round_to']}: {s['macs'][1] / s['macs'][0]:.3f} MACs" for s in studs))
        pairs += [(name, teacher, s) for s in studs]
    batches = {name: ([1] if args.quick else list(MODELS[name][1])) for name in args.models}
    for cfg in configs(args):
        for name, teacher, s in pairs:
            if cfg["compiled"] and s["round_to"] is not None:
                continue  # compiling costs ~tens of seconds per model: round_to None students only
            for batch in batches[name]:
                row = {"model": name, "round_to": s["round_to"], "batch": batch, **cfg,
                       "macs_speedup": s["macs"][0] / s["macs"][1], "params": s["params"][1], "macs": s["macs"][1]}
                if time.perf_counter() - start > args.budget_s:
                    row["error"] = "skipped: time budget"
                else:
                    try:
                        row.update(measure_pair(teacher, s["model"], batch, cfg, args, device))
                        row["efficiency"] = row["speedup"] / row["macs_speedup"]
                    except Exception as err:  # fail-soft: record and go on
                        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}" if str(err) \
                            else type(err).__name__
                        row["traceback"] = traceback.format_exc(limit=3)[-1500:]
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                log(_row_line(row))
    return rows, info


def _row_line(r: dict) -> str:
    layout = "CL" if r["channels_last"] else "--"
    cfg = f"{r['model']:<10}{str(r['round_to']):>5}{r['batch']:>5} {r['dtype']:<5}{layout:>3}" \
          f"{'comp' if r['compiled'] else 'eager':>6}{r['macs_speedup']:>7.2f}"
    if "error" in r:
        return cfg + f"  {r['error'][:80]}"
    return cfg + f"{r['teacher_ms']:>10.2f}{r['student_ms']:>10.2f}{r['speedup']:>7.2f}{r['efficiency']:>6.2f}"


def output_path(arg: str | None, out_dir: Path | None = None) -> Path:
    if arg:
        return Path(arg)
    if out_dir is not None:
        return out_dir / "gpu_latency.json"
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_latency.json"
    return Path(__file__).parent / "results" / "gpu_latency.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test of the code path)")
    p.add_argument("--quick", action="store_true", help="cifar10 only, batch 1, few repeats, no compile")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None, help="default: all three")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None, help="default fp16 bf16")
    p.add_argument("--round-to", type=int, nargs="+", default=[0, 8, 16, 32], help="0 = None")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per model (default 20, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per model (default 5, quick 1)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile configs")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode (default, reduce-overhead, max-autotune-no-cudagraphs, ...)")
    p.add_argument("--budget-s", type=float, default=250.0, help="stop starting configurations after this")
    p.add_argument("--output", default=None, help="default OUT/gpu_latency.json, $OUT/gpu_latency.json or "
                                                   "benchmarks/results/")
    add_smoke_options(p, "--device cpu --quick on a tiny 16x16 UNet, 2 repeats")
    args = p.parse_args(argv)
    args.out_dir = None if args.out is None and not args.smoke else results_dir(p, args)
    if args.smoke:
        args.device, args.quick, args.models = "cpu", True, args.models or list(SMOKE_MODELS)
        args.repeats = args.repeats or 2
    q = args.quick
    args.models = args.models or (["cifar10"] if q else list(MODELS))
    args.dtypes = args.dtypes or (["bf16"] if q else ["fp16", "bf16"])
    args.round_to = [r or None for r in ([0, 32] if q and args.round_to == [0, 8, 16, 32] else args.round_to)]
    args.repeats = args.repeats or (3 if q else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 5)
    args.compile = args.compile and not q
    return args


def main(argv=None) -> None:
    from diffusers.utils import logging as diffusers_logging

    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_latency.py: no CUDA device here (torch.cuda.is_available() is False): run it on a GPU "
                         "machine, or pass --smoke --out DIR (or --device cpu --quick) to check the code path on CPU")
    diffusers_logging.set_verbosity_error()  # the "modules to keep in float32: []" note on every .to(dtype)
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:5.0f}s] {msg}", flush=True)  # noqa: E731
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (cpu)"
    log(f"device {device} ({gpu}), torch {torch.__version__}; columns: model, round_to, batch, dtype, "
        "channels_last, eager/compiled, MACs x, teacher ms, student ms, x, efficiency")
    rows, info = run_all(args, device, log)
    print("\n" + f"{'model':<10}{'rt':>5}{'batch':>5} {'dtype':<5}{'CL':>3}{'mode':>6}{'MACs x':>7}"
          f"{'T ms':>10}{'S ms':>10}{'x':>7}{'eff':>6}" + ("   [--quick: smoke numbers]" if args.quick else ""))
    for r in rows:
        print(_row_line(r))
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": str(device), "gpu": gpu,
              "torch": torch.__version__, "cuda": torch.version.cuda, "versions": library_versions(),
              "settings": vars(args), "teachers": info, "rows": rows, "wall_s": time.perf_counter() - start}
    path = output_path(args.output, args.out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path} ({result['wall_s']:.0f}s)")


if __name__ == "__main__":
    sys.exit(main())
