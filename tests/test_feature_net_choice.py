"""`--feature-net auto|digits|inception` (issue 23): the 1-channel digits network never silently scores
colour or large images; the choice is made from the images, before any network is built or file written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffprune.cli import build_parser, main
from diffprune.errors import DiffpruneError
from diffprune.metrics.feature_choice import DIGITS_MAX_SIDE, choose_feature_net, is_grayscale


def _images(n, size, channels, colour=False, seed=0):
    rng = np.random.default_rng(seed)
    if channels == 3 and not colour:  # grayscale saved as RGB: three equal channels
        return np.repeat(rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8), 3, axis=-1)
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def _folder(path, images):
    path.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(path / f"{i:06d}.png")
    return path


def test_grayscale_means_one_channel_or_three_equal_ones():
    assert is_grayscale(_images(2, 8, 1)) and is_grayscale(_images(2, 8, 3))
    assert not is_grayscale(_images(2, 8, 3, colour=True))


@pytest.mark.parametrize(
    "requested, size, channels, colour, expected",
    [
        ("auto", 16, 1, False, "digits"),
        ("auto", DIGITS_MAX_SIDE, 1, False, "digits"),
        ("auto", 16, 3, False, "digits"),  # gray stored as RGB: the channel mean loses nothing
        ("auto", 16, 3, True, "refused"),
        ("auto", DIGITS_MAX_SIDE + 1, 1, False, "refused"),
        ("auto", 64, 3, True, "refused"),
        ("digits", 16, 1, False, "digits"),
        ("digits", 64, 1, False, "digits"),  # explicit, grayscale: scored with a warning
        ("digits", 16, 3, True, "refused"),
        ("inception", 16, 1, False, "inception"),
        ("inception", 64, 3, True, "inception"),
    ],
)
def test_choose_feature_net_rule(requested, size, channels, colour, expected):
    sets = [("--samples s", _images(3, size, channels, colour))]
    if expected == "refused":
        with pytest.raises(DiffpruneError) as err:
            choose_feature_net(requested, sets)
        msg = str(err.value)
        assert "\n" not in msg and f"--feature-net {requested}" in msg and "--feature-net inception" in msg
        assert "--samples s" in msg and f"{size}x{size}" in msg
        return
    net, why, warnings = choose_feature_net(requested, sets)
    assert net == expected and why.startswith("auto" if requested == "auto" else "given")
    assert bool(warnings) == (requested == "digits" and size > DIGITS_MAX_SIDE)


def test_auto_looks_at_every_set_and_at_statistics():
    gray = ("--samples s", _images(3, 16, 1))
    with pytest.raises(DiffpruneError, match="--reference r are 16x16 colour"):
        choose_feature_net("auto", [gray, ("--reference r", _images(3, 16, 3, colour=True))])
    with pytest.raises(DiffpruneError, match="use the matching feature net: --feature-net inception"):
        choose_feature_net("auto", [gray], stats_extractor="inception-v3-pytorch-fid")
    assert choose_feature_net("auto", [gray], stats_extractor="digits-cnn-v1")[0] == "digits"
    with pytest.raises(DiffpruneError, match="allowed: auto, digits, inception"):
        choose_feature_net("clip", [gray])


@pytest.mark.parametrize("flag", [[], ["--feature-net", "auto"], ["--feature-net", "digits"]])
def test_cli_refuses_rgb_before_any_network_or_output(tmp_path, monkeypatch, capsys, flag):
    """RGB 32x32 samples and reference: refused in one line naming --feature-net inception, before a
    feature network is built, and neither the JSON nor --save-stats is written."""
    from diffprune.metrics import features

    monkeypatch.setattr(features, "get_feature_extractor", lambda *a, **k: pytest.fail("network built"))
    samples = _folder(tmp_path / "samples", _images(12, 32, 3, colour=True))
    reference = _folder(tmp_path / "reference", _images(12, 32, 3, colour=True, seed=1))
    out, stats = tmp_path / "e.json", tmp_path / "ref.npz"
    code = main(["evaluate", "--samples", str(samples), "--reference", str(reference), "--output", str(out),
                 "--save-stats", str(stats), *flag])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "--feature-net inception" in err and "colour" in err
    assert not out.exists() and not stats.exists()


def test_cli_default_on_gray_digits_records_the_choice(tmp_path, capsys):
    from diffprune.data import digits_images

    x = digits_images(16, 1, "test")[:20]
    imgs = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    samples = _folder(tmp_path / "samples", imgs)
    code = main(["evaluate", "--samples", str(samples), "--reference", "digits", "--kid-subsets", "2"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((samples / "evaluation.json").read_text())
    assert res["fid"]["feature_extractor"] == "digits-cnn-v1" and res["fid"]["feature_net"] == "digits"
    assert res["fid"]["feature_net_choice"].startswith("auto: grayscale")
    assert res["config"]["feature_net"] == "auto"


def test_help_lists_every_family_and_the_auto_rule():
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices["evaluate"]
    helps = {a.dest: a.help for a in sub._actions}
    for dest in ("model", "teacher_model"):
        for family in ("DDPM/LDM UNet2DModel", "Stable Diffusion 1/2", "SDXL", "DiT", "PixArt", "SD3"):
            assert family in helps[dest], (dest, family)
    assert "default: auto" in helps["feature_net"] and "32x32" in helps["feature_net"]
