"""ASAP's forward pass as two Triton kernels (GPU path; inference only).

ASAP (METHOD.md sec. 4) is two reductions of the ``n x m`` score matrix
``S_ij = scale <q_i, k_j>``, each a flash-attention-style pass that never holds
more than one ``(block, block)`` tile of scores:

1. the column log-sum-exp over queries, with the query dual as a per-query bias
   (:func:`column_logsumexp_triton`), from which the key dual is formed
   (:func:`key_dual_triton`)::

       lse_j = LSE_{i valid} ( (S_ij + f_i) / eps )          # fp32, (b, h, m)
       g_j   = eps * (log b_j - lse_j),  b_j = 1 / m_valid   # valid keys; 0 at padding keys

   i.e. ``g = ccol(f)`` exactly as :func:`asap.transport.ctransform.c_transform_cols_tiled`;

2. the row pass, an attention forward with an additive per-key bias
   (:func:`biased_row_attention_triton`)::

       out_i = sum_{j valid} softmax_j( (S_ij + g_j) / eps ) v_j        # (b, h, n, dv)

   with padding queries output exactly 0, as
   :func:`asap.attention.functional._biased_row_attention`.

:func:`asap_attention_triton` composes them and equals
:func:`asap.attention.functional.asap_attention` (forward only).

Shapes follow the project: ``q (b, h, n, d)``, ``k (b, h, m, d)``,
``v (b, h, m, dv)``, ``f (b, h, n)``; any strides (transposed, sliced, expanded
inputs are read in place: every stride goes to the kernel). Head sizes are
arbitrary (blocks padded to a power of two, at least 16, and masked) up to
:data:`MAX_HEAD_DIM`. Inputs fp16 / bf16 / fp32; the scores are accumulated in
fp32 (``tl.dot`` with fp32 output; fp32 inputs use ``input_precision="ieee"``,
not TF32, unless ``allow_tf32=True``), and both log-sum-exps are online
(running max and rescaled sum, in base 2) in fp32. The biases ``f / eps`` and
``g / eps`` stay fp32 (the PyTorch path rounds ``g / eps`` to the input dtype).

Padding. Masks are "True = real token" vectors ``query_valid (b, n)`` or
``(b, h, n)`` and ``key_valid (b, m)`` or ``(b, h, m)``: the attention mask is
their outer product, the only kind of mask padding produces
(:func:`asap.transport.masks.key_padding_to_attn_mask`). As in
:func:`asap.transport.masks.support`, a query is *valid* if it is real and some
key is real, a key if it is real and some query is real; marginals are
uniform over valid tokens. :func:`asap_attention_triton` also takes the
project's boolean ``attn_mask`` (broadcastable to ``(b, h, n, m)``) when it is
such an outer product; its row and column supports are read from it with
``any`` (no host sync), and a mask varying over both ``n`` and ``m`` is checked
to be an outer product, which costs one host sync (``check_mask=False`` skips
it; passing the padding vectors never needs it).

Running on a CPU. Triton reads ``TRITON_INTERPRET`` when ``@triton.jit``
decorates a kernel, i.e. when this module is imported: with
``TRITON_INTERPRET=1`` set before the import, the kernels run on CPU tensors
through Triton's NumPy interpreter (slowly; this is how the tests run in CI;
it need not be set before ``triton`` itself is imported, see ``_MAX_COMBINE``).
:data:`INTERPRET` records the mode the kernels were built in. Without it the
kernels need CUDA tensors; :func:`compile_for_target` compiles them for sm_90
ahead of time without a GPU (a test does), which checks what the interpreter
cannot: that they lower to PTX, assemble and fit in shared memory. :func:`supports` says, without running anything,
whether a call can take this path (None) or why not (a one-line reason), so a
``backend="triton"`` switch can fall back to the PyTorch path.

Benchmarking on a GPU. ``scripts/bench_triton_gpu.py --out FILE.json`` (it refuses
to run without CUDA) times, on one GPU, :func:`asap_attention_triton` from a given
``f_hat`` and with the L = 16 slice dual map in front, against
``scaled_dot_product_attention`` (one softmax pass, the floor), the PyTorch ASAP path
(:func:`asap.attention.functional.asap_attention`, and the whole
:class:`~asap.attention.operators.AsapOperator`) and the Sinkhorn teacher
(:func:`asap.attention.functional.sinkhorn_attention`, K = 3, 11, 21), at
b = 4, h = 8, d = 64, n = 512 ... 8192 (fp16 by default; ``--dtypes`` adds bf16 / fp32),
unpadded and with about a quarter of the tokens padded. Each setting is one
interleaved run of :func:`asap.bench.measure.benchmark` (round-robin calls, so drifts
of clock and temperature hit every method alike; CUDA events; medians and IQRs;
out-of-memory recorded as a result) after an untimed parity check of the Triton path
against the PyTorch path and, up to n = 1024, the fp64 reference by the low-precision
rule; the JSON records the peak memory of each call (``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``, beyond the inputs), the speed-ups over the K = 21
teacher, the time in softmax calls, the tiles, the GPU, versions and the load average.
Expected: ASAP at about two softmax passes (two kernels of one attention pass each)
and O(b h n) memory beyond inputs and output, against K passes and O(b h n m) memory
for the teacher. The tiles (``_TILES``) are first guesses to be tuned from that run.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from asap.attention.checks import check_positive, default_scale, validate_attention_inputs

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # optional extra: asap-attention[triton]
    triton = None
    tl = None
    TRITON_IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    TRITON_IMPORT_ERROR = None

#: Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import).
INTERPRET: bool = bool(triton is not None and triton.knobs.runtime.interpret)

#: Largest head size (q/k and v) the kernels take: one block holds a whole head row.
MAX_HEAD_DIM = 256

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Largest element offset a kernel computes in int32 (see ``_unsupported``).
_MAX_OFFSET = 2**31

_LOG2E = math.log2(math.e)


if triton is not None:

    # The reductions are tl.reduce calls with the combine functions of tl.max / tl.sum (the same
    # code on a GPU), not tl.max / tl.sum themselves: those are @triton.jit functions of Triton's
    # standard library, decorated when triton is imported, so under the interpreter they would
    # only run if TRITON_INTERPRET=1 was set before triton's own import (the tests cannot control
    # who imports triton first). The interpreter reduces these two combine functions with NumPy;
    # if a Triton release renames them, our own (slow under the interpreter, equal on a GPU) serve.
    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _sum_combine(a, b):
        return a + b

    _MAX_COMBINE = getattr(tl.standard, "_elementwise_max", _max_combine)
    _SUM_COMBINE = getattr(tl.standard, "_sum_combine", _sum_combine)

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
        """``a @ b`` with an fp32 result; ``DOT_FP32`` upcasts the operands first.

        Triton 3.7's interpreter multiplies bf16 operands as their raw uint16 bits, so
        under the interpreter bf16 operands are upcast: bf16 products are exact in fp32,
        so this is the GPU's bf16 dot (fp32 accumulation) up to the order of the sum.
        """
        if DOT_FP32:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(a, b, input_precision=PRECISION)
        return out

    @triton.jit
    def _column_lse_kernel(
        Q, K, FB, LSE,
        sq_b, sq_h, sq_n, sq_d,
        sk_b, sk_h, sk_m, sk_d,
        sf_b, sf_h, sf_n,
        H, N, M, D,
        qk_scale,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        """One program: ``BLOCK_M`` keys of one (b, h); online base-2 LSE over blocks of ``BLOCK_N`` queries.

        ``FB`` holds ``f_i / eps * log2(e)`` (``-inf`` at padding queries), ``qk_scale`` is
        ``scale / eps * log2(e)``; ``LSE`` (contiguous ``(b, h, m)`` fp32) receives the natural-log LSE.
        """
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        ib = (pid_bh // H).to(tl.int64)
        ih = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n0 = tl.arange(0, BLOCK_N)
        k_ptrs = K + ib * sk_b + ih * sk_h + offs_m[:, None] * sk_m + offs_d[None, :] * sk_d
        keys = tl.load(k_ptrs, mask=(offs_m[:, None] < M) & (offs_d[None, :] < D), other=0.0)
        q_base = Q + ib * sq_b + ih * sq_h
        f_base = FB + ib * sf_b + ih * sf_h
        run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        run_sum = tl.full([BLOCK_M], 0.0, tl.float32)
        for start in range(0, N, BLOCK_N):
            offs_n = start + offs_n0
            q_t = tl.load(
                q_base + offs_d[:, None] * sq_d + offs_n[None, :] * sq_n,
                mask=(offs_d[:, None] < D) & (offs_n[None, :] < N),
                other=0.0,
            )  # (BLOCK_D, BLOCK_N): queries transposed, so the reduction runs over the tile's columns
            fb = tl.load(f_base + offs_n * sf_n, mask=offs_n < N, other=float("-inf"))
            s = _dot(keys, q_t, PRECISION, DOT_FP32) * qk_scale + fb[None, :]
            new_max = tl.maximum(run_max, tl.reduce(s, 1, _MAX_COMBINE))
            # A key that has seen only padding so far has max -inf: shift by 0 there, so that
            # exp2(-inf - shift) = 0 instead of exp2(-inf + inf) = NaN.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp2(run_max - shift) + tl.reduce(tl.exp2(s - shift[:, None]), 1, _SUM_COMBINE)
            run_max = new_max
        seen = run_sum > 0.0  # False only for a key of a sequence without a valid query
        lse = tl.where(seen, (run_max + tl.log2(tl.where(seen, run_sum, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + pid_bh.to(tl.int64) * M + offs_m, lse, mask=offs_m < M)

    @triton.jit
    def _row_attention_kernel(
        Q, K, V, GB, ROWS, OUT,
        sq_b, sq_h, sq_n, sq_d,
        sk_b, sk_h, sk_m, sk_d,
        sv_b, sv_h, sv_m, sv_d,
        sg_b, sg_h, sg_m,
        sr_b, sr_h, sr_n,
        so_b, so_h, so_n, so_d,
        H, N, M, D, DV,
        qk_scale,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, HAS_ROWS: tl.constexpr,
    ):
        """One program: ``BLOCK_N`` queries of one (b, h); flash-attention forward over blocks of keys.

        ``GB`` holds ``g_j / eps * log2(e)`` (``-inf`` at padding keys); ``ROWS`` (int8, if
        ``HAS_ROWS``) marks valid queries, whose complement is written as exact zeros.
        """
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        ib = (pid_bh // H).to(tl.int64)
        ih = (pid_bh % H).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_m0 = tl.arange(0, BLOCK_M)
        q_ptrs = Q + ib * sq_b + ih * sq_h + offs_n[:, None] * sq_n + offs_d[None, :] * sq_d
        queries = tl.load(q_ptrs, mask=(offs_n[:, None] < N) & (offs_d[None, :] < D), other=0.0)
        k_base = K + ib * sk_b + ih * sk_h
        v_base = V + ib * sv_b + ih * sv_h
        g_base = GB + ib * sg_b + ih * sg_h
        run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
        run_sum = tl.full([BLOCK_N], 0.0, tl.float32)
        acc = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)
        for start in range(0, M, BLOCK_M):
            offs_m = start + offs_m0
            k_t = tl.load(
                k_base + offs_d[:, None] * sk_d + offs_m[None, :] * sk_m,
                mask=(offs_d[:, None] < D) & (offs_m[None, :] < M),
                other=0.0,
            )
            gb = tl.load(g_base + offs_m * sg_m, mask=offs_m < M, other=float("-inf"))
            s = _dot(queries, k_t, PRECISION, DOT_FP32) * qk_scale + gb[None, :]
            new_max = tl.maximum(run_max, tl.reduce(s, 1, _MAX_COMBINE))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # as in _column_lse_kernel
            alpha = tl.exp2(run_max - shift)
            p = tl.exp2(s - shift[:, None])
            run_sum = run_sum * alpha + tl.reduce(p, 1, _SUM_COMBINE)
            values = tl.load(
                v_base + offs_m[:, None] * sv_m + offs_dv[None, :] * sv_d,
                mask=(offs_m[:, None] < M) & (offs_dv[None, :] < DV),
                other=0.0,
            )
            acc = acc * alpha[:, None] + _dot(p.to(values.dtype), values, PRECISION, DOT_FP32)
            run_max = new_max
        keep = run_sum > 0.0  # False only where every key is padding
        if HAS_ROWS:
            rows = tl.load(ROWS + ib * sr_b + ih * sr_h + offs_n * sr_n, mask=offs_n < N, other=0)
            keep = keep & (rows != 0)
        out = acc / tl.where(keep, run_sum, 1.0)[:, None]
        out = tl.where(keep[:, None], out, 0.0)
        o_ptrs = OUT + ib * so_b + ih * so_h + offs_n[:, None] * so_n + offs_dv[None, :] * so_d
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_dv[None, :] < DV))


def _block(size: int) -> int:
    """A power of two >= 16 covering ``size`` (``tl.dot`` wants every dimension >= 16)."""
    return max(16, triton.next_power_of_2(size))


def _check_block(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"asap triton: {name} must be a power of two >= 16, got {value!r}")
    return value


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str | None:
    """``tl.dot``'s input precision: IEEE fp32 products for fp32 inputs (TF32 would cost ~1e-3 parity)."""
    if dtype != torch.float32:
        return None
    return "tf32" if allow_tf32 else "ieee"


