"""`diffprune prune|finetune|train|sample|evaluate|report|demo`: one module per subcommand.

Each module in `diffprune.commands` exposes `register(subparsers)`, which adds its parser and sets
`func`. User errors (DiffpruneError) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import DiffpruneError

COMMANDS = ("prune", "finetune", "train", "sample", "evaluate", "report", "demo")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors also say which subcommand and exit 2 with one line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffprune", description=__doc__.splitlines()[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"diffprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DiffpruneError as err:
        print(f"diffprune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffprune {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
