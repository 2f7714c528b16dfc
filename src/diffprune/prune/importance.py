"""Which channels matter: Diff-Pruning's timestep-thresholded Taylor importance and the baselines.

Diff-Pruning (Fang et al. 2023, Eq. 7-8; PAPER.md "The idea"):

    I(theta) = | theta * sum_t alpha_t dL_t/dtheta |,  alpha_t in {0, 1}

with L_t the noise-prediction loss at timestep t on one calibration batch and one fixed noise tensor.
Sweeping t = 0, 1, 2, ... we backpropagate L_t, update a running maximum L_max (L_t included) and
stop after the first t with L_t < thr * L_max. As in the paper's code (ddpm_prune.py backpropagates
before it tests the threshold) the step that stops the sweep is summed too: alpha_t = 1 for
t = 0..cut inclusive, the informative low-noise steps. Scores are the
per-element |w * g| summed over each layer's slice and reduced over the dependency group
(torch-pruning's TaylorImportance, multivariable=False). `taylor` is the classic baseline: all
timesteps, |sum w * g| (multivariable=True). `magnitude` = L2 norm, `random` = random scores,
`reinit` = random structure with fresh weights (the paper's "scratch" architecture).

`estimate_fast` approximates Diff-Pruning's sum at a fraction of the cost: the cut from a coarse
forward-only loss curve, then a few backward passes on (image, t) pairs sampled from a larger
image pool with t stratified over the kept prefix [0, cut] (benchmarks/importance_cost.py measures it).

Flow-matching schedulers (Stable Diffusion 3): "timestep t" is the index into the scheduler's own
training sigmas sorted from the least noisy (diffusion.py): the sweep runs t = 0, 1, ... over that
order, L_t is the flow-matching loss || (eps - x0) - model(x_t, sigma_t N) ||^2 at
x_t = (1 - sigma_t) x0 + sigma_t eps, and the result records the sigma at the cut (`cut_sigma`).

The threshold rule itself is `threshold_rule.py`; how a sweep runs (micro-batches, gradient
checkpointing, bf16 autocast, several processes) is `sweep_runtime.py` and never changes what it sums.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch_pruning as tp
from tqdm.auto import tqdm

from ..diffusion import is_flow, model_timesteps, noisy_and_target, num_train_timesteps, sigma_at
from ..errors import DiffpruneError, check_range
from .sweep_runtime import DEFAULT_RUNTIME, SweepRuntime
from .threshold_rule import (
    coarse_cut,
    cut_or_none,
    default_passes,
    running_max,
    stops,
    stratified_timesteps,
    tail_timesteps,
    threshold_sweep,
)

METHODS = ("diff-pruning", "taylor", "magnitude", "random", "reinit")
GRADIENT_METHODS = ("diff-pruning", "taylor")
ESTIMATORS = ("exact", "fast")  # how Diff-Pruning's sum is computed: estimate / estimate_fast
# Forward-only losses past the cut that `diffprune prune` adds to its loss plot: enough to show the
# dropped tail's shape (L_t is smooth in t) for 10 forward passes, ~1% of the digits sweep at thr 0.05.
PLOT_TAIL_POINTS = 10


@dataclasses.dataclass
class ImportanceResult:
    """What the calibration sweep found: the loss curve, the kept timesteps and the gradients."""

    method: str
    threshold: float
    kept_timesteps: list[int]  # [0, cut] (or every timestep when cut is None)
    losses: list[tuple[int, float]]  # (t, L_t) for every t evaluated: exact = the kept ones; fast = its coarse grid
    tail_losses: list[tuple[int, float]]  # forward-only (t, L_t) past the cut, for the plot (optional)
    grads: dict[str, torch.Tensor] | None  # parameter name -> sum_t alpha_t dL_t/dtheta
    sample_gradient_evals: int  # images x timesteps that went through backward
    wall_time_s: float
    estimator: str = "exact"  # "exact": the per-timestep sweep; "fast": estimate_fast (coarse cut, sampled pairs)
    # The timestep at which the threshold rule stopped the sweep: the last kept one (kept = [0, cut],
    # as in the paper's loop). None when every timestep was kept (no cut, threshold 0, or not a sweep).
    cut: int | None = None
    # "ddpm": t is the integer timestep; "flow-sigma-index": t indexes the flow sigmas, least noisy first
    timestep_kind: str = "ddpm"
    cut_sigma: float | None = None  # flow schedulers: the sigma of the cut timestep
    runtime: dict = dataclasses.field(default_factory=DEFAULT_RUNTIME.summary)  # SweepRuntime.summary()

    def summary(self) -> dict:
        return {"timestep_kind": self.timestep_kind, "cut_sigma": self.cut_sigma, "runtime": self.runtime,
                "method": self.method, "threshold": self.threshold,
                "kept_timesteps": _ranges(self.kept_timesteps), "num_kept_timesteps": len(self.kept_timesteps),
                "cut_timestep": self.cut, "losses": self.losses, "tail_losses": self.tail_losses,
                "sample_gradient_evals": self.sample_gradient_evals, "wall_time_s": self.wall_time_s,
                "estimator": self.estimator}


def _ranges(ts: list[int]) -> list[list[int]]:
    """[0,1,2,5,6] -> [[0,3],[5,7]] (half-open), so a 1000-step list stays one line in JSON."""
    out: list[list[int]] = []
    for t in ts:
        if out and out[-1][1] == t:
            out[-1][1] = t + 1
        else:
            out.append([t, t + 1])
    return out


def _calibration_loss(model: torch.nn.Module, family, scheduler, images: torch.Tensor, seed: int,
                      cond: dict | None, runtime: SweepRuntime = DEFAULT_RUNTIME) -> Callable[..., torch.Tensor]:
    """L_t on one fixed batch and one fixed noise tensor (seeded): `loss_at(t, grad=True)`.

    With `grad`, dL_t/dtheta is accumulated into `.grad` (micro-batch by micro-batch, as `runtime`
    says) before the detached L_t is returned; every process returns the same L_t.
    """
    device = next(model.parameters()).device
    images = images.to(device)
    cond = {k: v.to(device) for k, v in cond.items()} if cond else cond
    if not torch.isfinite(images).all():
        raise DiffpruneError("calibration images contain NaN or inf values")
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    n = images.shape[0]

    def loss_at(t: int, grad: bool = True) -> torch.Tensor:
        ts = torch.full((n,), t, device=device, dtype=torch.long)
        x_t, target = noisy_and_target(scheduler, images, noise, ts)
        steps = model_timesteps(scheduler, ts)

        def chunk_loss(rows: slice) -> torch.Tensor:
            pred = family.predict(model, x_t[rows], steps[rows], cond_rows(cond, rows, n))
            return torch.nn.functional.mse_loss(pred, target[rows])

        return runtime.weighted_loss(n, chunk_loss, grad, device)

    return loss_at


def cond_rows(cond: dict | None, rows: slice | list[int], n: int) -> dict | None:
    """The conditioning of rows `rows` (a slice or a list of indices) of a batch of n: tensors with a leading
    dimension of n are indexed, others (shared embeddings, scalars) kept as they are."""
    if not cond or rows == slice(0, n):
        return cond
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
            for k, v in cond.items()}


def _grads(model: torch.nn.Module, copy: bool = True) -> dict[str, torch.Tensor]:
    """Parameter name -> gradient; `copy=False` hands over the tensors themselves (no second copy in
    memory: the caller clears `.grad` next)."""
    return {name: p.grad.detach().clone() if copy else p.grad.detach()
            for name, p in model.named_parameters() if p.grad is not None}


def _non_finite_gradient(model: torch.nn.Module) -> str | None:
    """The name of the first parameter whose gradient holds NaN or inf, or None."""
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return name
    return None


def _refuse_non_finite(model: torch.nn.Module, loss_at: Callable[..., torch.Tensor], timesteps: list[int],
                       progress: bool, runtime: SweepRuntime = DEFAULT_RUNTIME) -> None:
    """Refuse a sweep whose summed gradients are not finite, naming the first timestep responsible.

    Every L_t was checked as the sweep computed it; the gradients (already summed over the processes)
    are checked once here, which sees any step's overflow because NaN and inf persist through the sum.
    Only on that error path are the kept timesteps replayed one at a time, to name the first whose own
    gradient is not finite.
    """
    name = _non_finite_gradient(model)
    if name is None:
        return
    for t in tqdm(timesteps, desc="locating the non-finite gradient", disable=not progress, leave=False):
        model.zero_grad(set_to_none=True)
        loss = loss_at(t)  # backpropagates
        runtime.reduce_grads(model)
        bad = _non_finite_gradient(model)
        if bad is not None:
            raise DiffpruneError(f"gradient of {bad!r} is not finite at timestep t={t} (loss "
                                 f"{float(loss.detach()):.4g}, finite); check the model weights and the "
                                 "calibration images")
    raise DiffpruneError(f"the gradient of {name!r} summed over the kept timesteps is not finite although every "
                         "loss and every single timestep's gradient was; check the model weights")


def estimate(model: torch.nn.Module, family, scheduler, images: torch.Tensor, method: str,
             threshold: float = 0.0, seed: int = 0, progress: bool = True,
             tail_points: int = 0, cond: dict | None = None,
             runtime: SweepRuntime = DEFAULT_RUNTIME) -> ImportanceResult:
    """Run the calibration sweep for `method` on `images` (N, C, H, W in the model's range).

    For latent families `images` are the scaled latents; `cond` holds the family's conditioning
    tensors (text embeddings, class labels) aligned with `images`.
    Gradients are summed over the kept timesteps [0, cut] (the paper's loop: the step that stops the
    sweep is included) and returned by parameter name; the model's own `.grad` fields are cleared
    again. `tail_points` > 0 adds that many forward-only losses past the cut for the plot, at the cost
    of as many forward passes; 0 (default) costs what the paper's loop does. Non-gradient methods
    return no gradients and no curve. `runtime` (sweep_runtime.py): micro-batches, gradient
    checkpointing, bf16 autocast and the processes sharing the work; the result does not depend on
    it beyond float rounding (bf16: measured, not bounded).
    """
    if method not in METHODS:
        raise DiffpruneError(f"method={method!r} is not one of {METHODS}")
    start = time.perf_counter()
    if method not in GRADIENT_METHODS:
        return ImportanceResult(method, threshold, [], [], [], None, 0, 0.0)
    loss_at = _calibration_loss(model, family, scheduler, images, seed, cond, runtime=runtime)
    was_training = model.training
    model.eval()  # no dropout: the sweep must be deterministic
    model.zero_grad(set_to_none=True)
    total = num_train_timesteps(scheduler)
    thr = threshold if method == "diff-pruning" else 0.0
    show = progress and runtime.workers.is_main
    try:
        with runtime.applied(model):
            losses, cut = threshold_sweep(loss_at, total, thr, progress=show)  # loss_at backpropagates
            kept = [t for t, _ in losses]
            runtime.reduce_grads(model)
            _refuse_non_finite(model, loss_at, kept, show, runtime)
            grads = _grads(model, copy=False)
            model.zero_grad(set_to_none=True)
            cut = cut_or_none(cut, total)
            tail = [(t, float(loss_at(t, grad=False))) for t in tail_timesteps(cut, total, tail_points)]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return _on_schedule(ImportanceResult(method, thr, kept, losses, tail, grads, len(kept) * images.shape[0],
                                         time.perf_counter() - start, cut=cut, runtime=runtime.summary()),
                        scheduler)


def estimate_many(model: torch.nn.Module, family, scheduler, images: torch.Tensor,
                  thresholds: tuple[float, ...], seed: int = 0, progress: bool = True,
                  tail_points: int = 0, cond: dict | None = None, prefixes: Sequence[int] = (),
                  runtime: SweepRuntime = DEFAULT_RUNTIME) -> dict[tuple[str, float], ImportanceResult]:
    """One all-timestep sweep that serves Diff-Pruning at every threshold and Taylor (all steps).

    The threshold rule only looks back (running max), so each threshold's cut is known when the
    sweep reaches it; its gradients are snapshotted there, after that step's backward (kept = [0, cut]).
    Each result equals a separate `estimate(...)` with the same images, seed and tail_points (whose
    forward-only tail losses this sweep has already computed); its wall time is the sweep's time up to
    its cut. Keys: ("diff-pruning", thr) for each threshold and ("taylor", 0.0); with `prefixes`, also
    ("prefix", k): the gradients summed over the first k timesteps [0, k - 1] (the paper's ablation of
    the kept range, Sec. 4.3), reported like a cut at k - 1. `runtime`: as in `estimate` (snapshots
    are summed over the processes).
    """
    for thr in thresholds:
        check_range("threshold", thr, 0.0, 1.0, high_open=True)
    start = time.perf_counter()
    loss_at = _calibration_loss(model, family, scheduler, images, seed, cond, runtime=runtime)
    total, n = num_train_timesteps(scheduler), images.shape[0]
    for k in prefixes:
        check_range("prefix", k, 1, total)
    tail_timesteps(None, total, tail_points)  # refuse a bad tail_points before the sweep
    fixed = {k: None for k in prefixes if k < total}  # k -> (grads, wall) once the sweep has summed t = k - 1
    pending = sorted(set(thresholds), reverse=True)  # the highest threshold cuts first
    cuts: dict[float, tuple[int, dict, float]] = {}
    l_max: torch.Tensor | float = 0.0

    def snapshot() -> dict[str, torch.Tensor]:  # this process's sums so far, summed over the processes
        grads = _grads(model)
        for g in grads.values():
            runtime.workers.all_reduce(g)
        return grads

    def on_keep(t: int, loss: torch.Tensor) -> None:  # loss_at has backpropagated L_t already
        nonlocal l_max
        wall = time.perf_counter() - start
        l_max = running_max(l_max, loss.detach())
        while pending and stops(loss.detach(), l_max, pending[0]):
            cuts[pending.pop(0)] = (t, snapshot(), wall)
        if t + 1 in fixed:
            fixed[t + 1] = (snapshot(), wall)

    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    show = progress and runtime.workers.is_main
    try:
        with runtime.applied(model):
            losses, _ = threshold_sweep(loss_at, total, 0.0, on_keep=on_keep, progress=show)
            runtime.reduce_grads(model)
            # The sums only grow, and NaN/inf persist in them: finite at the end means finite at every snapshot.
            _refuse_non_finite(model, loss_at, list(range(total)), show, runtime)
            full = (None, _grads(model), time.perf_counter() - start)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)

    def result(k: int, cut: int | None, threshold: float, grads: dict, wall: float) -> ImportanceResult:
        tail = [losses[t] for t in tail_timesteps(cut, total, tail_points)]
        return _on_schedule(ImportanceResult("diff-pruning", threshold, list(range(k)), losses[:k], tail, grads,
                                             k * n, wall, cut=cut, runtime=runtime.summary()), scheduler)

    out = {}
    for thr in thresholds:
        stop, grads, wall = cuts.get(thr, full)
        cut = cut_or_none(stop, total)
        out[("diff-pruning", thr)] = result(total if cut is None else cut + 1, cut, thr, grads, wall)
    out[("taylor", 0.0)] = _on_schedule(ImportanceResult("taylor", 0.0, list(range(total)), losses, [], full[1],
                                                         total * n, full[2], runtime=runtime.summary()), scheduler)
    for k in prefixes:
        grads, wall = fixed[k] if k < total else full[1:]
        out[("prefix", k)] = result(k, cut_or_none(k - 1, total), 0.0, grads, wall)
    return out


def estimate_fast(model: torch.nn.Module, family, scheduler, images: torch.Tensor, threshold: float,
                  seed: int = 0, grid_stride: int = 10, cut_batch: int = 8, pairs_per_pass: int = 64,
                  passes: int | None = None, progress: bool = True, cond: dict | None = None,
                  runtime: SweepRuntime = DEFAULT_RUNTIME) -> ImportanceResult:
    """Diff-Pruning's importance at a fraction of the exact sweep's cost.

    1. The cut: the threshold rule on a forward-only loss curve over the coarse grid
       t = 0, grid_stride, ... with the first `cut_batch` images and one fixed noise tensor
       (`coarse_cut`: kept = [0, cut], the grid point that stops the rule included as in the exact sweep).
    2. sum_{t <= cut} dL_t/dtheta, up to scale: `passes` backward passes, each on the mean loss of
       `pairs_per_pass` (image, t) pairs, images drawn from all of `images` (without replacement
       until the pool is used up), timesteps stratified over [0, cut], fresh noise per pair.
       Default passes: `default_passes(cut + 1, pairs_per_pass)`. The scale is irrelevant: pruning
       ranks channels within each group.
    Deterministic for a given seed. `sample_gradient_evals` = passes * pairs_per_pass. `runtime`: as
    in `estimate`; every process draws the same pairs and computes its share of their micro-batches.
    """
    check_range("threshold", threshold, 0.0, 1.0, high_open=True)
    for name, value in (("cut_batch", cut_batch), ("pairs_per_pass", pairs_per_pass)):
        if value < 1:
            raise DiffpruneError(f"{name}={value} must be an integer >= 1")
    if passes is not None and passes < 1:
        raise DiffpruneError(f"passes={passes} must be an integer >= 1")
    start = time.perf_counter()
    device = next(model.parameters()).device
    images = images.to(device)
    if not torch.isfinite(images).all():
        raise DiffpruneError("calibration images contain NaN or inf values")
    n = images.shape[0]
    head = list(range(min(cut_batch, n)))
    total = num_train_timesteps(scheduler)
    show = progress and runtime.workers.is_main
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        with runtime.applied(model):
            loss_at = _calibration_loss(model, family, scheduler, images[head], seed, cond_rows(cond, head, n),
                                        runtime=runtime)
            cut, losses = coarse_cut(lambda t: loss_at(t, grad=False), total, threshold, grid_stride)
            num_kept = total if cut is None else cut + 1
            passes = default_passes(num_kept, pairs_per_pass) if passes is None else passes
            g = torch.Generator().manual_seed(seed + 1)
            order: list[int] = []
            for i in tqdm(range(passes), desc=f"importance (fast, cut={cut})", disable=not show, leave=False):
                while len(order) < pairs_per_pass:
                    order += torch.randperm(n, generator=g).tolist()
                idx, order = order[:pairs_per_pass], order[pairs_per_pass:]
                value = float(_sampled_pass(model, family, scheduler, images, cond, idx, num_kept, g, runtime))
                if not math.isfinite(value):
                    raise DiffpruneError(f"calibration loss is {value} in sampled pass {i} of {passes}; check the "
                                         "calibration images and the model weights")
            runtime.reduce_grads(model)
        bad = _non_finite_gradient(model)
        if bad is not None:
            raise DiffpruneError(f"gradient of {bad!r} summed over {passes} sampled passes is not finite although "
                                 "every loss was; check the model weights and the calibration images")
        grads = _grads(model, copy=False)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return _on_schedule(ImportanceResult("diff-pruning", threshold, list(range(num_kept)), losses, [], grads,
                                         passes * pairs_per_pass, time.perf_counter() - start, estimator="fast",
                                         cut=cut, runtime=runtime.summary()), scheduler)


def _sampled_pass(model: torch.nn.Module, family, scheduler, images: torch.Tensor, cond: dict | None,
                  idx: list[int], num_kept: int, g: torch.Generator, runtime: SweepRuntime) -> torch.Tensor:
    """One backward pass of `estimate_fast` on the pairs (images[idx], t stratified over [0, num_kept)).

    The timesteps and the noise are drawn for all pairs on every process (same generator, same draws);
    each process then backpropagates its micro-batches. Returns the pass's mean loss (all processes).
    """
    device, m, n = images.device, len(idx), images.shape[0]
    ts = stratified_timesteps(num_kept, m, g).to(device)
    noise = torch.randn((m, *images.shape[1:]), generator=g).to(device)
    x_t, target = noisy_and_target(scheduler, images[idx], noise, ts)
    steps, pair_cond = model_timesteps(scheduler, ts), cond_rows(cond, idx, n)

    def chunk_loss(rows: slice) -> torch.Tensor:
        pred = family.predict(model, x_t[rows], steps[rows], cond_rows(pair_cond, rows, m))
        return torch.nn.functional.mse_loss(pred, target[rows])

    return runtime.weighted_loss(m, chunk_loss, grad=True, device=device)


def _on_schedule(result: ImportanceResult, scheduler) -> ImportanceResult:
    """Record what t means for this scheduler and, for flow schedulers, the sigma at the cut."""
    if is_flow(scheduler):
        result.timestep_kind, result.cut_sigma = "flow-sigma-index", sigma_at(scheduler, result.cut)
    return result


def tp_importance(method: str) -> tp.importance.Importance:
    """torch-pruning scorer for `method`; Taylor variants read the gradients put in `.grad`."""
    if method == "diff-pruning":
        return tp.importance.TaylorImportance(multivariable=False)
    if method == "taylor":
        return tp.importance.TaylorImportance(multivariable=True)
    if method == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if method in ("random", "reinit"):
        return tp.importance.RandomImportance()
    raise DiffpruneError(f"method={method!r} is not one of {METHODS}")
