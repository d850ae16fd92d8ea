"""Sliced transport plans: one 1-D optimal plan per slice, soft or exact (ESPFormer, docs/method.md sec. 5).

For a slice direction ``theta_l`` the queries and keys project to the lines
``x = q theta_l`` (``n`` points) and ``y = k theta_l`` (``m`` points). In one
dimension the optimal plan between two uniform measures, for any convex cost
of ``x - y``, is the *monotone* coupling: sort both point sets and match them
quantile by quantile. Written with sorting matrices (``P[r, i] = 1`` when
token ``i`` has rank ``r``) and the coupling ``W`` of the ranks::

    pi_l = P_q^T W P_k                                   (n x m, total mass 1)

* ``n = m`` (no padding): ``W = I / n``, so ``pi_l = (1/n) P_q^T P_k``.
* ``n != m`` or padding: ``W`` is the north-west-corner (quantile) coupling of
  ``n_valid`` and ``m_valid`` equal masses: rank ``r`` covers the quantile
  interval ``[r/n_valid, (r+1)/n_valid)``, rank ``s`` covers
  ``[s/m_valid, (s+1)/m_valid)``, and ``W[r, s]`` is the length of their
  overlap. It has at most ``n + m - 1`` non-zeros, stored as a list of
  segments (:class:`QuantileCoupling`), never as a dense matrix.

**Soft sorting** (SoftSort, Prillo & Eisenschlos, ICML 2020) replaces ``P`` by
the row-stochastic ``U``::

    U[r, i] = softmax_i( -dist(sort(x)_r, x_i) / tau_sort ),   dist = |.| or (.)^2

over valid tokens ``i``; ``sort(x)`` is ascending with padding last. As
``tau_sort -> 0``, ``U -> P`` (for distinct ``x``). The soft plan
``U_q^T W U_k`` is then close to, but not exactly, a coupling: its column sums
are exact only in the limit. ``dist = |.|`` is SoftSort's default;
ESPFormer's published code uses the squared distance.

**Hard sorting** keeps ``P`` as indices (``order``: token at each rank,
``rank``: rank of each token); applying it is a gather, so a hard slice costs
``O(n d)`` memory instead of ``O(n^2)``.

Every function here takes leading batch dims ``...`` (``b h``, or one
flattened group dim) and a slice dim ``L``; a point set shared by all slices
(``q (..., n, d)``) broadcasts over ``L``.

References: Prillo & Eisenschlos, "SoftSort: A Continuous Relaxation for the
argsort Operator", ICML 2020; Liu et al., "Expected Sliced Transport Plans",
ICLR 2025; Shahbazi et al., "ESPFormer", ICML 2025 (arXiv 2502.07962);
Peyre & Cuturi, "Computational Optimal Transport", 2019, sec. 2.6 (1-D OT).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

SortDistance = Literal["abs", "squared"]
SliceCost = Literal["dot", "sqeuclidean", "euclidean"]
SORT_DISTANCES: tuple[str, ...] = ("abs", "squared")
SLICE_COSTS: tuple[str, ...] = ("dot", "sqeuclidean", "euclidean")


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """Rows of ``x (..., n, c)`` at ``index (..., K)`` -> ``(..., K, c)``; leading dims broadcast."""
    lead = torch.broadcast_shapes(x.shape[:-2], index.shape[:-1])
    x = x.expand(*lead, *x.shape[-2:])
    index = index.expand(*lead, index.shape[-1])
    return x.gather(-2, index.unsqueeze(-1).expand(*lead, index.shape[-1], x.shape[-1]))


def _masked_softmax(logits: Tensor, valid: Tensor | None) -> Tensor:
    """Softmax over the last dim restricted to ``valid`` entries; an all-invalid row gives zeros.

    Invalid entries are excluded with ``-inf`` *before* the exponential (never a
    finite sentinel), and the shift is taken over valid entries only, so that
    neither the forward nor the backward pass can produce NaN or overflow.
    """
    if valid is None:
        return logits.softmax(dim=-1)
    masked = torch.where(valid, logits, torch.full((), float("-inf"), dtype=logits.dtype, device=logits.device))
    peak = masked.amax(dim=-1, keepdim=True).detach()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros((), dtype=peak.dtype, device=peak.device))
    weights = torch.exp(masked - peak)
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


class SlicePermutations(NamedTuple):
    """Sorting operators of ``L`` one-dimensional point sets of ``n`` tokens.

    order: ``(..., L, n)`` long, the token at each rank (valid tokens ascending, padding last).
    rank: ``(..., L, n)`` long, the rank of each token (inverse of ``order``).
    soft: ``(..., L, n, n)`` soft permutation ``U[r, i]`` (rows sum to 1), or
        ``None`` for an exact sort, which is never stored densely.
    """

    order: Tensor
    rank: Tensor
    soft: Tensor | None

    def sort_rows(self, x: Tensor) -> Tensor:
        """``U x``: token-indexed ``x (..., n, c)`` (shared by slices) -> rank-indexed ``(..., L, n, c)``."""
        if self.soft is None:
            return _gather_rows(x.unsqueeze(-3), self.order)
        return self.soft @ x.unsqueeze(-3)

    def unsort_rows(self, z: Tensor) -> Tensor:
        """``U^T z``: rank-indexed ``z (..., L, n, c)`` -> token-indexed ``(..., L, n, c)``."""
        if self.soft is None:
            return _gather_rows(z, self.rank)
        return self.soft.transpose(-1, -2) @ z


def sort_slices(x: Tensor, *, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Ascending ``order`` and inverse ``rank`` of ``x (..., L, n)``, padding (``valid (..., n)`` False) last.

    Padding is pushed to the end through the sort *key* only (``+inf``); no
    sentinel ever enters arithmetic.
    """
    if valid is not None:
        x = torch.where(valid.unsqueeze(-2), x, torch.full((), float("inf"), dtype=x.dtype, device=x.device))
    order = torch.sort(x, dim=-1, stable=True).indices
    positions = torch.arange(x.shape[-1], device=x.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return order, rank


def hard_sort(x: Tensor, *, valid: Tensor | None = None) -> SlicePermutations:
    """Exact sorting of ``x (..., L, n)`` as indices (no ``n x n`` tensor)."""
    order, rank = sort_slices(x, valid=valid)
    return SlicePermutations(order, rank, None)


def soft_sort(
    x: Tensor,
    *,
    tau_sort: float,
    valid: Tensor | None = None,
    distance: SortDistance = "abs",
) -> SlicePermutations:
    """SoftSort of ``x (..., L, n)``: ``U[r, i] = softmax_i(-dist(sort(x)_r, x_i) / tau_sort)``.

    Args:
        x: projected points, one row per slice. Computed in ``x.dtype``: pass fp32/fp64.
        tau_sort: temperature > 0; smaller is closer to the exact sort (and has smaller gradients).
        valid: ``(..., n)`` bool, True = real token. Padding tokens get no mass in
            any row; rows of padding ranks (``r >= n_valid``) are kept but carry
            no mass in any coupling.
        distance: ``"abs"`` (SoftSort's default) or ``"squared"`` (ESPFormer's published code).

    Returns:
        :class:`SlicePermutations` with ``soft (..., L, n, n)``. The sorted
        values are differentiable (as in SoftSort), so gradients reach ``x``
        through both the anchors ``sort(x)_r`` and the points ``x_i``.
    """
    if not tau_sort > 0:
        raise ValueError(f"soft_sort: tau_sort must be > 0 (use hard_sort for an exact sort), got {tau_sort!r}")
    if distance not in SORT_DISTANCES:
        raise ValueError(f"soft_sort: distance must be one of {SORT_DISTANCES}, got {distance!r}")
    order, rank = sort_slices(x, valid=valid)
    anchors = x.gather(-1, order)  # sort(x), padding last
    gap = anchors.unsqueeze(-1) - x.unsqueeze(-2)  # (..., L, n_rank, n_token)
    dist = gap.abs() if distance == "abs" else gap.square()
    column_valid = None if valid is None else valid.unsqueeze(-2).unsqueeze(-2)
    return SlicePermutations(order, rank, _masked_softmax(-dist / tau_sort, column_valid))


class QuantileCoupling(NamedTuple):
    """North-west-corner coupling ``W`` of ``n_valid`` query ranks and ``m_valid`` key ranks, as segments.

    Segment ``t`` couples query rank ``rows[t]`` with key rank ``cols[t]`` with
    mass ``mass[t]``; ``rows``/``cols``/``mass`` are ``(..., K)``, ``K = n + m - 1``
    (``K = n`` for the square, unpadded case). Unused segments have zero mass
    and in-range indices. ``rank_mass (..., n)`` is the row marginal of ``W``
    in rank order: ``1 / n_valid`` for ``r < n_valid``, else 0.
    """

    rows: Tensor
    cols: Tensor
    mass: Tensor
    rank_mass: Tensor

    def couple(self, y: Tensor) -> Tensor:
        """``W y``: key-rank-indexed ``y (..., L, m, c)`` -> query-rank-indexed ``(..., L, n, c)``."""
        picked = _gather_rows(y, self.cols.unsqueeze(-2)) * self.mass.unsqueeze(-2).unsqueeze(-1)
        index = self.rows.unsqueeze(-2).unsqueeze(-1).expand_as(picked)
        n = self.rank_mass.shape[-1]
        out = torch.zeros(*picked.shape[:-2], n, picked.shape[-1], dtype=y.dtype, device=y.device)
        return out.scatter_add(-2, index, picked)


def quantile_coupling(
    n: int,
    m: int,
    *,
    valid_q: Tensor | None = None,
    valid_k: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> QuantileCoupling:
    """The quantile coupling of ``n_valid`` and ``m_valid`` uniform masses on sorted ranks.

    Rank boundaries are compared exactly in integers: on the common scale
    ``[0, n_valid m_valid]`` query rank ``r`` covers ``[r m_valid, (r+1) m_valid]``
    and key rank ``s`` covers ``[s n_valid, (s+1) n_valid]``. Merging the
    ``n - 1 + m - 1`` inner boundaries (those beyond the valid counts are moved
    to the end, giving zero-length segments) cuts ``[0, n_valid m_valid]`` into
    ``n + m - 1`` segments, each inside one query rank and one key rank.

    Args:
        n, m: padded lengths. valid_q ``(..., n)`` / valid_k ``(..., m)``: bool, True = real token.

    Returns:
        :class:`QuantileCoupling` with leading dims of the masks (none without masks).
    """
    if valid_q is None and valid_k is None and n == m:
        ranks = torch.arange(n, device=device)
        mass = torch.full((n,), 1.0 / n, dtype=dtype, device=device)
        return QuantileCoupling(ranks, ranks, mass, mass)
    if device is None and (valid_q is not None or valid_k is not None):
        device = (valid_q if valid_q is not None else valid_k).device
    n_valid = torch.full((1,), n, device=device) if valid_q is None else valid_q.sum(dim=-1, keepdim=True)
    m_valid = torch.full((1,), m, device=device) if valid_k is None else valid_k.sum(dim=-1, keepdim=True)
    n_valid, m_valid = torch.broadcast_tensors(n_valid, m_valid)  # (..., 1)
    total = n_valid * m_valid
    r = torch.arange(1, n, device=device)
    s = torch.arange(1, m, device=device)
    row_bounds = torch.where(r < n_valid, r * m_valid, total)
    col_bounds = torch.where(s < m_valid, s * n_valid, total)
    inner = torch.sort(torch.cat([row_bounds, col_bounds], dim=-1), dim=-1).values
    starts = torch.cat([torch.zeros_like(total), inner], dim=-1)
    ends = torch.cat([inner, total], dim=-1)
    rows = (starts // m_valid.clamp_min(1)).clamp(max=n - 1)
    cols = (starts // n_valid.clamp_min(1)).clamp(max=m - 1)
    mass = (ends - starts).to(dtype) / total.clamp_min(1).to(dtype)
    ranks = torch.arange(n, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    rank_mass = torch.where(ranks < n_valid, 1.0 / n_valid.clamp_min(1).to(dtype), zero)
    return QuantileCoupling(rows, cols, mass, rank_mass)


def slice_plans_apply(
    perm_q: SlicePermutations, perm_k: SlicePermutations, coupling: QuantileCoupling, v: Tensor
) -> tuple[Tensor, Tensor]:
    """Apply every slice plan to the values without forming it: ``pi_l v`` and ``pi_l 1``.

    Args:
        v: ``(..., m, dv)`` values, token order, shared by slices.

    Returns:
        ``plan_v (..., L, n, dv) = U_q^T W U_k v`` and ``row_mass (..., L, n) = U_q^T W 1``
        (``= 1/n_valid`` at every valid query for an exact sort).
    """
    plan_v = perm_q.unsort_rows(coupling.couple(perm_k.sort_rows(v)))
    row_mass = perm_q.unsort_rows(coupling.rank_mass.unsqueeze(-2).unsqueeze(-1)).squeeze(-1)
    return plan_v, row_mass


def slice_costs(
    perm_q: SlicePermutations,
    perm_k: SlicePermutations,
    coupling: QuantileCoupling,
    q: Tensor,
    k: Tensor,
    *,
    cost: SliceCost,
) -> Tensor:
    """Transport cost of every slice plan under the full ``n x m`` cost: ``<pi_l, C>``, shape ``(..., L)``.

    ``q (..., n, d)``, ``k (..., m, d)`` are the points the plans move (the same
    ones whose projections were sorted). Costs:

    * ``"dot"``: ``C_ij = -<q_i, k_j>`` (the cost of the rest of this library when ``q, k`` are
      scaled by ``sqrt(scale)``);
    * ``"sqeuclidean"``: ``||q_i - k_j||^2``; for plans with exact marginals it
      equals ``2 x "dot"`` plus a constant, which cancels in the slice weights;
    * ``"euclidean"``: ``||q_i - k_j||`` (ESPFormer's published code).

    ``"dot"`` and ``"sqeuclidean"`` factor through the sorted points, so they
    cost ``O(L (n + m) d)`` after sorting. ``"euclidean"`` does not factor: with
    soft sorting it needs ``U_q C`` (``O(L n^2 m)``); with hard sorting it is a
    gather of matched pairs.
    """
    if cost not in SLICE_COSTS:
        raise ValueError(f"slice_costs: cost must be one of {SLICE_COSTS}, got {cost!r}")
    hard = perm_q.soft is None
    rows, cols = coupling.rows.unsqueeze(-2), coupling.cols.unsqueeze(-2)  # (..., 1, K): shared by slices
    mass = coupling.mass.unsqueeze(-2)
    if cost == "euclidean" and not hard:
        full = torch.cdist(q, k)  # (..., n, m)
        q_side = _gather_rows(perm_q.soft @ full.unsqueeze(-3), rows)  # (U_q C)[rows_t]: (..., L, K, m)
        k_side = _gather_rows(perm_k.soft, cols)  # U_k[cols_t]
        return (mass * (q_side * k_side).sum(dim=-1)).sum(dim=-1)
    q_t = _gather_rows(perm_q.sort_rows(q), rows)  # (..., L, K, d)
    k_t = _gather_rows(perm_k.sort_rows(k), cols)
    if cost == "dot":
        pair_cost = -(q_t * k_t).sum(dim=-1)
    elif hard and cost == "sqeuclidean":
        pair_cost = (q_t - k_t).square().sum(dim=-1)
    elif hard:  # euclidean; vector_norm has a zero (not NaN) gradient at coincident points
        pair_cost = torch.linalg.vector_norm(q_t - k_t, dim=-1)
    else:  # soft sqeuclidean: <pi, |q|^2> + <pi, |k|^2> - 2 <pi, q k^T>, each through the sorted points
        q_sq = _gather_rows(perm_q.sort_rows(q.square().sum(dim=-1, keepdim=True)), rows).squeeze(-1)
        k_sq = _gather_rows(perm_k.sort_rows(k.square().sum(dim=-1, keepdim=True)), cols).squeeze(-1)
        pair_cost = q_sq + k_sq - 2 * (q_t * k_t).sum(dim=-1)
    return (mass * pair_cost).sum(dim=-1)


def dense_slice_plans(perm_q: SlicePermutations, perm_k: SlicePermutations, coupling: QuantileCoupling) -> Tensor:
    """Materialise every slice plan ``pi_l = U_q^T W U_k``: ``(..., L, n, m)``. For inspection and tests only.

    ``O(L n m)`` memory: attention never calls this.
    """
    n, m = perm_q.order.shape[-1], perm_k.order.shape[-1]
    dtype = coupling.mass.dtype

    def dense(perm: SlicePermutations, size: int) -> Tensor:
        if perm.soft is not None:
            return perm.soft
        return torch.nn.functional.one_hot(perm.order, size).to(dtype)  # P[r, order[r]] = 1

    lead = torch.broadcast_shapes(coupling.rows.shape[:-1], coupling.cols.shape[:-1])
    w = torch.zeros(*lead, n * m, dtype=dtype, device=coupling.mass.device)
    w = w.scatter_add(-1, (coupling.rows * m + coupling.cols).expand(*lead, -1), coupling.mass.expand(*lead, -1))
    w = w.view(*lead, n, m).unsqueeze(-3)
    return dense(perm_q, n).transpose(-1, -2) @ w @ dense(perm_k, m)
