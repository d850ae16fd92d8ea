"""Triton ASAP kernels against the fp64 references and the PyTorch path, under Triton's CPU interpreter.

Shapes are tiny and blocks small (16) so that every kernel runs several blocks with
ragged ends: the interpreter executes each program in NumPy.
"""

from __future__ import annotations

import importlib
import json
import math
import os

import pytest
import torch

pytest.importorskip("triton", reason="the optional extra asap-attention[triton] is not installed")

# Triton reads TRITON_INTERPRET when @triton.jit decorates the kernels, i.e. at import.
_saved = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    from asap.attention import triton_kernels as tk

    if not tk.INTERPRET:  # imported earlier without the interpreter: build the kernels again
        tk = importlib.reload(tk)
finally:
    if _saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved

from asap.attention.functional import _biased_row_attention, asap_attention  # noqa: E402
from asap.attention.reference import (  # noqa: E402
    asap_attention_reference,
    sinkhorn_attention_reference,
    sinkhorn_duals_reference,
)
from asap.transport.ctransform import c_transform_cols_tiled, column_logsumexp  # noqa: E402
from asap.transport.masks import key_padding_to_attn_mask, support  # noqa: E402
from tests.conftest import compile_without_interpreter  # noqa: E402

BLOCKS = dict(block_q=16, block_k=16)
B, H, N, M, D, DV = 2, 3, 37, 21, 5, 7  # n != m, neither a multiple of 16, odd head sizes


