"""The fused dual-map forward against its design-matrix reference (features @ coefficients, centred).

The fused path folds the coefficients into the 1-D steps, sorts only what it
needs and skips the per-slice centrings; ``center=True`` must give exactly the
reference's output, ``center=False`` the same up to a constant per (b, h).
"""

from __future__ import annotations

import pytest
import torch

from asap.attention.dual_map import (
    DUAL_MAPS,
    PER_HEAD_PROJECTION_MAX_N,
    ExtendedSliceDualMap,
    SliceDualMap,
    build_dual_map,
)
from asap.transport.masks import key_padding_to_attn_mask
from tests.attention.test_layouts import LAYOUTS, relayout

EXTRAS = ((), ("qk_mean",), ("qk_mean", "q_norm"), ("lse_landmarks",), ("qk_mean", "q_norm", "lse_landmarks"),
          ("lse_keys",), ("qk_mean", "q_norm", "lse_keys"))


def _map(extras, *, heads=3, d=5, slices=7, dtype=torch.float64):
    m = build_dual_map(num_heads=heads, head_dim=d, num_slices=slices, slice_type="random", seed=3, extra_features=extras)
    m.set_coefficients(torch.randn(heads, m.num_features, dtype=torch.float64))
    return m.to(dtype)


def _reference(m: SliceDualMap, q, k, *, scale, attn_mask):
    phi = m.features(q, k, scale=scale, attn_mask=attn_mask)
    f = torch.einsum("bhln,hl->bhn", phi, m.coefficients().to(phi.dtype))
    if attn_mask is None:
        return f - f.mean(-1, keepdim=True)
    rows = attn_mask.any(-1).expand(*f.shape).to(f.dtype)
    return (f - (f * rows).sum(-1, keepdim=True) / rows.sum(-1, keepdim=True).clamp(min=1)) * rows


@pytest.mark.parametrize("extras", EXTRAS)
@pytest.mark.parametrize("padded", [False, True])
def test_fused_forward_equals_design_matrix(extras, padded):
    m = _map(extras)
    q, k = torch.randn(4, 3, 9, 5, dtype=torch.float64), torch.randn(4, 3, 9, 5, dtype=torch.float64)
    valid = torch.arange(9)[None] < torch.tensor([9, 6, 1, 0])[:, None] if padded else None
    attn_mask = None if valid is None else key_padding_to_attn_mask(valid)
    expected = _reference(m, q, k, scale=0.6, attn_mask=attn_mask)
    got = m(q, k, scale=0.6, padding_mask=valid)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # The 4-D mask path (features) and the vector path agree, and centre=False only shifts each (b, h).
    torch.testing.assert_close(m(q, k, scale=0.6, attn_mask=attn_mask), expected, rtol=1e-12, atol=1e-12)
    raw = m(q, k, scale=0.6, padding_mask=valid, center=False)
    rows = torch.ones(4, 3, 9, dtype=torch.bool) if valid is None else valid[:, None].expand(4, 3, 9)
    shift = (raw - expected)[rows].reshape(-1)
    for b in range(4):
        for h in range(3):
            d = (raw - expected)[b, h][rows[b, h]]
            if d.numel():
                torch.testing.assert_close(d, d[:1].expand_as(d), rtol=0, atol=1e-12)
    assert shift.isfinite().all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_forward_any_layout(layout):
    m = _map(("qk_mean", "q_norm"), dtype=torch.float32)
    q, k = torch.randn(2, 3, 8, 5), torch.randn(2, 3, 8, 5)
    q2, k2 = relayout(q, layout), relayout(k, layout)
    valid = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    torch.testing.assert_close(m(q2, k2, scale=0.4, padding_mask=valid), m(q2.contiguous(), k2.contiguous(), scale=0.4, padding_mask=valid), rtol=0, atol=0)


