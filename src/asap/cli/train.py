"""``asap train``: train a classifier with a chosen attention method (or resume a run).

    asap train --dataset imdb --data-dir ../shared/data --method sinkhorn --n-iters 11 --eps 1 \\
               --epochs 3 --out runs/imdb_sk11
    asap train --resume runs/imdb_sk11
    asap train --dataset csv:reviews.csv --text-column review --label-column stars --out runs/reviews
    asap train --model hf:models/minilm --dataset csv:reviews/ --method sinkhorn --n-iters 3 \\
               --lr 5e-5 --max-length 128 --out runs/minilm_sk3    # fine-tune a local pretrained encoder
    torchrun --nproc_per_node=2 -m asap.cli.main train ...      # data-parallel

Every option maps to a field of :class:`asap.train.TrainConfig` (``--heads`` ->
``num_heads``, ``--out`` -> ``out_dir``, ``--model`` -> ``pretrained``); options
not given keep the config's defaults. Your own data and ``--model`` folders are
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

from asap.cli.options import finite_float, nonnegative_int, positive_int
from asap.errors import ConfigError
from asap.io import command_line

#: command-line dest -> TrainConfig field, where the names differ.
RENAMED = {"out": "out_dir", "heads": "num_heads", "no_progress": "progress", "model": "pretrained"}
#: repeatable KEY=VALUE options -> their flag (the field holds a mapping).
KEY_VALUE_FLAGS = {"attention_options": "--attention-option", "data_options": "--data-option"}
#: command-line dests that are not TrainConfig fields.
NOT_FIELDS = ("command", "func", "resume", "allow_unfitted")


def flag_for(field_name: str) -> str:
    """The ``asap train`` option that sets TrainConfig field ``field_name`` (``num_heads`` -> ``--heads``)."""
    dest = {v: k for k, v in RENAMED.items()}.get(field_name, field_name)
    return KEY_VALUE_FLAGS.get(dest, "--" + dest.replace("_", "-"))


def _train_config(build, *args):
    """``build(*args)``, a refused field reported under its option's name (``--grad-clip: ...``)."""
    from asap.train.config import OptionError

    try:
        return build(*args)
    except OptionError as err:
        raise ConfigError(f"{flag_for(err.field)}: {err.problem}") from None


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it is JSON (``grad_mode=unroll``, ``tau=0.01``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_attention_options(parser: argparse.ArgumentParser, *, method_flag: str = "--method") -> None:
    """The attention method switch and its options (shared with ``asap eval``)."""
    parser.add_argument(method_flag, dest="method", default=argparse.SUPPRESS,
                        help="attention method: softmax | sinkhorn | esp | asap (default: softmax)")
    parser.add_argument("--n-iters", type=positive_int, default=argparse.SUPPRESS,
                        help="Sinkhorn half-steps K (odd: rows exact; K=1 is softmax)")
    parser.add_argument("--eps", type=finite_float, default=argparse.SUPPRESS, help="entropic regularisation (default 1)")
    parser.add_argument("--attention-option", dest="attention_options", type=_key_value, action="append",
                        default=argparse.SUPPRESS, metavar="KEY=VALUE",
                        help="any other option of the attention operator (repeatable), e.g. grad_mode=unroll")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a model (text: TextClassifier, images: ViT)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    S = argparse.SUPPRESS
    run = parser.add_argument_group("run")
    run.add_argument("--dataset", default=S,
                     help="a built-in data set (see asap.data.DATASETS; default: digits), or your own: csv:PATH, "
                          "jsonl:PATH (a file with a split column, or a folder of train/test files), "
                          "imagefolder:PATH (class subfolders), hf:PATH (a datasets folder or local Parquet/CSV files)")
    run.add_argument("--data-dir", default=S, help="data directory (default: $ASAP_DATA_DIR)")
    run.add_argument("--out", default=S, help="run directory to create (default: runs/run)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the interrupted run in RUN_DIR exactly")
    model = parser.add_argument_group("model")
    model.add_argument("--model", metavar="hf:PATH", default=S,
                       help="fine-tune the pretrained transformers encoder in the local folder PATH (BERT, MiniLM, "
                            "RoBERTa, DistilBERT; ViT for images) with a new classification head, under --method; "
                            "its tokenizer and size are its own (default: train the project's model from scratch)")
    model.add_argument("--preset", choices=("tiny", "small", "base"), default=S, help="model size (default: tiny)")
    model.add_argument("--dim", type=positive_int, default=S, help="width (overrides the preset)")
    model.add_argument("--depth", type=positive_int, default=S, help="number of blocks (overrides the preset)")
    model.add_argument("--heads", type=positive_int, default=S, help="attention heads (overrides the preset)")
    model.add_argument("--mlp-ratio", type=finite_float, default=S, help="MLP hidden width / dim (overrides the preset)")
    model.add_argument("--dropout", type=finite_float, default=S, help="dropout (default 0)")
    model.add_argument("--pooling", choices=("mean", "cls"), default=S, help="text pooling (default: mean)")
    model.add_argument("--patch-size", type=positive_int, default=S, help="ViT patch size (default: 4, or 2 for small images)")
    add_attention_options(model)
    model.add_argument("--allow-unfitted", action="store_true", default=S,
                       help="allow --method asap, whose dual map is then never fitted (a zero map)")
    data = parser.add_argument_group("data")
    data.add_argument("--text-column", default=S, help="your own data: the column/key holding the text (default: text)")
    data.add_argument("--label-column", default=S,
                      help="your own data: the column/key holding the label, strings or integers (default: label)")
    data.add_argument("--data-option", dest="data_options", type=_key_value, action="append", default=S,
                      metavar="KEY=VALUE",
                      help="any other option of your own data (repeatable; see asap.data.DataOptions), e.g. "
                           "split_column=part, test_fraction=0.2, image_size=32, image_column=img")
    data.add_argument("--max-length", type=positive_int, default=S, help="subword tokens per text (default 256)")
    data.add_argument("--vocab-size", type=positive_int, default=S, help="tokenizer vocabulary (default 8000)")
    data.add_argument("--val-fraction", type=finite_float, default=S, help="held-out part of train (default 0.1)")
    data.add_argument("--limit", type=positive_int, default=S, help="at most this many examples per split (quick runs)")
    data.add_argument("--augment", action="store_true", default=S, help="random shifts (and flips) of images")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=positive_int, default=S, help="default 3")
    optim.add_argument("--batch-size", type=positive_int, default=S, help="global batch, split across processes (default 64)")
    optim.add_argument("--lr", type=finite_float, default=S, help="peak AdamW learning rate (default 1e-3)")
    optim.add_argument("--weight-decay", type=finite_float, default=S, help="default 0.05")
    optim.add_argument("--betas", type=finite_float, nargs=2, default=S, help="AdamW betas (default 0.9 0.999)")
    optim.add_argument("--warmup-fraction", type=finite_float, default=S, help="linear warm-up share of all steps (default 0.05)")
    optim.add_argument("--min-lr-ratio", type=finite_float, default=S, help="cosine floor, as a fraction of --lr (default 0)")
    optim.add_argument("--grad-clip", type=finite_float, default=S, help="gradient norm clip, 0 = none (default 1)")
    optim.add_argument("--seed", type=nonnegative_int, default=S, help="default 0")
    runtime = parser.add_argument_group("run time")
    runtime.add_argument("--num-workers", type=nonnegative_int, default=S, help="DataLoader workers (default 0)")
    runtime.add_argument("--device", default=S, help="auto | cpu | cuda[:i] (default: auto)")
    runtime.add_argument("--compile", action="store_true", default=S, help="torch.compile the model")
    runtime.add_argument("--checkpoint-every", type=nonnegative_int, default=S, help="also checkpoint every N steps (default: epoch ends only)")
    runtime.add_argument("--stop-after-steps", type=positive_int, default=S, help="stop (resumably) once this global step is reached")
    runtime.add_argument("--eval-batch-size", type=positive_int, default=S, help="default: 2 x batch size")
    runtime.add_argument("--log-every", type=positive_int, default=S, help="progress-bar refresh, in steps (default 10)")
    runtime.add_argument("--no-progress", action="store_false", default=S, help="no progress bars")
    parser.set_defaults(func=partial(run_train, parser=parser))
    return parser


def options_to_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line (and only those)."""
    fields = {RENAMED.get(k, k): v for k, v in vars(args).items() if k not in NOT_FIELDS}
    for name in KEY_VALUE_FLAGS:
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
        elif action.dest in KEY_VALUE_FLAGS:
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
