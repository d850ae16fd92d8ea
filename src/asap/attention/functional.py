"""Attention operators with one shared signature.

Every function takes ``q (b, h, n, d)``, ``k (b, h, m, d)``, ``v (b, h, m, dv)``
and keyword-only options, and returns ``(b, h, n, dv)`` in the input dtype:

* :func:`softmax_attention`: the one-sided problem (row constraint only),
  delegating to :func:`torch.nn.functional.scaled_dot_product_attention`.
* :func:`sinkhorn_attention`: the teacher: ``K`` log-domain Sinkhorn
  half-steps (Sinkformers, Sander et al. 2022).
* :func:`asap_attention`: the compiled operator: given a predicted query dual
  ``f_hat``, the two-sided entropic c-transform (docs/method.md sec. 4.5)::

      g = ccol(f_hat)                        # one tiled log-sum-exp over queries
      A = softmax_j( (S_ij + g_j) / eps )    # an ordinary attention call with a key bias

Masks are boolean, broadcastable to ``(b, h, n, m)``, True = attend. Padding
queries (rows allowing no key) and padding keys (columns allowed by no query)
carry no mass; padding queries output exactly zero, forward and backward.
Reductions run in fp32 (fp64 for fp64 inputs) whatever the input dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from asap.attention import native
from asap.attention.checks import (
    check_int,
    check_positive,
    default_scale,
    empty_output,
    validate_attention_inputs,
    validate_padding_mask,
)
from asap.attention.closure import SHARED_MAX_BLOCK_BYTES, shared_exp_closure
from asap.attention.options import ASAP_BACKENDS, GRAD_MODES  # noqa: F401 (re-exported: the switch's names)
from asap.transport.ctransform import (
    DEFAULT_TILE_BYTES,
    append_bias_column,
    c_transform_cols_tiled,
    col_step,
    reduction_dtype,
    scaled_logits,
    warm_start_duals,
)
from asap.transport.diagnostics import log_plan
from asap.transport.masks import Support, padding_support, support
from asap.transport.sinkhorn import sinkhorn

GradMode = Literal["unroll", "closure"]


def _open_padding_rows(mask: Tensor, rows: Tensor) -> Tensor:
    """Let padding queries attend everywhere so no row is fully masked (their output is zeroed later)."""
    return mask | ~rows.unsqueeze(-1)


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    padding_mask: Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> Tensor:
    """Row-softmax attention ``softmax(scale q k^T) v`` via ``scaled_dot_product_attention``.

    Unlike the raw kernel, a query whose row is fully masked outputs zero
    (never NaN), consistently with the doubly-stochastic operators.
    ``padding_mask (b, n)`` (True = real token, self-attention) is applied as a
    ``(b, 1, 1, n)`` key bias instead of a ``(b, 1, n, n)`` mask.
    """
    mask = validate_attention_inputs(q, k, v, attn_mask=attn_mask, is_causal=is_causal, method="softmax")
    padding = validate_padding_mask(padding_mask, q, k, attn_mask=mask, method="softmax")
    scale = default_scale(scale, q.shape[-1])
    if padding is not None:
        if is_causal:
            raise ValueError("softmax attention: pass either padding_mask or is_causal=True, not both")
        supp = padding_support(padding, dtype=q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=supp.row_bias, scale=scale, dropout_p=dropout_p)
        return supp.zero_rows(out, vectors=True)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=is_causal, dropout_p=dropout_p)
    if is_causal:
        raise ValueError("softmax attention: pass either attn_mask or is_causal=True, not both")
    rows = mask.expand(*mask.shape[:-1], k.shape[-2]).any(dim=-1)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=_open_padding_rows(mask, rows), scale=scale, dropout_p=dropout_p
    )
    return torch.where(rows.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))


#: CPU only: largest ``(b, h, n, m)`` fp32 temporary the teacher creates at once. glibc serves
#: allocations above 32 MiB with fresh ``mmap`` pages, so every larger temporary is page-faulted
#: anew; splitting the batch below that made the K = 11 teacher 3-4x faster at n = 256.
CPU_CHUNK_BYTES = 16 * 2**20


def _batch_head_chunks(b: int, h: int, bytes_per_head: int, budget: int) -> list[tuple[slice, slice]]:
    """Split ``(b, h)`` into blocks whose score tensors fit ``budget`` bytes (at least one head each)."""
    heads = max(1, min(h, budget // max(1, bytes_per_head)))
    if heads < h:
        return [(slice(i, i + 1), slice(j, j + heads)) for i in range(b) for j in range(0, h, heads)]
    rows = max(1, budget // max(1, bytes_per_head * h))
    return [(slice(i, i + rows), slice(None)) for i in range(0, b, rows)]


def _slice_mask(mask: Tensor | None, rows: slice, heads: slice) -> Tensor | None:
    if mask is None:
        return None
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    return mask[rows if mask.shape[0] > 1 else slice(None), heads if mask.shape[1] > 1 else slice(None)]


def sinkhorn_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    n_iters: int,
    eps: float = 1.0,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    padding_mask: Tensor | None = None,
    is_causal: bool = False,
    grad_mode: GradMode = "unroll",
    tol: float | None = None,
    check_every: int = 10,
    chunk_bytes: int | None = None,
) -> Tensor:
    """Sinkhorn attention: ``A = P / a`` for the plan after ``n_iters`` half-steps.

    Args:
        n_iters: ``K >= 1`` half-steps, the first a row step. ``K = 1`` is
            softmax at temperature ``eps``; odd ``K`` gives exact row sums
            (``A = softmax_j((S + g_{K-1}) / eps)``); even ``K`` exact column
            sums (rows then only approximately sum to 1).
        eps: entropic regularisation (temperature); ``S = scale q k^T``.
        grad_mode: ``"unroll"`` back-propagates through every half-step (the
            exact gradient of the K-step operator; memory ``O(K b h n m)``).
            ``"closure"`` (odd ``K`` only) computes ``f_{K-2}`` without
            autograd and back-propagates through the final closure
            ``g = ccol(f_{K-2})``, ``A = softmax((S + g)/eps)`` only (memory
            ``O(b h n m)``; the earlier duals are treated as constants, which
            is exact at convergence by the envelope theorem).
        tol, check_every: optional early stopping on the L1 column-marginal
            error (see :func:`asap.transport.sinkhorn.sinkhorn`); synchronises
            with the host, for analysis rather than training. For the duals
            after every half-step (a convergence study), call
            ``asap.transport.sinkhorn(scores, ..., return_iterates=True)`` on
            ``S = scale q k^T`` and ``asap.transport.support(attn_mask, n, m, ...)``.
        chunk_bytes: process ``(b, h)`` in blocks whose ``(n, m)`` score
            tensors total at most this many bytes. Default: ``CPU_CHUNK_BYTES``
            on CPU, no chunking elsewhere (caching GPU allocators do not pay
            for large temporaries, and chunks would only cost parallelism).
            The result does not depend on it.
    """
    mask = validate_attention_inputs(q, k, v, attn_mask=attn_mask, is_causal=is_causal, method="sinkhorn")
    padding = validate_padding_mask(padding_mask, q, k, attn_mask=mask, method="sinkhorn")
    n_iters = check_int("sinkhorn attention: n_iters (half-steps)", n_iters, minimum=1)
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"sinkhorn attention: grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    if grad_mode == "closure" and n_iters % 2 == 0:
        raise ValueError("sinkhorn attention: grad_mode='closure' needs an odd n_iters (ending with a row step)")
    options = dict(
        n_iters=n_iters,
        eps=check_positive("eps", eps),
        scale=default_scale(scale, q.shape[-1]),
        grad_mode=grad_mode,
        tol=tol,
        check_every=check_every,
    )
    if (empty := empty_output(q, v)) is not None:
        return empty
    if chunk_bytes is None and q.device.type == "cpu":
        chunk_bytes = CPU_CHUNK_BYTES

    def run(q, k, v, f, mask, padding):
        return _sinkhorn_attention(q, k, v, mask, padding, **options)

    return _over_chunks(run, q, k, v, None, mask, padding, budget=chunk_bytes)


def _over_chunks(run, q: Tensor, k: Tensor, v: Tensor, f: Tensor | None, mask: Tensor | None,
                 padding: Tensor | None, *, budget: int | None) -> Tensor:  # fmt: skip
    """``run(q, k, v, f, mask, padding)`` on blocks of ``(b, h)`` whose ``(n, m)`` scores fit ``budget`` bytes.

    The result does not depend on the blocks; ``budget=None`` runs one block.
    """
    b, h, n, _ = q.shape
    bytes_per_head = n * k.shape[-2] * torch.finfo(reduction_dtype(q.dtype)).bits // 8
    if budget is None or b * h * bytes_per_head <= budget:
        return run(q, k, v, f, mask, padding)
    outs = [
        run(q[rows, heads], k[rows, heads], v[rows, heads], None if f is None else f[rows, heads],
            _slice_mask(mask, rows, heads), None if padding is None else padding[rows])  # fmt: skip
        for rows, heads in _batch_head_chunks(b, h, bytes_per_head, budget)
    ]
    if outs[0].shape[1] == h:
        return torch.cat(outs, dim=0)
    per_batch = len(outs) // b
    return torch.cat([torch.cat(outs[i * per_batch : (i + 1) * per_batch], dim=1) for i in range(b)], dim=0)


def _sinkhorn_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    padding: Tensor | None,
    *,
    n_iters: int,
    eps: float,
    scale: float,
    grad_mode: GradMode,
    tol: float | None,
    check_every: int,
) -> Tensor:
    """:func:`sinkhorn_attention` on validated inputs, one block of ``(b, h)``."""
    rdtype = reduction_dtype(q.dtype)
    n, m = q.shape[-2], k.shape[-2]
    scores = (q.to(rdtype) @ k.to(rdtype).transpose(-1, -2)) * scale
    if padding is not None:
        supp = padding_support(padding, dtype=rdtype)
    else:
        supp = support(mask, n, m, dtype=rdtype, device=q.device)

    if n_iters % 2 == 1:
        # Odd K: the last row step is the softmax normaliser itself, A = softmax((S + g_{K-1}) / eps).
        logits = scaled_logits(scores, eps=eps, supp=supp)  # formed once, read by every half-step
        row_logits, col_logits = logits
        loop = dict(eps=eps, supp=supp, tol=tol, check_every=check_every, logits=logits)
        if n_iters == 1:
            g = scores.new_zeros(scores.shape[:-2] + (m,))
        elif grad_mode == "closure":
            with torch.no_grad():
                f_target = sinkhorn(scores, n_iters=n_iters - 2, **loop).f
            g = col_step(col_logits, f_target, eps=eps, supp=supp)
        else:
            g = sinkhorn(scores, n_iters=n_iters - 1, **loop).g
        if torch.is_grad_enabled() and scores.requires_grad:
            attn = torch.softmax(row_logits + (g / eps).unsqueeze(-2), dim=-1)
        else:  # inference: the loop is done with row_logits, a fresh tensor of ours; normalise it in place
            attn = row_logits.add_((g / eps).unsqueeze(-2))
            attn.sub_(attn.amax(dim=-1, keepdim=True)).exp_()
            attn.div_(attn.sum(dim=-1, keepdim=True))
    else:
        res = sinkhorn(scores, n_iters=n_iters, eps=eps, supp=supp, tol=tol, check_every=check_every)
        attn = (log_plan(scores, res.f, res.g, eps=eps, supp=supp) - supp.log_a.unsqueeze(-1)).exp()
    out = supp.zero_rows(attn @ v.to(rdtype), vectors=True)
    return out.to(v.dtype)


def _biased_row_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    scale: float,
    eps: float,
    supp: Support,
    mask: Tensor | None,
) -> Tensor:
    """``softmax_j((scale q_i.k_j + g_j) / eps) v`` as one ``scaled_dot_product_attention`` call.

    ``q, k, v`` are in the reduction dtype (fp32/fp64), so the bias ``g / eps``
    is never rounded to a low-precision input dtype. Without a mask, or with
    token padding (``supp`` from :func:`asap.transport.masks.padding_support`,
    whose ``row_bias`` is a ``(b, 1, 1, m)`` vector), the bias is a broadcast
    ``(b, h, 1, m)`` float that fused kernels read without materialising
    ``(b, h, n, m)``. With a general boolean ``mask`` the kernel takes only one
    mask, so the bias is folded into the dot product instead: ``q' = [q, 1]``,
    ``k' = [k, g / scale]`` (head size padded to a multiple of 8 for fused
    kernels) and the boolean mask is passed as is.
    """
    sdpa_scale = scale / eps
    if mask is None:
        bias = g / eps if supp.row_bias is None else g / eps + supp.row_bias[..., 0, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(-2), scale=sdpa_scale)
        return supp.zero_rows(out, vectors=True)
    q_aug, k_aug = append_bias_column(q, 1.0), append_bias_column(k, (g / scale).to(k.dtype))
    # Fused kernels need one head size for q, k and v (else PyTorch falls back to the
    # math path, which materialises the scores): pad v with zero columns, drop them after.
    dv = v.shape[-1]
    v_aug = v
    if dv < q_aug.shape[-1]:
        v_aug = torch.cat([v, v.new_zeros(*v.shape[:-1], q_aug.shape[-1] - dv)], dim=-1)
    out = F.scaled_dot_product_attention(
        q_aug, k_aug, v_aug, attn_mask=_open_padding_rows(mask, supp.rows), scale=sdpa_scale
    )[..., :dv]
    return supp.zero_rows(out, vectors=True)




def _check_f_hat(f_hat: Tensor, q: Tensor) -> None:
    if not isinstance(f_hat, Tensor) or f_hat.shape != q.shape[:-1]:
        shape = tuple(f_hat.shape) if isinstance(f_hat, Tensor) else type(f_hat).__name__
        raise ValueError(f"asap attention: f_hat must have shape (b, h, n) = {tuple(q.shape[:-1])}, got {shape}")
    if not f_hat.is_floating_point() or f_hat.device != q.device:
        raise TypeError(f"asap attention: f_hat must be a floating tensor on {q.device}, got {f_hat.dtype} on {f_hat.device}")


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def choose_asap_backend(
    q: Tensor, k: Tensor, v: Tensor, f_hat: Tensor, *, attn_mask: Tensor | None, padding_mask: Tensor | None
) -> str:
    """The backend ``backend="auto"`` runs for these inputs (reads shapes and flags only, no values).

    * CUDA, Triton installed, no autograd, no general mask: ``"triton"``.
    * CPU, no autograd, a padding mask (no general mask), short rows
      (:func:`asap.attention.native.closure_worth_it`), the native kernels built
      (:mod:`asap.attention.native`): ``"native"``.
    * CPU, no autograd, no general mask, unpadded, one ``(n, m)`` fp32 block at most
      :data:`~asap.attention.closure.SHARED_MAX_BLOCK_BYTES`: ``"shared"`` (one exponential).
    * everything else: ``"flash"`` (two fused attention passes; tiles under autograd).

    The crossover points behind the rule are measured by ``asap bench operators``
    (``results/bench/``); padded inputs stay on ``"flash"``, whose two passes take
    the padding as bias vectors.
    """
    grad = _needs_grad(q, k, v, f_hat)
    if q.device.type == "cuda" and not grad and attn_mask is None:
        from asap.attention import triton_kernels

        if triton_kernels.supports(q, k, v, f_hat) is None:
            return "triton"
    if q.device.type == "cpu" and not grad and attn_mask is None and native.closure_worth_it(q.shape[-2], padded=padding_mask is not None):
        if native.supports(q, k, v) is None:
            return "native"
    block = q.shape[-2] * k.shape[-2] * 4
    if q.device.type == "cpu" and not grad and attn_mask is None and padding_mask is None and block <= SHARED_MAX_BLOCK_BYTES:
        return "shared"
    return "flash"


def asap_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    f_hat: Tensor,
    *,
    eps: float = 1.0,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    padding_mask: Tensor | None = None,
    is_causal: bool = False,
    extra_steps: int = 0,
    backend: str = "auto",
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> Tensor:
    """ASAP attention from a predicted query dual: the two-sided entropic c-transform.

    ``g = ccol(f_hat)``, ``out = softmax_j((S_ij + g_j) / eps) v``; ``(b, h, n, dv)``.

    Args:
        f_hat: predicted query dual ``(b, h, n)`` in the convention
            ``P_ij = exp((S_ij + f_i + g_j)/eps)``, ``a_i = 1/n_valid`` (any
            constant offset per ``(b, h)`` is irrelevant). With ``f_hat = f_{K-2}``
            of a K-step teacher this reproduces the teacher exactly.
        attn_mask: boolean, broadcastable to ``(b, h, n, m)``, True = attend.
        padding_mask: ``(b, n)`` bool, True = real token, for self-attention: the
            same as ``attn_mask = key_padding_to_attn_mask(padding_mask)``, held as
            vectors (extra memory ``O(b n)``). Pass one of the two masks.
        extra_steps: ``j >= 0`` further Sinkhorn half-steps from ``f_hat`` (ASAP as a
            warm start). The closure is 2 half-steps (column, row); ``extra_steps=j``
            runs ``2 + j``, so ``f_hat = f_{K-2}`` of a teacher gives the ``K + j``-step
            teacher. Odd ``j`` ends with a column step (exact columns, rows
            approximate, as Sinkhorn with even K). ``j > 0`` materialises the scores
            in ``(b, h)`` chunks, like the teacher.
        backend: ``"auto"`` (see :func:`choose_asap_backend`), ``"flash"`` (the
            column log-sum-exp and the row pass as two fused attention calls,
            tiled over keys; any mask, autograd), ``"shared"`` (one exponential
            for both passes, :func:`asap.attention.closure.shared_exp_closure`;
            inference, no general mask), ``"native"`` (the same algebra in one C pass per
            ``(b, h)``, :mod:`asap.attention.native`; CPU self-attention, inference, padding
            masks), ``"triton"`` (CUDA kernels,
            :mod:`asap.attention.triton_kernels`; inference, padding masks).
        tile_bytes: memory budget of one score tile of the tiled column log-sum-exp.

    Rows of the result are exact; the column error is set by the quality of
    ``f_hat``. fp16/bf16 inputs are computed in fp32 (the key bias and every
    log-sum-exp stay fp32) and the result is rounded once, to the input dtype.
    """
    mask = validate_attention_inputs(q, k, v, attn_mask=attn_mask, is_causal=is_causal, method="asap")
    padding = validate_padding_mask(padding_mask, q, k, attn_mask=mask, method="asap")
    _check_f_hat(f_hat, q)
    eps = check_positive("eps", eps)
    scale = default_scale(scale, q.shape[-1])
    extra_steps = check_int("asap attention: extra_steps", extra_steps, minimum=0)
    if backend not in ASAP_BACKENDS:
        raise ValueError(f"asap attention: backend must be one of {ASAP_BACKENDS}, got {backend!r}")
    if (empty := empty_output(q, v)) is not None:
        return empty
    if backend == "auto":
        backend = "flash" if extra_steps else choose_asap_backend(q, k, v, f_hat, attn_mask=mask, padding_mask=padding)
    if backend == "triton":
        if extra_steps:
            raise ValueError("asap attention: extra_steps needs backend 'flash' or 'auto'")
        from asap.attention.triton_kernels import asap_attention_triton

        return asap_attention_triton(q, k, v, f_hat, eps=eps, scale=scale, attn_mask=mask, query_valid=padding, key_valid=padding)
    if backend == "native":
        if extra_steps or mask is not None:
            raise ValueError("asap attention: backend 'native' takes no extra_steps or attn_mask (use padding_mask)")
        if (why := native.supports(q, k, v)) is not None:
            raise ValueError(f"asap attention: backend 'native' cannot run: {why}")
        out = native.asap_forward_native(q, k, v, f_hat=f_hat, scale=scale, eps=eps, valid=padding)
        return out if out.dtype == v.dtype else out.to(v.dtype)
    rdtype = reduction_dtype(q.dtype)
    out_dtype = v.dtype
    q, k, v, f_hat = (t if t.dtype == rdtype else t.to(rdtype) for t in (q, k, v, f_hat))  # no copy for fp32/fp64
    if backend == "shared" and not extra_steps:  # takes the padding itself: no Support to build (small-n overhead)
        if mask is not None or _needs_grad(q, k, v, f_hat):
            raise ValueError("asap attention: backend 'shared' is inference-only and takes no attn_mask (use padding_mask)")
        out = shared_exp_closure(q, k, v, f_hat, scale=scale, eps=eps, valid=padding)
        return out if out.dtype == out_dtype else out.to(out_dtype)
    n, m = q.shape[-2], k.shape[-2]
    if padding is not None:
        supp = padding_support(padding, dtype=rdtype)
    else:
        supp = support(mask, n, m, dtype=rdtype, device=q.device, biases=False)
    f_hat = supp.zero_rows(f_hat)
    if extra_steps:
        out = _asap_with_steps(q, k, v, f_hat, mask, padding, scale=scale, eps=eps, extra_steps=extra_steps)
    else:
        col_mask = None if mask is None else _open_padding_cols(mask, supp.cols)
        g = c_transform_cols_tiled(q, k, f_hat, scale=scale, eps=eps, supp=supp, col_mask=col_mask, tile_bytes=tile_bytes)
        out = _biased_row_attention(q, k, v, g, scale=scale, eps=eps, supp=supp, mask=mask)
    return out.to(out_dtype)


def _open_padding_cols(mask: Tensor, cols: Tensor) -> Tensor:
    """Let padding keys be reached by every query so no column is fully masked (their dual is zeroed later)."""
    return mask | ~cols.unsqueeze(-2)


def _asap_with_steps(
    q: Tensor, k: Tensor, v: Tensor, f_hat: Tensor, mask: Tensor | None, padding: Tensor | None, *,
    scale: float, eps: float, extra_steps: int,
) -> Tensor:  # fmt: skip
    """``2 + extra_steps`` Sinkhorn half-steps from ``f_hat`` on materialised scores, in ``(b, h)`` chunks."""

    def run(q, k, v, f, mask, padding):
        n, m = q.shape[-2], k.shape[-2]
        if padding is not None:
            supp = padding_support(padding, dtype=q.dtype)
        else:
            supp = support(mask, n, m, dtype=q.dtype, device=q.device)
        return _steps_block(q, k, v, f, supp, scale=scale, eps=eps, extra_steps=extra_steps)

    budget = CPU_CHUNK_BYTES if q.device.type == "cpu" else None
    return _over_chunks(run, q, k, v, f_hat, mask, padding, budget=budget)


def _steps_block(
    q: Tensor, k: Tensor, v: Tensor, f: Tensor, supp: Support, *, scale: float, eps: float, extra_steps: int
) -> Tensor:
    scores = (q @ k.transpose(-1, -2)) * scale
    row_logits, col_logits = scaled_logits(scores, eps=eps, supp=supp)
    f, g = warm_start_duals(row_logits, col_logits, f, eps=eps, supp=supp, extra_steps=extra_steps)
    if extra_steps % 2 == 0:  # the closing row step is the softmax normaliser
        attn = torch.softmax(row_logits + (g / eps).unsqueeze(-2), dim=-1)
    else:  # closed by a column step: exact columns, A = P / a
        attn = (log_plan(scores, f, g, eps=eps, supp=supp) - supp.log_a.unsqueeze(-1)).exp()
    return supp.zero_rows(attn @ v, vectors=True)
