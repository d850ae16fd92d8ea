"""Plain PyTorch references for every attention operator.

Written for clarity, not speed: the full ``(b, h, n, m)`` matrices are
materialised, masks are applied with ``-inf`` and the marginals are spelled out,
sharing no code with the fast paths in :mod:`asap.attention.functional` and
:mod:`asap.attention.esp`. Run in fp64 they are the ground truth of the parity
tests; run in fp16/bf16 they are
"plain PyTorch in the same dtype" for the low-precision rule (a fast path's
error against fp64 must be at most twice the reference's in that dtype).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from asap.attention.checks import default_scale, validate_attention_inputs
from asap.attention.options import EspConventions, Normalize
from asap.transport.masks import valid_rows_cols
from asap.transport.sliced_plans import SliceCost, SortDistance


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




def _north_west_corner(n: int, m: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Dense north-west-corner coupling of ``n`` and ``m`` equal masses (total 1): ``(n, m)``.

    The textbook walk, in integer units of ``1 / (n m)`` (a query holds ``m``
    units, a key ``n``), so it is exact.
    """
    plan = torch.zeros(n, m, dtype=torch.float64)
    left_q, left_k, i, j = m, n, 0, 0
    while i < n and j < m:
        moved = min(left_q, left_k)
        plan[i, j] = moved / (n * m)
        left_q, left_k = left_q - moved, left_k - moved
        if left_q == 0:
            i, left_q = i + 1, m
        if left_k == 0:
            j, left_k = j + 1, n
    return plan.to(dtype=dtype, device=device)


def _dense_sort_matrices(x: Tensor, *, tau_sort: float, distance: SortDistance) -> Tensor:
    """``x (L, n)`` -> sorting matrices ``(L, n_rank, n_token)``: one-hot (``tau_sort = 0``) or SoftSort."""
    values, order = torch.sort(x, dim=-1)
    if tau_sort == 0:
        return torch.nn.functional.one_hot(order, x.shape[-1]).to(x.dtype)
    gap = values.unsqueeze(-1) - x.unsqueeze(-2)
    dist = gap.abs() if distance == "abs" else gap**2
    return torch.softmax(-dist / tau_sort, dim=-1)


def _dense_cost(q: Tensor, k: Tensor, cost: str) -> Tensor:
    if cost == "dot":
        return -(q @ k.T)
    sq = ((q.unsqueeze(1) - k.unsqueeze(0)) ** 2).sum(-1)
    return sq if cost == "sqeuclidean" else sq.sqrt()


def esp_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    directions: Tensor | None = None,
    soft: bool = True,
    tau_sort: float = 1e-3,
    tau: float = 1.0,
    cost: SliceCost | None = None,
    normalize: Normalize | None = None,
    published: bool = False,
) -> Tensor:
    """Dense ESP attention, one sequence and head at a time, computed entirely in the input dtype.

    Same options as :func:`esp_attention` (no memory budget). Materialises
    ``(L, n, m)`` plans per (batch, head) and synchronises with the host: for
    tests on small inputs only.
    """
    mask = validate_attention_inputs(q, k, v, attn_mask=attn_mask, method="esp")
    conv = EspConventions.resolve(cost=cost, normalize=normalize, published=published)
    b, h, n, d = q.shape
    m = k.shape[-2]
    scale = default_scale(scale, d)
    point_scale = scale**conv.points_scale_power
    tau_sort = tau_sort if soft else 0.0
    rows, cols = valid_rows_cols(mask, n, m)
    rows = torch.ones(b, h, n, dtype=torch.bool, device=q.device) if rows is None else rows.expand(b, h, n)
    cols = torch.ones(b, h, m, dtype=torch.bool, device=q.device) if cols is None else cols.expand(b, h, m)
    if directions is None:
        directions = torch.eye(d, dtype=q.dtype, device=q.device)
    directions = directions.to(q.dtype)
    heads_out = []
    for bi in range(b):
        for hi in range(h):
            iq, ik = rows[bi, hi].nonzero().squeeze(-1), cols[bi, hi].nonzero().squeeze(-1)
            out = torch.zeros(n, v.shape[-1], dtype=q.dtype, device=q.device)
            if len(iq) and len(ik):
                qs, ks, vs = q[bi, hi, iq] * point_scale, k[bi, hi, ik] * point_scale, v[bi, hi, ik]
                theta = directions if directions.dim() == 2 else directions[hi]
                u_q = _dense_sort_matrices((qs @ theta.T).T, tau_sort=tau_sort, distance=conv.sort_distance)
                u_k = _dense_sort_matrices((ks @ theta.T).T, tau_sort=tau_sort, distance=conv.sort_distance)
                corner = _north_west_corner(len(iq), len(ik), dtype=q.dtype, device=q.device)
                plans = u_q.transpose(-1, -2) @ corner @ u_k  # (L, n_valid, m_valid)
                costs = (plans * _dense_cost(qs, ks, conv.cost)).sum(dim=(-1, -2))
                if conv.cost_per_token:
                    costs = costs * len(iq)
                weights = torch.softmax(-tau * costs, dim=0)
                plan = (weights[:, None, None] * plans).sum(dim=0)
                if conv.normalize == "row":
                    attention = plan / plan.sum(dim=-1, keepdim=True)
                else:
                    attention = plan * len(iq)
                out = out.index_copy(0, iq, attention @ vs)
            heads_out.append(out)
    return torch.stack(heads_out).reshape(b, h, n, v.shape[-1])
