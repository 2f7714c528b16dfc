"""Re-read every README figure that quotes a committed result file and check it against that file (issue 25, item 1).

    python benchmarks/check_claims.py [--readme README.md] [--results benchmarks/results]

Each claim below names a README fragment exactly as printed, with every quoted figure in braces
(``"fast **{0.891} ± {0.009}**"``), the JSON file(s) under benchmarks/results it comes from, the key
path(s) or a small function that reads the value(s), and the format that prints them. The check loads
the JSON, formats the values, puts them into the fragment and looks for the result verbatim in the
README (whitespace runs, line breaks included, count as one space, so prose may wrap anywhere). It
prints one table row per claim and exits 1 if any rebuilt fragment is missing from the README (one
``FAIL`` line per claim naming the file and both values), 0 otherwise. A claim whose README text and
JSON agree but whose quoted figures here are out of date gives a ``WARN`` line (exit 0; 1 with --strict).

Figures not covered here on purpose: test tolerances and timings, and the figures that no result file
holds (see the README review in issue 25). Standard library only: runs in well under a second.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class Claim:
    id: str
    section: str
    fragment: str  # README text, each quoted figure in braces, exactly as printed
    files: tuple[str, ...]  # under the results folder; a pattern with * gives its callable a {name: data} dict
    values: Any  # a key path "a/b/0", a tuple of key paths (first file), or a callable(*data) -> value(s)
    fmt: Any = "s"  # a format spec or a callable value -> str; or a tuple of them, one per figure

    def figures(self) -> list[str]:
        return MARK.findall(self.fragment)


def get(data: Any, path: str) -> Any:
    """`data` at "a/b/0" (a list index where the container is a list)."""
    for key in path.split("/"):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def norm(text: str) -> str:
    return " ".join(text.split())


# ---- formats -------------------------------------------------------------------------------------------------------


def pm(spec: str, scale: float = 1.0, unit: str = "") -> Callable[[dict], str]:
    """A {mean, std, n} summary as the tables print it: "-" when empty, the mean alone when n <= 1 or std is 0."""

    def f(stat: dict) -> str:
        if stat.get("mean") is None:
            return "-"
        mean = format(stat["mean"] / scale, spec) + unit
        if stat.get("n", 0) <= 1 or not stat.get("std"):
            return mean
        return f"{mean} ± {format(stat['std'] / scale, spec)}{unit}"

    return f


def mean_of(spec: str, scale: float = 1.0, unit: str = "") -> Callable[[dict], str]:
    return lambda stat: "-" if stat.get("mean") is None else format(stat["mean"] / scale, spec) + unit


def seconds(v: float | None) -> str:
    """Table 1 (seed 0) prints prune times under 10 s with one decimal, longer ones whole."""
    return "-" if v is None else format(v, ".1f" if v < 10 else ".0f")


def span(values: list) -> str:
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def joined(spec: str, sep: str = " / ") -> Callable[[list], str]:
    return lambda values: sep.join(format(v, spec) for v in values)


# ---- readers shared by several claims ------------------------------------------------------------------------------

T1, T1_OLD, T1_QUICK = "table1.json", "2026-11-27/table1.json", "table1_quick.json"
PRUNED_300 = ("random", "magnitude", "taylor (all steps)", "diff-pruning thr=0.00", "diff-pruning thr=0.02",
              "diff-pruning thr=0.05", "diff-pruning thr=0.10", "diff-pruning thr=0.05, fast estimator")
BUDGET_ROWS = ("random", "magnitude", "taylor (all steps)", "diff-pruning thr=0.05", "diff-pruning thr=0.05, fast")


def t1_seed0(row: str, *, prev: bool = True, tail: bool = True) -> Callable:
    """Seed-0 Table 1 cells: FID, KID, SSIM (table1.json), previous-code SSIM (the 2026-11-27 seed-0 model), kept t,
    prune s."""

    def f(new: dict, old: dict) -> tuple:
        m = new["table"][row]
        cells: tuple = (m["fid"]["mean"], m["kid"]["mean"], m["ssim"]["mean"])
        if prev:
            cells += (old["runs"][row][0]["ssim"],)
        if tail:
            kept = m["kept_timesteps"]["mean"]
            cells += ("-" if kept is None else f"{kept:.0f}", seconds(m["prune_wall_s"]["mean"]))
        return cells

    return f


def t1_row(row: str) -> Callable:
    def f(d: dict) -> tuple:
        m = d["table"][row]
        steps = m["train_steps"]["mean"]
        return (m["fid"]["n"], m["params"], m["macs"], m["latency_speedup"], m["fid"], m["kid"], m["ssim"],
                "-" if steps is None else f"{steps:.0f}", m["kept_timesteps"], m["prune_wall_s"])

    return f


T1_ROW_FMT = ("d", mean_of(".3f", 1e6, "M"), mean_of(".1f", 1e6, "M"), pm(".2f"), pm(".2f"), pm(".4f"), pm(".3f"), "s",
              pm(".0f"), pm(".1f"))


def latency_row(label: str) -> Callable:
    def f(d: dict) -> tuple:
        row = next(r for r in d["rows"] if r["label"] == label)
        fw, s = row["measured"]["forward"], row["measured"]["sampling"]
        return (row["params"] / 1e6, row["macs_speedup"], fw["1"]["speedup"], fw["1"]["efficiency"],
                fw["8"]["speedup"], fw["8"]["efficiency"], s["speedup"], s["efficiency"])

    return f


def size_row(arch: str) -> Callable:
    def f(d: dict) -> tuple:
        rows = {r["mode"]: r for r in d["rows"] if r["arch"] == arch}
        goals = d["goals"][arch]
        return (rows["ratio"]["wall_s"], rows["target"]["wall_s"], goals["target_over_ratio_time"],
                goals["dry_run_s"], goals["target_over_ratio_peak_rss"])

    return f


def anchor_row(setting: dict) -> Callable:
    def f(d: dict) -> tuple:
        row = next(r for r in d["rows"] if r["setting"] == setting)
        return row["params_after"] / 1e6, row["macs_after"] / 1e9, row["conv_in_width"]

    return f


def alloc_row(name: str, delta: bool = True) -> Callable:
    def f(d: dict) -> tuple:
        t = d["digits"]["table"][name]
        cells = (t["macs_fraction"]["mean"], t["params"]["mean"] / 1e6, t["fid"], t["kid"], t["ssim"])
        return cells + (d["digits"]["paired_vs_uniform"][name]["fid"],) if delta else cells

    return f


def signed_pm(spec: str) -> Callable[[dict], str]:
    return lambda stat: f"{format(stat['mean'], '+' + spec)} ± {format(stat['std'], spec)}"


def budget_row(method: str) -> Callable:
    return lambda d: tuple(d["table"][method][str(steps)]["fid"] for steps in d["meta"]["post_train_steps"])


def budget_ranks(d: dict) -> tuple:
    """Taylor's place by mean FID among the pruned rows at 20 and 40 steps."""

    def rank(steps: int) -> int:
        fids = {m: d["table"][m][str(steps)]["fid"]["mean"] for m in BUDGET_ROWS}
        return sorted(fids, key=fids.get).index("taylor (all steps)") + 1

    n = len(BUDGET_ROWS)
    return ("last" if rank(20) == n else f"{rank(20)}th"), rank(40), n


def steps_to(d: dict, target: str, method: str) -> float:
    return d["steps_to_target"][target][method]["mean_curve"]


def at_most(first_budget: int) -> Callable[[float], str]:
    return lambda v: f"<= {first_budget}" if v <= first_budget else f"{v:.0f}"


def budget_savings(d: dict) -> tuple:
    t2, first = "teacher + 2.0", d["meta"]["post_train_steps"][0]
    methods = ("diff-pruning thr=0.05, fast", "diff-pruning thr=0.05", "magnitude")
    fast, exact, mag = (steps_to(d, t2, m) for m in methods)
    saved_fast = f">= {mag - fast:.0f}" if fast <= first else f"{mag - fast:.0f}"
    return fast, exact, mag, saved_fast, 100 * (mag - fast) / mag, mag - exact, 100 * (mag - exact) / mag


def truth_counts(d: dict, metric: str) -> tuple:
    seeds = d["truth"]["per_seed"]
    return sum(s[f"fast_{metric}"] > s[f"exact_{metric}"] for s in seeds), len(seeds)


def ts_row(d: dict) -> tuple:
    return tuple(d["summary"]["prefix"][str(k)]["ssim"]["mean"] for k in d["meta"]["budget"]["prefixes"])


def versions_found(data: Any, key: str) -> set:
    if isinstance(data, dict):
        found = {data[key]} if isinstance(data.get(key), str) else set()
        for v in data.values():
            found |= versions_found(v, key)
        return found
    if isinstance(data, list):
        return set().union(*(versions_found(v, key) for v in data)) if data else set()
    return set()


# ---- the claims, section by section --------------------------------------------------------------------------------


