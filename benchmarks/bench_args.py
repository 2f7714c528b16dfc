"""Command-line options shared by the benchmarks: the seeded budgets (table1.py, threshold_sweep.py,
budget_curve.py) and, for every script, --smoke / --out (tests/test_benchmarks_smoke.py runs each one so)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def add_budget_options(parser: argparse.ArgumentParser, quick_help: str, work: str) -> None:
    """--quick, --seeds, --jobs and --work, with the same meaning in every seeded benchmark."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 3, quick: 1)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes, one torch thread each (2 on a 2-core machine)")
    parser.add_argument("--work", type=Path, default=Path(work), help="scratch folder for all runs (--smoke: OUT/work)")


def chosen_budget(parser: argparse.ArgumentParser, args: argparse.Namespace, quick, full, smoke=None):
    """The budget dataclass that --smoke / --quick / --seeds select; --jobs checked."""
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    budget = smoke if getattr(args, "smoke", False) else quick if args.quick else full
    return dataclasses.replace(budget, seeds=args.seeds) if args.seeds else budget


def add_smoke_options(parser: argparse.ArgumentParser, smoke_help: str) -> None:
    """--smoke (the real code path end to end at the smallest sizes, seconds) and --out (the results folder)."""
    parser.add_argument("--smoke", action="store_true",
                        help=f"smoke run, numbers meaningless: {smoke_help}; needs --out (never benchmarks/results)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="folder for the result files (default benchmarks/results)")


def results_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """Where the result files go: --out, else benchmarks/results. A smoke run must name another folder, and
    its scratch folder (--work, when the script has one and it was not given) goes inside it."""
    if not args.smoke:
        return args.out or RESULTS
    if args.out is None:
        parser.error("--smoke needs --out DIR: smoke numbers never go to benchmarks/results")
    out = args.out.resolve()
    if out == RESULTS.resolve() or RESULTS.resolve() in out.parents:
        parser.error(f"--smoke: --out {args.out} is inside benchmarks/results, which holds only real results")
    if hasattr(args, "work") and args.work == parser.get_default("work"):
        args.work = args.out / "work"
    return args.out
