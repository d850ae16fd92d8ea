"""Diagnostics of an entropic plan: dual objective and marginal errors.

The plan is ``P_ij = exp((S_ij + f_i + g_j) / eps)`` (docs/method.md sec. 1.3, 1.5). It is
the minimiser of ``<C, P> - eps H(P)`` over the transport polytope when its
marginals are ``a`` and ``b``; the corresponding (concave) dual objective is

    D(f, g) = <f, a> + <g, b> - eps * ( sum_ij P_ij - 1 ),

maximised by the Sinkhorn fixed point. Its value at the teacher's duals, and
the marginal errors, tell how converged a teacher is and how good an ASAP
prediction is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asap.transport.masks import Support


def log_plan(scores: Tensor, f: Tensor, g: Tensor, *, eps: float, supp: Support) -> Tensor:
    """``log P (..., n, m)`` with ``-inf`` at masked and padding entries."""
    z = (scores + f.unsqueeze(-1) + g.unsqueeze(-2)) / eps
    if supp.row_bias is not None:
        z = z + supp.row_bias
        # Padding rows were opened in row_bias for finiteness; close them here.
        z = z.masked_fill(~supp.rows.unsqueeze(-1), float("-inf"))
    return z


def dual_objective(scores: Tensor, f: Tensor, g: Tensor, *, eps: float, supp: Support) -> Tensor:
    """Entropic dual objective ``D(f, g)``: ``(...)``."""
    a = supp.zero_rows(supp.log_a.exp().expand_as(f))
    b = supp.zero_cols(supp.log_b.exp().expand_as(g))
    mass = log_plan(scores, f, g, eps=eps, supp=supp).exp().sum(dim=(-1, -2))
    return (f * a).sum(-1) + (g * b).sum(-1) - eps * (mass - 1)


def marginal_errors(scores: Tensor, f: Tensor, g: Tensor, *, eps: float, supp: Support) -> tuple[Tensor, Tensor]:
    """L1 errors ``(sum_i |P 1 - a|_i, sum_j |P^T 1 - b|_j)`` of the plan, each ``(...)``."""
    plan = log_plan(scores, f, g, eps=eps, supp=supp).exp()
    a = supp.zero_rows(supp.log_a.exp().expand_as(f))
    b = supp.zero_cols(supp.log_b.exp().expand_as(g))
    return (plan.sum(-1) - a).abs().sum(-1), (plan.sum(-2) - b).abs().sum(-1)


def attention_column_error(attn: Tensor, *, supp: Support) -> Tensor:
    """L1 column-marginal error of a row-stochastic attention matrix ``A = P / a``: ``(...)``.

    ``P = a * A``; for square unpadded inputs this is ``sum_j |mean_i A_ij - 1/n|``.
    """
    n = attn.shape[-2]
    a = supp.zero_rows(supp.log_a.exp().expand(*attn.shape[:-2], n))
    col = (attn * a.unsqueeze(-1)).sum(-2)
    b = supp.zero_cols(supp.log_b.exp().expand_as(col))
    return (col - b).abs().sum(-1)
