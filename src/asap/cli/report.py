"""``asap report``: regenerate ``results/README.md`` and its plots from the result JSON under ``results/``.

    asap report                      # reads results/, writes results/README.md and the PNG plots
    asap report --results other/ --out /tmp/README.md

Every number in the README comes from a JSON file; sections whose JSON is
absent say so (see :mod:`asap.report`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from asap import report
from asap.errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report", help="regenerate results/README.md and plots from the result JSON", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_arguments(parser)
    parser.set_defaults(func=run_report)
    return parser


def run_report(args: argparse.Namespace) -> int:
    """Check the folders first (a bad one is a one-line error, nothing written), then generate."""
    if not Path(args.results).is_dir():
        raise ConfigError(f"--results {args.results}: no such results directory")
    out = Path(args.out) if args.out is not None else Path(args.results) / "README.md"
    if out.is_dir() or not out.parent.is_dir():
        raise ConfigError(f"--out {out}: {'is a directory' if out.is_dir() else 'its folder does not exist'}")
    return report.run_from_args(args)