def claims() -> list[Claim]:
    out: list[Claim] = []
    section = ""

    def add(cid: str, fragment: str, files: str | tuple[str, ...], values: Any, fmt: Any = "s") -> None:
        out.append(Claim(cid, section, fragment, (files,) if isinstance(files, str) else files, values, fmt))

    ic, fmt3 = "importance_cost.json", ".3f"

    section = "Commands: Estimator"
    add("estimator-truth-iou", "kept-channel IoU {0.891} ± {0.009} vs {0.866} ± {0.013}, {6} of {6} seeds", ic,
        lambda d: (*(d["truth"]["vs_truth"][k][s] for k in ("fast iou", "exact iou") for s in ("mean", "std")),
                   *truth_counts(d, "iou")), (fmt3,) * 4 + ("d", "d"))
    add("estimator-grad-evals", "about {10}% of the exact loop's gradient evaluations", ic,
        lambda d: 100 * d["ratios"]["evals_fast_over_exact"]["mean"], ".0f")

    section = "How big is the pruned model: size search, anchor"
    add("size-search-setup", "medians of {3} fresh processes, `OMP_NUM_THREADS={1}`, this 2-core Xeon shared with "
        "other jobs at load {5}-{6}, {2026-12-01};", ("size_search.json", "size_search_slow.json"),
        lambda a, b: (a["rows"][0]["repeats"], a["omp_num_threads"],
                      round(min(min(x["load_average_at_start"] + x["load_average_at_end"]) for x in (a, b))),
                      round(max(max(x["load_average_at_start"] + x["load_average_at_end"]) for x in (a, b))),
                      a["date"][:10]), ("d", "s", "d", "d", "s"))
    add("size-search-cifar10", "| CIFAR-10 DDPM UNet (fp32) | {1.5} s | {1.8} s | {1.23}x | {0.9} s | {1.03}x |",
        "size_search.json", size_row("cifar10-ddpm-unet"), (".1f", ".1f", ".2f", ".1f", ".2f"))
    add("size-search-sd15", "| SD v1.5 UNet (bf16) | {32.5} s | {42.3} s | {1.30}x | {13.8} s | {1.00}x |",
        "size_search_slow.json", size_row("sd-v1.5-unet"), (".1f", ".1f", ".2f", ".1f", ".2f"))
    add("size-search-dit", "| DiT-XL/2 (bf16) | {17.3} s | {25.2} s | {1.46}x | {9.2} s | {0.93}x |",
        "size_search_slow.json", size_row("dit-xl-2"), (".1f", ".1f", ".2f", ".1f", ".2f"))
    an = "anchor_cifar10.json"
    add("anchor-unpruned", "| unpruned | {35.75}M | {6.06}G | 128 |", an,
        lambda d: (d["rows"][0]["params_before"] / 1e6, d["rows"][0]["macs_before"] / 1e9), (".2f", ".2f"))
    add("anchor-paper-rule", "| `--ratio 0.3 --ratio-rule paper` | **{19.85}M** | **{3.39}G** | {96} |", an,
        anchor_row({"ratio": 0.3, "ratio_rule": "paper"}), (".2f", ".2f", "d"))
    add("anchor-tp-rule", "| `--ratio 0.3` (torch-pruning 1.6 rule) | {13.95}M | {2.09}G | {64} |", an,
        anchor_row({"ratio": 0.3, "ratio_rule": "torch-pruning"}), (".2f", ".2f", "d"))
    add("anchor-ratio-0.25", "| `--ratio 0.25` | {20.13}M | {3.41}G | {96} |", an,
        anchor_row({"ratio": 0.25, "ratio_rule": "torch-pruning"}), (".2f", ".2f", "d"))
    add("anchor-target-macs", "| `--target-macs {0.5585}` | {20.14}M | {3.41}G | {96} |", an,
        lambda d: (next(r["setting"]["target_macs"] for r in d["rows"] if "target_macs" in r["setting"]),
                   *anchor_row({"target_macs": next(r["setting"]["target_macs"] for r in d["rows"]
                                                    if "target_macs" in r["setting"])})(d)),
        (".4f", ".2f", ".2f", "d"))
    add("anchor-paper", "The paper: {35.7}M / {6.1}G -> {19.8}M / {3.4}G.", an,
        lambda d: (d["paper"]["params_before"] / 1e6, d["paper"]["macs_before"] / 1e9,
                   d["paper"]["params_after"] / 1e6, d["paper"]["macs_after"] / 1e9), ".1f")

    section = "One budget, non-uniform widths (allocation)"
    al, alr = "allocation.json", "allocation_reduced.json"
    add("allocation-protocol", "{300} post-training steps, {3} seeds, Table 1's evaluation protocol ({500} samples, "
        "DDIM {100}):", al, ("meta/finetune_steps", "meta/seeds", "meta/num_images", "meta/sample_steps"), "d")
    add("allocation-reduced-protocol", "evaluate at {200} samples / DDIM {20}:", alr,
        ("meta/num_images", "meta/sample_steps"), "d")
    add("allocation-date", "`), {2026-12-02}, Intel Xeon, 2 shared cores.", al, "meta/date")
    cells = (fmt3, ".3f", pm(".3f"), pm(".4f"), pm(".3f"), signed_pm(".3f"))
    add("allocation-uniform", "| uniform (the paper) | {0.565} | {0.922}M | **{1.413 ± 0.130}** | "
        "**{0.0279 ± 0.0029}** | {0.924 ± 0.005} | - |", al, alloc_row("uniform", delta=False), cells[:5])
    add("allocation-global", "| global | {0.561} | {0.809}M | {1.739 ± 0.096} | {0.0387 ± 0.0005} | "
        "{0.918 ± 0.008} | {+0.325 ± 0.157} (worse beyond the spread) |", al, alloc_row("global"), cells)
    add("allocation-isomorphic", "| isomorphic | {0.584} (*) | {0.900}M | {1.494 ± 0.105} | {0.0306 ± 0.0047} | "
        "{0.924 ± 0.005} | {+0.080 ± 0.025} (worse beyond the spread) |", al, alloc_row("isomorphic"), cells)
    add("allocation-isomorphic-missed", "on {2} of {3} seeds it could not reach 56% ± 2%", al,
        lambda d: (sum(r["macs_fraction"] > 0.58 for r in d["digits"]["runs"]["isomorphic"]),
                   len(d["digits"]["runs"]["isomorphic"])), "d")
    add("allocation-isomorphic-kept", "and kept more: {0.588 / 0.598} of the MACs", al,
        lambda d: [r["macs_fraction"] for r in d["digits"]["runs"]["isomorphic"] if r["macs_fraction"] > 0.58],
        joined(".3f"))
    add("allocation-reduced-fid", "(FID {1.25} / {1.34} / {1.17})", alr,
        tuple(f"digits/table/{a}/fid/mean" for a in ("uniform", "global", "isomorphic")), ".2f")

    def dit_widths(d: dict, alloc: str, layer: str) -> tuple:
        w = [v for k, v in d["dit"]["rows"][alloc]["widths"].items() if k.endswith(layer)]
        return span([k for k, _ in w]), span([t for _, t in w])

    add("allocation-dit-global", "global moves width into attention ({44-52} of {64} head dims) and out of the MLPs "
        "({112-126} of {256})", al, lambda d: dit_widths(d, "global", "attn1.to_q") + dit_widths(d, "global",
                                                                                               "ff.net.0.proj"))
    add("allocation-dit-uniform", "where uniform keeps {36}/{64} and {144}/{256} everywhere", al,
        lambda d: dit_widths(d, "uniform", "attn1.to_q") + dit_widths(d, "uniform", "ff.net.0.proj"))
    st = "allocation_search_timing.json"

    def timing(arch: str) -> Callable:
        def f(d: dict) -> tuple:
            u, g = d[arch]["uniform"], d[arch]["global"]
            return (g["scores_s"], g["search_s"], g["candidates"], u["search_s"], u["candidates"],
                    (g["scores_s"] + g["search_s"]) / u["search_s"])

        return f

    add("allocation-timing-cifar10", "CIFAR-10 UNet global {0.85} s of scores + {2.0} s of search vs {1.4} s uniform "
        "search ({2.0}x)", st, lambda d: tuple(timing("cifar10-ddpm-unet")(d)[i] for i in (0, 1, 3, 5)),
        (".2f", ".1f", ".1f", ".1f"))
    add("allocation-timing-sd15", "SD v1.5 UNet (bf16) {32.9} s + {24.2} s, {13} candidates, vs {15.9} s, {8} "
        "candidates ({3.6}x)", st, timing("sd-v1.5-unet"), (".1f", ".1f", "d", ".1f", "d", ".1f"))
    add("allocation-timing-date", "--search-timing cifar10-ddpm-unet|sd-v1.5-unet --threads {2}`, random weights, "
        "{2026-12-02},", st, ("cifar10-ddpm-unet/threads", "cifar10-ddpm-unet/date"), ("d", "s"))

    section = "Table 1 on the digits teacher"
    add("table1-protocol", "the same post-training ({300} steps = {15}% of the teacher's {2000},", T1,
        lambda d: (d["meta"]["finetune_steps"], 100 * d["meta"]["finetune_fraction"], d["meta"]["teacher_steps"]),
        ("d", ".0f", "d"))
    add("table1-samples", "seeds; {500} samples per model, DDIM {100} steps, eta 0", T1,
        ("meta/num_images", "meta/sample_steps"), "d")
    add("table1-seed0-date", "**Seed 0 with this code** ({2026-12-01}: SSIM", T1, "meta/date")
    both = (T1, T1_OLD)
    seed0 = {
        "teacher": ("teacher", "| teacher | {1.00} | {0.0154} | {1.000} | {1.000} | {-} | {-} |"),
        "scratch-same": ("scratch (same budget)",
                         "| scratch (same budget) | {8.49} | {0.2551} | {0.757} | {0.686} | {-} | {1.9} |"),
        "scratch-teacher": ("scratch (teacher budget)", "| scratch (teacher budget, 2000 steps) | {1.13} | {0.0150} "
                            "| {0.951} | {0.949} | {-} | {2.0} |"),
        "random": ("random", "| random | {1.77} | {0.0380} | {0.913} | {0.910} | {-} | {2.0} |"),
        "magnitude": ("magnitude", "| magnitude | {1.57} | {0.0300} | **{0.925}** | {0.925} | {-} | {2.1} |"),
        "taylor": ("taylor (all steps)",
                   "| taylor (all steps) | {1.82} | {0.0433} | {0.907} | {0.912} | {1000} | {388} |"),
        "thr0.02": ("diff-pruning thr=0.02",
                    "| diff-pruning thr=0.02 | {1.64} | {0.0337} | {0.915} | {0.916} | {567} | {496} |"),
        "thr0.05": ("diff-pruning thr=0.05",
                    "| diff-pruning thr=0.05 | {1.62} | {0.0350} | {0.914} | {0.915} | {442} | {394} |"),
    }
    row_fmt = (".2f", ".4f", fmt3, fmt3, "s", "s")
    for cid, (row, fragment) in seed0.items():
        add(f"table1-seed0-{cid}", fragment, both, t1_seed0(row), row_fmt)
    # thr 0.10 and fast: their previous-code SSIM is in no file (the README prints "-").
    add("table1-seed0-thr0.00", "| diff-pruning thr=0.00 | {1.63} | {0.0385} | {0.914} | {0.918} | {1000} | {779} |",
        both, t1_seed0("diff-pruning thr=0.00"), row_fmt)
    add("table1-seed0-thr0.10", "| diff-pruning thr=0.10 | {1.67} | {0.0341} | {0.918} |", both,
        t1_seed0("diff-pruning thr=0.10", prev=False, tail=False), row_fmt[:3])
    add("table1-seed0-thr0.10-tail", "| {270} | {247} | | diff-pruning thr=0.05, fast estimator |", T1,
        lambda d: t1_seed0("diff-pruning thr=0.10", prev=False)(d, {})[3:])
    add("table1-seed0-fast", "| diff-pruning thr=0.05, fast estimator | **{1.53}** | **{0.0294}** | {0.921} |", both,
        t1_seed0("diff-pruning thr=0.05, fast estimator", prev=False, tail=False), row_fmt[:3])
    add("table1-seed0-fast-tail", "| {391} | {18} | Every seed-0 model", T1,
        lambda d: t1_seed0("diff-pruning thr=0.05, fast estimator", prev=False)(d, {})[3:])
    add("table1-seed0-magnitude-best", "with magnitude again highest at {0.925})", T1,
        lambda d: max((d["table"][r]["ssim"]["mean"], r) for r in PRUNED_300)[0]
        if max(PRUNED_300, key=lambda r: d["table"][r]["ssim"]["mean"]) == "magnitude" else "(not magnitude)",
        lambda v: v if isinstance(v, str) else format(v, fmt3))

    add("table1-3seed-header", "**{3} seeds, {2026-11-27}** (previous code;", T1_OLD, ("meta/seeds", "meta/date"),
        ("d", "s"))
    add("table1-3seed-calibration", "mean ± std over seeds (calibration batch of {64},", T1_OLD,
        "meta/budget/calibration_batch", "d")
    rows3 = {
        "teacher": "| teacher | {1} | {1.623M} | {94.6M} | {1.00} | {1.00} | {0.0154} | {1.000} | {-} | {-} | {-} |",
        "scratch (same budget)": "| scratch (same budget) | {3} | {0.922M} | {53.4M} | {1.17 ± 0.04} | {8.25 ± 0.58} "
        "| {0.2554 ± 0.0236} | {0.717 ± 0.034} | {300} | {-} | {3.6 ± 0.8} |",
        "scratch (teacher budget)": "| scratch (teacher budget) | {3} | {0.922M} | {53.4M} | {1.10 ± 0.05} | "
        "{1.21 ± 0.13} | {0.0200 ± 0.0059} | {0.941 ± 0.008} | {2000} | {-} | {7.7 ± 2.6} |",
        "random": "| random | {3} | {0.922M} | {53.4M} | {1.12 ± 0.05} | {1.64 ± 0.26} | {0.0346 ± 0.0056} | "
        "{0.913 ± 0.006} | {300} | {-} | {4.3 ± 1.7} |",
        "magnitude": "| magnitude | {3} | {0.922M} | {53.4M} | {1.16 ± 0.06} | {1.50 ± 0.15} | {0.0291 ± 0.0037} | "
        "{0.926 ± 0.003} | {300} | {-} | {5.1 ± 1.3} |",
        "taylor (all steps)": "| taylor (all steps) | {3} | {0.922M} | {53.4M} | {1.22 ± 0.03} | {1.63 ± 0.16} | "
        "{0.0362 ± 0.0061} | {0.917 ± 0.006} | {300} | {1000} | {818.3 ± 146.8} |",
        "diff-pruning thr=0.00": "| diff-pruning thr=0.00 | {3} | {0.922M} | {53.4M} | {1.18 ± 0.04} | "
        "{1.59 ± 0.11} | {0.0346 ± 0.0047} | {0.921 ± 0.004} | {300} | {1000} | {817.8 ± 146.0} |",
        "diff-pruning thr=0.02": "| diff-pruning thr=0.02 | {3} | {0.922M} | {53.4M} | {1.19 ± 0.03} | "
        "{1.60 ± 0.13} | {0.0330 ± 0.0037} | {0.920 ± 0.004} | {300} | {570 ± 4} | {396.4 ± 6.4} |",
        "diff-pruning thr=0.05": "| diff-pruning thr=0.05 | {3} | {0.922M} | {53.4M} | {1.19 ± 0.02} | "
        "{1.58 ± 0.14} | {0.0333 ± 0.0042} | {0.920 ± 0.005} | {300} | {457 ± 14} | {306.6 ± 11.4} |",
        "diff-pruning thr=0.10": "| diff-pruning thr=0.10 | {3} | {0.922M} | {53.4M} | {1.20 ± 0.03} | "
        "{1.54 ± 0.17} | {0.0322 ± 0.0043} | {0.920 ± 0.008} | {300} | {264 ± 5} | {169.6 ± 2.5} |",
        "diff-pruning thr=0.05, fast estimator": "| diff-pruning thr=0.05, fast estimator | {3} | {0.922M} | {53.4M} "
        "| {1.24 ± 0.14} | {1.44 ± 0.15} | {0.0284 ± 0.0034} | {0.922 ± 0.008} | {300} | {443 ± 50} | {56.4 ± 5.3} |",
    }
    for row, fragment in rows3.items():
        add(f"table1-3seed-{row}", fragment, T1_OLD, t1_row(row), T1_ROW_FMT)
    add("table1-3seed-notes", "{- scratch (same budget): fid differs from diff-pruning thr=0.05 by +6.6743 (beyond the "
        "spread) - scratch (same budget): ssim differs from diff-pruning thr=0.05 by -0.2036 (beyond the spread) - "
        "scratch (teacher budget): fid differs from diff-pruning thr=0.05 by -0.3669 (beyond the spread) - scratch "
        "(teacher budget): ssim differs from diff-pruning thr=0.05 by +0.0210 (beyond the spread)}", T1_OLD,
        "spread_notes", lambda notes: " ".join(f"- {n}" for n in notes))
    add("table1-3seed-ssim-range", "(teacher {1.00}) and SSIM {0.91}-{0.93};", T1_OLD,
        lambda d: (d["table"]["teacher"]["fid"]["mean"], min(d["table"][r]["ssim"]["mean"] for r in PRUNED_300),
                   max(d["table"][r]["ssim"]["mean"] for r in PRUNED_300)), ".2f")
    add("table1-3seed-ssim-magnitude", "SSIM: magnitude {0.926} ± {0.003}, Diff-Pruning thr 0.05 {0.920} ± {0.005}",
        T1_OLD, tuple(f"table/{r}/ssim/{s}" for r in ("magnitude", "diff-pruning thr=0.05") for s in ("mean", "std")),
        fmt3)
    add("table1-quick-budget", "at the quick budget ({2}% post-training, below)", T1_QUICK,
        lambda d: 100 * d["meta"]["finetune_fraction"], ".0f")

    def cost_share(d: dict) -> tuple:
        t = d["table"]
        all_steps = t["diff-pruning thr=0.00"]["prune_wall_s"]["mean"]
        shares = [t[f"diff-pruning thr={x}"]["prune_wall_s"]["mean"] / all_steps for x in ("0.02", "0.05", "0.10")]
        return 100 * min(shares), 100 * max(shares)

    add("table1-3seed-cost-share", "at {21}-{48}% of the calibration cost", T1_OLD, cost_share, ".0f")
    fast, exact = "table/diff-pruning thr=0.05, fast estimator", "table/diff-pruning thr=0.05"
    add("table1-3seed-fast", "fast estimator row ({3} seeds, {56} s of calibration instead of {307} s) has FID "
        "{1.44} ± {0.15} and SSIM {0.922} ± {0.008} against the exact thr 0.05 row's {1.58} ± {0.14} and "
        "{0.920} ± {0.005}.",
        T1_OLD, (f"{fast}/fid/n", f"{fast}/prune_wall_s/mean", f"{exact}/prune_wall_s/mean", f"{fast}/fid/mean",
                 f"{fast}/fid/std", f"{fast}/ssim/mean", f"{fast}/ssim/std", f"{exact}/fid/mean", f"{exact}/fid/std",
                 f"{exact}/ssim/mean", f"{exact}/ssim/std"),
        ("d", ".0f", ".0f", ".2f", ".2f", fmt3, fmt3, ".2f", ".2f", fmt3, fmt3))
    add("table1-3seed-scratch-same", "is far behind (FID {8.25}, SSIM {0.717})", T1_OLD,
        ("table/scratch (same budget)/fid/mean", "table/scratch (same budget)/ssim/mean"), (".2f", fmt3))
    add("table1-3seed-scratch-teacher", "300-step model (FID {1.21}, SSIM {0.941})", T1_OLD,
        ("table/scratch (teacher budget)/fid/mean", "table/scratch (teacher budget)/ssim/mean"), (".2f", fmt3))
    add("table1-3seed-compute-saved", "pruning saves {85}% of the training compute", T1_OLD,
        lambda d: 100 * (1 - d["meta"]["finetune_fraction"]), ".0f")
    add("table1-quick-protocol", "The quick budget ({40} post-training steps, {200} samples, DDIM {20}; "
        "`--quick --seeds {3}`, `benchmarks/results/table1_quick.md`, {2026-11-27}, previous code)", T1_QUICK,
        ("meta/finetune_steps", "meta/num_images", "meta/sample_steps", "meta/seeds", "meta/date"),
        ("d", "d", "d", "d", "s"))
    add("table1-quick-fid", "(digits-FID {2.29}-{2.39} vs {3.28}-{3.36} for magnitude and random)", T1_QUICK,
        lambda d: (*sorted(d["table"][r]["fid"]["mean"] for r in ("diff-pruning thr=0.02", "diff-pruning thr=0.05")),
                   *sorted(d["table"][r]["fid"]["mean"] for r in ("magnitude", "random"))), ".2f")

    section = "Where Diff-Pruning wins (budget curve, fast vs exact truth)"
    bc = "budget_curve.json"
    add("budget-protocol", "post-trained with Table 1's recipe for {20 / 40 / 100 / 300} of the teacher's {2000} steps "
        "({1 / 2 / 5 / 15}%), {3} seeds; REDUCED evaluation protocol ({200} samples, DDIM {20})", bc,
        lambda d: (d["meta"]["post_train_steps"], d["meta"]["teacher_steps"],
                   [100 * f for f in d["meta"]["budget"]["fractions"]], d["meta"]["budget"]["seeds"],
                   d["meta"]["budget"]["num_images"], d["meta"]["budget"]["sample_steps"]),
        (joined("d"), "d", joined(".0f"), "d", "d", "d"))
    add("budget-dates", "--sample-steps 20`, {2026-12-01}, AMD EPYC (2 cores).", bc,
        "meta/row_provenance/random/date")
    add("budget-taylor-date", "--merge --report-only --work runs/budget_curve_taylor`, {2026-12-02}, Intel Xeon", bc,
        "meta/row_provenance/taylor (all steps)/date")
    add("budget-header", "| digits-FID (mean ± std, {3} seeds; teacher {0.83}) |", bc,
        ("meta/budget/seeds", "teacher/fid"), ("d", ".2f"))
    labels = {"random": "random", "magnitude": "magnitude", "taylor (all steps)": "Taylor (all steps)",
              "diff-pruning thr=0.05": "Diff-Pruning thr 0.05, exact", "scratch": "scratch"}
    cells4 = "| {%s} | {%s} | {%s} | {%s} |"
    for row, label in labels.items():
        add(f"budget-{row}", f"| {label} " + cells4 % _BUDGET_LITERALS[row], bc, budget_row(row), pm(".2f"))
    add("budget-diff-pruning thr=0.05, fast", "| Diff-Pruning thr 0.05, fast | {2.68 ± 0.56} | **{2.31 ± 0.32}** | "
        "{2.96 ± 0.78} | **{1.25 ± 0.21}** |", bc, budget_row("diff-pruning thr=0.05, fast"), pm(".2f"))

    def lead(d: dict, method: str, steps: str) -> dict:
        return d["fid_lead"][method][steps]

    add("budget-lead-largest", "Diff-Pruning's lead is largest at **{40} steps ({2}%)**", bc,
        lambda d: (lambda s: (s, 100 * s / d["meta"]["teacher_steps"]))(max(
            d["meta"]["post_train_steps"], key=lambda s: lead(d, "diff-pruning thr=0.05, fast", str(s))["fid_margin"])),
        ("d", ".0f"))
    add("budget-lead-40", "(by {0.97} FID over magnitude, spread {0.70}); exact leads by {0.65}, within its spread", bc,
        lambda d: (lead(d, "diff-pruning thr=0.05, fast", "40")["fid_margin"],
                   lead(d, "diff-pruning thr=0.05, fast", "40")["spread"],
                   lead(d, "diff-pruning thr=0.05", "40")["fid_margin"]), ".2f")
    first = 20
    add("budget-steps-to-fid+2", "fast {<= 20} steps, exact {29}, magnitude {108} (fast saves {>= 88} steps, {82}%; "
        "exact {79}, {73}%)", bc, budget_savings, (at_most(first), ".0f", ".0f", "s", ".0f", ".0f", ".0f"))
    add("budget-steps-to-fid+1", "To FID + 1: fast {207}, Taylor {224}, exact {230}, magnitude {234}.", bc,
        lambda d: tuple(steps_to(d, "teacher + 1.0", m) for m in
                        ("diff-pruning thr=0.05, fast", "taylor (all steps)", "diff-pruning thr=0.05", "magnitude")),
        ".0f")
    add("budget-taylor-rank", "({last} at 20 steps, {4}th of {5} at 40)", bc, budget_ranks, ("s", "d", "d"))
    add("budget-not-run", "the 50% budget ({700} more steps for each of {18} runs", bc,
        lambda d: (d["meta"]["teacher_steps"] // 2 - d["meta"]["post_train_steps"][-1],
                   len(d["table"]) * d["meta"]["budget"]["seeds"]), "d")
    add("budget-not-run-protocol", "Table 1's evaluation protocol ({500} samples, DDIM {100}: {12.5}x the sampling of "
        "{72} evaluations)", (bc, T1),
        lambda b, t: (t["meta"]["num_images"], t["meta"]["sample_steps"],
                      t["meta"]["num_images"] * t["meta"]["sample_steps"]
                      / (b["meta"]["budget"]["num_images"] * b["meta"]["budget"]["sample_steps"]),
                      len(b["table"]) * b["meta"]["budget"]["seeds"] * len(b["meta"]["post_train_steps"])),
        ("d", "d", ".1f", "d"))
    add("truth-setup", "--truth --seeds {6}`, {2026-12-01}, AMD EPYC; `benchmarks/results/importance_cost.json`, key "
        "`truth`): the truth for seed s is the mean of the other {5} exact sweeps ({5} x {64} calibration images,", ic,
        lambda d: (d["truth"]["meta"]["seeds"], d["truth"]["meta"]["date"], d["truth"]["meta"]["seeds"] - 1,
                   d["truth"]["meta"]["seeds"] - 1, d["truth"]["meta"]["exact_batch"]), ("d", "s", "d", "d", "d"))
    vt, fme = "truth/vs_truth", "truth/fast_minus_exact"
    add("truth-iou", "fast **{0.891} ± {0.009}** vs exact-64 {0.866} ± {0.013} (paired {+0.025} ± {0.015}, fast closer "
        "on {6} of {6} seeds)", ic,
        lambda d: (*(get(d, p) for p in (f"{vt}/fast iou/mean", f"{vt}/fast iou/std", f"{vt}/exact iou/mean",
                                         f"{vt}/exact iou/std", f"{fme}/iou/mean", f"{fme}/iou/std")),
                   *truth_counts(d, "iou")), (fmt3, fmt3, fmt3, fmt3, "+.3f", fmt3, "d", "d"))
    add("truth-spearman", "Spearman of group scores {0.917} vs {0.899} (paired {+0.018} ± {0.012}, {5} of {6}), at "
        "{10}% of the gradient evaluations", ic,
        lambda d: (*(get(d, p) for p in (f"{vt}/fast spearman/mean", f"{vt}/exact spearman/mean",
                                         f"{fme}/spearman/mean", f"{fme}/spearman/std")),
                   *truth_counts(d, "spearman"),
                   100 * get(d, "truth/cost/fast/sample_gradient_evals/mean")
                   / get(d, "truth/cost/exact/sample_gradient_evals/mean")),
        (fmt3, fmt3, "+.3f", fmt3, "d", "d", ".0f"))

    section = "Which timesteps to score: the kept-range ablation"
    ts, ts_old = "threshold_sweep.json", "2026-11-27/threshold_sweep.json"
    add("kept-range-setup", "(2026-12-01, this machine, shared with one other benchmark; {17} min)", ts,
        lambda d: d["meta"]["wall_time_s"] / 60, ".0f")
    add("kept-range-date", "`python benchmarks/threshold_sweep.py --seeds {1}` ({2026-12-01}, this machine", ts,
        ("meta/budget/seeds", "meta/date"), ("d", "s"))
    add("kept-range-protocol", "no post-training, {128} samples (DDIM {50}) paired with the teacher's by noise; "
        "calibration batch {64}, seed 0.", ts,
        ("meta/budget/num_images", "meta/budget/sample_steps", "meta/budget/calibration_batch"), "d")
    add("kept-range-k", "| k | {5 | 10 | 25 | 50 | 100 | 200 | 300 | 400 | 500 | 600 | 800 | 1000} |", ts,
        "meta/budget/prefixes", joined("d", " | "))
    add("kept-range-ssim", "| SSIM vs teacher | {0.229} | {0.242} | **{0.279}** | {0.278} | {0.254} | {0.163} | "
        "{0.158} | {0.164} | {0.170} | {0.170} | {0.177} | {0.238} |", ts, ts_row, fmt3)
    add("kept-range-ssim-previous", "| same images, previous SSIM code | {0.202} | {0.217} | {0.347} | {0.346} | "
        "{0.316} | {0.257} | {0.281} | {0.284} | {0.299} | {0.298} | {0.319} | {0.270} |", ts_old, ts_row, fmt3)
    thr = ("0.02", "0.05", "0.1")
    add("kept-range-threshold", "keeps t = 0..{566} / 0..{441} / 0..{269} for thr 0.02 / 0.05 / 0.10 (SSIM {0.169} / "
        "{0.167} / {0.173}; previous code {0.296} / {0.287} / {0.263},", (ts, ts_old),
        lambda n, o: (*(n["summary"]["threshold"][t]["cut"]["mean"] for t in thr),
                      *(n["summary"]["threshold"][t]["ssim"]["mean"] for t in thr),
                      *(o["summary"]["threshold"][t]["ssim"]["mean"] for t in thr)), (".0f",) * 3 + (fmt3,) * 6)
    add("kept-range-magnitude-random", "magnitude {0.227}, random {0.090} at the same size", ts,
        ("summary/magnitude/ssim/mean", "summary/random/ssim/mean"), fmt3)

    def all_ssim(d: dict) -> list:
        s = d["summary"]
        return ([v["ssim"]["mean"] for v in s["prefix"].values()] + [v["ssim"]["mean"] for v in s["threshold"].values()]
                + [s["magnitude"]["ssim"]["mean"], s["random"]["ssim"]["mean"]])

    add("kept-range-max", "every pruned model is far from the teacher (SSIM <= {0.28})", ts,
        lambda d: math.ceil(max(all_ssim(d)) * 100) / 100, ".2f")
    add("kept-range-best", "a short early range (k = {25}-{50}) is best", ts,
        lambda d: tuple(sorted(sorted(d["summary"]["prefix"], reverse=True,
                                      key=lambda k: d["summary"]["prefix"][k]["ssim"]["mean"])[:2], key=int)))
    add("kept-range-below", "below magnitude pruning ({0.227}) and below using all {1000} steps ({0.238})", ts,
        lambda d: (d["summary"]["magnitude"]["ssim"]["mean"], d["meta"]["budget"]["prefixes"][-1],
                   d["summary"]["prefix"][str(d["meta"]["budget"]["prefixes"][-1])]["ssim"]["mean"]),
        (fmt3, "d", fmt3))
    add("kept-range-exact-spread", "puts the exact loop's own SSIM spread at ±{0.008} (thr {0.05})", ic,
        ("cost/exact/ssim_vs_teacher/std", "meta/threshold"), (fmt3, "g"))

    section = "Performance"
    add("importance-setup", "(`python benchmarks/importance_cost.py`, {2026-12-01}, embedded digits teacher pruned to "
        "{56}% MACs, thr {0.05}, {3} seeds, exact batch {64};", ic,
        lambda d: (d["meta"]["date"], 100 * d["meta"]["target_macs"], d["meta"]["threshold"],
                   d["meta"]["budget"]["seeds"], d["meta"]["budget"]["exact_batch"]), ("s", ".0f", "g", "d", "d"))
    add("importance-cost", "backward passes over a {512}-image pool) used **{9.9}% of the exact loop's sample-gradient "
        "evaluations and {11.2}% ± {1.2}% of its wall time** ({22} s vs {197} s per seed).", ic,
        lambda d: (d["meta"]["budget"]["pool"], 100 * d["ratios"]["evals_fast_over_exact"]["mean"],
                   100 * d["ratios"]["wall_fast_over_exact"]["mean"], 100 * d["ratios"]["wall_fast_over_exact"]["std"],
                   d["cost"]["fast"]["wall_time_s"]["mean"], d["cost"]["exact"]["wall_time_s"]["mean"]),
        ("d", ".1f", ".1f", ".1f", ".0f", ".0f"))
    agreement = {"fast vs exact, same seed": ("fast vs exact (same seed)", "{0.865} ± {0.018} | {0.872} ± {0.015}"),
                 "exact vs exact, across seeds (the exact loop's own noise)":
                     ("exact vs itself (across seeds)", "{0.872} ± {0.012} | {0.893} ± {0.013}"),
                 "fast vs fast, across seeds": ("fast vs itself (across seeds)",
                                                "**{0.902} ± {0.016}** | **{0.947} ± {0.001}**"),
                 "magnitude vs exact": ("magnitude vs exact", "{0.777} ± {0.019} | {0.627} ± {0.018}")}
    for label, (key, cells) in agreement.items():
        add(f"importance-agreement-{key}", f"| {label} | {cells} |", ic,
            tuple(f"agreement/{key}/{m}/{s}" for m in ("iou", "spearman") for s in ("mean", "std")), fmt3)
    add("importance-ssim", "fast {0.214} ± {0.033}, exact {0.195} ± {0.008}, magnitude {0.247} (the previous SSIM code "
        "gave {0.317} / {0.271} / {0.287} on the 2026-11-27 run)", (ic, "2026-11-27/importance_cost.json"),
        lambda n, o: (*(n["cost"][m]["ssim_vs_teacher"][s] for m in ("fast", "exact") for s in ("mean", "std")),
                      n["cost"]["magnitude"]["ssim_vs_teacher"]["mean"],
                      *(o["cost"][m]["ssim_vs_teacher"]["mean"] for m in ("fast", "exact", "magnitude"))), fmt3)
    add("importance-fast-vs-exact", "({0.865} vs {0.872}, inside the spread but not above it)", ic,
        ("agreement/fast vs exact (same seed)/iou/mean", "agreement/exact vs itself (across seeds)/iou/mean"), fmt3)

    lat = "latency.json"
    add("latency-setup", "--sample-repeats {2}`, {2026-11-27}, {2} threads, the other benchmark processes paused): the "
        "CIFAR-10 UNet architecture ({35.75}M params, {6.06}G MACs, random weights) against pruned copies, forward "
        "passes interleaved teacher/student, median of {12}.", lat,
        lambda d: (d["settings"]["sample_repeats"], d["date"][:10], d["threads"], d["rows"][0]["params_teacher"] / 1e6,
                   d["rows"][0]["macs_teacher"] / 1e9, d["settings"]["repeats"]), ("d", "s", "d", ".2f", ".2f", "d"))
    latency_rows = {
        "target_macs=0.7, rt=None": ("`--target-macs 0.7`", "{27.08}M | {1.44} | {1.23} ({0.85}) | {1.25} ({0.87}) | "
                                     "{1.24} ({0.86})"),
        "target_macs=0.7, rt=16": ("`--target-macs 0.7 --round-to 16`", "{26.92}M | {1.45} | {1.26} ({0.87}) | "
                                   "{1.40} ({0.97}) | {1.36} ({0.94})"),
        "target_macs=0.56, rt=None": ("`--target-macs 0.56`", "{20.20}M | {1.77} | {1.52} ({0.86}) | {1.46} ({0.82}) | "
                                      "{1.70} ({0.96})"),
        "target_macs=0.56, rt=16": ("`--target-macs 0.56 --round-to 16`", "{20.13}M | {1.78} | {1.47} ({0.83}) | "
                                    "{1.91} ({1.08}) | {1.67} ({0.94})"),
        "ratio=0.3, paper, rt=None": ("`--ratio 0.3 --ratio-rule paper`", "{19.85}M | {1.79} | {1.48} ({0.83}) | "
                                      "{1.81} ({1.01}) | {1.70} ({0.95})"),
        "ratio=0.3, paper, rt=16": ("`--ratio 0.3 --ratio-rule paper --round-to 16`", "{19.79}M | {1.79} | "
                                    "{1.46} ({0.81}) | {1.66} ({0.93}) | {1.60} ({0.90})"),
        "ratio=0.45, paper, rt=None": ("`--ratio 0.45 --ratio-rule paper`", "{13.34}M | {2.39} | {1.86} ({0.78}) | "
                                       "{2.19} ({0.92}) | {1.94} ({0.81})"),
    }
    for key, (label, cells) in latency_rows.items():
        add(f"latency-{key}", f"| {label} | {cells} |", lat, latency_row(key), ".2f")

    def near_56(d: dict) -> list:
        return [r for r in d["rows"] if abs(r["macs_fraction"] - 0.56) <= 0.02]

    add("latency-batch1-efficiency", "batch 1 reaches {0.81}-{0.86} (per-layer overhead", lat,
        lambda d: (min(e := [r["measured"]["forward"]["1"]["efficiency"] for r in near_56(d)]), max(e)), ".2f")
    add("latency-teacher-spread", "(the teacher's own batch-8 time varied {409}-{495} ms between rows)", lat,
        lambda d: (min(t := [r["measured"]["forward"]["8"]["teacher_ms"] for r in d["rows"]]), max(t)), ".0f")

    ft = "finetune_throughput.json"
    add("finetune-setup", "(`python benchmarks/finetune_throughput.py --steps {12} --skip {3} --micro-repeats {10}`, "
        "same run conditions, CIFAR-10 UNet, batch {8}, PNG folder)", ft,
        ("settings/steps", "settings/skip", "settings/micro_repeats", "settings/batch_size"), "d")
    add("finetune-speedup", "trains **{1.54}x** faster than the teacher per step ({0.930} vs {0.603} steps/s)", ft,
        lambda d: (d["runs"]["pruned"]["steps_per_s"] / d["runs"]["teacher"]["steps_per_s"],
                   d["runs"]["pruned"]["steps_per_s"], d["runs"]["teacher"]["steps_per_s"]), (".2f", fmt3, fmt3))
    add("finetune-overhead-now", "to {30.6} ms per step against the pre-fix loop", ft,
        lambda d: sum(d["runs"]["pruned"]["ms_per_step"][k] for k in ("optimizer", "EMA", "data", "loss check")), ".1f")
    add("finetune-alternatives", "(fused Adam {19} vs {44} ms; decoded-image cache {0.06} vs {1.2} ms per batch;", ft,
        ("alternatives/pruned/adam_fused_ms", "alternatives/pruned/adam_default_ms",
         "alternatives/data/data_png_cached_ms", "alternatives/data/data_png_ms"), (".0f", ".0f", ".2f", ".1f"))
    add("finetune-fwd-bwd-share", "forward+backward are {95}% of a CPU step", ft,
        lambda d: 100 * (lambda m: (m["forward"] + m["backward"]) / m["step"])(d["runs"]["pruned"]["ms_per_step"]),
        ".0f")
    add("finetune-prefix", "({0.930} vs {0.985} steps/s in this run)", ft,
        ("runs/pruned/steps_per_s", "runs/pruned, pre-fix loop/steps_per_s"), fmt3)

    section = "Tested versions"
    add("versions-torch-pruning", "(the committed `benchmarks/results` were produced with {1.6.0})", ("**/*.json",),
        lambda files: sorted(set().union(*(versions_found(d, "torch_pruning") for d in files.values()))),
        lambda vs: " / ".join(vs))
    section = "Estimator: the default pool"
    fp = "fast_pool.json"

    def pool(fam: str, key: str, metric: str, stat: str = "mean"):
        return lambda d: d["families"][fam]["vs_truth"][key][metric][stat]

    add("pool-digits", "teacher (kept-channel IoU {0.864} vs {0.868}, Spearman {0.892} vs {0.887}; paired", fp,
        lambda d: tuple(pool("digits", k, m)(d) for m in ("iou", "spearman") for k in ("fast pool 32", "exact-32")),
        fmt3)
    add("pool-digits-cost", "for {2709} instead of {14392} sample-gradient evaluations", fp,
        lambda d: tuple(d["families"]["digits"]["cost"][k]["sample_gradient_evals"]["mean"]
                        for k in ("fast pool 32", "exact-32")), ".0f")
    add("pool-dit", "digits (IoU {0.746} vs {0.711}, paired {+0.035} ± {0.017})", fp,
        lambda d: (pool("dit", "fast pool 32", "iou")(d), pool("dit", "exact-32", "iou")(d),
                   d["families"]["dit"]["fast_minus_exact"]["fast pool 32 - exact-32"]["iou"]["mean"],
                   d["families"]["dit"]["fast_minus_exact"]["fast pool 32 - exact-32"]["iou"]["std"]),
        (fmt3, fmt3, "+.3f", fmt3))
    add("pool-dit-64", "the DiT's best, pool 64 at IoU {0.766}", fp, pool("dit", "fast pool 64", "iou"), fmt3)
    add("pool-truth-halves", "(two disjoint halves agree at IoU {0.850} on digits, {0.738} on the DiT)", fp,
        lambda d: (d["families"]["digits"]["truth_halves"]["iou"], d["families"]["dit"]["truth_halves"]["iou"]),
        fmt3)

    section = "Supported families: flow matching (SD3), the threshold rule"
    ft = "flow_threshold.json"

    def flow(fam: str, key: str):
        return lambda d: [run["summary"][key] for run in d["families"][fam]["runs"]]

    def cut_range(thr: str):
        def values(d):
            cuts = [run["cuts"][thr]["cut"] for run in d["families"]["dit"]["runs"]]
            return min(cuts), max(cuts)
        return values

    add("flow-setup", "benchmarks/flow_threshold.py --seeds {3}`, {2026-12-06},", ft,
        lambda d: (min(d["meta"]["seeds_per_family"].values()), d["meta"]["date"]), ("d", "s"))
    add("flow-curve", "highest at the least noisy sigmas (about {1.04}: v = eps - x0, and there the noise eps cannot "
        "be predicted) and falls steadily to its minimum at the noisiest sigma (about {0.23}), so the smallest "
        "L_t / running max is {0.219}..{0.234} over {3} seeds", ft,
        lambda d: (sum(flow("sd3", "L_max")(d)) / len(flow("sd3", "L_max")(d)),
                   sum(flow("sd3", "L_last")(d)) / len(flow("sd3", "L_last")(d)),
                   min(flow("sd3", "never_cuts_below")(d)), max(flow("sd3", "never_cuts_below")(d)),
                   len(d["families"]["sd3"]["runs"])), (".2f", ".2f", fmt3, fmt3, "d"))
    add("flow-never-cuts", "the rule never cuts at thresholds {0.01}, {0.05}, {0.1} or {0.2} (every step kept)", ft,
        lambda d: tuple(thr for thr in d["meta"]["thresholds"]
                        if all(run["cuts"][str(thr)]["cut"] is None for run in d["families"]["sd3"]["runs"])), "g")
    add("flow-dit-cuts", "t = {558}-{563} / {384}-{387} / {282}-{289} / {171}-{177} for 0.01 / 0.05 / 0.1 / 0.2", ft,
        lambda d: tuple(v for thr in ("0.01", "0.05", "0.1", "0.2") for v in cut_range(thr)(d)), "d")
    add("flow-train-loss", "(now {1.76} -> {0.44})", ft,
        lambda d: (d["families"]["sd3"]["model"]["train_loss"]["first"],
                   d["families"]["sd3"]["model"]["train_loss"]["last"]), ".2f")

    section = "Supported families: full-size structure table"
    fs = "full_size.json"

    def fs_row(row: str, unit: str, scale: float):
        def values(d):
            r = d["rows"][row]
            return (r["params_before"] / scale, r["params_after"] / scale, r["params_fraction"],
                    r["macs_before"] / (scale * 1e3 if unit == "B" else 1e9), r["macs_after"] / (scale * 1e3 if unit
                    == "B" else 1e9), r["macs_fraction"])
        return values

    rows = {"sd15-0.3": "Stable Diffusion v1.5 UNet (64x64 latent, 77 tokens) | {859.5}M -> {425.4}M ({0.495}) | "
                        "{338.8}G -> {166.4}G ({0.491})",
            "dit-0.5": "DiT-XL/2 (32x32 latent) | {749.8}M -> {365.8}M ({0.488}) | {114.5}G -> {57.2}G ({0.500})",
            "dit-0.5-residual": "(hidden 1152 -> 576) | {749.8}M -> {197.7}M ({0.264}) | {114.5}G -> {28.6}G ({0.250})",
            "dit-0.3-residual": "(hidden 1152 -> 806) | {749.8}M -> {375.2}M ({0.500}) | {114.5}G -> {55.9}G ({0.488})",
            "pixart-0.5": "120 T5 tokens) | {610.9}M -> {309.6}M ({0.507}) | {542.5}G -> {271.3}G ({0.500})"}
    for row, fragment in rows.items():
        add(f"full-size-{row}", fragment, fs, fs_row(row, "M", 1e6), (".1f", ".1f", fmt3) * 2)
    big = {"sdxl-0.3": "bf16) | {2.567}B -> {1.321}B ({0.515}) | {2.990}T -> {1.464}T ({0.490}) | `--ratio 0.3`",
           "sdxl-0.5": "bf16) | {2.567}B -> {0.728}B ({0.284}) | {2.990}T -> {0.754}T ({0.252}) | `--ratio 0.5`",
           "sd3-0.3": "bf16) | {2.028}B -> {1.415}B ({0.698}) | {3.006}T -> {2.093}T ({0.696}) | `--ratio 0.3`",
           "sd3-0.5": "bf16) | {2.028}B -> {1.017}B ({0.501}) | {3.006}T -> {1.505}T ({0.501}) | `--ratio 0.5`"}
    for row, fragment in big.items():
        add(f"full-size-{row}", fragment, fs, fs_row(row, "B", 1e9), (fmt3,) * 6)
    add("full-size-sd15-rss", "e.g. {12.1} GiB / {223} s for SD 1.5, {13.0} GiB for SDXL in bf16", fs,
        lambda d: (d["rows"]["sd15-0.3"]["peak_rss_gib"], d["rows"]["sd15-0.3"]["seconds"],
                   d["rows"]["sdxl-0.3"]["peak_rss_gib"]), (".1f", ".0f", ".1f"))

    section = "Depth vs width, measured"
    dw = "depth_vs_width.json"

    def dw_row(tag: str):
        def values(d):
            r = next(r for r in d["rows"] if r["tag"] == tag)
            f = r["latency"]["forward"]
            return (r["macs_fraction"]["mean"], r["fid"]["mean"], r["fid"]["std"], r["ssim"]["mean"],
                    f["1"]["speedup"], f["8"]["speedup"])
        return values

    dw_rows = {
        "width_diff-pruning_70": "| ~70% | width, Diff-Pruning | {0.697} | {2.67} ± {0.58} | {0.921} | {1.14} | "
                                 "{1.09} |",
        "depth_diff-pruning_70": "| ~70% | depth, Diff-Pruning | {0.682} | {3.11} ± {0.56} | {0.916} | {1.49} | "
                                 "{1.41} |",
        "depth_block-influence_70": "| ~70% | depth, block influence | {0.682} | {3.76} ± {0.58} | {0.909} | {1.49} | "
                                    "{1.41} |",
        "depth_magnitude_70": "| ~70% | depth, magnitude | {0.682} | {3.78} ± {0.68} | {0.915} | {1.49} | {1.41} |",
        "depth_mid_diff-pruning_70": "| ~70% | depth + mid block, Diff-Pruning | {0.654} | {3.03} ± {0.50} | {0.912} | "
                                     "{1.71} | {1.67} |",
        "width_diff-pruning_56": "| ~56% | width, Diff-Pruning | {0.565} | {2.96} ± {0.78} | {0.919} | {1.17} | "
                                 "{1.18} |",
        "both_diff-pruning_56": "| ~56% | both, Diff-Pruning | {0.559} | {3.15} ± {0.23} | {0.911} | {1.55} | {1.50} |",
        "both_magnitude_56": "| ~56% | both, magnitude | {0.559} | {4.19} ± {0.95} | {0.909} | {1.55} | {1.50} |",
        "both_diff-pruning_56_joint": "| ~56% | both, joint split, Diff-Pruning | {0.559} | {3.00} ± {0.18} | "
                                      "{0.908} | {1.59} | {1.53} |",
    }
    for tag, fragment in dw_rows.items():
        add(f"depth-vs-width-{tag}", fragment, dw, dw_row(tag), (fmt3, ".2f", ".2f", fmt3, ".2f", ".2f"))

    dw2 = "depth_vs_width_250steps.json"

    def dw_fids(*tags):
        return lambda d: tuple(v for t in tags for v in (lambda r: (r["fid"]["mean"], r["fid"]["std"]))(
            next(r for r in d["rows"] if r["tag"] == t)))

    add("depth-vs-width-250-wall", "250 steps = 12.5%, the paper's Table 1 fraction; {1721} s", dw2,
        lambda d: d["meta"]["wall_time_s"], ".0f")
    add("depth-vs-width-250-70", "at ~70% width {1.39} ± {0.24},\n  depth (Diff-Pruning) {1.66} ± {0.31}, block "
        "influence {1.90} ± {0.35}, magnitude {1.95} ± {0.29}", dw2,
        dw_fids("width_diff-pruning_70", "depth_diff-pruning_70", "depth_block-influence_70", "depth_magnitude_70"),
        (".2f",) * 8)
    add("depth-vs-width-250-56", "at ~56% width\n  {1.34} ± {0.31}, both (sqrt) {1.69} ± {0.11}, both (joint) "
        "{1.73} ± {0.18}", dw2, dw_fids("width_diff-pruning_56", "both_diff-pruning_56", "both_diff-pruning_56_joint"),
        (".2f",) * 6)
    add("depth-vs-width-250-56-magnitude", "both (magnitude) {2.06} ± {0.17}", dw2, dw_fids("both_magnitude_56"),
        (".2f",) * 2)

    dit = "depth_vs_width_dit.json"

    def dit_row(tag: str):
        def values(d):
            r = next(r for r in d["rows"] if r["tag"] == tag)
            f = r["latency"]["forward"]
            return (r["macs_fraction"]["mean"], r["loss"]["mean"], r["latent_mse"]["mean"], r["ssim"]["mean"],
                    f["1"]["speedup"], f["8"]["speedup"])
        return values

    dit_rows = {
        "width_diff-pruning_76": "| {0.758} | width, Diff-Pruning | {0.1057} | {0.022} | {0.944} | {1.05} | {1.07} |",
        "depth_diff-pruning_76": "| {0.753} | depth (1 block), Diff-Pruning | {0.1101} | {0.086} | {0.888} | {1.26} | "
                                 "{1.30} |",
        "depth_block-influence_76": "| {0.753} | depth (1 block), block influence | {0.1118} | {0.043} | {0.886} | "
                                    "{1.26} | {1.30} |",
        "both_diff-pruning_70_joint": "| {0.694} | width, Diff-Pruning (= both, joint split) | {0.1064} | {0.030} | "
                                      "{0.937} | {1.07} | {1.08} |",
        "both_diff-pruning_70": "| {0.703} | both, sqrt split (1 block + width) | {0.1105} | {0.090} | {0.884} | "
                                "{1.26} | {1.28} |",
        "width_diff-pruning_51": "| {0.508} | width, Diff-Pruning | {0.1093} | {0.102} | {0.896} | {1.11} | {1.19} |",
        "depth_diff-pruning_56": "| {0.507} | depth (2 blocks), Diff-Pruning | {0.1172} | {0.249} | {0.801} | {1.74} | "
                                 "{1.77} |",
        "depth_block-influence_56": "| {0.507} | depth (2 blocks), block influence | {0.1218} | {0.107} | {0.780} | "
                                    "{1.74} | {1.77} |",
        "depth_magnitude_56": "| {0.507} | depth (2 blocks), magnitude | {0.1170} | {0.311} | {0.769} | {1.74} | "
                              "{1.77} |",
    }
    for tag, fragment in dit_rows.items():
        add(f"depth-vs-width-dit-{tag}", fragment, dit, dit_row(tag), (".3f", ".4f", ".3f", ".3f", ".2f", ".2f"))

    def dit_split(d):
        r = next(r for r in d["rows"] if r["tag"] == "both_diff-pruning_70_joint")
        return tuple(c["cost"] for c in r["seeds"][0]["prune"]["depth"]["split"]["candidates"])

    add("depth-vs-width-dit-joint-costs", "Taylor cost {6.06} for channels\n  alone, {9.06} with one block, {16.71} "
        "with two", dit, dit_split, (".2f", ".2f", ".2f"))
    dit2 = "depth_vs_width_dit_375steps.json"

    def dit_pair(tag: str):
        def values(short, long):
            r1, r2 = (next(r for r in d["rows"] if r["tag"] == tag) for d in (short, long))
            return tuple(r[m]["mean"] for m in ("loss", "latent_mse", "ssim") for r in (r1, r2))
        return values

    def dit_gaps(d):
        pairs = {(c["a"], c["b"]): c for c in d["comparisons"]}
        return tuple(pairs[("width_diff-pruning_51", f"depth_{m}_56")]["loss"]["mean"]
                     for m in ("diff-pruning", "block-influence", "magnitude"))

    add("depth-vs-width-dit-375-wall", "--steps 375`, {827} s, same teacher", dit2,
        lambda d: d["meta"]["wall_time_s"], ".0f")
    add("depth-vs-width-dit-375-width", "loss {0.1093} -> {0.1057}, latent MSE {0.102} -> {0.017}, SSIM {0.896} -> "
        "{0.943}", (dit, dit2), dit_pair("width_diff-pruning_51"), (".4f", ".4f", ".3f", ".3f", ".3f", ".3f"))
    add("depth-vs-width-dit-375-depth", "{0.1172} -> {0.1135}, {0.249} -> {0.074}, {0.801} -> {0.862}", (dit, dit2),
        dit_pair("depth_diff-pruning_56"), (".4f", ".4f", ".3f", ".3f", ".3f", ".3f"))
    add("depth-vs-width-dit-375-gaps", "at 0.51 by {0.0078} / {0.0112} / {0.0064}", dit2, dit_gaps, (".4f",) * 3)
    add("depth-vs-width-dit-375-magnitude", "on loss\n  and SSIM ({0.1121}, {0.869})", dit2,
        lambda d: (lambda r: (r["loss"]["mean"], r["ssim"]["mean"]))(
            next(r for r in d["rows"] if r["tag"] == "depth_magnitude_56")), (".4f", ".3f"))
    add("depth-vs-width-dit-teacher", "(teacher {0.1029}; 1.0 = predicting zero)", dit,
        lambda d: (d["teacher"]["loss"],), (".4f",))

    section = "Demo results"
    dm = "demo.json"

    def demo_row(name: str):
        return lambda d: (d["summary"]["rows"][name]["fid"], d["summary"]["rows"][name]["kid"],
                          d["summary"]["rows"][name]["ssim"])

    add("demo-teacher", "| teacher | {1.623}M | {94.6}M | {0.72} | {-0.0002} | {1.000} |", dm,
        lambda d: (d["summary"]["params"]["teacher"] / 1e6, d["summary"]["macs"]["teacher"] / 1e6,
                   *demo_row("teacher")(d)), (".3f", ".1f", ".2f", ".4f", ".3f"))
    add("demo-pruned", "| pruned, no post-training | {0.922}M | {53.4}M | {65.19} | {8.60} | {0.399} |", dm,
        lambda d: (d["summary"]["params"]["student"] / 1e6, d["summary"]["macs"]["student"] / 1e6,
                   *demo_row("pruned")(d)), (".3f", ".1f", ".2f", ".2f", ".3f"))
    add("demo-student", "| pruned + 300 steps | {0.922}M | {53.4}M | {1.29} | {0.023} | {0.936} |", dm,
        lambda d: (d["summary"]["params"]["student"] / 1e6, d["summary"]["macs"]["student"] / 1e6,
                   *demo_row("student")(d)), (".3f", ".1f", ".2f", ".3f", ".3f"))
    add("demo-times", "wall time {1042} s (prune {106} s, fine-tune {562} s, sampling {329} s, evaluation {44} s)",
        dm, lambda d: tuple(d["summary"]["wall_time_s"][k] for k in ("total", "prune", "finetune", "sample",
                                                                     "evaluate")), ".0f")
    add("demo-kept", "fast estimator ({391} of 1000 timesteps kept; {32} calibration images)", dm,
        lambda d: (d["summary"]["kept_timesteps"], d["config"]["calibration_batch"]), "d")
    add("demo-latency", "was {1.16}x against a MACs ratio of {1.77}x", dm,
        lambda d: (d["summary"]["latency_speedup"], d["summary"]["macs_speedup"]), ".2f")
    add("demo-latency-perf", "student runs {1.16}x faster at a {1.77}x MACs ratio", dm,
        lambda d: (d["summary"]["latency_speedup"], d["summary"]["macs_speedup"]), ".2f")

    section = "Pruning big models: bf16 sweep"
    sp = "sweep_precision.json"

    def prec(model: int, estimator: str, key: str):
        return lambda d: d["models"][model]["summary"][estimator][key]

    add("bf16-unet", "the kept channels agree at IoU {0.992} (exact estimator) and {0.968} (fast), but the cut "
        "moves by up to {11} timesteps (never the same cut in {2} seeds)", sp,
        lambda d: (prec(0, "exact", "kept_iou_mean")(d), prec(0, "fast", "kept_iou_mean")(d),
                   max(prec(0, e, "max_cut_shift")(d) for e in ("exact", "fast")), d["seeds"]),
        (fmt3, fmt3, "d", "d"))
    add("bf16-dit", "IoU {0.999} / {1.000} and the same (absent) cut", sp,
        lambda d: (prec(1, "exact", "kept_iou_mean")(d), prec(1, "fast", "kept_iou_mean")(d)), fmt3)
    add("bf16-grad", "differ by up to {5.9e-02} of their largest value on the UNet, {4.3e-03} on the DiT", sp,
        lambda d: tuple(max(prec(i, e, "grad_rel_difference_max")(d) for e in ("exact", "fast")) for i in (0, 1)),
        ".1e")
    add("bf16-time", "bf16 took {0.83}x the fp32 time on the UNet and {2.15}x on the DiT", sp,
        lambda d: (prec(0, "exact", "time_ratio_median")(d), prec(1, "exact", "time_ratio_median")(d)), ".2f")

    section = "Pruning big models: full-size sweep"
    fss = "full_size_sweep.json"
    add("sweep-goal-memory", "peak memory at M=1 is {0.125} of the one-batch peak", fss,
        "goals/memory_m1_vs_batch32/ratio", fmt3)
    add("sweep-goal-time", "micro-batches of 1 took {2.28}x the time of one batch of {4}", fss,
        ("goals/micro_batching_time/ratio", "goals/micro_batching_time/batch"), (".2f", "d"))
    return out


