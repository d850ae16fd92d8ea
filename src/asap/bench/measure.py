"""Timing and peak-memory measurement for operator benchmarks.

Three rules keep the comparisons honest on a noisy, shared machine:

* **Interleaving.** :func:`benchmark` times its methods round-robin (one call
  of each method per round, for every round), so a burst of load from another
  process slows every method alike instead of whichever happened to run then.
  Ratios between methods are therefore only taken between medians measured in
  the same :func:`benchmark` call (:func:`speedups`). A per-method time budget
  gives slow methods fewer calls; a method leaves the rotation once it has its
  calls.
* **Robust statistics.** Each method reports the median and the interquartile
  range (IQR) of its samples, never the mean.
* **Synchronisation.** On CUDA every timed call is bracketed by CUDA events
  and synchronised, so the time is the kernels' and not the launch's.

Peak memory (:func:`peak_memory`) is the largest number of bytes of tensors
alive *during* a call beyond those alive when it started:

* **CUDA**: ``torch.cuda.max_memory_allocated`` after
  ``torch.cuda.reset_peak_memory_stats``, minus the bytes allocated before the
  call (the caching allocator's *reserved* memory is not counted).
* **CPU**: the call runs under ``torch.profiler`` with ``profile_memory=True``,
  which records one event per tensor allocation (+bytes) and free (-bytes) of
  the CPU allocator. Sorting them by time and taking the maximum of their
  running sum gives the peak of live tensor bytes. It counts every tensor
  PyTorch allocates (outputs, intermediates, autograd buffers) but not the
  scratch space that some kernels (oneDNN, BLAS) take directly from the system,
  nor Python objects; the profiler slows the call, so a memory call is never a
  timed call.

Running out of memory is a result, not a crash: a method that raises an
out-of-memory error is recorded with ``oom=True`` and dropped from the
remaining rounds, and the others go on.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asap.env import load_average, machine_info
from asap.io import atomic_write_json, command_line

# Messages of the CPU allocator when malloc fails (c10/core/impl/alloc_cpu.cpp); CUDA raises torch.OutOfMemoryError.
_CPU_OOM_MESSAGES = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


@dataclass(frozen=True)
class Timing:
    """Summary of one method's timed calls (seconds).

    ``q1_s`` and ``q3_s`` are the 25th and 75th percentiles (linear
    interpolation between order statistics, as ``numpy.percentile``), so
    ``iqr_s = q3_s - q1_s``; with a single sample all three equal it.
    """

    median_s: float
    q1_s: float
    q3_s: float
    iqr_s: float
    repeats: int
    samples_s: tuple[float, ...]

    @classmethod
    def from_samples(cls, samples: list[float]) -> Timing:
        if not samples:
            raise ValueError("Timing.from_samples: need at least one sample")
        q1, q3 = _percentile(samples, 25.0), _percentile(samples, 75.0)
        return cls(
            median_s=statistics.median(samples), q1_s=q1, q3_s=q3, iqr_s=q3 - q1, repeats=len(samples),
            samples_s=tuple(samples),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median_s, "q1_s": self.q1_s, "q3_s": self.q3_s, "iqr_s": self.iqr_s,
            "repeats": self.repeats, "samples_s": list(self.samples_s),
        }


def _percentile(samples: list[float], pct: float) -> float:
    """``numpy.percentile(samples, pct)`` (linear method) without numpy."""
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * pct / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class MemoryReading:
    """Peak bytes of tensors alive during one call beyond those alive at its start (``None`` after an OOM)."""

    peak_bytes: int | None
    oom: bool = False
    error: str | None = None


@dataclass
class MethodResult:
    """What :func:`benchmark` measured for one method: timing, memory, or the out-of-memory error that stopped it."""

    timing: Timing | None = None
    peak_bytes: int | None = None
    oom: bool = False
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"oom": self.oom, "peak_bytes": self.peak_bytes}
        if self.timing is not None:
            out.update(self.timing.to_dict())
        if self.error is not None:
            out["error"] = self.error
        return out


def is_out_of_memory(err: BaseException) -> bool:
    """True for CUDA out-of-memory errors and for failed CPU allocations."""
    if isinstance(err, torch.cuda.OutOfMemoryError):  # alias of torch.OutOfMemoryError (2.5+); exists in older torch
        return True
    return isinstance(err, RuntimeError) and any(msg in str(err) for msg in _CPU_OOM_MESSAGES)


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on CPU, where calls are synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], *, device: torch.device) -> float:
    """Seconds taken by one call of ``fn``: CUDA events on GPU, ``time.perf_counter`` on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak live tensor bytes allocated by ``fn`` on the CPU, from the profiler's alloc/free events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each "[memory]" event is one allocation (+nbytes) or free (-nbytes); torch's own
    # profiler parser (torch.autograd.profiler._parse_kineto_results) reads the same records.
    events = [
        (ev.start_ns(), ev.nbytes())
        for ev in prof.profiler.kineto_results.events()
        if ev.name() == "[memory]" and ev.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda item: item[0])  # stable: simultaneous events keep their recorded order
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline


