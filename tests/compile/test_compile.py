"""The compile pipeline on small Sinkhorn models: calibration modes, layer subsets, refinement, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from asap.attention.module import MultiheadAttention
from asap.attention.operators import AsapOperator, SinkhornOperator
from asap.compile import compile_model, sinkhorn_layers, truncate_sinkhorn
from asap.compile.calibrate import LayerCalibration, collect, num_held_out
from asap.compile.fit import kl_problems, mean_kl, refine_kl, solve_ridge
from asap.compile.maps import num_features, set_coefficients
from asap.models import TextClassifier

from .conftest import make_batches, tiny_text_config


def _operators(model):
    return [type(m) for m in model.modules() if isinstance(m, (SinkhornOperator, AsapOperator))]


def _logits(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], padding_mask=batch["padding_mask"])


def test_teacher_and_sequential_modes(teacher, batches):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    from asap.bench.measure import time_operators_ms  # the benchmarks' timer: compile times nothing itself

    teacher_mode, report_t = compile_model(teacher, batches, num_slices=6, mode="teacher", timer=time_operators_ms)
    sequential, report_s = compile_model(teacher, batches, num_slices=6, mode="sequential", timer=time_operators_ms)
    # The teacher is left untouched; the copies run ASAP in every layer and keep all teacher weights.
    assert _operators(teacher) == [SinkhornOperator] * 2
    assert _operators(teacher_mode) == _operators(sequential) == [AsapOperator] * 2
    for key, value in before.items():
        torch.testing.assert_close(teacher.state_dict()[key], value)
        torch.testing.assert_close(teacher_mode.state_dict()[key], value)
    # Layer 0 sees the same inputs in both modes, so its fit is identical; layer 1 sees different inputs.
    coef = lambda m: [op.dual_map.coef for op in m.modules() if isinstance(op, AsapOperator)]  # noqa: E731
    torch.testing.assert_close(coef(teacher_mode)[0], coef(sequential)[0])
    assert not torch.allclose(coef(teacher_mode)[1], coef(sequential)[1])
    for report in (report_t, report_s):
        assert [layer["index"] for layer in report["layers"]] == [0, 1]
        layer = report["layers"][0]
        assert layer["fidelity_split"] == "held_out" and layer["sequences"] == {"fit": 18, "held_out": 6}
        assert len(layer["r2_held_out"]) == 2 and all(r <= 1 for r in layer["r2_held_out"])
        assert set(layer["time_ms"]) == {"teacher", "truncated", "asap"}
        assert all(ms > 0 for ms in layer["time_ms"].values())
    # The fitted maps beat the same operators with a zero map (f_hat = 0) at reproducing the teacher's logits.
    zero_map = copy.deepcopy(teacher_mode)
    for op in zero_map.modules():
        if isinstance(op, AsapOperator):
            set_coefficients(op.dual_map, torch.zeros(2, num_features(op.dual_map)))
    reference = _logits(teacher, batches[-1])
    err_fitted = (_logits(teacher_mode, batches[-1]) - reference).abs().mean()
    err_zero = (_logits(zero_map, batches[-1]) - reference).abs().mean()
    assert torch.isfinite(err_fitted) and err_fitted < err_zero


def test_frozen_layer_subset(teacher, batches):
    compiled, report = compile_model(teacher, batches, num_slices=4, layers=[1])
    assert _operators(compiled) == [SinkhornOperator, AsapOperator]
    assert [layer["name"] for layer in report["layers"]] == ["blocks.1.attn.operator"]
    truncated = truncate_sinkhorn(teacher, n_iters=3, layers=[1])
    assert [op.n_iters for op in truncated.modules() if isinstance(op, SinkhornOperator)] == [5, 3]
    with pytest.raises(ValueError, match="out of range"):
        compile_model(teacher, batches, layers=[2])


def test_fit_matches_ridge_on_all_calibration_tokens(teacher, batches):
    """Accumulating batch by batch through the hooks equals one calibration over one big batch."""
    big = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
    per_batch, one = [
        LayerCalibration(sinkhorn_layers(teacher)[0], num_slices=5, slice_type="random", seed=0, reservoir_size=4)
        for _ in range(2)
    ]
    collect(teacher, batches, [per_batch], held_out_batches=0)
    collect(teacher, [big], [one], held_out_batches=0)
    torch.testing.assert_close(per_batch.fit.gram, one.fit.gram, rtol=1e-5, atol=1e-8)
    coef_batches, coef_one = solve_ridge(per_batch.fit, ridge=1e-3), solve_ridge(one.fit, ridge=1e-3)
    torch.testing.assert_close(coef_batches, coef_one, rtol=1e-4, atol=1e-6)
    assert per_batch.fit_reservoir.size == 4  # the reservoir is capped


def test_kl_refinement_never_worsens_held_out_kl(teacher, batches):
    calib = LayerCalibration(sinkhorn_layers(teacher)[0], num_slices=4, slice_type="axis", seed=0, reservoir_size=12)
    collect(teacher, batches, [calib], held_out_batches=2)
    ridge = solve_ridge(calib.fit, ridge=1e-3).float()
    prep = lambda chunks: kl_problems(chunks, calib.features, scale=calib.scale, n_iters=5, eps=1.0)  # noqa: E731
    train, held = prep(calib.fit_reservoir.chunks), prep(calib.held_out_reservoir.chunks)
    coef, info = refine_kl(ridge, train, held, eps=1.0, max_iter=10)
    before, after = mean_kl(held, ridge, eps=1.0), mean_kl(held, coef, eps=1.0)
    assert (after <= before + 1e-7).all()
    train_kl_refined, train_kl_ridge = mean_kl(train, coef, eps=1.0).sum(), mean_kl(train, ridge, eps=1.0).sum()
    assert train_kl_refined <= train_kl_ridge + 1e-6 or not any(info["refined_kept"])
    compiled, report = compile_model(teacher, batches, num_slices=4, refine="kl", refine_iters=5)
    assert set(report["layers"][0]["refine"]) == {"kl_ridge", "kl_refined", "refined_kept"}


def test_any_module_with_multihead_attention_compiles():
    """Not only asap models: a bare stack of MultiheadAttention layers with positional inputs."""

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(MultiheadAttention(8, num_heads=2, method="sinkhorn", n_iters=3) for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                x = x + layer(x)
            return x

    torch.manual_seed(0)
    stack = Stack().eval()
    batches = [torch.randn(3, 5, 8) for _ in range(3)]
    compiled, report = compile_model(stack, batches, num_slices=3, mode="sequential", slice_type="axis")
    assert len(report["layers"]) == 2
    assert torch.isfinite(compiled(batches[0])).all()


def test_refusals(batches):
    with pytest.raises(ValueError, match="odd number of half-steps"):
        compile_model(TextClassifier(tiny_text_config(n_iters=4)), batches)
    softmax = TextClassifier(tiny_text_config())
    for block in softmax.blocks:
        block.attn.operator = torch.nn.Identity()
    with pytest.raises(ValueError, match="no Sinkhorn attention operator"):
        compile_model(softmax, batches)
    with pytest.raises(ValueError, match="mode must be one of"):
        compile_model(TextClassifier(tiny_text_config()), batches, mode="greedy")
    with pytest.raises(ValueError, match="at least one batch"):
        compile_model(TextClassifier(tiny_text_config()), [])
    assert [num_held_out(n, 0.25) for n in (1, 2, 4, 10)] == [0, 1, 1, 2]


def test_single_batch_reports_on_fit_data():
    model = TextClassifier(tiny_text_config(depth=1))
    _, report = compile_model(model, make_batches(1), num_slices=3)
    assert report["layers"][0]["fidelity_split"] == "fit" and report["layers"][0]["r2_held_out"] is None


def test_compiling_times_nothing_without_a_timer(teacher, batches, monkeypatch):
    """The fidelity report is maths only: without a timer there is no ``time_ms`` and no clock is read."""
    import time as time_module

    def no_clock():
        raise AssertionError("compile_model read the clock")

    monkeypatch.setattr(time_module, "perf_counter", no_clock)
    _, report = compile_model(teacher, batches, num_slices=6)
    assert all("time_ms" not in layer for layer in report["layers"])


def test_label_free_semi_dual_fit_through_compile_model(teacher, batches):
    _, report = compile_model(teacher, batches, num_slices=4, refine="dual", refine_iters=5)
    info = report["layers"][0]["refine"]
    assert set(info) == {"semi_dual_zero", "semi_dual_fit", "kl_zero", "kl_fit", "kl_ridge"}
    assert all(fit >= zero for fit, zero in zip(info["semi_dual_fit"], info["semi_dual_zero"]))
    assert report["options"]["refine"] == "dual"