def _dot_fp32(dtype: torch.dtype) -> bool:
    """Upcast ``tl.dot`` operands: only for bf16 under the interpreter (see ``_dot``)."""
    return INTERPRET and dtype == torch.bfloat16


#: Default tiles ``(block_q, block_k, num_warps, num_stages)`` by (bytes per element, padded head
#: size): ``"row"`` = queries per program x keys per step, ``"col"`` = queries per step x keys
#: per program. Sized from the shared memory Triton 3.7 reports when compiling these kernels
#: for sm_90 (:func:`compile_for_target`): at most 100 KiB of the 227 KiB an H100/H200 block may
#: use, e.g. fp16, d = 64: 24 KiB (row and col); fp32, d = 256: 100 KiB (row) / 96 KiB (col).
#: Flash-attention-like shapes; to be tuned by ``scripts/bench_triton_gpu.py`` on a lent GPU.
_TILES = {
    "row": {
        (2, 64): (128, 64, 4, 3), (2, 128): (128, 64, 8, 3), (2, 256): (64, 64, 8, 2),
        (4, 64): (64, 64, 4, 2), (4, 128): (64, 32, 8, 2), (4, 256): (32, 32, 8, 2),
    },
    "col": {
        (2, 64): (64, 128, 4, 3), (2, 128): (64, 128, 8, 3), (2, 256): (64, 128, 8, 2),
        (4, 64): (64, 128, 4, 2), (4, 128): (64, 64, 8, 2), (4, 256): (32, 64, 8, 2),
    },
}


