"""The prune stage as a job: pipeline folder or hub id in, pruned pipeline folder out.

Reads the model, decides the size first (size_search.py: seconds, no weights touched, so an
unreachable target fails before any calibration work; a global/isomorphic allocation checks its
smallest size there and plans after the sweep, from the scores), then reads the calibration images,
runs the importance sweep (importance.py), prunes once (pruning.py), and writes atomically: the pruned
pipeline (diffusers layout + pruning.json + safetensors), `prune_config.json`, `prune_report.json`
and `loss_over_timesteps.png`. `dry_run` stops after the size: nothing read but the model, nothing written.
The data-free methods (magnitude, random, reinit) read no calibration images when `config.data` is None
(the CLI's default for them): neither images nor text encoders are loaded.

Under `accelerate launch --num_processes N` every process loads the model and the calibration batch
and sweeps its share of the micro-batches (sweep_runtime.py: losses and gradients all-reduced, so
every process holds the one-process importance); the main process alone holds the output lock,
searches the size, prunes and writes. A dry run is the main process's alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path

import torch

from ..data import batch_indices, first_batch, make_dataset
from ..errors import DiffpruneError
from ..families import family_for
from ..families.conditioning import attach_dataset, context_for, load_prompt_embeds
from ..families.latent import codec_of
from ..families.pipeline_parts import denoiser_of
from ..fsutil import atomic_dir, check_output_dir, check_output_location, output_lock, write_json_atomic
from ..io.pipeline import (
    FORMAT_NAME,
    FORMAT_VERSION,
    library_versions,
    load_pipeline,
    save_pipeline,
    to_pruned,
)
from ..io.structure import record_structure, widths
from ..plots import plot_timestep_losses
from .allocation import MAX_GROUP_RATIO, group_widths
from .complexity import count_macs_params
from .config import DEPTH_ONLY_METHODS, PruneConfig, width_rest
from .depth_split import carried_importance
from .depth_stage import influence_inputs, prune_depth
from .importance import GRADIENT_METHODS, PLOT_TAIL_POINTS, ImportanceResult, estimate, estimate_fast
from .pruning import PruneOutcome, prune_model
from .size_search import check_reachable, meta_copy, search_sizes
from .sweep_runtime import ONE_PROCESS, SweepRuntime, Workers

STAGE = PruneConfig.stage


def run_prune(config: PruneConfig, output_dir: str | Path, overwrite: bool = False,
              progress: bool = True, importance: ImportanceResult | None = None,
              revision: str | None = None, variant: str | None = None) -> dict | None:
    """Run the whole prune stage; returns the report dict (also written as prune_report.json).

    `importance` may carry a sweep already made for this config (e.g. one of
    `importance.estimate_many`'s results); it must name the same method and threshold.
    `revision` / `variant`: how `config.model` is loaded (io.load_pipeline); recorded in the report
    ("model_source") and in pruning.json's base_model. Under `accelerate launch` with several
    processes, the others share the sweep and return None; the main process returns the report.
    """
    output_dir = check_output_location(output_dir, prune_inputs(config))
    workers, device = process_group(config.device)
    with contextlib.ExitStack() as held:  # the main process holds the lock for the whole run
        on_main(workers, device, lambda: (held.enter_context(output_lock(output_dir)),
                                          check_output_dir(output_dir, overwrite, STAGE)))
        return _run_prune(config, output_dir, overwrite, progress, importance,
                          {"revision": revision, "variant": variant}, workers, device)


def process_group(device: str) -> tuple[Workers, torch.device]:
    """The processes of an `accelerate launch` (one process without it) and this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ONE_PROCESS, torch.device(device)
    from accelerate import PartialState

    state = PartialState(cpu=torch.device(device).type == "cpu")
    return Workers(state.process_index, state.num_processes), torch.device(state.device)


def on_main(workers: Workers, device: torch.device, fn):
    """`fn()` on the main process only; a DiffpruneError there is raised on every process (no hang)."""
    result, error = None, None
    if workers.is_main:
        try:
            result = fn()
        except DiffpruneError as err:
            error = err
    if workers.agree(error is not None, device):
        raise error or DiffpruneError("the main process refused this run; see its message")
    return result


def prune_inputs(config: PruneConfig) -> dict[str, str | None]:
    """Every path the prune stage reads, by option name (fsutil.check_output_location)."""
    return {"--model": config.model, "--data": config.data, "--captions": config.captions,
            "--prompt-embeds": config.prompt_embeds}


def _run_prune(config: PruneConfig, output_dir: str | Path, overwrite: bool, progress: bool,
               importance: ImportanceResult | None, source: dict, workers: Workers = ONE_PROCESS,
               device: torch.device | None = None) -> dict | None:
    start = time.perf_counter()
    device = torch.device(config.device) if device is None else device
    gradients = config.method in GRADIENT_METHODS
    if config.data is None and (gradients or config.method in DEPTH_ONLY_METHODS):
        raise DiffpruneError(f"data=None: method {config.method!r} scores on calibration images; allowed: an image "
                             "folder or 'digits' (only magnitude, random and reinit need none)")
    if importance is not None and config.structure != "width":
        raise DiffpruneError(f"a precomputed importance applies to structure 'width' only, not {config.structure!r}")
    if workers.world > 1 and not (gradients and importance is None):  # no sweep to share
        if not workers.is_main:
            return None
        workers = ONE_PROCESS  # the main process does it all, as one process
    embeds = load_prompt_embeds(config.prompt_embeds)  # a bad file fails before any model loads
    reads_data = config.data is not None
    pipe = load_pipeline(config.model, device=device, text_encoders=embeds is None and reads_data, **source)
    component, model = denoiser_of(pipe)
    family = family_for(model)
    if config.prune_residual and family.residual_prunable:  # UNets: every channel is pruned already
        raise DiffpruneError(f"prune_residual=True applies to DiT, whose residual width is protected by default; "
                             f"{type(model).__name__} prunes every channel without it; allowed: drop --prune-residual")
    # The size (or, for global/isomorphic, that it is reachable) is decided before any calibration work.
    plan = on_main(workers, device, lambda: _size_first(model, family, config, progress))
    model.requires_grad_(True)
    if not family.conditional and (config.prompt or config.captions or config.class_labels):
        raise DiffpruneError(f"--prompt/--captions/--class-labels apply to conditional models; "
                             f"{type(model).__name__} is unconditional")
    samples, cond, calibration = None, None, {"images": 0, "skipped_files": 0}  # data-free: nothing read
    if reads_data:
        samples, cond, calibration = calibration_batch(config, pipe, family, model, embeds, device)

    precomputed = importance is not None
    runtime = SweepRuntime(config.micro_batch_size, config.gradient_checkpointing, config.sweep_precision, workers)

    def sweep(m: torch.nn.Module) -> ImportanceResult:
        return _sweep(m, family, pipe.scheduler, samples, cond, config, runtime, progress)

    if importance is None:
        importance = sweep(model)
    elif importance.method != config.method or (
            config.method == "diff-pruning" and importance.threshold != config.threshold):
        raise DiffpruneError(f"the given importance was computed for method={importance.method!r} "
                             f"threshold={importance.threshold}, not for {config.method!r} {config.threshold}")
    original, depth = model, None
    joint = config.structure == "both" and config.depth_split == "joint"
    if joint:  # one sweep only: the other processes' share is done; the main process ranks, prunes, writes
        if not workers.is_main:
            return None
        workers = ONE_PROCESS
    if config.structure != "width":  # every process: the same scores give the same layers
        inputs = None if config.method not in DEPTH_ONLY_METHODS else influence_inputs(
            family, pipe.scheduler, samples, cond, config.seed, config.micro_batch_size)
        model, depth = prune_depth(model, family, config, importance, inputs)
        depth["importance"] = importance.summary()
        width = width_rest(config, depth)
        if width is not None:  # 'both': the size first (an unreachable rest fails before the second sweep)
            plan = on_main(workers, device, lambda: search_sizes(model, family, width, progress=progress))
            # 'joint': the one sweep's gradients, renamed; 'sqrt': the shallower model's own sweep
            importance = carried_importance(importance, depth["modules"]) if joint \
                else sweep(model)
    if not workers.is_main:
        return None  # its share of the sweep is done; the main process prunes and writes
    outcome = _prune_width(original, model, family, config, importance, plan, depth, progress)
    info = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "base_class": type(model).__name__,
        "base_model": {"id": _model_id(config.model), **source},
        "method": {"name": config.method, "threshold": importance.threshold, "ratio": outcome.ratio,
                   "ratio_rule": config.ratio_rule, "target_macs": config.target_macs,
                   "target_params": config.target_params, "round_to": config.round_to,
                   "calibration_images": calibration["images"],
                   "data": None if config.data is None else str(config.data), "seed": config.seed,
                   "estimator": importance.estimator, "allocation": config.allocation,
                   "prune_heads": config.prune_heads, "head_pruning_ratio": config.head_pruning_ratio,
                   "latent": codec_of(pipe) is not None,
                   "residual_pruned": family.configured(config.prune_residual).residual_prunable},
        "kept_timesteps": importance.summary()["kept_timesteps"],
        "versions": library_versions(),
    }
    if depth is not None:
        info["method"]["structure"] = config.structure
        info["depth"] = depth
    # Depth alone is a config change: the plain diffusers class, loadable without diffprune.
    pruned = outcome.model if config.structure == "depth" else to_pruned(outcome.model, info)
    setattr(pipe, component, pruned)
    pipe.register_modules(**{component: pruned})

    report = {
        "config": config.to_dict(),
        "output_dir": str(Path(output_dir).absolute()),
        "family": family.name,
        "model_source": source,
        "calibration": calibration,
        "ratio": outcome.ratio,
        "params": {"before": outcome.params[0], "after": outcome.params[1],
                   "fraction": outcome.params[1] / outcome.params[0]},
        "macs": {"before": outcome.macs[0], "after": outcome.macs[1],
                 "fraction": outcome.macs[1] / outcome.macs[0]},
        "importance": importance.summary(),
        "widths": {"before": widths(outcome.widths_before), "after": widths(outcome.widths_after)},
        "estimator": importance.estimator,
        "allocation": allocation_report(config, outcome),
        "ratio_search": outcome.search,
        "size_search": None if outcome.plan is None else outcome.plan.report(),
        "structure": config.structure,
        "depth": depth,
        # A precomputed sweep's time counts as if this run had made it (it is this run's work).
        "wall_time_s": {"importance": importance.wall_time_s, "prune": outcome.wall_time_s,
                        "total": time.perf_counter() - start + (importance.wall_time_s if precomputed else 0.0),
                        "importance_precomputed": precomputed},
        "versions": library_versions(),
    }
    with atomic_dir(output_dir, overwrite, STAGE) as tmp:
        save_pipeline(pipe.to("cpu"), tmp, portable=config.portable)
        config.save(tmp)
        if importance.losses:
            plot_timestep_losses(report["importance"], tmp / "loss_over_timesteps.png")
            report["loss_plot"] = "loss_over_timesteps.png"
        write_json_atomic(tmp / "prune_report.json", report)
    return report


