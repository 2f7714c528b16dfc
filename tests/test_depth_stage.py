"""`diffprune prune --structure depth|both` end to end (issue 26): the stage scores layers, plans to the size
target, writes a folder plain diffusers loads (depth) or diffprune's loaders rebuild (both), and
post-training keeps working on it (depth.py / depth_scores.py have their own unit tests in test_depth.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, save_tiny_pipeline, tiny_unet
from diffusers import DDPMPipeline, UNet2DModel

from diffprune.errors import DiffpruneError
from diffprune.io import load_pipeline
from diffprune.prune.config import PruneConfig

T = 30


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    """A tiny UNet2D pipeline with 2 layers per level, so one layer per level can go (BK-SDM)."""
    unet = tiny_unet(layers_per_block=2, block_out_channels=(16, 32), norm_num_groups=4)
    return save_tiny_pipeline(tmp_path_factory.mktemp("depth") / "pipe", unet, num_train_timesteps=T)


def _run(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `diffprune ARGV` in-process."""
    from diffprune.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _report(folder) -> dict:
    return json.loads((folder / "prune_report.json").read_text())


def _plain_output(folder, x, t):
    """The folder loaded by plain diffusers, no diffprune class involved, and its output on (x, t)."""
    pipe = DDPMPipeline.from_pretrained(folder, use_safetensors=True)
    assert type(pipe.unet) is UNet2DModel
    with torch.no_grad():
        return pipe.unet(x, t).sample


@pytest.mark.parametrize("method", ["magnitude", "block-influence", "diff-pruning"])
def test_depth_writes_a_plain_diffusers_folder(deep_dir, tmp_path, capsys, method):
    out = tmp_path / "depth"
    code, printed, err = _run(["prune", "--model", deep_dir, "--structure", "depth", "--method", method,
                               "--target-macs", "0.8", "--batch-size", "4", "--output-dir", out], capsys)
    assert code == 0, err
    assert "depth: 1 of 1 layer units removed" in printed and "layers_per_block: 2 -> 1" in printed
    report = _report(out)
    assert report["structure"] == "depth" and report["depth"]["removed"] == ["layers.0"]
    assert report["depth"]["method"] == method and report["macs"]["fraction"] <= 0.8
    assert report["depth"]["config_changes"] == {"layers_per_block": {"before": 2, "after": 1}}
    assert not (out / "unet" / "pruning.json").exists()  # nothing diffprune-specific to load
    assert json.loads((out / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 20])
    with torch.no_grad():
        ours = load_pipeline(out).unet(x, t).sample
    assert torch.equal(_plain_output(out, x, t), ours)


def test_depth_keeps_the_scored_layers_weights(deep_dir, tmp_path, capsys):
    """Every kept layer is the base model's own, renumbered: resnets/attentions of each block keep their order
    with the removed ones (the depth record's modules) taken out."""
    import re

    out = tmp_path / "depth"
    assert run_cli(["prune", "--model", deep_dir, "--structure", "depth", "--method", "magnitude",
                    "--target-macs", "0.8", "--output-dir", out], capsys)[0] == 0
    removed = set(_report(out)["depth"]["modules"])
    base, shallow = load_pipeline(deep_dir).unet.state_dict(), load_pipeline(out).unet.state_dict()
    assert len(shallow) < len(base) and removed

    def original(key: str) -> str:
        m = re.match(r"((?:down|up)_blocks\.\d+\.(?:resnets|attentions))\.(\d+)\.(.*)", key)
        if not m:
            return key
        kept = [i for i in range(8) if f"{m[1]}.{i}" not in removed]
        return f"{m[1]}.{kept[int(m[2])]}.{m[3]}"

    for key, value in shallow.items():
        assert torch.equal(value, base[original(key)]), key
    assert not any(original(k).startswith(tuple(f"{r}." for r in removed)) for k in shallow)


def test_both_removes_layers_then_channels_and_reloads(deep_dir, tmp_path, capsys):
    out = tmp_path / "both"
    code, err = run_cli(["prune", "--model", deep_dir, "--structure", "both", "--method", "magnitude",
                         "--target-params", "0.5", "--ratio-rule", "paper", "--output-dir", out], capsys)
    assert code == 0, err
    report = _report(out)
    assert report["depth"]["removed"] == ["layers.0"] and report["ratio"] > 0
    assert report["params"]["fraction"] == pytest.approx(0.5, abs=0.02)
    info = json.loads((out / "unet" / "pruning.json").read_text())
    assert info["depth"]["removed"] == ["layers.0"] and info["method"]["structure"] == "both"
    unet = load_pipeline(out).unet
    assert unet.config.layers_per_block == 1 and sum(p.numel() for p in unet.parameters()) == report["params"]["after"]


def test_depth_dry_run_prints_the_layers_and_writes_nothing(deep_dir, tmp_path, capsys):
    code, printed, err = _run(["prune", "--model", deep_dir, "--structure", "both", "--target-params", "0.5",
                               "--ratio-rule", "paper", "--dry-run"], capsys)
    assert code == 0, err
    assert "magnitude order in a dry run" in printed and "layers_per_block: 2 -> 1" in printed
    assert "size search (target params=" in printed and not any(tmp_path.iterdir())


