"""Measured speed next to counted MACs: teacher vs pruned CIFAR-10 UNet on CPU.

Builds the google/ddpm-cifar10-32 architecture (random weights; latency does not depend on the
values), prunes it to several sizes, each with round_to None/8/16/32, and measures per row:
- forward latency at each batch size: median of interleaved teacher/student runs (AB BA ...,
  after warm-up, same input batch; `diffprune.metrics.latency.forward_latency`);
- DDIM sampling throughput (eta 0, few steps) of the whole loop, images/s, interleaved too;
- MACs speed-up (teacher MACs / student MACs), measured speed-up (teacher median / student
  median) and efficiency = measured / MACs speed-up (1.0 is the ideal; above 1 is possible when
  memory traffic shrinks faster than MACs).
The issue's goal: efficiency >= 0.9 at ~56% MACs on CPU; the script prints where it stands.

    python benchmarks/latency.py [--quick] [--threads N] [--repeats R] [--channels-last] [--sizes ...]
    python benchmarks/latency.py --smoke --out DIR   # the code path in seconds (anchor_cifar10.smoke_unet)

Prints a table and writes benchmarks/results/latency.json (torch version, threads, CPU model, date; --out: into
that folder).
Target rows (target_macs) search the ratio once with round_to None; the round_to variants reuse
that ratio, so their MACs show what rounding costs or saves. Architectures that come out identical
are measured once (`same_as`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from anchor_cifar10 import cifar10_unet, smoke_unet  # noqa: E402
from bench_args import add_smoke_options, results_dir  # noqa: E402

from diffprune.families import family_for  # noqa: E402
from diffprune.io import library_versions  # noqa: E402
from diffprune.metrics.latency import cpu_model, forward_latency, image_sampler, ratio, sampling_throughput  # noqa: E402
from diffprune.prune.importance import ImportanceResult  # noqa: E402
from diffprune.prune.pruning import PruneConfig, prune_model  # noqa: E402

FULL_SIZES = [{"target_macs": 0.7}, {"target_macs": 0.56}, {"ratio": 0.3, "ratio_rule": "paper"},
              {"ratio": 0.45, "ratio_rule": "paper"}]  # tp's own rule reaches only coarse steps (0.70, 0.56, 0.35)
QUICK_SIZES = [{"ratio": 0.3, "ratio_rule": "paper"}]  # 3.39G / 6.06G = 0.56, no search needed
GOAL_MACS, GOAL_EFFICIENCY = 0.56, 0.9


def size_label(setting: dict, round_to: int | None) -> str:
    parts = [f"{k}={v}" for k, v in setting.items() if k != "ratio_rule"]
    if setting.get("ratio_rule") == "paper":
        parts.append("paper")
    return ", ".join(parts) + f", rt={round_to}"


def structure_key(model: torch.nn.Module) -> tuple:
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


def build_students(teacher, sizes: list[dict], round_tos: list, log) -> list[dict]:
    """Pruned models for every (size, round_to); identical architectures point to the first one."""
    family = family_for(teacher)
    importance = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)  # structure only
    rows, seen = [], {}
    for setting in sizes:
        found_ratio = None
        for rt in round_tos:
            s = dict(setting)
            if found_ratio is not None and "ratio" not in s:  # reuse the ratio the search found
                s = {"ratio": found_ratio}
            t0 = time.perf_counter()
            out = prune_model(teacher, family, PruneConfig(model="cifar10 (config)", method="magnitude", round_to=rt,
                                                      **s), importance, progress=False)
            found_ratio = out.ratio if found_ratio is None else found_ratio
            key = structure_key(out.model)
            row = {"label": size_label(setting, rt), "setting": setting, "round_to": rt, "ratio": out.ratio,
                   "params": out.params[1], "macs": out.macs[1], "params_teacher": out.params[0],
                   "macs_teacher": out.macs[0], "macs_fraction": out.macs[1] / out.macs[0],
                   "macs_speedup": out.macs[0] / out.macs[1], "conv_in_width": out.model.conv_in.out_channels,
                   "same_as": seen.get(key), "model": out.model.eval()}
            seen.setdefault(key, row["label"])
            rows.append(row)
            log(f"pruned {row['label']}: {row['params'] / 1e6:.2f}M, {row['macs'] / 1e9:.2f}G MACs "
                f"({time.perf_counter() - t0:.0f}s)")
    return rows


def prepare(model: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    return model.to(memory_format=torch.channels_last) if channels_last else model


def measure(teacher, row: dict, args, scheduler) -> dict:
    """Forward latency per batch size and DDIM throughput, teacher and student interleaved."""
    family = family_for(teacher)
    student = prepare(row["model"], args.channels_last)
    out = {"forward": {}, "sampling": None}
    for bs in args.batch_sizes:
        torch.manual_seed(bs)
        inputs = family.example_inputs(teacher, batch_size=bs)
        if args.channels_last:
            inputs["sample"] = inputs["sample"].contiguous(memory_format=torch.channels_last)
        res = forward_latency({"teacher": teacher, "student": student}, inputs, repeats=args.repeats,
                              warmup=args.warmup)
        speedup = ratio(res["teacher"]["median_ms"], res["student"]["median_ms"])
        out["forward"][str(bs)] = {"teacher_ms": res["teacher"]["median_ms"],
                                   "student_ms": res["student"]["median_ms"],
                                   "teacher_iqr_ms": res["teacher"]["iqr_ms"],
                                   "student_iqr_ms": res["student"]["iqr_ms"],
                                   "speedup": speedup, "efficiency": speedup / row["macs_speedup"]}
    if args.sample_images > 0:
        samplers = {name: image_sampler(m, scheduler, args.sample_images, steps=args.sample_steps, sampler="ddim",
                                        batch_size=args.sample_batch)
                    for name, m in (("teacher", teacher), ("student", student))}
        res = sampling_throughput(samplers, repeats=args.sample_repeats, warmup=1)
        speedup = ratio(res["student"]["images_per_s"], res["teacher"]["images_per_s"])
        out["sampling"] = {"teacher_images_per_s": res["teacher"]["images_per_s"],
                           "student_images_per_s": res["student"]["images_per_s"], "speedup": speedup,
                           "efficiency": speedup / row["macs_speedup"]}
    return out


def print_table(rows: list[dict], batch_sizes: list[int]) -> None:
    head = f"{'setting':<34}{'params':>8}{'MACs':>7}{'MACs x':>7}"
    for bs in batch_sizes:
        head += f"{f'b{bs} ms T/S':>17}{f'b{bs} x':>7}{'eff':>6}"
    head += f"{'DDIM img/s T/S':>17}{'x':>6}{'eff':>6}"
    print(head)
    for r in rows:
        m = r["measured"]
        line = f"{r['label']:<34}{r['params'] / 1e6:>7.2f}M{r['macs'] / 1e9:>6.2f}G{r['macs_speedup']:>7.2f}"
        for bs in batch_sizes:
            f = m["forward"][str(bs)]
            line += f"{f['teacher_ms']:>8.1f}/{f['student_ms']:<8.1f}{f['speedup']:>7.2f}{f['efficiency']:>6.2f}"
        s = m["sampling"]
        line += (f"{s['teacher_images_per_s']:>8.2f}/{s['student_images_per_s']:<8.2f}{s['speedup']:>6.2f}"
                 f"{s['efficiency']:>6.2f}") if s else f"{'-':>17}{'-':>6}{'-':>6}"
        print(line + (f"  (= {r['same_as']})" if r["same_as"] else ""))


def goal_summary(rows: list[dict], batch_sizes: list[int]) -> dict:
    """Where the ~56%-MACs rows stand against efficiency >= 0.9 (best row, per batch size)."""
    near = [r for r in rows if abs(r["macs_fraction"] - GOAL_MACS) <= 0.03]
    out = {"goal": f"efficiency >= {GOAL_EFFICIENCY} at ~{GOAL_MACS:.0%} MACs (CPU)", "per_batch_size": {}}
    for bs in batch_sizes:
        best = max(near, key=lambda r: r["measured"]["forward"][str(bs)]["efficiency"], default=None)
        if best is None:
            continue
        eff = best["measured"]["forward"][str(bs)]["efficiency"]
        out["per_batch_size"][str(bs)] = {"best_row": best["label"], "efficiency": eff,
                                          "met": eff >= GOAL_EFFICIENCY}
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (< 3 min): one size, rt None/32, batch 1")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=None, help="timed forwards per model (default 20, quick 5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards per model first")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 8 (quick: 1)")
    p.add_argument("--round-to", type=int, nargs="+", default=None, help="0 = None; default 0 8 16 32")
    p.add_argument("--sample-images", type=int, default=None, help="images per DDIM run (default 16, 0 = skip)")
    p.add_argument("--sample-steps", type=int, default=10, help="DDIM steps per image")
    p.add_argument("--sample-batch", type=int, default=None, help="DDIM batch size (default: all images)")
    p.add_argument("--sample-repeats", type=int, default=3, help="timed DDIM runs per model")
    p.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs")
    p.add_argument("--sizes", nargs="+", default=None, metavar="SIZE",
                   help="pruned sizes: macs=F (target MACs fraction) or paper=R (ratio R, paper rule); "
                        "default macs=0.7 macs=0.56 paper=0.3 paper=0.45 (quick: paper=0.3)")
    p.add_argument("--output", type=Path, default=None,
                   help="default OUT/latency.json (--quick: latency_quick.json)")
    add_smoke_options(p, "anchor_cifar10.smoke_unet() instead of the CIFAR-10 UNet, --quick's settings, 2 repeats, "
                         "round_to None/8, 1 image x 1 DDIM step")
    args = p.parse_args(argv)
    results = results_dir(p, args)
    quick = args.quick or args.smoke
    args.output = args.output or results / ("latency_quick.json" if args.quick and not args.smoke else "latency.json")
    args.repeats = args.repeats or (2 if args.smoke else 5 if quick else 20)
    args.warmup = 1 if quick and args.warmup == 3 else args.warmup
    args.batch_sizes = args.batch_sizes or ([1] if quick else [1, 8])
    args.round_to = [r or None for r in (args.round_to or ([0, 8] if args.smoke else [0, 32] if quick else
                                                            [0, 8, 16, 32]))]
    args.sample_images = (1 if args.smoke else 2 if quick else 16) if args.sample_images is None else args.sample_images
    args.sample_steps = (1 if args.smoke else 2) if quick and args.sample_steps == 10 else args.sample_steps
    args.sample_repeats = 1 if quick and args.sample_repeats == 3 else args.sample_repeats
    default_sizes = QUICK_SIZES if quick else FULL_SIZES
    args.sizes = [parse_size(p, token) for token in args.sizes] if args.sizes else default_sizes
    return args


def parse_size(parser: argparse.ArgumentParser, token: str) -> dict:
    kind, _, value = token.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if kind not in ("macs", "paper") or not 0 < number < 1:
        parser.error(f"--sizes: {token!r} is not macs=F or paper=R with F, R in (0, 1)")
    return {"target_macs": number} if kind == "macs" else {"ratio": number, "ratio_rule": "paper"}


def main(argv=None) -> None:
    from diffusers import DDPMScheduler

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:6.0f}s] {msg}", flush=True)  # noqa: E731
    torch.manual_seed(0)
    teacher = (smoke_unet() if args.smoke else cifar10_unet()).eval()
    rows = build_students(teacher, args.sizes, args.round_to, log)
    teacher = prepare(teacher, args.channels_last)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    by_label = {}
    for row in rows:
        row["measured"] = by_label[row["same_as"]] if row["same_as"] else measure(teacher, row, args, scheduler)
        by_label[row["label"]] = row["measured"]
        log(f"measured {row['label']}")
    print(f"\nCPU: {cpu_model()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"channels_last {args.channels_last}, repeats {args.repeats}, DDIM {args.sample_images} images x "
          f"{args.sample_steps} steps; T/S = teacher/student, x = speed-up, eff = x / MACs x"
          + ("  [--quick/--smoke: smoke numbers, not results]" if args.quick or args.smoke else ""))
    print_table(rows, args.batch_sizes)
    goal = goal_summary(rows, args.batch_sizes)
    for bs, g in goal["per_batch_size"].items():
        print(f"goal {goal['goal']}, batch {bs}: best {g['efficiency']:.2f} ({g['best_row']}) -> "
              f"{'MET' if g['met'] else 'NOT MET'}")
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
              "machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "versions": library_versions(), "goal": goal,
              "rows": [{k: v for k, v in r.items() if k != "model"} for r in rows]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output} ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