def _sweep(model, family, scheduler, samples, cond, config: PruneConfig, runtime: SweepRuntime,
           progress: bool) -> ImportanceResult:
    """The calibration sweep `config` asks for (no gradients and no curve for the other methods)."""
    if config.method not in GRADIENT_METHODS:
        return ImportanceResult(config.method, config.threshold, [], [], [], None, 0, 0.0)
    if config.estimator == "fast":
        return estimate_fast(model, family, scheduler, samples, config.threshold, config.seed, progress=progress,
                             cond=cond, runtime=runtime)
    return estimate(model, family, scheduler, samples, config.method, config.threshold, config.seed,
                    progress=progress, tail_points=PLOT_TAIL_POINTS, cond=cond, runtime=runtime)


def _prune_width(original, model, family, config: PruneConfig, importance, plan, depth: dict | None,
                 progress: bool) -> PruneOutcome:
    """Width pruning of `model` to `plan` (structure 'width'; 'both': the rest of the target after depth);
    structure 'depth': the depth-pruned model as it is. Params and MACs are counted against `original`;
    widths before/after are the depth-pruned model's (its layer names; the depth record lists the rest)."""
    if depth is None:
        return prune_model(model, family, config, importance, progress=progress, plan=plan)
    start = time.perf_counter()
    macs0, params0 = count_size(original, family)
    width = width_rest(config, depth)
    if width is None:
        macs1, params1 = count_size(model, family)
        shape = record_structure(model)  # widths are those of the depth-pruned model (its layer names)
        return PruneOutcome(model, 0.0, (macs0, macs1), (params0, params1), shape, shape, [],
                            time.perf_counter() - start, None)
    outcome = prune_model(model, family, width, importance, progress=progress, plan=plan)
    return dataclasses.replace(outcome, macs=(macs0, outcome.macs[1]), params=(params0, outcome.params[1]))


