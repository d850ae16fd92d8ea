"""Measurement utilities: peak memory on known allocations, robust statistics, interleaving, OOM as a result."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from asap.bench.measure import (
    BenchmarkRun,
    MethodResult,
    Timing,
    benchmark,
    choose_repeats,
    is_out_of_memory,
    peak_memory,
    speedups,
)

MIB = 2**20


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_cpu_peak_of_one_allocation_is_its_size():
    shape = (256, 1024)  # 1 MiB of fp32
    reading = peak_memory(lambda: torch.empty(shape, dtype=torch.float32), device="cpu")
    assert not reading.oom
    assert reading.peak_bytes == nbytes(torch.empty(shape, dtype=torch.float32))


def test_cpu_peak_integrates_frees_and_counts_only_live_tensors():
    def free_then_allocate():
        a = torch.ones(MIB // 4)  # 1 MiB, freed before the next allocation
        del a
        b = torch.ones(2 * MIB // 4)  # 2 MiB
        return b

    def hold_both():
        a = torch.ones(MIB // 4)
        b = torch.ones(2 * MIB // 4)
        return a, b

    assert peak_memory(free_then_allocate, device="cpu").peak_bytes == 2 * MIB
    assert peak_memory(hold_both, device="cpu").peak_bytes == 3 * MIB


def test_cpu_peak_ignores_tensors_alive_before_the_call():
    existing = [torch.ones(4 * MIB // 4)]  # 4 MiB allocated before the call, freed inside it

    def free_existing_then_allocate():
        existing.pop()
        return torch.ones(MIB // 4)

    assert peak_memory(free_existing_then_allocate, device="cpu").peak_bytes == MIB


def test_cpu_peak_sees_intermediates_of_an_operator():
    x = torch.randn(64, 128)
    # x @ x.T materialises a (64, 64) result, then .sum() a scalar: the peak is at least the matrix.
    reading = peak_memory(lambda: (x @ x.T).sum(), device="cpu")
    assert reading.peak_bytes >= 64 * 64 * 4


def test_out_of_memory_is_a_result_and_other_errors_propagate():
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    reading = peak_memory(oom, device="cpu")
    assert reading.oom and reading.peak_bytes is None and "out of memory" in reading.error
    with pytest.raises(ValueError, match="a bug"):
        peak_memory(lambda: (_ for _ in ()).throw(ValueError("a bug")), device="cpu")


def test_is_out_of_memory_recognises_cpu_allocator_failures():
    cpu_failure = "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried 1 TB"
    assert is_out_of_memory(RuntimeError(cpu_failure))
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("samples", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], [0.1, 0.7, 0.2, 0.9, 0.4, 0.3]])
def test_timing_statistics_match_numpy(samples):
    timing = Timing.from_samples(samples)
    assert timing.median_s == pytest.approx(np.median(samples))
    assert timing.q1_s == pytest.approx(np.percentile(samples, 25))
    assert timing.q3_s == pytest.approx(np.percentile(samples, 75))
    assert timing.iqr_s == pytest.approx(np.percentile(samples, 75) - np.percentile(samples, 25))
    assert timing.repeats == len(samples)


def test_choose_repeats_fits_the_budget_within_bounds():
    assert choose_repeats(2.0, budget_s=10.0, min_repeats=1, max_repeats=7) == 5
    assert choose_repeats(20.0, budget_s=10.0, min_repeats=2, max_repeats=7) == 2
    assert choose_repeats(0.001, budget_s=10.0, min_repeats=1, max_repeats=7) == 7
    assert choose_repeats(5.0, budget_s=None, min_repeats=1, max_repeats=4) == 4
    with pytest.raises(ValueError, match="min_repeats"):
        choose_repeats(1.0, budget_s=1.0, min_repeats=3, max_repeats=2)


def test_benchmark_interleaves_methods_round_robin():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    run = benchmark(fns, device="cpu", warmup=1, repeats=3, budget_s=None, measure_memory=False)
    assert calls == ["a", "b", "c"] * 4  # one warm-up round, then three timed rounds
    assert run.rounds == 3
    assert all(run.results[name].timing.repeats == 3 for name in fns)


def test_benchmark_gives_slow_methods_fewer_calls_within_the_budget():
    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        time.sleep(0.05)

    run = benchmark({"fast": fast, "slow": slow}, device="cpu", warmup=1, repeats=6, min_repeats=1, budget_s=0.12,
                    measure_memory=False)
    assert run.results["fast"].timing.repeats == 6 and calls["fast"] == 7
    assert 1 <= run.results["slow"].timing.repeats <= 2 and calls["slow"] == 1 + run.results["slow"].timing.repeats
    assert run.rounds == 6


def test_benchmark_first_untimed_call_measures_memory():
    fns = {"alloc": lambda: torch.empty(MIB // 4), "nothing": lambda: None}
    run = benchmark(fns, device="cpu", warmup=1, repeats=1, budget_s=None, measure_memory=True)
    assert run.results["alloc"].peak_bytes == MIB
    assert run.results["nothing"].peak_bytes == 0


def test_benchmark_records_oom_and_keeps_the_other_methods():
    calls = []

    def fails_on_second_call():
        calls.append("oom")
        if len(calls) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")

    fns = {"ok": lambda: None, "big": fails_on_second_call}
    run = benchmark(fns, device="cpu", warmup=2, repeats=3, budget_s=None, measure_memory=False)
    assert run.results["big"].oom and run.results["big"].timing is None
    assert "out of memory" in run.results["big"].error
    assert not run.results["ok"].oom and run.results["ok"].timing.repeats == 3
    assert len(calls) == 2  # dropped after the failure, not retried every round
    json.dumps(run.results["big"].to_dict())


def test_speedups_are_ratios_of_medians_of_the_same_run():
    def result(samples):
        return MethodResult(timing=Timing.from_samples(samples))

    run = BenchmarkRun(results={
        "teacher": result([4.0, 8.0, 6.0]),  # median 6
        "fast": result([1.0, 2.0, 1.5]),  # median 1.5
        "failed": MethodResult(oom=True),
    })
    ratios = speedups(run, reference="teacher")
    assert ratios["teacher"] == 1.0
    assert ratios["fast"] == pytest.approx(4.0)
    assert ratios["failed"] is None
    assert all(value is None for value in speedups(run, reference="absent").values())


def test_operator_timer_passes_token_padding_as_a_padding_mask():
    """time_operators_ms calls operators as the models do: a self-attention padding mask as padding_mask where the
    operator takes one, any other mask (and operators without padding support) as attn_mask."""
    from torch import nn

    from asap.bench.measure import time_operators_ms
    from asap.transport.masks import key_padding_to_attn_mask

    class Spy(nn.Module):
        def __init__(self, takes: bool):
            super().__init__()
            self.takes_padding_mask, self.seen = takes, []

        def forward(self, q, k, v, *, attn_mask=None, padding_mask=None):
            self.seen.append("padding" if padding_mask is not None else "attn" if attn_mask is not None else "none")
            return v

    q = torch.randn(2, 1, 5, 4)
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    padded = key_padding_to_attn_mask(valid) & valid[:, None, :, None]
    ops = {"takes": Spy(True), "not": Spy(False)}
    time_operators_ms(ops, (q, q, padded), repeats=1)
    assert set(ops["takes"].seen) == {"padding"} and set(ops["not"].seen) == {"attn"}
    causal = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 1, 5, 5)  # not token padding
    ops = {"takes": Spy(True)}
    time_operators_ms(ops, (q, q, causal), repeats=1)
    assert set(ops["takes"].seen) == {"attn"}
