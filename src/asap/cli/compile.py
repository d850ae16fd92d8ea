"""``asap compile RUN_DIR``: turn a trained Sinkhorn run into an ASAP model, without retraining.

    asap compile runs/imdb_sk11 --calibration 512 --out runs/imdb_asap
    asap compile runs/fmnist_sk11 --calibration 1024 --out runs/fmnist_asap --refine kl --mode sequential
    asap compile runs/imdb_sk11 --calibration 512 --out runs/imdb_asap_l0 --layers 0   # frozen-layer experiment
    asap compile runs/imdb_sk11 --calibration 512 --out runs/imdb_asap_mlp --map mlp --mlp-hidden 64
    asap compile runs/imdb_sk11 --calibration 512 --out runs/imdb_asap_tv --target-tv 0.02   # map chosen per layer

Calibration inputs are the first ``--calibration`` examples of the run's
training split (stratified, then shuffled; labels unused); the last
``--holdout`` fraction of the batches is held out for the fidelity figures.
Writes to OUT_DIR the compiled model (``model.safetensors``, ``manifest.json``,
the tokenizer of a text run) and the fidelity report (``fidelity.json``,
``fidelity.png``), and prints the report as a table. Unless ``--no-eval``, the
report includes the accuracy on ``--eval-split`` of the teacher, of ASAP and of
Sinkhorn truncated to ``--truncated-iters`` half-steps in the same layers.
Load the result with ``asap.compile.load_compiled(OUT_DIR)``.

``--map`` chooses the dual map (``linear``, ``relu`` with ``--relu-depth`` /
``--relu-stacks``, ``mlp`` with ``--mlp-hidden``); ``--target-tv X`` instead
compiles, per layer, the cheapest of linear/relu/mlp with 0, 1 or 2 extra
half-steps whose mean held-out row total variation to the teacher is at most
``X`` (by the cost model of :func:`asap.compile.swap.candidate_cost`), records
the choice and every candidate's TV in the report and manifest, and prints one
line per layer (saying so when no candidate reaches ``X``).
"""

from __future__ import annotations

import argparse
import sys

from asap.argtypes import cli_fields, option_flag, positive_int
from asap.compile.options import add_compile_options, compile_options
from asap.errors import AsapError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compile", help="compile a trained Sinkhorn model to ASAP", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("run_dir", metavar="RUN_DIR", help="directory written by asap train (a Sinkhorn model)")
    parser.add_argument("--calibration", type=positive_int, required=True, metavar="N", help="number of calibration examples")
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="directory for the compiled model and report")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="calibration batch size (default: 32)")
    add_compile_options(parser)
    group = parser.add_argument_group("evaluation")
    group.add_argument("--no-eval", action="store_true", help="skip the accuracy comparison")
    group.add_argument("--eval-split", default="test", help="split for accuracy (default: test)")
    group.add_argument("--eval-limit", type=positive_int, default=None,
                       help="evaluate on at most this many examples (class-stratified; default: all)")
    group.add_argument("--eval-batch-size", type=positive_int, default=128, help="default: 128")
    parser.add_argument("--data-dir", default=None, help="data directory (default: the run's, then $ASAP_DATA_DIR)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda[:i] (default: cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_compile)
    return parser


def _named_by_flag(message: str) -> str:
    """A refused CompileOptions field's message, led by the option that set it (``--ridge: ridge must be >= 0``)."""
    from asap.compile.swap import CompileOptions

    name = message.split(" ", 1)[0]
    return f"{option_flag(CompileOptions, name)}: {message}" if name in cli_fields(CompileOptions) else message


def run_compile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from asap.bench.compile_report import fidelity_table, plot_report
    from asap.bench.measure import time_operators_ms
    from asap.compile import compile_model, save_compiled
    from asap.runs import accuracies, calibration_batches, check_output_dir, load_data, load_teacher
    from asap.compile.calibrate import check_holdout_fraction
    from asap.compile.swap import CompileOptions
    from asap.io import atomic_write_json

    try:  # the fit options' ranges (--ridge >= 0, --holdout in [0, 1), odd --truncated-iters, ...), before any work
        options = compile_options(args)
        CompileOptions.build(**options)
        check_holdout_fraction(options["holdout_fraction"])
    except ValueError as err:
        print(f"asap compile: error: {_named_by_flag(str(err))}", file=sys.stderr)
        return 2
    try:
        teacher = load_teacher(args.run_dir, device=args.device)
        # Before any work, and again just before writing (the folder may have changed meanwhile): --out must
        # not be, contain or lie inside the run or another saved run (it would overwrite the teacher's weights).
        check_output_dir(args.out, run_dir=args.run_dir)
        extra_files = teacher.extra_files()
    except AsapError as err:
        print(f"asap compile: error: {err}", file=sys.stderr)
        return 2
    progress = None if args.quiet else (lambda it, total: tqdm(it, total=total, desc="calibrating", leave=False))
    batches = calibration_batches(teacher, num_samples=args.calibration, batch_size=args.batch_size, seed=args.seed,
                                  data_dir=args.data_dir)  # fmt: skip
    try:
        compiled, report = compile_model(teacher.model, batches, progress=progress, timer=time_operators_ms, **options)
    except ValueError as err:
        print(f"asap compile: error: {err}", file=sys.stderr)
        return 2
    report["calibration"].update(examples=sum(len(b["labels"]) for b in batches), split="train", batch_size=args.batch_size)
    report["source"] = {"run_dir": str(teacher.run_dir), "sha256": teacher.source_sha256}
    if not args.no_eval:
        data = load_data(teacher, split=args.eval_split, limit=args.eval_limit, data_dir=args.data_dir)
        report["accuracy"] = accuracies(
            teacher, compiled, data=data, layers=args.layers, truncated_iters=args.truncated_iters,
            batch_size=args.eval_batch_size,
        )  # fmt: skip
        report["accuracy"]["split"] = args.eval_split
    check_output_dir(args.out, run_dir=args.run_dir)
    out = save_compiled(
        args.out, compiled, report=report, run_config=teacher.run_config.to_dict(),
        source_sha256=teacher.source_sha256, copy_files=extra_files,
    )  # fmt: skip
    atomic_write_json(Path(out) / "fidelity.json", report)
    plot_report(report, Path(out) / "fidelity.png")
    print(fidelity_table(report))
    for line in report.get("selection", []):
        print(line)
    print(f"\ncompiled model written to {out} (load with asap.compile.load_compiled)")
    return 0
