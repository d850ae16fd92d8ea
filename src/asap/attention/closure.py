"""ASAP's closure with one exponential: the column c-transform and the row attention from one score pass.

Given a query dual ``f`` (``b h n``), ASAP needs the key dual ``g = ccol(f)``
and then ``out = softmax_j((S_ij + g_j)/eps) v`` (docs/method.md sec. 4.5).
Done as two attention passes (:func:`asap.attention.functional.asap_attention`
with ``backend="flash"``), the scores are computed and exponentiated twice.
Within one ``(n, m)`` block they need to be exponentiated only once::

    W_ij = (S_ij + f_i) / eps - c_j - r_i      c_j = max_i (S_ij + f_i)/eps,  r_i = max_j (...) - c_j
    E    = exp(W)                              every entry <= 1, every row and column holds a 1
    lse_j = c_j + log sum_i E_ij e^{r_i}       the column log-sum-exp (so g_j = eps (log b_j - lse_j))
    out_i = sum_j E_ij w_j v_j / sum_j E_ij w_j,   w_j = 1 / sum_i E_ij e^{r_i}

because ``exp((S_ij + g_j)/eps) = E_ij w_j * exp(r_i - f_i/eps) b_j``, and the
factor of row ``i`` cancels in the row normalisation. The row shift ``r_i``
keeps rows from underflowing: without it, a query whose dual is far below its
competitors in every column (``~ 87 eps`` in fp32) would come out 0/0; with it
each valid row has an entry 1 at a valid key and ``w_j >= 1/n``, so every
denominator is at least ``1/n``. The column sums are one vector-matrix
product (``e^r`` against ``E``); ``E`` is then scaled by ``w`` in place and one
GEMM against ``v`` plus a row sum give the rows (a GEMM against ``[v, 1]``, of
width ``dv + 1``, was measured 1.2x slower than the one against ``v``), so one
exponential pass and two large GEMMs give both halves.

The ``(n, m)`` block is materialised for a chunk of ``(b, h)`` problems at a
time (``chunk_bytes``, default small enough to stay in a CPU's L2 cache), so
memory is bounded by one chunk, never ``(b, h, n, m)``; a single problem larger
than the chunk is still one block, which is why the dispatcher in
:func:`asap.attention.functional.asap_attention` only takes this path up to
:data:`SHARED_MAX_BLOCK_BYTES`. Inference only (the blocks are overwritten in
place); the reference is :func:`asap.attention.reference.asap_attention_reference`.

Unpadded fp32 blocks take their elementwise passes (the maxima, the exponentials, the weights and the
denominators) in one native call per chunk, :func:`asap.attention.native.closure_blocks`: four passes
over a block instead of the nine of the PyTorch ops, split over torch's threads; the GEMMs stay
torch's. fp64, padded inputs and machines without the native kernels run the PyTorch ops below.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from asap.attention import native

#: One chunk of score blocks (fp32 bytes): 4 MiB was fastest or within noise of it at 11 of 13
#: shapes from n = 16 to 1024 (scripts/bench_asap_paths.py, results/bench/asap_paths_*.json).
SHARED_CHUNK_BYTES = 4 * 2**20
#: Largest single (n, m) block the dispatcher sends here (fp32 bytes); above it the two-pass path runs.
SHARED_MAX_BLOCK_BYTES = 16 * 2**20


def shared_exp_closure(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    f: Tensor,
    *,
    scale: float,
    eps: float,
    valid: Tensor | None = None,
    chunk_bytes: int = SHARED_CHUNK_BYTES,
    native_passes: bool = True,
) -> Tensor:
    """``softmax_j((S_ij + ccol(f)_j) / eps) v`` with one exponential per score: ``(b, h, n, dv)``.

    Args:
        q, k, v: ``(b, h, n, d)``, ``(b, h, m, d)``, ``(b, h, m, dv)`` in fp32 or fp64 (any strides).
        f: the query dual ``(b, h, n)`` (any constant offset per ``(b, h)``).
        valid: optional token mask ``(b, n)`` of self-attention padding (True = real token):
            padded queries and keys get no mass and padded queries output 0.
        chunk_bytes: memory of the score blocks held at once.
        native_passes: unpadded fp32 inference runs the elementwise passes as one native call per
            chunk (:func:`asap.attention.native.closure_blocks`, where the kernels are built); False
            keeps the PyTorch ops (the path of fp64, padded inputs and machines without the kernels).
    """
    b, h, n, d = q.shape
    m, dv = k.shape[-2], v.shape[-1]
    dtype = q.dtype
    problems = b * h
    bias = (f if eps == 1.0 else f / eps).reshape(problems, n, 1)
    key_bias = None
    if valid is not None:
        neg_inf = torch.full((), float("-inf"), dtype=dtype, device=q.device)
        tokens = valid[:, None, :].expand(b, h, n).reshape(problems, n)
        bias = torch.where(tokens.unsqueeze(-1), bias, neg_inf)
        key_bias = torch.where(tokens, torch.zeros((), dtype=dtype, device=q.device), neg_inf).unsqueeze(-2)
        key_valid = tokens.unsqueeze(-2)  # (problems, 1, m): m = n for self-attention
        zero = torch.zeros((), dtype=dtype, device=q.device)
    per_chunk = max(1, chunk_bytes // max(1, n * m * torch.finfo(dtype).bits // 8))
    if native_passes and valid is None and dtype == torch.float32 and native.supports_blocks(q, k, v, f) is None:
        # the native passes split a chunk's blocks over torch's threads: give each thread a block
        per_chunk = max(per_chunk, min(torch.get_num_threads(), problems))
        out = _native_closure(q, k, v, bias, alpha=scale / eps, per_chunk=per_chunk)
        return out.reshape(b, h, n, dv)
    qs = q.reshape(problems, n, d)
    kt = k.reshape(problems, m, d).transpose(-1, -2)
    vp = v.reshape(problems, m, dv)
    out = torch.empty(problems, n, dv, dtype=dtype, device=q.device)
    for start in range(0, problems, per_chunk):  # static Python loop over chunks: no host sync
        part = slice(start, min(start + per_chunk, problems))
        w = torch.baddbmm(bias[part], qs[part], kt[part], alpha=scale / eps)  # (c, n, m) = (S + f) / eps
        if key_bias is not None:
            w.add_(key_bias[part])
        col_max = w.amax(dim=-2, keepdim=True)
        if key_bias is not None:  # a padded key's column (or an empty sequence) is all -inf
            col_max = torch.nan_to_num_(col_max, neginf=0.0)
        w.sub_(col_max)
        row_shift = w.amax(dim=-1, keepdim=True)  # <= 0
        if key_bias is not None:
            row_shift = torch.nan_to_num_(row_shift, neginf=0.0)  # padded query rows: 0
        w.sub_(row_shift).exp_()
        weight = torch.bmm(row_shift.exp_().transpose(-1, -2), w).reciprocal_()  # (c, 1, m)
        if key_bias is not None:
            weight = torch.where(key_valid[part], weight, zero)
        w.mul_(weight)  # E_ij w_j: the row softmax up to a factor per row
        rows = out[part]
        torch.bmm(w, vp[part], out=rows)
        rows.div_(w.sum(dim=-1, keepdim=True))
        del w  # free this chunk's block before the next one is allocated
    out = out.reshape(b, h, n, dv)
    if valid is not None:
        out = torch.where(valid[:, None, :, None], out, zero)
    return out


def _native_closure(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, *, alpha: float, per_chunk: int) -> Tensor:
    """The unpadded fp32 closure with the elementwise passes in one native call per chunk: ``(b h, n, dv)``.

    torch's GEMMs write ``S`` into one chunk buffer and compute the rows from it;
    :func:`asap.attention.native.closure_blocks` does the rest in four passes over each block instead of
    the nine of the PyTorch ops (``scripts/bench_asap_paths.py`` times both). The block rows are padded to
    whole vectors (keys padded with zeros, the extra columns masked in the kernel); the chunk buffer is
    kept between calls (:func:`_chunk_buffer`).
    """
    b, h, n, d = q.shape
    m, dv = k.shape[-2], v.shape[-1]
    problems = b * h
    ld = -(-m // native.LANES) * native.LANES
    keys = k.reshape(problems, m, d)
    if ld != m:
        keys = torch.cat([keys, keys.new_zeros(problems, ld - m, d)], dim=1)
    qs, kt = q.reshape(problems, n, d), keys.transpose(-1, -2)
    vp = v.reshape(problems, m, dv)
    bias = bias.reshape(problems, n).contiguous()
    den = torch.empty(problems, n, dtype=q.dtype)
    out = torch.empty(problems, n, dv, dtype=q.dtype)
    block = _chunk_buffer(min(per_chunk, problems) * n * ld).view(-1, n, ld)
    for start in range(0, problems, per_chunk):  # static Python loop over chunks: no host sync
        part = slice(start, min(start + per_chunk, problems))
        scores = block[: part.stop - part.start]
        torch.bmm(qs[part], kt[part], out=scores)
        native.closure_blocks(scores, bias[part], den[part], alpha=alpha, columns=m)
        rows = out[part]
        torch.bmm(scores[..., :m], vp[part], out=rows)
        rows.div_(den[part].unsqueeze(-1))
    return out


_workspace = threading.local()


def _chunk_buffer(numel: int) -> Tensor:
    """A flat fp32 CPU buffer of ``numel`` elements, kept per thread and reused by the next call.

    A fresh multi-MiB tensor is a fresh ``mmap`` whenever glibc's heuristics decide so, and then every
    call page-faults its way through it: measured at 8 x 8 x 64 x 64, ~480 faults and +0.8 ms (0.6 softmax
    calls) per call, depending on what ran before. The buffer holds one chunk: :data:`SHARED_CHUNK_BYTES`,
    or one block per torch thread when blocks are larger (up to :data:`SHARED_MAX_BLOCK_BYTES` each from
    the dispatcher), kept per Python thread that ran the closure.
    """
    buffer = getattr(_workspace, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=torch.float32)
        _workspace.buffer = buffer
    return buffer[:numel]

