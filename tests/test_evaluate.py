"""`diffprune evaluate` and `evaluation.evaluate`: tiny data and tiny UNets made in the test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffprune.cli import build_parser, main
from diffprune.evaluate.stage import EvaluateConfig, evaluate


def _uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def _write_pngs(folder, images, indices=None):
    folder.mkdir(parents=True, exist_ok=True)
    indices = range(len(images)) if indices is None else indices
    for i, im in zip(indices, images, strict=True):
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(folder / f"{i:06d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """teacher = 60 test digits; student = the same, slightly noisy; shifted = rolled by 4 px."""
    from diffprune.data import digits_images

    root = tmp_path_factory.mktemp("samples")
    imgs = _uint8(digits_images(16, 1, "test")[:60])
    noisy = np.clip(imgs.astype(int) + np.random.default_rng(0).integers(-10, 11, imgs.shape), 0, 255).astype(
        np.uint8
    )
    return {
        "teacher": _write_pngs(root / "teacher", imgs),
        "student": _write_pngs(root / "student", noisy),
        "shifted": _write_pngs(root / "shifted", np.roll(imgs, 4, axis=2)),
        "root": root,
    }


def _tiny_pipeline(folder, widths):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=widths,
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
    )
    DDPMPipeline(unet, DDPMScheduler()).save_pretrained(folder, safe_serialization=True)
    return folder


def test_cli_fid_kid_ssim(folders, capsys):
    code = main(
        [
            "evaluate",
            "--samples",
            str(folders["student"]),
            "--reference",
            "digits",
            "--teacher-samples",
            str(folders["teacher"]),
            "--kid-subsets",
            "10",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    res = json.loads((folders["student"] / "evaluation.json").read_text())
    assert res["fid"]["feature_extractor"] == res["kid"]["feature_extractor"] == "digits-cnn-v1"
    assert res["fid"]["num_samples"] == 60 and res["fid"]["num_reference"] == 1797
    assert res["kid"]["subsets"] == 10 and res["kid"]["subset_size"] == 60
    assert any("has 60 images, fewer than the feature dimension 64" in w for w in res["warnings"])
    c = res["consistency"]
    assert c["num_pairs"] == 60 and 0.5 < c["ssim"]["mean"] < 1 and c["indices"] == list(range(60))
    assert (
        c["ssim_convention"]["reference"].startswith("pytorch_msssim.ssim")
        and c["ssim_convention"]["min_size"] == 11
    )
    assert res["config"]["stage"] == "evaluate" and res["versions"]["torch"]
    assert "FID" in out and "SSIM" in out and "wrote" in out
    shifted = evaluate(
        EvaluateConfig(
            samples=str(folders["shifted"]),
            reference="digits",
            kid_subsets=5,
            output=str(folders["root"] / "shifted.json"),
        )
    )
    assert shifted["fid"]["value"] > res["fid"]["value"]


def test_save_stats_then_reuse(folders, tmp_path):
    stats = tmp_path / "ref.npz"
    r1 = evaluate(EvaluateConfig(reference=str(folders["teacher"]), save_stats=str(stats)))
    assert stats.is_file() and r1["reference_stats"]["feature_extractor"] == "digits-cnn-v1"
    a = evaluate(
        EvaluateConfig(
            samples=str(folders["student"]),
            reference=str(stats),
            kid_subsets=5,
            output=str(tmp_path / "a.json"),
        )
    )
    b = evaluate(
        EvaluateConfig(
            samples=str(folders["student"]),
            reference=str(folders["teacher"]),
            kid_subsets=5,
            output=str(tmp_path / "b.json"),
        )
    )
    assert a["fid"]["value"] == pytest.approx(b["fid"]["value"], rel=1e-6)
    assert a["kid"]["mean"] == pytest.approx(b["kid"]["mean"], rel=1e-4)
    assert a["fid"]["reference"]["kind"] == "statistics"


def test_gray_vs_rgb_reference_is_converted_and_reported(folders, tmp_path):
    from diffprune.data import digits_images

    rgb = _write_pngs(tmp_path / "rgb", _uint8(digits_images(16, 3, "train")[:40]))
    res = evaluate(
        EvaluateConfig(
            samples=str(folders["student"]),
            reference=str(rgb),
            kid_subsets=2,
            output=str(tmp_path / "e.json"),
        )
    )
    saved = json.loads((tmp_path / "e.json").read_text())
    assert any("grayscale (1 ch) but the reference is RGB (3 ch)" in n for n in saved["fid"]["notes"])
    assert any("RGB images converted to grayscale" in n for n in saved["fid"]["conversions"])
    assert res["fid"]["value"] >= 0


@pytest.mark.parametrize(
    "case, message",
    [
        ("unpaired", "unpaired image sets"),
        ("mixed_sizes", "different sizes"),
        ("too_few", "at least 10"),
        ("inception_offline", "Inception weights not found"),
        ("stats_mismatch", "use the matching feature net"),
        ("nothing", "nothing to evaluate"),
    ],
)
def test_cli_user_errors(folders, tmp_path, monkeypatch, capsys, case, message):
    from diffprune.metrics.fid import compute_stats, save_stats

    args = ["evaluate", "--samples", str(folders["student"]), "--output", str(tmp_path / "o.json")]
    if case == "unpaired":
        part = _write_pngs(tmp_path / "part", np.zeros((5, 16, 16, 1), np.uint8), range(100, 105))
        args += ["--teacher-samples", str(part)]
    elif case == "mixed_sizes":
        bad = _write_pngs(tmp_path / "bad", np.zeros((12, 16, 16, 1), np.uint8))
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(bad / "000012.png")
        args += ["--reference", str(bad)]
    elif case == "too_few":
        args = [
            "evaluate",
            "--samples",
            str(_write_pngs(tmp_path / "few", np.zeros((5, 16, 16, 1), np.uint8))),
            "--reference",
            "digits",
        ]
    elif case == "inception_offline":
        monkeypatch.setenv("DIFFPRUNE_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("DIFFPRUNE_OFFLINE", "1")
        args += ["--reference", "digits", "--feature-net", "inception"]
    elif case == "stats_mismatch":
        save_stats(
            tmp_path / "inc.npz",
            compute_stats(np.random.default_rng(0).normal(size=(20, 2048)), "inception-v3-pytorch-fid"),
        )
        args += ["--reference", str(tmp_path / "inc.npz")]
    elif case == "nothing":
        args = ["evaluate"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("diffprune evaluate: error:") and err.count("\n") == 1


def test_cli_cost_teacher_vs_student(tmp_path, capsys):
    teacher = _tiny_pipeline(tmp_path / "teacher", (32, 64))
    student = _tiny_pipeline(tmp_path / "student", (16, 32))
    out = tmp_path / "cost.json"
    code = main(
        [
            "evaluate",
            "--model",
            str(student),
            "--teacher-model",
            str(teacher),
            "--latency-repeats",
            "3",
            "--latency-warmup",
            "1",
            "--throughput-images",
            "2",
            "--throughput-steps",
            "2",
            "--throughput-repeats",
            "1",
            "--output",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    c = json.loads(out.read_text())["cost"]
    assert c["student"]["params"] < c["teacher"]["params"] and c["student"]["macs"] < c["teacher"]["macs"]
    r = c["ratios"]
    assert 0 < r["macs_student_over_teacher"] < 1 and r["latency_speedup"] > 0 and r["throughput_speedup"] > 0
    assert c["latency"]["teacher"]["repeats"] == 3 and c["latency"]["settings"]["torch_threads"] >= 1
    assert c["throughput"]["student"]["images"] == 2 and c["throughput"]["settings"]["steps"] == 2
    # throughput is measured with the sampler `diffprune sample` uses by default, and labelled with it
    label = c["throughput"]["settings"]["scheduler"]
    assert c["throughput"]["settings"]["sampler"] == "pipeline"
    assert label.endswith("Scheduler (the folder's own), 2 steps")
    assert c["throughput"]["student"]["scheduler"] == label and label in printed and "DDIM" not in printed
    assert "speed-up" in printed


def test_help_documents_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["evaluate"]
    for action in sub._actions:
        if action.option_strings and action.dest not in ("help",):
            assert "default" in (action.help or ""), action.option_strings


@pytest.fixture(scope="module")
def family_pipelines(tmp_path_factory):
    """Per family of tests/test_families.py (latent UNet, Stable Diffusion, DiT): the tiny pipeline as
    teacher, and the same pipeline with its denoiser pruned to half width (reloaded as a diffprune class)."""
    from test_families import FAMILIES, INFO, build_pipeline

    from diffprune.families import family_for
    from diffprune.families.pipeline_parts import denoiser_of
    from diffprune.io import to_pruned
    from diffprune.prune.importance import ImportanceResult
    from diffprune.prune.pruning import prune_model_at_ratio

    root = tmp_path_factory.mktemp("family_pipes")
    dirs = {}
    for kind in FAMILIES:
        pipe = build_pipeline(kind)
        pipe.save_pretrained(root / kind / "teacher", safe_serialization=True)
        component, model = denoiser_of(pipe)
        imp = ImportanceResult("magnitude", 0.0, [], [], [], None, 0, 0.0)
        pruned = to_pruned(
            prune_model_at_ratio(model, family_for(model), imp, 0.5), {**INFO, "base_class": type(model).__name__}
        )
        pipe.register_modules(**{component: pruned})
        pipe.save_pretrained(root / kind / "student", safe_serialization=True)
        dirs[kind] = root / kind
    return dirs


@pytest.mark.parametrize("kind", ["ldm", "sd", "dit"])
def test_cli_cost_every_family(kind, family_pipelines, tmp_path, capsys):
    """`evaluate --model/--teacher-model` on latent UNet, Stable Diffusion and DiT pipelines: params equal
    the denoiser's parameter count, MACs torch-pruning's count of one batch-1 forward, and DDIM
    throughput runs with the family's conditioning and the latent decode."""
    import torch_pruning as tp

    from diffprune.families import family_for
    from diffprune.families.pipeline_parts import denoiser_of
    from diffprune.io import load_pipeline

    out = tmp_path / "cost.json"
    args = [
        "evaluate",
        "--model",
        str(family_pipelines[kind] / "student"),
        "--teacher-model",
        str(family_pipelines[kind] / "teacher"),
        "--latency-repeats",
        "2",
        "--latency-warmup",
        "0",
        "--throughput-images",
        "2",
        "--throughput-steps",
        "2",
        "--throughput-repeats",
        "1",
        "--output",
        str(out),
    ]
    code = main(args)
    printed = capsys.readouterr()
    assert code == 0, printed.err
    c = json.loads(out.read_text())["cost"]
    for name in ("teacher", "student"):
        _, model = denoiser_of(load_pipeline(family_pipelines[kind] / name))
        fam = family_for(model)
        macs, params = tp.utils.count_ops_and_params(model.eval(), fam.example_inputs(model, 1))
        assert c[name]["params"] == sum(p.numel() for p in model.parameters()) == params
        assert c[name]["macs"] == int(macs) > 0
        assert c[name]["family"] == fam.name and c[name]["component"] == fam.component
        assert c[name]["latent"] is True
        assert c["throughput"][name]["images"] == 2
    assert c["ratios"]["params_student_over_teacher"] < 1 and c["ratios"]["macs_student_over_teacher"] < 1
    assert "speed-up" in printed.out


def test_the_evaluate_api_refuses_an_existing_output_unless_overwrite(folders, tmp_path):
    """Like prune/sample/finetune, `evaluate` (and `diffprune.evaluate`) writes over nothing by default."""
    import diffprune
    from diffprune.errors import DiffpruneError

    out = tmp_path / "pair.json"
    config = EvaluateConfig(samples=str(folders["student"]), teacher_samples=str(folders["teacher"]), output=str(out))
    first = evaluate(config, progress=False)
    saved = out.read_bytes()
    for call in (evaluate, diffprune.evaluate):
        with pytest.raises(DiffpruneError, match="already exists; pass --overwrite") as err:
            call(config)
        assert str(out) in str(err.value) and "\n" not in str(err.value) and out.read_bytes() == saved
    again = evaluate(config, overwrite=True)  # its own JSON: replaced
    assert again["consistency"]["ssim"] == first["consistency"]["ssim"] and json.loads(out.read_text())["format"]