def peak_memory(fn: Callable[[], Any], *, device: torch.device | str) -> MemoryReading:
    """Peak bytes of tensors alive during one call of ``fn`` beyond those alive before it.

    The value returned by ``fn`` is released after the call but counted in the
    peak (it was alive when the call returned). An out-of-memory error gives
    ``MemoryReading(None, oom=True, error=...)``; any other error propagates.
    """
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return MemoryReading(_cuda_peak_bytes(fn, device))
        if device.type == "cpu":
            return MemoryReading(_cpu_peak_bytes(fn))
        raise ValueError(f"peak_memory: unsupported device type {device.type!r} (cpu or cuda)")
    except Exception as err:  # noqa: BLE001 - only out-of-memory is a result; everything else is re-raised
        if not is_out_of_memory(err):
            raise
        _release_memory(device)
        return MemoryReading(None, oom=True, error=_first_line(err))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def choose_repeats(call_s: float, *, budget_s: float | None, min_repeats: int, max_repeats: int) -> int:
    """Timed calls that fit in ``budget_s`` given one call's duration, clamped to ``[min_repeats, max_repeats]``.

    This is how slow methods and big shapes get fewer repeats than fast ones
    without a hand-written schedule (as ``timeit``'s autorange, but capped).
    """
    if not 1 <= min_repeats <= max_repeats:
        raise ValueError(f"choose_repeats: need 1 <= min_repeats <= max_repeats, got {min_repeats}, {max_repeats}")
    if budget_s is None or call_s <= 0:
        return max_repeats
    return int(min(max_repeats, max(min_repeats, budget_s // call_s)))


@dataclass
class BenchmarkRun:
    """Results of one interleaved run: per-method results and the number of timed rounds."""

    results: dict[str, MethodResult] = field(default_factory=dict)
    rounds: int = 0


def benchmark(
    fns: Mapping[str, Callable[[], Any]],
    *,
    device: torch.device | str,
    warmup: int = 1,
    repeats: int = 5,
    min_repeats: int = 1,
    budget_s: float | None = None,
    measure_memory: bool = True,
) -> BenchmarkRun:
    """Time several zero-argument callables interleaved round-robin, and measure their peak memory.

    Args:
        fns: method name -> callable doing one complete call (e.g. forward, or
            forward + backward); its return value is discarded.
        device: where the work runs (decides CUDA events vs wall clock and the
            memory probe).
        warmup: untimed calls per method before timing (first-call costs:
            lazy initialisation, allocator growth, kernel selection). When
            ``measure_memory`` is set, the first untimed call runs under the
            memory probe, so at least one untimed call is always made.
        repeats: the most timed calls per method. min_repeats: the fewest.
        budget_s: wall-clock budget of one method's timed calls: each method
            gets as many calls as fit, judged from its last warm-up call (see
            :func:`choose_repeats`); ``None``: ``repeats`` calls each. Rounds
            stay round-robin; a method leaves the rotation once it has its calls.
        measure_memory: measure each method's peak memory (one extra-cost call).

    Returns:
        A :class:`BenchmarkRun`; a method that ran out of memory has
        ``oom=True`` and no timing; the others are unaffected.
    """
    device = torch.device(device)
    if warmup < 0:
        raise ValueError(f"benchmark: warmup must be >= 0, got {warmup}")
    run = BenchmarkRun(results={name: MethodResult() for name in fns})
    active = list(fns)

    def call(name: str) -> float | None:
        """One timed call; ``None`` (and the method dropped) on out-of-memory."""
        try:
            return time_call(fns[name], device=device)
        except Exception as err:  # noqa: BLE001 - only out-of-memory is a result
            if not is_out_of_memory(err):
                raise
            run.results[name].oom, run.results[name].error = True, _first_line(err)
            active.remove(name)
            _release_memory(device)
            return None

    if measure_memory and device.type == "cpu":
        _cpu_peak_bytes(lambda: None)  # the profiler's first session initialises it (slow): keep that out of the calls
    warm_rounds = max(warmup, 1 if measure_memory else 0)
    last_warm_s = {name: 0.0 for name in fns}
    for index in range(warm_rounds):
        for name in list(active):
            if index == 0 and measure_memory:
                begin = time.perf_counter()
                reading = peak_memory(fns[name], device=device)
                last_warm_s[name] = time.perf_counter() - begin
                run.results[name].peak_bytes = reading.peak_bytes
                if reading.oom:
                    run.results[name].oom, run.results[name].error = True, reading.error
                    active.remove(name)
            else:
                last_warm_s[name] = call(name) or 0.0

    wanted = {
        name: choose_repeats(last_warm_s[name], budget_s=budget_s, min_repeats=min_repeats, max_repeats=repeats)
        for name in fns
    }
    samples: dict[str, list[float]] = {name: [] for name in fns}
    rounds = max((wanted[name] for name in active), default=0)
    for index in range(rounds):
        for name in [n for n in active if index < wanted[n]]:
            elapsed = call(name)
            if elapsed is not None:
                samples[name].append(elapsed)
    for name in active:
        run.results[name].timing = Timing.from_samples(samples[name]) if samples[name] else None
    run.rounds = rounds
    return run


def speedups(run: BenchmarkRun, *, reference: str) -> dict[str, float | None]:
    """``median(reference) / median(method)`` for every method of one run (>1: faster than the reference).

    ``None`` where either median is missing (out of memory, or the reference
    was not part of the run).
    """
    ref = run.results.get(reference)
    ref_s = ref.timing.median_s if ref is not None and ref.timing is not None else None
    out: dict[str, float | None] = {}
    for name, result in run.results.items():
        ok = ref_s is not None and result.timing is not None and result.timing.median_s > 0
        out[name] = ref_s / result.timing.median_s if ok else None
    return out


def time_operators_ms(operators: Mapping[str, nn.Module], inputs: tuple, *, repeats: int = 5) -> dict[str, float]:
    """Median milliseconds of one call ``op(q, k, k, attn_mask=mask)`` of each operator, interleaved round-robin.

    ``inputs = (q, k, attn_mask)`` (the values are the keys: same shape, and the time does not depend on them).
    A mask that is self-attention token padding (``valid_i and valid_j``) is passed as ``padding_mask (b, n)``
    to the operators that take it, as the models call them (the general-mask path of an operator can be
    several times slower). One warm-up round, then ``repeats`` timed rounds (:func:`benchmark`, no memory
    probe), so that the load of a shared machine affects every operator alike. The timer
    :func:`asap.compile.compile_model` takes.
    """
    q, k, mask = inputs
    device = q.device
    padding = None
    if mask is not None and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[-1] == mask.shape[-2] == q.shape[-2]:
        valid = mask.any(dim=-1)[:, 0]  # (b, n): rows with a key
        if torch.equal(mask, (valid[:, None, :, None] & valid[:, None, None, :]).expand_as(mask)):
            padding = valid

    def call(op: nn.Module) -> Callable[[], Any]:
        if padding is not None and getattr(op, "takes_padding_mask", False):
            return lambda: op(q, k, k, padding_mask=padding)
        return lambda: op(q, k, k, attn_mask=mask)

    with torch.no_grad():
        run = benchmark({name: call(op) for name, op in operators.items()}, device=device, warmup=1, repeats=repeats,
                        min_repeats=repeats, measure_memory=False)  # fmt: skip
    return {name: 1e3 * result.timing.median_s for name, result in run.results.items()}



def write_script_result(out: Path, *, schema: str, script: str, argv: Sequence[str],
                        load_before: list[float] | None, **fields: Any) -> None:  # fmt: skip
    """The JSON of a benchmark script under ``scripts/`` (``script`` its path): ``schema``, its command line,
    the CPU machine record, the load average before (``load_before``, read before timing) and now, then
    ``fields``; the folder of ``out`` is created, the file written atomically."""
    doc = {"schema": schema, "command": command_line(f"python {script}", argv), "machine": machine_info("cpu"),
           "load_average_before": load_before, "load_average_after": load_average(), **fields}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, doc)
