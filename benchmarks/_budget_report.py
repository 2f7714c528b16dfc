"""budget_curve.py's report: tables, steps to a target FID, leads, findings, plot; merging into old results.

`found` is what budget_curve.collect() reads from a work folder: {"teacher", "prune": name -> per-seed
records, "stages": name -> steps -> per-seed records, "verify", "commands"}. `merge_found` adds the rows
of an earlier budget_curve JSON (its per-seed records) that the work folder did not run, so one method
can be added to finished results without rerunning the others; each row keeps where and when it ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from _common import aggregate, write_text_atomic

from diffprune.fsutil import write_json_atomic

REFS = ("diff-pruning thr=0.05", "diff-pruning thr=0.05, fast")
TARGET_DELTAS = (0.5, 1.0, 2.0)  # FID targets: the teacher's FID plus these
TRUTH = Path(__file__).parent / "results" / "importance_cost.json"


def summarize(found: dict) -> dict:
    """name -> steps -> metric -> mean/std/n over seeds (rows with no finished budget left out)."""
    table = {name: {k: {m: aggregate([r[m] for r in rows]) for m in ("fid", "kid", "ssim")}
                    for k, rows in by_k.items() if rows} for name, by_k in found["stages"].items()}
    return {name: by_k for name, by_k in table.items() if by_k}


def merge_found(found: dict, meta: dict, old: dict) -> dict:
    """`found` plus the rows of `old` (a budget_curve JSON of the same protocol) that `found` lacks.

    A row with any finished budget in `found` replaces the old one whole. Each row's provenance
    (machine, date, commands) comes from `old` for the old rows and from this run for the new ones;
    the teacher's metrics stay the old ones, and this run's teacher is recorded beside them.
    """
    om = old["meta"]
    for key in ("num_images", "sample_steps", "calibration_batch"):
        if om["budget"][key] != meta["budget"][key]:
            raise SystemExit(f"cannot merge: the old results have {key} {om['budget'][key]}, this run "
                             f"{meta['budget'][key]}")
    if om["post_train_steps"] != meta["post_train_steps"] or om["budget"]["seeds"] != meta["budget"]["seeds"]:
        raise SystemExit(f"cannot merge: the old results cover steps {om['post_train_steps']} x "
                         f"{om['budget']['seeds']} seeds; pass the same --fractions and --seeds")
    new = [n for n, by_k in found["stages"].items() if any(by_k.values())]
    ran = [n for n, by_k in old["runs"].items() if any(by_k.values())]
    old_prov = om.get("row_provenance") or {n: {"machine": om["machine"], "date": om["date"],
                                                "commands": om["commands"]} for n in ran}
    prov = {n: p for n, p in old_prov.items() if n not in new}
    for n in new:  # the stage records name their machine (runs before it: the tabulating one)
        where = {r.get("machine") or meta["machine"] for rows in found["stages"][n].values() for r in rows}
        prov[n] = {"machine": ", ".join(sorted(where)), "date": meta["date"], "commands": found["commands"]}
    prov = {n: prov[n] for n in found["stages"] if n in prov}  # in the table's row order
    stages = {n: ({int(k): rows for k, rows in old["runs"][n].items()} if n in old["runs"] and n not in new
                  else by_k) for n, by_k in found["stages"].items()}
    prune = {n: (found["prune"] if n in new else old["prune"]).get(n) for n in stages}
    rerun = found["teacher"]
    teacher_check = rerun and {"this_run": rerun, "fid_minus_old": rerun["fid"] - old["teacher"]["fid"],
                               "kid_minus_old": rerun["kid"] - old["teacher"]["kid"]}
    return {"teacher": old["teacher"], "prune": {n: p for n, p in prune.items() if p}, "stages": stages,
            "verify": found["verify"] or old["identity_check"], "commands": found["commands"],
            "provenance": prov, "teacher_check": teacher_check}


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
                lead.setdefault(ref, {})[k] = {"best_other": best, "fid_margin": others[best]["fid"]["mean"]
                                               - a["fid"]["mean"], "spread": others[best]["fid"]["std"]
                                               + a["fid"]["std"]}
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
    from diffprune.plots import figure

    fig = figure((11, 4.2))
    axes = fig.subplots(1, 2)
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
        ks = sorted({k for by_k in table.values() for k in by_k})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xticks([], minor=True)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("mean over seeds, band = +- std")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cell(stat: dict, fmt: str, seeds: int) -> str:
    return (fmt.format(stat["mean"]) + (f" ± {fmt.format(stat['std'])}" if stat["n"] > 1 else "")
            + (f" (n={stat['n']})" if stat["n"] < seeds else ""))


def shown(x: float | None, r: dict, first: int) -> str:
    """A crossing as the md shows it: '> last budget' if not reached, '<= first budget' if already there."""
    return f"> {r['evaluated_up_to']}" if x is None else f"<= {first}" if x == first else f"{x:.0f}"


def metric_tables(table: dict, teacher: dict, steps: list[int], meta: dict) -> list[str]:
    lines = []
    for m, fmt in (("fid", "{:.2f}"), ("ssim", "{:.3f}"), ("kid", "{:.4f}")):
        lines += [f"**{m.upper()}** (mean ± std over seeds; teacher {fmt.format(teacher[m])})", "",
                  "| method | " + " | ".join(f"{k} steps ({k / meta['teacher_steps']:.0%})" for k in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        lines += [f"| {name} | " + " | ".join(cell(by_k[k][m], fmt, meta["budget"]["seeds"]) if k in by_k else "-"
                                              for k in steps) + " |" for name, by_k in table.items()] + [""]
    ranked = {k: sorted((n for n in table if n != "scratch" and k in table[n]),
                        key=lambda n: table[n][k]["fid"]["mean"]) for k in steps}
    lines += ["**Rank by mean FID** (1 = best; scratch left out)", "",
              "| method | " + " | ".join(f"{k} steps" for k in steps) + " |", "|---|" + "---|" * len(steps)]
    lines += [f"| {n} | " + " | ".join(str(ranked[k].index(n) + 1) if n in ranked[k] else "-" for k in steps)
              + " |" for n in table if n != "scratch"] + [""]
    return lines


def reach_table(reach: dict, table: dict, teacher: dict, first: int) -> list[str]:
    lines = ["**Post-training steps to reach the teacher's FID + 0.5 (+ 1, + 2)** (interpolated linearly in log "
             "steps between the budgets around the first one at or below the target, not measured; seed-mean "
             "curve, then each seed's own curve)", "",
             "| method | " + " | ".join(f"FID {teacher['fid'] + d:.2f}: mean curve | each seed" for d in TARGET_DELTAS)
             + " |", "|---|" + "---|---|" * len(TARGET_DELTAS)]
    return lines + [f"| {n} | " + " | ".join(
        f"{shown(reach[d][n]['mean_curve'], reach[d][n], first)} | "
        f"{', '.join(shown(x, reach[d][n], first) for x in reach[d][n]['per_seed'].values())}"
        for d in TARGET_DELTAS) + " |" for n in table] + [""]


def savings(reach: dict, first: int) -> list[str]:
    """How much post-training each Diff-Pruning row saves, against the best other pruned row, per target."""
    lines = []
    for d in TARGET_DELTAS[1:]:
        r = reach[d]
        others = {n: v["mean_curve"] for n, v in r.items() if n not in REFS and n != "scratch"}
        best = min(others, key=lambda n: np.inf if others[n] is None else others[n], default=None)
        for ref in (x for x in REFS if x in r):
            mine, theirs = r[ref]["mean_curve"], others.get(best)
            if best is None or mine is None:
                continue
            at_least = "at least " if mine == first else ""
            saved = (f"the others do not reach it by {r[best]['evaluated_up_to']}" if theirs is None else
                     f"saves {at_least}{theirs - mine:.0f} steps ({at_least}{(theirs - mine) / theirs:.0%})"
                     if theirs >= mine else f"needs {mine - theirs:.0f} more steps ({(mine - theirs) / theirs:.0%})")
            lines.append(f"- teacher FID + {d:g}: {ref} reaches it at {shown(mine, r[ref], first)} steps, the best "
                         f"other pruned row ({best}) at {shown(theirs, r[best], first)}: {saved}")
    return lines


def truth_line() -> list[str]:
    """The fast-vs-exact distance to the truth importance, from importance_cost.json's "truth" key."""
    t = json.loads(TRUTH.read_text()).get("truth") if TRUTH.exists() else None
    if not t:
        return ["- fast vs exact against the truth: not measured (no 'truth' in importance_cost.json)"]
    v, d, c = t["vs_truth"], t["fast_minus_exact"], t["cost"]
    f = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"  # noqa: E731
    share = c["fast"]["sample_gradient_evals"]["mean"] / c["exact"]["sample_gradient_evals"]["mean"]
    return [f"- fast vs exact against the truth ({t['meta']['truth']}; {t['meta']['seeds']} seeds, "
            f"importance_cost.json \"truth\", {t['meta']['date']}, {t['meta']['machine']}): kept-channel IoU "
            f"fast {f(v['fast iou'])} vs exact-64 {f(v['exact iou'])} (paired fast - exact {f(d['iou'])}); "
            f"score Spearman fast {f(v['fast spearman'])} vs exact-64 {f(v['exact spearman'])} (paired "
            f"{f(d['spearman'])}); fast uses {share:.0%} of the exact sweep's gradient evaluations"]