def test_post_training_a_depth_pruned_folder_with_feature_distillation(deep_dir, tmp_path, capsys):
    """BK-SDM's post-training: the student's block outputs matched to the teacher's (the same block names)."""
    pruned = tmp_path / "depth"
    assert run_cli(["prune", "--model", deep_dir, "--structure", "depth", "--method", "magnitude",
                    "--target-macs", "0.8", "--depth-include-mid", "--output-dir", pruned], capsys)[0] == 0
    assert _report(pruned)["depth"]["include_mid"] is True
    code, err = run_cli(["finetune", "--model", pruned, "--data", "digits", "--steps", "2", "--batch-size", "4",
                         "--distill", "both", "--teacher", deep_dir, "--output-dir", tmp_path / "ft"], capsys)
    assert code == 0, err
    log = json.loads((tmp_path / "ft" / "train_log.json").read_text())["records"][-1]
    assert log["loss_feature_kd"] >= 0 and load_pipeline(tmp_path / "ft").unet.config.layers_per_block == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(structure="depth", ratio=0.3), "needs target_macs or target_params"),
    (dict(structure="tall", target_macs=0.5), "structure='tall' is not one of"),
    (dict(method="block-influence", ratio=0.3), "method='block-influence' applies to structure 'depth'"),
    (dict(structure="both", method="block-influence", target_macs=0.5), "scores layers only"),
    (dict(structure="depth", method="random", target_macs=0.5), "does not score layers"),
    (dict(structure="depth", round_to=8, target_macs=0.5), "round_to=8 is a width option"),
    (dict(depth_include_mid=True, ratio=0.3), "depth_include_mid=True applies to structure 'depth'"),
])
def test_config_refuses_depth_settings_that_do_not_apply(kwargs, match):
    with pytest.raises(DiffpruneError, match=match):
        PruneConfig(model="m", **kwargs)


