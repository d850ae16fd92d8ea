"""Argument types shared by the sub-commands: a bad value fails while parsing, naming the option.

``argparse`` reports a type's ``ArgumentTypeError`` as
``asap <cmd>: error: argument --batch-size: must be an integer >= 1, got '0'``,
before anything runs, so ``--batch-size 0`` never reaches a ``range()`` call.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


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