# The budget-curve rows' figures as the README prints them (the fast row, with its bold cells, is written out above).
_BUDGET_LITERALS = {
    "random": ("3.95 ± 0.41", "3.36 ± 0.41", "3.49 ± 1.09", "1.47 ± 0.42"),
    "magnitude": ("3.64 ± 0.77", "3.28 ± 0.38", "2.93 ± 0.44", "1.50 ± 0.23"),
    "taylor (all steps)": ("4.29 ± 0.30", "3.32 ± 0.38", "3.05 ± 0.81", "1.38 ± 0.27"),
    "diff-pruning thr=0.05": ("3.06 ± 0.71", "2.63 ± 0.59", "3.05 ± 0.62", "1.44 ± 0.11"),
    "scratch": ("162.35 ± 7.68", "113.56 ± 31.38", "21.77 ± 2.87", "5.58 ± 0.29"),
}


# ---- the check -----------------------------------------------------------------------------------------------------


@dataclass
class Result:
    claim: Claim
    readme_says: str  # the figures the README prints where the fragment's text is, or why none were found
    json_gives: str  # the figures formatted from the JSON
    rebuilt: str  # the fragment with the JSON's figures
    ok: bool
    stale: bool = False  # README and JSON agree, but the figures quoted in the claim table differ
    error: str = ""


