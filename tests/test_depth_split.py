"""Structure 'both' with `--depth-split joint` (depth_split.py, issue 26): layers and channels ranked by the
one sweep's Taylor importance under one size target. The renaming that carries the sweep's gradients to
the shallower model, the slicing that keeps them through a width prune, the cost of each split and the
stage end to end (one sweep, the lowest-cost split, a folder that reloads)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, save_tiny_pipeline, tiny_unet
from diffusers import DDPMScheduler, DiTTransformer2DModel
from test_sampling import launch
from test_sweep_runtime import _same_model

from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.io import load_pipeline
from diffprune.prune import stage
from diffprune.prune.config import PruneConfig
from diffprune.prune.depth import remove_units, renamed_after_removal
from diffprune.prune.depth_scores import scored_units, size_counter
from diffprune.prune.depth_split import carried_importance, joint_plan, model_score
from diffprune.prune.importance import estimate
from diffprune.prune.pruning import prune_model_at_ratio

T = 30


def _deep_unet():
    return tiny_unet(layers_per_block=2, block_out_channels=(16, 32), norm_num_groups=4).requires_grad_(True)


def _dit(num_layers=5):
    torch.manual_seed(4)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=num_layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                 norm_num_groups=8).eval().requires_grad_(True)


def _importance(model):
    images = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sched = DDPMScheduler(num_train_timesteps=T)
    return estimate(model, family_for(model), sched, images, "diff-pruning", 0.0, progress=False)


def test_renaming_follows_the_modulelist_renumbering():
    names = [f"transformer_blocks.{i}.attn1.to_q.weight" for i in range(5)] + ["proj_out_1.weight"]
    renamed = renamed_after_removal(names, ["transformer_blocks.1", "transformer_blocks.3"])
    assert renamed == {"transformer_blocks.0.attn1.to_q.weight": "transformer_blocks.0.attn1.to_q.weight",
                       "transformer_blocks.2.attn1.to_q.weight": "transformer_blocks.1.attn1.to_q.weight",
                       "transformer_blocks.4.attn1.to_q.weight": "transformer_blocks.2.attn1.to_q.weight",
                       "proj_out_1.weight": "proj_out_1.weight"}
    unet = ["down_blocks.0.resnets.1.conv1.weight", "down_blocks.1.resnets.1.conv1.weight",
            "down_blocks.0.resnets.10.conv1.weight"]  # "resnets.1" must not match "resnets.10"
    assert renamed_after_removal(unet, ["down_blocks.0.resnets.0"]) == {
        "down_blocks.0.resnets.1.conv1.weight": "down_blocks.0.resnets.0.conv1.weight",
        "down_blocks.1.resnets.1.conv1.weight": "down_blocks.1.resnets.1.conv1.weight",
        "down_blocks.0.resnets.10.conv1.weight": "down_blocks.0.resnets.9.conv1.weight"}


@pytest.mark.parametrize("make, removed", [
    (_deep_unet, ["layers.0"]), (_deep_unet, ["layers.0", "mid_block"]),
    (_dit, ["transformer_blocks.1", "transformer_blocks.3"])])
def test_renaming_names_exactly_the_shallow_models_tensors(make, removed):
    """Every parameter of the model without the units is the base's one under the renamed name, and the
    renamed names are exactly the shallower model's: the carried gradients fit it one to one."""
    model = make()
    units, _ = scored_units(model, "magnitude", include_mid=True)
    chosen = [u for u in units if u.name in removed]
    assert len(chosen) == len(removed)
    shallow = remove_units(model, chosen)
    base, after = dict(model.named_parameters()), dict(shallow.named_parameters())
    renamed = renamed_after_removal(base, [m for u in chosen for m in u.modules])
    assert sorted(renamed.values()) == sorted(after)
    assert all(torch.equal(base[old], after[new]) for old, new in renamed.items())


def test_carried_importance_keeps_the_sweeps_gradients_under_the_new_names():
    model = _dit()
    importance = _importance_dit(model)
    units, _ = scored_units(model, "magnitude")
    chosen = [u for u in units if u.name == "transformer_blocks.2"]
    carried = carried_importance(importance, chosen[0].modules)
    shallow = dict(remove_units(model, chosen).named_parameters())
    assert carried.grads.keys() == shallow.keys()
    assert torch.equal(carried.grads["transformer_blocks.2.ff.net.2.weight"],
                       importance.grads["transformer_blocks.3.ff.net.2.weight"])
    assert carried.losses == importance.losses and carried.kept_timesteps == importance.kept_timesteps
    assert carried_importance(None, ["x"]) is None


