"""Depth pruning (issue 26, prune/depth.py, prune/depth_scores.py) on tiny models of every family.

Units are listed as the BK-SDM / ShortGPT rules say; removing units keeps the output shape, and the
result saved with save_pretrained loads in plain diffusers (`TheClass.from_pretrained`) with no
missing or unexpected keys and bit-identical outputs. Scores equal in-test reimplementations; block
influence of a unit made an identity is ~0; bad units are refused in one line.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_sd_unet, tiny_unet
from diffusers import (
    DiTTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)

from diffprune.errors import DiffpruneError
from diffprune.families import family_for
from diffprune.io import load_unet, to_pruned
from diffprune.prune.complexity import count_macs_params
from diffprune.prune.depth import (
    DepthUnit,
    Part,
    allowed_indices,
    depth_units,
    prove_config,
    remap_indices,
    remove_units,
)
from diffprune.prune.depth_scores import part_scores, plan_depth, scored_units, size_counter, unit_scores
from diffprune.prune.importance import ImportanceResult
from diffprune.prune.pruning import prune_model_at_ratio


def tiny_sdxl(nested: bool = False):
    """SDXL's layout in miniature: text_time added conditioning, 2 transformer layers at level 1."""
    torch.manual_seed(3)
    tlpb = dict(transformer_layers_per_block=((1, 1), (1, 2)), reverse_transformer_layers_per_block=(
        (2, 1, 1), (1, 1, 1))) if nested else dict(transformer_layers_per_block=(1, 2))
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=2, norm_num_groups=8, cross_attention_dim=32,
                                attention_head_dim=(2, 4),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
                                use_linear_projection=True, **tlpb).eval()


def tiny_dit(layers=3):
    torch.manual_seed(4)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def tiny_pixart():
    torch.manual_seed(0)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=6, in_channels=4, out_channels=8,
                                    num_layers=3, cross_attention_dim=12, caption_channels=16, sample_size=8,
                                    patch_size=2).eval()


def tiny_sd3():
    """SD3.5-style: dual attention in blocks 0 and 1 of 3."""
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=6,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=12,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8, qk_norm="rms_norm",
                                 dual_attention_layers=(0, 1)).eval()


MODELS = {
    "unet2d": lambda: tiny_unet(layers_per_block=2),
    "sd": lambda: tiny_sd_unet(layers_per_block=2),
    "sdxl": tiny_sdxl,
    "sdxl-nested": lambda: tiny_sdxl(nested=True),
    "dit": tiny_dit,
    "pixart": tiny_pixart,
    "sd3": tiny_sd3,
}
PAIR = ("{d}.resnets.{j}", "{d}.attentions.{j}", "{u}.resnets.{k}", "{u}.attentions.{k}")
EXPECTED_UNITS = {  # BK-SDM's pairs (j, k) = (1, 1); the mid block only with include_mid
    "unet2d": {"layers.0": ("down_blocks.0.resnets.1", "up_blocks.1.resnets.1", "down_blocks.1.resnets.1",
                            "down_blocks.1.attentions.1", "up_blocks.0.resnets.1", "up_blocks.0.attentions.1"),
               "mid_block": ("mid_block",)},
    "sd": {"level0.0": ("down_blocks.0.resnets.1", "down_blocks.0.attentions.1", "up_blocks.1.resnets.1",
                        "up_blocks.1.attentions.1"),
           "level1.0": ("down_blocks.1.resnets.1", "up_blocks.0.resnets.1"), "mid_block": ("mid_block",)},
    "sdxl": {"level0.0": ("down_blocks.0.resnets.1", "up_blocks.1.resnets.1"),
             "level1.0": ("down_blocks.1.resnets.1", "down_blocks.1.attentions.1", "up_blocks.0.resnets.1",
                          "up_blocks.0.attentions.1"), "mid_block": ("mid_block",)},
    "dit": {f"transformer_blocks.{i}": (f"transformer_blocks.{i}",) for i in range(3)},
    "pixart": {f"transformer_blocks.{i}": (f"transformer_blocks.{i}",) for i in range(3)},
    "sd3": {f"transformer_blocks.{i}": (f"transformer_blocks.{i}",) for i in range(2)},  # not the last
}
EXPECTED_UNITS["sdxl-nested"] = EXPECTED_UNITS["sdxl"]
# (units removed, config keys expected afterwards)
REMOVALS = {
    "unet2d": [(["layers.0"], {"layers_per_block": 1}),
               (["layers.0", "mid_block"], {"layers_per_block": 1, "mid_block_type": None})],
    "sd": [(["level1.0"], {"layers_per_block": (2, 1)}), (["level0.0", "level1.0"], {"layers_per_block": 1})],
    "sdxl": [(["level1.0"], {"layers_per_block": (2, 1), "transformer_layers_per_block": (1, 2)}),
             (["level0.0", "mid_block"], {"layers_per_block": (1, 2), "mid_block_type": None})],
    "sdxl-nested": [(["level1.0"], {"layers_per_block": (2, 1), "transformer_layers_per_block": ((1, 1), (1,)),
                                    "reverse_transformer_layers_per_block": ((2, 1), (1, 1, 1))}),
                    (["level0.0", "level1.0"], {"layers_per_block": 1})],
    "dit": [(["transformer_blocks.1"], {"num_layers": 2}),
            (["transformer_blocks.0", "transformer_blocks.2"], {"num_layers": 1})],
    "pixart": [(["transformer_blocks.2"], {"num_layers": 2}),
               (["transformer_blocks.0", "transformer_blocks.1"], {"num_layers": 1})],
    "sd3": [(["transformer_blocks.0"], {"num_layers": 2, "dual_attention_layers": (0,)}),
            (["transformer_blocks.0", "transformer_blocks.1"], {"num_layers": 1, "dual_attention_layers": ()})],
}