def count_size(model, family) -> tuple[int, int]:
    """(MACs, params) of `model` at batch 1, counted on a weightless copy."""
    meta = meta_copy(model)
    return count_macs_params(meta, family.example_inputs(meta, device="meta"))


def _size_first(model, family, config: PruneConfig, progress: bool):
    """The size plan (uniform allocation), or None after checking a global/isomorphic target is reachable;
    None for structure depth/both (their size follows the layer scores)."""
    if config.structure != "width":
        return None
    if config.allocation == "uniform":
        return search_sizes(model, family, config, progress=progress)
    if config.ratio is None:
        check_reachable(model, family, config)
    return None


def calibration_batch(config: PruneConfig, pipe, family, model, embeds, device) -> tuple:
    """(samples in model space, their conditioning, {"images", "skipped_files"}) of the calibration batch."""
    ctx = context_for(pipe, family, model, embeds)
    size, channels = ctx.data_size()
    dataset = make_dataset(config.data, size, channels)
    attach_dataset(ctx, dataset, str(config.data), prompt=config.prompt, captions=config.captions,
                   class_labels=config.class_labels, seed=config.seed)
    images = first_batch(dataset, config.batch_size, config.seed)
    idx = batch_indices(len(dataset), config.batch_size, config.seed)
    cond = ctx.cond_for(idx, device)
    step = config.micro_batch_size or len(images)  # the autoencoder sees micro-batches too (memory)
    with torch.no_grad():  # latents for latent pipelines (posterior mean)
        samples = torch.cat([ctx.to_model_space(images[i:i + step].to(device)) for i in range(0, len(images), step)])
    return samples, cond, {"images": int(images.shape[0]), "skipped_files": getattr(dataset, "skipped", 0)}


def allocation_report(config: PruneConfig, outcome) -> dict | None:
    """prune_report.json's "allocation": how widths were spread, and each ranked group's kept/total width
    (None when no channel was pruned: structure 'depth')."""
    if outcome.plan is None:
        return None
    before, after = widths(outcome.widths_before), widths(outcome.widths_after)
    return {"mode": config.allocation, "ratio": outcome.ratio,
            "max_group_ratio": None if config.allocation == "uniform" else MAX_GROUP_RATIO,
            "groups": group_widths(outcome.plan.groups, before, after)}


def _model_id(model: str) -> str:
    path = Path(model)
    return str(path.absolute()) if path.exists() else model