def _inputs(b=B, h=H, n=N, m=M, d=D, dv=DV, scale=1.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    q = scale * torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    k = scale * torch.randn(b, h, m, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, h, m, dv, generator=gen, dtype=torch.float64)
    f = torch.randn(b, h, n, generator=gen, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (q, k, v, f))


def _valid(lengths, size):
    return torch.arange(size)[None, :] < torch.tensor(lengths)[:, None]


# (query lengths, key lengths); None = no padding on that side. [.., 0] is an all-padding sequence.
PADDINGS = {
    "none": (None, None),
    "keys": (None, [M, 9]),
    "queries": ([30, 12], None),
    "both": ([30, 12], [M, 9]),
    "empty": ([N, 0], [M, 0]),
}


def _padding_mask(qlen, klen, n=N, m=M):
    """The project's (b, 1, n, m) boolean mask of two padding vectors (None = everything real)."""
    qv = torch.ones(B, n, dtype=torch.bool) if qlen is None else _valid(qlen, n)
    kv = torch.ones(B, m, dtype=torch.bool) if klen is None else _valid(klen, m)
    return qv[:, None, :, None] & kv[:, None, None, :]


def _lse_oracle(q, k, f, mask, *, scale, eps):
    """fp64 ``LSE_i((S_ij + f_i)/eps)`` over the mask's valid queries, 0 at non-valid keys; and the valid keys."""
    s = scale * q @ k.transpose(-1, -2) + f.unsqueeze(-1)
    full = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.expand_as(s)
    lse = torch.logsumexp((s / eps).masked_fill(~full, -math.inf), dim=-2)
    cols = full.any(dim=-2)
    return lse.masked_fill(~cols, 0.0), cols


@pytest.mark.parametrize("padding", ["none", "keys", "both", "empty"])
def test_column_logsumexp_and_key_dual_match_fp64_and_cpu(padding):
    qlen, klen = PADDINGS[padding]
    q64, k64, _, f64 = _inputs()
    q, k, f = q64.float(), k64.float(), f64.float()
    qv = None if qlen is None else _valid(qlen, N)
    kv = None if klen is None else _valid(klen, M)
    mask = None if padding == "none" else _padding_mask(qlen, klen)
    scale, eps = 0.6, 0.7
    lse = tk.column_logsumexp_triton(q, k, f, scale=scale, eps=eps, query_valid=qv, key_valid=kv, **BLOCKS)
    truth, cols = _lse_oracle(q64, k64, f64, mask, scale=scale, eps=eps)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, M)
    torch.testing.assert_close(lse.double(), truth, rtol=0, atol=1e-5)
    # The project's column pass (fp32, CPU) at the keys it keeps.
    supp = support(mask, N, M, dtype=torch.float32, device=q.device)
    cpu_lse = column_logsumexp(q, k, supp.zero_rows(f), scale=scale, eps=eps, col_bias=supp.col_bias)
    torch.testing.assert_close(lse[cols.expand_as(lse)], cpu_lse[cols.expand_as(lse)], rtol=0, atol=1e-5)
    g = tk.key_dual_triton(q, k, f, scale=scale, eps=eps, query_valid=qv, key_valid=kv, **BLOCKS)
    torch.testing.assert_close(g, c_transform_cols_tiled(q, k, supp.zero_rows(f), scale=scale, eps=eps, supp=supp),
                               rtol=0, atol=1e-5)
    m_valid = cols.sum(-1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(g.double(), (eps * (-m_valid.log() - truth)) * cols, rtol=0, atol=1e-5)


@pytest.mark.parametrize("padding", ["none", "queries", "both", "empty"])
def test_biased_row_attention_matches_fp64_and_cpu(padding):
    qlen, klen = PADDINGS[padding]
    q64, k64, v64, _ = _inputs()
    g64 = torch.randn(B, H, M, dtype=torch.float64)
    q, k, v, g = (t.float() for t in (q64, k64, v64, g64))
    qv = None if qlen is None else _valid(qlen, N)
    kv = None if klen is None else _valid(klen, M)
    mask = None if padding == "none" else _padding_mask(qlen, klen)
    scale, eps = 0.6, 0.8
    out = tk.biased_row_attention_triton(q, k, v, g, scale=scale, eps=eps, query_valid=qv, key_valid=kv, **BLOCKS)
    assert out.dtype == torch.float32 and out.shape == (B, H, N, DV)
    logits = (scale * q64 @ k64.transpose(-1, -2) + g64.unsqueeze(-2)) / eps
    full = torch.ones_like(logits, dtype=torch.bool) if mask is None else mask.expand_as(logits)
    attn = torch.softmax(logits.masked_fill(~full, -math.inf), dim=-1).nan_to_num(0.0)
    torch.testing.assert_close(out.double(), attn @ v64, rtol=0, atol=1e-5)
    rows = full.any(-1)
    assert (out[~rows] == 0).all()  # padding queries: exactly zero
    supp = support(mask, N, M, dtype=torch.float32, device=q.device, biases=False)
    cpu = _biased_row_attention(q, k, v, g, scale=scale, eps=eps, supp=supp, mask=mask)
    torch.testing.assert_close(out, cpu, rtol=0, atol=1e-5)


@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("how", ["attn_mask", "vectors"])
def test_asap_matches_reference_and_cpu_path(padding, how):
    qlen, klen = PADDINGS[padding]
    q64, k64, v64, f64 = _inputs()
    q, k, v, f = (t.float() for t in (q64, k64, v64, f64))
    mask = None if padding == "none" else _padding_mask(qlen, klen)
    if how == "attn_mask":
        out = tk.asap_attention_triton(q, k, v, f, eps=0.7, attn_mask=mask, **BLOCKS)
    else:
        qv = None if qlen is None else _valid(qlen, N)
        kv = None if klen is None else _valid(klen, M)
        out = tk.asap_attention_triton(q, k, v, f, eps=0.7, query_valid=qv, key_valid=kv, **BLOCKS)
    truth = asap_attention_reference(q64, k64, v64, f64, eps=0.7, attn_mask=mask)
    torch.testing.assert_close(out.double(), truth, rtol=0, atol=1e-5)
    torch.testing.assert_close(out, asap_attention(q, k, v, f, eps=0.7, attn_mask=mask), rtol=0, atol=1e-5)
    assert torch.isfinite(out).all()


def test_self_attention_padding_mask_and_closure_identity():
    """The mask MultiheadAttention builds, default blocks; fed f_{K-2}, ASAP reproduces the K-step teacher."""
    q64, k64, v64, _ = _inputs(n=20, m=20, d=8, dv=8)
    tokens = _valid([20, 13], 20)
    mask = key_padding_to_attn_mask(tokens)
    fs, _ = sinkhorn_duals_reference(q64, k64, n_iters=5, eps=0.9, attn_mask=mask)
    out = tk.asap_attention_triton(q64.float(), k64.float(), v64.float(), fs[3].float() + 2.0, eps=0.9, attn_mask=mask)
    teacher = sinkhorn_attention_reference(q64, k64, v64, n_iters=5, eps=0.9, attn_mask=mask)
    torch.testing.assert_close(out.double(), teacher, rtol=0, atol=1e-5)


def test_strided_transposed_sliced_and_expanded_inputs():
    q64, k64, v64, f64 = _inputs()
    # q from a (b, n, h, d) layout; k stored (b, h, d, m) and transposed; v a slice of a wider
    # tensor along tokens and features; one key head broadcast to every head; f_hat strided.
    q = q64.float().transpose(1, 2).contiguous().transpose(1, 2)
    k = k64.float()[:, :1].transpose(-1, -2).contiguous().transpose(-1, -2).expand(B, H, M, D)
    wide = torch.randn(B, H, 2 * M, 2 * DV)
    wide[:, :, ::2, 1::2] = v64.float()
    v = wide[:, :, ::2, 1::2]
    f = f64.float().transpose(1, 2).contiguous().transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or f.is_contiguous())
    k64e = k64[:, :1].expand(B, H, M, D)
    mask = _padding_mask([30, 12], [M, 9])
    out = tk.asap_attention_triton(q, k, v, f, eps=0.7, attn_mask=mask, **BLOCKS)
    truth = asap_attention_reference(q64, k64e, v64, f64, eps=0.7, attn_mask=mask)
    torch.testing.assert_close(out.double(), truth, rtol=0, atol=1e-5)
    torch.testing.assert_close(out, tk.asap_attention_triton(q.contiguous(), k.contiguous(), v.contiguous(),
                                                             f.contiguous(), eps=0.7, attn_mask=mask, **BLOCKS))


