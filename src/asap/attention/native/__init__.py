"""Native CPU kernels: ASAP's forward for short sequences in plain C, compiled on first use, loaded with ctypes.

:func:`asap_forward_native` runs, in one pass per ``(b, h)`` with the head's tokens in cache, the fused
linear dual map (:meth:`asap.attention.dual_map.SliceDualMap._forward_fused`: self-attention, optional
token padding, the moment extras ``qk_mean`` and ``q_norm``), the closure with one exponential per score
(:func:`asap.attention.closure.shared_exp_closure`), or both; the maths is in ``asap_cpu.c``. It exists
for the short sequences of real teachers (17 to ~128 tokens), where the PyTorch path is ~40 small ops and
two NumPy sorts whose fixed cost is most of ASAP's time; ``scripts/bench_asap_paths.py`` measures both
paths, and the dispatch rules use the crossovers (:func:`closure_worth_it`, :func:`fused_worth_it`): the
map at every length, the closure on padded rows (up to 1024 tokens, the longest measured). At every length,
:func:`closure_blocks` runs the elementwise passes of the unpadded one-exponential closure between torch's
GEMMs.

Building. The source is compiled once per source version, compiler and instruction set with the system C
compiler (``$CC``, else ``cc``; ``-O3 -fPIC -shared``; ``-ffp-contract=off``, so that no layout-specialised
loop rounds differently: results are bit-equal for every memory layout of the inputs), for the widest
vectors the CPU has, as torch detects them (:func:`instruction_set`: AVX-512 with 16 floats per vector,
AVX2 with 8; ``generic`` elsewhere, 16 lanes left to the compiler to lower): a library with vectors wider
than the registers ran 3-8x slower (``results/bench/native_isa_1_thread.json``). Each instruction set has
its own file, so a cache shared between machines stays valid. ``$ASAP_NATIVE_ISA`` (``avx512``, ``avx2``,
``generic``) overrides the choice, to test or time another build on one machine. The library goes
into ``$ASAP_NATIVE_CACHE`` (default ``~/.cache/asap/native``), written to a temporary name and renamed,
so concurrent processes (DDP ranks) never load a half-written file. No compiler, a failed build or
``ASAP_NATIVE=0`` make the kernels unavailable: :func:`unavailable` says why in one line and callers
keep the PyTorch path (the same result to fp32 rounding).

Inference only: no autograd (callers check :func:`supports`), CPU tensors, fp32 compute (fp16/bf16
inputs are widened first, as the PyTorch path does; fp64 inputs, the references, stay on the PyTorch
path). A call releases the GIL and splits the ``(b, h)`` problems over torch's threads
(``torch.get_num_threads()``) with OpenMP: built with ``-fopenmp``, the library's ``libgomp.so.1`` is the one
torch already loaded (the dynamic linker matches the soname), so its workers are torch's own, awake right
after torch's ops (an earlier version with POSIX threads competed with that pool and gained nothing).
Results do not depend on the thread count (each problem runs on one thread). A compiler without OpenMP
builds a single-threaded library instead (:func:`threaded` says which).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("asap_cpu.c")
#: The bytes of each source as this process first read it (the installed one at import): the library is
#: named by and built from them, so a process keeps the kernels that match its ctypes signatures when the
#: file changes under it. The library is loaded lazily, at the first native call; a checkout edited or
#: updated while a long job ran used to load a newer library there, against the older signatures (a
#: crash, seen: a compile run an hour in).
_SOURCE_BYTES: dict[Path, bytes] = {SOURCE: SOURCE.read_bytes()}


def _source_bytes() -> bytes:
    """The bytes of :data:`SOURCE` (which ``scripts/bench_native_isa.py`` points elsewhere) as first read."""
    if SOURCE not in _SOURCE_BYTES:
        _SOURCE_BYTES[SOURCE] = SOURCE.read_bytes()
    return _SOURCE_BYTES[SOURCE]

CFLAGS = ("-O3", "-ffp-contract=off", "-fPIC", "-shared", "-std=gnu99", "-Wno-psabi")
#: Tried first; a compiler without OpenMP (Apple's clang) builds the single-threaded library instead.
OPENMP_FLAGS = ("-fopenmp",)
#: When the native kernels beat the PyTorch paths (``scripts/bench_asap_paths.py``,
#: ``results/bench/asap_paths_*.json``, softmax calls, the 2-core EPYC, torch's default 2 threads / one
#: thread). The dual map (:meth:`asap.attention.dual_map.SliceDualMap.forward`) at every length: ranks by
#: counting up to 96 tokens, a bitonic sort above; at 8 x 8 x n x 64 unpadded, 1.26 / 0.63 against
#: 5.31 / 1.72 (n = 16 / 64, two threads), 1.17 / 0.68 against 3.33 / 1.85 (one thread), and
#: 0.31 / 0.12 / 0.07 against 0.59 / 0.27 / 0.19 at n = 128 / 512 / 1024 (one thread). The closure alone
#: (``backend="auto"`` of :func:`asap.attention.functional.asap_attention`, :func:`closure_worth_it`) only
#: for padded rows (``padding_mask``), at every measured length up to :data:`PADDED_MAX_N`: padded, 0.69-1.29
#: against 1.46-3.06 for the best PyTorch closure (every padded row, n = 16 to 1024, both thread counts);
#: unpadded, the one-exponential closure with its native passes (:func:`closure_blocks`) is faster at 28 of
#: the 32 rows (0.70-1.36 against 0.84-2.23 for the native closure, which at n = 1024 loses to MKL's GEMMs;
#: the native closure is ahead at four, by at most 0.34 calls).
CLOSURE_MAX_N = 128
#: Longest padded rows the native closure and the one call take: the longest measured (n = 1024, where
#: the closure is still 1.8-2.2x faster than the best PyTorch closure and the one call 2.0-2.8x faster than
#: the operator's other path); beyond it the workspace grows as n^2 per thread and nothing is measured.
PADDED_MAX_N = 1024


def closure_worth_it(n: int, *, padded: bool) -> bool:
    """Whether the native closure is measured faster than the PyTorch one for rows of ``n`` tokens."""
    return padded and n <= PADDED_MAX_N


#: :class:`asap.attention.operators.AsapOperator` runs its map and closure as one native call
#: (:func:`fused_worth_it`) on rows up to :data:`CLOSURE_MAX_N` tokens, and on padded rows up to
#: :data:`PADDED_MAX_N`, rather than the native map then the closure of :func:`closure_worth_it`'s rule.
#: Padded, at n = 256 / 512 / 1024 (8 x 8 x n x 64, ``results/bench/asap_paths_*.json``): 0.96 / 0.98 /
#: 1.05 softmax calls against 2.29 / 2.38 / 2.15 for the map then the two-pass closure (two threads), 0.76 /
#: 0.78 against 2.21 / 2.21 at n = 512 / 1024 (one thread); at MiniLM's 16 x 12 x 256 x 32, 1.04 against
#: 2.44 (two threads). Unpadded above 128 tokens the split path stays: the one call is within noise of it
#: at n = 256 and slower at 1024 (2.30 against 1.23, two threads). Between the layers of
#: a model (``scripts/bench_fused_vs_split.py``: each call after an MLP block,
#: ``results/bench/fused_vs_split_*.json``) the one call is faster at every measured shape up to
#: n = 128, at one thread (0.72-0.87x of the split path's time; 0.65 / 1.08 ms against 0.90 / 1.38 at
#: 8 x 8 x n x 64, n = 16 / 32) and at two (0.52-0.89x; 0.39 / 0.63 against 0.75 / 0.94). Back to back
#: with the operands in cache (``asap_fused`` against ``asap_split`` in
#: ``results/bench/asap_paths_*.json``, measured before the one call's copies were made cheaper) the split
#: path was ahead at d >= 32 and n >= 32.


def fused_worth_it(n: int, *, padded: bool = False) -> bool:
    """Whether the operator's one-call native path (map and closure) is the measured choice for rows of
    ``n`` tokens: up to :data:`CLOSURE_MAX_N`, padded or not, and padded rows up to :data:`PADDED_MAX_N`
    (measured faster at every shape there, see above)."""
    return n <= (PADDED_MAX_N if padded else CLOSURE_MAX_N)


_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


def cache_dir() -> Path:
    """Where built libraries live: ``$ASAP_NATIVE_CACHE``, else ``~/.cache/asap/native``."""
    root = os.environ.get("ASAP_NATIVE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "asap" / "native"


#: Compiler flags per instruction set: the target and the floats per vector of the kernels (``ASAP_LANES``).
ISA_FLAGS = {
    "avx512": ("-mavx512f", "-DASAP_LANES=16"),
    "avx2": ("-mavx2", "-DASAP_LANES=8"),
    "generic": (),
}


def instruction_set() -> str:
    """The build for this CPU: ``$ASAP_NATIVE_ISA`` if set, else from torch's CPU capability (``AVX512``
    -> ``avx512``, ``AVX2`` -> ``avx2``, anything else, e.g. ARM, -> ``generic``).

    Raises:
        ValueError: ``$ASAP_NATIVE_ISA`` is not one of :data:`ISA_FLAGS`.
    """
    chosen = os.environ.get("ASAP_NATIVE_ISA")
    if chosen is not None:
        if chosen not in ISA_FLAGS:
            raise ValueError(f"ASAP_NATIVE_ISA must be one of {', '.join(ISA_FLAGS)}, got {chosen!r}")
        return chosen
    capability = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "generic")


def _cflags() -> tuple[str, ...]:
    return CFLAGS + ISA_FLAGS[instruction_set()]


def _library_path(extra_flags: tuple[str, ...]) -> Path:
    """Cache file named by a hash of the source, flags, compiler name and platform."""
    digest = hashlib.sha256()
    for part in (_source_bytes(), " ".join(_cflags() + extra_flags).encode(), _compiler().encode(),
                 f"{sys.platform}-{platform.machine()}".encode()):  # fmt: skip
        digest.update(part)
    return cache_dir() / f"asap_cpu-{digest.hexdigest()[:16]}.so"


def _build(path: Path, extra_flags: tuple[str, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".so.tmp", dir=path.parent)
    os.close(fd)
    fd, source = tempfile.mkstemp(prefix=path.stem + ".", suffix=".c", dir=path.parent)
    with os.fdopen(fd, "wb") as handle:  # the bytes the library is named by, not the file as it is now
        handle.write(_source_bytes())
    try:
        proc = subprocess.run([_compiler(), *_cflags(), *extra_flags, "-o", tmp, source, "-lm"],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["(no message)"])[0]
            raise OSError(f"{_compiler()} failed: {first}")
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, source):
            if os.path.exists(leftover):
                os.unlink(leftover)


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """The loaded library, or None and the one-line reason (memoised: a build is tried once per process)."""
    if os.environ.get("ASAP_NATIVE", "1") == "0":
        return None, "disabled by ASAP_NATIVE=0"
    try:
        lib = ctypes.CDLL(str(_built_library()))
    except ValueError as exc:
        return None, f"native kernel unavailable: {exc}"
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"native kernel unavailable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    fn = lib.asap_forward_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR,
                   _PTR, _I64, _PTR, _I64, _PTR, _I64, ctypes.c_double, ctypes.c_double, _PTR, _PTR, ctypes.c_int,
                   _PTR, _PTR, ctypes.c_int]  # fmt: skip
    lib.asap_closure_blocks_f32.restype = ctypes.c_int
    lib.asap_closure_blocks_f32.argtypes = [_PTR, _I64, _I64, _I64, _I64, _PTR, ctypes.c_double, _PTR, ctypes.c_int]
    lib.asap_openmp.restype = ctypes.c_int
    lib.asap_openmp.argtypes = []
    return lib, None


def _built_library() -> Path:
    """The cached library, built if needed: the OpenMP build if it exists or builds, else the serial one."""
    paths = {flags: _library_path(flags) for flags in (OPENMP_FLAGS, ())}
    for path in paths.values():
        if path.exists():
            return path
    try:
        _build(paths[OPENMP_FLAGS], OPENMP_FLAGS)
        return paths[OPENMP_FLAGS]
    except (OSError, subprocess.SubprocessError):
        _build(paths[()], ())
        return paths[()]


def threaded() -> bool:
    """Whether the kernels split their heads over torch's threads (the library was built with OpenMP)."""
    lib, _ = _load()
    return lib is not None and bool(lib.asap_openmp())