def _importance_dit(model):
    images = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sched = DDPMScheduler(num_train_timesteps=T)
    return estimate(model, family_for(model), sched, images, "diff-pruning", 0.0, progress=False,
                    cond={"class_labels": torch.tensor([0, 3, 5, 7])})


def test_keep_grads_slices_the_gradients_with_the_weights():
    """With every gradient set to its own weight, the pruned copy's .grad equals its weight: torch-pruning
    sliced both the same way (what joint's cost of the width step reads). Where head dims went, to_q's
    weights took the softmax scale s = sqrt(d_new / d_old) and their gradients 1 / s (chain rule), so
    w = s^2 g there and |w g| is the base model's."""
    model = _deep_unet()
    importance = _importance(model)
    importance.grads = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruned = prune_model_at_ratio(model, family_for(model), importance, 0.4, keep_grads=True)
    params = dict(pruned.named_parameters())
    assert sum(p.numel() for p in params.values()) < sum(p.numel() for p in model.parameters())
    assert all(p.grad is not None for p in params.values())
    folded = {n for n, p in params.items() if not torch.equal(p.grad, p.detach())}
    assert folded and all(n.rsplit(".", 1)[0].endswith("to_q") for n in folded)
    modules, base = dict(pruned.named_modules()), dict(model.named_modules())
    for name in folded:
        attn = name.rsplit(".", 2)[0]
        new, old = modules[attn].to_q.out_features, base[attn].to_q.out_features  # heads kept: d ~ width
        assert torch.allclose(params[name].detach(), params[name].grad * (new / old), rtol=1e-5, atol=1e-7)
    plain = prune_model_at_ratio(model, family_for(model), importance, 0.4)
    assert all(p.grad is None for p in plain.parameters())


def test_joint_plan_takes_the_lowest_cost_split_and_costs_are_the_removed_taylor_sums():
    model = _deep_unet()
    family, importance = family_for(model), _importance(model)
    config = PruneConfig(model="m", structure="both", depth_split="joint", target_params=0.5, ratio_rule="paper",
                         depth_include_mid=True)
    units, scores = scored_units(model, "diff-pruning", include_mid=True, importance=importance, family=family)
    plan, split = joint_plan(model, family, config, importance, units, scores, size_counter(model, "params"))
    candidates = split["candidates"]
    assert split["mode"] == "joint" and candidates[0]["removed"] == [] and len(candidates) >= 2
    reachable = [c for c in candidates if c["cost"] is not None]
    best = candidates[split["chosen"]]
    assert best["cost"] == min(c["cost"] for c in reachable)
    assert [u.name for u in plan.removed] == best["removed"] and plan.fraction == best["depth_fraction"]
    grads, named = importance.grads, {n: p.detach() for n, p in model.named_parameters()}
    for c in reachable:
        assert c["fraction"] == pytest.approx(0.5, abs=0.03) and c["cost_width"] >= 0
        modules = [m for u in units if u.name in c["removed"] for m in u.modules]
        inside = [n for n in named if any(n.startswith(m + ".") for m in modules)]
        expected = sum(float((named[n].double() * grads[n].double()).abs().sum()) for n in inside)
        assert c["cost_depth"] == pytest.approx(expected, rel=1e-9)
    total = model_score(model, "diff-pruning", grads)
    assert all(0 < c["cost"] < total for c in reachable)


def test_config_joint_applies_to_both_and_version_3_reads_as_sqrt():
    with pytest.raises(DiffpruneError, match=r"depth_split='joint' applies to structure 'both'"):
        PruneConfig(model="m", structure="depth", depth_split="joint", target_macs=0.5)
    with pytest.raises(DiffpruneError, match=r"depth_split='diagonal' is not one of \('sqrt', 'joint'\)"):
        PruneConfig(model="m", structure="both", depth_split="diagonal", target_macs=0.5)
    v3 = {"stage": "prune", "version": 3, "model": "m", "structure": "both", "target_macs": 0.5}
    old = PruneConfig.from_dict(v3)
    assert old.depth_split == "sqrt" and old.to_dict()["version"] == 4


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("joint") / "pipe", _deep_unet(), num_train_timesteps=T)


