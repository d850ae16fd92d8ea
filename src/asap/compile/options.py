"""The fit options of ``asap compile`` as command-line options (shared by the CLI and the experiment driver).

They live in the compile stage, beside :class:`~asap.compile.swap.CompileOptions`
which they fill, so that the experiment driver (compile stage) does not import
the command line (the top stage); :mod:`asap.cli.compile` re-exports them.
"""

from __future__ import annotations

import argparse

from asap.argtypes import finite_float, nonnegative_int, positive_float, positive_int
from asap.attention.dual_map import DEFAULT_EXTRA_FEATURES

#: The flags of each map kind's options: ``flag dest -> (kind, option name)``.
MAP_OPTION_FLAGS: dict[str, tuple[str, str]] = {
    "relu_depth": ("relu", "depth"),
    "relu_stacks": ("relu", "num_stacks"),
    "mlp_hidden": ("mlp", "hidden"),
}


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
    maps = parser.add_argument_group("dual map")
    maps.add_argument("--map", choices=("linear", "relu", "mlp"), default=None,
                      help="dual map kind: linear (default), relu (per-slice triangle-wave ReLU networks, "
                           "arXiv 2311.18022) or mlp (one hidden layer with a linear skip)")  # fmt: skip
    maps.add_argument("--relu-depth", type=positive_int, default=None, metavar="K",
                      help="relu map: depth k of each network (2^k linear pieces; default 4)")
    maps.add_argument("--relu-stacks", type=positive_int, default=None, metavar="M",
                      help="relu map: signed convex stacks per slice (default 2)")
    maps.add_argument("--mlp-hidden", type=positive_int, default=None, metavar="H", help="mlp map: hidden width (default 32)")
    maps.add_argument("--map-steps", type=positive_int, default=300,
                      help="Adam steps of the relu/mlp fit (early-stopped on held-out data; default 300)")
    maps.add_argument("--map-lr", type=positive_float, default=1e-2, help="Adam step of the relu/mlp fit (default 0.01)")
    maps.add_argument("--target-tv", type=finite_float, default=None, metavar="X",
                      help="per layer, compile the cheapest of linear/relu/mlp x 0/1/2 extra steps whose mean held-out "
                           "row TV to the teacher is <= X (else the lowest-TV one); replaces --map")  # fmt: skip


def map_options_from_flags(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    """``{kind: {option: value}}`` from the map flags given, refusing a flag of a kind that is not compiled.

    Raises:
        ValueError: one line naming the flag (``--relu-depth`` without ``--map relu``
            or ``--target-tv``), or ``--map`` together with ``--target-tv``.
    """
    target = getattr(args, "target_tv", None) is not None
    if target and getattr(args, "map", None) is not None:
        raise ValueError("--map and --target-tv exclude each other (--target-tv chooses the map of each layer)")
    kinds = ("linear", "relu", "mlp") if target else (getattr(args, "map", None) or "linear",)
    options: dict[str, dict[str, int]] = {}
    for dest, (kind, name) in MAP_OPTION_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if kind not in kinds:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} is an option of the {kind} map, but the map is {kinds[0]} (add --map {kind} or --target-tv)")
        options.setdefault(kind, {})[name] = value
    return options


def compile_options(args: argparse.Namespace) -> dict:
    """Keyword options of :func:`asap.compile.compile_model` from parsed arguments.

    Raises ``ValueError`` (one line naming the flag) for map flags that do not go
    together (:func:`map_options_from_flags`).
    """
    return dict(
        num_slices=args.slices, slice_type=args.slice_type, extra_features=args.extra_features, seed=args.seed,
        ridge=args.ridge, refine=args.refine,
        refine_iters=args.refine_iters, mode=args.mode, layers=args.layers, holdout_fraction=args.holdout,
        reservoir_size=args.reservoir, truncated_iters=args.truncated_iters,
        map_kind=getattr(args, "map", None) or "linear", map_options=map_options_from_flags(args),
        map_steps=getattr(args, "map_steps", 300), map_lr=getattr(args, "map_lr", 1e-2),
        target_tv=getattr(args, "target_tv", None),
    )  # fmt: skip
