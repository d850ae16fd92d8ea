"""Argument types shared by every command-line parser (``asap`` sub-commands, ``python -m asap.bench.*``):
a bad value fails while parsing, naming the option; and options generated from typed dataclass fields
(:func:`cli`, :func:`add_field_options`), so that a flag, its help and its default live in one place.

They sit at the bottom of the house so that the benchmark modules, which build their own
parsers below the CLI, use the same ones: one comma-list type, one positive integer.

``argparse`` reports a type's ``ArgumentTypeError`` as
``asap <cmd>: error: argument --batch-size: must be an integer >= 1, got '0'``,
before anything runs, so ``--batch-size 0`` never reaches a ``range()`` call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


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


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it is JSON (``grad_mode=unroll``, ``tau=0.01``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def module_main(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run_from_args: Callable[[argparse.Namespace, list[str]], int],
) -> int:
    """The ``python -m`` entry of a command that ``asap`` also runs: its own parser (``prog``, the
    ``description`` shown as written, the options of ``add_arguments``), then ``run_from_args(args, argv)``,
    ``argv`` defaulting to ``sys.argv[1:]`` (the command it records)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_from_args(parser.parse_args(argv), argv)


# --- command-line options generated from dataclass fields ------------------------------------------------------
#
# A typed options dataclass is the one place where an option's name, type, default and help live: each field
# that the command line sets carries ``metadata=cli(...)``, and :func:`add_field_options` turns the fields into
# ``argparse`` options whose ``dest`` is the field's name and whose help ends with the field's real default.
# So ``--help`` cannot drift from the dataclass, and a parsed namespace maps onto the dataclass one to one.


@dataclass(frozen=True)
class CliOption:
    """How one dataclass field appears on the command line (kept in ``field.metadata["cli"]``).

    ``flag`` defaults to ``--field-name``; ``type``/``choices``/``metavar``/``nargs``/``action`` are passed to
    ``argparse``; ``default_text`` says in words what a default means where the value alone does not
    (``None`` = "the preset's"); ``show_default=False`` leaves the default out of the help (flags, repeatables).
    """

    help: str
    flag: str | None = None
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    nargs: int | str | None = None
    action: str | None = None
    default_text: str | None = None
    show_default: bool = True


def cli(help: str, **options: Any) -> dict[str, CliOption]:
    """Field metadata declaring a command-line option: ``x: int = field(default=3, metadata=cli("..."))``."""
    return {"cli": CliOption(help, **options)}


def field_default(item: dataclasses.Field) -> Any:
    """A dataclass field's default value (its factory called), or ``dataclasses.MISSING``."""
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return item.default


def cli_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of dataclass ``cls`` that declare a command-line option, by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls) if "cli" in f.metadata}


def option_flag(cls: type, name: str) -> str:
    """The command-line flag of field ``name`` of ``cls`` (``num_heads`` -> ``--heads``)."""
    spec = cli_fields(cls)[name].metadata["cli"]
    return spec.flag or "--" + name.replace("_", "-")


def _default_text(spec: CliOption, value: Any, *, name: str) -> str | None:
    if not spec.show_default or spec.action in ("store_true", "store_false", "append"):
        return None
    if spec.default_text is not None:
        return spec.default_text
    if value is None:  # "default: None" tells a user nothing: the field must say what None means
        raise ValueError(f"option {name}: a None default needs default_text (what None means)")
    if isinstance(value, (tuple, list)):
        return " ".join(_default_text(spec, v, name=name) or "" for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def add_field_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    names: Sequence[str],
    *,
    use_defaults: bool,
    flags: Mapping[str, str] | None = None,
    default_texts: Mapping[str, str] | None = None,
) -> None:
    """Add one option per field ``names`` of dataclass ``cls`` (each declared with :func:`cli`).

    With ``use_defaults`` an option not given takes the field's default; without, it is absent from the
    namespace (``argparse.SUPPRESS``: the caller learns which options were given, e.g. to resume a run).
    ``flags`` overrides the flag of some fields (``{"method": "--method-override"}``), ``default_texts`` what
    their help says of the default (where the caller's default is not the field's: ``{"method": "the run's"}``).
    """
    fields = cli_fields(cls)
    for name in names:
        if name not in fields:
            raise KeyError(f"{cls.__name__}.{name} declares no command-line option (metadata=cli(...))")
        spec, value = fields[name].metadata["cli"], field_default(fields[name])
        text = (default_texts or {}).get(name) or _default_text(spec, value, name=name)
        kwargs: dict[str, Any] = {
            "dest": name,
            "help": spec.help if text is None else f"{spec.help} (default: {text})",
            "default": value if use_defaults else argparse.SUPPRESS,
        }
        if spec.action is not None:
            kwargs["action"] = spec.action
            if spec.action == "append" and use_defaults:
                kwargs["default"] = None  # argparse would append to the shared default
        for key in ("type", "choices", "metavar", "nargs"):
            if getattr(spec, key) is not None:
                kwargs[key] = getattr(spec, key)
        flag = (flags or {}).get(name) or spec.flag or "--" + name.replace("_", "-")
        if spec.metavar is None and spec.choices is None and spec.action not in ("store_true", "store_false"):
            kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()  # --heads HEADS, not NUM_HEADS
        parser.add_argument(flag, **kwargs)