def _inputs(model, n=2, seed=0):
    """(x_t, t, cond) for family.predict: example inputs with random latents and timesteps."""
    fam = family_for(model)
    g = torch.Generator().manual_seed(seed)
    x = fam.example_inputs(model, batch_size=n)
    x = next(v for k, v in x.items() if k in ("sample", "hidden_states"))
    cond = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() and k != "encoder_attention_mask" else v
            for k, v in fam.example_cond(model, batch_size=n).items()}
    if isinstance(model, DiTTransformer2DModel):
        cond["class_labels"] = torch.tensor([1, 3][:n])
    return torch.randn(x.shape, generator=g), torch.tensor([3, 7][:n]), cond


@torch.no_grad()
def _predict(model, batch):
    return family_for(model).predict(model, *batch)


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


@pytest.mark.parametrize("kind", list(MODELS))
def test_units_are_listed_as_the_rules_say(kind):
    model = MODELS[kind]()
    units = depth_units(model, include_mid=True)
    assert {u.name: u.modules for u in units} == EXPECTED_UNITS[kind]
    for u in units:
        assert u.params == sum(p.numel() for m in u.modules for p in model.get_submodule(m).parameters()) > 0
    assert "mid_block" not in [u.name for u in depth_units(model)]


def test_unet_allowed_indices_follow_diffusers_shapes():
    """L = 3, widths (32, 64): level 0 keeps its width (down j = 0 allowed; up k = 3 takes a 32 skip = its
    width, k = 0 takes the 64-wide level below: refused); level 1 widens 32 -> 64 (down j = 0 refused; up
    k = 0 follows the 64-wide mid block: allowed, k = 3 takes a 32 skip: refused)."""
    model = tiny_sd_unet(layers_per_block=3)
    assert allowed_indices(model, 0) == ([0, 1, 2], [1, 2, 3])
    assert allowed_indices(model, 1) == ([1, 2], [0, 1, 2])
    units = {u.name: u.modules for u in depth_units(model)}
    assert list(units) == ["level0.0", "level0.1", "level1.0", "level1.1"]
    assert units["level1.0"] == ("down_blocks.1.resnets.2", "up_blocks.0.resnets.1")
    out = remove_units(model, ["level0.0", "level0.1", "level1.1"])
    assert out.config.layers_per_block == (1, 2)
    assert _predict(out, _inputs(model)).shape == (2, 4, 8, 8)


