"""Operator benchmark: time and peak memory of every attention operator over a grid of shapes.

For each sequence length ``n = m`` of the grid (batch ``b``, ``h`` heads, head
size ``d``), one interleaved run (:func:`asap.bench.measure.benchmark`) times
the forward pass of

* ``softmax``: :func:`~asap.attention.functional.softmax_attention`;
* ``sinkhorn_k{K}``: the Sinkhorn teacher with ``K`` half-steps, ``K`` in
  ``{3, 5, 11, 21}`` by default (``K = 21`` is the reference teacher);
* ``asap_l{L}``: the *full* compiled operator, :class:`~asap.attention.operators.AsapOperator`:
  ``L`` exact 1-D slice potentials, the linear dual map, then
  :func:`~asap.attention.functional.asap_attention`. Its coefficients are
  random (``N(0, 1/L)``), not fitted: the cost does not depend on their values,
  so this is a timing of the operator, not of its accuracy;
* ``esp``: :func:`~asap.attention.esp.esp_attention` with its defaults (soft
  sorting, the ``d`` axis slices), when the module exists; otherwise an
  explicit "not available" entry is recorded;

and a second run times forward + backward of the trainable ones (softmax,
Sinkhorn with ``grad_mode="unroll"``, ESP). Forward passes run under
``torch.no_grad()`` (inference cost). Per method the JSON holds the median and
IQR of the time, the peak memory, and the speed-ups over the ``K = 21``
teacher and over softmax, both from medians of the same run.

Before any timing, :func:`verify_methods` checks every fast path (output, and
gradients for the trainable ones) against its fp64 reference on a small input
and raises :class:`VerificationError` on any mismatch: a fast wrong operator is
not benchmarked.

Run ``python -m asap.bench.operators --help`` (or ``asap bench operators``).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from asap.argtypes import int_list, name_list, nonnegative_int, positive_int
from asap.attention.dual_map import DEFAULT_EXTRA_FEATURES
from asap.attention.functional import sinkhorn_attention, softmax_attention
from asap.attention.operators import AsapOperator
from asap.attention.reference import (
    asap_attention_reference,
    sinkhorn_attention_reference,
    softmax_attention_reference,
)
from asap.bench.measure import benchmark, speedups
from asap.env import load_average, machine_info
from asap.io import command_line, method_key, write_result
from asap.transport.masks import key_padding_to_attn_mask

SCHEMA = "asap.bench.operators/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FAMILIES = ("softmax", "sinkhorn", "asap", "esp")
CPU_LENGTHS = (128, 256, 512, 1024)
GPU_LENGTHS = (256, 512, 1024, 2048, 4096)

#: Verification tolerances per benchmark dtype: max |fast - fp64 reference| <= tol * max(1, max |reference|),
#: for outputs and (looser: gradients of unrolled iterations and soft sorts accumulate rounding) gradients.
VERIFY_TOLERANCE = {
    torch.float32: {"output": 1e-4, "grad": 1e-3},
    torch.float16: {"output": 2e-2, "grad": 5e-2},
    torch.bfloat16: {"output": 8e-2, "grad": 2e-1},
}

#: ``fn(q, k, v, padding)``: ``padding`` is the ``(b, n)`` token mask (True = real token) or ``None``.
AttentionFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]


class VerificationError(RuntimeError):
    """A fast path disagrees with its fp64 reference: its timings would be meaningless."""


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



@dataclass(frozen=True)
class BenchMethod:
    """One timed operator: its fast path, its fp64 oracle, and how to describe it."""

    name: str
    family: str
    label: str
    trainable: bool
    description: str
    forward: AttentionFn
    reference: AttentionFn
    reference_name: str

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "label": self.label, "trainable": self.trainable,
                "description": self.description, "reference": self.reference_name}


def teacher_name(iters: int) -> str:
    return method_key("sinkhorn", n_iters=iters)


def random_asap_operator(
    *, heads: int, head_dim: int, num_slices: int, eps: float, seed: int, device: torch.device,
    extra_features: tuple[str, ...] = (), backend: str = "auto",
) -> AsapOperator:  # fmt: skip
    """The full ASAP operator with random (unfitted) coefficients ``alpha ~ N(0, 1/(L + E))``: for timing only."""
    op = AsapOperator(num_heads=heads, head_dim=head_dim, eps=eps, num_slices=num_slices, slice_type="random",
                      seed=seed, extra_features=extra_features, backend=backend)  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 1)
    features = op.dual_map.num_features
    # deliberately "fitted" with random values: see the module docstring
    op.dual_map.set_coefficients(torch.randn(heads, features, generator=gen) / math.sqrt(features))
    return op.to(device)


def _mask(padding: Tensor | None) -> Tensor | None:
    return None if padding is None else key_padding_to_attn_mask(padding)


def padding_for(batch: int, n: int, fraction: float, *, device: torch.device | str = "cpu") -> Tensor | None:
    """The ``(b, n)`` token mask of :attr:`OperatorBenchConfig.padding` (``None`` for 0): lengths from n down."""
    if fraction == 0:
        return None
    steps = torch.arange(batch, dtype=torch.float64) / max(1, batch - 1)
    lengths = (n * (1 - 2 * fraction * steps)).round().clamp(min=1).long()
    return (torch.arange(n)[None, :] < lengths[:, None]).to(device)


def _esp_methods(config: OperatorBenchConfig) -> tuple[list[BenchMethod], str | None]:
    try:
        from asap.attention.esp import esp_attention, esp_attention_reference
    except ImportError as err:
        return [], f"ESP is not available in this checkout ({err})"
    method = BenchMethod(
        name="esp", family="esp", label="ESP", trainable=True,
        description=f"esp_attention defaults: soft sorting, the d={config.head_dim} coordinate axes as slices",
        forward=lambda q, k, v, p: esp_attention(q, k, v, attn_mask=_mask(p)),
        reference=lambda q, k, v, p: esp_attention_reference(q, k, v, attn_mask=_mask(p)),
        reference_name="asap.attention.esp.esp_attention_reference",
    )
    return [method], None


def build_methods(config: OperatorBenchConfig, device: torch.device) -> tuple[dict[str, BenchMethod], dict[str, str]]:
    """The methods of ``config`` and, for families that cannot run here, the reason (never a silent skip)."""
    methods: list[BenchMethod] = []
    unavailable: dict[str, str] = {}
    if "softmax" in config.methods:
        methods.append(BenchMethod(
            name="softmax", family="softmax", label="softmax", trainable=True,
            description="softmax_attention (scaled_dot_product_attention)",
            forward=lambda q, k, v, p: softmax_attention(q, k, v, padding_mask=p),
            reference=lambda q, k, v, p: softmax_attention_reference(q, k, v, attn_mask=_mask(p)),
            reference_name="asap.attention.reference.softmax_attention_reference",
        ))
    if "sinkhorn" in config.methods:
        for iters in config.sinkhorn_iters:
            teacher = " (reference teacher)" if iters == config.teacher_iters else ""
            methods.append(BenchMethod(
                name=teacher_name(iters), family="sinkhorn", label=f"Sinkhorn K={iters}", trainable=True,
                description=f"sinkhorn_attention, {iters} half-steps, eps={config.eps}, grad_mode='unroll'{teacher}",
                forward=lambda q, k, v, p, iters=iters: sinkhorn_attention(
                    q, k, v, n_iters=iters, eps=config.eps, padding_mask=p),
                reference=lambda q, k, v, p, iters=iters: sinkhorn_attention_reference(
                    q, k, v, n_iters=iters, eps=config.eps, attn_mask=_mask(p)),
                reference_name="asap.attention.reference.sinkhorn_attention_reference",
            ))
    if "asap" in config.methods:
        op = random_asap_operator(heads=config.heads, head_dim=config.head_dim, num_slices=config.num_slices,
                                  eps=config.eps, seed=config.seed, device=device,
                                  extra_features=config.extra_features)  # fmt: skip
        scale = config.head_dim**-0.5
        reference_map = copy.deepcopy(op.dual_map).cpu()  # the references run on the CPU in fp64

        def asap_reference(q: Tensor, k: Tensor, v: Tensor, p: Tensor | None) -> Tensor:
            # the design matrix (features @ coefficients), evaluated in q's dtype (fp64)
            phi = reference_map.features(q, k, scale=scale, attn_mask=_mask(p))
            f_hat = torch.einsum("bhln,hl->bhn", phi, reference_map.coefficients().to(phi.dtype))
            return asap_attention_reference(q, k, v, f_hat, eps=config.eps, attn_mask=_mask(p))

        extras = "+".join(config.extra_features) or "no extras"
        methods.append(BenchMethod(
            name=method_key("asap", num_slices=config.num_slices), family="asap", label=f"ASAP L={config.num_slices}", trainable=False,
            description=(f"AsapOperator: {config.num_slices} random slices and {extras}, linear map with RANDOM "
                         f"coefficients (timing only; the cost does not depend on their values), backend 'auto', "
                         f"eps={config.eps}"),
            forward=lambda q, k, v, p: op(q, k, v, padding_mask=p), reference=asap_reference,
            reference_name="SliceDualMap.features in fp64 + asap.attention.reference.asap_attention_reference",
        ))
    if "esp" in config.methods:
        esp, reason = _esp_methods(config)
        methods.extend(esp)
        if reason is not None:
            unavailable["esp"] = reason
    return {m.name: m for m in methods}, unavailable


def _max_error(fast: Tensor, ref: Tensor) -> float:
    """``max |fast - ref| / max(1, max |ref|)``: absolute for small values, relative for large ones."""
    ref = ref.detach().to(torch.float64)
    err = (fast.detach().to(torch.float64) - ref).abs().max()
    return float(err / ref.abs().max().clamp(min=1.0))


def verify_methods(
    methods: Mapping[str, BenchMethod], config: OperatorBenchConfig, device: torch.device
) -> list[dict[str, Any]]:
    """Compare each fast path (benchmark dtype, device) with its fp64 reference (CPU) on a small input.

    Checks the output of every method and, for trainable ones, the gradients
    of ``<out, w>`` (random ``w``) with respect to ``q``, ``k`` and ``v``.
    Raises :class:`VerificationError` listing every failure.
    """
    dtype = DTYPES[config.dtype]
    tol = VERIFY_TOLERANCE[dtype]
    gen = torch.Generator().manual_seed(config.seed + 2)
    batch = 1 if config.padding == 0 else 3
    shape = (batch, config.heads, config.verify_length, config.head_dim)
    base = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    padding = padding_for(batch, config.verify_length, config.padding)
    records, failures = [], []
    for method in methods.values():
        ref_inputs = [t.clone().requires_grad_(method.trainable) for t in base]
        fast_inputs = [t.to(device=device, dtype=dtype).requires_grad_(method.trainable) for t in base]
        with torch.set_grad_enabled(method.trainable):
            ref_out = method.reference(*ref_inputs, padding)
            fast_out = method.forward(*fast_inputs, None if padding is None else padding.to(device))
        if not torch.isfinite(fast_out).all():
            failures.append(f"{method.name}: non-finite output")
        errors = {"output": _max_error(fast_out.cpu(), ref_out)}
        if method.trainable:
            ref_grads = torch.autograd.grad((ref_out * weight).sum(), ref_inputs)
            fast_grads = torch.autograd.grad((fast_out * weight.to(device, dtype)).sum(), fast_inputs)
            for name, fast_g, ref_g in zip("qkv", fast_grads, ref_grads):
                errors[f"grad_{name}"] = _max_error(fast_g.cpu(), ref_g)
        for key, err in errors.items():
            limit = tol["output" if key == "output" else "grad"]
            if not err <= limit:  # also catches NaN
                failures.append(f"{method.name}: {key} error {err:.3g} > {limit:g} against {method.reference_name}")
        records.append({
            "method": method.name, "reference": method.reference_name, "errors": errors,
            "tolerance": {"output": tol["output"], "grad": tol["grad"] if method.trainable else None},
            "passed": all(errors[key] <= tol["output" if key == "output" else "grad"] for key in errors),
        })
    if failures:
        raise VerificationError("fast paths disagree with their fp64 references:\n  " + "\n  ".join(failures))
    return records


def _forward_call(method: BenchMethod, q: Tensor, k: Tensor, v: Tensor, padding: Tensor | None) -> Callable[[], Tensor]:
    def call() -> Tensor:
        with torch.no_grad():
            return method.forward(q, k, v, padding)

    return call


def _forward_backward_call(
    method: BenchMethod, q: Tensor, k: Tensor, v: Tensor, padding: Tensor | None, grad_out: Tensor
) -> Callable[[], None]:
    def call() -> None:
        for t in (q, k, v):
            t.grad = None  # a fresh gradient each call, not an accumulation
        method.forward(q, k, v, padding).backward(grad_out)

    return call


def _skip_reason(method: BenchMethod, n: int, mode: str, config: OperatorBenchConfig) -> str | None:
    limit = config.max_length.get(method.family)
    if limit is not None and n > limit:
        return f"n={n} > max_length[{method.family!r}]={limit} (--max-length)"
    if mode == "forward_backward" and config.backward_max_length is not None and n > config.backward_max_length:
        return f"n={n} > backward_max_length={config.backward_max_length} (--backward-max-length)"
    return None


def _bench_group(
    methods: Mapping[str, BenchMethod], n: int, mode: str, config: OperatorBenchConfig, device: torch.device,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """One interleaved run of every method at one shape and mode."""
    dtype = DTYPES[config.dtype]
    b, h, d = config.batch, config.heads, config.head_dim
    gen = torch.Generator(device=device).manual_seed(config.seed + n)
    q, k, v = (torch.randn(b, h, n, d, generator=gen, device=device, dtype=dtype) for _ in range(3))
    padding = padding_for(b, n, config.padding, device=device)
    selected = [m for m in methods.values() if mode == "forward" or m.trainable]
    skipped = {m.name: reason for m in selected if (reason := _skip_reason(m, n, mode, config)) is not None}
    timed = [m for m in selected if m.name not in skipped]
    if mode == "forward":
        fns = {m.name: _forward_call(m, q, k, v, padding) for m in timed}
    else:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        grad_out = torch.randn(b, h, n, d, generator=gen, device=device, dtype=dtype)
        fns = {m.name: _forward_backward_call(m, q, k, v, padding, grad_out) for m in timed}
    load_before = load_average()
    run = benchmark(fns, device=device, warmup=config.warmup, repeats=config.repeats,
                    min_repeats=config.min_repeats, budget_s=config.budget_s, measure_memory=config.measure_memory)
    vs_teacher = speedups(run, reference=teacher_name(config.teacher_iters))
    vs_softmax = speedups(run, reference="softmax")
    results = {}
    for name, result in run.results.items():
        results[name] = {**result.to_dict(), "speedup_vs_teacher": vs_teacher[name],
                         "speedup_vs_softmax": vs_softmax[name]}
    group = {
        "mode": mode, "b": b, "h": h, "n": n, "m": n, "d": d, "dtype": config.dtype, "rounds": run.rounds,
        "padded_fraction": 0.0 if padding is None else round(1 - padding.float().mean().item(), 4),
        "dense_fp32_bytes": b * h * n * n * 4, "load_average_before": load_before,
        "load_average_after": load_average(), "methods": results, "skipped": skipped,
    }
    log(_summary_line(group))
    return group


def _summary_line(group: Mapping[str, Any]) -> str:
    parts = []
    for name, res in group["methods"].items():
        if res["oom"]:
            parts.append(f"{name}=OOM")
        elif res.get("median_s") is not None:
            parts.append(f"{name}={res['median_s'] * 1e3:.1f}ms(x{res['repeats']})")
    return f"[{group['mode']} n={group['n']}] " + " ".join(parts)


def run_operator_bench(
    config: OperatorBenchConfig, *, command: str | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Verify every method, then time it over the grid; returns the JSON-ready result."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("operator bench: --device cuda requested but CUDA is not available")
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, device, command=command, log=log)
    finally:
        torch.set_num_threads(threads_before)


def _run(config: OperatorBenchConfig, device: torch.device, *, command: str | None, log: Callable[[str], None]):
    methods, unavailable = build_methods(config, device)
    for family, reason in unavailable.items():
        log(f"not available: {family}: {reason}")
    machine = machine_info(device)
    started = time.perf_counter()
    verification = verify_methods(methods, config, device)
    log(f"verification passed for {', '.join(methods)}")
    groups = []
    for n in config.lengths:
        groups.append(_bench_group(methods, n, "forward", config, device, log))
        if config.backward:
            groups.append(_bench_group(methods, n, "forward_backward", config, device, log))
    return {
        "schema": SCHEMA,
        "command": command,
        "config": config.to_dict(),
        "teacher": teacher_name(config.teacher_iters),
        "machine": machine,
        "machine_after": {"load_average": load_average()},
        "duration_s": round(time.perf_counter() - started, 1),
        "methods": {name: m.describe() for name, m in methods.items()},
        "unavailable": unavailable,
        "verification": verification,
        "groups": groups,
    }


# ---------------------------------------------------------------------------------------------- command line


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
    parser.add_argument("--batch", type=positive_int, help="b (default 8)")
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
        "--device", config.device, "--dtype", config.dtype, "--batch", str(config.batch), "--heads", str(config.heads),
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


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed options and write its JSON (and ``command.txt``)."""
    config = config_from_args(args)
    out = args.out or Path("results") / "bench" / f"operators_{torch.device(config.device).type}.json"
    result = run_operator_bench(config, command=command_for(config, out))
    print(f"wrote {write_result(out, result, command=result['command'], indent=1)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asap.bench.operators", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
