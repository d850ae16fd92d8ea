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

from asap.argtypes import int_list, name_list, nonnegative_int, positive_int
from asap.attention.dual_map import DEFAULT_EXTRA_FEATURES
from asap.io import command_line

SCHEMA = "asap.bench.operators/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FAMILIES = ("softmax", "sinkhorn", "asap", "esp")
CPU_LENGTHS = (128, 256, 512, 1024)
GPU_LENGTHS = (256, 512, 1024, 2048, 4096)


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

    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 8
    heads: int = 8
    head_dim: int = 64
    lengths: tuple[int, ...] = CPU_LENGTHS
    sinkhorn_iters: tuple[int, ...] = (3, 5, 11, 21)
    teacher_iters: int = 21
    num_slices: int = 16
    extra_features: tuple[str, ...] = DEFAULT_EXTRA_FEATURES
    eps: float = 1.0
    padding: float = 0.0
    threads: int | None = None
    methods: tuple[str, ...] = ("softmax", "sinkhorn", "asap", "esp")
    backward: bool = True
    backward_max_length: int | None = 512
    max_length: Mapping[str, int] = field(default_factory=lambda: {"esp": 128})
    warmup: int = 1
    repeats: int = 7
    min_repeats: int = 1
    budget_s: float | None = 5.0
    measure_memory: bool = True
    verify_length: int = 24
    seed: int = 0

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


def _limits(text: str) -> dict[str, int]:
    """``esp=128,sinkhorn=512`` -> ``{"esp": 128, "sinkhorn": 512}``."""
    out = {}
    for item in name_list()(text):
        family, _, value = item.partition("=")
        if family not in FAMILIES or not value.isdigit():
            raise argparse.ArgumentTypeError(f"expected FAMILY=N with FAMILY in {FAMILIES}, got {item!r}")
        out[family] = int(value)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``asap bench operators`` (shared with ``python -m asap.bench.operators``)."""
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--batch-size", dest="batch", type=positive_int, help="b (default 8)")
    parser.add_argument("--batch", dest="batch", type=positive_int, help=argparse.SUPPRESS)  # the old spelling
    parser.add_argument("--heads", type=positive_int, help="h (default 8)")
    parser.add_argument("--head-dim", type=positive_int, help="d (default 64)")
    parser.add_argument("--lengths", type=int_list(), help="comma-separated n = m, e.g. 64,128,256 (default: by device)")
    parser.add_argument("--iters", type=int_list(), help="Sinkhorn half-steps K to time (default 3,5,11,21)")
    parser.add_argument("--teacher-iters", type=positive_int, help="K of the reference teacher (default 21)")
    parser.add_argument("--slices", type=positive_int, help="ASAP slices L (default 16)")
    parser.add_argument("--extra-features", type=name_list(),
                        help=f"ASAP per-token extras, comma-separated, or 'none' (default {','.join(DEFAULT_EXTRA_FEATURES)})")
    parser.add_argument("--padding", type=float, help="mean fraction of padded tokens, in [0, 0.5) (default 0)")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: torch's default)")
    parser.add_argument("--eps", type=float, help="entropic regularisation (default 1.0)")
    parser.add_argument("--methods", type=name_list(FAMILIES), help=f"families to run, from {','.join(FAMILIES)} (default: all)")
    parser.add_argument("--no-backward", action="store_true", help="time forward passes only")
    parser.add_argument("--backward-max-length", type=nonnegative_int, help="longest n timed with backward (0: no limit)")
    parser.add_argument("--max-length", type=_limits, help="per-family longest n, e.g. esp=128 (default: by device)")
    parser.add_argument("--warmup", type=nonnegative_int, help="untimed calls per method (default 1; the first measures memory)")
    parser.add_argument("--repeats", type=positive_int, help="most timed calls per method and shape (default 7)")
    parser.add_argument("--min-repeats", type=positive_int, help="fewest timed calls per method and shape (default 1)")
    parser.add_argument("--budget-s", type=float,
                        help="seconds of timed calls per method and shape (default 5; 0: no budget)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--seed", type=nonnegative_int)
    parser.add_argument("--out", type=Path, help="output JSON (default results/bench/operators_<device>.json)")


def config_from_args(args: argparse.Namespace) -> OperatorBenchConfig:
    overrides: dict[str, Any] = {}
    for attr, key in (("dtype", "dtype"), ("batch", "batch"), ("heads", "heads"), ("head_dim", "head_dim"),
                      ("lengths", "lengths"), ("iters", "sinkhorn_iters"), ("teacher_iters", "teacher_iters"),
                      ("slices", "num_slices"), ("eps", "eps"), ("methods", "methods"),
                      ("max_length", "max_length"), ("warmup", "warmup"), ("repeats", "repeats"),
                      ("min_repeats", "min_repeats"), ("seed", "seed"), ("padding", "padding"),
                      ("threads", "threads")):
        value = getattr(args, attr)
        if value is not None:
            overrides[key] = tuple(value) if isinstance(value, list) else value  # the config's sequences are tuples
    if args.extra_features is not None:
        overrides["extra_features"] = () if args.extra_features == ("none",) else args.extra_features
    if args.backward_max_length is not None:
        overrides["backward_max_length"] = args.backward_max_length or None
    if args.budget_s is not None:
        overrides["budget_s"] = args.budget_s or None
    if args.no_backward:
        overrides["backward"] = False
    if args.no_memory:
        overrides["measure_memory"] = False
    return OperatorBenchConfig.for_device(args.device, **overrides)


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
