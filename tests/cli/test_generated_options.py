"""Command-line options are generated from the typed option dataclasses (issue 9, item 4).

A field's flag, type, help and default live in the dataclass; these tests fail if a parser's help states a
default the dataclass does not have, if a parsed namespace does not map back onto the dataclass, or if two
sub-commands spell the same concept differently.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from asap.argtypes import add_field_options, cli, cli_fields, field_default, option_flag
from asap.cli.main import build_parser
from asap.bench.fidelity import FidelityConfig
from asap.bench.operator_config import OperatorBenchConfig, config_from_args
from asap.compile.options import add_compile_options, compile_options
from asap.compile.swap import CompileOptions
from asap.train.config import TrainConfig

#: Old spellings that may survive only as hidden aliases (help=SUPPRESS), and the spelling to use instead.
RETIRED_FLAGS = {"--output": "--out", "--batch": "--batch-size", "--output-dir": "--out", "--outdir": "--out"}


def _subparsers(parser: argparse.ArgumentParser):
    """Every (prog, parser) below ``parser``, itself included."""
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _subparsers(sub)


def _action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    found = [a for a in parser._actions if a.dest == dest and a.help != argparse.SUPPRESS]
    assert len(found) == 1, (dest, [a.option_strings for a in found])
    return found[0]


def _rendered(value):
    """How a plain default must read in the help: ``0.001`` for 1e-3, ``0.9 0.999`` for a pair."""
    if isinstance(value, tuple):
        return " ".join(map(_rendered, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _subcommand(name: str) -> argparse.ArgumentParser:
    return dict(_subparsers(build_parser()))[f"asap {name}"]


@pytest.mark.parametrize("cls, command", [(TrainConfig, "train"), (CompileOptions, "compile"),
                                          (OperatorBenchConfig, "bench operators"),
                                          (FidelityConfig, "bench fidelity")])
def test_every_declared_field_is_an_option_whose_help_states_the_real_default(cls, command):
    parser = _subcommand(command)
    fields = cli_fields(cls)
    assert len(fields) >= 8
    for name, item in fields.items():
        action = _action(parser, name)
        assert option_flag(cls, name) in action.option_strings
        spec, value = item.metadata["cli"], field_default(item)
        if spec.action in ("store_true", "store_false", "append"):
            continue
        expected = spec.default_text if spec.default_text is not None else _rendered(value)
        assert f"(default: {expected})" in " ".join(action.help.split()), (name, action.help)
        if spec.default_text is None and value is not None:
            # a hand-written default cannot hide in the text: the default shown is the field's value
            assert expected in (str(value), f"{value:g}" if isinstance(value, float) else "", _rendered(value))


def test_a_default_that_changes_in_the_dataclass_changes_in_the_help():
    @dataclasses.dataclass
    class Options:
        steps: int = dataclasses.field(default=7, metadata=cli("how many"))

    parser = argparse.ArgumentParser()
    add_field_options(parser, Options, ("steps",), use_defaults=True)
    assert "(default: 7)" in parser.format_help()
    assert parser.parse_args([]).steps == 7
    Options.__dataclass_fields__["steps"].default = 9  # what a code change would do
    parser = argparse.ArgumentParser()
    add_field_options(parser, Options, ("steps",), use_defaults=True)
    assert "(default: 9)" in parser.format_help() and parser.parse_args([]).steps == 9


def test_compile_options_not_given_are_the_dataclass_defaults():
    parser = argparse.ArgumentParser()
    add_compile_options(parser)
    options = compile_options(parser.parse_args([]))
    defaults = CompileOptions()
    for name, value in options.items():
        assert value == getattr(defaults, name), name
    given = compile_options(parser.parse_args(["--slices", "8", "--holdout", "0.5", "--layers", "0,2",
                                               "--extra-features", "none", "--map", "relu", "--relu-depth", "3"]))
    built = CompileOptions(**{**given, "layers": tuple(given["layers"])})
    assert (built.num_slices, built.holdout_fraction, built.layers, built.extra_features) == (8, 0.5, (0, 2), ())
    assert built.map_kind == "relu" and built.map_options["relu"]["depth"] == 3


def test_train_options_map_one_to_one_onto_train_config_fields():
    from asap.cli.train import options_to_fields

    parser = _subcommand("train")
    args = parser.parse_args(["--heads", "2", "--out", "somewhere", "--no-progress", "--grad-clip", "0",
                              "--attention-option", "grad_mode=unroll"])
    fields = options_to_fields(args)
    assert fields == {"num_heads": 2, "out_dir": "somewhere", "progress": False, "grad_clip": None,
                      "attention_options": {"grad_mode": "unroll"}}
    assert set(fields) <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_the_same_concept_has_the_same_flag_in_every_subcommand():
    for prog, parser in _subparsers(build_parser()):
        for action in parser._actions:
            visible = action.help != argparse.SUPPRESS
            for flag in action.option_strings:
                if flag in RETIRED_FLAGS:
                    assert not visible, f"{prog}: {flag} is spelled {RETIRED_FLAGS[flag]} elsewhere"


def test_retired_spellings_still_work_as_hidden_aliases():
    args = _subcommand("eval").parse_args(["run", "--output", "x.json"])
    assert args.output == "x.json"
    assert "--output" not in _subcommand("eval").format_help()


def test_operator_bench_options_not_given_keep_the_device_defaults():
    parser = _subcommand("bench operators")
    assert config_from_args(parser.parse_args(["--device", "cpu"])) == OperatorBenchConfig.for_device("cpu")
    config = config_from_args(parser.parse_args(["--device", "cpu", "--batch", "2", "--iters", "3,21",
                                                 "--no-backward", "--budget-s", "0", "--extra-features", "none"]))
    assert (config.batch, config.sinkhorn_iters, config.backward, config.budget_s, config.extra_features) == (
        2, (3, 21), False, None, ())
