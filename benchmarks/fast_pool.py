"""The fast estimator's image pool (`diffprune prune --batch-size`, default 32) against the truth (issue 24 item 6).

`estimate_fast` became the default on evidence from a 512-image pool (importance_cost.py --truth), but
`diffprune prune`'s default --batch-size is 32, so by default its pool is 32 images. This measures the fast
estimator, exactly as `diffprune prune` calls it (its default grid stride, cut batch, pairs per pass and
passes), at pools 32, 64, 128 and 512 against a "truth", on two TRAINED families:

  * digits: the embedded digits teacher (UNet2DModel, DDPM, 1000 steps);
  * dit:    a DiT (DiTTransformer2DModel in a DiTPipeline over a tiny KL autoencoder, DDIM schedule, 1000 steps)
            trained here on the digits with `diffprune finetune --reinit --data digits` (_fast_pool_models.py),
            on the digits latents themselves (a sharp posterior; --noisy-posterior: the noise-trained one).

Protocol (importance_cost.py --truth, with the exact sweep at `prune`'s default batch): N exact sweeps
(`estimate`, thr 0.05, batch --exact-batch = 32, seeds 0..N-1, each its own images, noise and cut). The
truth for seed s is the mean of the other N-1 exact sweeps' gradient sums, so it shares no batch or noise
with the exact-32 estimate at seed s, and the fast estimates at seed s (pool P = the first P images of
seed s's permutation, so the pool-32 one holds exactly exact-32's images) are judged against the same truth.
Agreement (importance_cost.py's): kept-channel IoU at the uniform ratio that reaches 56% of the MACs
(magnitude prune; the widths do not depend on the scores) and channel-weighted per-group Spearman of the
group scores, mean +- std over seeds; the paired difference fast-P minus exact-32 at the same seed; the truth's
own noise (two disjoint halves of the sweeps). Cost: sample-gradient evaluations (images x timesteps through
backward) and wall time, measured for exact-32 and for fast at every pool; the exact sweep at batch P costs
P x (cut + 1), reported from the measured exact-32 cuts ("projected": the cut hardly depends on the batch).

    python benchmarks/fast_pool.py                       # both families, 3 seeds, 6 truth sweeps
    python benchmarks/fast_pool.py --families dit        # one family (caches let a later full run reuse it)
    python benchmarks/fast_pool.py --smoke --out DIR     # the code path in seconds (tiny random models)

Writes benchmarks/results/fast_pool.json and fast_pool.md (--out: into that folder). Trained models and
gradient sums are cached in --work (default benchmarks/.work, git-ignored), so a rerun resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from _common import machine, smoke_teacher
from _fast_pool_models import Calibration, loss_drop, trained
from _importance_truth import cached_scoring, mean_of
from bench_args import add_smoke_options, results_dir
from importance_cost import group_scores, iou, kept_sets, spearman, stats

from diffprune.cli.demo_job import embedded_teacher
from diffprune.families import family_for
from diffprune.fsutil import write_json_atomic
from diffprune.io import library_versions, load_pipeline
from diffprune.prune.importance import ImportanceResult, estimate, estimate_fast
from diffprune.prune.pruning import PruneConfig, prune_model

THRESHOLD = 0.05
TARGET_MACS = 0.56
FAMILIES = ("digits", "dit")


@dataclasses.dataclass(frozen=True)
class Budget:
    pools: tuple[int, ...]
    seeds: int  # fast seeds (and exact-32 seeds paired with them)
    truth_sweeps: int  # exact sweeps, seeds 0..N-1; the truth for seed s is the mean of the others
    exact_batch: int
    truth_seeds: tuple[int, ...] | None = None  # their seeds, if not 0..N-1

    @property
    def exact_seeds(self) -> list[int]:
        return list(self.truth_seeds) if self.truth_seeds else list(range(self.truth_sweeps))


FULL = Budget(pools=(32, 64, 128, 512), seeds=3, truth_sweeps=6, exact_batch=32)
SMOKE = Budget(pools=(4, 8), seeds=3, truth_sweeps=3, exact_batch=4)


def model_folder(name: str, smoke: bool, work: Path, out_dir: Path, sharp: bool = True) -> tuple[Path, dict]:
    if name == "digits":
        return (smoke_teacher(out_dir / "teacher") if smoke else embedded_teacher()), {}
    folder, record = trained(work, name, "smoke" if smoke else "full", sharp=sharp)
    return folder, {k: v for k, v in record.items() if k != "log"} | {"train_loss": loss_drop(record["log"])}


def run_family(name: str, budget: Budget, smoke: bool, work: Path, out_dir: Path,
               only_exact: list[int] | None = None, only_fast: bool = False, sharp: bool = True) -> dict:
    start = time.perf_counter()
    folder, training = model_folder(name, smoke, work, out_dir, sharp)
    pipe = load_pipeline(folder)
    model = getattr(pipe, "unet", None) or pipe.transformer
    model.requires_grad_(True)
    family, scheduler = family_for(model), pipe.scheduler
    calib = Calibration(pipe, family, model, folder)
    magnitude = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
    size = prune_model(model, family, PruneConfig(model=name, method="magnitude", target_macs=TARGET_MACS), magnitude,
                 progress=False)
    ratio = size.ratio
    tag = "_sharp" if name != "digits" and sharp else ""  # as trained()'s folders: no noisy-teacher sums reused
    cache = work / "fast_pool" / f"{name}{'_smoke' if smoke else ''}{tag}"
    exact = []
    for seed in [] if only_fast else only_exact or budget.exact_seeds:
        x, cond = calib.batch(budget.exact_batch, seed)
        exact.append(cached_scoring(cache, f"exact{budget.exact_batch}_s{seed}", partial(
            estimate, model, family, scheduler, x, "diff-pruning", THRESHOLD, seed=seed, progress=False, cond=cond)))
        print(f"[{name}] exact-{budget.exact_batch} seed {seed}: cut {exact[-1].cut} evals "
              f"{exact[-1].sample_gradient_evals} {exact[-1].wall_time_s:.0f}s", flush=True)
    if only_exact:
        return {}
    fast: dict[int, list[ImportanceResult]] = {}
    for pool in budget.pools:
        fast[pool] = []
        for seed in range(budget.seeds):
            x, cond = calib.batch(pool, seed)
            fast[pool].append(cached_scoring(cache, f"fast_p{pool}_s{seed}", partial(
                estimate_fast, model, family, scheduler, x, THRESHOLD, seed=seed, progress=False, cond=cond)))
            print(f"[{name}] fast pool {pool} seed {seed}: cut {fast[pool][-1].cut} evals "
                  f"{fast[pool][-1].sample_gradient_evals} {fast[pool][-1].wall_time_s:.0f}s", flush=True)
    if only_fast:
        return {}

    def judge(imp):
        return kept_sets(model, family, imp, ratio)[0], group_scores(model, family, imp)

    judged = {"exact": [judge(e) for e in exact], **{p: [judge(f) for f in fast[p]] for p in budget.pools}}
    truths = [judge(mean_of([e for j, e in enumerate(exact) if j != i])) for i in range(len(exact))]
    per_seed = []
    for i, s in enumerate(budget.exact_seeds):
        row = {"seed": s, "exact_iou": iou(judged["exact"][i][0], truths[i][0]),
               "exact_spearman": spearman(judged["exact"][i][1], truths[i][1])}
        for p in budget.pools:
            if s < budget.seeds:
                row[f"fast{p}_iou"] = iou(judged[p][s][0], truths[i][0])
                row[f"fast{p}_spearman"] = spearman(judged[p][s][1], truths[i][1])
        per_seed.append(row)
        print(f"[{name}] truth without seed {s}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                               if k != "seed"), flush=True)
    missing = [s for s in range(budget.seeds) if s not in budget.exact_seeds]
    if missing:  # a fast seed without its own exact sweep: judged against the mean of all of them (none is its)
        everything = judge(mean_of(exact))
        for s in missing:
            row = {"seed": s, "truth": f"mean of all {len(exact)} exact sweeps"}
            for p in budget.pools:
                row[f"fast{p}_iou"] = iou(judged[p][s][0], everything[0])
                row[f"fast{p}_spearman"] = spearman(judged[p][s][1], everything[1])
            per_seed.append(row)
            print(f"[{name}] truth = all exact sweeps, fast seed {s}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in row.items() if k.startswith("fast")), flush=True)
    eb = budget.exact_batch
    paired_rows = [r for r in per_seed if r["seed"] < budget.seeds and "exact_iou" in r]
    fast_rows = [r for r in per_seed if r["seed"] < budget.seeds]
    vs_truth = {f"exact-{eb}": {m: stats([r[f"exact_{m}"] for r in per_seed if "exact_iou" in r])
                                for m in ("iou", "spearman")},
                f"exact-{eb} (seeds < {budget.seeds})": {
                    m: stats([r[f"exact_{m}"] for r in paired_rows]) for m in ("iou", "spearman")}}
    paired, self_agreement = {}, {}
    pairs = [(a, b) for a in range(budget.seeds) for b in range(a + 1, budget.seeds)]
    exact_pairs = [(a, b) for a in range(len(exact)) for b in range(a + 1, len(exact))]  # all exact sweeps
    for p in budget.pools:
        vs_truth[f"fast pool {p}"] = {m: stats([r[f"fast{p}_{m}"] for r in fast_rows])
                                      for m in ("iou", "spearman")}
        paired[f"fast pool {p} - exact-{eb}"] = {
            m: stats([r[f"fast{p}_{m}"] - r[f"exact_{m}"] for r in paired_rows])
            for m in ("iou", "spearman")}
        self_agreement[f"fast pool {p}"] = {"iou": stats([iou(judged[p][a][0], judged[p][b][0]) for a, b in pairs]),
                                            "spearman": stats([spearman(judged[p][a][1], judged[p][b][1])
                                                               for a, b in pairs])}
    self_agreement[f"exact-{eb}"] = {
        "iou": stats([iou(judged["exact"][a][0], judged["exact"][b][0]) for a, b in exact_pairs]),
        "spearman": stats([spearman(judged["exact"][a][1], judged["exact"][b][1]) for a, b in exact_pairs])}
    half = len(exact) // 2
    halves = [judge(mean_of(exact[:half])), judge(mean_of(exact[half:2 * half]))]
    kept_exact = stats([len(e.kept_timesteps) for e in exact])
    cost = {f"exact-{eb}": {"sample_gradient_evals": stats([e.sample_gradient_evals for e in exact]),
                            "wall_time_s": stats([e.wall_time_s for e in exact]),
                            "cut": stats([e.cut if e.cut is not None else len(e.kept_timesteps) - 1 for e in exact]),
                            "kept_timesteps": kept_exact, "measured": True}}
    for p in budget.pools:
        cost[f"exact-{p} (projected)"] = {"sample_gradient_evals": {"mean": p * kept_exact["mean"]},
                                          "measured": False,
                                          "how": f"pool x mean kept timesteps of the measured exact-{eb} sweeps"}
        cost[f"fast pool {p}"] = {
            "sample_gradient_evals": stats([f.sample_gradient_evals for f in fast[p]]),
            "wall_time_s": stats([f.wall_time_s for f in fast[p]]),
            "cut": stats([f.cut if f.cut is not None else len(f.kept_timesteps) - 1 for f in fast[p]]),
            "kept_timesteps": stats([len(f.kept_timesteps) for f in fast[p]]), "measured": True}
    return {"vs_truth": vs_truth, "fast_minus_exact": paired, "self_agreement_across_seeds": self_agreement,
            "truth_halves": {"iou": iou(halves[0][0], halves[1][0]), "spearman": spearman(halves[0][1], halves[1][1]),
                             "sweeps_per_half": half},
            "cost": cost, "per_seed": per_seed, "verdict": verdict(budget, vs_truth, paired),
            "model": {"folder": str(folder), "class": type(model).__name__,
                      "params": sum(p.numel() for p in model.parameters()),
                      "num_train_timesteps": int(scheduler.config.num_train_timesteps), **training},
            "budget": {**dataclasses.asdict(budget), "exact_seeds": budget.exact_seeds},
            "ratio": ratio, "macs_fraction": size.macs[1] / size.macs[0],
            "params_fraction": size.params[1] / size.params[0], "wall_time_s": time.perf_counter() - start}


def verdict(budget: Budget, vs_truth: dict, paired: dict) -> list[str]:
    """Per pool: fast - exact at the same seeds (paired mean +- std), and whether it is beyond the noise."""
    lines, eb = [], budget.exact_batch
    for p in budget.pools:
        parts = []
        for m in ("iou", "spearman"):
            d = paired[f"fast pool {p} - exact-{eb}"][m]
            side = "better" if d["mean"] - d["std"] > 0 else "worse" if d["mean"] + d["std"] < 0 else "tied"
            parts.append(f"{m} {vs_truth[f'fast pool {p}'][m]['mean']:.3f} vs exact-{eb} "
                         f"{vs_truth[f'exact-{eb} (seeds < {budget.seeds})'][m]['mean']:.3f} "
                         f"(paired {d['mean']:+.3f} +- {d['std']:.3f}: {side})")
        lines.append(f"fast pool {p}: " + "; ".join(parts))
    return lines


def table(name: str, r: dict) -> str:
    m = lambda s: f"{s['mean']:.3f} +- {s['std']:.3f}"  # noqa: E731
    budget = Budget(**{k: tuple(v) if isinstance(v, list) else v for k, v in r["budget"].items()
                       if k != "exact_seeds"})
    eb = budget.exact_batch
    md = r["model"]
    lines = [f"### {name}: {md['class']}, {md['params']} params, {md['num_train_timesteps']} timesteps, "
             f"ratio {r['ratio']:.4f} (MACs {r['macs_fraction']:.3f})",
             f"truth = mean of the other {len(budget.exact_seeds) - 1} exact-{eb} sweeps (seeds "
             f"{budget.exact_seeds}); fast: seeds 0..{budget.seeds - 1}",
             "",
             "| estimator | sample-grad evals | wall s | cut | IoU vs truth | Spearman vs truth "
             "| paired IoU - exact | paired Spearman - exact | IoU across seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in [f"exact-{eb}", *[f"fast pool {p}" for p in budget.pools]]:
        c = r["cost"][key]
        v = r["vs_truth"][key]
        d = r["fast_minus_exact"].get(f"{key} - exact-{eb}")
        lines.append(f"| {key} | {c['sample_gradient_evals']['mean']:.0f} | {c['wall_time_s']['mean']:.1f} | "
                     f"{c['cut']['mean']:.0f} | {m(v['iou'])} | {m(v['spearman'])} | "
                     f"{m(d['iou']) if d else '-'} | {m(d['spearman']) if d else '-'} | "
                     f"{m(r['self_agreement_across_seeds'][key]['iou'])} |")
    lines.append("")
    projected = {p: r["cost"][f"exact-{p} (projected)"]["sample_gradient_evals"]["mean"] for p in budget.pools}
    lines.append(f"exact sweep cost at batch P (projected = P x mean kept timesteps of exact-{eb}): "
                 + ", ".join(f"P={p}: {v:.0f}" for p, v in projected.items()))
    h = r["truth_halves"]
    lines.append(f"truth noise: two disjoint {h['sweeps_per_half']}-sweep halves agree at IoU {h['iou']:.3f}, "
                 f"Spearman {h['spearman']:.3f}")
    lines += [f"- {v}" for v in r["verdict"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {FAMILIES}")
    parser.add_argument("--seeds", type=int, default=None, help="fast seeds (default 3; >= 3)")
    parser.add_argument("--truth-sweeps", type=int, default=None, help="exact sweeps (default 6; > --seeds)")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / ".work",
                        help="cache of trained models and gradient sums (git-ignored)")
    parser.add_argument("--only-exact-seeds", type=lambda v: [int(x) for x in v.split(",")], default=None,
                        metavar="S,S", help="only compute and cache these exact sweeps, then exit (run beside the "
                                            "main process to share the work)")
    parser.add_argument("--pools", type=lambda v: tuple(int(x) for x in v.split(",")), default=None, metavar="P,P",
                        help="fast estimator pools (default 32,64,128,512; smoke 4,8)")
    parser.add_argument("--only-fast", action="store_true",
                        help="only compute and cache the fast scorings, then exit (beside the main process)")
    parser.add_argument("--truth-seeds", type=lambda v: tuple(int(x) for x in v.split(",")), default=None,
                        metavar="S,S", help="the exact sweeps' seeds (default 0..N-1); a fast seed without one "
                                            "is judged against the mean of all of them, unpaired")
    parser.add_argument("--noisy-posterior", action="store_true",
                        help="the DiT trained on tiny_kl's noisy posterior samples (the teacher before 2026-12-06)")
    add_smoke_options(parser, "tiny random UNet and DiT with 20 timesteps, pools 4 and 8, exact batch 4")
    args = parser.parse_args()
    out_dir = results_dir(parser, args)
    budget = SMOKE if args.smoke else FULL
    budget = dataclasses.replace(budget, **{k: v for k, v in (("seeds", args.seeds),
                                                               ("truth_sweeps", args.truth_sweeps)) if v})
    if args.pools:
        budget = dataclasses.replace(budget, pools=args.pools)
    if args.truth_seeds:
        budget = dataclasses.replace(budget, truth_seeds=args.truth_seeds, truth_sweeps=len(args.truth_seeds))

    if budget.seeds < 3 or budget.truth_sweeps < max(3, budget.seeds):
        parser.error(f"need --seeds >= 3 and --truth-sweeps >= max(3, seeds), got {budget.seeds}, "
                     f"{budget.truth_sweeps}")
    families = [f for f in args.families.split(",") if f]
    if any(f not in FAMILIES for f in families):
        parser.error(f"--families: choose from {FAMILIES}")
    start = time.perf_counter()
    torch.manual_seed(0)
    np.random.seed(0)
    results = {f: run_family(f, budget, args.smoke, args.work, out_dir, args.only_exact_seeds, args.only_fast,
                              not args.noisy_posterior) for f in families}
    if args.only_exact_seeds or args.only_fast:
        return
    meta = {"budget": dataclasses.asdict(budget), "threshold": THRESHOLD, "target_macs": TARGET_MACS,
            **({"smoke": True} if args.smoke else {}), "date": datetime.date.today().isoformat(),
            "machine": machine(threads=True), "wall_time_s": time.perf_counter() - start,
            "command": "python benchmarks/fast_pool.py " + " ".join(
                f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, tuple) else v}"
                for k, v in vars(args).items()
                if k in ("families", "pools", "seeds", "truth_sweeps", "truth_seeds") and v)
            + (" --noisy-posterior" if args.noisy_posterior else "") + (" --smoke" if args.smoke else ""),
            "sharp_posterior": not args.noisy_posterior,
            "fast_settings": "estimate_fast defaults, as `diffprune prune --estimator fast` calls it",
            "versions": library_versions()}
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "fast_pool.json"
    data = json.loads(out.read_text()) if out.exists() and not args.smoke else {}
    data.setdefault("families", {}).update(results)
    data.setdefault("meta", {})[",".join(families)] = meta
    write_json_atomic(out, data)
    text = "\n\n".join(table(f, data["families"][f]) for f in data["families"])
    header = (f"# fast estimator pool vs truth ({meta['date']}, {meta['machine']})\n\n"
              f"threshold {THRESHOLD}, prune to {TARGET_MACS:.0%} MACs; "
              + "; ".join(f"`{m['command']}`" for m in data["meta"].values()) + "\n\n")
    (out_dir / "fast_pool.md").write_text(header + text + "\n")
    print(text)
    print(f"wrote {out} and {out_dir / 'fast_pool.md'}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
