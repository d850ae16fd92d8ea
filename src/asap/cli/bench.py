"""``asap bench``: performance measurements, each writing a JSON under ``results/``.

    asap bench operators                        # time + peak memory of every attention operator (CPU grid)
    asap bench operators --lengths 64,128,256 --no-backward
    asap bench training-cost --shape vit:197    # ESP vs Sinkhorn vs softmax per training step
    asap bench accuracy --suite digits          # accuracy table: every method, 3 seeds, same budget
    asap bench frozen-layer RUN_DIR             # teacher vs ASAP in one layer of a trained model

``operators`` is :mod:`asap.bench.operators` (``--help`` for the grid and
measurement options). ``training-cost`` passes its arguments to
:mod:`asap.bench.training_cost` unchanged, writing
``results/bench/training_cost.json`` unless ``--out`` is given. Each command
records itself in ``command.txt`` beside its JSON; ``asap report`` turns the
JSON into ``results/README.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from asap.bench import accuracy, frozen_layer, operators

DEFAULT_TRAINING_COST_OUT = Path("results") / "bench" / "training_cost.json"


def _run_training_cost(args: argparse.Namespace) -> int:
    try:
        from asap.bench import training_cost
    except ImportError as err:
        print(f"asap bench training-cost: not available in this checkout ({err})", file=sys.stderr)
        return 2
    argv = list(args.args)
    if "--help" in argv or "-h" in argv:
        training_cost.main(["--help"])  # prints the options and exits
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", str(DEFAULT_TRAINING_COST_OUT)]
    training_cost.main(argv)
    out = Path(next(a.split("=", 1)[1] if "=" in a else argv[i + 1]
                    for i, a in enumerate(argv) if a == "--out" or a.startswith("--out=")))
    operators.record_command(out, "python -m asap.bench.training_cost " + shlex.join(argv))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="benchmark the attention operators and the training cost", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    ops = sub.add_parser("operators", help="time and peak memory of every operator over a grid of shapes",
                         description=operators.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    operators.add_arguments(ops)
    ops.set_defaults(func=operators.run_from_args)
    # prefix_chars="+": this parser treats every "-" token as a plain argument, so that all of them
    # (--help included) reach asap.bench.training_cost's own parser.
    cost = sub.add_parser("training-cost", add_help=False, prefix_chars="+",
                          help="time and memory per training step, ESP vs Sinkhorn vs softmax "
                               "(options of python -m asap.bench.training_cost)")
    cost.add_argument("args", nargs=argparse.REMAINDER, help="passed to asap.bench.training_cost")
    cost.set_defaults(func=_run_training_cost)
    acc = sub.add_parser("accuracy", help="accuracy table: softmax, Sinkhorn, truncated, ESP, ASAP over seeds",
                         description=accuracy.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    accuracy.add_arguments(acc)
    acc.set_defaults(func=accuracy.run_from_args)
    frozen = sub.add_parser("frozen-layer", help="one layer of a trained teacher compiled: accuracy and speed ratio",
                            description=frozen_layer.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    frozen_layer.add_arguments(frozen)
    frozen.set_defaults(func=frozen_layer.run_from_args)
    return parser
