"""Attention matrices of the teacher, of truncated Sinkhorn and of ASAP, and how far apart they are.

These are analysis functions for calibration and the fidelity report: they
materialise the ``(b, h, n, m)`` score matrix (the fast operators in
:mod:`asap.attention` never do). Everything runs in the reduction dtype
(fp32, or fp64 for fp64 inputs).

Conventions (docs/method.md sec. 1): ``S = scale q k^T``, plan
``P = exp((S + f + g) / eps)``, attention ``A = P / a`` (rows sum to 1).
Log-attentions carry ``-inf`` at masked entries; padding query rows are
returned open (finite) and must be excluded with ``supp.rows``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asap.transport.ctransform import c_transform_cols, reduction_dtype, scaled_logits, warm_start_duals
from asap.transport.masks import Support, support
from asap.transport.sinkhorn import sinkhorn


def as_4d_mask(attn_mask: Tensor | None) -> Tensor | None:
    """A boolean mask broadcastable to ``(b, h, n, m)`` with exactly 4 dims (leading 1s added)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must be boolean (True = attend), got dtype {attn_mask.dtype}")
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask


def scores_and_support(q: Tensor, k: Tensor, *, scale: float, attn_mask: Tensor | None) -> tuple[Tensor, Support]:
    """``S = scale q k^T (b, h, n, m)`` in the reduction dtype, and the :class:`Support` of the mask."""
    rdtype = reduction_dtype(q.dtype)
    scores = (q.to(rdtype) @ k.to(rdtype).transpose(-1, -2)) * scale
    supp = support(as_4d_mask(attn_mask), q.shape[-2], k.shape[-2], dtype=rdtype, device=q.device)
    return scores, supp


def check_closure_teacher(n_iters: int) -> None:
    """ASAP reproduces a K-step teacher through its closure target ``f_{K-2}``, defined for odd ``K >= 3``."""
    if not isinstance(n_iters, int) or n_iters < 3 or n_iters % 2 == 0:
        raise ValueError(
            f"cannot compile a Sinkhorn layer with n_iters={n_iters!r}: ASAP needs an odd number of "
            "half-steps K >= 3 (the final plan is then the closure of f_(K-2); K = 1 is plain softmax)"
        )


def closure_target(scores: Tensor, supp: Support, *, n_iters: int, eps: float) -> Tensor:
    """The teacher's closure target ``f_{K-2} (b, h, n)``, centred over valid queries, zero at padding."""
    check_closure_teacher(n_iters)
    return sinkhorn(scores, n_iters=n_iters, eps=eps, supp=supp).target


def _row_log_softmax(scores: Tensor, g: Tensor, *, eps: float, supp: Support) -> Tensor:
    logits = (scores + g.unsqueeze(-2)) / eps
    if supp.row_bias is not None:
        logits = logits + supp.row_bias
    return torch.log_softmax(logits, dim=-1)


def sinkhorn_log_attention(scores: Tensor, supp: Support, *, n_iters: int, eps: float) -> Tensor:
    """``log A (b, h, n, m)`` of ``K = n_iters`` (odd) half-steps: ``A = softmax((S + g_{K-1}) / eps)``."""
    if n_iters % 2 == 0:
        raise ValueError(f"sinkhorn_log_attention needs an odd n_iters (rows exact), got {n_iters}")
    if n_iters == 1:
        g = scores.new_zeros(scores.shape[:-2] + scores.shape[-1:])
    else:
        g = sinkhorn(scores, n_iters=n_iters, eps=eps, supp=supp).g
    return _row_log_softmax(scores, g, eps=eps, supp=supp)


def asap_log_attention(scores: Tensor, f_hat: Tensor, *, eps: float, supp: Support, extra_steps: int = 0) -> Tensor:
    """``log A (b, h, n, m)`` of ASAP from ``f_hat``: the closure, then ``extra_steps`` more half-steps.

    ``extra_steps = 0``: ``g = ccol(f_hat)``, ``A = softmax((S + g) / eps)``. With
    ``j > 0`` the half-steps of :func:`asap.attention.functional.asap_attention`
    (docs/method.md sec. 4.5, "ASAP as a warm start"): after ``g = ccol(f_hat)``,
    alternately ``f = crow(g)``, ``g = ccol(f)``; even ``j`` ends with the row
    softmax, odd ``j`` with one more column step and ``A = P / a`` (exact columns).
    """
    if extra_steps == 0:
        g = c_transform_cols(scores, supp.zero_rows(f_hat), eps=eps, supp=supp)
        return _row_log_softmax(scores, g, eps=eps, supp=supp)
    row_logits, col_logits = scaled_logits(scores, eps=eps, supp=supp)
    f, g = warm_start_duals(row_logits, col_logits, f_hat, eps=eps, supp=supp, extra_steps=extra_steps)
    if extra_steps % 2 == 0:
        return _row_log_softmax(scores, g, eps=eps, supp=supp)
    # log P - log a (log_plan's values), with padding rows left open like the other log-attentions here
    log_attn = (scores + f.unsqueeze(-1) + g.unsqueeze(-2)) / eps - supp.log_a.unsqueeze(-1)
    return log_attn if supp.row_bias is None else log_attn + supp.row_bias


def _mean_over_rows(x: Tensor, rows: Tensor | None) -> Tensor:
    """``x (b, h, n)`` averaged over valid rows and the batch: ``(h,)``."""
    if rows is None:
        return x.mean(dim=(0, 2))
    w = rows.expand_as(x).to(x.dtype)
    return (x * w).sum(dim=(0, 2)) / w.sum(dim=(0, 2)).clamp(min=1)


def row_kl(teacher_log_attn: Tensor, log_attn: Tensor, *, rows: Tensor | None) -> Tensor:
    """Mean over valid rows of ``KL(A_teacher || A)`` per head: ``(h,)``.

    Masked entries (``-inf`` in both) contribute ``0 log 0 = 0``.
    """
    p = teacher_log_attn.exp()
    diff = torch.where(p > 0, teacher_log_attn - log_attn, torch.zeros((), dtype=p.dtype, device=p.device))
    return _mean_over_rows((p * diff).sum(-1), rows)


def row_total_variation(log_attn_a: Tensor, log_attn_b: Tensor, *, rows: Tensor | None) -> Tensor:
    """Mean over valid rows of ``TV = 1/2 sum_j |A_ij - B_ij|`` per head, in ``[0, 1]``: ``(h,)``."""
    tv = 0.5 * (log_attn_a.exp() - log_attn_b.exp()).abs().sum(-1)
    return _mean_over_rows(tv, rows)


def column_error(log_attn: Tensor, supp: Support) -> Tensor:
    """L1 column-marginal error ``sum_j |sum_i a_i A_ij - b_j|`` per sequence and head: ``(b, h)``.

    0 for an exactly doubly-stochastic plan; at most 2.
    """
    attn = supp.zero_rows(log_attn.exp(), vectors=True)
    n = attn.shape[-2]
    a = supp.zero_rows(supp.log_a.exp().expand(*attn.shape[:-2], n))
    col = (attn * a.unsqueeze(-1)).sum(-2)
    b = supp.zero_cols(supp.log_b.exp().expand_as(col))
    return (col - b).abs().sum(-1)
