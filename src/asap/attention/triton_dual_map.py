"""The fused linear ASAP dual map (self-attention) as one Triton kernel (GPU path; inference only).

At short rows :meth:`asap.attention.dual_map.SliceDualMap.forward` is bound by
launch and dispatch overhead (some 25 small PyTorch ops, ``torch.sort`` among
them), not by work. :func:`slice_dual_map_triton` computes the same map,
uncentred, in one launch, one program per ``(b, h)`` (the maths in its
docstring). Triton has no argsort that suits this, so the 1-D matchings are
found without sorting: every rank is a count of comparisons, and the sorted
sums of the fused path become masked ``O(n^2)`` sums per slice, which is cheap
for the rows this path is for (at most :data:`MAX_N` tokens; longer rows are
no longer overhead-bound and stay on the PyTorch path).

Conventions as :mod:`asap.attention.triton_kernels`: ``q, k (b, h, n, d)`` of
any strides (transposed, sliced, expanded inputs are read in place), fp16 /
bf16 / fp32 inputs computed in fp32, padding given by ``valid (b, n)`` (True =
real token), no host synchronisation. With ``TRITON_INTERPRET=1`` set before
this module is imported the kernel runs on CPU tensors through Triton's
interpreter (how the tests run); :data:`INTERPRET` records the mode.
:func:`supports_dual_map` says, without running anything, whether a call can
take this path (None) or why not (a one-line reason), and
:func:`compile_dual_map_for_target` compiles the kernel for ``sm_90`` ahead of
time without a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asap.attention.checks import check_positive
from asap.attention.triton_kernels import (
    TRITON_IMPORT_ERROR,
    _block,
    offsets_reason,
    placement_reason,
    triton,
)

#: Whether this module's kernel was built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at
#: import). Its own flag, not ``triton_kernels.INTERPRET``: the mode is fixed when *this* module's
#: ``@triton.jit`` runs, which may differ from when ``triton_kernels`` was imported.
INTERPRET: bool = bool(triton is not None and triton.knobs.runtime.interpret)

#: Longest row (``n = m``) the kernel takes: its work is ``O(L n^2)`` per ``(b, h)``, one program each.
MAX_N = 256

#: Longest row :meth:`asap.attention.dual_map.SliceDualMap.forward` sends here (:func:`worth_it`). Measured on
#: one H200 (fp16, results/bench/asap_breakdown_cuda.json): the kernel took 0.09 / 0.19 / 0.23 ms at n = 16 /
#: 64 / 128 (b = 8, h = 8, d = 64) against 0.43 / 0.79 / 0.41 ms for the PyTorch ops, 0.33 against 0.42 ms at
#: the MiniLM teacher's 16 x 12 heads, d = 32, n = 128; but 0.74 against 0.69 ms at n = 256 (b = 8, h = 8)
#: and 1.12 against 0.45 ms at n = 256 with 16 x 12 heads: its work is O(L n^2) per program, one per head.
DISPATCH_MAX_N = 128


def worth_it(q: Tensor) -> bool:
    """Whether the kernel is measured faster than the PyTorch ops for ``q (b, h, n, d)`` (reads the shape only)."""
    return q.shape[-2] <= DISPATCH_MAX_N


#: Largest head size: a block of rows holds whole head rows (padded to a power of two >= 16).
MAX_HEAD_DIM = 128

#: Rows of the per-slice scratch of one ``(b, h)``: projections x, y, ranks of x, y, steps
#: (the kernel spells it ``5``).
_SCRATCH_ROWS = 5

if triton is not None:
    import triton.language as tl

    from asap.attention.triton_kernels import _SUM_COMBINE  # tl.sum's combine, usable under the interpreter

    # Only builtins of tl (tl.full, not tl.zeros; tl.reduce with _SUM_COMBINE, not tl.sum): the
    # @triton.jit helpers of Triton's standard library cannot run under the interpreter unless
    # TRITON_INTERPRET=1 was set before triton itself was imported (see triton_kernels).
    @triton.jit
    def _token_valid(VALID, valid_base, sv_n, idx, N, HAS_VALID: tl.constexpr):
        """Real tokens among the indices ``idx``: inside the row and, with ``HAS_VALID``, marked valid."""
        ok = idx < N
        if HAS_VALID:
            ok = ok & (tl.load(VALID + valid_base + idx * sv_n, mask=ok, other=0) != 0)
        return ok

    @triton.jit
    def _slice_dual_map_kernel(
        Q, K, DIRS, COEF, CMEAN, CNORM, VALID, WORK, OUT,
        sq_b, sq_h, sq_n, sq_d,
        sk_b, sk_h, sk_n, sk_d,
        st_h, st_l, st_d,
        sc_h, sc_l,
        sm_h, sn_h,
        sv_b, sv_n,
        H, N, D, L,
        scale,
        BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_VALID: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_NORM: tl.constexpr,
    ):
        """One program per (b, h): the uncentred dual map of its ``N`` queries into ``OUT`` (contiguous fp32).

        ``WORK`` is fp32 scratch of ``L * 5 * BLOCK_N`` per program (``_SCRATCH_ROWS = 5``) (rows x, y, rank x, rank y,
        step of each slice; ranks are small integers, exact in fp32). Values computed in one
        layout are reread in another (a block of ``BLOCK_J`` tokens against all ``BLOCK_N``),
        which Triton cannot slice out of registers: they go through this scratch, each row
        written once, with a barrier between writing and rereading (on a GPU, other threads of
        the program read them). ``OUT`` first holds the moment extras the same way.
        """
        pid = tl.program_id(0)
        ib = (pid // H).to(tl.int64)
        ih = (pid % H).to(tl.int64)
        q_base = Q + ib * sq_b + ih * sq_h
        k_base = K + ib * sk_b + ih * sk_h
        valid_base = ib * sv_b
        work = WORK + pid.to(tl.int64) * (L * 5 * BLOCK_N)
        out = OUT + pid.to(tl.int64) * N
        offs_j = tl.arange(0, BLOCK_J)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D

        # 1. Mean of the valid keys (for "qk_mean"); padding keys are masked out, not multiplied by 0,
        #    so whatever a padded position holds (even NaN) never reaches a valid query.
        if HAS_MEAN:
            k_sum = tl.full([BLOCK_D], 0, tl.float32)
            count = tl.full([BLOCK_J], 0, tl.float32)
            for start in range(0, N, BLOCK_J):
                rows = start + offs_j
                ok = _token_valid(VALID, valid_base, sv_n, rows, N, HAS_VALID)
                keys = tl.load(k_base + rows[:, None] * sk_n + offs_d[None, :] * sk_d,
                               mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                k_sum += tl.reduce(keys, 0, _SUM_COMBINE)
                count += ok.to(tl.float32)
            k_bar = k_sum / tl.maximum(tl.reduce(count, 0, _SUM_COMBINE), 1.0)
            c_mean = tl.load(CMEAN + ih * sm_h) * scale
        if HAS_NORM:
            c_norm = tl.load(CNORM + ih * sn_h) * (scale * scale)

        # 2. Per block of tokens: the moment extras of its queries (into OUT) and the projections
        #    x = <theta_l, q>, y = <theta_l, k> of every slice (into the scratch). Unscaled: the
        #    attention scale goes into the step factor.
        for start in range(0, N, BLOCK_J):
            rows = start + offs_j
            in_row = rows < N
            tile = in_row[:, None] & d_ok[None, :]
            queries = tl.load(q_base + rows[:, None] * sq_n + offs_d[None, :] * sq_d, mask=tile, other=0.0)
            keys = tl.load(k_base + rows[:, None] * sk_n + offs_d[None, :] * sk_d, mask=tile, other=0.0)
            queries = queries.to(tl.float32)
            keys = keys.to(tl.float32)
            extra = tl.full([BLOCK_J], 0, tl.float32)
            if HAS_MEAN:
                extra += c_mean * tl.reduce(queries * k_bar[None, :], 1, _SUM_COMBINE)
            if HAS_NORM:
                extra += c_norm * tl.reduce(queries * queries, 1, _SUM_COMBINE)
            tl.store(out + rows, extra, mask=in_row)
            for sl in range(L):
                theta = tl.load(DIRS + ih * st_h + sl * st_l + offs_d * st_d, mask=d_ok, other=0.0)
                row = work + sl * (5 * BLOCK_N)
                tl.store(row + rows, tl.reduce(queries * theta[None, :], 1, _SUM_COMBINE), mask=in_row)
                tl.store(row + BLOCK_N + rows, tl.reduce(keys * theta[None, :], 1, _SUM_COMBINE), mask=in_row)
        tl.debug_barrier()

        # 3. Per slice, with the ranks r (0-based, among valid tokens, ties broken by index, so a
        #    permutation) and the sorted values xs, ys, the 1-D query potential is
        #        phi(i) = sum_{s < r(i)} step_s,   step_s = -scale * ys_s * (xs_{s+1} - xs_s),
        #    the fused path's cumulative sum; each step is put at the query of rank s. All three
        #    are masked sums over blocks of BLOCK_J tokens j against all BLOCK_N tokens i.
        offs_i = tl.arange(0, BLOCK_N)
        i_ok = _token_valid(VALID, valid_base, sv_n, offs_i, N, HAS_VALID)
        f = tl.full([BLOCK_N], 0, tl.float32)
        for sl in range(L):
            row = work + sl * (5 * BLOCK_N)
            x = tl.load(row + offs_i, mask=offs_i < N, other=0.0)
            y = tl.load(row + BLOCK_N + offs_i, mask=offs_i < N, other=0.0)
            # Ranks: valid j before i (smaller value, or equal value and smaller index).
            rank_x = tl.full([BLOCK_N], 0, tl.int32)
            rank_y = tl.full([BLOCK_N], 0, tl.int32)
            for start in range(0, N, BLOCK_J):
                j = start + offs_j
                j_ok = _token_valid(VALID, valid_base, sv_n, j, N, HAS_VALID)[None, :]
                xj = tl.load(row + j, mask=j < N, other=0.0)[None, :]
                yj = tl.load(row + BLOCK_N + j, mask=j < N, other=0.0)[None, :]
                earlier = j[None, :] < offs_i[:, None]
                before_x = (xj < x[:, None]) | ((xj == x[:, None]) & earlier)
                before_y = (yj < y[:, None]) | ((yj == y[:, None]) & earlier)
                rank_x += tl.reduce((before_x & j_ok).to(tl.int32), 1, _SUM_COMBINE)
                rank_y += tl.reduce((before_y & j_ok).to(tl.int32), 1, _SUM_COMBINE)
            r = rank_x.to(tl.float32)
            tl.store(row + 2 * BLOCK_N + offs_i, r)
            tl.store(row + 3 * BLOCK_N + offs_i, rank_y.to(tl.float32))
            tl.debug_barrier()
            # The key matched to query i (the y of rank r(i)) and the next query value (the x of rank r(i) + 1).
            matched = tl.full([BLOCK_N], 0, tl.float32)
            x_next = tl.full([BLOCK_N], 0, tl.float32)
            for start in range(0, N, BLOCK_J):
                j = start + offs_j
                j_ok = _token_valid(VALID, valid_base, sv_n, j, N, HAS_VALID)[None, :]
                xj = tl.load(row + j, mask=j < N, other=0.0)[None, :]
                yj = tl.load(row + BLOCK_N + j, mask=j < N, other=0.0)[None, :]
                rxj = tl.load(row + 2 * BLOCK_N + j, mask=j < N, other=-1.0)[None, :]
                ryj = tl.load(row + 3 * BLOCK_N + j, mask=j < N, other=-1.0)[None, :]
                matched += tl.reduce(tl.where(j_ok & (ryj == r[:, None]), yj, 0.0), 1, _SUM_COMBINE)
                x_next += tl.reduce(tl.where(j_ok & (rxj == r[:, None] + 1.0), xj, 0.0), 1, _SUM_COMBINE)
            # At the last valid rank x_next is 0 and the step meaningless, but no query ranks above it.
            step = (tl.load(COEF + ih * sc_h + sl * sc_l) * -scale) * matched * (x_next - x)
            tl.store(row + 4 * BLOCK_N + offs_i, step)
            tl.debug_barrier()
            for start in range(0, N, BLOCK_J):
                j = start + offs_j
                j_ok = _token_valid(VALID, valid_base, sv_n, j, N, HAS_VALID)[None, :]
                rxj = tl.load(row + 2 * BLOCK_N + j, mask=j < N, other=0.0)[None, :]
                sj = tl.load(row + 4 * BLOCK_N + j, mask=j < N, other=0.0)[None, :]
                f += tl.reduce(tl.where(j_ok & (rxj < r[:, None]), sj, 0.0), 1, _SUM_COMBINE)

        f += tl.load(out + offs_i, mask=offs_i < N, other=0.0)  # the extras of step 2
        tl.store(out + offs_i, tl.where(i_ok, f, 0.0), mask=offs_i < N)


def _launch_config(n: int, d: int) -> dict[str, int]:
    """``BLOCK_N``, ``BLOCK_J``, ``BLOCK_D`` (and ``num_warps`` off the interpreter) for rows of ``n`` tokens.

    The comparison tiles are ``BLOCK_N x BLOCK_J`` with ``BLOCK_J = 4096 / BLOCK_N`` (at least 16,
    at most ``BLOCK_N``): one tile up to n = 64, 16-column blocks at n = 256, so that each live
    tile is at most 4096 values, 16 registers a thread at 8 warps. Several tiles are live at
    once: compiled for an H200 (Triton 3.6), 4 warps at BLOCK_N = 64 took all 255 registers a
    thread; 8 warps take about 150-160 there and 100-130 at BLOCK_N = 128 and 256, no spills.
    """
    block_n = _block(n)
    config = dict(BLOCK_N=block_n, BLOCK_J=min(block_n, max(16, 4096 // block_n)), BLOCK_D=_block(d))
    if not INTERPRET:
        config["num_warps"] = 4 if block_n <= 32 else 8
    return config


def supports_dual_map(q: Tensor, k: Tensor, valid: Tensor | None = None) -> str | None:
    """``None`` if :func:`slice_dual_map_triton` can run on these inputs, else a one-line reason.

    Reads no tensor values (no host sync): the reasons are the Triton install, the
    inputs' types, shapes, dtypes, devices, strides and autograd.
    """
    if triton is None:
        return f"triton is not importable ({TRITON_IMPORT_ERROR}); install asap-attention[triton]"
    if not (isinstance(q, Tensor) and isinstance(k, Tensor)) or q.dim() != 4 or k.dim() != 4:
        return "q and k must be 4-D tensors (b, h, n, d)"
    if q.shape != k.shape:
        return f"self-attention only (n = m, same shapes): q {tuple(q.shape)}, k {tuple(k.shape)}"
    reason = placement_reason((q, k), interpret=INTERPRET, module=__name__, names="q and k")
    if reason is not None:
        return reason
    b, h, n, d = q.shape
    if n > MAX_N:
        return f"rows of {n} tokens are longer than {MAX_N} (the O(n^2) ranks are for short rows)"
    if d > MAX_HEAD_DIM:
        return f"head size {d} is larger than {MAX_HEAD_DIM}"
    if q.numel() == 0:
        return "empty input"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return "autograd: the Triton dual map is inference-only (no backward)"
    if valid is not None:
        if not isinstance(valid, Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (b, n):
            return f"valid must be a bool tensor of shape (b, n) = {(b, n)} (True = real token)"
        if valid.device != q.device:
            return f"valid is on {valid.device}, q on {q.device}"
    return offsets_reason((q, k))


def _per_head(name: str, t: Tensor | None, shape: tuple[int, ...], device: torch.device) -> Tensor | None:
    """A map buffer as fp32 (a no-op for the fp32 buffers of a map), its shape checked."""
    if t is None:
        return None
    if not isinstance(t, Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"asap triton dual map: {name} must have shape {shape}, got {got}")
    if t.device != device:
        raise ValueError(f"asap triton dual map: {name} is on {t.device}, q on {device}")
    return t.to(torch.float32)


def slice_dual_map_triton(
    q: Tensor,
    k: Tensor,
    directions: Tensor,
    coef: Tensor,
    *,
    scale: float,
    c_mean: Tensor | None = None,
    c_norm: Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """The linear dual map of self-attention, uncentred, in one kernel: ``f (b, h, n)`` fp32.

    Args:
        q, k: ``(b, h, n, d)``, any strides, fp16 / bf16 / fp32 (computed in fp32).
        directions: unit slice directions ``theta (h, L, d)``; coef: slice coefficients ``(h, L)``.
        scale: the attention scale.
        c_mean, c_norm: ``(h,)`` coefficients of the ``"qk_mean"`` and ``"q_norm"`` extras
            (None: the map has no such feature).
        valid: ``(b, n)`` bool, True = real token (the same vector masks queries and keys).

    Per ``(b, h)`` and slice ``l``, with ``x_i = <theta_l, q_i>`` and ``y_j = <theta_l, k_j>``
    over the ``nv`` valid tokens, ``xs``, ``ys`` sorted ascending and ``r_l(i)`` the rank of
    ``x_i`` (0-based)::

        phi_l(r) = -scale * sum_{s<r} ys_s (xs_{s+1} - xs_s),      phi_l(0) = 0,
        f_i = sum_l coef[h, l] phi_l(r_l(i)) + c_mean[h] scale <q_i, kbar> + c_norm[h] scale^2 |q_i|^2,

    ``kbar`` the mean of the valid keys. This is
    :meth:`asap.attention.dual_map.SliceDualMap.forward` with ``padding_mask=valid`` and
    ``center=False`` for a map with at most the extras ``("qk_mean", "q_norm")``: equal at valid
    queries up to a constant per ``(b, h)`` (the centring the closure does not need); padded
    queries get 0. Ties among the ``x`` do not matter (equal values make a zero step).
    Inference only; no host sync. :func:`supports_dual_map` lists what is refused.
    """
    reason = supports_dual_map(q, k, valid)
    if reason is not None:
        raise ValueError(f"asap triton dual map: {reason}")
    b, h, n, d = q.shape
    if not isinstance(directions, Tensor) or directions.dim() != 3 or directions.shape[0] != h or (
        directions.shape[2] != d or directions.shape[1] < 1
    ):
        got = tuple(directions.shape) if isinstance(directions, Tensor) else type(directions).__name__
        raise ValueError(f"asap triton dual map: directions must have shape (h, L, d) = ({h}, L >= 1, {d}), got {got}")
    num_slices = directions.shape[1]
    directions = _per_head("directions", directions, (h, num_slices, d), q.device)
    coef = _per_head("coef", coef, (h, num_slices), q.device)
    c_mean = _per_head("c_mean", c_mean, (h,), q.device)
    c_norm = _per_head("c_norm", c_norm, (h,), q.device)
    scale = check_positive("scale", scale)

    config = _launch_config(n, d)
    out = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    work = torch.empty(b * h * num_slices * _SCRATCH_ROWS * config["BLOCK_N"], dtype=torch.float32, device=q.device)
    # Absent optional inputs: any pointer (never read, the HAS_* flag is off) and zero strides.
    flags = out if valid is None else valid.view(torch.int8)  # same bytes, no copy
    _slice_dual_map_kernel[(b * h,)](
        q, k, directions, coef, coef if c_mean is None else c_mean, coef if c_norm is None else c_norm, flags, work, out,
        *q.stride(), *k.stride(), *directions.stride(), *coef.stride(),
        0 if c_mean is None else c_mean.stride(0), 0 if c_norm is None else c_norm.stride(0),
        *((0, 0) if valid is None else flags.stride()),
        h, n, d, num_slices,
        scale,
        HAS_VALID=valid is not None, HAS_MEAN=c_mean is not None, HAS_NORM=c_norm is not None,
        **config,
    )
    return out


def compile_dual_map_for_target(
    *, arch: int = 90, dtype: torch.dtype = torch.float16, n: int = MAX_N, head_dim: int = 64, has_valid: bool = True
) -> int:
    """Compile the kernel ahead of time for ``sm_<arch>`` at rows of ``n`` tokens; no GPU needed.

    As :func:`asap.attention.triton_kernels.compile_for_target` (needs the kernel built without
    the interpreter and Triton's NVIDIA backend): checks that it lowers to PTX and assembles.
    Returns its shared memory in bytes.
    """
    if triton is None or INTERPRET:
        raise RuntimeError("asap triton: compile_dual_map_for_target needs triton, imported without TRITON_INTERPRET=1")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    element = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    config = _launch_config(n, head_dim)
    options = {"num_warps": config.pop("num_warps")}
    constants = dict(config, HAS_VALID=has_valid, HAS_MEAN=True, HAS_NORM=True)
    pointers = {"Q": f"*{element}", "K": f"*{element}", "VALID": "*i8"}
    pointers.update(dict.fromkeys(("DIRS", "COEF", "CMEAN", "CNORM", "WORK", "OUT"), "*fp32"))
    signature = {}
    for name in _slice_dual_map_kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    compiled = triton.compile(ASTSource(_slice_dual_map_kernel, signature, constants), target=GPUTarget("cuda", arch, 32),
                              options=options)  # fmt: skip
    return compiled.metadata.shared
