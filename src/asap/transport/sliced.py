"""Exact one-dimensional Kantorovich potentials on many slices at once (docs/method.md sec. 3).

For a unit direction ``theta`` project ``x_i = scale <theta, q_i>`` and
``y_j = <theta, k_j>``. The 1-D cost ``c(x, y) = -x y`` is submodular, so the
optimal plan between two uniform measures is the monotone (north-west corner)
coupling of the sorted points. With ``n`` valid queries and ``m`` valid keys,
in sorted order (ranks ``r = 0..n-1``, ``s = 0..m-1``):

* the query potential grows along the sorted queries with slope ``-y`` of the
  key matched at each quantile boundary (the envelope theorem,
  ``f'(x) = d c / d x = -T(x)``)::

      f_(0) = 0,   f_(r+1) = f_(r) - y_(j(r)) (x_(r+1) - x_(r)),   j(r) = ceil((r+1) m / n) - 1

* each key potential is tight against the first query it is matched to::

      g_(s) = -x_(i(s)) y_(s) - f_(i(s)),   i(s) = floor(s n / m)

For ``n = m`` this is ``j(r) = r``, ``i(s) = s``: the pairing of the r-th
smallest x with the r-th smallest y. The pair is feasible
(``f_i + g_j <= c(x_i, y_j)`` everywhere), tight on the support of the monotone
plan, and ``mean(f) + mean(g)`` is the exact 1-D transport cost. Cost: one sort
per side and one cumulative sum per slice, ``O(L (n log n + m log m))``, no
``n x m`` tensor.

Padding tokens (``x_valid`` / ``y_valid`` False) are sorted to the end, carry no
mass and get zero potentials. ``f`` is centred over valid queries and ``g``
shifted by the opposite constant, so every ``f_i + g_j`` is unchanged.

Reference: Santambrogio, "Optimal Transport for Applied Mathematicians", 2015,
ch. 2 (1-D transport); Peyre & Cuturi, "Computational Optimal Transport",
2019, sec. 2.6 and 3.4.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def project(q: Tensor, k: Tensor, directions: Tensor, *, scale: float) -> tuple[Tensor, Tensor]:
    """Project queries and keys on slice directions.

    Args:
        q: ``(b, h, n, d)``; k: ``(b, h, m, d)``.
        directions: unit vectors ``(L, d)`` shared by all heads, or ``(h, L, d)`` per head.
        scale: the attention scale, applied on the query side as in ``S = scale q k^T``.

    Returns:
        ``x (b, h, L, n)`` and ``y (b, h, L, m)``.
    """
    if directions.dim() == 2:
        directions = directions.unsqueeze(0)
    # (h, L, d) @ (b, h, d, n) gives (b, h, L, n) with the token dim contiguous: the
    # sorts, gathers and cumulative sums that follow all run along it.
    directions = directions.to(q.dtype)
    x = torch.matmul(directions * scale, q.transpose(-1, -2))
    y = torch.matmul(directions, k.transpose(-1, -2))
    return x, y


def argsort_last(x: Tensor) -> Tensor:
    """``torch.argsort(x, dim=-1)`` (int64), with a CPU fast path.

    On CPU, outside ``torch.compile``, the permutation comes from NumPy's
    vectorised argsort, 10-25x faster than ``torch.sort`` on the many short
    rows sorted here (``b h L`` rows of ``n``); a permutation carries no
    gradient, so nothing is lost. Ties may come out in another order than
    ``torch.sort``'s: the sorted values and the query potentials do not change
    (a tie is a zero step), and the potentials of exactly tied keys are another
    optimal dual pair.
    """
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling():
        values = x.detach().numpy()
        if x.dtype == torch.float32 and PACKED_ARGSORT_MIN_N <= x.shape[-1] <= _PACKED_INDEX_MASK:
            return torch.from_numpy(_packed_argsort_f32(values))
        return torch.from_numpy(np.argsort(values, axis=-1)).to(torch.int64)
    return torch.sort(x, dim=-1).indices


#: Shortest fp32 rows argsorted by :func:`_packed_argsort_f32` instead of ``np.argsort``. Measured on the
#: 2-core AVX-512 CPU (1024 rows, NumPy 2.4): ``np.argsort`` of fp32 leaves its vectorised path above 128
#: elements (0.58 ms at n = 128, 9.4 ms at 256, 31 ms at 512, 63 ms at 1024), the packed sort takes
#: 14 ms at 512 and 53 ms at 1024 (and is not faster at n <= 128).
PACKED_ARGSORT_MIN_N = 256
_PACKED_INDEX_BITS = 29  # fp64 has 29 more mantissa bits than fp32: room for the index
_PACKED_INDEX_MASK = (1 << _PACKED_INDEX_BITS) - 1
_PACKED_BIG = 2.0**1000  # a finite stand-in for +-inf/NaN whose low mantissa bits are zero


def _packed_argsort_f32(x: np.ndarray) -> np.ndarray:
    """``argsort`` of fp32 rows as one value sort of fp64 keys carrying the index in their low bits.

    Widening fp32 to fp64 is exact and leaves the 29 low mantissa bits zero; writing the
    index there moves a value by less than half an fp32 ulp, so the order of distinct
    values is kept (ties come out by index for positive values, reversed for negative
    ones: both valid sorts). The value sort is vectorised where ``np.argsort`` is not.
    Infinities and NaN (which would turn into NaN and lose the index) become +-2^1000 first.
    """
    keys = x.astype(np.float64)
    np.nan_to_num(keys, copy=False, nan=_PACKED_BIG, posinf=_PACKED_BIG, neginf=-_PACKED_BIG)
    bits = keys.view(np.int64)
    bits |= np.arange(x.shape[-1], dtype=np.int64)
    keys.sort(axis=-1)
    bits &= _PACKED_INDEX_MASK
    return bits


def sort_values_last(x: Tensor) -> Tensor:
    """The sorted values of ``x`` along the last dim, without the permutation when nothing needs it.

    On CPU without autograd this is one ``np.sort`` (no index array, no gather);
    otherwise the values are gathered through :func:`argsort_last` so that gradients flow.
    """
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not needs_grad and not torch.compiler.is_compiling():
        return torch.from_numpy(np.sort(x.detach().numpy(), axis=-1))
    return torch.gather(x, -1, argsort_last(x))


def argsort_and_sort_last(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(argsort_last(x), sort_values_last(y))``: what the fused dual map needs of the two projections.

    Splitting the rows of the NumPy sorts over two threads was measured and
    gained nothing on a 2-core CPU (scripts/bench_asap_paths.py), so both sorts
    run in the calling thread.
    """
    return argsort_last(x), sort_values_last(y)


