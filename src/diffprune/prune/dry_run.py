"""What `diffprune prune` prints: the dry run (the size a config gives, without data or output) and the
summary table after a run. Dry runs of `--structure depth|both` rank the layers by magnitude (no
calibration data): the real run's layers follow `--method`'s scores (depth_stage.depth_dry_run)."""

from __future__ import annotations

import time

import torch

from ..errors import DiffpruneError
from ..families import family_for
from ..families.pipeline_parts import denoiser_of
from ..io.pipeline import load_pipeline
from ..io.structure import record_structure, widths
from .config import PruneConfig, width_rest
from .depth_stage import depth_dry_run
from .size_search import search_sizes
from .stage import count_size, process_group

# --structure depth: a result this far below its target gets a note (the unit step was too coarse)
OVERSHOOT = 0.05


def dry_run(config: PruneConfig, progress: bool = True, revision: str | None = None,
            variant: str | None = None) -> dict | None:
    """The size `config` gives (widths, params, MACs and the search), without calibration data,
    importance sweep or output: only the model is read (`revision` / `variant`: as in `run_prune`).
    Under `accelerate launch` only the main process searches (the others return None)."""
    if config.allocation != "uniform":
        raise DiffpruneError(f"--dry-run needs --allocation uniform: {config.allocation!r} widths follow the "
                             f"importance scores, known only after the calibration sweep")
    workers, _ = process_group(config.device)
    if not workers.is_main:
        return None  # the size search is one process's work
    start = time.perf_counter()
    pipe = load_pipeline(config.model, device=torch.device(config.device), text_encoders=False,  # denoiser only
                         revision=revision, variant=variant)
    _, model = denoiser_of(pipe)
    family = family_for(model)
    depth, shallow = None, model
    if config.structure != "width":
        shallow, depth = depth_dry_run(model, family, config)
    before = record_structure(shallow)  # width changes are listed on the depth-pruned model's layer names
    macs0, params0 = count_size(model, family)
    width = config if depth is None else width_rest(config, depth)
    if width is None:
        (macs1, params1), ratio, search, after = count_size(shallow, family), 0.0, None, record_structure(shallow)
    else:
        plan = search_sizes(shallow, family, width, progress=progress)
        macs1, params1, ratio, search = plan.chosen.macs, plan.chosen.params, plan.ratio, plan.report()
        after = plan.chosen.structure
    return {"config": config.to_dict(), "family": family.name, "ratio": ratio,
            "params": _before_after(params0, params1), "macs": _before_after(macs0, macs1),
            "widths": {"before": widths(before), "after": widths(after)}, "depth": depth,
            "size_search": search, "wall_time_s": {"total": time.perf_counter() - start}}


def _before_after(before: int, after: int) -> dict:
    return {"before": before, "after": after, "fraction": after / before}


def dry_run_table(result: dict, max_names: int = 3) -> str:
    """What a dry run found: the layers depth removes, every size candidate tried, params/MACs before and
    after (as `summary_table`), and the width changes grouped by (before -> after) with a few layer names each."""
    lines = depth_lines(result.get("depth"), dry=True)
    search = result["size_search"]
    if search is not None:
        what = "ratio" if search["target"] is None else f"target {search['kind']}={search['target']:.3f}"
        lines += [f"size search ({what}): {len(search['candidates'])} candidates, {search['wall_time_s']:.1f}s "
                  f"(graph {search['setup_s']:.1f}s)", f"{'ratio':>10}{'MACs':>10}{'params':>10}{'time':>9}"]
        lines += [f"{c['ratio']:>10.4f}{c['macs_fraction']:>10.3f}{c['params_fraction']:>10.3f}{c['time_s']:>8.2f}s"
                  for c in search["candidates"]]
    lines += size_rows(result)
    changes: dict[tuple[int, int], list[str]] = {}
    before, after = result["widths"]["before"], result["widths"]["after"]
    for name, width in before.items():
        if after.get(name, width) != width:
            changes.setdefault((width, after[name]), []).append(name)
    lines.append(f"widths: {sum(len(v) for v in changes.values())} of {len(before)} layers changed"
                 + (":" if changes else ""))
    for (old, new), names in sorted(changes.items()):
        more = f", ... ({len(names) - max_names} more)" if len(names) > max_names else ""
        lines.append(f"  {old:>6} -> {new:<6} {len(names):>4} layers: {', '.join(names[:max_names])}{more}")
    lines.append(f"ratio={result['ratio']:.4f} (dry run: no calibration data read, nothing written)")
    lines += [f"warning: {w}" for w in (search or {}).get("warnings", [])]
    return "\n".join(lines)


def depth_lines(depth: dict | None, dry: bool = False) -> list[str]:
    """The layers depth pruning removed (in removal order) and the config keys that changed."""
    if not depth:
        return []
    how = "magnitude order in a dry run; the run follows --method" if dry else f"{depth['method']} scores"
    lines = [f"depth: {len(depth['removed'])} of {len(depth['units'])} layer units removed ({how}): "
             f"{', '.join(depth['removed']) or 'none'}; {depth['kind']} fraction {depth['fraction']:.3f}"]
    lines += [f"  config {k}: {v['before']} -> {v['after']}" for k, v in depth["config_changes"].items()]
    target, split = depth.get("target"), depth.get("split") or {}
    if split.get("mode") is None and target is not None and depth["fraction"] < target - OVERSHOOT:
        lines.append(f"  note: whole layers overshoot the target {depth['kind']} {target:.3f} by "
                     f"{target - depth['fraction']:.3f} (the next unit is too large); --structure both fills "
                     "a target with channels")
    if split.get("mode") == "joint":
        tried, chosen = split["candidates"], split["candidates"][split["chosen"]]
        alone = tried[0]["cost"]
        lines.append(f"  split (joint): cost {chosen['cost']:.4g} of what it removes, the lowest of {len(tried)} "
                     f"splits tried (channels only: {'unreachable' if alone is None else f'{alone:.4g}'})")
    return lines


def size_rows(result: dict) -> list[str]:
    p, m = result["params"], result["macs"]
    return [f"{'':<8}{'before':>14}{'after':>14}{'after/before':>14}",
            f"{'params':<8}{p['before'] / 1e6:>13.3f}M{p['after'] / 1e6:>13.3f}M{p['fraction']:>14.3f}",
            f"{'MACs':<8}{m['before'] / 1e9:>13.4f}G{m['after'] / 1e9:>13.4f}G{m['fraction']:>14.3f}"]


def summary_table(report: dict) -> str:
    """A short fixed-width table of what pruning changed."""
    imp = report["importance"]
    kept = imp["num_kept_timesteps"] if imp["losses"] else "-"
    lines = [*depth_lines(report.get("depth")), *size_rows(report)]
    lines.append(f"method={report['config']['method']} structure={report['config']['structure']} "
                 f"ratio={report['ratio']:.4f} kept timesteps={kept} wall time={report['wall_time_s']['total']:.1f}s")
    return "\n".join(lines)
