"""The fit options of ``asap compile`` as command-line options (shared by the CLI and the experiment driver).

They live in the compile stage, beside :class:`~asap.compile.swap.CompileOptions`
which they fill, so that the experiment driver (compile stage) does not import
the command line (the top stage); :mod:`asap.cli.compile` re-exports them.
"""

from __future__ import annotations

import argparse

from asap.argtypes import finite_float, nonnegative_int, positive_int
from asap.attention.dual_map import DEFAULT_EXTRA_FEATURES


def _layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated layer indices like 0,1; got {text!r}") from None


def _features(text: str) -> tuple[str, ...]:
    return () if text == "none" else tuple(f for f in text.split(",") if f)


def add_compile_options(parser: argparse.ArgumentParser) -> None:
    """The fit options (shared with the experiment driver)."""
    group = parser.add_argument_group("fit")
    group.add_argument("--slices", type=positive_int, default=16, help="number L of slice directions per head (default 16)")
    group.add_argument("--slice-type", choices=("random", "axis"), default="random", help="slice directions")
    group.add_argument("--extra-features", type=_features, default=DEFAULT_EXTRA_FEATURES,
                       help="O(n d) per-token features added to the slice potentials, or 'none' (default qk_mean,q_norm)")
    group.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the random directions (layer l uses seed + l)")
    group.add_argument("--ridge", type=finite_float, default=1e-3, help="ridge, relative to the Gram trace (default 1e-3)")
    group.add_argument("--refine", choices=("none", "kl"), default="none", help="second stage: KL refinement of the map")
    group.add_argument("--refine-iters", type=positive_int, default=30, help="L-BFGS iterations of the KL refinement")
    group.add_argument("--mode", choices=("teacher", "sequential"), default="teacher", help="calibration activations")
    group.add_argument("--layers", type=_layers, default=None, help="compile only these Sinkhorn layers, e.g. 0,1")
    group.add_argument("--holdout", type=finite_float, default=0.25, help="fraction of calibration batches held out")
    group.add_argument("--reservoir", type=positive_int, default=64, help="sequences kept per layer for refinement/figures")
    group.add_argument("--truncated-iters", type=positive_int, default=3, help="half-steps of the same-cost Sinkhorn baseline")


def compile_options(args: argparse.Namespace) -> dict:
    """Keyword options of :func:`asap.compile.compile_model` from parsed arguments."""
    return dict(
        num_slices=args.slices, slice_type=args.slice_type, extra_features=args.extra_features, seed=args.seed,
        ridge=args.ridge, refine=args.refine,
        refine_iters=args.refine_iters, mode=args.mode, layers=args.layers, holdout_fraction=args.holdout,
        reservoir_size=args.reservoir, truncated_iters=args.truncated_iters,
    )  # fmt: skip
