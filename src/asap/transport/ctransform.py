"""Entropic c-transforms in the log domain (docs/method.md sec. 1.4).

With scores ``S = scale * q k^T`` (cost ``C = -S``), regularisation ``eps`` and
uniform marginals ``a``, ``b`` over valid tokens::

    crow(g)_i = eps * ( log a_i - LSE_j( (S_ij + g_j) / eps ) )   # exact row sums
    ccol(f)_j = eps * ( log b_j - LSE_i( (S_ij + f_i) / eps ) )   # exact column sums

so that the plan ``P_ij = exp((S_ij + f_i + g_j) / eps)`` built with ``f = crow(g)``
has rows summing to ``a`` (and with ``g = ccol(f)`` columns summing to ``b``).
Two families are provided:

* :func:`c_transform_rows` / :func:`c_transform_cols` act on a materialised
  score matrix ``(..., n, m)``: the Sinkhorn teacher and the fp64 references.
* :func:`column_logsumexp` / :func:`c_transform_cols_tiled` recompute the scores
  tile by tile from ``q`` and ``k``, so that ASAP never holds a ``(b, h, n, m)``
  tensor for long sequences.

All log-sum-exps run in at least fp32 whatever the input dtype; padding rows
and columns come out as exactly zero (see :mod:`asap.transport.masks`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from asap.transport.masks import Support

#: Default memory for one score tile of the tiled column log-sum-exp (kept below glibc's
#: 32 MiB mmap threshold, above which every temporary is page-faulted anew on CPU).
DEFAULT_TILE_BYTES = 16 * 2**20


def reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions run in: fp64 stays fp64, everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scaled_logits(scores: Tensor, *, eps: float, supp: Support) -> tuple[Tensor, Tensor]:
    """``(S / eps + row_bias, S / eps + col_bias)``: the two log-kernels every half-step reads.

    Forming them once per problem (one tensor without a mask) means a half-step
    costs one addition plus the log-sum-exp, instead of rebuilding
    ``(S + g) / eps + bias`` from the scores every time: at long sequence
    lengths each full-size temporary is a fresh large allocation, and these
    dominated the teacher's run time.
    """
    logits = scores / eps
    if supp.row_bias is None:
        return logits, logits
    return logits + supp.row_bias, logits + supp.col_bias


def logsumexp_(work: Tensor, dim: int) -> Tensor:
    """``logsumexp(work, dim)`` computed in place: ``work`` is overwritten, no autograd.

    ``torch.logsumexp`` allocates a full-size temporary for the shifted
    exponentials; reusing one workspace across Sinkhorn half-steps removes the
    only large allocations of an inference-mode teacher.
    """
    shift = work.amax(dim=dim, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros((), dtype=shift.dtype, device=shift.device))
    work.sub_(shift).exp_()
    return work.sum(dim=dim).log_() + shift.squeeze(dim)


def row_step(row_logits: Tensor, g: Tensor, *, eps: float, supp: Support, work: Tensor | None = None) -> Tensor:
    """``crow(g)`` from precomputed ``row_logits = S / eps + row_bias``: ``f (..., n)``.

    With ``work`` (a buffer shaped like ``row_logits``; inference only) no full-size tensor is allocated.
    """
    if work is None:
        lse = torch.logsumexp(row_logits + (g / eps).unsqueeze(-2), dim=-1)
    else:
        lse = logsumexp_(torch.add(row_logits, (g / eps).unsqueeze(-2), out=work), dim=-1)
    return supp.zero_rows(eps * (supp.log_a - lse))


def col_step(col_logits: Tensor, f: Tensor, *, eps: float, supp: Support, work: Tensor | None = None) -> Tensor:
    """``ccol(f)`` from precomputed ``col_logits = S / eps + col_bias``: ``g (..., m)`` (``work`` as in :func:`row_step`)."""
    if work is None:
        lse = torch.logsumexp(col_logits + (f / eps).unsqueeze(-1), dim=-2)
    else:
        lse = logsumexp_(torch.add(col_logits, (f / eps).unsqueeze(-1), out=work), dim=-2)
    return supp.zero_cols(eps * (supp.log_b - lse))


def warm_start_duals(
    row_logits: Tensor, col_logits: Tensor, f: Tensor, *, eps: float, supp: Support, extra_steps: int
) -> tuple[Tensor, Tensor]:
    """The duals of ASAP with ``extra_steps = j`` warm-start half-steps from a predicted query dual ``f (..., n)``.

    ``g = ccol(f)``, then ``j`` alternating steps ``f = crow(g)``, ``g = ccol(f)``; for odd ``j`` one
    more column step closes (exact columns, ``A = P / a``), for even ``j`` the caller's row softmax
    closes (``A = softmax((S + g) / eps)``). Returns ``(f (..., n), g (..., m))``; docs/method.md sec. 4.5.
    """
    f = supp.zero_rows(f)
    g = col_step(col_logits, f, eps=eps, supp=supp)
    for step in range(extra_steps):
        if step % 2 == 0:
            f = row_step(row_logits, g, eps=eps, supp=supp)
        else:
            g = col_step(col_logits, f, eps=eps, supp=supp)
    if extra_steps % 2 == 1:
        g = col_step(col_logits, f, eps=eps, supp=supp)
    return f, g


def c_transform_rows(scores: Tensor, g: Tensor, *, eps: float, supp: Support) -> Tensor:
    """Row c-transform ``crow(g)``: ``scores (..., n, m)``, ``g (..., m)`` -> ``f (..., n)``."""
    return row_step(scaled_logits(scores, eps=eps, supp=supp)[0], g, eps=eps, supp=supp)


def c_transform_cols(scores: Tensor, f: Tensor, *, eps: float, supp: Support) -> Tensor:
    """Column c-transform ``ccol(f)``: ``scores (..., n, m)``, ``f (..., n)`` -> ``g (..., m)``."""
    return col_step(scaled_logits(scores, eps=eps, supp=supp)[1], f, eps=eps, supp=supp)


def append_bias_column(x: Tensor, column: Tensor | float) -> Tensor:
    """``[x, column, 0, ...]``: ``x (..., d)`` with one extra coordinate, padded to a multiple of 8.

    Folding an additive bias into a dot product: ``[q, 1] . [k, c] = q . k + c``.
    Fused attention kernels take a single mask; this frees it for the boolean
    one. The zero padding keeps the head size a multiple of 8, which fused
    kernels want. ``column`` is ``(...)`` (one value per row) or a scalar.
    """
    pad = 8 - x.shape[-1] % 8
    extra = x.new_zeros(*x.shape[:-1], pad)
    extra[..., 0] = column
    return torch.cat([x, extra], dim=-1)


def _fused_column_logsumexp_cpu(
    q: Tensor, k: Tensor, f: Tensor, *, scale: float, eps: float, col_bias: Tensor | None = None
) -> Tensor | None:
    """The column log-sum-exp from PyTorch's fused CPU attention kernel, or ``None`` if unavailable.

    ``LSE_i((scale <q_i, k_j> + f_i) / eps)`` is the row log-sum-exp of an
    attention call with the roles swapped (keys as queries, queries as keys)
    and the additive bias ``f / eps``; the flash kernel computes it in tiles
    without materialising the scores and returns it beside the (here unused)
    output, 2-2.5x faster than :func:`column_logsumexp`'s tiles on CPU. The
    kernel takes one additive mask: without ``col_bias`` that is the broadcast
    ``f / eps``; with it (a mask), ``f`` is folded into the dot product instead
    (``q' = [q, f / scale]``, ``k' = [k, 1]``, head size padded to a multiple
    of 8) and the transposed ``0 / -inf`` bias is the mask. The op is private
    to PyTorch and has no backward for its log-sum-exp output, so it is only
    used without autograd, and any failure falls back to tiles.
    """
    kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if kernel is None:
        return None
    if col_bias is None or col_bias.shape[-1] == 1:
        # The kernel silently mishandles a last dim that is not unit-stride (transposed or
        # sliced views give wrong log-sum-exps), so it only ever sees contiguous operands.
        # A per-query bias (query padding) folds into the (b, h, 1, n) bias vector.
        bias = f / eps if col_bias is None else f / eps + col_bias[..., 0]
        queries, keys, mask = k.contiguous(), q.contiguous(), bias.to(q.dtype).unsqueeze(-2)
    else:
        keys, queries = append_bias_column(q, (f / scale).to(q.dtype)), append_bias_column(k, 1.0)
        mask = col_bias.to(q.dtype).transpose(-1, -2)
    # The kernel needs a value tensor; its output is discarded. ``keys`` has the right shape
    # and costs nothing: a zero-stride tensor would make the kernel about 2x slower.
    values = keys
    try:
        _, lse = kernel(queries, keys, values, 0.0, False, attn_mask=mask, scale=scale / eps)
    except RuntimeError:
        return None
    # The kernel returns the log-sum-exp in its own (b, m, h) memory layout; a strided
    # bias would later make scaled_dot_product_attention materialise the full mask.
    return lse.contiguous()


def column_logsumexp(
    q: Tensor,
    k: Tensor,
    f: Tensor,
    *,
    scale: float,
    eps: float,
    col_bias: Tensor | None = None,
    col_mask: Tensor | None = None,
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> Tensor:
    """``LSE_i( (scale <q_i, k_j> + f_i) / eps )`` for every key, tiled over keys.

    Args:
        q: queries ``(b, h, n, d)``; k: keys ``(b, h, m, d)``; f: query dual ``(b, h, n)``.
        col_bias: optional additive ``0 / -inf`` bias broadcastable to ``(b, h, n, m)``
            (``Support.col_bias``); a per-query bias ``(..., n, 1)`` (padding) is folded
            into ``f`` and costs nothing.
        col_mask: optional boolean mask broadcastable to ``(b, h, n, m)`` (True = keep),
            instead of ``col_bias``: applied tile by tile, so that a general mask
            needs no ``(b, h, n, m)`` float bias.
        tile_bytes: memory budget of one ``(b, h, n, tile)`` fp32 score tile. The
            key dimension is cut into tiles that fit, so peak memory is
            ``O(b h n tile)`` instead of ``O(b h n m)``; each tile's reduction is
            complete (it runs over all queries), so no online rescaling is needed.

    On CPU, for fp32/fp64 inputs without autograd, the fused attention kernel
    computes the same quantity in one call
    (:func:`_fused_column_logsumexp_cpu`); everywhere else the tiles run.

    Returns:
        ``(b, h, m)`` in fp32 (fp64 for fp64 inputs).
    """
    rdtype = reduction_dtype(q.dtype)
    if col_bias is not None and col_mask is not None:
        raise ValueError("column_logsumexp: pass col_bias or col_mask, not both")
    fused_ok = (
        col_mask is None
        and q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.float64)  # a low-precision bias would round f
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or f.requires_grad))
        and not torch.compiler.is_compiling()
    )
    if fused_ok:
        lse = _fused_column_logsumexp_cpu(q, k, f.to(q.dtype), scale=scale, eps=eps, col_bias=col_bias)
        if lse is not None:
            return lse.to(rdtype)
    b, h, n, _ = q.shape
    m = k.shape[-2]
    bytes_per_key = max(1, b * h * n * torch.finfo(rdtype).bits // 8)
    tile = int(max(1, min(m, tile_bytes // bytes_per_key)))
    # Dividing q by eps once is cheaper than dividing every tile.
    # Tiles are computed transposed, (b, h, tile, n), so the reduction over queries
    # runs along the contiguous last dim.
    q_scaled_t = (q * (scale / eps)).transpose(-1, -2)
    f_scaled = f.to(rdtype) / eps
    if col_bias is not None and col_bias.shape[-1] == 1:
        f_scaled, col_bias = f_scaled + col_bias[..., 0], None
    f_scaled = f_scaled.unsqueeze(-2)
    bias_t = None if col_bias is None else col_bias.transpose(-1, -2)
    mask_t = None if col_mask is None else col_mask.transpose(-1, -2)
    out = []
    for start in range(0, m, tile):  # static Python loop: no host sync, compiles with fullgraph
        stop = min(start + tile, m)
        z = (k[..., start:stop, :] @ q_scaled_t).to(rdtype) + f_scaled
        if bias_t is not None:
            z = z + bias_t[..., start:stop, :]
        if mask_t is not None:
            z = z.masked_fill(~mask_t[..., start:stop, :], float("-inf"))
        out.append(torch.logsumexp(z, dim=-1))
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


def c_transform_cols_tiled(
    q: Tensor,
    k: Tensor,
    f: Tensor,
    *,
    scale: float,
    eps: float,
    supp: Support,
    col_mask: Tensor | None = None,
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> Tensor:
    """``ccol(f)`` computed from ``q`` and ``k`` without the full score matrix: ``g (b, h, m)``.

    ``col_mask`` (boolean, see :func:`column_logsumexp`) replaces ``supp.col_bias``
    when the support was built without float biases.
    """
    col_bias = None if col_mask is not None else supp.col_bias
    lse = column_logsumexp(q, k, f, scale=scale, eps=eps, col_bias=col_bias, col_mask=col_mask, tile_bytes=tile_bytes)
    return supp.zero_cols(eps * (supp.log_b - lse))
