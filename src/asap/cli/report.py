"""``asap report``: regenerate ``results/README.md`` and its plots from the result JSON under ``results/``.

    asap report                      # reads results/, writes results/README.md and the PNG plots
    asap report --results other/ --out /tmp/README.md

Every number in the README comes from a JSON file; sections whose JSON is
absent say so (see :mod:`asap.bench.report`).
"""

from __future__ import annotations

import argparse

from asap.bench import report


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report", help="regenerate results/README.md and plots from the result JSON", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_arguments(parser)
    parser.set_defaults(func=report.run_from_args)
    return parser
