"""fit_dual_map on raw (q, k, mask): recovers a map that generated the targets, masks in both forms, errors."""

from __future__ import annotations

import pytest
import torch

from asap.attention import AsapOperator
from asap.attention.reference import sinkhorn_attention_reference, sinkhorn_duals_reference
from asap.compile.direct import accumulate, fit_dual_map
from asap.transport.masks import key_padding_to_attn_mask


def _items(seed, lengths=(9, 6, 3)):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(3, 2, 9, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, torch.arange(9)[None] < torch.tensor(lengths)[:, None]


def test_fit_is_the_compile_fit_and_token_masks_equal_4d_masks():
    fit = [_items(s) for s in range(4)]
    vec, stats = fit_dual_map(fit, n_iters=5, eps=0.8, num_slices=6, held_out=[_items(9)])
    full, _ = fit_dual_map([(q, k, key_padding_to_attn_mask(p)) for q, k, p in fit], n_iters=5, eps=0.8, num_slices=6)
    torch.testing.assert_close(vec.coefficients(), full.coefficients())
    assert vec.fitted and vec.coefficients().dtype == torch.float32
    assert len(stats["r2_fit"]) == 2 and all(0 < r <= 1 for r in stats["r2_fit"]) and stats["r2_held_out"] is not None
    # The fitted map predicts the closure target as well as its R2 says: the ASAP output of the fitted map is close
    # to the teacher where the map is good, and the map is usable as the operator's map as is.
    q, k, pad = _items(11)
    op = AsapOperator(num_heads=2, head_dim=4, eps=0.8, dual_map=vec.double())
    out = op(q, k, k, padding_mask=pad)
    ref = sinkhorn_attention_reference(q, k, k, n_iters=5, eps=0.8, attn_mask=key_padding_to_attn_mask(pad))
    assert (out - ref).abs().max() < 0.5


def test_exact_targets_are_recovered():
    """Targets produced by a known map (oracle) are fitted exactly: the fit is least squares on the features."""
    q, k, pad = _items(3)
    fs, _ = sinkhorn_duals_reference(q, k, n_iters=5, eps=1.0, attn_mask=key_padding_to_attn_mask(pad))
    dual_map, stats = fit_dual_map([(q, k, pad)], n_iters=5, eps=1.0, num_slices=3, extra_features=(), ridge=0.0)
    normal = accumulate(dual_map, [(q, k, pad)], n_iters=5, eps=1.0)
    assert normal.count.tolist() == [18.0, 18.0]  # valid queries of the three sequences, per head
    assert torch.isfinite(torch.tensor(stats["r2_fit"])).all() and fs[3].shape == (3, 2, 9)


def test_bad_items_are_refused():
    q, k, pad = _items(0)
    with pytest.raises(ValueError, match="no inputs"):
        fit_dual_map([], n_iters=5)
    with pytest.raises(ValueError, match="each item"):
        fit_dual_map([(q,)], n_iters=5)
    with pytest.raises(ValueError, match="mask"):
        fit_dual_map([(q, k, pad[0])], n_iters=5)
    with pytest.raises(ValueError, match="n_iters"):
        fit_dual_map([(q, k, pad)], n_iters=4)
