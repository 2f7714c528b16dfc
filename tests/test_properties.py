"""Property tests (hypothesis, bounded): random small UNet2DModels x methods x sizes always prune to a
valid, smaller model that saves and reloads bit-exactly; plus the numerics of the calibration sweep.

Any failure hypothesis found is kept below as an explicit regression test.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.io import load_unet, to_pruned
from diffprune.io.structure import validate_structure
from diffprune.prune.importance import METHODS, estimate, threshold_sweep
from diffprune.prune.pruning import PruneConfig, prune_model

INFO = {"format": "diffprune-pruning", "format_version": 1, "base_class": "UNet2DModel",
        "base_model": {"id": "property-test", "revision": None}, "method": {"name": "any"}, "kept_timesteps": []}
SETTINGS = dict(deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SCHEDULER = DDPMScheduler(num_train_timesteps=5)


@st.composite
def unet_configs(draw):
    groups = draw(st.sampled_from([4, 8]))
    levels = draw(st.integers(2, 3))
    widths = tuple(groups * draw(st.integers(1, 4)) for _ in range(levels))
    attn = draw(st.lists(st.booleans(), min_size=levels, max_size=levels))
    # a head dim that divides every attention width: the attention levels and the mid block, which always
    # has attention (None: one head over all channels). Wider heads give diffusers heads=0 (a broken model).
    attn_widths = [w for w, a in zip(widths, attn, strict=True) if a] + [widths[-1]]
    head_dims = [None] + [d for d in (4, 8) if all(w % d == 0 for w in attn_widths)]
    in_channels = draw(st.sampled_from([1, 3]))
    return dict(sample_size=draw(st.sampled_from([8, 16])), in_channels=in_channels, out_channels=in_channels,
                block_out_channels=widths, layers_per_block=draw(st.integers(1, 2)), norm_num_groups=groups,
                down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
                up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
                attention_head_dim=draw(st.sampled_from(head_dims)))


def _build(config: dict, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**config).eval()


def _images(model, n=2, seed=0):
    c, s = model.config.in_channels, model.config.sample_size
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _forward(model, x):
    with torch.no_grad():
        return model(x, torch.tensor([1] * x.shape[0])).sample


def _check_pruned(base, outcome) -> None:
    """Every invariant a pruned model must satisfy, including a bit-exact save/reload."""
    pruned = outcome.model
    validate_structure(pruned, "pruned model")
    for m in pruned.modules():
        if isinstance(m, torch.nn.GroupNorm):
            assert m.num_channels > 0 and m.num_channels % m.num_groups == 0
    assert outcome.params[1] <= outcome.params[0] and outcome.macs[1] <= outcome.macs[0]
    x = _images(base, n=2, seed=1)
    y = _forward(pruned, x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    saved = to_pruned(pruned, INFO)
    with tempfile.TemporaryDirectory() as tmp:
        saved.save_pretrained(Path(tmp) / "unet")
        reloaded = load_unet(Path(tmp) / "unet")
    a, b = saved.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert torch.equal(_forward(saved, x), _forward(reloaded, x))
    assert torch.equal(_forward(pruned, x), _forward(reloaded, x))


@settings(max_examples=15, **SETTINGS)
@given(config=unet_configs(), method=st.sampled_from(METHODS),
       ratio=st.floats(0.01, 0.79, allow_nan=False), rule=st.sampled_from(["torch-pruning", "paper"]),
       round_to=st.sampled_from([None, None, 2]))
def test_any_ratio_prunes_to_a_valid_smaller_model_that_reloads_exactly(config, method, ratio, rule, round_to):
    base = _build(config)
    fam = family_for(base)
    imp = estimate(base, fam, SCHEDULER, _images(base), method, threshold=0.05, progress=False)
    outcome = prune_model(base, fam, PruneConfig(model="m", method=method, ratio=ratio, ratio_rule=rule,
                                           round_to=round_to), imp, progress=False)
    _check_pruned(base, outcome)


@settings(max_examples=6, **SETTINGS)
@given(config=unet_configs(), method=st.sampled_from(["magnitude", "diff-pruning"]),
       kind=st.sampled_from(["target_macs", "target_params"]), target=st.floats(0.2, 0.95))
def test_any_target_is_reached_or_refused_cleanly(config, method, kind, target):
    base = _build(config)
    fam = family_for(base)
    imp = estimate(base, fam, SCHEDULER, _images(base), method, threshold=0.05, progress=False)
    try:
        outcome = prune_model(base, fam, PruneConfig(model="m", method=method, **{kind: target}), imp, progress=False)
    except DiffpruneError as err:  # an unreachable target is allowed, as long as it says so
        assert "unreachable" in str(err) and "\n" not in str(err)
        return
    frac = (outcome.macs if kind == "target_macs" else outcome.params)
    assert abs(frac[1] / frac[0] - target) <= 0.02 + 1e-9
    _check_pruned(base, outcome)


# --------------------------------------------------------------------------- explicit regressions

SMALLEST = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4, 4), layers_per_block=1,
                norm_num_groups=4, down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "AttnUpBlock2D"), attention_head_dim=None)


@pytest.mark.parametrize("method", METHODS)
def test_one_channel_per_group_model_stays_whole(method):
    """GroupNorm groups of one channel cannot lose a channel: the model must come back valid."""
    base = _build(SMALLEST)
    fam = family_for(base)
    imp = estimate(base, fam, SCHEDULER, _images(base), method, progress=False)
    _check_pruned(base, prune_model(base, fam, PruneConfig(model="m", method=method, ratio=0.79), imp, progress=False))


# --------------------------------------------------------------------------- numerics


def _small():
    return _build(dict(SMALLEST, block_out_channels=(8, 16), norm_num_groups=4, in_channels=1, out_channels=1))


@pytest.mark.parametrize("value", [-1.0, 0.0, 1.0])
def test_constant_calibration_batch_is_valid_data(value):
    model = _small()
    images = torch.full((2, 1, 8, 8), value)
    imp = estimate(model, family_for(model), SCHEDULER, images, "diff-pruning", threshold=0.05, progress=False)
    assert imp.kept_timesteps and all(torch.isfinite(g).all() for g in imp.grads.values())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_calibration_images_are_reported(bad):
    model = _small()
    images = torch.zeros(2, 1, 8, 8)
    images[1, 0, 3, 3] = bad
    with pytest.raises(DiffpruneError, match="NaN or inf"):
        estimate(model, family_for(model), SCHEDULER, images, "taylor", progress=False)


def test_non_finite_gradient_names_the_timestep():
    """A loss that is finite but whose gradient overflows (here: only from t=2 on) names t=2."""
    model = _small()
    fam = family_for(model)

    class Exploding(type(fam)):
        def predict(self, m, x_t, ts, *args, **kwargs):
            out = super().predict(m, x_t, ts, *args, **kwargs)
            if int(ts[0]) >= 2:  # finite forward value, infinite gradient
                return out + _inf_grad(out)
            return out

    with pytest.raises(DiffpruneError, match=r"not finite at timestep t=2"):
        estimate(model, Exploding(), SCHEDULER, torch.zeros(2, 1, 8, 8), "taylor", progress=False)
    assert all(p.grad is None for p in model.parameters())  # cleared again on error


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def _inf_grad(x):
    return _InfGrad.apply(x) - x.detach()  # value 0, gradient inf


def test_non_finite_loss_names_the_timestep():
    with pytest.raises(DiffpruneError, match=r"t=1"):
        threshold_sweep(lambda t: torch.tensor([1.0, float("inf"), 0.5][t]), 3, 0.0)
