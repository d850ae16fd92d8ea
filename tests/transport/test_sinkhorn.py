"""Sinkhorn core against POT (independent oracle) and the identities of METHOD.md."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from asap.transport import (
    c_transform_cols,
    c_transform_rows,
    center,
    closure,
    dual_objective,
    log_plan,
    marginal_errors,
    sinkhorn,
    support,
)
from tests.conftest import padding_mask


def _scores(b=2, h=2, n=7, m=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, m, generator=gen, dtype=torch.float64)


def test_long_run_matches_pot_log_sinkhorn():
    """A converged teacher gives POT's entropic plan for the same cost (fp64)."""
    scores = _scores(b=1, h=1, n=6, m=9)
    eps = 0.5
    supp = support(None, 6, 9, dtype=torch.float64, device=scores.device)
    res = sinkhorn(scores, n_iters=401, eps=eps, supp=supp)
    plan = log_plan(scores, res.f, res.g, eps=eps, supp=supp).exp()[0, 0].numpy()
    a, b = np.full(6, 1 / 6), np.full(9, 1 / 9)
    # POT solves min <C,P> + reg * sum P (log P - 1): the same problem as ours with C = -S.
    ref = ot.sinkhorn(a, b, -scores[0, 0].numpy(), reg=eps, method="sinkhorn_log", numItermax=10000, stopThr=1e-14)
    np.testing.assert_allclose(plan, ref, atol=1e-10)
    np.testing.assert_allclose(plan.sum(1), a, atol=1e-12)
    np.testing.assert_allclose(plan.sum(0), b, atol=1e-10)


def test_odd_k_rows_exact_even_k_columns_exact():
    scores = _scores()
    supp = support(None, 7, 7, dtype=torch.float64, device=scores.device)
    for k, exact_rows in ((5, True), (6, False)):
        res = sinkhorn(scores, n_iters=k, eps=1.0, supp=supp)
        row_err, col_err = marginal_errors(scores, res.f, res.g, eps=1.0, supp=supp)
        exact = row_err if exact_rows else col_err
        other = col_err if exact_rows else row_err
        assert exact.max() < 1e-12
        assert other.max() > 1e-8  # a 5-step teacher is not converged on random scores


def test_column_error_decreases_with_k():
    scores = 3 * _scores()
    supp = support(None, 7, 7, dtype=torch.float64, device=scores.device)
    errs = []
    for k in (3, 5, 11, 21):
        res = sinkhorn(scores, n_iters=k, eps=1.0, supp=supp)
        errs.append(marginal_errors(scores, res.f, res.g, eps=1.0, supp=supp)[1].max().item())
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:]))


def test_closure_of_target_reproduces_teacher():
    """g_{K-1} = ccol(f_{K-2}), f_K = crow(g_{K-1}) is exactly the teacher's final plan."""
    scores = _scores()
    supp = support(None, 7, 7, dtype=torch.float64, device=scores.device)
    for k in (3, 5, 11):
        res = sinkhorn(scores, n_iters=k, eps=0.7, supp=supp)
        f, g = closure(scores, res.target, eps=0.7, supp=supp)
        p_teacher = log_plan(scores, res.f, res.g, eps=0.7, supp=supp).exp()
        p_closure = log_plan(scores, f, g, eps=0.7, supp=supp).exp()
        torch.testing.assert_close(p_closure, p_teacher, rtol=0, atol=1e-14)


def test_target_is_centred_and_undefined_for_short_or_even_runs():
    scores = _scores()
    supp = support(None, 7, 7, dtype=torch.float64, device=scores.device)
    res = sinkhorn(scores, n_iters=5, eps=1.0, supp=supp)
    torch.testing.assert_close(res.target.mean(-1), torch.zeros(2, 2, dtype=torch.float64), atol=1e-14, rtol=0)
    assert sinkhorn(scores, n_iters=1, eps=1.0, supp=supp).target is None
    assert sinkhorn(scores, n_iters=4, eps=1.0, supp=supp).target is None


def test_dual_objective_increases_towards_optimum():
    scores = _scores()
    supp = support(None, 7, 7, dtype=torch.float64, device=scores.device)
    values = []
    for k in (1, 3, 5, 21, 201):
        res = sinkhorn(scores, n_iters=k, eps=1.0, supp=supp)
        values.append(dual_objective(scores, res.f, res.g, eps=1.0, supp=supp))
    for v1, v2 in zip(values, values[1:]):
        assert (v2 >= v1 - 1e-12).all()


def test_padding_equals_unpadded():
    scores = _scores(b=2, h=2, n=7, m=7)
    mask = padding_mask([7, 4], 7)
    supp = support(mask, 7, 7, dtype=torch.float64, device=scores.device)
    res = sinkhorn(scores, n_iters=7, eps=1.0, supp=supp)
    ref_supp = support(None, 4, 4, dtype=torch.float64, device=scores.device)
    ref = sinkhorn(scores[1:, :, :4, :4], n_iters=7, eps=1.0, supp=ref_supp)
    torch.testing.assert_close(res.f[1:, :, :4], ref.f, rtol=0, atol=1e-13)
    torch.testing.assert_close(res.g[1:, :, :4], ref.g, rtol=0, atol=1e-13)
    torch.testing.assert_close(res.target[1:, :, :4], ref.target, rtol=0, atol=1e-13)
    assert (res.f[1:, :, 4:] == 0).all() and (res.g[1:, :, 4:] == 0).all()
    assert torch.isfinite(res.f).all() and torch.isfinite(res.g).all()