def test_large_scores_and_low_temperature():
    """Scores of a few thousand / eps: the online log-sum-exps must neither overflow nor lose the max."""
    q64, k64, v64, f64 = _inputs(scale=6.0)
    f64 = 50 * f64
    mask = _padding_mask([30, 12], [M, 9])
    out = tk.asap_attention_triton(q64.float(), k64.float(), v64.float(), f64.float(), eps=0.05, attn_mask=mask,
                                   **BLOCKS)
    truth = asap_attention_reference(q64, k64, v64, f64, eps=0.05, attn_mask=mask)
    assert torch.isfinite(out).all()
    # Near-argmax attention: relative rounding of logits ~ 1e4 is ~1e-3 in fp32, so compare with the
    # PyTorch fp32 path's own error as the yardstick.
    cpu = asap_attention(q64.float(), k64.float(), v64.float(), f64.float(), eps=0.05, attn_mask=mask)
    assert (out.double() - truth).abs().max() <= 2 * (cpu.double() - truth).abs().max() + 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_low_precision_rule(dtype, masked):
    """Error vs fp64 at most twice that of the plain reference in the same dtype (as test_functional)."""
    q64, k64, v64, f64 = _inputs(b=2, h=4, n=64, m=48, d=32, dv=32, scale=1.5)
    mask = None
    if masked:
        mask = (_valid([64, 40], 64)[:, None, :, None] & _valid([48, 30], 48)[:, None, None, :])
    q, k, v, f = (t.to(dtype) for t in (q64, k64, v64, f64))
    truth = asap_attention_reference(q64, k64, v64, f64, attn_mask=mask)
    fast = tk.asap_attention_triton(q, k, v, f, attn_mask=mask)
    plain = asap_attention_reference(q, k, v, f, attn_mask=mask)
    assert fast.dtype == dtype
    fast_err = (fast.double() - truth).abs().max()
    plain_err = (plain.double() - truth).abs().max()
    assert fast_err <= 2 * plain_err, (fast_err, plain_err)


def test_column_logsumexp_accumulates_in_fp32_for_half_inputs():
    q64, k64, _, f64 = _inputs(n=40, m=24, d=16)
    q, k = q64.half(), k64.half()
    lse = tk.column_logsumexp_triton(q, k, f64, scale=0.25, eps=1.0, **BLOCKS)
    assert lse.dtype == torch.float32
    # Same rounded inputs in fp64: only the fp32 accumulation differs.
    truth, _ = _lse_oracle(q.double(), k.double(), f64.float().double(), None, scale=0.25, eps=1.0)
    torch.testing.assert_close(lse.double(), truth, rtol=0, atol=1e-5)


