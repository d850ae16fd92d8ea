"""The training configuration: one dataclass, serialised beside every run.

Every field is checked once, here, when a :class:`TrainConfig` is built (from
Python, the command line or a run's ``config.json``): a refused value raises
:class:`OptionError` naming the field, before anything is loaded or written.
Booleans are not numbers here (``True`` is refused where an int is expected),
and no value is silently replaced by a default.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asap.argtypes import cli, finite_float, key_value, nonnegative_int, positive_int
from asap.attention.module import AttentionConfig
from asap.errors import ConfigError


class OptionError(ConfigError):
    """A refused :class:`TrainConfig` field: ``field`` is its name, ``problem`` what is wrong with it.

    The command line reports it under the option's name (``--grad-clip: ...``).
    """

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"TrainConfig.{field_name}: {problem}")
        self.field, self.problem = field_name, problem


def _int(name: str, value: Any, *, minimum: int, maximum: int | None = None, optional: bool = False) -> None:
    """An int (not a bool) in ``[minimum, maximum]``; None allowed when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionError(name, f"expected an integer{' or None' if optional else ''}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise OptionError(name, f"must be {bound}, got {value!r}")


def _real(
    name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False,
    optional: bool = False,
) -> None:  # fmt: skip
    """A finite real number (not a bool) in the interval given; None allowed when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(name, f"expected a number{' or None' if optional else ''}, got {value!r}")
    inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not math.isfinite(value) or not inside:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        if high == math.inf:
            interval = f"{'> ' if low_open else '>= '}{low:g} and finite"
            raise OptionError(name, f"must be {interval}, got {value!r}")
        raise OptionError(name, f"must be a finite number in {interval}, got {value!r}")


def _str(name: str, value: Any, *, choices: tuple[str, ...] | None = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        raise OptionError(name, f"expected a non-empty string{' or None' if optional else ''}, got {value!r}")
    if choices is not None and value not in choices:
        raise OptionError(name, f"must be one of {', '.join(choices)}; got {value!r}")


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise OptionError(name, f"expected true or false, got {value!r}")

#: Fields that describe *where and how fast* a run executes, not *what* it computes.
#: They may differ when a run is resumed (another data copy, more workers, a
#: different stopping point); every other field must match the checkpoint.
RUNTIME_FIELDS = frozenset(
    {"data_dir", "out_dir", "num_workers", "device", "compile", "checkpoint_every", "stop_after_steps",
     "eval_batch_size", "log_every", "progress"}
)


@dataclass
class TrainConfig:
    """Everything :func:`asap.train.train` needs; saved in the run's ``config.json``.

    Model size comes from ``preset`` ("tiny" | "small" | "base", see
    :data:`asap.models.PRESETS`), overridden field by field by ``dim``,
    ``depth``, ``num_heads``, ``mlp_ratio`` when they are not None. The model
    type follows the data set kind (text -> TextClassifier, image -> ViT).
    ``pretrained="hf:PATH"`` fine-tunes instead a pretrained transformers
    encoder from the local folder ``PATH`` (BERT family for text, ViT for
    images) with a fresh classification head, its attention converted to
    ``method``; its size, dropout and tokenizer are its own, so ``preset``,
    the size overrides, ``pooling``, ``patch_size``, ``dropout`` and
    ``vocab_size`` must keep their defaults.

    Attention: ``method`` is a key of ``asap.attention.OPERATORS``; ``n_iters``
    and ``eps`` are passed to it when set (Sinkhorn needs ``n_iters``: the
    number K of half-steps, odd so that rows are exact), ``attention_options``
    carries any other operator option (e.g. ``{"grad_mode": "unroll"}``).

    Optimisation: AdamW (``lr``, ``weight_decay`` on matrices only, ``betas``),
    linear warm-up over ``warmup_fraction`` of all steps, then cosine decay to
    ``min_lr_ratio * lr``; gradients clipped to norm ``grad_clip`` (None: no clip).
    ``batch_size`` is the *global* batch: with N processes each takes
    ``batch_size / N`` examples, so a run's result does not depend on N.
    The last incomplete batch of each epoch is dropped so that every step has
    the same size on every process.

    Data: ``dataset`` is a built-in name (``asap.data.DATASETS``) or your own
    data, ``csv:PATH``, ``jsonl:PATH``, ``imagefolder:PATH`` or ``hf:PATH``,
    read with ``text_column``, ``label_column`` and the other
    :class:`asap.data.DataOptions` fields in ``data_options``; both paths
    (data and ``pretrained``) are made absolute when the config is built, so
    a run records where its data is. ``limit`` caps the number of examples
    read per split (quick runs); ``val_fraction`` of the training split is
    held out for validation with ``seed``; text is cut/padded to
    ``max_length`` subword tokens of a ``vocab_size`` tokenizer trained on the
    training split only (a pretrained model's own tokenizer otherwise).

    Run control: a checkpoint is written every ``checkpoint_every`` optimiser
    steps (0: only at epoch ends and on interruption); ``stop_after_steps``
    stops (with a checkpoint) once the global step reaches it, leaving a run
    that ``resume`` continues exactly as if it had never stopped.
    """

    dataset: str = field(default="digits", metadata=cli(
        "a built-in data set (see asap.data.DATASETS), or your own: csv:PATH, jsonl:PATH (a file with a split "
        "column, or a folder of train/test files), imagefolder:PATH (class subfolders), hf:PATH (a datasets folder "
        "or local Parquet/CSV files)"))
    data_dir: str | None = field(default=None, metadata=cli("data directory", default_text="$ASAP_DATA_DIR"))
    out_dir: str = field(default="runs/run", metadata=cli("run directory to create", flag="--out"))
    # model
    preset: str = field(default="tiny", metadata=cli("model size", choices=("tiny", "small", "base")))
    dim: int | None = field(default=None, metadata=cli(
        "width, overriding the preset", type=positive_int, default_text="the preset's"))
    depth: int | None = field(default=None, metadata=cli(
        "number of blocks, overriding the preset", type=positive_int, default_text="the preset's"))
    num_heads: int | None = field(default=None, metadata=cli(
        "attention heads, overriding the preset", flag="--heads", type=positive_int, default_text="the preset's"))
    mlp_ratio: float | None = field(default=None, metadata=cli(
        "MLP hidden width / dim, overriding the preset", type=finite_float, default_text="the preset's"))
    dropout: float = field(default=0.0, metadata=cli("dropout", type=finite_float))
    pooling: str = field(default="mean", metadata=cli("text pooling", choices=("mean", "cls")))
    patch_size: int | None = field(default=None, metadata=cli(
        "ViT patch size", type=positive_int, default_text="the largest of 4, 2, 1 that leaves at least 4 x 4 patches"))
    pretrained: str | None = field(default=None, metadata=cli(
        "fine-tune the pretrained transformers encoder in the local folder PATH (BERT, MiniLM, RoBERTa, DistilBERT; "
        "ViT for images) with a new classification head, under --method; its tokenizer and size are its own",
        flag="--model", metavar="hf:PATH", default_text="train the project's model from scratch"))
    # attention
    method: str = field(default="softmax", metadata=cli("attention method: softmax | sinkhorn | esp | asap"))
    n_iters: int | None = field(default=None, metadata=cli(
        "Sinkhorn half-steps K (odd: rows exact; K=1 is softmax)", type=positive_int,
        default_text="the method's own; sinkhorn needs it"))
    eps: float | None = field(default=None, metadata=cli(
        "entropic regularisation", type=finite_float, default_text="the method's own, 1"))
    attention_options: dict[str, Any] = field(default_factory=dict, metadata=cli(
        "any other option of the attention operator (repeatable), e.g. grad_mode=unroll",
        flag="--attention-option", type=key_value, action="append", metavar="KEY=VALUE"))
    # data
    text_column: str = field(default="text", metadata=cli("your own data: the column/key holding the text"))
    label_column: str = field(default="label", metadata=cli(
        "your own data: the column/key holding the label, strings or integers"))
    data_options: dict[str, Any] = field(default_factory=dict, metadata=cli(
        "any other option of your own data (repeatable; see asap.data.DataOptions), e.g. split_column=part, "
        "test_fraction=0.2, image_size=32, image_column=img",
        flag="--data-option", type=key_value, action="append", metavar="KEY=VALUE"))
    max_length: int = field(default=256, metadata=cli("subword tokens per text", type=positive_int))
    vocab_size: int = field(default=8000, metadata=cli("tokenizer vocabulary", type=positive_int))
    val_fraction: float = field(default=0.1, metadata=cli("held-out part of train", type=finite_float))
    limit: int | None = field(default=None, metadata=cli(
        "at most this many examples per split (class-stratified; quick runs)", type=positive_int,
        default_text="all"))
    augment: bool = field(default=False, metadata=cli("random shifts (and flips) of images", action="store_true"))
    # optimisation
    epochs: int = field(default=3, metadata=cli("passes over the training split", type=positive_int))
    batch_size: int = field(default=64, metadata=cli("global batch, split across processes", type=positive_int))
    lr: float = field(default=1e-3, metadata=cli("peak AdamW learning rate", type=finite_float))
    weight_decay: float = field(default=0.05, metadata=cli("AdamW weight decay (matrices only)", type=finite_float))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=cli("AdamW betas", type=finite_float, nargs=2))
    warmup_fraction: float = field(default=0.05, metadata=cli("linear warm-up share of all steps", type=finite_float))
    min_lr_ratio: float = field(default=0.0, metadata=cli("cosine floor, as a fraction of --lr", type=finite_float))
    grad_clip: float | None = field(default=1.0, metadata=cli("gradient norm clip, 0 = none", type=finite_float))
    seed: int = field(default=0, metadata=cli("seed of initialisation, split and order", type=nonnegative_int))
    # runtime
    num_workers: int = field(default=0, metadata=cli("DataLoader workers", type=nonnegative_int))
    device: str = field(default="auto", metadata=cli("auto | cpu | cuda[:i]"))
    compile: bool = field(default=False, metadata=cli("torch.compile the model", action="store_true"))
    checkpoint_every: int = field(default=0, metadata=cli(
        "also checkpoint every N steps", type=nonnegative_int, default_text="0, epoch ends only"))
    stop_after_steps: int | None = field(default=None, metadata=cli(
        "stop (resumably) once this global step is reached", type=positive_int, default_text="never"))
    eval_batch_size: int | None = field(default=None, metadata=cli(
        "evaluation batch", type=positive_int, default_text="2 x batch size"))
    log_every: int = field(default=10, metadata=cli("progress-bar refresh, in steps", type=positive_int))
    progress: bool = field(default=True, metadata=cli("no progress bars", flag="--no-progress", action="store_false"))

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)  # JSON gives a list
        if not isinstance(self.attention_options, dict):
            raise OptionError("attention_options", f"expected a mapping of option names to values, got {self.attention_options!r}")
        self.attention_options = dict(self.attention_options)
        if not isinstance(self.data_options, dict):
            raise OptionError("data_options", f"expected a mapping of data option names to values, got {self.data_options!r}")
        self.data_options = dict(self.data_options)
        self.validate()
        self.dataset, self.pretrained = _absolute_dataset(self.dataset), _absolute_pretrained(self.pretrained)

    def validate(self) -> None:
        """Check every field (called by ``__init__``); raises :class:`OptionError` naming the first bad one.

        Conventions: ``grad_clip`` is a finite norm > 0, or None for no clipping
        (the command line's ``--grad-clip 0`` means None); ``patch_size``,
        ``eval_batch_size``, ``stop_after_steps``, ``limit`` and the size
        overrides are None for "the default" and otherwise >= 1.
        """
        from asap.attention.operators import OPERATORS  # the registry may grow after import
        from asap.models.config import PRESETS

        _str("dataset", self.dataset)
        _str("data_dir", self.data_dir, optional=True)
        _str("out_dir", self.out_dir)
        # model
        _str("preset", self.preset, choices=tuple(PRESETS))
        for name in ("dim", "depth", "num_heads", "patch_size"):
            _int(name, getattr(self, name), minimum=1, optional=True)
        _real("mlp_ratio", self.mlp_ratio, low=0.0, low_open=True, optional=True)
        _real("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        _str("pooling", self.pooling, choices=("mean", "cls"))
        self._check_pretrained()
        size = self.model_size()
        if size["dim"] % size["num_heads"] != 0:
            field_name = "dim" if self.dim is not None else "num_heads"
            raise OptionError(field_name, f"dim={size['dim']} must be divisible by num_heads={size['num_heads']}")
        # attention
        _str("method", self.method, choices=tuple(sorted(OPERATORS)))
        _int("n_iters", self.n_iters, minimum=1, optional=True)
        _real("eps", self.eps, low=0.0, low_open=True, optional=True)
        bad_keys = [k for k in self.attention_options if not isinstance(k, str) or not k]
        if bad_keys:
            raise OptionError("attention_options", f"option names must be strings, got {bad_keys!r}")
        clash = sorted({"n_iters", "eps"} & set(self.attention_options))
        if clash:
            raise OptionError("attention_options", f"give {', '.join(clash)} as its own field (--n-iters/--eps), not as an attention option")
        self._check_attention_options(size)
        # data
        self._check_data_options()
        _int("max_length", self.max_length, minimum=1)
        _int("vocab_size", self.vocab_size, minimum=1)
        _real("val_fraction", self.val_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
        _int("limit", self.limit, minimum=1, optional=True)
        _bool("augment", self.augment)
        # optimisation
        _int("epochs", self.epochs, minimum=1)
        _int("batch_size", self.batch_size, minimum=1)
        _real("lr", self.lr, low=0.0, low_open=True)
        _real("weight_decay", self.weight_decay, low=0.0)
        if not isinstance(self.betas, tuple) or len(self.betas) != 2:
            raise OptionError("betas", f"expected two numbers, got {self.betas!r}")
        for beta in self.betas:
            try:
                _real("betas", beta, low=0.0, high=1.0, high_open=True)
            except OptionError:
                raise OptionError("betas", f"each must be a finite number in [0, 1), got {list(self.betas)!r}") from None
        _real("warmup_fraction", self.warmup_fraction, low=0.0, high=1.0, high_open=True)
        _real("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        _real("grad_clip", self.grad_clip, low=0.0, low_open=True, optional=True)
        _int("seed", self.seed, minimum=0, maximum=2**32 - 1)  # numpy's global seed is 32-bit
        # run time
        _int("num_workers", self.num_workers, minimum=0)
        _str("device", self.device)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise OptionError("device", f"must be 'auto', 'cpu' or 'cuda[:i]', got {self.device!r}")
        _bool("compile", self.compile)
        _int("checkpoint_every", self.checkpoint_every, minimum=0)
        _int("stop_after_steps", self.stop_after_steps, minimum=1, optional=True)
        _int("eval_batch_size", self.eval_batch_size, minimum=1, optional=True)
        _int("log_every", self.log_every, minimum=1)
        _bool("progress", self.progress)

    def _check_attention_options(self, size: dict[str, Any]) -> None:
        """Build one operator as the model will (on a private RNG): the method refuses what it does not take."""
        import torch

        from asap.attention.operators import build_operator

        config = self.attention_config()
        with torch.random.fork_rng(devices=[]):
            try:
                build_operator(config.method, num_heads=size["num_heads"], head_dim=size["dim"] // size["num_heads"],
                               **config.options)  # fmt: skip
            except (TypeError, ValueError) as err:
                field_name = "n_iters" if "n_iters" in str(err) else "eps" if "eps" in str(err) else "attention_options"
                raise OptionError(field_name, f"{err}") from None

    def _check_pretrained(self) -> None:
        """``pretrained`` is ``hf:PATH``; the fields that shape the project's own models keep their defaults."""
        _str("pretrained", self.pretrained, optional=True)
        if self.pretrained is None:
            return
        scheme, _, path = self.pretrained.partition(":")
        if scheme != PRETRAINED_SCHEME or not path:
            raise OptionError("pretrained", f"expected hf:PATH (a local transformers model folder), got {self.pretrained!r}")
        for name in OWN_MODEL_FIELDS:
            if getattr(self, name) != _DEFAULTS[name]:
                raise OptionError(
                    name, f"does not apply to a pretrained model ({self.pretrained}): its size, pooling, dropout and "
                    f"tokenizer are its own (got {getattr(self, name)!r})"
                )

    def _check_data_options(self) -> None:
        """The data set name, and the data options it reads (a refused one is named by its own field)."""
        from asap.data import DATA_SOURCES, DATASETS, dataset_info, parse_dataset_spec

        try:
            dataset_info(self.dataset)
        except ConfigError as err:
            raise OptionError("dataset", str(err)) from None
        _str("text_column", self.text_column)
        _str("label_column", self.label_column)
        bad_keys = [k for k in self.data_options if not isinstance(k, str) or not k]
        if bad_keys:
            raise OptionError("data_options", f"option names must be strings, got {bad_keys!r}")
        clash = sorted({"text_column", "label_column"} & set(self.data_options))
        if clash:
            raise OptionError("data_options", f"give {', '.join(clash)} as its own field (--text-column/--label-column), not as a data option")
        try:
            options = self.dataset_options()
        except ConfigError as err:
            message = str(err)
            field_name = next((n for n in ("text_column", "label_column") if n in message), "data_options")
            raise OptionError(field_name, message) from None
        readable = frozenset() if self.dataset in DATASETS else DATA_SOURCES[parse_dataset_spec(self.dataset).scheme].options
        for name in options.changed():
            if name not in readable:
                reads = ", ".join(sorted(readable)) or "no data option (options are for your own data, SCHEME:PATH)"
                raise OptionError(
                    name if name in ("text_column", "label_column") else "data_options",
                    f"data set {self.dataset!r} does not read the data option {name}; it reads {reads}",
                )
        dataset_info(self.dataset, options=options)

    def dataset_options(self) -> Any:
        """The :class:`asap.data.DataOptions` of ``dataset``: ``text_column``, ``label_column`` and ``data_options``."""
        from asap.data import DataOptions

        return DataOptions.from_dict({"text_column": self.text_column, "label_column": self.label_column, **self.data_options})

    def model_size(self) -> dict[str, Any]:
        """``dim``, ``depth``, ``num_heads``, ``mlp_ratio``: the preset's, overridden by the fields that are set."""
        from asap.models.config import PRESETS

        size = dict(PRESETS[self.preset])
        for name in ("dim", "depth", "num_heads", "mlp_ratio"):
            if getattr(self, name) is not None:
                size[name] = getattr(self, name)
        return size

    @property
    def resolved_eval_batch_size(self) -> int:
        """``eval_batch_size``, or twice the training batch when it is None."""
        return 2 * self.batch_size if self.eval_batch_size is None else self.eval_batch_size

    def attention_config(self) -> AttentionConfig:
        """The :class:`AttentionConfig` of every layer: ``method`` + ``n_iters``/``eps`` (when set) + extra options."""
        options = dict(self.attention_options)
        if self.n_iters is not None:
            options["n_iters"] = self.n_iters
        if self.eps is not None:
            options["eps"] = self.eps
        return AttentionConfig(method=self.method, options=options)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict`; fields missing from ``data`` take their defaults (older runs)."""
        if not isinstance(data, dict):
            raise ConfigError(f"TrainConfig: expected a mapping of fields, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names, key=str)
        if unknown:
            raise ConfigError(f"TrainConfig: unknown field(s) {unknown}")
        return cls(**data)

    def differences(self, other: TrainConfig, *, ignore: frozenset[str] = RUNTIME_FIELDS) -> dict[str, tuple[Any, Any]]:
        """``{field: (self value, other value)}`` for every differing field not in ``ignore``."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if k not in ignore and mine[k] != theirs[k]}


#: ``pretrained`` is ``hf:PATH`` (the only scheme today: a local transformers model folder).
PRETRAINED_SCHEME = "hf"
#: Fields that shape the project's own models; a pretrained model fixes them itself.
OWN_MODEL_FIELDS = ("preset", "dim", "depth", "num_heads", "mlp_ratio", "dropout", "pooling", "patch_size", "vocab_size")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in OWN_MODEL_FIELDS}


def _absolute_dataset(name: str) -> str:
    """``SCHEME:PATH`` with an absolute ``PATH`` (a run is read back from anywhere); built-in names unchanged."""
    from asap.data import DATASETS, parse_dataset_spec

    return name if name in DATASETS else str(parse_dataset_spec(name).absolute())


def _absolute_pretrained(spec: str | None) -> str | None:
    """``hf:PATH`` with an absolute ``PATH`` (``~`` expanded)."""
    if spec is None:
        return None
    scheme, _, path = spec.partition(":")
    return f"{scheme}:{Path(path).expanduser().absolute()}"