def test_cli_depth_refusals_are_one_line(deep_dir, tmp_path, capsys):
    code, err = run_cli(["prune", "--model", deep_dir, "--structure", "depth", "--output-dir", tmp_path / "o"], capsys)
    assert code == 2 and "--structure depth needs --target-macs or --target-params" in err
    code, err = run_cli(["prune", "--model", deep_dir, "--structure", "depth", "--method", "magnitude",
                         "--target-macs", "0.3", "--output-dir", tmp_path / "o"], capsys)
    assert code == 2 and "depth pruning alone reaches" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    """A class-conditional DiT pipeline with 4 transformer blocks, and a class-folder image set."""
    import numpy as np
    from conftest import tiny_kl
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
    from PIL import Image

    root = tmp_path_factory.mktemp("dit_depth")
    torch.manual_seed(4)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    with torch.no_grad():  # diffusers zero-initialises adaLN-Zero: give every block a say in the output
        for p in dit.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.2)
    DiTPipeline(transformer=dit, vae=tiny_kl(), scheduler=DDIMScheduler(num_train_timesteps=T)).save_pretrained(
        root / "pipe", safe_serialization=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        (root / "imgs" / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "imgs" / str(i % 2) / f"{i}.png")
    return root


def test_dit_depth_removes_transformer_blocks_and_plain_diffusers_generates(dit_dir, tmp_path, capsys):
    from diffusers import DiTPipeline, DiTTransformer2DModel

    out = tmp_path / "depth"
    code, err = run_cli(["prune", "--model", dit_dir / "pipe", "--data", dit_dir / "imgs", "--structure", "depth",
                         "--method", "diff-pruning", "--estimator", "exact", "--batch-size", "4",
                         "--target-params", "0.7", "--output-dir", out], capsys)
    assert code == 0, err
    depth = _report(out)["depth"]
    assert len(depth["removed"]) == 2 and all(u.startswith("transformer_blocks.") for u in depth["removed"])
    assert depth["config_changes"] == {"num_layers": {"before": 4, "after": 2}}
    assert depth["removed"] == list(depth["scores"])[:2]  # the two lowest Taylor scores went
    pipe = DiTPipeline.from_pretrained(out)
    assert type(pipe.transformer) is DiTTransformer2DModel and len(pipe.transformer.transformer_blocks) == 2
    images = pipe(class_labels=[1, 3], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 16, 16, 3)


@pytest.mark.parametrize("edit, match", [
    (lambda info: info["depth"]["config_changes"]["layers_per_block"].update(after=2),
     r"depth record says layers_per_block=2 after removing \['layers.0'\], but config.json has 1"),
    (lambda info: info["depth"].pop("removed"), "'depth' must be an object with 'removed'"),
    (lambda info: info.update(depth=[1, 2]), "'depth' must be an object"),
])
def test_a_depth_record_that_does_not_match_the_config_is_refused_in_one_line(deep_dir, tmp_path, capsys, edit,
                                                                             match):
    out = tmp_path / "both"
    assert run_cli(["prune", "--model", deep_dir, "--structure", "both", "--method", "magnitude", "--target-params",
                    "0.5", "--ratio-rule", "paper", "--output-dir", out], capsys)[0] == 0
    path = out / "unet" / "pruning.json"
    info = json.loads(path.read_text())
    edit(info)
    path.write_text(json.dumps(info))
    with pytest.raises(DiffpruneError, match=match):
        load_pipeline(out)
    code, err = run_cli(["sample", "--model", out, "--num-images", "1", "--output-dir", tmp_path / "s"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1


def _family_pipelines():
    from conftest import sd_pipeline
    from test_pixart import tiny_pipeline as pixart_pipeline
    from test_pixart import tiny_pixart
    from test_sd3 import tiny_pipeline as sd3_pipeline
    from test_sd3 import tiny_sd3
    from test_sdxl import tiny_sdxl, tiny_sdxl_unet

    def pixart():
        pipe = pixart_pipeline()
        torch.manual_seed(0)
        pipe.register_modules(transformer=type(tiny_pixart())(**{**tiny_pixart().config, "num_layers": 3}).eval())
        return pipe

    return {"sd": lambda: sd_pipeline(layers_per_block=2), "pixart": pixart,
            "sdxl": lambda: tiny_sdxl(tiny_sdxl_unet(layers_per_block=2)),
            "sd3": lambda: sd3_pipeline(transformer=tiny_sd3(sd35=True))}


@pytest.mark.parametrize("family", ["sd", "sdxl", "pixart", "sd3"])
def test_every_family_depth_folder_loads_in_plain_diffusers(family, tmp_path, capsys):
    """Depth (magnitude: no data) on each text family's pipeline folder: one unit goes, the folder names plain
    diffusers classes and DiffusionPipeline.from_pretrained gives the denoiser diffprune loads, bit for bit."""
    from diffusers import DiffusionPipeline

    _family_pipelines()[family]().save_pretrained(tmp_path / "pipe", safe_serialization=True)
    out = tmp_path / "depth"
    code, err = run_cli(["prune", "--model", tmp_path / "pipe", "--structure", "depth", "--method", "magnitude",
                         "--target-params", "0.97", "--output-dir", out], capsys)
    assert code == 0, err
    depth = _report(out)["depth"]
    assert len(depth["removed"]) >= 1 and depth["config_changes"]
    ours, plain = load_pipeline(out), DiffusionPipeline.from_pretrained(out, use_safetensors=True)
    name = "unet" if hasattr(plain, "unet") else "transformer"
    a, b = getattr(ours, name), getattr(plain, name)
    assert type(b).__module__.startswith("diffusers.") and type(a) is type(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for key, change in depth["config_changes"].items():
        assert list(_as_list(b.config[key])) == list(_as_list(change["after"]))


def _as_list(value):
    return value if isinstance(value, (list, tuple)) else [value]


def test_the_plan_puts_back_units_the_target_does_not_need():
    """A small low-scored unit (the mid block) goes first; once a large one alone reaches the target the
    small one comes back: the plan never removes more than the target asks."""
    from diffprune.prune.depth import DepthUnit, Part
    from diffprune.prune.depth_scores import plan_depth

    mid, layers = (DepthUnit(n, (Part(n, (n,), p),)) for n, p in (("mid_block", 5), ("layers.0", 40)))
    sizes = {(): 100, ("mid_block",): 95, ("layers.0",): 60, ("layers.0", "mid_block"): 55}

    def size_of(units):
        return sizes[tuple(sorted(u.name for u in units))]

    plan = plan_depth([mid, layers], {"mid_block": 0.1, "layers.0": 0.9}, size_of, 0.7)
    assert [u.name for u in plan.removed] == ["layers.0"] and plan.fraction == 0.6 and plan.reached
    tight = plan_depth([mid, layers], {"mid_block": 0.1, "layers.0": 0.9}, size_of, 0.58)
    assert sorted(u.name for u in tight.removed) == ["layers.0", "mid_block"] and tight.fraction == 0.55


def test_the_summary_notes_a_depth_result_far_below_its_target():
    """Whole layers come in coarse steps (a 4-block DiT: 0.75, 0.51): a --structure depth result more than
    OVERSHOOT below its target says so and names what fills a target exactly; 'both' (width fills it) does not."""
    from diffprune.prune.dry_run import OVERSHOOT, depth_lines

    depth = {"removed": ["transformer_blocks.2", "transformer_blocks.3"], "units": ["transformer_blocks.0"] * 4,
             "kind": "macs", "fraction": 0.507, "target": 0.70, "config_changes": {}, "method": "taylor",
             "split": {"mode": None}}
    note = [ln for ln in depth_lines(depth) if "note:" in ln]
    assert len(note) == 1 and "target macs 0.700 by 0.193" in note[0] and "--structure both" in note[0], note
    assert not [ln for ln in depth_lines({**depth, "fraction": 0.70 - OVERSHOOT / 2}) if "note:" in ln]
    assert not [ln for ln in depth_lines({**depth, "split": {"mode": "sqrt"}}) if "note:" in ln]