def test_cli_joint_sweeps_once_and_writes_the_chosen_split(deep_dir, tmp_path, capsys, monkeypatch):
    sweeps = []
    real = stage._sweep
    monkeypatch.setattr(stage, "_sweep", lambda *a, **k: sweeps.append(1) or real(*a, **k))
    out = tmp_path / "joint"
    code, err = run_cli(["prune", "--model", deep_dir, "--structure", "both", "--depth-split", "joint",
                         "--target-params", "0.5", "--ratio-rule", "paper", "--batch-size", "6",
                         "--output-dir", out], capsys)
    assert code == 0, err
    assert len(sweeps) == 1
    report = json.loads((out / "prune_report.json").read_text())
    split = report["depth"]["split"]
    assert split["mode"] == "joint" and report["depth"]["removed"] == split["candidates"][split["chosen"]]["removed"]
    assert report["params"]["fraction"] == pytest.approx(0.5, abs=0.03)
    assert json.loads((out / "prune_config.json").read_text())["depth_split"] == "joint"
    unet = load_pipeline(out).unet
    assert sum(p.numel() for p in unet.parameters()) == report["params"]["after"]
    code, err = run_cli(["prune", "--model", deep_dir, "--structure", "depth", "--depth-split", "joint",
                         "--target-params", "0.5", "--output-dir", tmp_path / "bad"], capsys)
    assert code == 2 and "applies to structure 'both'" in err and len(err.strip().splitlines()) == 1


def test_dry_run_joint_shows_the_split_by_magnitude_and_writes_nothing(deep_dir, tmp_path, capsys, monkeypatch):
    """A dry run reads no data: the joint split is ranked by magnitude (sum w^2), the same way as its layers."""
    monkeypatch.chdir(tmp_path)
    from diffprune.cli import main

    code = main([str(a) for a in ("prune", "--model", deep_dir, "--structure", "both", "--depth-split", "joint",
                                  "--target-params", "0.5", "--ratio-rule", "paper", "--dry-run")])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert "magnitude order in a dry run" in printed and "size search (target params=" in printed, printed
    assert "split (joint): cost " in printed and "splits tried (channels only: " in printed, printed
    assert not any(tmp_path.iterdir())


def test_two_processes_split_like_one(deep_dir, tmp_path, capsys):
    """`accelerate launch` of 2 processes: both share the one sweep, then the main process alone plans the
    split, prunes and writes (the others stop after the sweep: no collective is left waiting) - the one-process
    folder."""
    args = ["prune", "--model", str(deep_dir), "--structure", "both", "--depth-split", "joint", "--target-params",
            "0.5", "--ratio-rule", "paper", "--batch-size", "6", "--micro-batch-size", "3"]
    proc = launch([*args, "--output-dir", str(tmp_path / "two")], 2, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote pruned pipeline") == 1
    assert run_cli([*args, "--output-dir", tmp_path / "one"], capsys)[0] == 0
    _same_model(tmp_path / "one", tmp_path / "two")
    two, one = (json.loads((tmp_path / d / "prune_report.json").read_text()) for d in ("two", "one"))
    assert two["depth"]["removed"] == one["depth"]["removed"] and two["importance"]["runtime"]["num_processes"] == 2


@pytest.mark.parametrize("family_name", ["sd", "sdxl", "pixart", "sd3", "dit"])
def test_every_family_joint_split_prunes_to_the_target_and_runs(family_name):
    """Each denoiser family through the stage's joint path (prune_depth, then width on the carried gradients):
    the chosen split reaches the target, the gradients follow the renumbered blocks, the model runs. Gradients
    are random (any sweep's would do: the split arithmetic is what is tested)."""
    from test_depth_stage import _family_pipelines

    from diffprune.prune.config import width_rest
    from diffprune.prune.depth_split import carried_importance
    from diffprune.prune.depth_stage import prune_depth
    from diffprune.prune.importance import ImportanceResult
    from diffprune.prune.pruning import prune_model

    if family_name == "dit":
        model = _dit(num_layers=4)
    else:
        pipe = _family_pipelines()[family_name]()
        model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    family = family_for(model)
    g = torch.Generator().manual_seed(2)
    grads = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    importance = ImportanceResult("diff-pruning", 0.0, [0], [(0, 1.0)], [], grads, 1, 0.0)
    config = PruneConfig(model="m", structure="both", depth_split="joint", target_params=0.6, ratio_rule="paper",
                         prune_heads=family_name == "sd3")  # SD3.5's qk-norm: whole heads only
    shallow, depth = prune_depth(model.eval(), family, config, importance, None)
    split = depth["split"]
    assert split["mode"] == "joint" and depth["removed"] == split["candidates"][split["chosen"]]["removed"]
    carried = carried_importance(importance, depth["modules"])
    assert carried.grads.keys() == dict(shallow.named_parameters()).keys()
    assert all(carried.grads[n].shape == p.shape for n, p in shallow.named_parameters())
    width = width_rest(config, depth)
    pruned = shallow if width is None else prune_model(shallow, family, width, carried, progress=False).model
    fraction = sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in model.parameters())
    assert fraction == pytest.approx(split["candidates"][split["chosen"]]["fraction"], abs=1e-9)
    assert fraction <= 0.6 + 0.02
    with torch.no_grad():
        out = pruned(**family.example_inputs(pruned, batch_size=2), return_dict=False)[0]
    assert torch.isfinite(out).all()