def row_line(table: dict, prune: dict, name: str, steps: list[int]) -> list[str]:
    """Where one baseline row (Taylor) falls: its FID and its rank among the pruned rows at each budget,
    and what its importance sweep cost."""
    if name not in table:
        return [f"- {name}: not run"]
    sweep = [r for r in prune.get(name, []) if r.get("sample_gradient_evals")]
    pruned = [n for n in table if n != "scratch"]
    at = []
    for k in (k for k in steps if k in table[name]):
        order = sorted((n for n in pruned if k in table[n]), key=lambda n: table[n][k]["fid"]["mean"])
        at.append(f"{k} steps FID {table[name][k]['fid']['mean']:.2f} (rank {order.index(name) + 1} of {len(order)})")
    cost = (f"; its importance sweep: {np.mean([r['sample_gradient_evals'] for r in sweep]):.0f} sample-gradient "
            f"evaluations, {np.mean([r['importance_wall_s'] for r in sweep]):.0f} s per seed" if sweep else "")
    return [f"- {name}: " + ", ".join(at) + cost]


def cost_by_machine(found: dict, prov: dict) -> dict:
    """machine -> post-training seconds per step and evaluation seconds per cell, as measured in the runs."""
    acc: dict = {}
    for name, by_k in found["stages"].items():
        where = prov.get(name, {}).get("machine", "?")
        for rows in by_k.values():
            for r in rows:
                a = acc.setdefault(where, {"train_s": 0.0, "cells": 0, "eval_s": 0.0})
                a["train_s"] += r["train_wall_s"]
                a["eval_s"] += r["eval_wall_s"]
                a["cells"] += 1
        for s in {r["seed"] for rows in by_k.values() for r in rows}:
            acc[where]["steps"] = acc[where].get("steps", 0) + max(k for k, rows in by_k.items()
                                                                    if any(r["seed"] == s for r in rows))
    return {m: {"train_s_per_step": a["train_s"] / a["steps"], "eval_s_per_cell": a["eval_s"] / a["cells"]}
            for m, a in acc.items() if a.get("steps")}


