"""The ``asap`` command line: one sub-command per pipeline stage.

Each sub-command lives in its own module ``asap.cli.<name>`` exposing
``add_parser(subparsers)`` (which registers the parser and sets ``func``) so
that importing the CLI stays cheap and a broken stage cannot hide the others.

One error policy for every sub-command:

* bad input (an option, a file, a config: :class:`asap.errors.AsapError`, or
  an option ``argparse`` refuses) prints ONE line, ``asap <cmd>: error: ...``,
  on stderr and exits with status 2;
* anything else is a bug and keeps its traceback;
* Ctrl-C exits with 130 and SIGTERM with 143 (128 + the signal number), after
  a training run has written its checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from contextlib import contextmanager

from asap.errors import AsapError

#: Sub-command modules, in the order the pipeline runs them.
SUBCOMMANDS = ("demo", "train", "eval", "compile", "bench", "report")


def one_line(message: object) -> str:
    """``message`` on one line (a multi-line message, e.g. a list of paths tried, joined with "; ")."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (no usage block), exit status 2.

    Sub-parsers are made with the parent's class, so every sub-command inherits it.
    """

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that ``finally`` blocks and atomic writes clean up."""

    signum = signal.SIGTERM


@contextmanager
def sigterm_raises():
    """While running a command, SIGTERM raises :class:`Terminated` (exit 143) instead of killing silently.

    A training run replaces this handler with its own (checkpoint, then stop) and restores it after.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a refused option (2, already reported on one line)
        return exit_.code if isinstance(exit_.code, int) else 2
    prog = " ".join(["asap", args.command, *([args.bench_command] if getattr(args, "bench_command", None) else [])])
    with sigterm_raises():
        try:
            result = args.func(args)
        except AsapError as err:
            print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as err:
            signum = int(getattr(err, "signum", signal.SIGINT))
            print(f"{prog}: {'terminated' if signum == signal.SIGTERM else 'interrupted'}", file=sys.stderr)
            return 128 + signum
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