def test_fused_forward_gradients_match_reference():
    m = _map(("qk_mean",))
    q = torch.randn(2, 3, 7, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 7, 5, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    w = torch.randn(2, 3, 7, dtype=torch.float64)
    grads = torch.autograd.grad((m(q, k, scale=0.5, padding_mask=valid) * w).sum(), (q, k))
    ref = torch.autograd.grad((_reference(m, q, k, scale=0.5, attn_mask=key_padding_to_attn_mask(valid)) * w).sum(), (q, k))
    for g, r in zip(grads, ref):
        assert g.isfinite().all()
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_cross_attention_and_general_masks_use_the_reference():
    m = _map(("q_norm",))
    q, k = torch.randn(2, 3, 6, 5, dtype=torch.float64), torch.randn(2, 3, 9, 5, dtype=torch.float64)
    torch.testing.assert_close(m(q, k, scale=0.5), _reference(m, q, k, scale=0.5, attn_mask=None))
    with pytest.raises(ValueError, match="self-attention"):
        m(q, k, scale=0.5, padding_mask=torch.ones(2, 6, dtype=torch.bool))


def test_registry_and_old_class_names():
    assert DUAL_MAPS["linear"] is SliceDualMap
    assert isinstance(build_dual_map(num_heads=1, head_dim=4, num_slices=2, slice_type="axis", seed=0,
                                     extra_features=("q_norm",)), ExtendedSliceDualMap)  # fmt: skip
    plain = build_dual_map(num_heads=1, head_dim=4, num_slices=2, slice_type="axis", seed=0)
    assert "extra_coef" not in plain.state_dict()
    with pytest.raises(ValueError, match="unknown dual map kind"):
        build_dual_map(num_heads=1, head_dim=4, num_slices=2, slice_type="axis", seed=0, kind="spline")
    with pytest.raises(ValueError, match="coefficients of shape"):
        plain.set_coefficients(torch.zeros(1, 3))


@pytest.mark.parametrize("n", [5, 64, 65, 130])
def test_both_projection_layouts_match_the_reference(n):
    """Rows up to PER_HEAD_PROJECTION_MAX_N use one product per head, longer ones the broadcast product."""
    m = _map(("qk_mean", "q_norm"))
    q, k = torch.randn(2, 3, n, 5, dtype=torch.float64), torch.randn(2, 3, n, 5, dtype=torch.float64)
    valid = torch.arange(n)[None] < torch.tensor([n, n // 2])[:, None]
    expected = _reference(m, q, k, scale=0.3, attn_mask=key_padding_to_attn_mask(valid))
    torch.testing.assert_close(m(q, k, scale=0.3, padding_mask=valid), expected, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("padded", [False, True])
def test_fused_forward_long_fp32_rows_match_the_fp64_reference(padded):
    """Rows of PACKED_ARGSORT_MIN_N tokens or more sort through the packed fp32 argsort (padding as +inf)."""
    from asap.transport.sliced import PACKED_ARGSORT_MIN_N

    n = PACKED_ARGSORT_MIN_N + 3
    m = _map(("qk_mean", "q_norm"))
    q, k = torch.randn(2, 3, n, 5, dtype=torch.float64), torch.randn(2, 3, n, 5, dtype=torch.float64)
    valid = torch.arange(n)[None] < torch.tensor([n, n // 3])[:, None] if padded else None
    expected = _reference(m, q, k, scale=0.4, attn_mask=None if valid is None else key_padding_to_attn_mask(valid))
    got = m.float()(q.float(), k.float(), scale=0.4, padding_mask=valid)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [9, PER_HEAD_PROJECTION_MAX_N + 1])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_forward_through_torch_sort(monkeypatch, n, padded):
    """The sort CUDA and torch.compile take: ``torch.sort`` keeps the projections' permuted strides.

    A lent H200 failed here (``perm.view`` of a non-contiguous permutation) while the NumPy
    sort, which returns contiguous arrays, hid it on CPU.
    """
    import asap.transport.sliced as sliced

    monkeypatch.setattr(sliced, "argsort_last", lambda x: torch.sort(x, dim=-1).indices)
    monkeypatch.setattr(sliced, "sort_values_last", lambda x: torch.sort(x, dim=-1).values)
    m = _map(("qk_mean", "q_norm"))
    q, k = torch.randn(2, 3, n, 5, dtype=torch.float64), torch.randn(2, 3, n, 5, dtype=torch.float64)
    perm, _ = sliced.argsort_and_sort_last(*_projections(m, q, k))
    assert perm.is_contiguous() == (n > PER_HEAD_PROJECTION_MAX_N)  # short rows: the strided case that broke
    valid = torch.arange(n)[None] < torch.tensor([n, n // 2])[:, None] if padded else None
    expected = _reference(m, q, k, scale=0.3, attn_mask=None if valid is None else key_padding_to_attn_mask(valid))
    torch.testing.assert_close(m(q, k, scale=0.3, padding_mask=valid), expected, rtol=1e-11, atol=1e-11)


def _projections(m, q, k):
    from asap.attention.dual_map import _project_pair

    return _project_pair(m.directions.to(q.dtype), q, k)


@pytest.mark.parametrize("left_padded", [False, True])
def test_landmark_lse_takes_evenly_spaced_valid_keys(left_padded):
    """``lse_landmarks``: ranks round(t (len - 1) / (M - 1)) among the valid keys, wherever the mask puts them."""
    import math

    from asap.attention.dual_map import NUM_LANDMARKS, _landmark_lse

    q, k = torch.randn(3, 2, 20, 4, dtype=torch.float64), torch.randn(3, 2, 20, 4, dtype=torch.float64)
    lengths = [20, 9, 2]
    valid = torch.arange(20)[None] < torch.tensor(lengths)[:, None]
    if left_padded:
        valid = valid.flip(-1)
    got = _landmark_lse(q, k, scale=0.7, cols=valid[:, None, :])
    for b, n_valid in enumerate(lengths):
        keys = valid[b].nonzero().squeeze(-1)[[round(t * (n_valid - 1) / (NUM_LANDMARKS - 1)) for t in range(NUM_LANDMARKS)]]
        expected = torch.logsumexp(0.7 * q[b] @ k[b][:, keys].transpose(-1, -2), dim=-1) - math.log(NUM_LANDMARKS)
        torch.testing.assert_close(got[b], expected, rtol=1e-12, atol=1e-12)
    whole = _landmark_lse(q, k, scale=0.7, cols=None)  # no mask: landmarks over all 20 keys
    torch.testing.assert_close(whole, _landmark_lse(q, k, scale=0.7, cols=torch.ones(3, 1, 20, dtype=torch.bool)))


@pytest.mark.parametrize("left_padded", [False, True])
def test_keys_lse_is_the_row_normaliser_over_valid_keys(left_padded, monkeypatch):
    """``lse_keys``: log mean_j exp(scale q_i.k_j) over each row's valid keys, however the blocks fall."""
    import math

    from asap.attention import dual_map

    q, k = torch.randn(3, 2, 20, 4, dtype=torch.float64), torch.randn(3, 2, 20, 4, dtype=torch.float64)
    lengths = [20, 9, 0]
    valid = torch.arange(20)[None] < torch.tensor(lengths)[:, None]
    if left_padded:
        valid = valid.flip(-1)
    expected = torch.zeros(3, 2, 20, dtype=torch.float64)  # a sequence with no valid key: 0
    for b, n_valid in enumerate(lengths):
        if n_valid:
            keys = valid[b].nonzero().squeeze(-1)
            expected[b] = torch.logsumexp(0.7 * q[b] @ k[b][:, keys].transpose(-1, -2), dim=-1) - math.log(n_valid)
    for block_bytes in (dual_map.KEYS_LSE_BLOCK_BYTES, 20 * 20 * 8, 3 * 20 * 20 * 8):  # one block, 1 and 3 problems
        monkeypatch.setattr(dual_map, "KEYS_LSE_BLOCK_BYTES", block_bytes)
        torch.testing.assert_close(dual_map._keys_lse(q, k, scale=0.7, cols=valid[:, None, :]), expected, rtol=1e-12, atol=1e-12)
        with torch.enable_grad():  # the autograd branch (logsumexp) gives the same values
            got = dual_map._keys_lse(q.requires_grad_(), k, scale=0.7, cols=valid[:, None, :])
        (grad,) = torch.autograd.grad(got.sum(), q)
        assert grad.isfinite().all() and not grad[2].any()  # the sequence without keys: no gradient
        q = q.detach()
        torch.testing.assert_close(got.detach(), expected, rtol=1e-12, atol=1e-12)
    whole = dual_map._keys_lse(q, k, scale=0.7, cols=None)
    torch.testing.assert_close(whole, torch.logsumexp(0.7 * q @ k.transpose(-1, -2), dim=-1) - math.log(20))


@pytest.mark.parametrize("extras", [("qk_mean", "q_norm", "lse_landmarks"), ("qk_mean", "lse_keys")])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_product_feature_any_layout_matches_the_fp64_reference(layout, extras):
    """fp32 fused forward with a log-sum-exp extra on strided, sliced and expanded inputs, padded, against fp64.

    Not bit-equal across layouts (the extra's scores are a matrix product whose summation order follows the
    layout), so each layout is held to the fp64 design-matrix reference instead.
    """
    m = _map(extras)
    q, k = torch.randn(2, 3, 8, 5, dtype=torch.float64), torch.randn(2, 3, 8, 5, dtype=torch.float64)
    q2, k2 = relayout(q, layout), relayout(k, layout)
    valid = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    expected = _reference(m, q2, k2, scale=0.4, attn_mask=key_padding_to_attn_mask(valid))
    q32, k32 = relayout(q.float(), layout), relayout(k.float(), layout)  # the layout itself reaches the fp32 map
    got = m.float()(q32, k32, scale=0.4, padding_mask=valid)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
