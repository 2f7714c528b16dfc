"""importance.estimate_fast: the coarse cut, the sampled gradient passes, and `--estimator fast`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import save_tiny_pipeline, tiny_unet
from diffusers import DDPMScheduler

import diffprune
from diffprune.cli import main
from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.prune.importance import coarse_cut, estimate_fast, stratified_timesteps, threshold_sweep
from diffprune.prune.pruning import PruneConfig, prune_model


def _images(n=12, seed=0):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(num_train_timesteps=40)


def test_coarse_cut_is_the_first_grid_point_below_threshold_of_the_running_max():
    curve = lambda t: torch.tensor(0.5 + t / 20 if t < 10 else math.exp(-t / 10))  # noqa: E731 rises, then falls
    cut, seen = coarse_cut(curve, 1000, threshold=0.05, stride=10)
    grid_max = max(v for _, v in seen)
    assert [t for t, _ in seen] == list(range(0, cut + 1, 10))
    assert seen[-1][1] < 0.05 * grid_max and all(v >= 0.05 * max(w for _, w in seen[: i + 1])
                                                    for i, (_, v) in enumerate(seen[:-1]))
    # the exact sweep's cut (its last kept step) lies within one stride below the coarse one
    _, exact_cut = threshold_sweep(curve, 1000, 0.05)
    assert cut - 10 < exact_cut <= cut


def test_coarse_cut_keeps_everything_at_threshold_zero_or_when_never_below():
    assert coarse_cut(lambda t: torch.tensor(1.0), 40, 0.5, 10)[0] is None
    cut, seen = coarse_cut(lambda t: torch.tensor(math.exp(-t)), 40, 0.0, 7)
    assert cut is None and [t for t, _ in seen] == [0, 7, 14, 21, 28, 35]
    # the rule stopping at the last timestep keeps everything too
    assert coarse_cut(lambda t: torch.tensor(0.01 if t == 39 else 1.0), 40, 0.5, 13)[0] is None
    assert coarse_cut(lambda t: torch.tensor(0.01 if t == 26 else 1.0), 40, 0.5, 13)[0] == 26


def test_coarse_cut_refuses_nan_and_a_bad_stride():
    with pytest.raises(DiffpruneError, match="t=10"):
        coarse_cut(lambda t: torch.tensor(float("nan") if t == 10 else 1.0), 40, 0.05, 5)
    with pytest.raises(DiffpruneError, match="grid_stride"):
        coarse_cut(lambda t: torch.tensor(1.0), 40, 0.05, 0)


def test_stratified_timesteps_cover_the_kept_prefix():
    g = torch.Generator().manual_seed(0)
    ts = stratified_timesteps(50, 10, g)
    assert sorted((ts // 5).tolist()) == list(range(10))  # one per stratum of width 5
    many = stratified_timesteps(7, 64, g)
    assert many.min() >= 0 and many.max() <= 6 and set(many.tolist()) == set(range(7))


def test_fast_estimate_counts_pairs_keeps_the_coarse_prefix_and_has_every_gradient(scheduler):
    model = tiny_unet().requires_grad_(True)
    fam = family_for(model)
    imp = estimate_fast(model, fam, scheduler, _images(), threshold=0.05, grid_stride=5, cut_batch=4,
                        pairs_per_pass=6, passes=3, progress=False)
    assert imp.sample_gradient_evals == 3 * 6 and imp.method == "diff-pruning" and imp.estimator == "fast"
    assert imp.summary()["estimator"] == "fast" and imp.wall_time_s > 0
    last = imp.cut if imp.cut is not None else 39
    assert imp.kept_timesteps == list(range(last + 1)) and [t for t, _ in imp.losses] == list(range(0, last + 1, 5))
    names = {n for n, p in model.named_parameters()}
    assert set(imp.grads) == names and all(torch.isfinite(g).all() for g in imp.grads.values())
    assert any(g.abs().sum() > 0 for g in imp.grads.values())
    assert all(p.grad is None for p in model.parameters())  # the model's .grad is cleared again
    again = estimate_fast(model, fam, scheduler, _images(), threshold=0.05, grid_stride=5, cut_batch=4,
                          pairs_per_pass=6, passes=3, progress=False)
    assert all(torch.equal(imp.grads[n], again.grads[n]) for n in names)  # deterministic per seed
    out = prune_model(model, fam, PruneConfig(model="m", ratio=0.3, estimator="fast"), imp, progress=False)
    assert out.params[1] < out.params[0]


def test_fast_estimate_cuts_on_the_grid_and_samples_only_kept_timesteps(scheduler, monkeypatch):
    import diffprune.prune.importance as importance

    def synthetic(model, family, sched, images, seed, cond, runtime=None):  # L_t = exp(-t / 5): < 0.05 L_0 from t = 15
        return lambda t, grad=True: torch.tensor(math.exp(-t / 5))

    seen_t = []
    real = importance.noisy_and_target

    def recording(sched, x0, noise, ts):
        seen_t.extend(ts.tolist())
        return real(sched, x0, noise, ts)

    monkeypatch.setattr(importance, "_calibration_loss", synthetic)
    monkeypatch.setattr(importance, "noisy_and_target", recording)
    model = tiny_unet().requires_grad_(True)
    imp = estimate_fast(model, family_for(model), scheduler, _images(), threshold=0.05, grid_stride=4,
                        pairs_per_pass=32, passes=2, progress=False)
    assert imp.cut == 16 and imp.kept_timesteps == list(range(17))  # the cut step is kept, as in the exact sweep
    assert [t for t, _ in imp.losses] == [0, 4, 8, 12, 16]
    # 32 strata of width 17/32 over [0, 17): every t in [0, cut] is drawn, the cut step included
    assert len(seen_t) == 64 and set(seen_t) == set(range(17))


def test_default_passes_stay_under_a_tenth_of_an_exact_64_image_sweep(scheduler):
    model = tiny_unet().requires_grad_(True)
    imp = estimate_fast(model, family_for(model), scheduler, _images(), threshold=0.0, grid_stride=10,
                        pairs_per_pass=64, progress=False)
    assert len(imp.kept_timesteps) == 40 and imp.cut is None
    assert 0 < imp.sample_gradient_evals <= 0.1 * 40 * 64


def test_config_refuses_fast_for_other_methods_and_unknown_estimators():
    with pytest.raises(DiffpruneError, match="diff-pruning"):
        PruneConfig(model="m", ratio=0.3, method="magnitude", estimator="fast")
    with pytest.raises(DiffpruneError, match="estimator"):
        PruneConfig(model="m", ratio=0.3, estimator="slow")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("m") / "pipe", num_train_timesteps=40)


def test_cli_fast_estimator_writes_a_folder_that_reloads(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(pipeline_dir), "--estimator", "fast", "--ratio", "0.3",
                 "--batch-size", "16", "--output-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "prune_report.json").read_text())
    assert report["importance"]["estimator"] == "fast" and report["importance"]["sample_gradient_evals"] > 0
    assert json.loads((out / "prune_config.json").read_text())["estimator"] == "fast"
    pipe = diffprune.load_pipeline(out)
    assert pipe.unet.pruning_info["method"]["name"] == "diff-pruning"
    assert pipe.unet.pruning_info["method"]["estimator"] == "fast"
    with torch.no_grad():
        y = pipe.unet(torch.randn(2, 1, 16, 16), torch.tensor([0, 30])).sample
    assert y.shape == (2, 1, 16, 16) and torch.isfinite(y).all()


def test_cli_fast_estimator_with_magnitude_is_one_line_exit_2(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(pipeline_dir), "--estimator", "fast", "--method", "magnitude",
                 "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "diff-pruning" in err and "fast" in err
    assert not out.exists()