def _tiles(kind: str, dtype: torch.dtype, head_dim: int, block_q: int | None, block_k: int | None):
    """``(block_q, block_k, launch options)`` for a kernel: the defaults of :data:`_TILES`, or the caller's blocks."""
    size = 2 if dtype in (torch.float16, torch.bfloat16) else 4
    padded = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    default_q, default_k, warps, stages = _TILES[kind][(size, padded)]
    block_q = _check_block("block_q", block_q, default_q)
    block_k = _check_block("block_k", block_k, default_k)
    # The interpreter ignores warps and stages; a compiled launch with the caller's larger
    # blocks keeps the default pipeline depth only if the tiles are no larger than the defaults.
    options = {} if INTERPRET else {
        "num_warps": warps,
        "num_stages": stages if block_q * block_k <= default_q * default_k else 1,
    }
    return block_q, block_k, options


def _as_bh(valid: Tensor | None, b: int, h: int, length: int, name: str) -> Tensor | None:
    """A padding vector ``(b, length)`` or ``(b, h, length)`` (bool, True = real token) as ``(b, h|1, length)``."""
    if valid is None:
        return None
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
        got = valid.dtype if isinstance(valid, Tensor) else type(valid).__name__
        raise TypeError(f"asap triton: {name} must be a bool tensor (True = real token), got {got}")
    if valid.dim() == 2:
        valid = valid.unsqueeze(1)
    if valid.dim() != 3 or valid.shape[0] != b or valid.shape[1] not in (1, h) or valid.shape[2] != length:
        raise ValueError(
            f"asap triton: {name} must have shape (b, {length}) or (b, h, {length}) with b = {b}, h = {h}, "
            f"got {tuple(valid.shape)}"
        )
    return valid


