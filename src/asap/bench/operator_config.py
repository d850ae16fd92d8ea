"""The operator benchmark's settings and command line: :class:`OperatorBenchConfig` (the grid and the
measurement settings, stored verbatim in the JSON), the options of ``asap bench operators``
(:func:`add_arguments`, :func:`config_from_args`) and the command that reproduces a config
(:func:`command_for`). The benchmark itself is :mod:`asap.bench.operators`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from asap.argtypes import add_field_options, cli, finite_float, int_list, name_list, nonnegative_int, positive_int
from asap.attention.dual_map import DEFAULT_EXTRA_FEATURES
from asap.io import command_line

SCHEMA = "asap.bench.operators/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FAMILIES = ("softmax", "sinkhorn", "asap", "esp")
CPU_LENGTHS = (128, 256, 512, 1024)
GPU_LENGTHS = (256, 512, 1024, 2048, 4096)


def _limits(text: str) -> dict[str, int]:
    """``esp=128,sinkhorn=512`` -> ``{"esp": 128, "sinkhorn": 512}``."""
    out = {}
    for item in name_list()(text):
        family, _, value = item.partition("=")
        if family not in FAMILIES or not value.isdigit():
            raise argparse.ArgumentTypeError(f"expected FAMILY=N with FAMILY in {FAMILIES}, got {item!r}")
        out[family] = int(value)
    return out


@dataclass(frozen=True)
class OperatorBenchConfig:
    """The grid and the measurement settings (stored verbatim in the output JSON).

    Attributes:
        batch, heads, head_dim: ``b``, ``h``, ``d`` of every input.
        lengths: sequence lengths ``n = m`` of the grid.
        sinkhorn_iters: the Sinkhorn half-step counts ``K`` timed.
        teacher_iters: the ``K`` of the reference teacher (one of ``sinkhorn_iters``).
        num_slices: ``L`` of the ASAP dual map; extra_features: its per-token
            extras (default: those ``asap compile`` uses). eps: entropic
            regularisation of Sinkhorn and ASAP.
        padding: mean fraction of padded tokens. ``0`` times unpadded inputs;
            ``p > 0`` gives sequence ``i`` of the batch the length
            ``n (1 - 2 p i / (b - 1))`` (at least 1), passed to every method as
            the ``(b, n)`` token mask (``padding_mask``), as text models run.
        threads: ``torch.set_num_threads`` for the run (``None``: torch's default,
            as users run it); recorded in the machine description.
        methods: method families to run (``softmax``, ``sinkhorn``, ``asap``, ``esp``).
        backward: also time forward + backward of the trainable methods.
        backward_max_length: longest ``n`` timed with backward (``None``: all);
            the unrolled ``K = 21`` backward stores ``O(K b h n^2)``.
        max_length: per family, the longest ``n`` timed at all (ESP's soft
            sort costs ``O(d n^2)`` per head: seconds per call on a CPU at ``n = 128``).
        warmup, repeats, min_repeats, budget_s: see :func:`asap.bench.measure.benchmark`
            (``budget_s`` is per method and shape: slow methods and big shapes get fewer calls).
        measure_memory: measure peak memory (first warm-up call of each method).
        verify_length: ``n`` of the fp64 verification input.
    """

    device: str = field(default="cpu", metadata=cli("cpu or cuda[:i]", default_text="cuda when available, else cpu"))
    dtype: str = field(default="float32", metadata=cli("input dtype", choices=tuple(sorted(DTYPES))))
    batch: int = field(default=8, metadata=cli("b", flag="--batch-size", type=positive_int))
    heads: int = field(default=8, metadata=cli("h", type=positive_int))
    head_dim: int = field(default=64, metadata=cli("d", type=positive_int))
    lengths: tuple[int, ...] = field(default=CPU_LENGTHS, metadata=cli(
        "comma-separated n = m, e.g. 64,128,256", type=int_list(),
        default_text=f"{','.join(map(str, CPU_LENGTHS))} on cpu, {','.join(map(str, GPU_LENGTHS))} on cuda"))
    sinkhorn_iters: tuple[int, ...] = field(default=(3, 5, 11, 21), metadata=cli(
        "Sinkhorn half-steps K to time", flag="--iters", type=int_list(), default_text="3,5,11,21"))
    teacher_iters: int = field(default=21, metadata=cli("K of the reference teacher", type=positive_int))
    num_slices: int = field(default=16, metadata=cli("ASAP slices L", flag="--slices", type=positive_int))
    extra_features: tuple[str, ...] = field(default=DEFAULT_EXTRA_FEATURES, metadata=cli(
        "ASAP per-token extras, comma-separated, or 'none'", type=name_list(),
        default_text=",".join(DEFAULT_EXTRA_FEATURES)))
    eps: float = field(default=1.0, metadata=cli("entropic regularisation", type=finite_float))
    padding: float = field(default=0.0, metadata=cli("mean fraction of padded tokens, in [0, 0.5)", type=finite_float))
    threads: int | None = field(default=None, metadata=cli(
        "torch threads", type=positive_int, default_text="torch's default"))
    methods: tuple[str, ...] = field(default=("softmax", "sinkhorn", "asap", "esp"), metadata=cli(
        f"families to run, from {','.join(FAMILIES)}", type=name_list(FAMILIES), default_text="all"))
    backward: bool = field(default=True, metadata=cli(
        "time forward passes only", flag="--no-backward", action="store_false"))
    backward_max_length: int | None = field(default=512, metadata=cli(
        "longest n timed with backward, 0: no limit", type=nonnegative_int, default_text="512 on cpu, no limit on cuda"))
    max_length: Mapping[str, int] = field(default_factory=lambda: {"esp": 128}, metadata=cli(
        "per-family longest n, e.g. esp=128", type=_limits, default_text="esp=128 on cpu, esp=1024 on cuda"))
    warmup: int = field(default=1, metadata=cli(
        "untimed calls per method; the first measures memory", type=nonnegative_int, default_text="1 on cpu, 2 on cuda"))
    repeats: int = field(default=7, metadata=cli(
        "most timed calls per method and shape", type=positive_int, default_text="7 on cpu, 10 on cuda"))
    min_repeats: int = field(default=1, metadata=cli("fewest timed calls per method and shape", type=positive_int))
    budget_s: float | None = field(default=5.0, metadata=cli(
        "seconds of timed calls per method and shape, 0: no budget", type=finite_float))
    measure_memory: bool = field(default=True, metadata=cli(
        "skip the peak-memory measurement", flag="--no-memory", action="store_false"))
    verify_length: int = 24
    seed: int = field(default=0, metadata=cli("seed of the random inputs", type=nonnegative_int))

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not 0.0 <= self.padding < 0.5:
            raise ValueError(f"padding must be a fraction in [0, 0.5), got {self.padding}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive integers, got {self.lengths}")
        if self.teacher_iters not in self.sinkhorn_iters or "sinkhorn" not in self.methods:
            raise ValueError(
                f"the teacher (K={self.teacher_iters}) must be timed: include it in sinkhorn_iters "
                f"{self.sinkhorn_iters} and 'sinkhorn' in methods {self.methods}"
            )
        unknown = set(self.methods) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown method families {sorted(unknown)}; choose from {FAMILIES}")

    @classmethod
    def for_device(cls, device: str, **overrides: Any) -> OperatorBenchConfig:
        """Defaults sized for the device: the CPU grid stops at ``n = 1024``; on GPU, longer and no backward cap."""
        if torch.device(device).type == "cuda":
            gpu = {"lengths": GPU_LENGTHS, "backward_max_length": None, "max_length": {"esp": 1024},
                   "repeats": 10, "warmup": 2}
            overrides = {**gpu, **overrides}
        return cls(device=device, **overrides)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["max_length"] = dict(self.max_length)
        out["extra_features"] = list(self.extra_features)
        return out


#: OperatorBenchConfig fields on the command line, in the order of ``--help`` (every option generated from its field).
OPTION_FIELDS = ("device", "dtype", "batch", "heads", "head_dim", "lengths", "sinkhorn_iters", "teacher_iters",
                 "num_slices", "extra_features", "padding", "threads", "eps", "methods", "backward",
                 "backward_max_length", "max_length", "warmup", "repeats", "min_repeats", "budget_s", "measure_memory",
                 "seed")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``asap bench operators`` (shared with ``python -m asap.bench.operators``), generated from
    :class:`OperatorBenchConfig`; an option not given keeps the device's default (:meth:`~OperatorBenchConfig.for_device`)."""
    add_field_options(parser, OperatorBenchConfig, OPTION_FIELDS, use_defaults=False)
    parser.add_argument("--batch", dest="batch", type=positive_int, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)  # the old spelling of --batch-size
    parser.add_argument("--out", type=Path, help="output JSON (default: results/bench/operators_<device>.json)")


