"""``python -m asap.compile.experiments``: the old name of the experiment driver, :mod:`asap.bench.compile_experiments`.

The driver times and tabulates (a benchmark), so it lives in ``bench/``; this
alias stays because the commands recorded under ``results/compile/**/command.txt``
(and their ``summary.md``) run it by this name, and it records itself by it. It
is a command-line entry point, placed in the ``cli`` stage of the layering test.
"""

from __future__ import annotations

import sys

from asap.bench.compile_experiments import main as _main

PROG = "python -m asap.compile.experiments"


def main(argv: list[str] | None = None) -> int:
    return _main(argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