def _padding(
    b: int, h: int, n: int, m: int, query_valid: Tensor | None, key_valid: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | float]:
    """Valid queries ``(b, h|1, n)``, valid keys ``(b, h|1, m)`` and ``log b = -log m_valid`` ``(b, h|1, 1)``.

    As :func:`asap.transport.masks.support` for the mask ``query_valid_i & key_valid_j``: a
    query counts only if some key is real, a key only if some query is real. No host sync.
    """
    qv = _as_bh(query_valid, b, h, n, "query_valid")
    kv = _as_bh(key_valid, b, h, m, "key_valid")
    if qv is None and kv is None:
        return None, None, -math.log(m)
    if qv is None:
        rows = kv.any(dim=-1, keepdim=True).expand(-1, -1, n)
        cols = kv
    elif kv is None:
        rows = qv
        cols = qv.any(dim=-1, keepdim=True).expand(-1, -1, m)
    else:
        rows = qv & kv.any(dim=-1, keepdim=True)
        cols = kv & qv.any(dim=-1, keepdim=True)
    # clamp(min=1): an all-padding sequence keeps a finite (and unused) marginal.
    log_b = -cols.sum(dim=-1, keepdim=True).clamp(min=1).to(torch.float32).log()
    return rows, cols, log_b


def _padding_from_mask(attn_mask: Tensor, n: int, m: int, *, check: bool) -> tuple[Tensor, Tensor]:
    """``(query_valid (b|1, h|1, n), key_valid (b|1, h|1, m))`` of a boolean padding mask.

    The supports are ``any`` over keys and over queries; the mask must be their outer
    product (what :func:`asap.transport.masks.key_padding_to_attn_mask` builds). A mask
    constant along queries or keys always is; otherwise ``check`` verifies it (one host sync).
    """
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    rows = mask.any(dim=-1)  # (B, H, n | 1)
    cols = mask.any(dim=-2)  # (B, H, m | 1)
    if check and mask.shape[-2] > 1 and mask.shape[-1] > 1:
        if not bool((mask == (rows.unsqueeze(-1) & cols.unsqueeze(-2))).all()):
            raise ValueError(
                "asap triton: attn_mask is not a padding mask (the outer product of valid queries and "
                "valid keys); use asap.attention.asap_attention for general masks"
            )
    return rows.expand(*rows.shape[:-1], n), cols.expand(*cols.shape[:-1], m)