class TestRefusals:
    def test_supports_says_yes_or_why_not(self):
        q, k, v, f = (t.float() for t in _inputs())
        assert tk.supports(q, k, v, f) is None
        assert tk.supports(q, k, v, f, attn_mask=_padding_mask([30, 12], None)) is None
        assert "fp64" in tk.supports(q.double(), k.double(), v.double(), f)
        assert "identity" in tk.supports(q, k, v, f, is_causal=True)
        assert "inference-only" in tk.supports(q.requires_grad_(), k, v, f)
        assert "query_valid" in tk.supports(q.detach(), k, v, f, query_valid=torch.ones(B, N + 1, dtype=torch.bool))
        big = torch.zeros(1, 1, 4, tk.MAX_HEAD_DIM + 1)
        assert "head size" in tk.supports(big, big, big)

    def test_offsets_beyond_int32_are_refused(self, monkeypatch):
        q, k, v, _ = (t.float() for t in _inputs())
        monkeypatch.setattr(tk, "_MAX_OFFSET", q.numel() - 1)  # a stand-in for 2**31, which would need 8 GiB
        assert "int32" in tk.supports(q, k, v)
        with pytest.raises(ValueError, match="int32"):
            tk.asap_attention_triton(q, k, v, torch.zeros(B, H, N))

    def test_cpu_without_interpreter_is_refused(self, monkeypatch):
        q, k, v, _ = (t.float() for t in _inputs())
        monkeypatch.setattr(tk, "INTERPRET", False)
        assert "TRITON_INTERPRET=1" in tk.supports(q, k, v)

    def test_errors_are_one_line(self):
        q, k, v, f = (t.float() for t in _inputs())
        with pytest.raises(RuntimeError, match="inference-only"):
            tk.asap_attention_triton(q.requires_grad_(), k, v, f)
        with torch.no_grad():  # allowed without autograd
            tk.asap_attention_triton(q, k, v, f, **BLOCKS)
        general = torch.rand(B, 1, N, M) > 0.3
        with pytest.raises(ValueError, match="not a padding mask"):
            tk.asap_attention_triton(q.detach(), k, v, f, attn_mask=general)
        with pytest.raises(ValueError, match="f_hat"):
            tk.asap_attention_triton(q.detach(), k, v, f[..., :3])
        with pytest.raises(ValueError, match="power of two"):
            tk.asap_attention_triton(q.detach(), k, v, f, block_q=24)
        with pytest.raises(ValueError, match="fp64"):
            tk.asap_attention_triton(q.double(), k.double(), v.double(), f)
        with pytest.raises(TypeError, match="bool"):
            tk.column_logsumexp_triton(q.detach(), k, f, scale=1.0, eps=1.0, query_valid=torch.ones(B, N))


@pytest.mark.slow
def test_kernels_compile_for_a_gpu_target(tmp_path):
    """Ahead-of-time compilation for sm_90 (no GPU needed): what the interpreter does not check."""
    import json

    code = (
        "import json, torch\n"
        "from asap.attention.triton_kernels import compile_for_target\n"
        "print(json.dumps(compile_for_target(dtype=torch.float16, head_dim=40)))\n"
    )
    shared = json.loads(compile_without_interpreter(tmp_path, code))
    assert set(shared) == {"row", "col"} and all(0 < s <= 227 * 1024 for s in shared.values()), shared


def _load_bench_script():
    import importlib.util

    from tests.conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("bench_triton_gpu", REPO_ROOT / "scripts" / "bench_triton_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_refuses_without_cuda(tmp_path, monkeypatch, capsys):
    bench = _load_bench_script()
    out = tmp_path / "bench.json"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs a CUDA GPU" in err
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert bench.main(["--out", str(out)]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--out", str(out), "--lengths", "512,x"])
    assert exc.value.code == 2
    assert not out.exists()


@pytest.mark.slow
def test_gpu_benchmark_runs_end_to_end_on_the_interpreter(tmp_path):
    """The script's own run() on CPU tensors (interpreted kernels): a smoke test of its paths and JSON, not a timing."""
    bench = _load_bench_script()
    out = tmp_path / "bench.json"
    args = bench.parse_args([
        "--out", str(out), "--lengths", "24", "--batch", "2", "--heads", "2", "--head-dim", "8",
        "--sinkhorn-iters", "3,5", "--padding", "padded", "--warmup", "0", "--repeats", "1", "--min-repeats", "1",
        "--no-full-operator",
    ])
    assert bench.run(args, torch.device("cpu")) == 0
    data = json.loads(out.read_text())
    (setting,) = data["settings"]
    assert setting["parity"]["passed"] and setting["parity"]["max_abs_err_vs_fp64"] <= setting["parity"]["bound"]
    assert set(setting["methods"]) == {"sdpa", "asap_torch", "asap_triton", "sinkhorn_k3", "sinkhorn_k5"}
    assert all(m["median_s"] > 0 and m["peak_bytes"] is not None for m in setting["methods"].values())
    assert data["teacher"] == "sinkhorn_k5" and setting["speedup_over_teacher"]["sinkhorn_k5"] == 1.0
