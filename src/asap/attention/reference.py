"""Plain PyTorch references for every attention operator.

Written for clarity, not speed: the full ``(b, h, n, m)`` matrices are
materialised, masks are applied with ``-inf`` and the marginals are spelled out,
sharing no code with the fast paths in :mod:`asap.attention.functional`. Run in
fp64 they are the ground truth of the parity tests; run in fp16/bf16 they are
"plain PyTorch in the same dtype" for the low-precision rule (a fast path's
error against fp64 must be at most twice the reference's in that dtype).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _scores_and_support(q: Tensor, k: Tensor, attn_mask: Tensor | None, scale: float | None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = scale * (q @ k.transpose(-1, -2))
    b, h, n, m = scores.shape
    mask = torch.ones(b, h, n, m, dtype=torch.bool, device=q.device)
    if attn_mask is not None:
        mask = mask & attn_mask
    rows = mask.any(-1)  # (b, h, n) valid queries
    cols = mask.any(-2)  # (b, h, m) valid keys
    log_a = -torch.log(rows.sum(-1, keepdim=True).clamp(min=1).to(q.dtype))  # (b, h, 1)
    log_b = -torch.log(cols.sum(-1, keepdim=True).clamp(min=1).to(q.dtype))
    return scores, mask, rows, cols, log_a, log_b


def _masked_lse(z: Tensor, mask: Tensor, dim: int) -> Tensor:
    lse = torch.logsumexp(z.masked_fill(~mask, -math.inf), dim=dim)
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def softmax_attention_reference(q, k, v, *, attn_mask=None, scale=None) -> Tensor:
    """``softmax(scale q k^T) v`` with fully masked rows giving zero."""
    scores, mask, rows, _, _, _ = _scores_and_support(q, k, attn_mask, scale)
    attn = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1).nan_to_num(0.0)
    return (attn @ v) * rows.unsqueeze(-1)


def sinkhorn_duals_reference(q, k, *, n_iters: int, eps: float = 1.0, attn_mask=None, scale=None):
    """All duals of K Sinkhorn half-steps: returns ``(fs, gs)``, lists indexed by step (``fs[k]`` = f_k)."""
    scores, mask, rows, cols, log_a, log_b = _scores_and_support(q, k, attn_mask, scale)
    g = torch.zeros_like(scores[..., 0, :])
    f = torch.zeros_like(scores[..., :, 0])
    fs, gs = {}, {0: g}
    for step in range(1, n_iters + 1):
        if step % 2 == 1:
            f = eps * (log_a - _masked_lse((scores + g.unsqueeze(-2)) / eps, mask, -1)) * rows
            fs[step] = f
        else:
            g = eps * (log_b - _masked_lse((scores + f.unsqueeze(-1)) / eps, mask, -2)) * cols
            gs[step] = g
    return fs, gs


def sinkhorn_plan_reference(q, k, *, n_iters: int, eps: float = 1.0, attn_mask=None, scale=None) -> Tensor:
    """The attention matrix ``A = P / a`` of K half-steps: ``(b, h, n, m)``."""
    scores, mask, rows, _, log_a, _ = _scores_and_support(q, k, attn_mask, scale)
    fs, gs = sinkhorn_duals_reference(q, k, n_iters=n_iters, eps=eps, attn_mask=attn_mask, scale=scale)
    f, g = fs[max(fs)], gs[max(gs)]
    log_p = ((scores + f.unsqueeze(-1) + g.unsqueeze(-2)) / eps).masked_fill(~mask, -math.inf)
    return (log_p - log_a.unsqueeze(-1)).exp() * rows.unsqueeze(-1)


def sinkhorn_attention_reference(q, k, v, *, n_iters: int, eps: float = 1.0, attn_mask=None, scale=None) -> Tensor:
    return sinkhorn_plan_reference(q, k, n_iters=n_iters, eps=eps, attn_mask=attn_mask, scale=scale) @ v


def asap_plan_reference(q, k, f_hat, *, eps: float = 1.0, attn_mask=None, scale=None) -> Tensor:
    """``A`` of the two-sided c-transform of ``f_hat``: ``g = ccol(f_hat)``, ``A = softmax((S + g)/eps)``."""
    scores, mask, rows, cols, _, log_b = _scores_and_support(q, k, attn_mask, scale)
    f_hat = f_hat * rows
    g = eps * (log_b - _masked_lse((scores + f_hat.unsqueeze(-1)) / eps, mask, -2)) * cols
    logits = ((scores + g.unsqueeze(-2)) / eps).masked_fill(~mask, -math.inf)
    return torch.softmax(logits, dim=-1).nan_to_num(0.0) * rows.unsqueeze(-1)


def asap_attention_reference(q, k, v, f_hat, *, eps: float = 1.0, attn_mask=None, scale=None) -> Tensor:
    return asap_plan_reference(q, k, f_hat, eps=eps, attn_mask=attn_mask, scale=scale) @ v