def unavailable() -> str | None:
    """None when the native kernel can run here (building it if needed), else why not, in one line."""
    return _load()[1]


def supports(*tensors: Tensor) -> str | None:
    """None if the native kernels can take these self-attention tensors (reads shapes and flags, no values).

    ``q, k`` and optionally ``v`` (any strides): CPU, one of fp32 / fp16 / bf16 for all, 4-D with
    ``q`` and ``k`` of one shape (self-attention), no autograd, not under ``torch.compile``, and the
    library built; else the reason, in one line.
    """
    q, k = tensors[0], tensors[1]
    if any(t.device.type != "cpu" for t in tensors):
        return "native kernels: CPU tensors only"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or any(t.dtype != q.dtype for t in tensors):
        return f"native kernels: fp32/fp16/bf16 inputs of one dtype only, got {sorted({str(t.dtype) for t in tensors})}"
    if q.dim() != 4 or q.shape != k.shape or any(t.dim() != 4 or t.shape[:-1] != q.shape[:-1] for t in tensors):
        return "native kernels: self-attention tensors (b, h, n, d) with q and k of one shape only"
    return _inference_reason(tensors)


def supports_blocks(*tensors: Tensor) -> str | None:
    """None if :func:`closure_blocks` can serve a closure on these tensors: fp32 CPU, no autograd, built."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return "native kernels: the closure blocks take fp32 CPU tensors only"
    return _inference_reason(tensors)


def _inference_reason(tensors) -> str | None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "native kernels: inference only (no autograd)"
    if torch.compiler.is_compiling():
        return "native kernels: not traceable by torch.compile"
    return unavailable()


def asap_forward_native(
    q: Tensor,
    k: Tensor,
    v: Tensor | None = None,
    *,
    scale: float,
    eps: float = 1.0,
    f_hat: Tensor | None = None,
    directions: Tensor | None = None,
    coef: Tensor | None = None,
    c_mean: Tensor | None = None,
    c_norm: Tensor | None = None,
    c_lse: Tensor | None = None,
    valid: Tensor | None = None,
    center: bool = True,
    return_dual: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """ASAP's forward on the CPU in one native pass per ``(b, h)``: the dual map, the closure, or both.

    * The linear dual map (``directions (h, L, d)``, ``coef (h, L)``, no ``f_hat``)::

          f_i = sum_l coef_{h,l} phi_l(i) + c_mean_h scale <q_i, kbar> + c_norm_h scale^2 |q_i|^2,

      ``phi_l`` the exact 1-D query potentials of slice ``l`` between the valid queries and keys,
      ``kbar`` the mean valid key, ``c_mean, c_norm (h,)`` any stride (None: no such term); centred over the valid
      queries with ``center=True`` (else off by a constant per ``(b, h)``, which the closure ignores).
      With the closure, ``c_lse (h,)`` adds the ``lse_keys`` extra, ``c_lse_h log mean_j exp(S_ij)`` over the
      valid keys, formed from the closure's own scores (one more pass over them, no second product).
    * The closure (``v`` given): ``out = softmax_j((S_ij + g_j)/eps) v`` with ``g = ccol(f)``,
      ``S = scale q k^T``, from ``f_hat (b, h, n)`` if given, else from the map above; one
      exponential per score (:mod:`asap.attention.closure`'s algebra).

    ``q, k (b, h, n, d)``, ``v (b, h, n, dv)``, any strides, fp32 / fp16 / bf16 (computed in fp32);
    ``valid (b, n)`` bool, True = real token: padded tokens get no mass, padded queries output 0 (and
    dual 0). Returns ``out (b, h, n, dv)`` fp32 (with ``return_dual``, ``(out, f)``), or ``f (b, h, n)``
    fp32 without ``v``. Check :func:`supports` first; a failure inside the kernel raises ``RuntimeError``.
    """
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(reason)
    if f_hat is None and (directions is None or coef is None):
        raise ValueError("native kernels: give f_hat, or the dual map's directions and coef")
    if c_lse is not None and v is None:
        raise ValueError("native kernels: c_lse (the lse_keys extra) needs the closure (give v)")
    q, k = _f32(q), _f32(k)
    v = None if v is None else _f32(v)
    b, h, n, d = q.shape
    dv = 0 if v is None else v.shape[-1]
    L = 0 if directions is None else directions.shape[-2]
    dirs = None if directions is None else _f32_contiguous(directions)
    coef = None if coef is None else _f32_contiguous(coef)
    c_mean = None if c_mean is None else _f32(c_mean)
    c_norm = None if c_norm is None else _f32(c_norm)
    c_lse = None if c_lse is None else _f32(c_lse)
    f_in = None if f_hat is None else _f32(f_hat)
    mask = None if valid is None else (valid if valid.dtype == torch.bool else valid.to(torch.bool))
    want_dual = v is None or return_dual
    f_out = torch.empty(b, h, n, dtype=torch.float32) if want_dual else None
    out = None if v is None else torch.empty(b, h, n, dv, dtype=torch.float32)
    status = lib.asap_forward_f32(
        _ptr(q), _ptr(k), _ptr(v), b, h, n, d, dv, _strides(q), _strides(k), _strides(v), _ptr(f_in), _strides(f_in),
        L, _ptr(dirs), _ptr(coef), _ptr(c_mean), 0 if c_mean is None else c_mean.stride(0), _ptr(c_norm),
        0 if c_norm is None else c_norm.stride(0), _ptr(c_lse), 0 if c_lse is None else c_lse.stride(0),
        float(scale), float(eps), _ptr(mask), _strides(mask), int(center), _ptr(f_out), _ptr(out),
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError("native kernels failed: out of memory for the workspace")
    if v is None:
        return f_out
    return (out, f_out) if return_dual else out


#: A multiple of the floats per vector of every build: the row length of :func:`closure_blocks`'s blocks.
LANES = 16


def closure_blocks(scores: Tensor, bias: Tensor, den: Tensor, *, alpha: float, columns: int) -> None:
    """The elementwise passes of the one-exponential closure on score blocks, in place (one native call).

    ``scores (c, n, ld)``, ``ld`` a multiple of :data:`LANES`, holds ``S_ij`` in its first ``columns = m``
    columns (the others are scratch) and ``bias (c, n)`` holds ``f_i / eps``, so that
    ``W = alpha S + bias`` (``alpha = scale / eps > 0``). On return ``scores`` holds ``E_ij w_j`` (0 past
    column ``m``), with ``E_ij = exp(W_ij - c_j - r_i)`` (``c_j`` the column maxima of ``W``, ``r_i <= 0`` the
    row maxima of ``W - c``) and ``w_j = 1 / sum_i E_ij e^{r_i}``, and ``den (c, n)`` holds ``sum_j E_ij w_j``:
    the closure's rows are ``(scores @ v) / den`` (:func:`asap.attention.closure.shared_exp_closure`).
    fp32, contiguous, no padding (every score finite); the blocks are split over torch's threads.
    """
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(reason)
    c, n, ld = scores.shape
    tensors = (scores, bias, den)
    if any(t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu" for t in tensors):
        raise ValueError("native closure_blocks: contiguous fp32 CPU tensors only")
    if bias.shape != (c, n) or den.shape != (c, n) or ld % LANES or not 0 < columns <= ld:
        raise ValueError(f"native closure_blocks: shapes {[tuple(t.shape) for t in tensors]} and columns={columns} "
                         f"do not match (c, n, ld), ld a multiple of {LANES} and at least columns")
    status = lib.asap_closure_blocks_f32(_ptr(scores), c, n, columns, ld, _ptr(bias), float(alpha), _ptr(den),
                                         torch.get_num_threads())  # fmt: skip
    if status:
        raise RuntimeError("native kernels failed: out of memory for the workspace")


def _f32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def _f32_contiguous(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _strides(t: Tensor | None):
    return None if t is None else (_I64 * t.dim())(*t.stride())