def _combine(mask_valid: Tensor, valid: Tensor | None) -> Tensor:
    """AND of the support read from ``attn_mask`` ``(b, h|1, len)`` and an explicit padding vector."""
    return mask_valid if valid is None else mask_valid & valid


def _check_inference(*tensors: Tensor) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            "asap triton: the Triton kernels are inference-only (no backward); run under torch.no_grad() "
            "or torch.inference_mode(), or use asap.attention.asap_attention for training"
        )


def _check_tensors(q: Tensor, k: Tensor, v: Tensor | None = None) -> None:
    """The checks that :func:`supports` reports as reasons, raised as one-line errors."""
    reason = _unsupported(q, k, v)
    if reason is not None:
        raise ValueError(f"asap triton: {reason}")


def _unsupported(q: Tensor, k: Tensor, v: Tensor | None) -> str | None:
    if triton is None:
        return f"triton is not importable ({TRITON_IMPORT_ERROR}); install asap-attention[triton]"
    tensors = (q, k) if v is None else (q, k, v)
    reason = placement_reason(tensors, interpret=INTERPRET, module=__name__, names="q, k, v")
    if reason is not None:
        return reason
    dims = (q.shape[-1],) if v is None else (q.shape[-1], v.shape[-1])
    if max(dims) > MAX_HEAD_DIM:
        return f"head size {max(dims)} is larger than {MAX_HEAD_DIM}"
    if any(t.numel() == 0 for t in tensors):
        return "empty input"
    return offsets_reason(tensors)


def placement_reason(tensors: tuple[Tensor, ...], *, interpret: bool, module: str, names: str) -> str | None:
    """Why ``tensors`` cannot go to the Triton kernels of ``module`` here (device, interpreter mode, dtypes), or None.

    ``interpret`` is the mode ``module``'s kernels were built in; ``names`` names the tensors in the reason.
    """
    q = tensors[0]
    if q.device.type == "cpu":
        if not interpret:
            return (
                "CPU tensors run the Triton kernels only under the interpreter: set TRITON_INTERPRET=1 "
                f"before importing {module}"
            )
    elif q.device.type != "cuda":
        return f"the Triton kernels need CUDA tensors (or CPU under TRITON_INTERPRET=1), got {q.device}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (fp16, bf16, fp32; fp64 stays on the PyTorch path)"
    if any(t.dtype != q.dtype or t.device != q.device for t in tensors):
        return f"{names} must share a dtype and a device"
    return None


def offsets_reason(tensors: tuple[Tensor, ...]) -> str | None:
    """Why a kernel's int32 offsets cannot reach every element of ``tensors``, or None.

    In-kernel offsets inside one (b, h) slab are int32 products (offset x stride); only the
    batch and head offsets are int64. Refuse rather than overflow silently.
    """
    for t in tensors:
        if sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) >= _MAX_OFFSET:
            return f"a tensor of shape {tuple(t.shape)} and strides {t.stride()} needs offsets beyond int32"
    return None


def supports(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    f_hat: Tensor | None = None,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    query_valid: Tensor | None = None,
    key_valid: Tensor | None = None,
) -> str | None:
    """``None`` if :func:`asap_attention_triton` can run this call, else a one-line reason.

    Runs nothing and reads no tensor values (no host sync): the reasons are the
    inputs' types, shapes, dtypes, devices, autograd and the Triton install. A
    boolean ``attn_mask`` varying over both queries and keys is accepted here but
    must be a padding (outer-product) mask, which :func:`asap_attention_triton`
    checks when called.
    """
    try:
        validate_attention_inputs(q, k, v, attn_mask=attn_mask, is_causal=is_causal, method="asap (triton)")
    except (TypeError, ValueError) as exc:
        return str(exc)
    reason = _unsupported(q, k, v)
    if reason is not None:
        return reason
    if torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in (q, k, v, f_hat)
    ):
        return "autograd: the Triton kernels are inference-only (no backward)"
    b, h, n, _ = q.shape
    for name, valid, length in (("query_valid", query_valid, n), ("key_valid", key_valid, k.shape[-2])):
        try:
            valid = _as_bh(valid, b, h, length, name)
        except (TypeError, ValueError) as exc:
            return str(exc)
        if valid is not None and valid.device != q.device:
            return f"{name} is on {valid.device}, q on {q.device}"
    if f_hat is not None and (not isinstance(f_hat, Tensor) or f_hat.shape != q.shape[:-1]):
        return f"f_hat must have shape (b, h, n) = {tuple(q.shape[:-1])}"
    return None


