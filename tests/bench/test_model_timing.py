"""Interleaved whole-model timing: structure, paired ratios and the attention-only share (never a timed pass/fail)."""

from __future__ import annotations

import pytest

from asap.attention.operators import AsapOperator, SinkhornOperator
from asap.bench.compare import attention_operators
from asap.bench.model_timing import OperatorTimer, time_models, time_operator_scaling
from asap.compile import compile_model, truncate_sinkhorn
from tests.compile.conftest import batches, teacher  # noqa: F401 (the fixtures)


def test_time_models_reports_medians_paired_ratios_and_the_machine_state(teacher, batches):
    compiled, _ = compile_model(teacher, batches, num_slices=3)
    models = {"teacher": teacher, "k3": truncate_sinkhorn(teacher, n_iters=3), "asap": compiled}
    speed = time_models(models, batches[:2], rounds=3)
    assert set(speed["models"]) == set(models) and speed["reference"] == "teacher"
    assert speed["rounds"] == 3 and speed["batches"] == 2 and speed["threads"] >= 1
    for row in speed["models"].values():
        assert 0 < row["attention_ms"] < row["model_ms"]
        assert row["model_speedup"] > 0 and row["model_speedup_iqr"] >= 0
    assert speed["models"]["teacher"]["model_speedup"] == 1.0  # the reference against itself, round by round
    with pytest.raises(ValueError, match="reference"):
        time_models(models, batches[:1], rounds=1, reference="nope")


def test_a_gpu_timer_waits_for_the_device_around_each_operator(teacher, batches):
    """CUDA calls return before their kernels end: the GPU timer synchronises before each clock reading."""
    waits = []
    timer = OperatorTimer(teacher, sync=lambda: waits.append(timer.total))
    try:
        teacher.eval()(batches[0]["input_ids"], padding_mask=batches[0]["padding_mask"])
    finally:
        timer.remove()
    assert len(waits) == 2 * len(attention_operators(teacher)) and timer.total > 0


def test_time_operator_scaling_rows():
    ops = {"teacher": SinkhornOperator(n_iters=5), "asap": AsapOperator(num_heads=2, head_dim=4, num_slices=2)}
    ops["asap"].dual_map.fitted.fill_(True)
    rows = time_operator_scaling(ops, num_heads=2, head_dim=4, lengths=[4, 8], batch_size=2, rounds=2)
    assert [row["n"] for row in rows] == [4, 8]
    assert all(row["asap"] > 0 and row["asap_speedup"] > 0 and row["teacher_speedup"] == 1.0 for row in rows)
