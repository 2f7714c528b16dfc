"""prune/pruning.py + prune/importance.py: every method prunes, shrinks, stays valid; the paper's anchor sizes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler, UNet2DModel

from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.families.unet2d import UNet2DFamily
from diffprune.io.structure import validate_structure
from diffprune.prune.complexity import count_macs_params
from diffprune.prune.importance import METHODS, ImportanceResult, estimate, estimate_many, threshold_sweep
from diffprune.prune.pruning import PruneConfig, prune_model, prune_model_at_ratio


def _images(n=4, seed=0):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _no_importance(method="magnitude"):
    return ImportanceResult(method, 0.0, [], [], [], None, 0, 0.0)


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(num_train_timesteps=12)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_prunes_and_stays_valid(method, scheduler):
    model = tiny_unet(seed=3)  # a seed other than the pruning seed, so reinit differs
    fam = family_for(model)
    imp = estimate(model, fam, scheduler, _images(), method, threshold=0.05, progress=False)
    out = prune_model(model, fam, PruneConfig(model="m", method=method, ratio=0.3), imp, progress=False)
    assert out.params[1] < out.params[0] and out.macs[1] < out.macs[0]
    validate_structure(out.model)
    for m in out.model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        y = out.model(x, torch.tensor([0, 5, 11])).sample
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert out.model.conv_out.out_channels == 1  # the output conv is never pruned
    if method in ("diff-pruning", "taylor"):
        assert imp.grads is not None and all(p.grad is None for p in model.parameters())
    if method == "reinit":  # same structure family as random, but fresh weights
        assert not torch.equal(out.model.conv_in.weight, model.conv_in.weight[: out.model.conv_in.out_channels])


def test_ratio_zero_is_function_preserving():
    model = tiny_unet()
    pruned = prune_model_at_ratio(model, UNet2DFamily(), _no_importance(), 0.0)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 7])
    with torch.no_grad():
        assert torch.equal(model(x, t).sample, pruned(x, t).sample)


class _IgnoreEverything(UNet2DFamily):
    def ignored_layers(self, model):
        return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]


def test_all_ignored_model_is_function_preserving():
    model = tiny_unet()
    pruned = prune_model_at_ratio(model, _IgnoreEverything(), _no_importance(), 0.5)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 7])
    assert sum(p.numel() for p in pruned.parameters()) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(x, t).sample, pruned(x, t).sample)


def test_threshold_rule_stops_where_a_monotone_loss_says_and_keeps_that_step():
    losses = lambda t: torch.tensor(math.exp(-t / 10))  # noqa: E731
    seen, cut = threshold_sweep(losses, 1000, threshold=0.05)
    first_below = next(t for t in range(1000) if math.exp(-t / 10) < 0.05)  # t = 30
    assert cut == first_below and [t for t, _ in seen] == list(range(first_below + 1))


def test_threshold_uses_the_running_maximum():
    curve = [1.0, 4.0, 2.0, 0.5, 0.3, 0.1]  # max 4 at t=1: 0.5 < 0.4 is false, 0.3 < 0.4 stops at t = 4
    seen, cut = threshold_sweep(lambda t: torch.tensor(curve[t]), len(curve), threshold=0.1)
    assert cut == 4 and [t for t, _ in seen] == [0, 1, 2, 3, 4]  # t = 4 is kept, as in the paper's loop


def test_threshold_zero_keeps_all_and_calls_back_each_kept_step():
    calls = []
    seen, cut = threshold_sweep(lambda t: torch.tensor(1.0 / (t + 1)), 50, 0.0,
                                on_keep=lambda t, loss: calls.append(t))
    assert cut is None and [t for t, _ in seen] == calls == list(range(50))


def test_nan_loss_names_the_timestep():
    with pytest.raises(DiffpruneError, match="t=2"):
        threshold_sweep(lambda t: torch.tensor([1.0, 0.9, float("nan")][t]), 3, 0.0)


def test_nan_calibration_images_are_refused(scheduler):
    model = tiny_unet()
    images = _images()
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(DiffpruneError, match="NaN"):
        estimate(model, family_for(model), scheduler, images, "diff-pruning", progress=False)


def test_diff_pruning_keeps_a_prefix_and_taylor_keeps_all(scheduler):
    model = tiny_unet()
    fam = family_for(model)
    dp = estimate(model, fam, scheduler, _images(), "diff-pruning", threshold=0.9, progress=False)
    ty = estimate(model, fam, scheduler, _images(), "taylor", threshold=0.9, progress=False)
    last = dp.cut if dp.cut is not None else 11
    assert dp.kept_timesteps == list(range(last + 1)) and [t for t, _ in dp.losses] == dp.kept_timesteps
    assert ty.kept_timesteps == list(range(12)) and ty.threshold == 0.0 and ty.cut is None
    assert dp.sample_gradient_evals == 4 * len(dp.kept_timesteps)


def test_target_macs_is_reached_within_two_percent():
    model = tiny_unet()
    out = prune_model(model, UNet2DFamily(), PruneConfig(model="m", method="magnitude", target_macs=0.56),
                _no_importance(), progress=False)
    assert abs(out.macs[1] / out.macs[0] - 0.56) <= 0.02


def test_unreachable_target_is_refused_with_the_allowed_range():
    with pytest.raises(DiffpruneError, match="unreachable"):
        prune_model(tiny_unet(), UNet2DFamily(), PruneConfig(model="m", method="magnitude", target_params=0.01),
              _no_importance(), progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"ratio": 0.3, "threshold": 1.0}, "threshold"),
    ({"ratio": 0.3, "target_macs": 0.5}, "exactly one"), ({"target_macs": 0.0}, "target_macs"),
    ({"ratio": 0.3, "ratio_rule": "nope"}, "ratio_rule"), ({"ratio": float("nan")}, "ratio"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(DiffpruneError, match=match):
        PruneConfig(model="m", **kwargs)


def cifar10_unet() -> UNet2DModel:
    """google/ddpm-cifar10-32's architecture (its config.json), random weights."""
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                       layers_per_block=2, norm_num_groups=32, attention_head_dim=None, dropout=0.1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