def not_run(found: dict, meta: dict, prov: dict) -> list[str]:
    """What the issue asked for and this run left out, with the measured costs that kept it out."""
    b, steps, total = meta["budget"], meta["post_train_steps"], meta["teacher_steps"]
    cost = cost_by_machine(found, prov)
    rows = [n for n, by_k in found["stages"].items() if any(by_k.values())]
    chains = len(rows) * b["seeds"]
    lines = []
    if 0.5 not in b["fractions"]:
        extra = total // 2 - steps[-1]
        lines.append(f"- not run: the 50% budget ({total // 2} steps): {extra} more post-training steps for each of "
                     f"the {chains} (row, seed) runs; " + "; ".join(
                         f"at {c['train_s_per_step']:.2f} s/step ({m}) "
                         f"~{chains * extra * c['train_s_per_step'] / 3600:.1f} h of one worker"
                         for m, c in cost.items()) + " (CPU time; the rows run on 2 shared cores)")
    if not meta["table1_protocol"]:
        lines.append(f"- not run: Table 1's evaluation protocol (500 samples, DDIM 100) at every budget: "
                     f"{500 * 100 / (b['num_images'] * b['sample_steps']):.1f}x the sampling of this run's "
                     f"{b['num_images']} samples x DDIM {b['sample_steps']} (" + "; ".join(
                         f"{c['eval_s_per_cell']:.0f} s per evaluation on {m}" for m, c in cost.items())
                     + f", {chains * len(steps)} evaluations): CPU time")
    return lines


