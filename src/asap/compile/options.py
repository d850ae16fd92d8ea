"""The fit options of ``asap compile`` as command-line options (shared by the CLI and the experiment driver).

Every option is generated from a field of :class:`~asap.compile.swap.CompileOptions` (its flag, type, help and
real default live there), and the map-specific flags from the dual-map registry (their defaults are the map
classes' :data:`~asap.attention.dual_map.DualMap.OPTIONS`). They live in the compile stage, beside the dataclass
they fill, so that the experiment driver does not import the command line; :mod:`asap.cli.compile` uses them.
"""

from __future__ import annotations

import argparse
from typing import Any

from asap.argtypes import add_field_options, positive_int
from asap.attention.dual_map import dual_map_class
from asap.compile.swap import CompileOptions

#: CompileOptions fields on the command line with their defaults, by option group. ``map_kind`` (``--map``) is
#: left out of the namespace when not given, so that ``--map`` and ``--target-tv`` together can be refused.
FIT_FIELDS = ("num_slices", "slice_type", "extra_features", "seed", "ridge", "refine", "refine_iters", "mode",
              "layers", "holdout_fraction", "reservoir_size", "truncated_iters")  # fmt: skip
MAP_FIELDS = ("map_steps", "map_lr", "target_tv")

#: The flags of each map kind's options: ``flag dest -> (kind, option name)``.
MAP_OPTION_FLAGS: dict[str, tuple[str, str]] = {
    "relu_depth": ("relu", "depth"),
    "relu_stacks": ("relu", "num_stacks"),
    "mlp_hidden": ("mlp", "hidden"),
}
_MAP_OPTION_HELP = {
    "relu_depth": ("K", "relu map: depth k of each network (2^k linear pieces)"),
    "relu_stacks": ("M", "relu map: signed convex stacks per slice"),
    "mlp_hidden": ("H", "mlp map: hidden width"),
}


def add_compile_options(parser: argparse.ArgumentParser) -> None:
    """The fit and dual-map options (shared with the experiment driver)."""
    add_field_options(parser.add_argument_group("fit"), CompileOptions, FIT_FIELDS, use_defaults=True)
    maps = parser.add_argument_group("dual map")
    add_field_options(maps, CompileOptions, ("map_kind",), use_defaults=False, default_texts={"map_kind": "linear"})
    for dest, (kind, name) in MAP_OPTION_FLAGS.items():
        metavar, text = _MAP_OPTION_HELP[dest]
        default = dual_map_class(kind).OPTIONS[name][0]
        maps.add_argument("--" + dest.replace("_", "-"), type=positive_int, default=None, metavar=metavar,
                          help=f"{text} (default: {default})")  # fmt: skip
    add_field_options(maps, CompileOptions, MAP_FIELDS, use_defaults=True)


def map_options_from_flags(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    """``{kind: {option: value}}`` from the map flags given, refusing a flag of a kind that is not compiled.

    Raises:
        ValueError: one line naming the flag (``--relu-depth`` without ``--map relu``
            or ``--target-tv``), or ``--map`` together with ``--target-tv``.
    """
    target = getattr(args, "target_tv", None) is not None
    if target and getattr(args, "map_kind", None) is not None:
        raise ValueError("--map and --target-tv exclude each other (--target-tv chooses the map of each layer)")
    kinds = ("linear", "relu", "mlp") if target else (getattr(args, "map_kind", None) or "linear",)
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


def compile_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword options of :func:`asap.compile.compile_model` from parsed arguments (dests are field names).

    Raises ``ValueError`` (one line naming the flag) for map flags that do not go
    together (:func:`map_options_from_flags`).
    """
    options = {name: getattr(args, name) for name in (*FIT_FIELDS, *MAP_FIELDS)}
    options.update(map_kind=getattr(args, "map_kind", None) or "linear", map_options=map_options_from_flags(args))
    return options
