"""prune/size_search.py: sizes decided before the sweep equal the real prune's; unreachable targets fail
before any calibration work; non-monotone ratios warn; `--dry-run` writes nothing (issue 14)."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from conftest import save_tiny_pipeline, tiny_unet
from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffprune.cli import main
from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.io.structure import record_structure
from diffprune.prune import stage as prune_job
from diffprune.prune.complexity import count_macs_params
from diffprune.prune.importance import ImportanceResult
from diffprune.prune.pruning import PruneConfig, prune_model, prune_model_at_ratio
from diffprune.prune.size_search import SizePlanner, search_sizes


def _no_importance(method="random"):
    return ImportanceResult(method, 0.0, [], [], [], None, 0, 0.0)


def _unet(draw):
    width = draw(st.sampled_from([16, 24, 32]))
    attention = draw(st.booleans())
    return UNet2DModel(sample_size=8, in_channels=draw(st.sampled_from([1, 3])), out_channels=1,
                       block_out_channels=(width, 2 * width), layers_per_block=draw(st.sampled_from([1, 2])),
                       norm_num_groups=draw(st.sampled_from([4, 8])), attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D"),
                       up_block_types=("AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D"))


def _sd(draw):
    width = draw(st.sampled_from([16, 32]))
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(width, 2 * width),
                                layers_per_block=1, norm_num_groups=draw(st.sampled_from([4, 8])),
                                cross_attention_dim=8, attention_head_dim=draw(st.sampled_from([4, 8])),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _dit(draw):
    return DiTTransformer2DModel(num_attention_heads=draw(st.sampled_from([2, 4])),
                                 attention_head_dim=draw(st.sampled_from([4, 8])), in_channels=4, out_channels=8,
                                 num_layers=draw(st.sampled_from([1, 2])), sample_size=8, patch_size=2,
                                 num_embeds_ada_norm=10)


@st.composite
def small_prunes(draw):
    """A random small model of one family and a random pruning setting."""
    torch.manual_seed(draw(st.integers(0, 3)))
    model = draw(st.sampled_from([_unet, _sd, _dit]))(draw).eval()
    setting = {"ratio": draw(st.floats(0.05, 0.95)), "ratio_rule": draw(st.sampled_from(["torch-pruning", "paper"])),
               "round_to": draw(st.sampled_from([None, 4, 8])), "prune_heads": draw(st.booleans()),
               "seed": draw(st.integers(0, 3))}
    return model, setting


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(small_prunes())
def test_planned_sizes_equal_the_real_prune(case):
    """The plan (made on meta tensors, before any scores) is what the real prune gives: the whole
    structure (prune_model() asserts it), and params/MACs as counted on the real pruned model."""
    model, setting = case
    family = family_for(model)
    config = PruneConfig(model="m", method="random", **setting)
    plan = search_sizes(model, family, config, progress=False)
    out = prune_model(model, family, config, _no_importance(), progress=False, plan=plan)  # raises if it differs
    assert record_structure(out.model) == plan.chosen.structure
    real = count_macs_params(out.model, family.example_inputs(out.model))
    assert (out.macs[1], out.params[1]) == real
    assert (out.macs[0], out.params[0]) == count_macs_params(model, family.example_inputs(model))


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(small_prunes(), st.sampled_from(["global", "isomorphic"]), st.sampled_from(["random", "magnitude"]))
def test_planned_sizes_of_a_ranked_allocation_equal_the_real_prune(case, allocation, method):
    """global/isomorphic: the plan made from the group scores is what the real prune gives."""
    model, setting = case
    family = family_for(model)
    config = PruneConfig(model="m", method=method, allocation=allocation, **{**setting, "ratio_rule": "torch-pruning"})
    out = prune_model(model, family, config, _no_importance(method), progress=False)  # plans from the scores; checks
    assert record_structure(out.model) == out.plan.chosen.structure and out.plan.layer_ratios
    assert (out.macs[1], out.params[1]) == count_macs_params(out.model, family.example_inputs(out.model))


def tiny_sd(width=32):
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(width, 2 * width),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


@pytest.mark.parametrize("build", [tiny_unet, tiny_sd], ids=["unet", "sd"])
def test_one_to_one_groups_map_as_the_graph_does(build):
    """The planner's shortcut for one-to-one groups returns what torch-pruning's get_pruning_group does."""
    torch.manual_seed(0)
    model = build()
    planner = SizePlanner(model, family_for(model))
    rng = random.Random(0)
    checked = 0
    for g in planner._groups:
        if g.bijection is None:
            continue
        n = g.size * g.ch_groups
        idxs = sorted(rng.sample(range(n), rng.randint(1, n - 1)))
        fast = planner._group_removals(g, idxs)
        group = planner.graph.get_pruning_group(g.root, g.handler, idxs)
        assert [(dep, sorted(i)) for dep, i in fast] == [(dep, sorted(i)) for dep, i in group]
        checked += 1
    assert checked >= 5


def test_gated_feed_forward_widths_do_not_depend_on_the_scores():
    """GEGLU's two halves are pruned as pairs: the same size for every random importance seed."""
    sizes = set()
    for seed in range(3):
        model = tiny_sd()
        pruned = prune_model_at_ratio(model, family_for(model), _no_importance(), 0.3, seed=seed)
        ff = pruned.down_blocks[0].attentions[0].transformer_blocks[0].ff
        assert ff.net[0].proj.out_features == 2 * ff.net[2].in_features == 2 * int(128 * (1 - 0.3))  # of 128 units
        sizes.add(sum(p.numel() for p in pruned.parameters()))
    assert len(sizes) == 1


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("m") / "pipe", num_train_timesteps=40)


