"""prune/allocation.py: one budget, uniform / global / isomorphic widths (issue 16 part 3), and the config defaults.

Every allocation reaches its target (size_search's tolerance) with valid widths (GroupNorm groups,
heads and round_to divide them, no group emptied, protected layers whole), the real prune equals the
plan (SizePlan.check runs inside `prune_model`), the folder reloads bit-exactly, a global ranking really
moves channels between layers when the scores are skewed, and uniform is the paper's prune unchanged.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import run_cli, save_tiny_pipeline, tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler, DiTTransformer2DModel

from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.io import load_pipeline, to_pruned
from diffprune.io.structure import widths
from diffprune.prune.allocation import MAX_GROUP_RATIO, allocate, group_scores, kept_dims
from diffprune.prune.bisection import TARGET_TOLERANCE
from diffprune.prune.config import PruneConfig
from diffprune.prune.importance import ImportanceResult, estimate
from diffprune.prune.pruning import prune_model, prune_model_at_ratio

ALLOCATIONS = ("uniform", "global", "isomorphic")
INFO = {"format": "diffprune-pruning", "format_version": 1, "base_class": "UNet2DModel",
        "base_model": {"id": "test", "revision": None}, "method": {"name": "diff-pruning"}, "kept_timesteps": []}


@pytest.fixture(scope="module")
def unet_and_importance():
    model = tiny_unet(seed=3)
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    imp = estimate(model, family_for(model), DDPMScheduler(num_train_timesteps=12), images, "diff-pruning",
                   threshold=0.05, progress=False)
    return model, imp


def _check_widths(model, pruned, round_to=None):
    """GroupNorm/attention/round_to divide every width; nothing emptied; protected layers whole."""
    before, after = dict(model.named_modules()), dict(pruned.named_modules())
    for name, m in after.items():
        if isinstance(m, torch.nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0 and m.num_channels >= m.num_groups
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            width = m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features
            total = before[name].out_channels if isinstance(m, torch.nn.Conv2d) else before[name].out_features
            assert width >= math.ceil(total * (1 - MAX_GROUP_RATIO) - 1e-9), name
            if round_to and width != total:
                assert width % round_to == 0, (name, width)
    assert pruned.conv_out.out_channels == 1 and pruned.conv_in.in_channels == 1  # protected / input


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("round_to", [None, 8])
def test_each_allocation_reaches_the_target_with_valid_widths(allocation, round_to, unet_and_importance):
    model, imp = unet_and_importance
    cfg = PruneConfig(model="m", target_macs=0.56, allocation=allocation, estimator="exact", round_to=round_to)
    out = prune_model(model, family_for(model), cfg, imp, progress=False)  # SizePlan.check: real prune == plan
    assert abs(out.macs[1] / out.macs[0] - 0.56) <= TARGET_TOLERANCE
    _check_widths(model, out.model, round_to)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        y = out.model(x, torch.tensor([1, 9])).sample
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert out.plan.allocation == allocation and (out.plan.layer_ratios is None) == (allocation == "uniform")


def test_uniform_is_the_unchanged_prune(unet_and_importance):
    """allocation='uniform' (and a version-1 config, which had no allocation) is prune_model_at_ratio at the ratio."""
    model, imp = unet_and_importance
    fam = family_for(model)
    out = prune_model(model, fam, PruneConfig(model="m", target_macs=0.56, estimator="exact"), imp, progress=False)
    direct = prune_model_at_ratio(model, fam, imp, out.ratio)
    old = PruneConfig.from_dict({"stage": "prune", "version": 1, "model": "m", "target_macs": 0.56})
    again = prune_model(model, fam, old, imp, progress=False)
    for other in (direct, again.model):
        for (k, a), (k2, b) in zip(out.model.state_dict().items(), other.state_dict().items(), strict=True):
            assert k == k2 and torch.equal(a, b)


def _skewed_unet():
    """A UNet whose first down-block conv has 28 of its 32 output channels near zero: skewed scores there."""
    model = tiny_unet(seed=5)
    with torch.no_grad():
        model.down_blocks[0].resnets[0].conv1.weight[4:] *= 1e-3
    return model


def test_global_moves_channels_to_where_the_scores_say():
    model = _skewed_unet()
    fam = family_for(model)
    imp = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
    outs = {a: prune_model(model, fam, PruneConfig(model="m", method="magnitude", target_macs=0.56, allocation=a),
                     imp, progress=False) for a in ("uniform", "global")}
    w = {a: widths(o.widths_after) for a, o in outs.items()}
    name = "down_blocks.0.resnets.0.conv1"
    assert w["global"][name] < w["uniform"][name]  # the skewed layer gives up more
    assert w["global"][name] >= math.ceil(32 * (1 - MAX_GROUP_RATIO))  # but is never emptied
    gained = [n for n in w["uniform"] if w["global"][n] > w["uniform"][n]]
    assert gained  # ... and other layers keep more under the same budget
    assert abs(outs["global"].macs[1] / outs["global"].macs[0] - 0.56) <= TARGET_TOLERANCE


def test_kept_dims_rank_as_torch_pruning_and_respect_the_cap():
    from diffprune.prune.allocation import GroupSpec

    flat = GroupSpec(("a",), 10, 1, "s", torch.linspace(0.5, 1.5, 10, dtype=torch.float64))
    skew = GroupSpec(("b", "b2"), 10, 2, "t", torch.tensor([0.01 * (i + 1) for i in range(9)] + [9.55],
                                                           dtype=torch.float64))
    # global, ratio 0.3: 6 of the 20 ranked dims go, all from the skewed group (scores <= its 0.06)
    assert kept_dims([flat, skew], 0.3, "global", None) == [10, 4]
    assert kept_dims([flat, skew], 0.3, "isomorphic", None) == [7, 7]  # own scopes: 3 of 10 each
    # ratio 0.5: the threshold (0.5) would take 9 of b's 10: the cap keeps ceil(10 * (1 - 0.9)) = 1
    assert kept_dims([flat, skew], 0.5, "global", None) == [9, 1]
    # round_to 4: a (1 channel group) keeps multiples of 4; b (2 channel groups) multiples of 2, at least one step
    assert kept_dims([flat, skew], 0.5, "global", 4) == [8, 2]
    ratios = allocate([flat, skew], 0.3, "global", None)
    assert set(ratios) == {"a", "b", "b2"} and int(10 * (1 - ratios["a"])) == 10 and int(10 * (1 - ratios["b"])) == 4


def test_dit_global_keeps_heads_whole_and_widths_rounded():
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.2)
    fam = family_for(model)
    imp = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
    out = prune_model(model, fam, PruneConfig(model="m", method="magnitude", target_params=0.6, allocation="global",
                                        round_to=4), imp, progress=False)
    assert abs(out.params[1] / out.params[0] - 0.6) <= TARGET_TOLERANCE
    for block in out.model.transformer_blocks:
        q = block.attn1.to_q.out_features
        assert block.attn1.heads == 4 and q == block.attn1.to_k.out_features == block.attn1.to_v.out_features
        assert q % 4 == 0 and block.ff.net[0].proj.out_features % 4 == 0  # heads x head dim, round_to 4
    assert out.model.proj_out_2.out_features == 2 * 2 * 8  # the output layer is protected


def test_scores_match_the_planner_groups(unet_and_importance):
    """The scored groups (real weights) and the planner's (meta copy) name the same layers in the same order."""
    from diffprune.prune.size_search import SizePlanner

    model, imp = unet_and_importance
    fam = family_for(model)
    scored = group_scores(model, fam, imp)
    planned = SizePlanner(model, fam).specs
    assert [g.keys for g in scored] == [g.keys for g in planned] and all(g.scores is not None for g in scored)
    assert [len(g.scores) for g in scored] == [g.size for g in planned]