def sort_last(x: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.sort(x, dim=-1)`` through :func:`argsort_last`; the values are gathered, so autograd flows."""
    perm = argsort_last(x)
    return torch.gather(x, -1, perm), perm


def _sorted_valid(x: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Sort the last dim with padding last; returns (values with pads zeroed, permutation, sorted validity)."""
    if valid is None:
        values, perm = sort_last(x)
        return values, perm, None
    valid = valid.unsqueeze(-2).expand_as(x)
    key = torch.where(valid, x, torch.full_like(x, float("inf")))
    perm = argsort_last(key)
    valid_sorted = torch.gather(valid, -1, perm)
    # Gather from x (not key) so gradients flow; zero the pads so no inf enters arithmetic.
    values = torch.where(valid_sorted, torch.gather(x, -1, perm), torch.zeros((), dtype=x.dtype, device=x.device))
    return values, perm, valid_sorted


def _potentials_equal_unpadded(x: Tensor, y: Tensor, *, with_keys: bool) -> tuple[Tensor, Tensor | None]:
    """Fast path for ``n = m`` and no padding: the matching is rank to rank, no index arithmetic."""
    xs, x_perm = sort_last(x)
    ys, y_perm = sort_last(y)
    step = -ys * torch.diff(xs, dim=-1, append=xs[..., -1:])  # the last step is 0
    f_sorted = torch.cumsum(step, dim=-1) - step
    f_mean = f_sorted.mean(dim=-1, keepdim=True)
    f = torch.empty_like(f_sorted).scatter_(-1, x_perm, f_sorted - f_mean)
    if not with_keys:
        return f, None
    g_sorted = -xs * ys - f_sorted + f_mean
    return f, torch.empty_like(g_sorted).scatter_(-1, y_perm, g_sorted)


def query_potentials_1d(
    x: Tensor, y: Tensor, *, x_valid: Tensor | None = None, y_valid: Tensor | None = None
) -> Tensor:
    """Only the query side ``f (..., L, n)`` of :func:`kantorovich_potentials_1d` (the ASAP features)."""
    if x_valid is None and y_valid is None and x.shape[-1] == y.shape[-1]:
        return _potentials_equal_unpadded(x, y, with_keys=False)[0]
    return kantorovich_potentials_1d(x, y, x_valid=x_valid, y_valid=y_valid)[0]


def kantorovich_potentials_1d(
    x: Tensor,
    y: Tensor,
    *,
    x_valid: Tensor | None = None,
    y_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact dual potentials of the 1-D problems with cost ``-x y`` and uniform weights.

    Args:
        x: ``(..., L, n)`` projected (scaled) queries; y: ``(..., L, m)`` projected keys.
        x_valid: ``(..., n)`` bool, True = real query (shared by all slices); likewise ``y_valid (..., m)``.

    Returns:
        ``f (..., L, n)`` and ``g (..., L, m)`` in token order; ``f`` centred over
        valid queries; zero at padding.
    """
    n, m = x.shape[-1], y.shape[-1]
    if x_valid is None and y_valid is None and n == m:
        return _potentials_equal_unpadded(x, y, with_keys=True)
    xs, x_perm, x_valid_sorted = _sorted_valid(x, x_valid)
    ys, y_perm, y_valid_sorted = _sorted_valid(y, y_valid)
    index_dtype = torch.int64
    r = torch.arange(n, device=x.device, dtype=index_dtype)
    s = torch.arange(m, device=x.device, dtype=index_dtype)
    if x_valid is None:
        n_valid = torch.full((1, 1), n, device=x.device, dtype=index_dtype)
    else:
        n_valid = x_valid.sum(dim=-1, keepdim=True).unsqueeze(-1).clamp(min=1)  # (..., 1, 1)
    if y_valid is None:
        m_valid = torch.full((1, 1), m, device=x.device, dtype=index_dtype)
    else:
        m_valid = y_valid.sum(dim=-1, keepdim=True).unsqueeze(-1).clamp(min=1)

    # Query side: slope -y at each quantile boundary between consecutive sorted queries.
    corner_key = (((r + 1) * m_valid + n_valid - 1) // n_valid - 1).clamp(0, m - 1)  # ceil((r+1) m / n) - 1
    corner_key = corner_key.expand(*xs.shape[:-1], n)
    y_at_corner = torch.gather(ys, -1, corner_key)
    dx = torch.diff(xs, dim=-1, append=xs[..., -1:])  # dx_(r) = x_(r+1) - x_(r); last one is 0
    step = -y_at_corner * dx
    step = torch.where(r < n_valid - 1, step, torch.zeros((), dtype=step.dtype, device=step.device))
    f_sorted = torch.cumsum(step, dim=-1) - step  # exclusive cumulative sum: f_(0) = 0

    # Key side: tight against the first query matched to each key.
    first_query = (s * n_valid // m_valid).clamp(0, n - 1).expand(*ys.shape[:-1], m)
    g_sorted = -torch.gather(xs, -1, first_query) * ys - torch.gather(f_sorted, -1, first_query)

    if x_valid_sorted is not None:
        f_sorted = torch.where(x_valid_sorted, f_sorted, torch.zeros((), dtype=f_sorted.dtype, device=f_sorted.device))
    if y_valid_sorted is not None:
        g_sorted = torch.where(y_valid_sorted, g_sorted, torch.zeros((), dtype=g_sorted.dtype, device=g_sorted.device))

    # Centre f over valid queries; shift g the other way so f_i + g_j is unchanged.
    f_mean = f_sorted.sum(dim=-1, keepdim=True) / n_valid.to(f_sorted.dtype)
    f_sorted = f_sorted - f_mean
    g_sorted = g_sorted + f_mean
    if x_valid_sorted is not None:
        f_sorted = torch.where(x_valid_sorted, f_sorted, torch.zeros((), dtype=f_sorted.dtype, device=f_sorted.device))
    if y_valid_sorted is not None:
        g_sorted = torch.where(y_valid_sorted, g_sorted, torch.zeros((), dtype=g_sorted.dtype, device=g_sorted.device))

    f = torch.empty_like(f_sorted).scatter_(-1, x_perm, f_sorted)
    g = torch.empty_like(g_sorted).scatter_(-1, y_perm, g_sorted)
    return f, g


def transport_cost_1d(
    f: Tensor, g: Tensor, *, x_valid: Tensor | None = None, y_valid: Tensor | None = None
) -> Tensor:
    """Dual objective ``sum_i a_i f_i + sum_j b_j g_j`` (= the 1-D transport cost at optimality): ``(..., L)``."""

    def mean(t: Tensor, valid: Tensor | None) -> Tensor:
        if valid is None:
            return t.mean(dim=-1)
        w = valid.unsqueeze(-2).to(t.dtype)
        return (t * w).sum(dim=-1) / w.sum(dim=-1).clamp(min=1)

    return mean(f, x_valid) + mean(g, y_valid)
