"""``asap train``: train a classifier with a chosen attention method (or resume a run).

    asap train --dataset imdb --data-dir ../shared/data --method sinkhorn --n-iters 11 --eps 1 \\
               --epochs 3 --out runs/imdb_sk11
    asap train --resume runs/imdb_sk11
    asap train --dataset csv:reviews.csv --text-column review --label-column stars --out runs/reviews
    asap train --model hf:models/minilm --dataset csv:reviews/ --method sinkhorn --n-iters 3 \\
               --lr 5e-5 --max-length 128 --out runs/minilm_sk3    # fine-tune a local pretrained encoder
    torchrun --nproc_per_node=2 -m asap.cli.main train ...      # data-parallel

Every option is generated from a field of :class:`asap.train.TrainConfig`
(``--heads`` -> ``num_heads``, ``--out`` -> ``out_dir``, ``--model`` ->
``pretrained``), with the field's help and real default; options not given keep
the config's defaults. Your own data and ``--model`` folders are
recorded with absolute paths, with the data options, so ``asap eval RUN`` and
``asap compile RUN`` read the same data without repeating them. With
``--resume`` the run's own ``config.json`` is used: options that would change
the result are refused, run-time ones (data dir, workers, device,
checkpointing, stopping point) may be changed. A run stopped before
its first checkpoint resumes from step 0.

Every option is checked before anything is written (a refused command leaves
no file behind): a bad value is reported on one line naming the option, with
exit status 2. ``--method asap`` is refused unless ``--allow-unfitted``: ASAP's
dual map is fitted by ``asap compile``, never trained.
"""

from __future__ import annotations

import argparse
import json
import os
from functools import partial
from pathlib import Path
from typing import Any

from asap.argtypes import add_field_options, option_flag
from asap.errors import ConfigError
from asap.io import command_line

#: command-line dests that are not TrainConfig fields.
NOT_FIELDS = ("command", "func", "resume", "allow_unfitted")
#: TrainConfig fields on the command line, by option group (every option is generated from its field).
GROUPS = {
    "run": ("dataset", "data_dir", "out_dir"),
    "model": ("pretrained", "preset", "dim", "depth", "num_heads", "mlp_ratio", "dropout", "pooling", "patch_size"),
    "attention": ("method", "n_iters", "eps", "attention_options"),
    "data": ("text_column", "label_column", "data_options", "max_length", "vocab_size", "val_fraction", "limit",
             "augment"),
    "optimisation": ("epochs", "batch_size", "lr", "weight_decay", "betas", "warmup_fraction", "min_lr_ratio",
                     "grad_clip", "seed"),
    "run time": ("num_workers", "device", "compile", "checkpoint_every", "stop_after_steps", "eval_batch_size",
                 "log_every", "progress"),
}  # fmt: skip
ATTENTION_FIELDS = GROUPS["attention"]


def flag_for(field_name: str) -> str:
    """The ``asap train`` option that sets TrainConfig field ``field_name`` (``num_heads`` -> ``--heads``)."""
    from asap.train.config import TrainConfig

    return option_flag(TrainConfig, field_name)


def _train_config(build, *args):
    """``build(*args)``, a refused field reported under its option's name (``--grad-clip: ...``)."""
    from asap.train.config import OptionError

    try:
        return build(*args)
    except OptionError as err:
        raise ConfigError(f"{flag_for(err.field)}: {err.problem}") from None


def add_attention_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, method_flag: str = "--method",
                          method_default: str | None = None) -> None:  # fmt: skip
    """The attention method switch and its options, generated from TrainConfig (shared with ``asap eval``)."""
    from asap.train.config import TrainConfig

    add_field_options(parser, TrainConfig, ATTENTION_FIELDS, use_defaults=False, flags={"method": method_flag},
                      default_texts={"method": method_default} if method_default else None)  # fmt: skip


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a model (text: TextClassifier, images: ViT)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    from asap.train.config import TrainConfig

    groups = {title: parser.add_argument_group(title) for title in GROUPS}
    groups["run"].add_argument("--resume", metavar="RUN_DIR", help="continue the interrupted run in RUN_DIR exactly")
    for title, names in GROUPS.items():
        add_field_options(groups[title], TrainConfig, names, use_defaults=False)
    groups["attention"].add_argument("--allow-unfitted", action="store_true", default=argparse.SUPPRESS,
                                     help="allow --method asap, whose dual map is then never fitted (a zero map)")
    parser.set_defaults(func=partial(run_train, parser=parser))
    return parser


def options_to_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line (and only those): the options' dests are field names."""
    fields = {k: v for k, v in vars(args).items() if k not in NOT_FIELDS}
    for name in ("attention_options", "data_options"):  # repeated KEY=VALUE pairs -> a mapping
        if name in fields:
            fields[name] = dict(fields[name])
    if fields.get("grad_clip") == 0:
        fields["grad_clip"] = None
    return fields


def config_from_args(args: argparse.Namespace):
    """Build the TrainConfig of a new run, or of the run ``--resume`` names (validated against it)."""
    from asap.train import TrainConfig, read_run_config
    from asap.train.config import RUNTIME_FIELDS

    fields = options_to_fields(args)
    if args.resume is None:
        return _train_config(lambda: TrainConfig(**fields))
    if fields.pop("out_dir", args.resume) != args.resume:
        raise ConfigError("--resume RUN_DIR continues the run in RUN_DIR; --out cannot name another directory")
    stored = read_run_config(args.resume).train.to_dict()
    stored["out_dir"] = args.resume
    changed = {k: v for k, v in fields.items() if k not in RUNTIME_FIELDS and stored[k] != v}
    if changed:
        runtime = ", ".join(sorted(flag_for(k) for k in RUNTIME_FIELDS - {"out_dir"}))
        raise ConfigError(
            f"--resume: cannot change {', '.join(sorted(flag_for(k) for k in changed))} of a run "
            f"(its {Path(args.resume) / 'config.json'} is used); only run-time options ({runtime}) may be given"
        )
    stored["stop_after_steps"] = None  # a stopping point applies to one invocation only
    stored.update(fields)
    return _train_config(TrainConfig.from_dict, stored)


def train_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The ``asap train`` command line equivalent to ``args`` (the options given, long spellings)."""
    parts: list[str] = []
    given = vars(args)
    for action in parser._actions:
        value = given.get(action.dest)
        if not action.option_strings or action.dest == "help" or value is None:
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:  # store_true / store_false
            parts.append(flag)
        elif action.dest in ("attention_options", "data_options"):
            for key, option in value:
                parts += [flag, f"{key}={option if isinstance(option, str) else json.dumps(option)}"]
        elif isinstance(value, list):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return command_line("asap train", parts)


def run_train(args: argparse.Namespace, *, parser: argparse.ArgumentParser) -> int:
    from asap.train import train

    config = config_from_args(args)
    # The command line is recorded in RUN_DIR/command.txt by train(), once every check has passed.
    result = train(config, resume=args.resume is not None, command=train_command(args, parser),
                   allow_unfitted=getattr(args, "allow_unfitted", False))  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0 and result["test"] is not None:
        print(json.dumps({"run_dir": result["run_dir"], "test_accuracy": result["test"]["accuracy"],
                          "global_step": result["global_step"]}))  # fmt: skip
    return 0
