"""Does Diff-Pruning's threshold rule ever cut on a TRAINED flow-matching model? (issue 24 item 7)

The rule sweeps t = 0, 1, ... (least noisy first), keeps a running maximum L_max of the loss and stops
at the first t with L_t < thr * L_max. For a DDPM epsilon-prediction model L_t falls towards 0 as the
noise grows (at high noise x_t is almost the noise itself), so the rule cuts. For flow matching
(Stable Diffusion 3) t indexes the scheduler's shifted training sigmas, least noisy first, and
L_t = || (eps - x0) - v(x_t, sigma_t) ||^2: at high noise x_t ~ eps, so predicting eps - x0 means
predicting x0, whose error cannot fall far below the data variance.

Two models trained here on the digits with `diffprune finetune --reinit --data digits`
(_fast_pool_models.py): an SD3-shaped transformer (StableDiffusion3Pipeline, FlowMatchEulerDiscreteScheduler
over 1000 sigmas, shift 3, one constant prompt) and, for comparison, a DiT (DiTPipeline, DDIM/DDPM
linear-beta schedule, 1000 steps, epsilon). For each, `estimate_many` runs the exact sweep over every
timestep (threshold 0: the whole curve, calibration batch 32 = `prune`'s default, seeds 0..2) and reports the
cut of the rule at thresholds 0.01, 0.05, 0.1, 0.2 (the same sweep, snapshotted where each threshold stops).
The largest threshold at which the rule never cuts is min_t L_t / max_{s<=t} L_s (`never_cuts_below`).

    python benchmarks/flow_threshold.py                    # trains (cached in --work) and sweeps, ~10 min
    python benchmarks/flow_threshold.py --smoke --out DIR  # the code path in seconds (tiny models, 20 steps)

Writes benchmarks/results/flow_threshold.json and flow_threshold.png (--out: into that folder).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch
from _common import machine
from _fast_pool_models import Calibration, loss_drop, trained
from bench_args import add_smoke_options, results_dir

from diffprune.diffusion import flow_schedule, is_flow
from diffprune.families import family_for
from diffprune.fsutil import write_json_atomic
from diffprune.io import library_versions, load_pipeline
from diffprune.plots import figure
from diffprune.prune.importance import estimate_many

THRESHOLDS = (0.01, 0.05, 0.1, 0.2)
FAMILIES = ("sd3", "dit")
BATCH = {"full": 32, "smoke": 4}
SEEDS = 3


def curve_summary(losses: np.ndarray) -> dict:
    """Shape of L_t: ends, extremes, and the ratio L_t / running max that decides every threshold's cut."""
    run_max = np.maximum.accumulate(losses)
    ratio = losses / run_max
    n = len(losses)
    deciles = {f"t={int(t)}": float(losses[int(t)]) for t in np.linspace(0, n - 1, 11)}
    return {"L_first": float(losses[0]), "L_last": float(losses[-1]), "argmax": int(losses.argmax()),
            "L_max": float(losses.max()), "argmin": int(losses.argmin()), "L_min": float(losses.min()),
            "L_last_over_L_max": float(losses[-1] / losses.max()), "never_cuts_below": float(ratio.min()),
            "never_cuts_below_at": int(ratio.argmin()), "losses_at": deciles}


def run_family(name: str, size: str, work: Path, seeds: int, use_cached: bool = False, sharp: bool = True) -> dict:
    """The sweeps of one trained model (cached in work/flow_threshold, so families can run in parallel);
    `use_cached`: the cached sweeps with the most seeds, whatever `seeds` says; `sharp`: the model trained on the
    digits latents (_fast_pool_models.trained's default; its sweeps cached apart from the noise-trained one's)."""
    tag = f"{name}_{size}{'_sharp' if sharp else ''}"
    cache = work / "flow_threshold" / f"{tag}_seeds{seeds}.json"
    cached = sorted(cache.parent.glob(f"{tag}_seeds*.json"), key=lambda p: int(p.stem.rsplit("seeds", 1)[1]))
    if use_cached and cached:
        cache = cached[-1]
    if cache.exists():
        return json.loads(cache.read_text())
    start = time.perf_counter()
    folder, record = trained(work, name, size, sharp=sharp)
    pipe = load_pipeline(folder)
    model = pipe.transformer.requires_grad_(True)
    family, scheduler = family_for(model), pipe.scheduler
    calib = Calibration(pipe, family, model, folder)
    runs = []
    for seed in range(seeds):
        x, cond = calib.batch(BATCH[size], seed)
        res = estimate_many(model, family, scheduler, x, THRESHOLDS, seed=seed, progress=False, cond=cond)
        losses = np.array([v for _, v in res[("taylor", 0.0)].losses], dtype=float)
        cuts = {str(thr): {"cut": res[("diff-pruning", thr)].cut, "cut_sigma": res[("diff-pruning", thr)].cut_sigma,
                           "kept_timesteps": len(res[("diff-pruning", thr)].kept_timesteps)} for thr in THRESHOLDS}
        runs.append({"seed": seed, "cuts": cuts, "summary": curve_summary(losses), "losses": losses.tolist(),
                     "wall_time_s": res[("taylor", 0.0)].wall_time_s})
        print(f"[{name}] seed {seed}: L_0 {losses[0]:.4f}, L_max {losses.max():.4f} at t={losses.argmax()}, "
              f"L_min {losses.min():.4f} at t={losses.argmin()}, L_last {losses[-1]:.4f}; never cuts below thr "
              f"{runs[-1]['summary']['never_cuts_below']:.3f}; cuts "
              + ", ".join(f"{t}: {c['cut']}" for t, c in cuts.items()), flush=True)
    flow = is_flow(scheduler)
    sigmas = flow_schedule(scheduler)[0].tolist() if flow else None
    result = {"model": {"class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
                      "scheduler": type(scheduler).__name__, "num_train_timesteps": len(runs[0]["losses"]),
                      "timestep_kind": "flow-sigma-index (least noisy first)" if flow else "ddpm",
                      "folder": str(folder), "train_loss": loss_drop(record["log"]),
                      **{k: v for k, v in record.items() if k not in ("log",)}},
            "calibration_batch": BATCH[size], "sigmas": sigmas, "runs": runs,
            "wall_time_s": time.perf_counter() - start}
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cache, result)
    return result


