"""Argument types shared by every command-line parser (``asap`` sub-commands, ``python -m asap.bench.*``):
a bad value fails while parsing, naming the option.

They sit at the bottom of the house so that the benchmark modules, which build their own
parsers below the CLI, use the same ones: one comma-list type, one positive integer.

``argparse`` reports a type's ``ArgumentTypeError`` as
``asap <cmd>: error: argument --batch-size: must be an integer >= 1, got '0'``,
before anything runs, so ``--batch-size 0`` never reaches a ``range()`` call.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Collection


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes, counts, steps)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (seeds, workers, "0 = off" counts)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """A finite number (NaN and infinities refused); range checks are the config's."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def int_list(item: Callable[[str], int] = positive_int) -> Callable[[str], list[int]]:
    """A comma-separated list of integers (``64,128,256``), each checked by ``item``."""

    def parse(text: str) -> list[int]:
        parts = [part.strip() for part in text.split(",")]
        if not text.strip() or any(not part for part in parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        try:
            return [item(part) for part in parts]
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"{err} (in {text!r})") from None

    parse.__name__ = "int_list"
    return parse


def name_list(choices: Collection[str] | None = None) -> Callable[[str], tuple[str, ...]]:
    """A comma-separated list of names (``softmax,sinkhorn``), empty items refused, each among ``choices`` if given."""

    def parse(text: str) -> tuple[str, ...]:
        parts = tuple(part.strip() for part in text.split(","))
        if not text.strip() or any(not part for part in parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
        if choices is not None:
            unknown = [part for part in parts if part not in choices]
            if unknown:
                raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))}; choose from {', '.join(choices)}")
        return parts

    parse.__name__ = "name_list"
    return parse
