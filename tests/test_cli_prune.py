"""`diffprune prune` end to end, and every bad input: one line, exit code 2, no output folder."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_cli, save_tiny_pipeline
from PIL import Image

import diffprune
from diffprune.cli import main
from diffprune.data import digits_images


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("m") / "pipe", num_train_timesteps=40)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Real handwritten digits written as PNG (RGB, 24x24, nested folders) plus one corrupt file."""
    folder = tmp_path_factory.mktemp("imgs")
    imgs = ((digits_images(24, 3)[:20].permute(0, 2, 3, 1).numpy() + 1) * 127.5).astype(np.uint8)
    for i, im in enumerate(imgs):
        sub = folder / f"class{i % 3}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(im).save(sub / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def _run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_prune_end_to_end_from_a_saved_folder(pipeline_dir, image_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, stdout, err = _run(["prune", "--model", str(pipeline_dir), "--data", str(image_dir), "--method",
                              "diff-pruning", "--threshold", "0.05", "--target-macs", "0.56", "--batch-size", "6",
                              "--output-dir", str(out)], capsys)
    assert code == 0, err
    assert "params" in stdout and "MACs" in stdout and str(out) in stdout
    report = json.loads((out / "prune_report.json").read_text())
    assert abs(report["macs"]["fraction"] - 0.56) <= 0.02 and report["params"]["after"] < report["params"]["before"]
    assert report["calibration"] == {"images": 6, "skipped_files": 1}
    assert report["importance"]["num_kept_timesteps"] >= 1 and report["widths"]["after"]["conv_in"] < 32
    search = report["size_search"]  # decided before the sweep, every candidate recorded
    assert search["chosen_ratio"] == report["ratio"] and search["candidates"][-1]["time_s"] > 0
    assert (out / "loss_over_timesteps.png").stat().st_size > 1000
    assert json.loads((out / "prune_config.json").read_text())["method"] == "diff-pruning"
    pipe = diffprune.load_pipeline(out)
    assert pipe.unet.pruning_info["method"]["name"] == "diff-pruning"
    assert not list(tmp_path.glob(".*tmp*"))


def test_overwrite_replaces_only_when_asked(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["prune", "--model", str(pipeline_dir), "--method", "magnitude", "--ratio", "0.3", "--output-dir", str(out)]
    assert _run(args, capsys)[0] == 0
    code, _, err = _run(args, capsys)
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1
    assert _run(args + ["--overwrite"], capsys)[0] == 0


@pytest.mark.parametrize("extra, match", [
    (["--ratio", "1.5"], "--ratio"), (["--ratio", "0"], "--ratio"), (["--ratio", "nan"], "--ratio"),
    (["--threshold", "1"], "--threshold"), (["--threshold", "-0.1"], "--threshold"),
    (["--batch-size", "0"], "--batch-size"), (["--method", "l1"], "--method"),
    (["--target-macs", "0.01"], "unreachable"), (["--ratio", "0.3", "--target-macs", "0.5"], "not allowed with"),
    (["--target-macs", "0.6"], "--ratio-rule paper (no --round-to) reaches"),
])
def test_bad_values(pipeline_dir, tmp_path, capsys, extra, match):
    out = tmp_path / "o"
    args = ["prune", "--model", str(pipeline_dir), "--method", "magnitude", "--output-dir", str(out)]
    code, err = run_cli(args + extra, capsys)
    assert code == 2 and match in _last_line(err) and err.count("error:") == 1
    assert not out.exists()


def test_output_dir_is_required_unless_dry_run(pipeline_dir, capsys):
    code, err = run_cli(["prune", "--model", str(pipeline_dir), "--method", "magnitude"], capsys)
    assert code == 2 and "--output-dir is required" in _last_line(err) and err.count("error:") == 1


def _last_line(err: str) -> str:
    """The error line (progress bars may precede it on stderr, each ending in a carriage return)."""
    return err.strip().splitlines()[-1].split("\r")[-1]


def test_bad_paths_and_data(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "o"
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"junk")
    cases = [
        (["--model", str(tmp_path / "missing")], "does not exist"),
        (["--model", str(pipeline_dir), "--data", str(empty)], "no images"),
        (["--model", str(pipeline_dir), "--data", str(broken)], "could be read"),
        (["--model", str(pipeline_dir), "--data", str(tmp_path / "nodata")], "does not exist"),
        (["--model", str(pipeline_dir / "model_index.json")], "is a file"),
    ]
    for extra, match in cases:
        code, err = run_cli(["prune", "--output-dir", str(out), "--method", "magnitude"] + extra, capsys)
        assert code == 2 and match in _last_line(err) and err.count("error:") == 1, (extra, err)
        assert not out.exists()


def test_unsupported_family_is_named(tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                cross_attention_dim=16, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet.save_pretrained(tmp_path / "sd_unet", safe_serialization=True)
    code, err = run_cli(["prune", "--model", str(tmp_path / "sd_unet"), "--data", "digits", "--output-dir",
                                    str(tmp_path / "o")], capsys)
    assert code == 2 and "UNet2DConditionModel" in err and "supported" in err


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "diffprune.cli", "prune", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--target-macs" in result.stdout and "default" in result.stdout


@pytest.mark.parametrize("command, target, expected", [
    (["finetune", "--model", "m", "--data", "d", "--output-dir", "o", "--prompt", "a cat", "--captions", "c.jsonl",
      "--class-labels", "1,2"], "diffprune.train.finetune",
     {"prompt": "a cat", "captions": "c.jsonl", "class_labels": "1,2"}),
    (["sample", "--model", "m", "--output-dir", "o", "--prompt", "a dog", "--class-labels", "3"],
     "diffprune.sample.loop.sample_to_folder", {"prompt": "a dog", "class_labels": "3"}),
])
def test_conditioning_options_reach_finetune_and_sample(monkeypatch, command, target, expected):
    seen = {}
    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, lambda *a, **kw: seen.update(kw))
    assert main(command) in (0, None)
    assert {k: seen[k] for k in expected} == expected