def plot(results: dict, path: Path) -> Path:
    """L_t over t (left, log scale) and L_t / running max with the thresholds (right), per family, seed 0."""
    fig = figure((10.0, 3.8), dpi=120)
    left, right = fig.subplots(1, 2)
    for i, (name, r) in enumerate(results.items()):
        for run in r["runs"]:
            losses = np.asarray(run["losses"])
            kw = dict(color=f"C{i}", lw=1.0, alpha=1.0 if run["seed"] == 0 else 0.35)
            label = f"{name} ({r['model']['timestep_kind'].split(' ')[0]})" if run["seed"] == 0 else None
            left.plot(np.arange(len(losses)), losses, label=label, **kw)
            right.plot(np.arange(len(losses)), losses / np.maximum.accumulate(losses), label=label, **kw)
    for j, thr in enumerate(THRESHOLDS):
        right.axhline(thr, color="C3", lw=0.8, ls=":", alpha=0.4 + 0.15 * j)
        right.text(0, thr, f"thr {thr}", fontsize=6, color="C3", va="bottom")
    left.set_xlabel("t (flow: sigma index, least noisy first)")
    left.set_ylabel("calibration loss L_t")
    left.set_yscale("log")
    seeds = max(len(r["runs"]) for r in results.values())
    left.set_title("L_t over the sweep" + (" (seed 0 solid, others faint)" if seeds > 1 else ", seed 0"), fontsize=9)
    right.set_xlabel("t")
    right.set_ylabel("L_t / max_{s<=t} L_s")
    right.set_yscale("log")
    right.set_title("the threshold rule cuts where this falls below thr", fontsize=9)
    left.legend(fontsize=7)
    right.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {FAMILIES}")
    parser.add_argument("--seeds", type=int, default=SEEDS, help="calibration batches / noise seeds per model")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / ".work",
                        help="cache of the trained models (git-ignored)")
    parser.add_argument("--use-cached", action="store_true",
                        help="take each family's cached sweeps in --work with the most seeds (families run apart)")
    parser.add_argument("--noisy-posterior", action="store_true",
                        help="the models trained on tiny_kl's noisy posterior samples (the teachers before 2026-12-06)")
    add_smoke_options(parser, "tiny random SD3 and DiT with 20 timesteps, batch 4, a few training steps")
    args = parser.parse_args()
    out_dir = results_dir(parser, args)
    families = [f for f in args.families.split(",") if f]
    if any(f not in FAMILIES for f in families):
        parser.error(f"--families: choose from {FAMILIES}")
    start = time.perf_counter()
    size = "smoke" if args.smoke else "full"
    results = {f: run_family(f, size, args.work, args.seeds, args.use_cached, not args.noisy_posterior)
               for f in families}
    findings = []
    for name, r in results.items():
        never = [run["summary"]["never_cuts_below"] for run in r["runs"]]
        cuts = {thr: [run["cuts"][str(thr)]["cut"] for run in r["runs"]] for thr in THRESHOLDS}
        findings.append(f"{name} ({r['model']['timestep_kind']}): the rule cuts only at thr > "
                        f"{min(never):.3f}..{max(never):.3f} (min_t L_t / running max over {len(never)} seeds); cuts "
                        + ", ".join(f"thr {thr}: {c}" for thr, c in cuts.items()))
    meta = {"thresholds": list(THRESHOLDS), **({"smoke": True} if args.smoke else {}),
            "date": datetime.date.today().isoformat(), "machine": machine(threads=True),
            "command": "python benchmarks/flow_threshold.py" + (" --smoke" if args.smoke else "")
            + f" --seeds {args.seeds}" + (" --use-cached" if args.use_cached else "")
            + (" --noisy-posterior" if args.noisy_posterior else ""), "sharp_posterior": not args.noisy_posterior,
            "seeds_per_family": {f: len(r["runs"]) for f, r in results.items()},
            "wall_time_s": time.perf_counter() - start, "versions": library_versions()}
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "flow_threshold.json"
    write_json_atomic(out, {"findings": findings, "families": results, "meta": meta})
    png = plot(results, out_dir / "flow_threshold.png")
    print("\n".join(findings))
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