def column_logsumexp_triton(
    q: Tensor,
    k: Tensor,
    f: Tensor,
    *,
    scale: float,
    eps: float,
    query_valid: Tensor | None = None,
    key_valid: Tensor | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    allow_tf32: bool = False,
) -> Tensor:
    """``lse_j = LSE_{i valid}( (scale <q_i, k_j> + f_i) / eps )`` for every key: fp32 ``(b, h, m)``.

    Args:
        q: queries ``(b, h, n, d)``; k: keys ``(b, h, m, d)``; f: query dual
            ``(b, h, n)`` (any float dtype, used in fp32; any strides).
        query_valid, key_valid: padding vectors ``(b, n)`` / ``(b, h, n)`` and
            ``(b, m)`` / ``(b, h, m)``, True = real token. Padding queries are left
            out of the sum (an additive ``-inf`` on their bias).
        block_q, block_k: queries per inner step and keys per program (powers of
            two >= 16; defaults by dtype and head size, ``_TILES["col"]``).
        allow_tf32: let fp32 products run in TF32 (faster on GPUs, ~1e-3 relative error).

    One program per block of keys and (b, h); the reduction over queries is an
    online log-sum-exp in fp32, so memory is ``O(b h m)`` beyond the inputs. The
    result equals :func:`asap.transport.ctransform.column_logsumexp` with
    ``Support.col_bias`` at every valid key; at a key that is not valid (padding,
    or a sequence without a valid query) it is 0, since that key's dual is discarded.
    """
    if not (isinstance(q, Tensor) and isinstance(k, Tensor)) or q.dim() != 4 or k.dim() != 4 or (
        q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]
    ):
        raise ValueError(f"asap triton: q (b, h, n, d) and k (b, h, m, d) do not match: {tuple(q.shape)}, {tuple(k.shape)}")
    b, h, n, d = q.shape
    m = k.shape[-2]
    if not isinstance(f, Tensor) or f.shape != (b, h, n):
        raise ValueError(f"asap triton: f must have shape (b, h, n) = {(b, h, n)}, got {tuple(getattr(f, 'shape', ()))}")
    _check_tensors(q, k)
    _check_inference(q, k, f)
    eps = check_positive("eps", eps)
    scale = check_positive("scale", scale)
    rows, cols, _ = _padding(b, h, n, m, query_valid, key_valid)
    return _column_lse(q, k, f, rows, cols, scale=scale, eps=eps, block_q=block_q, block_k=block_k, allow_tf32=allow_tf32)


def _column_lse(q, k, f, rows, cols, *, scale, eps, block_q, block_k, allow_tf32) -> Tensor:
    b, h, n, d = q.shape
    m = k.shape[-2]
    block_n, block_m, options = _tiles("col", q.dtype, d, block_q, block_k)
    fb = f.to(torch.float32) * (_LOG2E / eps)  # a fresh (b, h, n) fp32 tensor
    if rows is not None:
        fb = fb.masked_fill(~rows, float("-inf"))
    lse = torch.empty(b, h, m, dtype=torch.float32, device=q.device)
    _column_lse_kernel[(triton.cdiv(m, block_m), b * h)](
        q, k, fb, lse,
        *q.stride(), *k.stride(), *fb.stride(),
        h, n, m, d,
        scale / eps * _LOG2E,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=_block(d), PRECISION=_precision(q.dtype, allow_tf32),
        DOT_FP32=_dot_fp32(q.dtype), **options,
    )
    if cols is not None:
        lse = lse.masked_fill(~cols, 0.0)
    return lse