def test_fully_padded_sequence_is_finite_in_forward_and_backward():
    scores = _scores(b=1, h=1).requires_grad_(True)
    mask = torch.zeros(1, 1, 7, 7, dtype=torch.bool)
    supp = support(mask, 7, 7, dtype=torch.float64, device=scores.device)
    res = sinkhorn(scores, n_iters=5, eps=1.0, supp=supp)
    (res.f.sum() + res.g.sum()).backward()
    assert (res.f == 0).all() and torch.isfinite(scores.grad).all()


def test_tolerance_mode_stops_after_row_step_within_tol():
    scores = _scores()
    supp = support(None, 7, 7, dtype=torch.float64, device=scores.device)
    res = sinkhorn(scores, n_iters=999, eps=1.0, supp=supp, tol=1e-9, check_every=2)
    assert res.n_steps % 2 == 1 and res.n_steps < 999
    row_err, col_err = marginal_errors(scores, res.f, res.g, eps=1.0, supp=supp)
    assert row_err.max() < 1e-12 and col_err.max() < 1e-9


def test_c_transforms_make_marginals_exact():
    scores = _scores(n=5, m=8)
    supp = support(None, 5, 8, dtype=torch.float64, device=scores.device)
    g0 = torch.randn(2, 2, 8, dtype=torch.float64)
    f = c_transform_rows(scores, g0, eps=0.3, supp=supp)
    assert marginal_errors(scores, f, g0, eps=0.3, supp=supp)[0].max() < 1e-12
    g = c_transform_cols(scores, f, eps=0.3, supp=supp)
    assert marginal_errors(scores, f, g, eps=0.3, supp=supp)[1].max() < 1e-12


def test_center_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]], dtype=torch.float64)
    valid = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(center(x, valid=valid), torch.tensor([[-1.0, 0.0, 1.0, 0.0]], dtype=torch.float64))


def test_rejects_bad_iteration_counts():
    scores = _scores()
    supp = support(None, 7, 7, dtype=torch.float64, device=scores.device)
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn(scores, n_iters=0, eps=1.0, supp=supp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_and_tiled_column_logsumexp_agree(dtype):
    """The fused CPU kernel path (no autograd) equals the tiled path (autograd on) and the dense formula."""
    from asap.transport.ctransform import _fused_column_logsumexp_cpu, column_logsumexp

    q = torch.randn(2, 3, 9, 4, dtype=dtype)
    k = torch.randn(2, 3, 7, 4, dtype=dtype)
    f = torch.randn(2, 3, 9, dtype=dtype)
    dense = torch.logsumexp((0.5 * q @ k.transpose(-1, -2) + f.unsqueeze(-1)) / 0.7, dim=-2)
    with torch.no_grad():
        fused = column_logsumexp(q, k, f, scale=0.5, eps=0.7)
        # On the pinned torch the fused kernel must really be what ran above.
        direct = _fused_column_logsumexp_cpu(q, k, f, scale=0.5, eps=0.7)
    assert direct is not None
    torch.testing.assert_close(fused, direct.to(fused.dtype), rtol=0, atol=0)
    tiled = column_logsumexp(q, k, f.requires_grad_(True), scale=0.5, eps=0.7, tile_bytes=1)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(fused, dense, rtol=0, atol=tol)
    torch.testing.assert_close(tiled.detach(), dense, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["padding", "arbitrary"])
def test_fused_masked_column_logsumexp_agrees_with_the_dense_formula(dtype, kind):
    """With a mask the fused path folds f into the dot product; valid columns match the dense formula."""
    from asap.transport.ctransform import _fused_column_logsumexp_cpu, column_logsumexp
    from asap.transport.masks import key_padding_to_attn_mask, support

    gen = torch.Generator().manual_seed(3)
    b, h, n, d = 3, 2, 11, 5
    q, k = torch.randn(b, h, n, d, dtype=dtype, generator=gen), torch.randn(b, h, n, d, dtype=dtype, generator=gen)
    f = 3 * torch.randn(b, h, n, dtype=dtype, generator=gen)
    if kind == "padding":  # the last sequence is all padding
        mask = key_padding_to_attn_mask(torch.arange(n)[None, :] < torch.tensor([[n], [6], [0]]))
    else:
        mask = torch.rand(b, 1, n, n, generator=gen) < 0.6
    supp = support(mask, n, n, dtype=dtype, device=q.device)
    f = supp.zero_rows(f)
    dense = torch.logsumexp((0.5 * q @ k.transpose(-1, -2) + f.unsqueeze(-1)) / 0.7 + supp.col_bias, dim=-2)
    with torch.no_grad():
        fused = column_logsumexp(q, k, f, scale=0.5, eps=0.7, col_bias=supp.col_bias)
        direct = _fused_column_logsumexp_cpu(q, k, f, scale=0.5, eps=0.7, col_bias=supp.col_bias)
    assert direct is not None  # the pinned torch has the kernel: the fused path is what ran
    torch.testing.assert_close(fused, direct.to(fused.dtype), rtol=0, atol=0)
    tiled = column_logsumexp(q, k, f.requires_grad_(True), scale=0.5, eps=0.7, col_bias=supp.col_bias, tile_bytes=1)
    valid = supp.cols.expand(b, h, n)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.isfinite(fused[valid]).all()
    torch.testing.assert_close(fused[valid], dense[valid], rtol=0, atol=tol)
    torch.testing.assert_close(tiled.detach()[valid], dense[valid], rtol=0, atol=tol)


def test_inplace_logsumexp_matches_torch_including_masked_entries():
    from asap.transport.ctransform import logsumexp_

    x = torch.randn(3, 4, 5, dtype=torch.float64)
    x[0, 1, :2] = float("-inf")
    for dim in (-1, -2):
        expected = torch.logsumexp(x, dim=dim)
        torch.testing.assert_close(logsumexp_(x.clone(), dim=dim), expected, rtol=0, atol=1e-14)
