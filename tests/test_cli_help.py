"""`--help` shows each option's true default once, and `--data` has no silent digits default (issue 17)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from diffprune import cli
from diffprune.cli.common import is_digits_model
from diffprune.cli.prune import DEFAULT_RATIO

DIGITS = Path(cli.__file__).resolve().parents[1] / "assets" / "digits_ddpm"

# Options whose parser default is None because the value is resolved later; their help says to what.
RESOLVED = {("prune", "ratio"): f"{DEFAULT_RATIO} unless --target-macs or --target-params is given",
            ("prune", "data"): "digits for a 1-channel pixel-space model; required for any other"}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    return dict(cli.build_parser()._subparsers._group_actions[0].choices)


def _shown_defaults(parser: argparse.ArgumentParser, action: argparse.Action) -> list[str]:
    """Every "(default: ...)" in the option's help as --help prints it (balanced parentheses)."""
    text = parser._get_formatter()._expand_help(action)
    found, start = [], text.find("(default: ")
    while start >= 0:
        depth, end = 0, start
        for end in range(start, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        found.append(text[start + len("(default: "):end])
        start = text.find("(default: ", end)
    return found


def _matches(shown: str, default) -> bool:
    return any(shown == value or any(shown.startswith(value + sep) for sep in (" ", ",", ";"))
               for value in (str(default), repr(default)))


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_every_shown_default_is_the_real_default_once(command):
    parser = _subcommands()[command]
    checked = 0
    for action in parser._actions:
        if not action.option_strings or action.help in (None, argparse.SUPPRESS) or action.dest == "help":
            continue
        shown = _shown_defaults(parser, action)
        name = action.option_strings[0]
        assert len(shown) <= 1, f"{command} {name}: default shown {len(shown)} times: {shown}"
        assert all("None" not in s for s in shown), f"{command} {name}: shows {shown}"
        if action.required:
            assert not shown, f"{command} {name} is required but shows a default {shown}"
        elif action.nargs == 0:  # a flag: off unless given
            assert not shown or shown[0].startswith("off"), f"{command} {name}: {shown}"
        elif (command, action.dest) in RESOLVED:
            assert shown == [RESOLVED[command, action.dest]], f"{command} {name}: {shown}"
        elif action.default is not None:
            assert shown and _matches(shown[0], action.default), \
                f"{command} {name}: parser default {action.default!r}, help shows {shown}"
        checked += 1
    assert checked >= 3


def test_help_text_has_no_none_or_doubled_default():
    for command, parser in _subcommands().items():
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, command
        assert "(default: cpu) (default: cpu)" not in text, command


def _model(tmp_path: Path, in_channels: int, latent: bool = False) -> Path:
    folder = tmp_path / f"model{in_channels}{'latent' if latent else ''}"
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel",
                                                             "in_channels": in_channels}))
    if latent:
        (folder / "vae").mkdir()
    return folder


@pytest.mark.parametrize("kind", ["rgb", "latent", "hub"])
def test_prune_without_data_names_what_to_pass(tmp_path, capsys, kind):
    model = {"rgb": lambda: _model(tmp_path, 3), "latent": lambda: _model(tmp_path, 1, latent=True),
             "hub": lambda: "google/ddpm-cifar10-32"}[kind]()
    code = cli.main(["prune", "--model", str(model), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--data is required" in err[0] and str(model) in err[0]
    assert not (tmp_path / "out").exists()


def test_the_digits_default_is_for_digits_models_only(tmp_path, capsys):
    assert is_digits_model(str(DIGITS)) and is_digits_model(str(_model(tmp_path, 1)))
    assert not is_digits_model(str(_model(tmp_path, 3))) and not is_digits_model(str(tmp_path / "missing"))
    code = cli.main(["demo", "--teacher", str(_model(tmp_path, 3)), "--output-dir", str(tmp_path / "demo")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "digits" in err[0], err