def test_unreachable_target_fails_before_any_sweep_and_names_the_option(pipeline_dir, tmp_path, monkeypatch):
    """0.60 of the MACs: no torch-pruning-rule ratio gives it, --ratio-rule paper does (0.586)."""
    def no_sweep(*args, **kwargs):
        raise AssertionError("the calibration data or the importance sweep was reached")

    for name in ("estimate", "estimate_fast", "make_dataset", "first_batch"):
        monkeypatch.setattr(prune_job, name, no_sweep)
    config = PruneConfig(model=str(pipeline_dir), method="diff-pruning", target_macs=0.6)
    with pytest.raises(DiffpruneError) as err:
        prune_job.run_prune(config, tmp_path / "o", progress=False)
    message = str(err.value)
    assert "unreachable" in message and "\n" not in message
    assert "nearest 0.564 (ratio" in message and "--ratio-rule paper (no --round-to) reaches 0.586" in message
    assert not (tmp_path / "o").exists()


def test_unreachable_under_every_option_lists_each_one():
    with pytest.raises(DiffpruneError) as err:
        search_sizes(tiny_unet(), family_for(tiny_unet()), PruneConfig(model="m", target_params=0.5, round_to=8),
                     progress=False)
    message = str(err.value)
    for option in ("--ratio-rule torch-pruning --round-to 8", "--ratio-rule paper --round-to 8",
                   "--ratio-rule torch-pruning (no --round-to)", "--ratio-rule paper (no --round-to)"):
        assert option + ": nearest " in message
    assert "under every option tried" in message


def test_a_ratio_that_prunes_less_than_a_smaller_one_warns(caplog):
    """Tiny UNet: ratio 0.9 would empty GroupNorm groups, which torch-pruning then leaves whole."""
    model = tiny_unet()
    with caplog.at_level(logging.WARNING, logger="diffprune.prune.size_search"):
        out = prune_model(model, family_for(model), PruneConfig(model="m", method="magnitude", ratio=0.9),
                    _no_importance("magnitude"), progress=False)
    assert out.macs[1] / out.macs[0] > 0.99  # almost nothing pruned at 0.9
    smaller = min((c for c in out.search if c["ratio"] < 0.9), key=lambda c: c["macs_fraction"])
    assert smaller["macs_fraction"] < 0.1
    warning = next(r.getMessage() for r in caplog.records if "smaller ratio" in r.getMessage())
    assert f"smaller ratio {smaller['ratio']:.4g} keeps only {smaller['macs_fraction']:.3f}" in warning
    assert len(out.search) == 8 and out.search[0]["whole_groups"] > 0  # the ratio, then 7 smaller probes


def test_a_monotone_ratio_is_quiet_and_costs_one_candidate(caplog):
    model = tiny_unet()
    with caplog.at_level(logging.WARNING, logger="diffprune.prune.size_search"):
        plan = search_sizes(model, family_for(model), PruneConfig(model="m", ratio=0.3), progress=False)
    assert len(plan.candidates) == 1 and plan.warnings == [] and not caplog.records


def test_dry_run_prints_the_size_and_writes_nothing(pipeline_dir, tmp_path, capsys):
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "o"
    code = main(["prune", "--model", str(pipeline_dir), "--target-macs", "0.56", "--data", str(tmp_path / "none"),
                 "--dry-run", "--output-dir", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0 and not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before
    assert "size search (target macs=0.560)" in stdout and "MACs" in stdout and "params" in stdout
    assert "32 -> 24" in stdout and "conv_in" in stdout and "nothing written" in stdout
    assert main(["prune", "--model", str(pipeline_dir), "--ratio", "0.3", "--dry-run"]) == 0  # no --output-dir
    assert "ratio=0.3000" in capsys.readouterr().out


def test_prune_report_records_the_search(pipeline_dir, tmp_path):
    config = PruneConfig(model=str(pipeline_dir), method="magnitude", target_macs=0.56)
    report = prune_job.run_prune(config, tmp_path / "o", progress=False)
    search = json.loads((tmp_path / "o" / "prune_report.json").read_text())["size_search"]
    assert search == json.loads(json.dumps(report["size_search"]))
    assert search["before_calibration"] and search["chosen_ratio"] == report["ratio"]
    assert len(search["candidates"]) >= 3 and all(c["time_s"] > 0 and c["macs"] > 0 for c in search["candidates"])
    assert abs(search["macs_fraction"] - 0.56) <= 0.02 and search["macs_fraction"] == report["macs"]["fraction"]