def load(results: Path, name: str, cache: dict) -> Any:
    if "*" in name:
        paths = sorted(Path(p) for p in glob.glob(str(results / name), recursive=True))
        return {str(p.relative_to(results)): load(results, str(p.relative_to(results)), cache) for p in paths}
    if name not in cache:
        cache[name] = json.loads((results / name).read_text())
    return cache[name]


def rebuild(claim: Claim, data: list) -> list[str]:
    if callable(claim.values):
        values = claim.values(*data)
    elif isinstance(claim.values, tuple):
        values = tuple(get(data[0], p) for p in claim.values)
    else:
        values = get(data[0], claim.values)
    values = values if isinstance(values, tuple) else (values,)
    marks = claim.figures()
    if len(values) != len(marks):
        raise ValueError(f"{len(values)} values for {len(marks)} figures")
    fmts = claim.fmt if isinstance(claim.fmt, tuple) else (claim.fmt,) * len(values)
    if len(fmts) != len(values):
        raise ValueError(f"{len(fmts)} formats for {len(values)} figures")
    return [f(v) if callable(f) else format(v, f) for v, f in zip(values, fmts, strict=True)]


def fill(fragment: str, figures: list[str]) -> str:
    it = iter(figures)
    return MARK.sub(lambda _: next(it), fragment)


