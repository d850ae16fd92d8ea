"""The ``asap`` command line: one sub-command per pipeline stage.

Each sub-command lives in its own module ``asap.cli.<name>`` exposing
``add_parser(subparsers)`` (which registers the parser and sets ``func``) so
that importing the CLI stays cheap and a broken stage cannot hide the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: Sub-command modules, in the order the pipeline runs them.
SUBCOMMANDS = ("demo", "train", "eval", "compile", "bench", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asap",
        description="Doubly-stochastic attention: train with Sinkhorn, compile to ASAP, evaluate and benchmark.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"asap.cli.{name}")
        except ModuleNotFoundError as err:  # a stage not installed in this build
            if err.name == f"asap.cli.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