def test_cifar10_anchor_matches_the_paper():
    """PAPER.md: 35.7M / 6.1G -> 19.8M / 3.4G at ratio 0.3 with the paper's ratio rule."""
    torch.manual_seed(0)
    model = cifar10_unet().eval()
    fam = family_for(model)
    macs, params = count_macs_params(model, fam.example_inputs(model))
    assert abs(params / 1e6 - 35.75) < 0.01 and abs(macs / 1e9 - 6.07) < 0.01
    out = prune_model(model, fam, PruneConfig(model="m", method="magnitude", ratio=0.3, ratio_rule="paper"),
                _no_importance(), progress=False)
    assert abs(out.params[1] / 19.85e6 - 1) < 0.01 and abs(out.macs[1] / 3.39e9 - 1) < 0.01
    assert out.model.conv_in.out_channels == 96  # GroupNorm-coupled: 128 -> 96 (25%)
    assert out.model.time_embedding.linear_1.out_features == 358  # uncoupled: 512 -> 358 (30%)
    with torch.no_grad():
        assert out.model(torch.randn(1, 3, 32, 32), torch.tensor([10])).sample.shape == (1, 3, 32, 32)


def test_round_to_keeps_the_paper_size_and_valid_groupnorm():
    """torch-pruning's own round_to skips GroupNorm-coupled groups; ours rounds whole widths."""
    torch.manual_seed(0)
    model = cifar10_unet().eval()
    config = PruneConfig(model="m", method="magnitude", ratio=0.3, ratio_rule="paper", round_to=8)
    out = prune_model(model, family_for(model), config, _no_importance(), progress=False)
    assert abs(out.params[1] / 19.85e6 - 1) < 0.01 and out.model.conv_in.out_channels == 96
    widths = [m.out_features for m in out.model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(w % 8 == 0 for w in widths)
    validate_structure(out.model)


def test_estimate_many_equals_separate_sweeps():
    """One shared sweep gives each threshold (and taylor) exactly what a separate run computes."""
    model = tiny_unet()
    fam = family_for(model)
    sched = DDPMScheduler(num_train_timesteps=30, prediction_type="sample")  # L_t falls slowly here
    images = _images(n=3)
    many = estimate_many(model, fam, sched, images, (0.0, 0.96, 0.99), seed=1, progress=False, tail_points=4)
    assert 1 < len(many[("diff-pruning", 0.96)].kept_timesteps) < 30  # the cut paths are exercised
    for (method, thr), shared in many.items():
        alone = estimate(model, fam, sched, images, method, threshold=thr, seed=1, progress=False, tail_points=4)
        assert shared.kept_timesteps == alone.kept_timesteps and shared.losses == alone.losses
        assert shared.cut == alone.cut and shared.tail_losses == alone.tail_losses
        assert len(shared.tail_losses) == (4 if shared.cut is not None else 0)
        for name, g in alone.grads.items():
            torch.testing.assert_close(shared.grads[name], g, rtol=1e-6, atol=1e-8)


def test_estimate_many_prefixes_sum_exactly_the_fixed_range():
    """("prefix", k) holds the gradients over [0, k): equal to a threshold cut at k - 1, and to taylor at k = T."""
    model = tiny_unet()
    fam = family_for(model)
    sched = DDPMScheduler(num_train_timesteps=30, prediction_type="sample")
    images = _images(n=3)
    first = estimate_many(model, fam, sched, images, (0.96,), seed=1, progress=False)
    cut = first[("diff-pruning", 0.96)].cut
    assert cut is not None and 1 < cut < 30
    many = estimate_many(model, fam, sched, images, (0.96,), seed=1, progress=False, prefixes=(1, cut + 1, 30))
    for key, ref in ((("prefix", cut + 1), first[("diff-pruning", 0.96)]), (("prefix", 30), first[("taylor", 0.0)])):
        got = many[key]
        assert got.kept_timesteps == ref.kept_timesteps and got.cut == ref.cut and got.losses == ref.losses
        for name, g in ref.grads.items():
            torch.testing.assert_close(got.grads[name], g, rtol=1e-6, atol=1e-8)
    assert many[("prefix", 1)].kept_timesteps == [0] and many[("prefix", 1)].sample_gradient_evals == 3
    assert many[("prefix", 1)].cut == 0 and many[("prefix", 1)].losses == first[("taylor", 0.0)].losses[:1]
    with pytest.raises(DiffpruneError, match="prefix"):
        estimate_many(model, fam, sched, images, (), progress=False, prefixes=(31,))
