"""Extra per-token features of the extended dual map: values, exact fits, save/load."""

from __future__ import annotations

import pytest
import torch

from asap.attention.operators import AsapOperator
from asap.compile import compile_model, load_compiled, save_compiled
from asap.compile.fit import NormalEquations, solve_ridge
from asap.compile.maps import ExtendedSliceDualMap, extra_query_features, set_coefficients
from tests.conftest import padding_mask, rand_qkv


def test_extra_features_by_hand():
    q, k, _ = rand_qkv(b=2, h=2, n=5, d=3)
    mask = padding_mask([5, 3], 5)
    feats = extra_query_features(q, k, names=("qk_mean", "q_norm"), scale=0.5, attn_mask=mask)
    for b, length in enumerate((5, 3)):
        for h in range(2):
            qv, kv = q[b, h, :length], k[b, h, :length]
            qk = 0.5 * qv @ kv.mean(0)
            qn = 0.25 * (qv * qv).sum(-1)
            torch.testing.assert_close(feats[b, h, 0, :length], qk - qk.mean())
            torch.testing.assert_close(feats[b, h, 1, :length], qn - qn.mean())
            assert (feats[b, h, :, length:] == 0).all()
    with pytest.raises(ValueError, match="unknown extra feature"):
        extra_query_features(q, k, names=("k_norm",), scale=1.0, attn_mask=None)


def test_fit_recovers_coefficients_of_the_extended_map():
    q, k, _ = rand_qkv(b=3, h=2, n=8, d=4)
    mask = padding_mask([8, 6, 7], 8)
    dual_map = ExtendedSliceDualMap(num_heads=2, head_dim=4, num_slices=3, extra_features=("qk_mean", "q_norm")).double()
    phi = dual_map.features(q, k, scale=0.5, attn_mask=mask)
    assert phi.shape == (3, 2, 5, 8)
    coef = torch.randn(2, 5, dtype=torch.float64)
    set_coefficients(dual_map, coef)
    target = dual_map(q, k, scale=0.5, attn_mask=mask)
    normal = NormalEquations.zeros(2, 5)
    normal.add(phi, target, valid=mask.any(-1))
    torch.testing.assert_close(solve_ridge(normal, ridge=0.0), coef, rtol=1e-7, atol=1e-8)


def test_compiled_model_with_extra_features_round_trips(tmp_path, teacher, batches):
    compiled, report = compile_model(teacher, batches, num_slices=3, extra_features=("qk_mean",))
    ops = [m for m in compiled.modules() if isinstance(m, AsapOperator)]
    assert all(isinstance(op.dual_map, ExtendedSliceDualMap) for op in ops)
    assert report["options"]["extra_features"] == ["qk_mean"]
    loaded, manifest = load_compiled(save_compiled(tmp_path / "c", compiled, report=report))
    assert manifest["compiled_layers"][0]["extra_features"] == ["qk_mean"]
    batch = batches[0]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(batch["input_ids"], padding_mask=batch["padding_mask"]),
            compiled(batch["input_ids"], padding_mask=batch["padding_mask"]), rtol=0, atol=0,
        )  # fmt: skip
