"""Attention operators against fp64 references, METHOD.md identities and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asap.attention import asap_attention, sinkhorn_attention, softmax_attention
from asap.attention.reference import (
    asap_attention_reference,
    sinkhorn_attention_reference,
    sinkhorn_duals_reference,
    sinkhorn_plan_reference,
    softmax_attention_reference,
)
from asap.transport import center
from tests.conftest import padding_mask, rand_qkv


def test_k1_is_softmax():
    q, k, v = rand_qkv()
    torch.testing.assert_close(sinkhorn_attention(q, k, v, n_iters=1), softmax_attention(q, k, v), rtol=0, atol=1e-14)
    # eps is a temperature: K = 1 at eps is softmax at scale / eps.
    torch.testing.assert_close(
        sinkhorn_attention(q, k, v, n_iters=1, eps=0.5), softmax_attention(q, k, v, scale=2 * 4**-0.5), rtol=0, atol=1e-14
    )


@pytest.mark.parametrize("n_iters", [1, 2, 3, 4, 5, 11, 21])
@pytest.mark.parametrize("masked", [False, True])
def test_sinkhorn_matches_reference(n_iters, masked):
    q, k, v = rand_qkv(n=7, m=5, dv=3)
    mask = None
    if masked:
        mask = torch.rand(2, 1, 7, 5) > 0.3
        mask[0, 0, 2] = False  # a padding query
    out = sinkhorn_attention(q, k, v, n_iters=n_iters, eps=0.8, attn_mask=mask)
    ref = sinkhorn_attention_reference(q, k, v, n_iters=n_iters, eps=0.8, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)


def test_converged_sinkhorn_is_doubly_stochastic():
    q, k, _ = rand_qkv(n=8)
    attn = sinkhorn_plan_reference(q, k, n_iters=301)
    ones = torch.ones(2, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(attn.sum(-1), ones)
    torch.testing.assert_close(attn.sum(-2), ones)
    v = torch.eye(8, dtype=torch.float64).expand(2, 3, 8, 8)
    torch.testing.assert_close(sinkhorn_attention(q, k, v, n_iters=301), attn)


@pytest.mark.parametrize("n_iters", [3, 5, 11])
def test_asap_with_exact_target_is_the_teacher(n_iters):
    """The closure identity (METHOD.md sec. 4): ASAP fed f_{K-2} reproduces the K-step teacher."""
    q, k, v = rand_qkv(n=9, m=9)
    fs, _ = sinkhorn_duals_reference(q, k, n_iters=n_iters, eps=0.9)
    target = fs[n_iters - 2] + 3.0  # any constant offset is irrelevant
    out = asap_attention(q, k, v, target, eps=0.9)
    torch.testing.assert_close(out, sinkhorn_attention(q, k, v, n_iters=n_iters, eps=0.9), rtol=0, atol=1e-13)


@pytest.mark.parametrize("tile_bytes", [1, 200, 2**30])
def test_asap_matches_reference_for_any_tiling(tile_bytes):
    q, k, v = rand_qkv(n=11, m=13)
    f_hat = torch.randn(2, 3, 11, dtype=torch.float64)
    out = asap_attention(q, k, v, f_hat, eps=0.7, tile_bytes=tile_bytes)
    torch.testing.assert_close(out, asap_attention_reference(q, k, v, f_hat, eps=0.7), rtol=0, atol=1e-13)


def test_asap_with_general_mask_matches_reference():
    q, k, v = rand_qkv(n=6, m=8)
    f_hat = torch.randn(2, 3, 6, dtype=torch.float64)
    mask = torch.rand(2, 3, 6, 8) > 0.4
    mask[1, 2, 0] = False
    out = asap_attention(q, k, v, f_hat, attn_mask=mask)
    torch.testing.assert_close(out, asap_attention_reference(q, k, v, f_hat, attn_mask=mask), rtol=0, atol=1e-13)


@pytest.mark.parametrize("method", ["softmax", "sinkhorn", "asap"])
def test_padded_batch_equals_unpadded_sequences(method):
    q, k, v = rand_qkv(b=2, n=8)
    mask = padding_mask([8, 5], 8)
    f_hat = torch.randn(2, 3, 8, dtype=torch.float64)

    def run(q, k, v, f, mask):
        if method == "softmax":
            return softmax_attention(q, k, v, attn_mask=mask)
        if method == "sinkhorn":
            return sinkhorn_attention(q, k, v, n_iters=7, attn_mask=mask)
        return asap_attention(q, k, v, f, attn_mask=mask)

    out = run(q, k, v, f_hat, mask)
    short = run(q[1:, :, :5], k[1:, :, :5], v[1:, :, :5], f_hat[1:, :, :5], None)
    torch.testing.assert_close(out[1:, :, :5], short, rtol=0, atol=1e-13)
    assert (out[1:, :, 5:] == 0).all()


@pytest.mark.parametrize("method", ["softmax", "sinkhorn", "asap"])
def test_padding_rows_have_zero_output_and_finite_gradients(method):
    q, k, v = rand_qkv(b=2, n=6, requires_grad=True)
    mask = padding_mask([6, 0], 6)  # the second sequence is padding only
    if method == "softmax":
        out = softmax_attention(q, k, v, attn_mask=mask)
    elif method == "sinkhorn":
        out = sinkhorn_attention(q, k, v, n_iters=5, attn_mask=mask)
    else:
        out = asap_attention(q, k, v, torch.zeros(2, 3, 6, dtype=torch.float64), attn_mask=mask)
    out.square().sum().backward()
    assert (out[1] == 0).all()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert (t.grad[1] == 0).all()


def test_gradcheck_sinkhorn_and_asap():
    q, k, v = rand_qkv(b=1, h=2, n=4, m=5, d=3, requires_grad=True)
    mask = torch.ones(1, 1, 4, 5, dtype=torch.bool)
    mask[..., 3, :] = False
    assert torch.autograd.gradcheck(lambda q, k, v: sinkhorn_attention(q, k, v, n_iters=5, attn_mask=mask), (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: sinkhorn_attention(q, k, v, n_iters=4), (q, k, v))
    f_hat = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, f: asap_attention(q, k, v, f, eps=0.7), (q, k, v, f_hat))
    assert torch.autograd.gradcheck(lambda q, k, v, f: asap_attention(q, k, v, f, attn_mask=mask), (q, k, v, f_hat))


def test_closure_grad_mode_is_the_closure_gradient():
    """closure mode = gradient of ASAP fed the (constant) target; unroll differs."""
    q, k, v = rand_qkv(b=1, h=1, n=5, requires_grad=True)
    out = sinkhorn_attention(q, k, v, n_iters=5, grad_mode="closure")
    torch.testing.assert_close(out, sinkhorn_attention(q, k, v, n_iters=5), rtol=0, atol=1e-13)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    target = sinkhorn_duals_reference(q.detach(), k.detach(), n_iters=5)[0][3]
    expected = torch.autograd.grad(asap_attention(q, k, v, target).sum(), (q, k, v))
    for g1, g2 in zip(grads, expected):
        torch.testing.assert_close(g1, g2)
    with pytest.raises(ValueError, match="odd"):
        sinkhorn_attention(q, k, v, n_iters=4, grad_mode="closure")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["sinkhorn", "asap"])
def test_low_precision_rule(dtype, method):
    """Fast path error vs fp64 at most twice that of the plain reference run in the same dtype."""
    q64, k64, v64 = rand_qkv(b=2, h=4, n=64, d=32, scale=1.5)
    f64 = torch.randn(2, 4, 64, dtype=torch.float64)
    q, k, v, f = (t.to(dtype) for t in (q64, k64, v64, f64))
    if method == "sinkhorn":
        truth = sinkhorn_attention_reference(q64, k64, v64, n_iters=11)
        fast = sinkhorn_attention(q, k, v, n_iters=11)
        plain = sinkhorn_attention_reference(q, k, v, n_iters=11)
    else:
        truth = asap_attention_reference(q64, k64, v64, f64)
        fast = asap_attention(q, k, v, f)
        plain = asap_attention_reference(q, k, v, f)
    assert fast.dtype == dtype
    fast_err = (fast.double() - truth).abs().max()
    plain_err = (plain.double() - truth).abs().max()
    assert fast_err <= 2 * plain_err, (fast_err, plain_err)


def test_fixed_k_path_compiles_fullgraph():
    q, k, v = rand_qkv(dtype=torch.float32)
    f_hat = torch.randn(2, 3, 6)
    sk = torch.compile(lambda q, k, v: sinkhorn_attention(q, k, v, n_iters=11), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(sk(q, k, v), sinkhorn_attention(q, k, v, n_iters=11))
    mask = padding_mask([6, 4], 6)
    fn = torch.compile(lambda q, k, v, f: asap_attention(q, k, v, f, attn_mask=mask), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(q, k, v, f_hat), asap_attention(q, k, v, f_hat, attn_mask=mask))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 9), n_iters=st.sampled_from([1, 3, 5, 11]))
def test_property_permutation_equivariance_and_marginals(seed, n, n_iters):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    perm_q = torch.randperm(n, generator=gen)
    perm_k = torch.randperm(n, generator=gen)
    out = sinkhorn_attention(q, k, v, n_iters=n_iters)
    out_perm = sinkhorn_attention(q[:, :, perm_q], k[:, :, perm_k], v[:, :, perm_k], n_iters=n_iters)
    torch.testing.assert_close(out_perm, out[:, :, perm_q], rtol=0, atol=1e-12)
    # Rows of A sum to one for odd K; columns approach one as K grows.
    attn = sinkhorn_plan_reference(q, k, n_iters=n_iters)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 2, n, dtype=torch.float64))
    f_hat = center(torch.randn(1, 2, n, generator=gen, dtype=torch.float64))
    a_out = asap_attention(q, k, v, f_hat)
    a_perm = asap_attention(q[:, :, perm_q], k[:, :, perm_k], v[:, :, perm_k], f_hat[:, :, perm_q])
    torch.testing.assert_close(a_perm, a_out[:, :, perm_q], rtol=0, atol=1e-12)


class TestErrors:
    def test_shapes(self):
        q, k, v = rand_qkv()
        with pytest.raises(ValueError, match="4 dims"):
            sinkhorn_attention(q[0], k, v, n_iters=3)
        with pytest.raises(ValueError, match="head sizes"):
            sinkhorn_attention(q, k[..., :2], v, n_iters=3)
        with pytest.raises(ValueError, match="lengths"):
            sinkhorn_attention(q, k, v[:, :, :3], n_iters=3)
        with pytest.raises(ValueError, match="f_hat"):
            asap_attention(q, k, v, torch.zeros(2, 3, 5, dtype=torch.float64))

    def test_dtypes_and_masks(self):
        q, k, v = rand_qkv()
        with pytest.raises(TypeError, match="share a dtype"):
            sinkhorn_attention(q, k.float(), v, n_iters=3)
        with pytest.raises(TypeError, match="floating"):
            sinkhorn_attention(q.long(), k.long(), v.long(), n_iters=3)
        with pytest.raises(TypeError, match="boolean"):
            sinkhorn_attention(q, k, v, n_iters=3, attn_mask=torch.zeros(6, 6))
        with pytest.raises(ValueError, match="broadcast"):
            asap_attention(q, k, v, torch.zeros(2, 3, 6, dtype=torch.float64), attn_mask=torch.ones(5, 6, dtype=torch.bool))

    def test_options(self):
        q, k, v = rand_qkv()
        with pytest.raises(ValueError, match="n_iters"):
            sinkhorn_attention(q, k, v, n_iters=0)
        with pytest.raises(ValueError, match="eps"):
            sinkhorn_attention(q, k, v, n_iters=3, eps=0.0)
        with pytest.raises(ValueError, match="grad_mode"):
            sinkhorn_attention(q, k, v, n_iters=3, grad_mode="implicit")

    @pytest.mark.parametrize("method", ["sinkhorn", "asap"])
    def test_causal_is_refused_with_an_explanation(self, method):
        q, k, v = rand_qkv()
        with pytest.raises(ValueError, match="identity"):
            if method == "sinkhorn":
                sinkhorn_attention(q, k, v, n_iters=3, is_causal=True)
            else:
                asap_attention(q, k, v, torch.zeros(2, 3, 6, dtype=torch.float64), is_causal=True)
        # softmax stays causal-capable
        torch.testing.assert_close(
            softmax_attention(q, k, v, is_causal=True),
            softmax_attention_reference(q, k, v, attn_mask=torch.ones(6, 6, dtype=torch.bool).tril()),
        )


@pytest.mark.parametrize("chunk_bytes", [1, 6 * 5 * 8, 3 * 6 * 5 * 8])
@pytest.mark.parametrize("mask_shape", [None, (2, 1, 6, 5), (1, 3, 6, 5), (6, 5)])
def test_sinkhorn_chunking_does_not_change_the_result(chunk_bytes, mask_shape):
    """Blocks of one head, of whole batch rows, and of several rows: identical outputs and gradients."""
    q, k, v = rand_qkv(n=6, m=5, requires_grad=True)
    mask = None if mask_shape is None else torch.rand(mask_shape) > 0.3
    full = sinkhorn_attention(q, k, v, n_iters=5, attn_mask=mask, chunk_bytes=2**40)
    chunked = sinkhorn_attention(q, k, v, n_iters=5, attn_mask=mask, chunk_bytes=chunk_bytes)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-14)
    g_full = torch.autograd.grad(full.square().sum(), (q, k, v))
    g_chunked = torch.autograd.grad(chunked.square().sum(), (q, k, v))
    for a, b in zip(g_chunked, g_full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_asap_inference_never_materialises_the_score_matrix():
    """Peak memory well under one (b, h, n, m) fp32 tensor (a strided bias once made SDPA expand it)."""
    from asap.bench.measure import peak_memory

    from asap.attention.closure import SHARED_CHUNK_BYTES

    b, h, n, d = 4, 8, 512, 16
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    f_hat = torch.randn(b, h, n)
    full = b * h * n * n * 4
    inputs = 4 * b * h * n * d * 4
    with torch.no_grad():
        for backend in ("flash", "shared"):  # shared: one chunk of score blocks at a time
            peak = peak_memory(lambda: asap_attention(q, k, v, f_hat, backend=backend), device=torch.device("cpu")).peak_bytes
            assert 0 < peak < 0.25 * full, (backend, peak, full)
            if backend == "shared":
                assert peak < SHARED_CHUNK_BYTES + 2 * inputs, (peak, SHARED_CHUNK_BYTES)
