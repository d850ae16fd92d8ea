"""sinkhorn(..., return_iterates=True): the duals after every half-step, against the fp64 reference."""

from __future__ import annotations

import pytest
import torch

from asap.attention.reference import sinkhorn_duals_reference, sinkhorn_plan_reference
from asap.transport import SinkhornIterates, sinkhorn, support
from tests.conftest import padding_mask, rand_qkv

K, EPS = 9, 0.7


def _problem(lengths=(7, 4)):
    q, k, _ = rand_qkv(b=len(lengths), h=2, n=7, d=4, scale=1.5)
    mask = padding_mask(list(lengths), 7)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return q, k, mask, scores, support(mask, 7, 7, dtype=torch.float64, device=q.device)


@pytest.mark.parametrize("lengths", [(7, 7), (7, 4)])
def test_iterates_are_the_reference_duals_and_the_last_is_the_result(lengths):
    q, k, mask, scores, supp = _problem(lengths)
    default = sinkhorn(scores, n_iters=K, eps=EPS, supp=supp)
    result, iterates = sinkhorn(scores, n_iters=K, eps=EPS, supp=supp, return_iterates=True)
    assert isinstance(iterates, SinkhornIterates) and type(default).__name__ == "SinkhornResult"
    for got, want in zip(result, default):  # the default result is unchanged by the option
        assert got == want if isinstance(want, int) else torch.equal(got, want)
    assert iterates.f.shape == (K, *scores.shape[:-1]) and iterates.g.shape == (K, *scores.shape[:-2], 7)
    assert torch.equal(iterates.f[-1], result.f) and torch.equal(iterates.g[-1], result.g)
    fs, gs = sinkhorn_duals_reference(q, k, n_iters=K, eps=EPS, attn_mask=mask)
    for step in range(1, K + 1):
        f_ref = fs[step if step % 2 else step - 1]
        g_ref = gs[step if step % 2 == 0 else step - 1]
        torch.testing.assert_close(iterates.f[step - 1], f_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(iterates.g[step - 1], g_ref, atol=1e-12, rtol=0)


def test_marginal_errors_match_the_reference_plans_and_decrease():
    q, k, mask, scores, supp = _problem()
    _, iterates = sinkhorn(scores, n_iters=K, eps=EPS, supp=supp, return_iterates=True)
    rows, cols = iterates.marginal_errors(scores, eps=EPS, supp=supp)
    assert rows.shape == cols.shape == (K, *scores.shape[:-2])
    valid = mask[:, :, :, 0] | mask[:, :, 0, :]
    a = 1.0 / valid.sum(-1, keepdim=True).double()  # uniform marginals over the real tokens, (b, 1, 1)
    for step in range(1, K + 1):  # oracle: the attention matrix A = P / a of the reference after `step` half-steps
        attn = sinkhorn_plan_reference(q, k, n_iters=step, eps=EPS, attn_mask=mask)
        plan = attn * a.unsqueeze(-1) * valid.unsqueeze(-1)
        row_ref = ((plan.sum(-1) - a) * valid).abs().sum(-1)
        col_ref = ((plan.sum(-2) - a) * valid).abs().sum(-1)
        torch.testing.assert_close(rows[step - 1], row_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(cols[step - 1], col_ref, atol=1e-12, rtol=0)
    exact = torch.where(torch.arange(1, K + 1)[:, None, None] % 2 == 1, rows, cols)
    assert exact.abs().max() < 1e-12  # the marginal of the last half-step is exact
    err = torch.where(torch.arange(1, K + 1)[:, None, None] % 2 == 1, cols, rows)  # the other one converges
    assert (err[1:] <= err[:-1] + 1e-12).all()
    assert (err[-1] < 0.25 * err[0]).all()


def test_tolerance_mode_returns_the_steps_it_ran():
    _, _, _, scores, supp = _problem()
    result, iterates = sinkhorn(scores, n_iters=999, eps=1.0, supp=supp, tol=1e-9, check_every=2, return_iterates=True)
    assert result.n_steps < 999 and iterates.f.shape[0] == iterates.g.shape[0] == result.n_steps
    assert torch.equal(iterates.f[-1], result.f) and torch.equal(iterates.g[-1], result.g)


def test_iterates_carry_gradients():
    scores = torch.randn(1, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    supp = support(None, 5, 5, dtype=torch.float64, device=scores.device)
    _, iterates = sinkhorn(scores, n_iters=4, eps=1.0, supp=supp, return_iterates=True)
    iterates.f.sum().backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