def key_dual_triton(
    q: Tensor,
    k: Tensor,
    f: Tensor,
    *,
    scale: float,
    eps: float,
    query_valid: Tensor | None = None,
    key_valid: Tensor | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    allow_tf32: bool = False,
) -> Tensor:
    """The key dual ``g = ccol(f)``: ``g_j = eps * (log b_j - lse_j)`` at valid keys, 0 at padding; fp32 ``(b, h, m)``.

    ``b_j = 1 / m_valid`` (valid keys of the sequence), ``lse`` from
    :func:`column_logsumexp_triton` (same arguments); equals
    :func:`asap.transport.ctransform.c_transform_cols_tiled`.
    """
    lse = column_logsumexp_triton(
        q, k, f, scale=scale, eps=eps, query_valid=query_valid, key_valid=key_valid,
        block_q=block_q, block_k=block_k, allow_tf32=allow_tf32,
    )
    b, h, n, _ = q.shape
    _, cols, log_b = _padding(b, h, n, k.shape[-2], query_valid, key_valid)
    return _key_dual(lse, cols, log_b, eps)


def _key_dual(lse: Tensor, cols: Tensor | None, log_b: Tensor | float, eps: float) -> Tensor:
    g = eps * (log_b - lse)
    if cols is not None:
        g = g.masked_fill(~cols, 0.0)
    return g


def biased_row_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    scale: float,
    eps: float,
    key_valid: Tensor | None = None,
    query_valid: Tensor | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    allow_tf32: bool = False,
) -> Tensor:
    """``out_i = sum_j softmax_j( (scale <q_i, k_j> + g_j) / eps ) v_j``: ``(b, h, n, dv)`` in the input dtype.

    Args:
        q, k, v: ``(b, h, n, d)``, ``(b, h, m, d)``, ``(b, h, m, dv)``, any strides.
        g: per-key bias ``(b, h, m)`` (the key dual; used in fp32).
        key_valid, query_valid: padding vectors as in :func:`column_logsumexp_triton`:
            padding keys get no weight, padding queries output exactly 0.
        block_q, block_k: queries per program and keys per inner step (powers of
            two >= 16; defaults by dtype and head size, ``_TILES["row"]``).

    A flash-attention forward with an additive key bias: one program per block of
    queries and (b, h), an online softmax over blocks of keys, fp32 accumulation
    (fp16/bf16 probabilities are rounded to the input dtype for the ``p @ v``
    product, as in flash attention). Equals
    :func:`asap.attention.functional._biased_row_attention` with the mask
    ``query_valid_i & key_valid_j``.
    """
    validate_attention_inputs(q, k, v, method="asap (triton)")
    _check_tensors(q, k, v)
    _check_inference(q, k, v, g)
    b, h, n, _ = q.shape
    m = k.shape[-2]
    if not isinstance(g, Tensor) or g.shape != (b, h, m):
        raise ValueError(f"asap triton: g must have shape (b, h, m) = {(b, h, m)}, got {tuple(getattr(g, 'shape', ()))}")
    eps = check_positive("eps", eps)
    scale = check_positive("scale", scale)
    rows, cols, _ = _padding(b, h, n, m, query_valid, key_valid)
    return _row_attention(q, k, v, g, rows, cols, scale=scale, eps=eps, block_q=block_q, block_k=block_k, allow_tf32=allow_tf32)


def _row_attention(q, k, v, g, rows, cols, *, scale, eps, block_q, block_k, allow_tf32) -> Tensor:
    b, h, n, d = q.shape
    m, dv = v.shape[-2], v.shape[-1]
    block_n, block_m, options = _tiles("row", q.dtype, max(d, dv), block_q, block_k)
    gb = g.to(torch.float32) * (_LOG2E / eps)
    if cols is not None:
        gb = gb.masked_fill(~cols, float("-inf"))
    out = torch.empty(b, h, n, dv, dtype=q.dtype, device=q.device)
    # Broadcast (b, 1, n) rows are expanded so that their head stride is 0 (a size-1 dim's stride is not).
    row_flags = out if rows is None else rows.to(torch.int8).expand(b, h, n)  # out: a placeholder pointer
    r_strides = (0, 0, 0) if rows is None else row_flags.stride()
    _row_attention_kernel[(triton.cdiv(n, block_n), b * h)](
        q, k, v, gb, row_flags, out,
        *q.stride(), *k.stride(), *v.stride(), *gb.stride(), *r_strides, *out.stride(),
        h, n, m, d, dv,
        scale / eps * _LOG2E,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=_block(d), BLOCK_DV=_block(dv),
        PRECISION=_precision(q.dtype, allow_tf32), DOT_FP32=_dot_fp32(q.dtype), HAS_ROWS=rows is not None,
        **options,
    )
    return out