def readme_figures(claim: Claim, readme: str) -> str:
    """The figures the README prints at the fragment's text (its words around the figures), for the report."""
    parts = MARK.split(norm(claim.fragment))[::2]  # the text between the figures
    groups = ["([^|]{1,200}?)"] * (len(parts) - 1)
    if groups and not parts[-1]:  # a fragment that ends on a figure: take the figure up to the next blank
        groups[-1] = "(\\S+)"
    pattern = "".join(re.escape(p) + g for p, g in zip(parts, [*groups, ""], strict=True))
    match = re.search(pattern, readme)
    return " / ".join(match.groups()) if match else "(text around the figures not found)"


def check(claim: Claim, readme: str, results: Path, cache: dict) -> Result:
    literal = norm(fill(claim.fragment, claim.figures()))
    try:
        figures = rebuild(claim, [load(results, f, cache) for f in claim.files])
    except Exception as exc:  # a missing file or key, a table error: the claim fails, the others still run
        error = f"{type(exc).__name__}: {exc}"
        says = " / ".join(claim.figures()) if literal in readme else readme_figures(claim, readme)
        return Result(claim, says, "(unreadable)", "", False, error=error)
    rebuilt = norm(fill(claim.fragment, figures))
    ok = rebuilt in readme
    says = " / ".join(figures) if ok else readme_figures(claim, readme)
    return Result(claim, says, " / ".join(figures), rebuilt, ok, stale=ok and rebuilt != literal)


