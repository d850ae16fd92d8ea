"""``asap eval RUN_DIR``: accuracy of a trained run on a split, optionally with another attention method.

    asap eval runs/imdb_sk11                                  # test split, the trained method
    asap eval runs/imdb_sk11 --method-override sinkhorn --n-iters 3
    asap eval runs/imdb_sk11 --method-override softmax --split test

Prints the result as JSON and writes it to ``RUN_DIR/eval_<split>[_<method>...].json`` (or ``--out FILE``).
A model with ASAP layers whose dual map was never fitted (``--method-override asap``
on a teacher) is refused unless ``--allow-unfitted``.
"""

from __future__ import annotations

import argparse
import json

from asap.cli.options import positive_int
from asap.cli.train import add_attention_options
from asap.errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval", help="evaluate a trained run", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("run_dir", metavar="RUN_DIR", help="directory written by asap train")
    parser.add_argument("--split", default="test", help="data split (default: test)")
    parser.add_argument("--data-dir", default=None, help="data directory (default: the run's, then $ASAP_DATA_DIR)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="evaluate on at most this many examples (class-stratified; default: all)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="default: 256")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default: auto)")
    parser.add_argument("--out", dest="output", metavar="FILE", default=None,
                        help="JSON file to write (default: RUN_DIR/eval_<split>[_<method>...].json)")
    parser.add_argument("--output", dest="output", help=argparse.SUPPRESS)  # the old spelling, still accepted
    add_attention_options(parser, method_flag="--method-override", method_default="the run's own method")
    parser.add_argument("--allow-unfitted", action="store_true",
                        help="evaluate ASAP layers whose dual map was never fitted (a zero map)")
    parser.set_defaults(func=run_eval)
    return parser


def run_eval(args: argparse.Namespace) -> int:
    from asap.runs import evaluate_run

    method = getattr(args, "method", None)
    options = dict(getattr(args, "attention_options", []))
    for name in ("n_iters", "eps"):
        if hasattr(args, name):
            options[name] = getattr(args, name)
    if method is None and options:
        raise ConfigError("--n-iters/--eps/--attention-option need --method-override")
    result = evaluate_run(
        args.run_dir, split=args.split, data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size,
        device=args.device, method=method, method_options=options if method else None, output=args.output,
        allow_unfitted=args.allow_unfitted,
    )  # fmt: skip
    print(json.dumps(result, indent=2))
    return 0
