"""Whole-model timing of a teacher and its variants, interleaved per batch, with paired ratios.

A shared machine is noisy: a burst of another process that lands on one model
changes a ratio of medians taken from separate loops. Here every round runs
every batch through every model in turn (the model order rotates from round
to round), so neighbouring calls of different models see the same load, and
the reported speed-up is the median of the per-round ratios (a paired
statistic) with its interquartile range. Two times per forward: the whole
model, and the attention operators alone (the time between a forward pre-hook
and a forward hook on each operator, summed over layers). On a GPU the device
is synchronised around each forward and each operator call. The thread count
and the load average before and after are recorded with the figures.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from asap.attention.operators import AttentionOperator
from asap.bench.compare import attention_operators
from asap.compile.calibrate import model_inputs
from asap.env import load_average


class OperatorTimer:
    """Accumulates the wall time spent inside the attention operators of a model (hooks; ``remove()`` them).

    ``sync`` (``torch.cuda.synchronize`` for a model on a GPU) runs before each clock
    reading: CUDA calls return before their kernels finish, so without it the time
    would be the launches'. Each synchronisation costs a few microseconds per layer,
    paid by every model timed this way.
    """

    def __init__(self, model: nn.Module, *, sync: Callable[[], None] | None = None):
        self.total = 0.0
        self._start = 0.0
        self._sync = sync
        self._handles = []
        for op in attention_operators(model):
            self._handles.append(op.register_forward_pre_hook(self._enter))
            self._handles.append(op.register_forward_hook(self._exit))

    def _enter(self, module, args):
        if self._sync is not None:
            self._sync()
        self._start = time.perf_counter()

    def _exit(self, module, args, output):
        if self._sync is not None:
            self._sync()
        self.total += time.perf_counter() - self._start

    def remove(self):
        for handle in self._handles:
            handle.remove()


def _device_sync(device: torch.device) -> Callable[[], None]:
    """What waits for ``device``'s queued work before a clock reading (a no-op on the CPU, whose calls are synchronous)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


@torch.no_grad()
def time_models(
    models: Mapping[str, nn.Module],
    batches: Sequence[Any],
    *,
    rounds: int = 30,
    warmup: int = 1,
    reference: str | None = None,
    progress: Callable[[Iterable, int], Iterable] | None = None,
) -> dict[str, Any]:
    """Interleaved timing of ``models`` on ``batches``; speed-ups relative to ``reference`` (default: the first).

    Returns ``{"models": {name: {...}}, "rounds", "threads", "load_average_before", "load_average_after"}``
    where each model has ``model_ms`` / ``attention_ms`` (median ms per batch over
    rounds) with ``*_iqr_ms``, and ``model_speedup`` / ``attention_speedup`` (median of
    the per-round ratios reference / model) with ``*_speedup_iqr``.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"time_models: rounds must be >= 1 and warmup >= 0, got {rounds}, {warmup}")
    names = list(models)
    reference = names[0] if reference is None else reference
    if reference not in models:
        raise ValueError(f"time_models: reference {reference!r} is not one of {names}")
    inputs, syncs = {}, {}
    for name, model in models.items():
        model.eval()
        device = next(model.parameters()).device
        inputs[name] = [model_inputs(model, batch, device) for batch in batches]
        syncs[name] = _device_sync(device)
    timers = {name: OperatorTimer(model, sync=syncs[name]) for name, model in models.items()}
    per_round = {name: {"model": [], "attention": []} for name in names}
    load_before = load_average()
    try:
        steps: Iterable[int] = range(warmup + rounds)
        if progress is not None:
            steps = progress(steps, warmup + rounds)
        for index in steps:
            totals = {name: [0.0, 0.0] for name in names}
            for b in range(len(batches)):
                shift = (index + b) % len(names)  # rotate who goes first
                for name in names[shift:] + names[:shift]:
                    timer = timers[name]
                    timer.total = 0.0
                    args, kwargs = inputs[name][b]
                    syncs[name]()
                    start = time.perf_counter()
                    models[name](*args, **kwargs)
                    syncs[name]()
                    totals[name][0] += time.perf_counter() - start
                    totals[name][1] += timer.total
            if index >= warmup:
                for name in names:
                    per_round[name]["model"].append(1e3 * totals[name][0] / len(batches))
                    per_round[name]["attention"].append(1e3 * totals[name][1] / len(batches))
    finally:
        for timer in timers.values():
            timer.remove()
    out: dict[str, Any] = {}
    for name in names:
        row: dict[str, float] = {}
        for kind in ("model", "attention"):
            samples = per_round[name][kind]
            q1, med, q3 = _quartiles(samples)
            row[f"{kind}_ms"], row[f"{kind}_iqr_ms"] = med, q3 - q1
            ratios = [r / s for r, s in zip(per_round[reference][kind], samples) if s > 0]
            q1, med, q3 = _quartiles(ratios) if ratios else (float("nan"),) * 3
            row[f"{kind}_speedup"], row[f"{kind}_speedup_iqr"] = med, q3 - q1
        out[name] = row
    return {
        "models": out, "reference": reference, "rounds": rounds, "batches": len(batches),
        "threads": torch.get_num_threads(), "load_average_before": load_before, "load_average_after": load_average(),
    }  # fmt: skip


@torch.no_grad()
def time_operator_scaling(
    operators: Mapping[str, AttentionOperator],
    *,
    num_heads: int,
    head_dim: int,
    lengths: Sequence[int],
    batch_size: int = 8,
    rounds: int = 15,
    seed: int = 0,
    reference: str | None = None,
) -> list[dict[str, float]]:
    """Median ms of one call of each operator on random ``(batch, h, n, d)`` inputs per ``n``, interleaved.

    The time of these operators does not depend on the values, so random
    inputs of the trained layer's shape measure how the costs grow with the
    sequence length (``K`` passes over ``n x n`` for Sinkhorn; the dual map's
    sorts plus about two passes for ASAP). Each row also holds
    ``{name}_speedup``: the median per-round ratio ``reference / name``.
    """
    gen = torch.Generator().manual_seed(seed)
    names = list(operators)
    reference = names[0] if reference is None else reference
    rows = []
    for n in lengths:
        q, k, v = (torch.randn(batch_size, num_heads, n, head_dim, generator=gen) for _ in range(3))
        samples: dict[str, list[float]] = {name: [] for name in names}
        for index in range(rounds + 1):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                operators[name](q, k, v)
                if index > 0:  # round 0 is the warm-up
                    samples[name].append(1e3 * (time.perf_counter() - start))
        row: dict[str, float] = {"n": n}
        for name in names:
            row[name] = statistics.median(samples[name])
            row[f"{name}_speedup"] = statistics.median(r / s for r, s in zip(samples[reference], samples[name]))
        rows.append(row)
    return rows
