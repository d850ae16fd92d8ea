"""``asap bench``: performance measurements, each writing a JSON under ``results/``.

    asap bench operators                        # time + peak memory of every attention operator (CPU grid)
    asap bench operators --lengths 64,128,256 --no-backward
    asap bench training-cost --shape vit:197    # ESP vs Sinkhorn vs softmax per training step
    asap bench accuracy --suite digits          # accuracy table: every method, 3 seeds, same budget
    asap bench frozen-layer RUN_DIR             # teacher vs ASAP in one layer of a trained model
    asap bench fidelity --hf minilm --data-dir ../shared/data   # TV vs cost: ASAP (+j steps) vs truncated K

``operators`` is :mod:`asap.bench.operators` (``--help`` for the grid and
measurement options). ``training-cost`` passes its arguments to
:mod:`asap.bench.training_cost` unchanged, writing
``results/bench/training_cost.json`` unless ``--out`` is given. Each command
records itself in ``command.txt`` beside its JSON; ``asap report`` turns the
JSON into ``results/README.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from asap.bench import accuracy, fidelity, frozen_layer, operators
from asap.errors import ConfigError
from asap.io import command_line, record_command

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
    record_command(out, command_line("python -m asap.bench.training_cost", argv))
    return 0


#: ``asap bench operators`` options that are sizes or counts (>= 1), and those that may be 0.
_OPERATOR_POSITIVE = ("batch", "heads", "head_dim", "teacher_iters", "slices", "repeats", "min_repeats")
_OPERATOR_NONNEGATIVE = ("warmup", "seed", "backward_max_length")


def _run_operators(args: argparse.Namespace) -> int:
    """Check the grid before the first measurement: a bad option is one line naming it, nothing written."""
    for names, low in ((_OPERATOR_POSITIVE, 1), (_OPERATOR_NONNEGATIVE, 0)):
        for dest in names:
            value = getattr(args, dest, None)
            if value is not None and value < low:
                raise ConfigError(f"--{dest.replace('_', '-')}: must be an integer >= {low}, got {value}")
    for dest in ("eps", "budget_s"):
        value = getattr(args, dest, None)
        if value is not None and not (math.isfinite(value) and (value > 0 or (dest == "budget_s" and value == 0))):
            raise ConfigError(f"--{dest.replace('_', '-')}: must be a finite number > 0, got {value}")
    if args.iters is not None and any(k < 1 for k in args.iters):
        raise ConfigError(f"--iters: every K must be >= 1, got {','.join(map(str, args.iters))}")
    try:
        operators.config_from_args(args)
    except (ValueError, RuntimeError) as err:  # the config's own checks (lengths, methods, teacher, device)
        raise ConfigError(str(err)) from None
    return operators.run_from_args(args)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="benchmark the attention operators and the training cost", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    ops = sub.add_parser("operators", help="time and peak memory of every operator over a grid of shapes",
                         description=operators.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    operators.add_arguments(ops)
    ops.set_defaults(func=_run_operators)
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
    fid = sub.add_parser("fidelity", help="every layer on the TV/cost plane: ASAP with warm-start steps vs truncation",
                         description=fidelity.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fidelity.add_arguments(fid)
    fid.set_defaults(func=lambda args: fidelity.run_from_args(args, sys.argv[1:]))
    return parser
