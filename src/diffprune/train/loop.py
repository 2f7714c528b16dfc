"""The training loop shared by `finetune` (post-training a pruned model) and `train` (a fresh UNet2DModel).

Loss: the DDPM noise-prediction loss L_t = ||target - model(x_t, t)||^2 with t ~ U{0, ..., T-1}
(`diffusion.noisy_and_target`; the target follows the scheduler's prediction type; flow-matching
schedulers (SD3): t indexes the training sigmas, x_t = (1 - sigma) x0 + sigma eps, target eps - x0, the
model called at sigma * N, see diffusion.py), plus optional
knowledge distillation from the unpruned teacher (not in the paper's main results):
- "output": + distill_weight * ||student(x_t, t) - teacher(x_t, t)||^2 on the same x_t.
- "features": + feature_weight * mean over the outputs of down_blocks[i], mid_block, up_blocks[i] of
  ||A(student feature) - teacher feature||^2, A a learnable 1x1 conv (distillation.py).
The output pipeline holds the EMA weights, since the paper evaluates EMA; raw weights stay in the
checkpoints. Resuming from a checkpoint reproduces an uninterrupted run bit for bit (on CPU).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from tqdm.auto import tqdm

from .. import diffusion
from ..errors import DiffpruneError, check_range, write_error
from ..fsutil import check_output_location, replace_dir, write_json_atomic
from .checkpoints import (
    CHECKPOINTS,
    STATE_FILE,
    STATE_VERSION,
    checkpoint_dirs,
    optimizer_to_files,
    write_checkpoint,
)
from .config import TrainingConfig
from .files import LOG_KEYS, TRAIN_LOG, discard_unresumable, export_pipeline, training_inputs
from .parts import batch_stream, derive_seed, lr_at
from .setup import Run, on_main, setup_run


def run_training(config: TrainingConfig, output_dir: str | Path, *, device: str | torch.device = "cpu",
                 resume: bool = False, overwrite: bool = False, max_steps_this_run: int | None = None,
                 progress: bool = True, tensorboard: bool = True) -> Path:
    """Train per `config` into `output_dir` (layout in the module docstring); returns output_dir.

    `max_steps_this_run` stops after that many steps with a checkpoint (resume later with
    `resume=True`); the pipeline files are written only when `config.steps` is reached.
    """
    if max_steps_this_run is not None:
        check_range("max_steps_this_run", max_steps_this_run, 1)
    output_dir = check_output_location(output_dir, training_inputs(config))  # before any work, whatever the flags
    locks = contextlib.ExitStack()  # the output-dir lock (main process), held until the run ends
    try:
        run = setup_run(config, output_dir, torch.device(device), resume, overwrite, tensorboard, locks)
    except BaseException:
        locks.close()
        raise
    acc = run.accelerator
    end = config.steps if max_steps_this_run is None else min(config.steps, run.start_step + max_steps_this_run)
    finished = False
    try:
        run_steps(run, end, progress and acc.is_main_process)
        _remove_taps(run)
        if end < config.steps:
            if acc.is_main_process:
                print(f"stopped at step {end} of {config.steps}; checkpoint in {run.work / CHECKPOINTS}; "
                      "continue with --resume")
        else:
            _check_in_sync(acc, acc.unwrap_model(run.student))
            for tracker in acc.trackers:
                tracker.finish()  # close the TensorBoard files before the folder may be renamed
            on_main(acc, lambda: _finish(run), "could not write the final pipeline")
        finished = True
    finally:
        _remove_taps(run)
        _release(run, barrier=finished)
        if not finished and acc.is_main_process:
            discard_unresumable(run.work, run.output_dir, run.existed)  # no checkpoint yet: leave nothing
        locks.close()
    return run.output_dir


def _release(run: Run, barrier: bool) -> None:
    """Free the DDP-wrapped model on every process, then end the process group.

    Destroying DDP after the group is gone, or while a peer already tore its group down, can hang
    (seen with gloo), hence free -> barrier -> end_training. No barrier after an error, which may
    have reached only some processes.
    """
    acc = run.accelerator
    run.student = run.optimizer = None
    acc.free_memory()
    gc.collect()
    if barrier:
        acc.wait_for_everyone()
    acc.end_training()


def _remove_taps(run: Run) -> None:
    student = run.accelerator.unwrap_model(run.student) if run.student is not None else None
    for tap in (run.teacher_tap, getattr(student, "tap", None)):
        if tap is not None:
            tap.remove()


def _check_in_sync(acc, model: nn.Module) -> None:
    """Every process must end with the same weights (DDP invariant); a mismatch is a bug, not bad input."""
    if acc.num_processes == 1:
        return
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64).sin()
        stats = torch.stack([flat.sum(), (flat * weights).sum()]).reshape(1, 2)
    gathered = acc.gather(stats)
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise RuntimeError(f"processes ended with different weights: {gathered.tolist()}")


def micro_batch(run: Run, batches, step: int, micro: int):
    """(x_t, t, target, cond) for one micro-step; all randomness from (seed, step, micro, rank).

    Latent pipelines train on encoded images (a posterior sample drawn from its own generator);
    conditional families look up each image's prompt / class label by dataset index, dropped
    (`cond_drops`) with probability cond_drop_prob. The teacher sees the same `cond` (step_losses).
    """
    acc, config = run.accelerator, run.config
    batch = next(batches)
    x0, idx = batch if isinstance(batch, list | tuple) else (batch, None)
    x0 = x0.to(acc.device)
    cond = None
    if run.ctx is not None and idx is not None:
        cond = run.ctx.cond_for(idx, acc.device, drop=cond_drops(config, len(idx), step, micro, acc.process_index))
    if run.ctx is not None and run.ctx.codec is not None:
        g_latent = torch.Generator().manual_seed(derive_seed(config.seed, step, micro, acc.process_index, 2))
        x0 = run.ctx.to_model_space(x0, g_latent)
    g = torch.Generator().manual_seed(derive_seed(config.seed, step, micro, acc.process_index))
    T = diffusion.num_train_timesteps(run.scheduler)
    t = torch.randint(0, T, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    torch.manual_seed(derive_seed(config.seed, step, micro, acc.process_index, 1))  # dropout
    t, noise = t.to(acc.device), noise.to(acc.device)
    x_t, target = diffusion.noisy_and_target(run.scheduler, x0, noise, t)
    return x_t, diffusion.model_timesteps(run.scheduler, t), target, cond


def cond_drops(config, n: int, step: int, micro: int, rank: int) -> list[bool] | None:
    """Which of n images lose their conditioning (the empty prompt / DiT null class): each with
    probability cond_drop_prob, from a generator of its own, so the other draws of the step (data,
    timesteps, noise, dropout) are those of a run without caption dropout; None when p = 0
    (classifier-free guidance training, Ho & Salimans 2022: p_uncond = 0.1-0.2; issue 15)."""
    p = getattr(config, "cond_drop_prob", None) or 0.0
    if p <= 0:
        return None
    g = torch.Generator().manual_seed(derive_seed(config.seed, step, micro, rank, 3))
    return (torch.rand(n, generator=g) < p).tolist()


def step_losses(run: Run, x_t, t, target, cond=None) -> dict[str, torch.Tensor]:
    """Task loss plus the chosen distillation terms (see module docstring)."""
    config = run.config
    with run.accelerator.autocast():
        pred, feats = run.student(x_t, t, cond)
    losses = {"loss_task": F.mse_loss(pred.float(), target.float())}
    distill = getattr(config, "distill", "none")
    if distill != "none":
        with torch.no_grad(), run.accelerator.autocast():
            teacher_out = run.teacher(x_t, t).sample if run.ctx is None else \
                run.ctx.family.predict(run.teacher, x_t, t, cond)
        if distill in ("output", "both"):
            losses["loss_output_kd"] = F.mse_loss(pred.float(), teacher_out.float())
        if distill in ("features", "both"):
            targets = run.teacher_tap.take()
            terms = [F.mse_loss(f.float(), g.float()) for f, g in zip(feats, targets, strict=True)]
            losses["loss_feature_kd"] = torch.stack(terms).mean()
    total = losses["loss_task"]
    total = total + getattr(config, "distill_weight", 0.0) * losses.get("loss_output_kd", 0.0)
    total = total + getattr(config, "feature_weight", 0.0) * losses.get("loss_feature_kd", 0.0)
    losses["loss"] = total
    return losses


def settle(run: Run, window: list[dict], done: int) -> None:
    """Turn the window's pending loss tensors into process means, in place; stop at a NaN/inf.

    The losses stay on the device during the steps (no host sync per step) and are reduced over
    processes here in one all-reduce, at every log and checkpoint step, so a non-finite loss is
    named by its step and never reaches a checkpoint. `done` is the step the window ends at.
    """
    pending = [i for i, w in enumerate(window) if isinstance(w["loss"], torch.Tensor)]
    if not pending:
        return
    keys = sorted(k for k, v in window[pending[0]].items() if isinstance(v, torch.Tensor))
    values = torch.stack([torch.stack([window[i][k] for k in keys]) for i in pending])
    means = run.accelerator.reduce(values, "mean").tolist()
    for i, row in zip(pending, means, strict=True):
        window[i].update(zip(keys, row, strict=True))
        if not math.isfinite(window[i]["loss"]):
            step = done - len(window) + i + 1
            good = checkpoint_dirs(run.work)
            kept = f"last good checkpoint: {good[-1]}" if good else "no checkpoint was written yet"
            raise DiffpruneError(f"loss is {window[i]['loss']} at step {step}; training stopped ({kept}); "
                                 "try a lower --lr or check the data")


def train_step(run: Run, batches, step: int) -> dict:
    """One optimizer step (grad_accum micro-steps), clip, Adam, EMA; returns its losses (device tensors)."""
    config, acc = run.config, run.accelerator
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(config, step)
    sums: dict[str, torch.Tensor] = {}
    for micro in range(config.grad_accum):
        x_t, t, target, cond = micro_batch(run, batches, step, micro)
        sync = micro == config.grad_accum - 1
        with contextlib.nullcontext() if sync else acc.no_sync(run.student):
            losses = step_losses(run, x_t, t, target, cond)
            for k, v in losses.items():
                v = v.detach().float().reshape(()) / config.grad_accum
                sums[k] = sums[k] + v if k in sums else v
            acc.backward(losses["loss"] / config.grad_accum)
    if config.max_grad_norm > 0:
        acc.clip_grad_norm_(run.student.parameters(), config.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {**sums, "ema_decay": run.ema.update(acc.unwrap_model(run.student).unet, step), "lr": lr_at(config, step)}


def run_steps(run: Run, end: int, progress: bool) -> None:
    """Steps run.start_step .. end-1: log every log_every steps, checkpoint every checkpoint_every and at `end`."""
    config, acc = run.config, run.accelerator
    batches = batch_stream(run.dataset, config, acc.process_index, acc.num_processes,
                           run.start_step * config.grad_accum)
    bar = tqdm(total=config.steps, initial=run.start_step, desc=config.stage, unit="step", disable=not progress)
    window: list[dict[str, float]] = []
    t0 = t_window = time.perf_counter()
    elapsed0 = run.history[-1]["elapsed_s"] if run.history else 0.0
    try:
        for step in range(run.start_step, end):
            window.append(train_step(run, batches, step))
            done = step + 1
            if done % config.log_every == 0 or done % config.checkpoint_every == 0 or done == end:
                settle(run, window, done)
            if done % config.log_every == 0 or done == end:
                now = time.perf_counter()
                record = _record(window, done, len(window) / max(now - t_window, 1e-9), elapsed0 + now - t0)
                run.history.append(record)
                acc.log({k: v for k, v in record.items() if k != "step"}, step=done)
                bar.set_postfix(loss=f"{record['loss']:.4f}", steps_s=f"{record['steps_per_s']:.2f}")
                window, t_window = [], now
            bar.update(1)
            if done % config.checkpoint_every == 0 or done == end:
                save_checkpoint(run, done)
    except DiffpruneError:
        if acc.is_main_process:
            _write_log(run)
        raise
    finally:
        bar.close()


def _record(window: list[dict[str, float]], step: int, steps_per_s: float, elapsed: float) -> dict[str, float]:
    keys = [k for k in LOG_KEYS if k in window[-1]]
    rec = {"step": step, **{k: sum(w[k] for w in window) / len(window) for k in keys if k != "step"}}
    rec["lr"], rec["ema_decay"] = window[-1]["lr"], window[-1]["ema_decay"]
    rec["steps_per_s"], rec["elapsed_s"] = steps_per_s, elapsed
    return rec


def save_checkpoint(run: Run, step: int) -> None:
    """Main process writes the checkpoint and log; every process learns whether it worked."""

    def write():
        _write_run_checkpoint(run, step)
        _write_log(run)

    on_main(run.accelerator, write, f"could not write the checkpoint at step {step}")


def _write_run_checkpoint(run: Run, step: int) -> Path:
    acc = run.accelerator
    student = acc.unwrap_model(run.student)
    opt_tensors, opt_meta = optimizer_to_files(run.optimizer.optimizer if hasattr(run.optimizer, "optimizer")
                                               else run.optimizer)
    if acc.scaler is not None:
        opt_meta["scaler"] = acc.scaler.state_dict()
    files = {"model.safetensors": _cpu(student.unet.state_dict()),
             "ema.safetensors": _cpu(run.ema.shadow),
             "optimizer.safetensors": opt_tensors}
    if len(student.adapters):
        files["adapters.safetensors"] = _cpu(student.adapters.state_dict())
    state = {"version": STATE_VERSION, "step": step, "config": run.config.to_dict(), "num_processes": acc.num_processes,
             "model_fingerprint": run.fingerprint, "history": run.history}
    return write_checkpoint(run.work, step, files, {"optimizer.json": opt_meta, STATE_FILE: state},
                            run.config.keep_checkpoints)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _write_log(run: Run) -> None:
    data = {"stage": run.config.stage, "log_every": run.config.log_every, "keys": list(LOG_KEYS),
            "records": run.history}
    try:
        write_json_atomic(run.work / TRAIN_LOG, data)
    except OSError as err:
        raise write_error(err, f"could not write {run.work / TRAIN_LOG}") from None


def _finish(run: Run) -> None:
    """Export the EMA weights as the pipeline's unet; swap a staging folder into place."""
    unet = run.accelerator.unwrap_model(run.student).unet
    final = copy.deepcopy(unet).to("cpu")
    final.load_state_dict({k: v.cpu() for k, v in run.ema.state_for(final).items()}, strict=True)
    final.eval()
    try:
        export_pipeline(run.pipe, final, run.work, run.ctx.family.component if run.ctx is not None else "unet",
                        portable=run.config.portable)
        _write_log(run)
        if run.work != run.output_dir:
            replace_dir(run.work, run.output_dir)
    except (OSError, SafetensorError) as err:
        raise write_error(err, f"could not write the final pipeline to {run.work}",
                          "; checkpoints are kept") from None
    out = run.output_dir
    component = run.ctx.family.component if run.ctx is not None else "unet"  # transformer/ for DiT, PixArt, SD3
    print(f"wrote pipeline (EMA weights) to {out} (model_index.json, {component}/, scheduler/)")
    if run.config.portable:
        from ..io.portable import describe

        print(describe(out))
    print(f"wrote checkpoints to {out / CHECKPOINTS}, log to {out / TRAIN_LOG}, TensorBoard to {out / 'logs'}, "
          f"config to {out / (run.config.stage + '_config.json')}")