@pytest.mark.parametrize("kind", list(MODELS))
def test_removed_units_load_in_plain_diffusers(kind, tmp_path):
    model = MODELS[kind]()
    batch = _inputs(model)
    expected_shape = _predict(model, batch).shape
    for i, (names, config) in enumerate(REMOVALS[kind]):
        out = remove_units(model, names)
        assert type(out) is type(model) and out is not model
        assert {k: _as_tuples(out.config[k]) for k in config} == config
        gone = {m for u in depth_units(model, include_mid=True) if u.name in names for m in u.modules}
        assert sum(p.numel() for p in out.parameters()) == sum(p.numel() for p in model.parameters()) - sum(
            p.numel() for m in gone for p in model.get_submodule(m).parameters())
        pred = _predict(out, batch)
        assert pred.shape == expected_shape and torch.isfinite(pred).all()
        out.save_pretrained(tmp_path / str(i), safe_serialization=True)
        again, info = type(model).from_pretrained(tmp_path / str(i), output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
        assert torch.equal(_predict(again.eval(), batch), pred)


def test_removing_no_unit_returns_an_identical_copy():
    model = tiny_sdxl()
    out = remove_units(model, [])
    assert out is not model and dict(out.config) == dict(model.config)
    mine, theirs = model.state_dict(), out.state_dict()
    assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    batch = _inputs(model)
    assert torch.equal(_predict(out, batch), _predict(model, batch))


def test_remaining_weights_are_the_original_ones_renumbered():
    model = tiny_dit(layers=3)
    out = remove_units(model, ["transformer_blocks.1"])
    for new, old in ((0, 0), (1, 2)):
        a, b = out.transformer_blocks[new].state_dict(), model.transformer_blocks[old].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert remap_indices([0, 1, 4, 5], [1, 3]) == (0, 2, 3)


def _random_grads(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return ImportanceResult("diff-pruning", 0.05, [0], [], [], {n: torch.randn(p.shape, generator=g)
                                                               for n, p in model.named_parameters()}, 1, 0.0)


def _taylor_by_hand(model, unit, grads):
    """sum |w * g| over the unit's parameters, per parameter (depth_scores.TAYLOR_PER_PARAM)."""
    total, count = 0.0, 0
    for m in unit.modules:
        for n, p in model.get_submodule(m).named_parameters():
            total += float((p.detach().double() * grads[f"{m}.{n}"].double()).abs().sum())
            count += p.numel()
    return total / count


@pytest.mark.parametrize("kind", ["sd", "dit", "sd3"])
def test_taylor_score_is_the_sum_of_abs_w_times_g(kind):
    model = MODELS[kind]()
    units = depth_units(model, include_mid=True)
    imp = _random_grads(model)
    scores = unit_scores(model, units, "diff-pruning", importance=imp)
    assert scores == pytest.approx({u.name: _taylor_by_hand(model, u, imp.grads) for u in units}, rel=1e-9)
    mags = unit_scores(model, units, "magnitude")
    assert mags == pytest.approx({u.name: sum(float(p.detach().double().pow(2).sum()) for m in u.modules for p in
                                              model.get_submodule(m).parameters()) / u.params for u in units})


def test_taylor_from_a_real_sweep_picks_the_unet_pairs_by_score():
    """The calibration sweep (importance.estimate) feeds the scores; each level's (j, k) is the allowed
    pair with the lowest part scores, and the unit score is the sum over its parts."""
    from diffusers import DDPMScheduler

    from diffprune.prune.importance import estimate

    model = tiny_sd_unet(layers_per_block=3)
    fam = family_for(model)
    x, _, cond = _inputs(model)
    imp = estimate(model, fam, DDPMScheduler(num_train_timesteps=3), x, "taylor", progress=False, cond=cond)
    parts = part_scores(model, "taylor", importance=imp)
    units, scores = scored_units(model, "taylor", importance=imp)
    for level, up in ((0, 1), (1, 0)):
        js, ks = allowed_indices(model, level)
        j = min(js, key=lambda j: parts[f"down_blocks.{level}.resnets.{j}"])
        k = min(ks, key=lambda k: parts[f"up_blocks.{up}.resnets.{k}"])
        unit = next(u for u in units if u.name == f"level{level}.0")
        assert unit.parts[0].name == f"down_blocks.{level}.resnets.{j}"
        assert unit.parts[1].name == f"up_blocks.{up}.resnets.{k}"
    assert scores == pytest.approx({u.name: _taylor_by_hand(model, u, imp.grads) for u in units}, rel=1e-9)
    remove_units(model, units)  # the chosen pairs are removable together


@torch.no_grad()
def _make_identity(model, prefix):
    """Zero every output projection of the layer at `prefix`, so it returns its input."""
    ends = ("to_out.0", "to_add_out", "ff.net.2", "ff_context.net.2", "proj_out", "conv2")
    for name, m in model.named_modules():
        if name.startswith(prefix + ".") and name.endswith(ends) and isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
            m.weight.zero_()
            if m.bias is not None:
                m.bias.zero_()


@pytest.mark.parametrize("kind,part", [("dit", "transformer_blocks.1"), ("pixart", "transformer_blocks.0"),
                                       ("sd3", "transformer_blocks.0"), ("unet2d", "down_blocks.1.resnets.1"),
                                       ("sd", "up_blocks.0.resnets.1"),
                                       ("sdxl", "down_blocks.1.resnets.1")])
def test_block_influence_of_an_identity_layer_is_zero(kind, part):
    model = MODELS[kind]()
    _make_identity(model, part)
    _make_identity(model, part.replace("resnets", "attentions"))  # UNet pairs: the attention too
    if part.startswith("up_blocks"):  # its shortcut passes the hidden state on and drops the skip behind it
        with torch.no_grad():
            shortcut = model.get_submodule(part).conv_shortcut
            shortcut.weight.zero_()
            shortcut.bias.zero_()
            shortcut.weight[:, : shortcut.out_channels, 0, 0] = torch.eye(shortcut.out_channels)
    scores = part_scores(model, "block-influence", inputs=[_inputs(model, seed=0), _inputs(model, seed=1)])
    assert abs(scores[part]) < 1e-5
    others = [v for k, v in scores.items() if k != part]
    assert others and min(others) > 1e-4  # the others do change their input
    units = depth_units(model)
    by_unit = unit_scores(model, units, "block-influence", inputs=[_inputs(model)])
    unit = next(u for u in units if part in [p.name for p in u.parts])
    parts_alone = part_scores(model, "block-influence", inputs=[_inputs(model)])
    assert by_unit[unit.name] == pytest.approx(sum(parts_alone[p.name] for p in unit.parts))


def test_bad_units_and_methods_are_refused_in_one_line():
    model, other = tiny_dit(layers=3), tiny_pixart()
    cases = [
        (lambda: remove_units(model, ["transformer_blocks.7"]), "does not exist"),
        (lambda: remove_units(model, depth_units(other)[:1]), "not a unit of this"),
        (lambda: remove_units(tiny_dit(layers=2), depth_units(tiny_dit(layers=3))[2:]), "not a unit of this"),
        (lambda: remove_units(model, ["transformer_blocks.0", "transformer_blocks.0"]), "overlaps"),
        (lambda: remove_units(tiny_sd3(), [DepthUnit("last", depth_units(tiny_dit())[0].parts)]), "not a unit"),
        (lambda: unit_scores(model, depth_units(model), "depth-magic"), "is not one of"),
        (lambda: unit_scores(model, depth_units(model), "taylor"), "needs an importance"),
        (lambda: unit_scores(model, depth_units(model), "block-influence"), "needs calibration inputs"),
        (lambda: unit_scores(model, depth_units(model), "taylor", importance=_random_grads(other)), "another model"),
        (lambda: depth_units(torch.nn.Linear(2, 2)), "not supported"),
    ]
    unfit = remove_units(model, ["transformer_blocks.1"])
    unfit.register_to_config(num_layers=3)  # a config that builds other tensors than the model holds
    cases.append((lambda: prove_config(unfit, "transformer_blocks.1"), "not expressible in the config"))
    unet = tiny_unet(layers_per_block=2)
    half = DepthUnit("half", depth_units(unet)[0].parts[:1])  # a down layer without its up layer
    cases.append((lambda: remove_units(unet, [half]), "as many down as up"))
    for call, words in cases:
        with pytest.raises(DiffpruneError) as err:
            call()
        assert words in str(err.value) and "\n" not in str(err.value)


def test_last_sd3_block_is_refused():
    model = tiny_sd3()
    params = sum(p.numel() for p in model.transformer_blocks[2].parameters())
    last = DepthUnit("x", (Part("transformer_blocks.2", ("transformer_blocks.2",), params),))
    with pytest.raises(DiffpruneError, match="context_pre_only"):
        remove_units(model, [last])


def test_plan_removes_lowest_scores_until_the_target():
    units = [DepthUnit(n, ()) for n in "abcd"]
    sizes = {"a": 30, "b": 20, "c": 25, "d": 10}

    def size_of(chosen):
        if [u.name for u in chosen] == ["c"]:
            raise DiffpruneError("c cannot go first")
        return 100 - sum(sizes[u.name] for u in chosen)

    plan = plan_depth(units, {"a": 3.0, "b": 1.0, "c": 0.5, "d": 2.0}, size_of, 0.6)
    assert [u.name for u in plan.removed] == ["b", "c"] and plan.reached and plan.fraction == 0.55
    assert plan.trace == [("b", 0.8), ("c", 0.55)]
    plan = plan_depth(units, {"a": 3.0, "b": 1.0, "c": 0.5, "d": 2.0}, size_of, 0.1)
    assert not plan.reached and plan.fraction == pytest.approx(0.15) and "combine with width" in plan.message
    assert plan_depth(units, dict.fromkeys("abcd", 0.0), size_of, 1.0).removed == []
    with pytest.raises(DiffpruneError, match="no score"):
        plan_depth(units, {"a": 1.0}, size_of, 0.5)


def test_size_counter_counts_the_removed_model():
    model = tiny_sdxl()
    units = depth_units(model, include_mid=True)
    count = size_counter(model)
    fam = family_for(model)
    for chosen in ([], units[:1], units):
        real = remove_units(model, chosen)
        assert count(chosen) == count_macs_params(real, fam.example_inputs(real))[0]
    plan = plan_depth(units, {u.name: -u.params for u in units}, count, 0.8)  # biggest first
    assert plan.reached and plan.fraction <= 0.8 and plan.removed[0].name == max(units, key=lambda u: u.params).name


@pytest.mark.parametrize("kind", ["unet2d", "dit"])
def test_depth_on_a_width_pruned_model_loads_with_its_loader(kind, tmp_path):
    """A width-pruned (Pruned*) model: the proof rebuilds it with its own loader (config + structure);
    save_pretrained + load_unet give it back bit-identical."""
    model = MODELS[kind]()
    info = {"format": "diffprune-pruning", "format_version": 1, "base_class": type(model).__name__,
            "base_model": {"id": "test", "revision": None}, "method": {"name": "magnitude"}, "kept_timesteps": []}
    magnitude = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
    pruned = to_pruned(prune_model_at_ratio(model, family_for(model), magnitude, 0.3), info)
    unit = depth_units(pruned)[0]
    out = remove_units(pruned, [unit])
    batch = _inputs(model)
    expected = _predict(out, batch)
    assert expected.shape == _predict(pruned, batch).shape
    out.save_pretrained(tmp_path)
    again = load_unet(tmp_path)
    assert type(again) is type(pruned) and torch.equal(_predict(again, batch), expected)
    broken = copy.deepcopy(out)
    broken.register_to_config(**({"layers_per_block": 2} if kind == "unet2d" else {"num_layers": 3}))
    with pytest.raises(DiffpruneError, match="not expressible"):
        prove_config(broken, "test")


def test_unet2d_units_cover_every_level_at_once():
    """UNet2DModel has one layers_per_block: its unit removes a pair at every level."""
    model = tiny_unet(layers_per_block=3)
    units = depth_units(model)
    assert [u.name for u in units] == ["layers.0", "layers.1"]
    out = remove_units(model, units)
    assert out.config.layers_per_block == 1 and isinstance(out, UNet2DModel)
    assert [len(b.resnets) for b in out.down_blocks] == [1, 1] and [len(b.resnets) for b in out.up_blocks] == [2, 2]


def test_config_keys_left_at_their_defaults_change_too():
    """diffusers' from_config rebuilds keys listed in `_use_default_values` with their defaults: a model
    built with the default layers_per_block (2) and mid_block_type must still shrink."""
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64), norm_num_groups=8,
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    assert {"layers_per_block", "mid_block_type"} <= set(model.config["_use_default_values"])
    out = remove_units(model, ["layers.0", "mid_block"])
    again = UNet2DModel.from_config(out.config)
    assert again.mid_block is None and len(again.down_blocks[0].resnets) == 1
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in out.state_dict().items()}


def test_full_size_sd15_gives_bk_sdm_base_and_small():
    """On SD v1.5's UNet (meta device, shapes only) the default units are BK-SDM's: removing every level's
    unit leaves BK-SDM-Base's 0.58B U-Net parameters, and the mid block too BK-SDM-Small's 0.48B (Kim et al.
    2023, Table 1: 0.58B / 0.48B of 0.86B)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        model = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                     block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                     attention_head_dim=8)
    units = depth_units(model, include_mid=True)
    assert [u.name for u in units] == ["level0.0", "level1.0", "level2.0", "level3.0", "mid_block"]
    assert all(p.name.endswith("resnets.1") for u in units[:4] for p in u.parts)
    base, small = (sum(p.numel() for p in remove_units(model, chosen).parameters()) for chosen in (units[:4], units))
    assert round(base / 1e9, 2) == 0.58 and round(small / 1e9, 2) == 0.48
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 0.86
