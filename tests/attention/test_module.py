"""The module switch: methods, options refused, buffers saved, padding handled."""

from __future__ import annotations

import warnings

import pytest
import torch

from asap.attention import (
    OPERATORS,
    AsapOperator,
    AttentionConfig,
    MultiheadAttention,
    SinkhornOperator,
    SliceDualMap,
    make_directions,
)
from asap.attention.functional import sinkhorn_attention


@pytest.mark.parametrize("method", ["softmax", "sinkhorn", "esp", "asap"])
def test_each_method_runs_and_pads_like_unpadded(method):
    torch.manual_seed(0)
    attn = MultiheadAttention(16, num_heads=4, method=method).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    pm = torch.ones(2, 6, dtype=torch.bool)
    pm[1, 4:] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unfitted ASAP warns
        out = attn(x, padding_mask=pm)
        short = attn(x[1:, :4])
    assert out.shape == (2, 6, 16)
    torch.testing.assert_close(out[1, :4], short[0], rtol=0, atol=1e-12)
    assert attn.method == method


def test_module_equals_functional_operator():
    attn = MultiheadAttention(8, num_heads=2, method="sinkhorn", n_iters=5, eps=0.5).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    q, k, v = attn.qkv(x).view(3, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    expected = attn.proj(sinkhorn_attention(q, k, v, n_iters=5, eps=0.5).transpose(1, 2).reshape(3, 5, 8))
    torch.testing.assert_close(attn(x), expected)


def test_incompatible_options_are_refused():
    with pytest.raises(TypeError, match="does not take option.*n_iters"):
        MultiheadAttention(16, num_heads=4, method="softmax", n_iters=3)
    with pytest.raises(ValueError, match="unknown attention method"):
        MultiheadAttention(16, num_heads=4, method="flash")
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(10, num_heads=4)
    attn = MultiheadAttention(16, num_heads=4)
    with pytest.raises(ValueError, match="padding_mask"):
        attn(torch.randn(2, 5, 16), padding_mask=torch.ones(2, 4, dtype=torch.bool))


def test_asap_buffers_round_trip_through_state_dict():
    a = MultiheadAttention(16, num_heads=4, method="asap", num_slices=6, slice_type="random", seed=3)
    a.operator.dual_map.coef.normal_()
    a.operator.dual_map.fitted.fill_(True)
    b = MultiheadAttention(16, num_heads=4, method="asap", num_slices=6, slice_type="random", seed=99)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(a(x), b(x))
    assert {"operator.dual_map.directions", "operator.dual_map.coef"} <= set(a.state_dict())


def test_slice_directions_are_unit_and_reproducible():
    d1 = make_directions(num_heads=2, head_dim=8, num_slices=5, slice_type="random", seed=7)
    d2 = make_directions(num_heads=2, head_dim=8, num_slices=5, slice_type="random", seed=7)
    torch.testing.assert_close(d1, d2)
    torch.testing.assert_close(d1.norm(dim=-1), torch.ones(2, 5))
    axes = make_directions(num_heads=1, head_dim=8, num_slices=8, slice_type="axis", seed=0)
    torch.testing.assert_close(axes[0], torch.eye(8))
    with pytest.raises(ValueError, match="exceed"):
        make_directions(num_heads=1, head_dim=4, num_slices=5, slice_type="axis", seed=0)


def test_unfitted_asap_warns_once():
    attn = MultiheadAttention(8, num_heads=2, method="asap", num_slices=4)
    x = torch.randn(1, 3, 8)
    with pytest.warns(UserWarning, match="fitted"):
        attn(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attn(x)


def test_operator_swap_in_place_and_config_round_trip():
    attn = MultiheadAttention(8, num_heads=2, method="sinkhorn", n_iters=11)
    assert isinstance(attn.operator, SinkhornOperator)
    attn.operator = AsapOperator(num_heads=2, head_dim=4, dual_map=SliceDualMap(num_heads=2, head_dim=4, num_slices=3))
    assert attn.method == "asap"
    cfg = AttentionConfig(method="sinkhorn", options={"n_iters": 11, "eps": 0.5})
    assert AttentionConfig.from_dict(cfg.to_dict()) == cfg
    built = MultiheadAttention.from_config(8, num_heads=2, config=cfg)
    assert built.operator.n_iters == 11 and built.operator.eps == 0.5
    assert set(OPERATORS) == {"softmax", "sinkhorn", "esp", "asap"}

