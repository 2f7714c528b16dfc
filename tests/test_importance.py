"""importance.estimate against the paper's loop (ddpm_prune.py): which timesteps are summed, the
gradient sum itself, the cut in the report, and the sweep's gradient checks."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import save_tiny_pipeline, tiny_unet
from diffusers import DDPMScheduler

import diffprune.prune.importance as importance
from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.prune.importance import estimate, estimate_fast, tail_timesteps, threshold_sweep
from diffprune.prune.pruning import PruneConfig
from diffprune.prune.stage import run_prune

T = 30
THR = 0.96  # with x0-prediction L_t falls slowly: this threshold stops the sweep mid-range


def _images(n=3, seed=0):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(num_train_timesteps=T, prediction_type="sample")


def _paper_loop(loss_at, num_timesteps, thr, backward=lambda loss: None):
    """ddpm_prune.py's loop, written out: backward, `if loss > loss_max: loss_max = loss`, then
    `if loss < loss_max * thr: break`. Returns (the timesteps backpropagated, whether it broke)."""
    summed, loss_max = [], 0
    for t in range(num_timesteps):
        loss = loss_at(t)
        backward(loss)
        summed.append(t)
        if loss > loss_max:
            loss_max = loss
        if loss < loss_max * thr:
            return summed, True
    return summed, False


def _x0_loss(model, scheduler, images, seed):
    """L_t as the paper computes it (one batch, one fixed noise tensor), for an x0-predicting scheduler."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))

    def loss_at(t):
        ts = torch.full((images.shape[0],), t, dtype=torch.long)
        return torch.nn.functional.mse_loss(model(scheduler.add_noise(images, noise, ts), ts).sample, images)

    return loss_at


def test_threshold_sweep_keeps_exactly_what_the_paper_loop_backpropagates():
    rng = random.Random(0)
    # float32 boundary: 0.2486283 == float32(4.9725661 * 0.05), so the paper's tensor test does not stop
    # at t = 1 (a float64 comparison would); it stops at t = 2.
    curves = [([4.9725661277771, 0.24862830340862274, 0.1], 0.05)]
    curves += [([rng.lognormvariate(0, 1.5) for _ in range(rng.randint(1, 40))],
                rng.choice([0.0, 0.02, 0.05, 0.1, 0.3, 0.6, 0.9])) for _ in range(300)]
    for values, thr in curves:
        curve = torch.tensor(values, dtype=torch.float32)
        expected, broke = _paper_loop(lambda t: curve[t], len(curve), thr)  # noqa: B023
        calls = []
        seen, cut = threshold_sweep(lambda t: curve[t], len(curve), thr,  # noqa: B023
                                    on_keep=lambda t, loss: calls.append(t))  # noqa: B023
        assert [t for t, _ in seen] == calls == expected, (values, thr)
        assert cut == (expected[-1] if broke else None)
    assert _paper_loop(lambda t: torch.tensor(curves[0][0])[t], 3, 0.05)[0] == [0, 1, 2]
    assert curves[0][0][1] < 0.05 * curves[0][0][0]  # ... where a float64 test would have stopped at t = 1


def test_exact_gradients_are_the_per_timestep_gradients_summed_over_0_to_cut(scheduler):
    model = tiny_unet()
    images, seed = _images(), 1
    imp = estimate(model, family_for(model), scheduler, images, "diff-pruning", threshold=THR, seed=seed,
                   progress=False)
    params = dict(model.named_parameters())
    per_step = []
    summed, broke = _paper_loop(_x0_loss(model, scheduler, images, seed), T, THR,
                                lambda loss: per_step.append(torch.autograd.grad(loss, list(params.values()))))
    assert broke and 1 < summed[-1] < T - 1  # the cut path is exercised
    assert imp.kept_timesteps == summed and imp.cut == summed[-1]
    assert imp.sample_gradient_evals == len(summed) * images.shape[0]
    for i, name in enumerate(params):
        torch.testing.assert_close(imp.grads[name], sum(g[i] for g in per_step), rtol=1e-5, atol=1e-7)
    # the step that stopped the sweep is part of the sum: without it the sum is measurably different
    without = sum(g[0] for g in per_step[:-1])
    assert not torch.allclose(imp.grads[next(iter(params))], without, rtol=1e-3, atol=1e-6)


def test_prune_report_records_the_paper_loops_kept_steps_and_cut(tmp_path):
    base = save_tiny_pipeline(tmp_path / "base", num_train_timesteps=T, prediction_type="sample")
    thr = 0.985  # this untrained model's curve on digits is flat: max at t = 1, first below 98.5% of it at t = 7
    config = PruneConfig(model=str(base), data="digits", method="diff-pruning", threshold=thr, ratio=0.3,
                         batch_size=3, seed=2, estimator="exact")  # the paper's loop (the default became "fast")
    report = run_prune(config, tmp_path / "pruned", progress=False)
    imp = report["importance"]
    # the same losses, recomputed in the test from the same batch and noise
    from diffprune.data import first_batch, make_dataset
    from diffprune.io import load_pipeline
    pipe = load_pipeline(base)
    images = first_batch(make_dataset("digits", 16, 1), 3, 2)
    with torch.no_grad():
        curve = [_x0_loss(pipe.unet.eval(), pipe.scheduler, images, 2)(t) for t in range(T)]
    summed, broke = _paper_loop(lambda t: curve[t], T, thr)
    assert broke and 1 < summed[-1] < T - 1
    cut = summed[-1]
    assert imp["cut_timestep"] == cut and imp["kept_timesteps"] == [[0, cut + 1]]
    assert imp["num_kept_timesteps"] == cut + 1 and [t for t, _ in imp["losses"]] == summed
    for t, value in imp["losses"]:
        assert value == pytest.approx(float(curve[t]), rel=1e-5)
    # the plot's forward-only tail: PLOT_TAIL_POINTS timesteps spread over [cut + 1, T - 1]
    assert [t for t, _ in imp["tail_losses"]] == tail_timesteps(cut, T, importance.PLOT_TAIL_POINTS)
    assert imp["tail_losses"][0][0] == cut + 1 and imp["tail_losses"][-1][0] == T - 1
    for t, value in imp["tail_losses"]:
        assert value == pytest.approx(float(curve[t]), rel=1e-5)
    written = json.loads((tmp_path / "pruned" / "prune_report.json").read_text())["importance"]
    assert written == json.loads(json.dumps(imp))
    assert (tmp_path / "pruned" / "loss_over_timesteps.png").stat().st_size > 1000