def config_from_args(args: argparse.Namespace) -> OperatorBenchConfig:
    """The config of the options given (the namespace holds only those; the others are the device's defaults)."""
    given = {name: getattr(args, name) for name in OPTION_FIELDS if hasattr(args, name)}
    device = given.pop("device", "cuda" if torch.cuda.is_available() else "cpu")
    for name, value in given.items():
        if isinstance(value, list):
            given[name] = tuple(value)  # the config's sequences are tuples
    if given.get("extra_features") == ("none",):
        given["extra_features"] = ()
    for name in ("backward_max_length", "budget_s"):  # 0 on the command line: no limit
        if name in given:
            given[name] = given[name] or None
    return OperatorBenchConfig.for_device(device, **given)


def command_for(config: OperatorBenchConfig, out: Path) -> str:
    """A command that reproduces ``config`` exactly (every option spelled out, whatever was typed)."""
    def ints(values: Sequence[int]) -> str:
        return ",".join(str(x) for x in values)

    args = [
        "--device", config.device, "--dtype", config.dtype, "--batch-size", str(config.batch), "--heads", str(config.heads),
        "--head-dim", str(config.head_dim), "--lengths", ints(config.lengths), "--iters", ints(config.sinkhorn_iters),
        "--teacher-iters", str(config.teacher_iters), "--slices", str(config.num_slices),
        "--extra-features", ",".join(config.extra_features) or "none", "--padding", repr(config.padding),
        "--eps", repr(config.eps),
        "--methods", ",".join(config.methods), "--backward-max-length", str(config.backward_max_length or 0),
        "--max-length", ",".join(f"{k}={v}" for k, v in config.max_length.items()), "--warmup", str(config.warmup),
        "--repeats", str(config.repeats), "--min-repeats", str(config.min_repeats),
        "--budget-s", repr(config.budget_s or 0), "--seed", str(config.seed), "--out", str(out),
    ]
    if not config.backward:
        args.append("--no-backward")
    if not config.measure_memory:
        args.append("--no-memory")
    if config.threads is not None:
        args += ["--threads", str(config.threads)]
    return command_line("python -m asap.bench.operators", args)