def provenance_lines(prov: dict) -> list[str]:
    groups: dict = {}
    for name, p in prov.items():
        groups.setdefault((p["machine"], p["date"], tuple(p["commands"])), []).append(name)
    return [f"- rows {', '.join(names)}: ran on {m}, {d}: " + "; ".join(f"`{c}`" for c in cmds)
            for (m, d, cmds), names in groups.items()]


def write_report(found: dict, meta: dict, stem: Path) -> None:
    """budget_curve{_quick}.json / .md / .png from the finished tasks (the teacher's must be among them)."""
    steps, table, teacher, b, v = (meta["post_train_steps"], summarize(found), found["teacher"], meta["budget"],
                                   found["verify"])
    prov = found.get("provenance") or {n: {"machine": meta["machine"], "date": meta["date"],
                                           "commands": found["commands"]} for n in table}
    reach = {d: steps_to_target(found, table, steps, teacher["fid"] + d) for d in TARGET_DELTAS}
    notes, lead = compare(table)
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stem.with_suffix(".json"), {
        "table": {n: {str(k): v for k, v in by_k.items()} for n, by_k in table.items()}, "teacher": teacher,
        "steps_to_target": {f"teacher + {d}": {"fid": teacher["fid"] + d, **r} for d, r in reach.items()},
        "fid_lead": lead, "spread_notes": notes, "prune": found["prune"], "runs": found["stages"],
        "identity_check": v, "teacher_check": found.get("teacher_check"),
        "meta": {**meta, "commands": found["commands"], "row_provenance": prov}})
    plot(table, teacher, teacher["fid"] + 0.5, stem.with_suffix(".png"))
    lines = metric_tables(table, teacher, steps, meta) + reach_table(reach, table, teacher, steps[0])
    tc = found.get("teacher_check")
    lines += [f"Protocol: {b['num_images']} samples per model, DDIM {b['sample_steps']} steps, eta 0, same noise for "
              "every model; FID/KID: digits-cnn-v1 features vs the 1797 digits; SSIM vs the teacher's images. "
              + ("This is Table 1's protocol." if meta["table1_protocol"] else
                 "REDUCED from Table 1's protocol (500 samples, DDIM 100): not comparable to table1.md."),
              f"Budgets: {steps} post-training steps of the teacher's {meta['teacher_steps']}; {b['seeds']} seeds "
              "(n= marks a cell with fewer). One post-training run per (method, seed), evaluated at each budget on "
              "its way: " + (f"a fresh {v['case']} run has {'IDENTICAL' if v['identical'] else 'DIFFERENT'} weights "
                             "to the resumed one (sha256 of the EMA unet)." if v else "not checked."),
              "Where each row ran (one torch thread per worker):", *provenance_lines(prov),
              *([f"- the teacher, re-sampled by the later run: FID {tc['fid_minus_old']:+.1e}, KID "
                 f"{tc['kid_minus_old']:+.1e} from the recorded one (the table keeps the recorded one)"] if tc else []),
              f"- tabulated by `{meta['command']}`, {meta['date']}, {meta['machine']}", "", "**Findings**", ""]
    for ref, by_k in lead.items():
        k = max(by_k, key=lambda k: by_k[k]["fid_margin"])
        lines.append(f"- largest FID lead of {ref} over the best of random/magnitude/taylor: {k} steps "
                     f"({k / meta['teacher_steps']:.0%}), {by_k[k]['fid_margin']:+.2f} (spread "
                     f"{by_k[k]['spread']:.2f}, best other {by_k[k]['best_other']})")
    lines += savings(reach, steps[0]) + row_line(table, found["prune"], "taylor (all steps)", steps) + truth_line()
    lines += not_run(found, meta, prov) + ["", "**Differences beyond the seed spread**", ""]
    lines += [f"- {n}" for n in notes] or ["- no Diff-Pruning difference exceeds the seed spread"]
    write_text_atomic(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