def test_folder_of_a_global_prune_reloads_bit_exactly(unet_and_importance, tmp_path):
    model, imp = unet_and_importance
    out = prune_model(model, family_for(model), PruneConfig(model="m", target_macs=0.56, allocation="global",
                                                      estimator="exact"), imp, progress=False)
    pruned = to_pruned(out.model, INFO)
    DDPMPipeline(unet=pruned, scheduler=DDPMScheduler(num_train_timesteps=20)).save_pretrained(
        tmp_path / "p", safe_serialization=True)
    again = load_pipeline(tmp_path / "p").unet
    for (k, a), (k2, b) in zip(pruned.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_config_versions_and_defaults():
    assert PruneConfig(ratio=0.3).estimator == "fast" and PruneConfig(ratio=0.3).allocation == "uniform"
    assert PruneConfig(ratio=0.3, method="magnitude").estimator == "exact"  # its only estimator
    v1 = {"stage": "prune", "version": 1, "model": "m", "ratio": 0.3}
    assert PruneConfig.from_dict(v1).estimator == "exact"  # version 1's default
    assert PruneConfig.from_dict({**v1, "estimator": "fast"}).estimator == "fast"  # as saved
    cfg = PruneConfig(ratio=0.3, allocation="isomorphic")
    assert PruneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(DiffpruneError, match="allocation 'uniform' only"):
        PruneConfig(ratio=0.3, allocation="global", ratio_rule="paper")
    with pytest.raises(DiffpruneError, match="allocation='wide'"):
        PruneConfig(ratio=0.3, allocation="wide")
    with pytest.raises(DiffpruneError, match="estimator='fast' applies"):
        PruneConfig(ratio=0.3, method="magnitude", estimator="fast")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    # 20 timesteps: the default (fast) estimator's sweep stays short
    return save_tiny_pipeline(tmp_path_factory.mktemp("alloc") / "pipe", unet=tiny_unet(seed=3), num_train_timesteps=20)


def test_cli_global_writes_widths_and_estimator_into_the_report(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, err = run_cli(["prune", "--model", pipeline_dir, "--allocation", "global", "--target-macs", "0.6",
                         "--batch-size", "8", "--output-dir", out], capsys)
    assert code == 0, err
    report = json.loads((out / "prune_report.json").read_text())
    assert report["estimator"] == "fast" and report["config"]["estimator"] == "fast"  # the new default
    assert report["allocation"]["mode"] == "global" and report["allocation"]["max_group_ratio"] == MAX_GROUP_RATIO
    assert report["size_search"]["before_calibration"] is False
    rows = report["allocation"]["groups"]
    assert rows and all(1 <= r["kept"] <= r["total"] for r in rows)
    assert {r["layer"]: r["kept"] for r in rows} == {r["layer"]: report["widths"]["after"][r["layer"]] for r in rows}
    assert abs(report["macs"]["fraction"] - 0.6) <= TARGET_TOLERANCE
    assert load_pipeline(out).unet.pruning_info["method"]["allocation"] == "global"


def test_cli_unreachable_global_target_fails_before_the_sweep(pipeline_dir, tmp_path, capsys, monkeypatch):
    import diffprune.prune.stage as stage

    monkeypatch.setattr(stage, "estimate_fast", lambda *a, **k: pytest.fail("the sweep ran"))
    code, err = run_cli(["prune", "--model", pipeline_dir, "--allocation", "isomorphic", "--target-macs", "0.01",
                         "--output-dir", tmp_path / "x"], capsys)
    assert code == 2 and "unreachable" in err and "--allocation isomorphic" in err
    assert len(err.strip().splitlines()) == 1
    code, err = run_cli(["prune", "--model", pipeline_dir, "--allocation", "global", "--dry-run"], capsys)
    assert code == 2 and "--dry-run needs --allocation uniform" in err


def test_a_target_between_two_steps_names_the_sizes_on_either_side(unet_and_importance):
    """GroupNorm groups of 4 channels move in 25% steps: a target inside such a jump is refused with its neighbours."""
    from diffprune.prune.size_search import SizePlanner, search_sizes

    model, imp = unet_and_importance
    fam = family_for(model)
    scores = group_scores(model, fam, imp)
    planner = SizePlanner(model, fam)
    planner.layer_ratios_for = lambda r: allocate(scores, r, "isomorphic")
    sizes = [planner.evaluate(r / 40).macs_fraction for r in range(1, 38)]
    above, below = next((a, b) for a, b in zip(sizes, sizes[1:], strict=False) if a - b > 4.5 * TARGET_TOLERANCE)
    target = (above + below) / 2
    with pytest.raises(DiffpruneError, match="falls between two sizes") as err:
        search_sizes(model, fam, PruneConfig(model="m", target_macs=target, allocation="isomorphic",
                                             estimator="exact"), progress=False, scores=scores)
    lo, hi = (float(v) for v in re.search(r"nearest ([\d.]+) \(ratio [\d.]+\) / ([\d.]+)", str(err.value)).groups())
    assert below - 5e-4 <= lo < target < hi <= above + 5e-4  # the sizes either side, at least as near as the scan's
    assert hi - lo > 2 * TARGET_TOLERANCE