def run(readme_path: Path, results: Path, strict: bool = False, out=sys.stdout) -> int:
    readme = norm(readme_path.read_text())
    cache: dict = {}
    results_list = [check(c, readme, results, cache) for c in claims()]
    width = {"claim": 34, "file": 30, "says": 44, "gives": 44}

    def cut(text: str, n: int) -> str:
        return text if len(text) <= n else text[: n - 3] + "..."

    print(f"{'claim':<{width['claim']}} {'file':<{width['file']}} {'README says':<{width['says']}} "
          f"{'JSON gives':<{width['gives']}} ok", file=out)
    section = None
    for r in results_list:
        if r.claim.section != section:
            section = r.claim.section
            print(f"-- {section}", file=out)
        mark = "ok" if r.ok and not r.stale else "STALE" if r.ok else "FAIL"
        cells = zip((r.claim.id, ", ".join(r.claim.files), r.readme_says, r.json_gives), width.values(), strict=True)
        print(" ".join(f"{cut(text, n):<{n}}" for text, n in cells), mark, file=out)
    failed = [r for r in results_list if not r.ok]
    stale = [r for r in results_list if r.stale]
    n_fig = sum(len(r.claim.figures()) for r in results_list)
    for r in failed:
        why = r.error or f'JSON gives "{r.json_gives}" (README should read "{r.rebuilt}")'
        print(f"FAIL {r.claim.id} ({', '.join(r.claim.files)}): README says \"{r.readme_says}\", {why}", file=out)
    for r in stale:
        quoted = " / ".join(r.claim.figures())
        print(f"WARN {r.claim.id} ({', '.join(r.claim.files)}): README and JSON agree on \"{r.json_gives}\" but "
              f"benchmarks/check_claims.py quotes \"{quoted}\": update the claim table", file=out)
    bad = len(failed) + (len(stale) if strict else 0)
    print(f"{len(results_list)} claims, {n_fig} figures: {len(results_list) - len(failed)} match, {len(failed)} do not"
          + (f", {len(stale)} stale in the claim table" if stale else ""), file=out)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md",
                        help="the README to check (default: %(default)s)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                        help="the result folder the claims read (default: %(default)s)")
    parser.add_argument("--strict", action="store_true", help="a claim table entry out of date fails too")
    args = parser.parse_args(argv)
    return run(args.readme, args.results, strict=args.strict)


if __name__ == "__main__":
    sys.exit(main())
