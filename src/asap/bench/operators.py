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

# This docstring is the help text of ``asap bench operators``. This module is the run loop (run_operator_bench) and
# the entry point; the settings and the command line are in asap.bench.operator_config, the method table and the
# verification in asap.bench.operator_methods (their public names are re-exported here, where callers import them).

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from asap.bench.measure import benchmark, speedups
from asap.bench.operator_config import (
    CPU_LENGTHS,
    DTYPES,
    FAMILIES,
    GPU_LENGTHS,
    SCHEMA,
    OperatorBenchConfig,
    add_arguments,
    command_for,
    config_from_args,
)
from asap.bench.operator_methods import (
    VERIFY_TOLERANCE,
    BenchMethod,
    VerificationError,
    build_methods,
    padding_for,
    random_asap_operator,
    teacher_name,
    verify_methods,
)
from asap.env import load_average, machine_info
from asap.io import write_result

__all__ = [
    "CPU_LENGTHS", "DTYPES", "FAMILIES", "GPU_LENGTHS", "SCHEMA", "VERIFY_TOLERANCE", "BenchMethod",
    "OperatorBenchConfig", "VerificationError", "add_arguments", "build_methods", "command_for", "config_from_args",
    "main", "padding_for", "random_asap_operator", "run_from_args", "run_operator_bench", "teacher_name",
    "verify_methods",
]


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