def asap_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    f_hat: Tensor,
    *,
    eps: float = 1.0,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    query_valid: Tensor | None = None,
    key_valid: Tensor | None = None,
    check_mask: bool = True,
    block_q: int | None = None,
    block_k: int | None = None,
    allow_tf32: bool = False,
) -> Tensor:
    """ASAP attention (inference): ``g = ccol(f_hat)``, ``out = softmax((S + g) / eps) v``; ``(b, h, n, dv)``.

    The same operator as :func:`asap.attention.functional.asap_attention` (same
    arguments and conventions; ``f_hat (b, h, n)`` up to a constant), as two
    Triton kernels: :func:`column_logsumexp_triton` then
    :func:`biased_row_attention_triton`. Padding is given by ``query_valid`` /
    ``key_valid`` (see the module docstring) and/or ``attn_mask``, which must be
    a padding mask; one varying over both queries and keys is verified with one
    host sync unless ``check_mask=False``. No backward: inputs requiring grad
    (with grad enabled) are refused. ``block_q`` / ``block_k`` / ``allow_tf32``
    are passed to both kernels.
    """
    mask = validate_attention_inputs(q, k, v, attn_mask=attn_mask, is_causal=is_causal, method="asap (triton)")
    if not isinstance(f_hat, Tensor) or f_hat.shape != q.shape[:-1]:
        shape = tuple(f_hat.shape) if isinstance(f_hat, Tensor) else type(f_hat).__name__
        raise ValueError(f"asap triton: f_hat must have shape (b, h, n) = {tuple(q.shape[:-1])}, got {shape}")
    if not f_hat.is_floating_point() or f_hat.device != q.device:
        raise TypeError(f"asap triton: f_hat must be a floating tensor on {q.device}, got {f_hat.dtype} on {f_hat.device}")
    _check_tensors(q, k, v)
    _check_inference(q, k, v, f_hat)
    eps = check_positive("eps", eps)
    scale = default_scale(scale, q.shape[-1])
    b, h, n, _ = q.shape
    m = k.shape[-2]
    qv = _as_bh(query_valid, b, h, n, "query_valid")
    kv = _as_bh(key_valid, b, h, m, "key_valid")
    if mask is not None:
        mask_rows, mask_cols = _padding_from_mask(mask, n, m, check=check_mask)
        qv = _combine(mask_rows.expand(b, *mask_rows.shape[1:]), qv)
        kv = _combine(mask_cols.expand(b, *mask_cols.shape[1:]), kv)
    rows, cols, log_b = _padding(b, h, n, m, qv, kv)
    options = dict(scale=scale, eps=eps, block_q=block_q, block_k=block_k, allow_tf32=allow_tf32)
    lse = _column_lse(q, k, f_hat, rows, cols, **options)
    g = _key_dual(lse, cols, log_b, eps)
    return _row_attention(q, k, v, g, rows, cols, **options)


_POINTERS = {  # pointer arguments of each kernel: None = the input dtype
    "row": {"Q": None, "K": None, "V": None, "GB": "*fp32", "ROWS": "*i8", "OUT": None},
    "col": {"Q": None, "K": None, "FB": "*fp32", "LSE": "*fp32"},
}


def compile_for_target(
    *, arch: int = 90, dtype: torch.dtype = torch.float16, head_dim: int = 64, has_rows: bool = True
) -> dict[str, int]:
    """Compile both kernels ahead of time for ``sm_<arch>`` with the default tiles; no GPU needed.

    Checks what the interpreter cannot (that the kernels lower to PTX and assemble for a real
    target, and fit its shared memory). Needs the kernels built without the interpreter and
    Triton's NVIDIA backend (it ships ``ptxas``). Returns the shared memory in bytes per kernel.
    """
    if triton is None or INTERPRET:
        raise RuntimeError("asap triton: compile_for_target needs triton, imported without TRITON_INTERPRET=1")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    element = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    shared = {}
    for kind, kernel in (("row", _row_attention_kernel), ("col", _column_lse_kernel)):
        block_q, block_k, options = _tiles(kind, dtype, head_dim, None, None)
        block_d = _block(head_dim)
        constants = {"BLOCK_D": block_d, "PRECISION": _precision(dtype, False), "DOT_FP32": False}
        if kind == "row":
            constants.update(BLOCK_N=block_q, BLOCK_M=block_k, BLOCK_DV=block_d, HAS_ROWS=has_rows)
        else:
            constants.update(BLOCK_N=block_q, BLOCK_M=block_k)
        signature = {}
        for name in kernel.arg_names:
            if name in constants:
                signature[name] = "constexpr"
            elif name in _POINTERS[kind]:
                signature[name] = _POINTERS[kind][name] or f"*{element}"
            else:
                signature[name] = "fp32" if name == "qk_scale" else "i32"
        compiled = triton.compile(
            ASTSource(kernel, signature, constants),
            target=GPUTarget("cuda", arch, 32),
            options=options,
        )
        shared[kind] = compiled.metadata.shared
    return shared
