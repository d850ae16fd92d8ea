"""The closure target reproduces the teacher; analysis plans agree with the fp64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asap.attention.operators import AsapOperator, SinkhornOperator
from asap.attention.reference import (
    asap_plan_reference,
    sinkhorn_attention_reference,
    sinkhorn_duals_reference,
    sinkhorn_plan_reference,
)
from asap.transport.diagnostics import attention_column_error
from asap.compile.plans import (
    asap_log_attention,
    closure_target,
    column_error,
    row_kl,
    row_total_variation,
    scores_and_support,
    sinkhorn_log_attention,
)
from tests.conftest import padding_mask, rand_qkv


class OracleDualMap(nn.Module):
    """A 'perfect' dual map: returns the K-step teacher's f_{K-2}, from the independent fp64 reference."""

    def __init__(self, n_iters: int, eps: float):
        super().__init__()
        self.n_iters, self.eps = n_iters, eps

    def forward(self, q, k, *, scale, attn_mask=None):
        fs, _ = sinkhorn_duals_reference(q, k, n_iters=self.n_iters, eps=self.eps, attn_mask=attn_mask, scale=scale)
        return fs[self.n_iters - 2]


@pytest.mark.parametrize("n_iters,eps", [(3, 1.0), (11, 0.5), (7, 2.0)])
@pytest.mark.parametrize("lengths", [None, (7, 4)])
def test_asap_with_the_exact_target_is_the_teacher(n_iters, eps, lengths):
    q, k, v = rand_qkv(b=2, h=3, n=7, d=4, scale=2.0)
    mask = None if lengths is None else padding_mask(list(lengths), 7)
    asap = AsapOperator(num_heads=3, head_dim=4, eps=eps, dual_map=OracleDualMap(n_iters, eps))
    teacher = sinkhorn_attention_reference(q, k, v, n_iters=n_iters, eps=eps, attn_mask=mask)
    torch.testing.assert_close(asap(q, k, v, attn_mask=mask), teacher, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        SinkhornOperator(n_iters=n_iters, eps=eps)(q, k, v, attn_mask=mask), teacher, rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("lengths", [None, (7, 3)])
def test_closure_target_matches_reference_duals(lengths):
    q, k, _ = rand_qkv(b=2, h=2, n=7, d=4, scale=1.5)
    mask = None if lengths is None else padding_mask(list(lengths), 7)
    scores, supp = scores_and_support(q, k, scale=0.5, attn_mask=mask)
    target = closure_target(scores, supp, n_iters=9, eps=0.7)
    fs, _ = sinkhorn_duals_reference(q, k, n_iters=9, eps=0.7, attn_mask=mask, scale=0.5)
    valid = torch.ones(2, 1, 7, dtype=torch.bool) if mask is None else mask.any(-1)
    expected = fs[7] - (fs[7] * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True)
    torch.testing.assert_close(target, expected * valid, rtol=1e-10, atol=1e-12)
    # The plan of the closure of the target is the teacher's plan.
    torch.testing.assert_close(
        asap_log_attention(scores, target, eps=0.7, supp=supp).exp() * valid.unsqueeze(-1),
        sinkhorn_plan_reference(q, k, n_iters=9, eps=0.7, attn_mask=mask, scale=0.5),
        rtol=1e-10, atol=1e-12,
    )  # fmt: skip


def test_plans_match_references_and_distances_behave():
    q, k, _ = rand_qkv(b=2, h=2, n=6, d=3, scale=2.0)
    mask = padding_mask([6, 4], 6)
    scores, supp = scores_and_support(q, k, scale=1.0, attn_mask=mask)
    teacher = sinkhorn_log_attention(scores, supp, n_iters=5, eps=1.0)
    rows = mask.any(-1).unsqueeze(-1)
    ref = sinkhorn_plan_reference(q, k, n_iters=5, eps=1.0, attn_mask=mask, scale=1.0)
    torch.testing.assert_close(teacher.exp() * rows, ref)
    f_hat = torch.randn(2, 2, 6, dtype=torch.float64)
    asap = asap_log_attention(scores, f_hat, eps=1.0, supp=supp)
    torch.testing.assert_close(asap.exp() * rows, asap_plan_reference(q, k, f_hat, eps=1.0, attn_mask=mask, scale=1.0))
    assert torch.allclose(row_kl(teacher, teacher, rows=supp.rows), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(row_total_variation(teacher, teacher, rows=supp.rows), torch.zeros(2, dtype=torch.float64))
    kl, tv = row_kl(teacher, asap, rows=supp.rows), row_total_variation(teacher, asap, rows=supp.rows)
    assert (kl > 0).all() and (tv > 0).all() and (tv <= 1).all()
    assert (tv <= torch.sqrt(kl / 2) + 1e-12).all()  # Pinsker's inequality (per row, so also on average by Jensen)
    # Column error: the transport diagnostics' formula, and Sinkhorn converging as K grows.
    torch.testing.assert_close(column_error(teacher, supp), attention_column_error(teacher.exp() * rows, supp=supp))
    many = sinkhorn_log_attention(scores, supp, n_iters=201, eps=1.0)
    few = sinkhorn_log_attention(scores, supp, n_iters=3, eps=1.0)
    assert column_error(many, supp).max() < 1e-2 * column_error(few, supp).max()


@pytest.mark.parametrize("n_iters", [1, 4])
def test_teachers_without_a_closure_target_are_refused(n_iters):
    q, k, _ = rand_qkv()
    scores, supp = scores_and_support(q, k, scale=1.0, attn_mask=None)
    with pytest.raises(ValueError, match="odd number of half-steps K >= 3"):
        closure_target(scores, supp, n_iters=n_iters, eps=1.0)


@pytest.mark.parametrize("extra_steps", [0, 1, 2, 3])
@pytest.mark.parametrize("lengths", [None, (7, 4)])
def test_asap_log_attention_with_extra_steps_is_the_operators_attention(extra_steps, lengths):
    """The analysis plan of ASAP + j half-steps (what target_tv scores) is the production operator's attention."""
    from asap.attention.functional import asap_attention

    q, k, _ = rand_qkv(b=2, h=2, n=7, d=4)
    mask = None if lengths is None else padding_mask(list(lengths), 7)
    f_hat = torch.randn(2, 2, 7, dtype=torch.float64)
    scores, supp = scores_and_support(q, k, scale=0.5, attn_mask=mask)
    ours = asap_log_attention(scores, f_hat, eps=0.7, supp=supp, extra_steps=extra_steps).exp()
    eye = torch.eye(7, dtype=torch.float64).expand(2, 2, 7, 7)
    theirs = asap_attention(q, k, eye, f_hat, eps=0.7, scale=0.5, attn_mask=mask, extra_steps=extra_steps)
    rows = torch.ones(2, 2, 7, dtype=torch.bool) if mask is None else supp.rows.expand(2, 2, 7)
    torch.testing.assert_close(ours[rows], theirs[rows], rtol=0, atol=1e-12)
    # from the K-step teacher's closure target, j more half-steps (j even: ending with a row step) are the K+j teacher
    target = closure_target(scores, supp, n_iters=3, eps=0.7)
    warm = asap_log_attention(scores, target, eps=0.7, supp=supp, extra_steps=extra_steps)
    if extra_steps % 2 == 0:
        teacher = sinkhorn_log_attention(scores, supp, n_iters=3 + extra_steps, eps=0.7)
        torch.testing.assert_close(warm.exp()[rows], teacher.exp()[rows], rtol=0, atol=1e-12)
        assert float(row_total_variation(teacher, warm, rows=supp.rows).max()) < 1e-12
    assert torch.isfinite(row_kl(warm, warm, rows=supp.rows)).all()
