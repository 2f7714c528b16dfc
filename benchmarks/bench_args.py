"""Command-line options shared by the seeded benchmarks (table1.py, threshold_sweep.py, budget_curve.py)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


def add_budget_options(parser: argparse.ArgumentParser, quick_help: str, work: str) -> None:
    """--quick, --seeds, --jobs and --work, with the same meaning in every seeded benchmark."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 3, quick: 1)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes, one torch thread each (2 on a 2-core machine)")
    parser.add_argument("--work", type=Path, default=Path(work), help="scratch folder for all runs")


def chosen_budget(parser: argparse.ArgumentParser, args: argparse.Namespace, quick, full):
    """The budget dataclass that --quick / --seeds select; --jobs checked."""
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    budget = quick if args.quick else full
    return dataclasses.replace(budget, seeds=args.seeds) if args.seeds else budget
