"""ESP attention (ESPFormer): doubly-stochastic attention from expected sliced transport plans.

Per slice ``l`` (direction ``theta_l``; by default each of the ``d`` coordinate
axes, ``L = d``) the queries and keys are sorted along the line and matched by
quantile, giving a 1-D optimal plan ``pi_l`` (``n x m``, mass 1; soft or exact
sorting, see :mod:`asap.transport.sliced_plans`). Each slice plan is scored by
its transport cost under the *full* ``n x m`` cost ``C`` and the plans are
mixed with a softmax over slices::

    cost_l = <pi_l, C>                 w = softmax_l(-tau * cost_l)
    pi = sum_l w_l pi_l                A = pi / a   (a_i = 1/n_valid)      out = A @ v

With exact sorting every ``pi_l`` has uniform marginals, so ``A`` has rows
(and, square and unpadded, columns) summing to 1. With soft sorting the
marginals are only approximate; by default (``normalize="row"``) ``A`` is
``pi`` divided by its row sums, so rows sum to exactly 1 as in every other
operator here.

Points and conventions. The library's scores are ``S = scale q k^T`` and its
cost is ``C = -S``. ESP sorts and moves the points ``q~ = sqrt(scale) q`` and
``k~ = sqrt(scale) k`` (so ``-<q~_i, k~_j> = C_ij``) and, by default, scores
slices with that dot-product cost. ESPFormer's published code
(github.com/Anon4142/ESPFormer, ``attentions/esp.py``) differs in four places;
``published=True`` reproduces them all:

============================  ===========================  ==============================
convention                    default                      ``published=True``
============================  ===========================  ==============================
points                        ``sqrt(scale) q, k``          ``scale q, scale k``
slice cost ``C``              ``"dot"``: ``-<q~, k~>``      ``"euclidean"``: ``||q~ - k~||``
cost weight in the softmax    ``<pi_l, C>`` (mass 1)       ``n_valid <pi_l, C>`` (mass n)
soft-sort distance            ``|x_r - x_i|`` (SoftSort)   ``(x_r - x_i)^2``
rescaling                     ``"row"``: rows sum to 1     ``"marginal"``: ``A = n_valid pi``
============================  ===========================  ==============================

(The published ``EspAttention`` multiplies ``A`` by ``n`` once more, so its rows
sum to ``n``; its masked variant does not. We never do: rows sum to 1.)
``cost="sqeuclidean"`` is also offered; for exact plans it equals twice the dot
cost plus a constant, i.e. the dot cost at ``2 tau``.

Memory. The published code materialises ``(b, h, L, n, n)`` soft permutations.
Here the slices are processed in tiles of (groups of ``b*h``) x (slices) sized
from ``memory_budget_bytes``; each tile returns only its within-tile
log-sum-exp of slice logits, its weighted ``pi v`` and row masses
(``O(b h n dv)``), combined exactly across tiles with a second softmax (as in
split-softmax attention), so the slice weights are exact although no tile
sees every slice. When gradients are needed and there is more than one tile,
each tile runs under :func:`torch.utils.checkpoint.checkpoint`, so backward
recomputes it instead of storing it. Exact sorting never forms an ``n x n``
tensor at all (gathers only, ``O(L n d)``).

Padding. Only key-padding masks are supported (the mask must be the outer
product of its valid queries and valid keys, as built by
:func:`asap.transport.masks.key_padding_to_attn_mask`); padded tokens are
sorted last, carry no mass, the marginals are uniform over valid tokens, and
padded queries output zero. ``is_causal`` is refused (docs/method.md sec. 6.2).

All sorting, softmaxes and log-sum-exps run in fp32 (fp64 for fp64 inputs);
the output has the input dtype.

This module is the fast path, :func:`esp_attention`. The conventions
(:class:`~asap.attention.options.EspConventions`) are with the typed options in
:mod:`asap.attention.options`, the dense oracle the tests compare against
(:func:`~asap.attention.reference.esp_attention_reference`, re-exported here)
with the other references in :mod:`asap.attention.reference`, and the
swappable module (:class:`~asap.attention.operators.EspOperator`) with the
other operators in :mod:`asap.attention.operators`.

Reference: Shahbazi et al., "ESPFormer: Doubly-Stochastic Attention with
Expected Sliced Transport Plans", ICML 2025 (arXiv 2502.07962); Liu et al.,
"Expected Sliced Transport Plans", ICLR 2025.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from asap.attention.checks import default_scale, empty_output, validate_attention_inputs, validate_padding_mask
from asap.attention.options import EspConventions, Normalize
from asap.attention.reference import esp_attention_reference
from asap.transport.ctransform import reduction_dtype
from asap.transport.masks import valid_rows_cols
from asap.transport.sliced_plans import (
    QuantileCoupling,
    SliceCost,
    hard_sort,
    quantile_coupling,
    slice_costs,
    slice_plans_apply,
    soft_sort,
)

# esp_attention_reference is re-exported: asap.attention.esp.esp_attention_reference is the name the operator
# benchmark records (results/bench/operators_cpu.json) and scripts/ and tests import.
__all__ = ["DEFAULT_MEMORY_BUDGET", "EspConventions", "check_esp_options", "esp_attention", "esp_attention_reference"]

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes of live intermediates per tile (256 MiB)


def check_esp_options(*, tau_sort: float, tau: float, memory_budget_bytes: int | None) -> None:
    if not (isinstance(tau_sort, (int, float)) and math.isfinite(tau_sort) and tau_sort >= 0):
        raise ValueError(f"esp attention: tau_sort must be a finite number >= 0 (0 = exact sort), got {tau_sort!r}")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
        raise ValueError(f"esp attention: tau (slice inverse temperature) must be a finite number >= 0, got {tau!r}")
    if memory_budget_bytes is not None and not (isinstance(memory_budget_bytes, int) and memory_budget_bytes > 0):
        raise ValueError(
            f"esp attention: memory_budget_bytes must be a positive int or None, got {memory_budget_bytes!r}"
        )


def _check_directions(
    directions: Tensor | None, *, heads: int, dim: int, dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """``(L, d)`` or ``(h, L, d)`` -> ``(1 | h, L, d)`` in ``dtype`` (``None``: axis slices)."""
    if directions is None:
        return None
    if not isinstance(directions, Tensor) or not directions.is_floating_point():
        raise TypeError(f"esp attention: directions must be a floating tensor (L, d) or (h, L, d), got {directions!r}")
    if directions.dim() == 2:
        directions = directions.unsqueeze(0)
    if directions.dim() != 3 or directions.shape[-1] != dim or directions.shape[0] not in (1, heads):
        raise ValueError(
            f"esp attention: directions must have shape (L, {dim}) or ({heads}, L, {dim}), "
            f"got {tuple(directions.shape)}"
        )
    if directions.shape[1] == 0:
        raise ValueError("esp attention: directions must hold at least one slice")
    if directions.device != device:
        raise ValueError(f"esp attention: directions are on {directions.device}, q on {device}")
    return directions.to(dtype)


def _padding_from_mask(
    mask: Tensor | None, padding: Tensor | None, b: int, h: int, n: int, m: int
) -> tuple[Tensor | None, Tensor | None]:
    """Valid queries ``(b, h, n)`` and keys ``(b, h, m)`` of a token or key-padding mask; refuse any other mask.

    ``padding (b, n)`` (self-attention, True = real token) is a key-padding mask
    by construction and costs nothing. The sliced plans only know which tokens
    carry mass, so an ``attn_mask`` that forbids some (valid query, valid key)
    pairs cannot be honoured: it is always checked (one host synchronisation,
    only when an ``attn_mask`` is given) and refused. This is the one mask rule
    of ESP: :func:`esp_attention` and :class:`EspOperator` (whatever builds it)
    both apply it.
    """
    if padding is not None:
        tokens = padding[:, None, :]
        return tokens.expand(b, h, n), tokens.expand(b, h, m)
    if mask is None:
        return None, None
    rows, cols = valid_rows_cols(mask, n, m)
    separable = rows.unsqueeze(-1) & cols.unsqueeze(-2)
    if not bool(torch.equal(mask.expand_as(separable), separable)):
        raise ValueError(
            "esp attention supports key-padding masks only (True exactly where the query and the key are both "
            "valid tokens, e.g. asap.transport.masks.key_padding_to_attn_mask); this mask also forbids pairs of "
            "valid tokens, which sliced transport plans cannot express"
        )
    return rows.expand(b, h, n), cols.expand(b, h, m)


def _tile_shape(
    groups: int, slices: int, *, n: int, m: int, d: int, dv: int, soft: bool, euclidean: bool, itemsize: int,
    budget: int | None,
) -> tuple[int, int]:
    """(groups, slices) per tile so that one tile's intermediates fit in ``budget`` bytes.

    Per (group, slice), soft sorting keeps about four ``n x n`` and four
    ``m x m`` buffers alive (gaps, logits, exponentials, ``U``), the Euclidean
    soft cost adds ``U_q C`` and two ``(n + m) x m`` gathers; every mode keeps
    ``O((n + m)(d + dv))`` of sorted and gathered points. Slices are split
    first; groups only when one slice of all groups does not fit.
    """
    segments = n + m
    per = 3 * segments * (d + dv) + 2 * n
    if soft:
        per += 4 * (n * n + m * m)
        if euclidean:
            per += n * m + 2 * segments * m
    per *= itemsize
    if budget is None or groups * slices * per <= budget:
        return groups, slices
    if groups * per <= budget:
        return groups, max(1, budget // (groups * per))
    return max(1, budget // per), 1


def _esp_tile(
    q_pts: Tensor,
    k_pts: Tensor,
    v: Tensor,
    directions: Tensor | None,
    valid_q: Tensor | None,
    valid_k: Tensor | None,
    rows: Tensor,
    cols: Tensor,
    mass: Tensor,
    rank_mass: Tensor,
    cost_weight: Tensor | None,
    *,
    first_slice: int,
    last_slice: int,
    tau_sort: float,
    tau: float,
    conv: EspConventions,
) -> tuple[Tensor, Tensor, Tensor]:
    """One tile of slices for one group of sequences (``g`` = flattened ``b h`` rows).

    Args:
        q_pts ``(g, n, d)``, k_pts ``(g, m, d)``: the moved points; v ``(g, m, dv)``.
        directions: ``(1 | g, L, d)`` or ``None`` (axis slices ``first_slice:last_slice``).
        valid_q ``(g, n)`` / valid_k ``(g, m)``: True = real token, or ``None``.
        rows, cols, mass, rank_mass: the :class:`QuantileCoupling` fields.
        cost_weight: ``(g, 1)`` factor on slice costs (``n_valid`` when published), or ``None``.

    Returns:
        ``lse (g,)``: log-sum-exp over the tile's slice logits ``-tau cost_l``;
        ``out (g, n, dv)`` and ``row_mass (g, n)``: ``sum_l w_l pi_l v`` and
        ``sum_l w_l pi_l 1`` with ``w`` the softmax over *this tile's* slices.
    """
    if directions is None:
        x = q_pts[..., first_slice:last_slice].transpose(-1, -2)  # (g, Lt, n)
        y = k_pts[..., first_slice:last_slice].transpose(-1, -2)
    else:
        theta = directions[:, first_slice:last_slice]
        x = (q_pts @ theta.transpose(-1, -2)).transpose(-1, -2)
        y = (k_pts @ theta.transpose(-1, -2)).transpose(-1, -2)
    if tau_sort > 0:
        perm_q = soft_sort(x, tau_sort=tau_sort, valid=valid_q, distance=conv.sort_distance)
        perm_k = soft_sort(y, tau_sort=tau_sort, valid=valid_k, distance=conv.sort_distance)
    else:
        perm_q, perm_k = hard_sort(x, valid=valid_q), hard_sort(y, valid=valid_k)
    coupling = QuantileCoupling(rows, cols, mass, rank_mass)
    costs = slice_costs(perm_q, perm_k, coupling, q_pts, k_pts, cost=conv.cost)  # (g, Lt)
    if cost_weight is not None:
        costs = costs * cost_weight
    logits = -tau * costs
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.exp(logits - lse.unsqueeze(-1))
    plan_v, row_mass = slice_plans_apply(perm_q, perm_k, coupling, v)  # (g, Lt, n, dv), (g, Lt, n)
    out = torch.einsum("gl,glnd->gnd", weights, plan_v)
    return lse, out, torch.einsum("gl,gln->gn", weights, row_mass)


def _take(t: Tensor | None, start: int, stop: int) -> Tensor | None:
    """Rows ``start:stop`` of a group-indexed tensor; tensors shared by all groups (leading 1 or none) pass."""
    if t is None or t.dim() < 2 or t.shape[0] == 1:
        return t
    return t[start:stop]


def esp_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    padding_mask: Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    directions: Tensor | None = None,
    soft: bool = True,
    tau_sort: float = 1e-3,
    tau: float = 1.0,
    cost: SliceCost | None = None,
    normalize: Normalize | None = None,
    published: bool = False,
    memory_budget_bytes: int | None = DEFAULT_MEMORY_BUDGET,
) -> Tensor:
    """ESP attention ``A v`` with ``A = (sum_l w_l pi_l) / a``: ``(b, h, n, dv)`` in the input dtype.

    Args:
        q: ``(b, h, n, d)``; k: ``(b, h, m, d)``; v: ``(b, h, m, dv)``.
        attn_mask: bool key-padding mask broadcastable to ``(b, h, n, m)``, True = attend
            (valid query and valid key); other masks are refused (checked on every
            call: one host synchronisation).
        padding_mask: ``(b, n)`` bool, True = real token, for self-attention: the
            same as ``attn_mask = key_padding_to_attn_mask(padding_mask)``, with no
            check needed (what ``MultiheadAttention`` passes).
        scale: score scale (default ``1/sqrt(d)``); the moved points are ``sqrt(scale) q, k``.
        is_causal: refused: exact doubly-stochastic causal attention is the identity.
        directions: slice directions ``(L, d)`` shared by heads or ``(h, L, d)``, used as
            given (unit vectors expected, as in POT); ``None`` = the ``d`` coordinate axes.
        soft: SoftSort (differentiable in ``q, k``) or exact sorting (``soft=False`` or
            ``tau_sort=0``), where ``q, k`` receive gradients only through the slice weights.
        tau_sort: SoftSort temperature (ESPFormer: ``1e-3``).
        tau: inverse temperature of the slice weights ``softmax(-tau cost_l)``; ``0`` = plain average
            (POT's ``beta``).
        cost: ``"dot"`` (default), ``"sqeuclidean"`` or ``"euclidean"`` (published default).
        normalize: ``"row"`` (default; rows sum to 1 exactly) or ``"marginal"`` (``A = n_valid pi``,
            published; rows sum to 1 only for exact sorting).
        published: reproduce the published code's conventions (module docstring table);
            explicit ``cost`` / ``normalize`` still override.
        memory_budget_bytes: bytes of intermediates per tile (slices, then groups of ``b*h``, are
            split to fit; approximate); ``None`` processes everything in one tile.

    Padded queries output zero (no NaN, forward or backward).
    """
    mask = validate_attention_inputs(q, k, v, attn_mask=attn_mask, is_causal=is_causal, method="esp")
    padding = validate_padding_mask(padding_mask, q, k, attn_mask=mask, method="esp")
    check_esp_options(tau_sort=tau_sort, tau=tau, memory_budget_bytes=memory_budget_bytes)
    conv = EspConventions.resolve(cost=cost, normalize=normalize, published=published)
    b, h, n, d = q.shape
    m, dv = k.shape[-2], v.shape[-1]
    dtype = reduction_dtype(q.dtype)
    scale = default_scale(scale, d)
    directions = _check_directions(directions, heads=h, dim=d, dtype=dtype, device=q.device)
    if (empty := empty_output(q, v)) is not None:  # the tile planner divides by b * h
        return empty
    valid_q, valid_k = _padding_from_mask(mask, padding, b, h, n, m)
    soft = soft and tau_sort > 0
    tau_sort = tau_sort if soft else 0.0

    g = b * h
    point_scale = scale**conv.points_scale_power
    q_pts = (q.to(dtype) * point_scale).reshape(g, n, d)
    k_pts = (k.to(dtype) * point_scale).reshape(g, m, d)
    values = v.to(dtype).reshape(g, m, dv)
    if directions is not None and directions.shape[0] > 1:  # per head: one copy per (b, h) group
        directions = directions.unsqueeze(0).expand(b, -1, -1, -1).reshape(g, *directions.shape[-2:])
    if valid_q is not None:
        valid_q, valid_k = valid_q.reshape(g, n), valid_k.reshape(g, m)
    coupling = quantile_coupling(n, m, valid_q=valid_q, valid_k=valid_k, dtype=dtype, device=q.device)
    n_valid = None if valid_q is None else valid_q.sum(dim=-1, keepdim=True).to(dtype)  # (g, 1)
    cost_weight = None
    if conv.cost_per_token:
        cost_weight = n_valid if n_valid is not None else torch.full((1, 1), n, dtype=dtype, device=q.device)

    num_slices = d if directions is None else directions.shape[1]
    tile_groups, tile_slices = _tile_shape(
        g, num_slices, n=n, m=m, d=d, dv=dv, soft=soft, euclidean=conv.cost == "euclidean",
        itemsize=torch.finfo(dtype).bits // 8, budget=memory_budget_bytes,
    )
    n_tiles = math.ceil(g / tile_groups) * math.ceil(num_slices / tile_slices)
    grads_needed = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, directions)
    )
    use_checkpoint = grads_needed and n_tiles > 1

    outs, masses = [], []
    for g0 in range(0, g, tile_groups):
        g1 = min(g, g0 + tile_groups)
        group_args = (
            q_pts[g0:g1], k_pts[g0:g1], values[g0:g1], _take(directions, g0, g1), _take(valid_q, g0, g1),
            _take(valid_k, g0, g1), _take(coupling.rows, g0, g1), _take(coupling.cols, g0, g1),
            _take(coupling.mass, g0, g1), _take(coupling.rank_mass, g0, g1), _take(cost_weight, g0, g1),
        )
        lses, tile_outs, tile_masses = [], [], []
        for l0 in range(0, num_slices, tile_slices):
            options = dict(first_slice=l0, last_slice=min(num_slices, l0 + tile_slices), tau_sort=tau_sort, tau=tau,
                           conv=conv)
            if use_checkpoint:
                lse, out, row_mass = checkpoint(_esp_tile, *group_args, use_reentrant=False, **options)
            else:
                lse, out, row_mass = _esp_tile(*group_args, **options)
            lses.append(lse)
            tile_outs.append(out)
            tile_masses.append(row_mass)
        # Exact softmax over all slices from the per-tile log-sum-exps (split-softmax combination).
        tile_weights = torch.softmax(torch.stack(lses, dim=-1), dim=-1)  # (g_t, tiles)
        outs.append(torch.einsum("gt,tgnd->gnd", tile_weights, torch.stack(tile_outs)))
        masses.append(torch.einsum("gt,tgn->gn", tile_weights, torch.stack(tile_masses)))
    out, row_mass = torch.cat(outs), torch.cat(masses)  # (g, n, dv), (g, n)

    if conv.normalize == "row":
        # Valid rows have mass >= 1/(L n^2) > 0; padding rows have out = 0 and are divided by 1.
        denom = row_mass if valid_q is None else torch.where(valid_q, row_mass, torch.ones_like(row_mass))
        out = out / denom.unsqueeze(-1)
    else:
        out = out * (n if n_valid is None else n_valid.unsqueeze(-1))
    return out.reshape(b, h, n, dv).to(q.dtype)
