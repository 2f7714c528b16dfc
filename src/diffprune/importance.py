"""Which channels matter: Diff-Pruning's timestep-thresholded Taylor importance and the baselines.

Diff-Pruning (Fang et al. 2023, Eq. 7-8; PAPER.md "The idea"):

    I(theta) = | theta * sum_t alpha_t dL_t/dtheta |,  alpha_t in {0, 1}

with L_t the noise-prediction loss at timestep t on one calibration batch and one fixed noise tensor.
Sweeping t = 0, 1, 2, ... we keep a running maximum L_max and stop at the first t with
L_t < thr * L_max: the kept prefix holds the informative low-noise steps. Scores are the
per-element |w * g| summed over each layer's slice and reduced over the dependency group
(torch-pruning's TaylorImportance, multivariable=False). `taylor` is the classic baseline: all
timesteps, |sum w * g| (multivariable=True). `magnitude` = L2 norm, `random` = random scores,
`reinit` = random structure with fresh weights (the paper's "scratch" architecture).

`estimate_fast` approximates Diff-Pruning's sum at a fraction of the cost: the cut from a coarse
forward-only loss curve, then a few backward passes on (image, t) pairs sampled from a larger
image pool with t stratified over the kept prefix (benchmarks/importance_cost.py measures it).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch_pruning as tp
from tqdm.auto import tqdm

from .diffusion import noisy_and_target, num_train_timesteps
from .errors import DiffpruneError, check_range

METHODS = ("diff-pruning", "taylor", "magnitude", "random", "reinit")
GRADIENT_METHODS = ("diff-pruning", "taylor")
ESTIMATORS = ("exact", "fast")  # how Diff-Pruning's sum is computed: estimate / estimate_fast


@dataclasses.dataclass
class ImportanceResult:
    """What the calibration sweep found: the loss curve, the kept timesteps and the gradients."""

    method: str
    threshold: float
    kept_timesteps: list[int]
    losses: list[tuple[int, float]]  # (t, L_t) for every t evaluated with gradients
    tail_losses: list[tuple[int, float]]  # forward-only (t, L_t) past the cut, for the plot
    grads: dict[str, torch.Tensor] | None  # parameter name -> sum_t alpha_t dL_t/dtheta
    sample_gradient_evals: int  # images x timesteps that went through backward
    wall_time_s: float
    estimator: str = "exact"  # "exact": the per-timestep sweep; "fast": estimate_fast (coarse cut, sampled pairs)

    @property
    def cut(self) -> int | None:
        """First timestep not kept, or None when every timestep was kept.

        The last evaluated t is the cut when it lies past the kept prefix (exact sweep: t = cut;
        fast: the coarse grid point that failed the rule); otherwise every timestep was kept.
        """
        if not self.losses or self.losses[-1][0] < len(self.kept_timesteps):
            return None
        return self.losses[-1][0]

    def summary(self) -> dict:
        return {"method": self.method, "threshold": self.threshold,
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


def threshold_sweep(loss_at: Callable[[int], torch.Tensor], num_timesteps: int | Sequence[int], threshold: float,
                    on_keep: Callable[[int, torch.Tensor], None] | None = None,
                    progress: bool = False) -> tuple[list[int], list[tuple[int, float]]]:
    """Evaluate L_t for t = 0, 1, ... and stop at the first t with L_t < threshold * max L.

    `num_timesteps` may also be an increasing sequence of timesteps (a coarse grid). Returns the kept
    timesteps (those before the cut) and every (t, L_t) evaluated. `on_keep` gets each kept loss
    (the caller backpropagates it). threshold = 0 keeps all timesteps.
    """
    kept: list[int] = []
    losses: list[tuple[int, float]] = []
    l_max = 0.0
    steps = range(num_timesteps) if isinstance(num_timesteps, int) else num_timesteps
    bar = tqdm(steps, desc="importance (t sweep)", disable=not progress, leave=False)
    for t in bar:
        loss = loss_at(t)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise DiffpruneError(f"calibration loss is {value} at timestep t={t}; check the calibration "
                                 "images and the model weights")
        losses.append((t, value))
        l_max = max(l_max, value)
        if threshold > 0 and value < threshold * l_max:
            break
        if on_keep is not None:
            on_keep(t, loss)
        kept.append(t)
        bar.set_postfix(loss=f"{value:.4f}", ratio=f"{value / l_max:.3f}")
    return kept, losses


def _calibration_loss(model: torch.nn.Module, family, scheduler, images: torch.Tensor, seed: int,
                      cond: dict | None) -> Callable[..., torch.Tensor]:
    """L_t on one fixed batch and one fixed noise tensor (seeded): `loss_at(t, grad=True)`."""
    device = next(model.parameters()).device
    images = images.to(device)
    cond = {k: v.to(device) for k, v in cond.items()} if cond else cond
    if not torch.isfinite(images).all():
        raise DiffpruneError("calibration images contain NaN or inf values")
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)).to(device)

    def loss_at(t: int, grad: bool = True) -> torch.Tensor:
        ts = torch.full((images.shape[0],), t, device=device, dtype=torch.long)
        x_t, target = noisy_and_target(scheduler, images, noise, ts)
        with torch.set_grad_enabled(grad):
            return torch.nn.functional.mse_loss(family.predict(model, x_t, ts, cond), target)

    return loss_at


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def estimate(model: torch.nn.Module, family, scheduler, images: torch.Tensor, method: str,
             threshold: float = 0.0, seed: int = 0, progress: bool = True,
             tail_stride: int = 10, cond: dict | None = None) -> ImportanceResult:
    """Run the calibration sweep for `method` on `images` (N, C, H, W in the model's range).

    For latent families `images` are the scaled latents; `cond` holds the family's conditioning
    tensors (text embeddings, class labels) aligned with `images`.
    Gradients are accumulated over the kept timesteps and returned by parameter name; the model's
    own `.grad` fields are cleared again. Non-gradient methods return no gradients and no curve.
    """
    if method not in METHODS:
        raise DiffpruneError(f"method={method!r} is not one of {METHODS}")
    start = time.perf_counter()
    if method not in GRADIENT_METHODS:
        return ImportanceResult(method, threshold, [], [], [], None, 0, 0.0)
    loss_at = _calibration_loss(model, family, scheduler, images, seed, cond)
    was_training = model.training
    model.eval()  # no dropout: the sweep must be deterministic
    model.zero_grad(set_to_none=True)
    total = num_train_timesteps(scheduler)
    thr = threshold if method == "diff-pruning" else 0.0
    try:
        kept, losses = threshold_sweep(loss_at, total, thr, on_keep=lambda t, loss: _backward(model, t, loss),
                                       progress=progress)
        grads = _grads(model)
        tail = [(t, float(loss_at(t, grad=False).detach())) for t in range(losses[-1][0] + 1, total, tail_stride)] \
            if len(kept) < total else []
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return ImportanceResult(method, thr, kept, losses, tail, grads, len(kept) * images.shape[0],
                            time.perf_counter() - start)


def estimate_many(model: torch.nn.Module, family, scheduler, images: torch.Tensor,
                  thresholds: tuple[float, ...], seed: int = 0, progress: bool = True,
                  tail_stride: int = 10, cond: dict | None = None,
                  prefixes: Sequence[int] = ()) -> dict[tuple[str, float], ImportanceResult]:
    """One all-timestep sweep that serves Diff-Pruning at every threshold and Taylor (all steps).

    The threshold rule only looks back (running max), so each threshold's cut is known when the
    sweep reaches it; its gradients are snapshotted there. Each result equals a separate
    `estimate(...)` with the same images and seed; its wall time is the sweep's time up to its cut.
    Keys: ("diff-pruning", thr) for each threshold and ("taylor", 0.0); with `prefixes`, also
    ("prefix", k): the gradients summed over the fixed timesteps [0, k) (the paper's ablation of
    the kept range, Sec. 4.3).
    """
    for thr in thresholds:
        check_range("threshold", thr, 0.0, 1.0, high_open=True)
    start = time.perf_counter()
    loss_at = _calibration_loss(model, family, scheduler, images, seed, cond)
    total, n = num_train_timesteps(scheduler), images.shape[0]
    for k in prefixes:
        check_range("prefix", k, 1, total)
    fixed = {k: None for k in prefixes if k < total}  # k -> (grads, wall) once the sweep reaches t = k
    pending = sorted(set(thresholds), reverse=True)  # the highest threshold cuts first
    cuts: dict[float, tuple[int, dict, float]] = {}
    l_max = 0.0

    def on_keep(t: int, loss: torch.Tensor) -> None:
        nonlocal l_max
        value = float(loss.detach())
        l_max = max(l_max, value)
        while pending and pending[0] > 0 and value < pending[0] * l_max:
            cuts[pending.pop(0)] = (t, _grads(model), time.perf_counter() - start)
        if t in fixed:
            fixed[t] = (_grads(model), time.perf_counter() - start)
        _backward(model, t, loss)

    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        _, losses = threshold_sweep(loss_at, total, 0.0, on_keep=on_keep, progress=progress)
        full = (total, _grads(model), time.perf_counter() - start)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    out = {}
    for thr in thresholds:
        cut, grads, wall = cuts.get(thr, full)
        seen = losses[: cut + 1] if cut < total else losses
        tail = [losses[t] for t in range(cut + 1, total, tail_stride)] if cut < total else []
        out[("diff-pruning", thr)] = ImportanceResult("diff-pruning", thr, list(range(cut)), seen, tail, grads,
                                                      cut * n, wall)
    out[("taylor", 0.0)] = ImportanceResult("taylor", 0.0, list(range(total)), losses, [], full[1], total * n, full[2])
    for k in prefixes:
        grads, wall = fixed[k] if k < total else full[1:]
        out[("prefix", k)] = ImportanceResult("diff-pruning", 0.0, list(range(k)), losses[: k + 1], [], grads,
                                              k * n, wall)
    return out


def coarse_cut(loss_at: Callable[[int], torch.Tensor], num_timesteps: int, threshold: float,
               stride: int) -> tuple[int, list[tuple[int, float]]]:
    """The threshold rule on the grid t = 0, stride, 2*stride, ...: (cut, every (t, L_t) evaluated).

    cut = the first grid t with L_t < threshold * (running max of the grid losses), or
    num_timesteps when no grid point falls below (or threshold = 0); the kept timesteps are [0, cut).
    """
    if stride < 1:
        raise DiffpruneError(f"grid_stride={stride} must be an integer >= 1")
    kept, losses = threshold_sweep(loss_at, range(0, num_timesteps, stride), threshold)
    return (losses[-1][0] if len(kept) < len(losses) else num_timesteps), losses


def stratified_timesteps(cut: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n timesteps in [0, cut), one uniformly drawn from each of n equal strata (n may exceed cut)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    t = ((torch.arange(n, dtype=torch.float64) + u) * cut / n).floor().long()
    return t.clamp_(0, cut - 1)[torch.randperm(n, generator=generator)]


def default_passes(cut: int, pairs_per_pass: int) -> int:
    """~6 (image, t) pairs per kept timestep: under 10% of an exact sweep with a 64-image batch."""
    return max(1, math.ceil(6 * cut / pairs_per_pass))


def estimate_fast(model: torch.nn.Module, family, scheduler, images: torch.Tensor, threshold: float,
                  seed: int = 0, grid_stride: int = 10, cut_batch: int = 8, pairs_per_pass: int = 64,
                  passes: int | None = None, progress: bool = True, cond: dict | None = None) -> ImportanceResult:
    """Diff-Pruning's importance at a fraction of the exact sweep's cost.

    1. The cut: the threshold rule on a forward-only loss curve over the coarse grid
       t = 0, grid_stride, ... with the first `cut_batch` images and one fixed noise tensor.
    2. sum_{t < cut} dL_t/dtheta, up to scale: `passes` backward passes, each on the mean loss of
       `pairs_per_pass` (image, t) pairs, images drawn from all of `images` (without replacement
       until the pool is used up), timesteps stratified over [0, cut), fresh noise per pair.
       Default passes: `default_passes(cut, pairs_per_pass)`. The scale is irrelevant: pruning
       ranks channels within each group.
    Deterministic for a given seed. `sample_gradient_evals` = passes * pairs_per_pass.
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
    cond_head = _select(cond, head, n)
    total = num_train_timesteps(scheduler)
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        loss_at = _calibration_loss(model, family, scheduler, images[head], seed, cond_head)
        cut, losses = coarse_cut(lambda t: loss_at(t, grad=False), total, threshold, grid_stride)
        passes = default_passes(cut, pairs_per_pass) if passes is None else passes
        g = torch.Generator().manual_seed(seed + 1)
        order: list[int] = []
        for _ in tqdm(range(passes), desc=f"importance (fast, cut={cut})", disable=not progress, leave=False):
            while len(order) < pairs_per_pass:
                order += torch.randperm(n, generator=g).tolist()
            idx, order = order[:pairs_per_pass], order[pairs_per_pass:]
            ts = stratified_timesteps(cut, pairs_per_pass, g).to(device)
            noise = torch.randn((pairs_per_pass, *images.shape[1:]), generator=g).to(device)
            x0 = images[idx]
            x_t, target = noisy_and_target(scheduler, x0, noise, ts)
            loss = torch.nn.functional.mse_loss(family.predict(model, x_t, ts, _select(cond, idx, n)), target)
            _backward(model, int(ts[0]), loss)
        grads = _grads(model)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return ImportanceResult("diff-pruning", threshold, list(range(cut)), losses, [], grads,
                            passes * pairs_per_pass, time.perf_counter() - start, estimator="fast")


def _select(cond: dict | None, idx: list[int], n: int) -> dict | None:
    """The conditioning rows of images `idx` (tensors with a leading dimension of n; others as is)."""
    if not cond:
        return cond
    return {k: v[idx] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
            for k, v in cond.items()}


def _backward(model: torch.nn.Module, t: int, loss: torch.Tensor) -> None:
    """Accumulate dL_t/dtheta; a non-finite gradient is reported with the timestep that caused it."""
    loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise DiffpruneError(f"gradient of {name!r} is not finite at timestep t={t} (loss {float(loss.detach()):.4g}); "
                                 "check the model weights and the calibration images")


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