def _synthetic(curve):
    """Replace the calibration loss by `curve[t]`, still connected to the model so backward runs."""
    def calibration_loss(model, family, sched, images, seed, cond, runtime=None):
        w = next(model.parameters())
        return lambda t, grad=True: (w.sum() * 0 if grad else 0) + torch.tensor(curve[t])
    return calibration_loss


@pytest.mark.parametrize("drop_at, thr, kept, cut, tail", [
    (None, 0.0, T, None, []),  # threshold 0: every timestep, no cut, no tail
    (None, 0.5, T, None, []),  # the rule never stops the sweep
    (T - 1, 0.5, T, None, []),  # it stops only at the last step: still every timestep
    (T - 2, 0.5, T - 1, T - 2, [T - 1]),  # the one dropped step is the whole tail
    (5, 0.5, 6, 5, [6, 18, 29]),
])
def test_no_cut_threshold_zero_and_cuts_at_the_end(scheduler, monkeypatch, drop_at, thr, kept, cut, tail):
    curve = [0.01 if t == drop_at else 1.0 for t in range(T)]
    monkeypatch.setattr(importance, "_calibration_loss", _synthetic(curve))
    model = tiny_unet()
    imp = estimate(model, family_for(model), scheduler, _images(), "diff-pruning", threshold=thr,
                   progress=False, tail_points=3)
    assert imp.kept_timesteps == list(range(kept)) and imp.cut == cut
    assert [t for t, _ in imp.losses] == imp.kept_timesteps and [t for t, _ in imp.tail_losses] == tail
    assert imp.summary()["cut_timestep"] == cut and imp.summary()["num_kept_timesteps"] == kept


def test_tail_timesteps_spread_over_the_dropped_range():
    assert tail_timesteps(9, 30, 4) == [10, 16, 23, 29]
    assert tail_timesteps(9, 30, 1) == [10] and tail_timesteps(28, 30, 5) == [29]
    assert tail_timesteps(None, 30, 4) == [] and tail_timesteps(9, 30, 0) == []
    with pytest.raises(DiffpruneError, match="tail_points=-1"):
        tail_timesteps(9, 30, -1)


def test_gradients_are_checked_once_per_sweep_not_per_timestep(scheduler, monkeypatch):
    calls = []
    real = importance._non_finite_gradient
    monkeypatch.setattr(importance, "_non_finite_gradient", lambda model: calls.append(1) or real(model))
    model = tiny_unet()
    imp = estimate(model, family_for(model), scheduler, _images(), "taylor", progress=False)
    assert len(imp.kept_timesteps) == T and len(calls) == 1


class _Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))


class _HugeGradient(torch.autograd.Function):
    """Identity whose backward hands the input a gradient summing to 2e38: finite, but two of them overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, 2e38 / g.numel())


class _HugeFamily:
    """Predicts w everywhere; every loss is finite, every timestep's dL/dw is 2e38."""

    def predict(self, model, x_t, ts, cond=None):
        if x_t.shape[0] == 5:  # the fast estimator's sampled passes (pairs_per_pass=5) only
            return torch.full_like(x_t, float("nan"))
        return _HugeGradient.apply(model.w.expand(x_t.shape))


def test_a_sum_that_overflows_from_finite_steps_is_reported_as_such():
    model = _Scalar()
    with pytest.raises(DiffpruneError, match=r"gradient of 'w' summed over the kept timesteps is not finite "
                                             r"although every loss and every single timestep's gradient was"):
        estimate(model, _HugeFamily(), DDPMScheduler(num_train_timesteps=3), torch.zeros(2, 1, 2, 2), "taylor",
                 progress=False)
    assert model.w.grad is None  # cleared again on error


def test_fast_estimator_checks_each_pass_loss_and_the_summed_gradient():
    model, sched, images = _Scalar(), DDPMScheduler(num_train_timesteps=20), torch.zeros(6, 1, 2, 2)
    with pytest.raises(DiffpruneError, match=r"gradient of 'w' summed over 2 sampled passes is not finite"):
        estimate_fast(model, _HugeFamily(), sched, images, 0.0, grid_stride=5, pairs_per_pass=4, passes=2,
                      progress=False)
    with pytest.raises(DiffpruneError, match=r"calibration loss is nan in sampled pass 0 of 2"):
        estimate_fast(model, _HugeFamily(), sched, images, 0.0, grid_stride=5, pairs_per_pass=5, passes=2,
                      progress=False)
    assert model.w.grad is None
