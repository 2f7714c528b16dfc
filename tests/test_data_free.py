"""The data-free methods (magnitude, random, reinit) and --dry-run run without --data on any model and
read no calibration images; the gradient methods still refuse in one line (issue 23 B)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, save_tiny_pipeline, tiny_unet

import diffprune
from diffprune.errors import DiffpruneError
from diffprune.prune import stage


@pytest.fixture(scope="module")
def rgb_pipeline(tmp_path_factory):
    """A 3-channel pixel-space pipeline: not a digits model, so --data has no default for it."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("rgb") / "pipe", unet=tiny_unet(in_channels=3, out_channels=3),
                              num_train_timesteps=40)


@pytest.fixture
def no_data_read(monkeypatch):
    """Any attempt to read calibration images fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("calibration data was read")

    monkeypatch.setattr(stage, "make_dataset", refuse)


@pytest.mark.parametrize("method", ["magnitude", "random", "reinit"])
def test_data_free_methods_run_without_data(rgb_pipeline, tmp_path, capsys, no_data_read, method):
    out = tmp_path / "pruned"
    code, err = run_cli(["prune", "--model", rgb_pipeline, "--method", method, "--ratio", "0.3",
                         "--output-dir", out], capsys)
    assert code == 0, err
    report = json.loads((out / "prune_report.json").read_text())
    assert report["config"]["data"] is None and report["calibration"] == {"images": 0, "skipped_files": 0}
    assert report["params"]["after"] < report["params"]["before"]
    assert json.loads((out / "prune_config.json").read_text())["data"] is None
    info = json.loads((out / "unet" / "pruning.json").read_text())
    assert info["method"]["data"] is None and info["method"]["calibration_images"] == 0
    assert diffprune.load_pipeline(out).unet.config.in_channels == 3


def test_dry_run_needs_no_data(rgb_pipeline, capsys, no_data_read):
    code, err = run_cli(["prune", "--model", rgb_pipeline, "--method", "diff-pruning", "--ratio", "0.3",
                         "--dry-run"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("method", ["diff-pruning", "taylor"])
def test_gradient_methods_still_need_data(rgb_pipeline, tmp_path, capsys, method):
    out = tmp_path / "pruned"
    code, err = run_cli(["prune", "--model", rgb_pipeline, "--method", method, "--output-dir", out], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--data is required" in lines[0] and str(rgb_pipeline) in lines[0]
    assert not out.exists()


def test_the_api_refuses_a_gradient_method_without_data(rgb_pipeline, tmp_path):
    from diffprune.prune.config import PruneConfig

    config = PruneConfig(model=str(rgb_pipeline), data=None, method="taylor", ratio=0.3)
    with pytest.raises(DiffpruneError, match="data=None: method 'taylor'"):
        stage.run_prune(config, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_data_given_to_a_data_free_method_is_still_checked(rgb_pipeline, tmp_path, capsys):
    """An explicit --data keeps its meaning (read, recorded), as before."""
    code, err = run_cli(["prune", "--model", rgb_pipeline, "--method", "magnitude", "--data", tmp_path / "missing",
                         "--output-dir", tmp_path / "o"], capsys)
    assert code == 2 and "does not exist" in err
