"""The native CPU kernels (asap.attention.native) against the fp64 references, and their fallbacks.

The kernels compute the fused linear dual map and the one-exponential closure in C, one pass per
(b, h); every result is compared with the fp64 reference (design matrix for the map,
``asap_attention_reference`` for the closure), on every layout, with padding (including a
sequence of one token and an empty one), and by the low-precision rule for fp16/bf16 inputs.
"""

from __future__ import annotations

import pytest
import torch

from asap.attention import asap_attention, build_operator, native, softmax_attention
from asap.attention.closure import shared_exp_closure
from asap.attention.reference import asap_attention_reference, softmax_attention_reference
from asap.transport.masks import key_padding_to_attn_mask
from tests.attention.test_dual_map import _reference as map_reference
from tests.attention.test_layouts import LAYOUTS, relayout
from tests.conftest import rand_qkv

pytestmark = pytest.mark.skipif(native.unavailable() is not None, reason=f"{native.unavailable()}")

LENGTHS = (17, 9, 1, 0)  # full, padded, a single token, an empty sequence


def _valid(n=17, lengths=LENGTHS):
    return torch.arange(n)[None] < torch.tensor([min(x, n) for x in lengths])[:, None]


def _map(extras, *, heads=3, d=16, slices=16, seed=3):
    m = build_operator("asap", num_heads=heads, head_dim=d, num_slices=slices, seed=seed, extra_features=extras).dual_map
    m.set_coefficients(torch.randn(heads, m.num_features, dtype=torch.float64))
    return m


@pytest.mark.parametrize("extras", [(), ("qk_mean",), ("q_norm",), ("qk_mean", "q_norm"), ("qk_mean", "q_norm", "lse_landmarks"),
                                    ("qk_mean", "q_norm", "lse_keys")])
@pytest.mark.parametrize("slices", [1, 5, 16, 20])
@pytest.mark.parametrize("padded", [False, True])
def test_dual_map_matches_the_fp64_design_matrix(extras, slices, padded):
    m = _map(extras, slices=slices)
    q, k = torch.randn(4, 3, 17, 16, dtype=torch.float64), torch.randn(4, 3, 17, 16, dtype=torch.float64)
    valid = _valid() if padded else None
    expected = map_reference(m, q, k, scale=0.3, attn_mask=None if valid is None else key_padding_to_attn_mask(valid))
    got = m._forward_native(q.float(), k.float(), scale=0.3, valid=valid, center=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=2e-5 * expected.abs().max().item())
    # The public forward takes the kernel for these inputs, and center=False only shifts each (b, h).
    torch.testing.assert_close(m(q.float(), k.float(), scale=0.3, padding_mask=valid), got, rtol=0, atol=0)
    raw = m(q.float(), k.float(), scale=0.3, padding_mask=valid, center=False)
    rows = torch.ones(4, 3, 17, dtype=torch.bool) if valid is None else valid[:, None].expand(4, 3, 17)
    for b in range(4):
        for h in range(3):
            diff = (raw - got)[b, h][rows[b, h]]
            if diff.numel():
                torch.testing.assert_close(diff, diff[:1].expand_as(diff), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", [16, 40, 48])  # one vector of features; several, the last partial; several full
def test_dual_map_any_layout_is_bit_equal(layout, d):
    m = _map(("qk_mean", "q_norm"), d=d)
    q, k = torch.randn(2, 3, 17, d), torch.randn(2, 3, 17, d)
    q2, k2 = relayout(q, layout), relayout(k, layout)
    valid = _valid(lengths=(17, 11))
    got = m(q2, k2, scale=0.4, padding_mask=valid)
    torch.testing.assert_close(got, m(q2.contiguous(), k2.contiguous(), scale=0.4, padding_mask=valid), rtol=0, atol=0)


def test_dual_map_ties_and_nan():
    """Tied projections (repeated tokens) are a zero step; a NaN token makes the dual NaN, never silently finite."""
    m = _map(("qk_mean",))
    q = torch.randn(2, 3, 6, 16).repeat_interleave(2, dim=2)  # every token twice: tied ranks on every slice
    k = torch.randn(2, 3, 12, 16).round()
    expected = map_reference(m, q.double(), k.double(), scale=0.5, attn_mask=None)
    torch.testing.assert_close(m(q, k, scale=0.5).double(), expected, rtol=2e-5, atol=2e-5 * expected.abs().max().item())
    q[1, 2, 4, 0] = float("nan")
    out = m(q, k, scale=0.5)
    assert out[1, 2].isnan().all() and out[0].isfinite().all()


@pytest.mark.parametrize("n", [97, 128, 200])
def test_sorted_dual_map_matches_the_fp64_design_matrix(n):
    """Above 96 valid tokens the slices are sorted by a bitonic network instead of ranked by counting:
    against the fp64 reference with ties (repeated tokens, -0 and +0), padding (a sequence counted, one
    sorted, one empty), any layout bit-equal, and a NaN token making that (b, h) NaN."""
    m = _map(("qk_mean", "q_norm"), slices=20)
    q, k = torch.randn(4, 3, n, 16), torch.randn(4, 3, n, 16)
    q[:, :, 1], k[:, :, 3] = q[:, :, 0], k[:, :, 2]  # tied projections on every slice
    q[0, 0, 5], q[0, 0, 6] = 0.0, -0.0  # projections exactly 0 and -0
    valid = _valid(n, lengths=(n, n - 40, 50, 0))
    for pad in (None, valid):
        expected = map_reference(m, q.double(), k.double(), scale=0.3,
                                 attn_mask=None if pad is None else key_padding_to_attn_mask(pad))  # fmt: skip
        got = m(q, k, scale=0.3, padding_mask=pad)
        torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=2e-5 * expected.abs().max().item())
        for layout in LAYOUTS[1:]:
            q2, k2 = relayout(q, layout), relayout(k, layout)
            torch.testing.assert_close(m(q2, k2, scale=0.3, padding_mask=pad),
                                       m(q2.contiguous(), k2.contiguous(), scale=0.3, padding_mask=pad), rtol=0, atol=0)
    q[1, 2, 100 % n, 3] = float("nan")
    out = m(q, k, scale=0.3)
    assert out[1, 2].isnan().all() and out[0].isfinite().all()


@pytest.mark.parametrize("eps", [0.3, 1.0])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shape", [(4, 3, 17, 16, 16), (4, 2, 50, 32, 24), (4, 1, 1, 8, 8)])
def test_closure_matches_the_fp64_reference(eps, padded, shape):
    b, h, n, d, dv = shape
    q, k, v = rand_qkv(b=b, h=h, n=n, d=d, dv=dv, dtype=torch.float32, scale=2.0)
    f = 4 * torch.randn(b, h, n)
    valid = _valid(n) if padded else None
    mask = None if valid is None else key_padding_to_attn_mask(valid)
    out = asap_attention(q, k, v, f, eps=eps, padding_mask=valid, backend="native")
    ref = asap_attention_reference(q.double(), k.double(), v.double(), f.double(), eps=eps, attn_mask=mask)
    assert out.dtype == torch.float32 and out.shape == (b, h, n, dv)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    if valid is not None:
        assert (out[~valid[:, None].expand(b, h, n)] == 0).all()  # padded queries output exactly 0


@pytest.mark.parametrize("eps", [0.3, 1.0])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", *LAYOUTS])
def test_closure_forms_the_keys_lse_extra(eps, padded, layout):
    """c_lse: the closure adds c_lse_h log mean_j exp(scale q_i.k_j) (valid keys) to f before the c-transform,
    from its own scores; against the fp64 reference of that dual, any layout, and the returned dual centred."""
    from asap.attention.dual_map import _keys_lse

    b, h, n, d = 4, 3, 37, 16
    q, k, v = rand_qkv(b=b, h=h, n=n, d=d, dtype=torch.float32, scale=2.0)
    f, c_lse = torch.randn(b, h, n), torch.tensor([0.8, -0.5, 1.3])
    valid = _valid(n) if padded else None
    q2, k2, v2 = (t if layout == "contiguous" else relayout(t, layout) for t in (q, k, v))
    out, dual = native.asap_forward_native(q2, k2, v2, scale=0.4, eps=eps, f_hat=f, c_lse=c_lse, valid=valid,
                                           return_dual=True, center=True)  # fmt: skip
    cols = None if valid is None else valid[:, None, :]
    q, k, v = (t.double() for t in (q2, k2, v2))  # "expanded" changes the values (head 0 broadcast)
    target = f.double() + c_lse.double()[None, :, None] * _keys_lse(q, k, scale=0.4, cols=cols)
    mask = None if valid is None else key_padding_to_attn_mask(valid)
    ref = asap_attention_reference(q, k, v, target, eps=eps, scale=0.4, attn_mask=mask)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    rows = torch.ones(b, h, n, dtype=torch.bool) if valid is None else valid[:, None].expand(b, h, n)
    weight = rows.double()
    centred = (target - (target * weight).sum(-1, keepdim=True) / weight.sum(-1, keepdim=True).clamp(min=1)) * weight
    torch.testing.assert_close(dual.double() * weight, centred, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="c_lse"):
        native.asap_forward_native(q2, k2, scale=0.4, f_hat=f, c_lse=c_lse)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", [16, 40, 48])
def test_closure_any_layout(layout, d):
    q, k, v = rand_qkv(b=2, h=3, n=17, d=d, dtype=torch.float32)
    f = torch.randn(2, 3, 17)
    q2, k2, v2 = (relayout(t, layout) for t in (q, k, v))
    f2 = f.transpose(0, 1).contiguous().transpose(0, 1)  # a strided dual too
    valid = _valid(lengths=(17, 5))
    got = asap_attention(q2, k2, v2, f2, padding_mask=valid, backend="native")
    want = asap_attention(q2.contiguous(), k2.contiguous(), v2.contiguous(), f, padding_mask=valid, backend="native")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_closure_far_apart_duals_keep_every_row():
    """A query whose dual is ~200 eps below the others still gets a softmax row (the row shift)."""
    q, k, v = rand_qkv(b=1, h=1, n=9, d=16, dtype=torch.float32)
    f = torch.zeros(1, 1, 9)
    f[..., 3] = -200.0
    out = asap_attention(q, k, v, f, eps=1.0, backend="native")
    ref = asap_attention_reference(q.double(), k.double(), v.double(), f.double(), eps=1.0)
    assert out.isfinite().all()
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("extras", [("qk_mean", "q_norm"), ("qk_mean", "lse_keys"), ("q_norm", "lse_landmarks")])
@pytest.mark.parametrize("padded", [False, True])
def test_operator_fused_call_matches_the_fp64_operator(padded, extras, monkeypatch):
    """AsapOperator sends short CPU self-attention to one native call (map and closure; lse_keys formed in the
    kernel, lse_landmarks added by the map and the closure run from its f_hat); fp64 inputs take PyTorch."""
    op = build_operator("asap", num_heads=3, head_dim=16, num_slices=16, extra_features=extras, eps=0.5)
    op.dual_map.set_coefficients(torch.randn(3, 18))
    q, k, v = rand_qkv(b=4, h=3, n=17, d=16, dtype=torch.float32)
    valid = _valid() if padded else None
    calls = []
    kernel = native.asap_forward_native
    monkeypatch.setattr(native, "asap_forward_native", lambda *a, **kw: calls.append(kw.get("f_hat") is not None) or kernel(*a, **kw))
    with torch.no_grad():
        out = op(q, k, v, padding_mask=valid)
        assert calls[-1] == ("lse_landmarks" in extras)  # the closure took f_hat from the map, or ran the map itself
        ref = op.double()(q.double(), k.double(), v.double(), padding_mask=valid)
        op.dual_map.use_native = False  # the PyTorch map and closure, in fp32
        torch_path = op.float()(q, k, v, padding_mask=valid)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(torch_path.double(), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("padded", [False, True])
def test_low_precision_rule(dtype, padded):
    """fp16/bf16 inputs: the native closure's error vs fp64 at most twice plain softmax attention's."""
    q, k, v = (t.to(dtype) for t in rand_qkv(b=2, h=4, n=48, d=32, scale=3.0))
    q64, k64, v64 = (t.double() for t in (q, k, v))
    f = 3 * torch.randn(2, 4, 48)
    valid = _valid(48, (48, 30)) if padded else None
    mask = None if valid is None else key_padding_to_attn_mask(valid)
    fast = asap_attention(q, k, v, f, padding_mask=valid, backend="native")
    truth = asap_attention_reference(q64, k64, v64, f.double(), attn_mask=mask)
    plain = softmax_attention(q, k, v, attn_mask=mask)
    plain_truth = softmax_attention_reference(q64, k64, v64, attn_mask=mask)
    assert fast.dtype == dtype and fast.isfinite().all()
    assert (fast.double() - truth).abs().max() <= 2 * (plain.double() - plain_truth).abs().max()


def test_refusals_are_one_line():
    q, k, v = rand_qkv(b=1, h=1, n=6, d=4, dtype=torch.float32)
    f = torch.zeros(1, 1, 6)
    with pytest.raises(ValueError, match="takes no extra_steps or attn_mask"):
        asap_attention(q, k, v, f, attn_mask=torch.ones(6, 6, dtype=torch.bool), backend="native")
    with pytest.raises(ValueError, match="inference only"):
        asap_attention(q.requires_grad_(True), k, v, f, backend="native")
    with pytest.raises(ValueError, match="cannot run: native kernels: fp32/fp16/bf16"):
        asap_attention(q.detach().double(), k.double(), v.double(), f.double(), backend="native")


def test_build_failure_and_opt_out_fall_back(monkeypatch, tmp_path):
    """No compiler (or ASAP_NATIVE=0): unavailable() says why and the operator keeps the PyTorch path."""
    op = build_operator("asap", num_heads=2, head_dim=8, num_slices=4, extra_features=("qk_mean",))
    op.dual_map.set_coefficients(torch.randn(2, 5))
    q, k, v = rand_qkv(b=2, h=2, n=7, d=8, dtype=torch.float32)
    with torch.no_grad():
        expected = op(q, k, v)
    try:
        monkeypatch.setenv("ASAP_NATIVE_CACHE", str(tmp_path))
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        native._load.cache_clear()
        assert native.unavailable().startswith("native kernel unavailable")
        assert not list(tmp_path.iterdir())  # nothing half-written left behind
        with torch.no_grad():
            torch.testing.assert_close(op(q, k, v), expected, rtol=2e-5, atol=2e-5)
        monkeypatch.setenv("ASAP_NATIVE", "0")
        native._load.cache_clear()
        assert native.unavailable() == "disabled by ASAP_NATIVE=0"
    finally:
        monkeypatch.undo()
        native._load.cache_clear()
    assert native.unavailable() is None


def test_the_library_is_named_by_the_source_as_first_read(monkeypatch, tmp_path):
    """A source edited under a running process does not change the library that process loads (its bindings
    were written for the source it started with)."""
    source = tmp_path / "asap_cpu.c"
    source.write_bytes(native.SOURCE.read_bytes())
    monkeypatch.setattr(native, "SOURCE", source)
    monkeypatch.setattr(native, "_SOURCE_BYTES", {})
    before = native._library_path(native.OPENMP_FLAGS)
    source.write_text("/* edited */\n" + source.read_text())
    assert native._library_path(native.OPENMP_FLAGS) == before
    monkeypatch.setattr(native, "_SOURCE_BYTES", {})  # a fresh process reads the edited file: another library
    assert native._library_path(native.OPENMP_FLAGS) != before


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_threads_split_the_heads_bit_equal(threads):
    """The heads are split over torch's threads (OpenMP): any thread count, even more threads than heads
    or an uneven split, gives the bit-identical map and output of one thread."""
    m = _map(("qk_mean", "q_norm"), heads=3)
    q, k, v = rand_qkv(b=2, h=3, n=17, d=16, dtype=torch.float32)
    valid = _valid(lengths=(17, 5))
    args = dict(scale=0.3, directions=m.directions.float(), coef=m.coefficients()[:, :16].float(), valid=valid)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.asap_forward_native(q, k, v, return_dual=True, **args)
        torch.set_num_threads(threads)
        many = native.asap_forward_native(q, k, v, return_dual=True, **args)
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_compiler_without_openmp_builds_the_serial_library(monkeypatch, tmp_path):
    """Where -fopenmp fails (Apple's clang), the single-threaded library is built and gives the same result."""
    cc = tmp_path / "cc-without-openmp"
    cc.write_text('#!/bin/sh\nfor a; do [ "$a" = -fopenmp ] && { echo "unsupported option" >&2; exit 1; }; done\n'
                  f'exec {native._compiler()} "$@"\n')
    cc.chmod(0o755)
    q, k, v = rand_qkv(b=2, h=3, n=9, d=8, dtype=torch.float32)
    f = torch.randn(2, 3, 9)
    expected = native.asap_forward_native(q, k, v, f_hat=f, scale=0.5)
    try:
        monkeypatch.setenv("ASAP_NATIVE_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("CC", str(cc))
        native._load.cache_clear()
        assert native.unavailable() is None and not native.threaded()
        torch.testing.assert_close(native.asap_forward_native(q, k, v, f_hat=f, scale=0.5), expected, rtol=0, atol=0)
    finally:
        monkeypatch.undo()
        native._load.cache_clear()
    assert native.unavailable() is None and native.threaded()  # the default (OpenMP) library loads again


@pytest.mark.parametrize("shape", [(2, 3, 17, 17, 16), (2, 2, 50, 33, 24), (1, 2, 1, 1, 4), (1, 1, 40, 70, 8)])
@pytest.mark.parametrize("chunk_bytes", [1, 2**22])
@pytest.mark.parametrize("eps", [0.3, 1.0])
def test_closure_blocks_match_the_fp64_reference(shape, chunk_bytes, eps):
    """The native passes of the one-exponential closure (cross-attention too, m not a multiple of the
    vector width, one block per chunk or all in one) against the fp64 reference, and the PyTorch ops."""
    b, h, n, m, d = shape
    q, k = torch.randn(b, h, n, d, dtype=torch.float64), torch.randn(b, h, m, d, dtype=torch.float64)
    v, f = torch.randn(b, h, m, 5, dtype=torch.float64), 3 * torch.randn(b, h, n, dtype=torch.float64)
    truth = asap_attention_reference(q, k, v, f, eps=eps, scale=0.4)
    args = [t.float() for t in (q, k, v, f)]
    fast = shared_exp_closure(*args, scale=0.4, eps=eps, chunk_bytes=chunk_bytes)
    plain = shared_exp_closure(*args, scale=0.4, eps=eps, chunk_bytes=chunk_bytes, native_passes=False)
    torch.testing.assert_close(fast.double(), truth, rtol=2e-5, atol=2e-5)
    assert (fast.double() - truth).abs().max() <= 2 * (plain.double() - truth).abs().max() + 1e-6


@pytest.mark.parametrize("layout", LAYOUTS)
def test_closure_blocks_any_layout(layout):
    q, k, v = rand_qkv(b=2, h=3, n=19, d=16, dtype=torch.float32)
    f = torch.randn(2, 3, 19)
    args = [relayout(t, layout) for t in (q, k, v)]  # expanded changes the values: compare like with like
    want = shared_exp_closure(*(t.contiguous() for t in args), f, scale=0.25, eps=0.5)
    got = shared_exp_closure(*args, f, scale=0.25, eps=0.5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_closure_blocks_keep_a_row_that_would_underflow_and_split_over_threads():
    """A query ~1000 eps below its competitors keeps its row (the row shift), and every thread count
    (blocks split over threads, more threads than blocks) gives the bit-identical result."""
    q, k, v = rand_qkv(b=1, h=3, n=21, d=8, dtype=torch.float32)
    f = torch.randn(1, 3, 21)
    f[0, :, 2] = -100.0
    truth = asap_attention_reference(q.double(), k.double(), v.double(), f.double(), eps=0.1, scale=0.5)
    saved = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 5):
            torch.set_num_threads(threads)
            results.append(shared_exp_closure(q, k, v, f, scale=0.5, eps=0.1))
    finally:
        torch.set_num_threads(saved)
    assert results[0].isfinite().all()
    torch.testing.assert_close(results[0].double(), truth, rtol=1e-5, atol=1e-5)
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=0)


def test_closure_blocks_refuse_what_they_cannot_take():
    scores, bias, den = torch.zeros(2, 3, 16), torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="contiguous fp32"):
        native.closure_blocks(scores.double(), bias, den, alpha=1.0, columns=4)
    with pytest.raises(ValueError, match="do not match"):
        native.closure_blocks(scores, bias[:1], den, alpha=1.0, columns=4)
    with pytest.raises(ValueError, match="a multiple of 16"):
        native.closure_blocks(scores[..., :12].contiguous(), bias, den, alpha=1.0, columns=4)
    with pytest.raises(ValueError, match="at least columns"):
        native.closure_blocks(scores, bias, den, alpha=1.0, columns=17)
    assert native.supports_blocks(scores.double()) is not None
    assert native.supports_blocks(scores.requires_grad_(True)) == "native kernels: inference only (no autograd)"



@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_other_builds_agree_with_the_one_this_cpu_picks(monkeypatch, tmp_path, isa):
    """The library built for AVX2 (8 floats per vector, key gathers: what laptops and AMD Zen 1-3 run) and
    the generic build (16 lanes lowered by the compiler, keys copied row by row) give the map, output and
    closure blocks of the build this CPU picks, to the rounding of a horizontal sum in another order; the
    ranks are exact. Ranks (n <= 96) and sorts, padding, 20 slices (not a multiple of 16), transposed
    keys and a closure that masks the columns past m."""
    if isa == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the AVX2 build needs an AVX2 CPU")
    m = _map(("qk_mean", "q_norm"), heads=2, slices=20)
    args = dict(scale=0.3, directions=m.directions.float(), coef=m.coefficients()[:, :20].float())
    inputs = []
    for n, lengths in ((17, (17, 5)), (130, (130, 100))):
        q, k, v = rand_qkv(b=2, h=2, n=n, d=16, dtype=torch.float32)
        inputs.append((q, relayout(k, "transposed"), v, _valid(n, lengths)))
    scores, bias = torch.randn(3, 20, 48) * 4, torch.randn(3, 20)

    def run():
        outs = [native.asap_forward_native(q, k, v, return_dual=True, valid=valid, **args) for q, k, v, valid in inputs]
        s, den = scores.clone(), torch.empty(3, 20)
        native.closure_blocks(s, bias, den, alpha=0.7, columns=37)
        return [t for pair in outs for t in pair] + [s, den]

    expected = run()
    try:
        monkeypatch.setenv("ASAP_NATIVE_CACHE", str(tmp_path))
        monkeypatch.setenv("ASAP_NATIVE_ISA", isa)
        native._load.cache_clear()
        assert native.unavailable() is None and native.instruction_set() == isa
        assert len(list(tmp_path.glob("*.so"))) == 1  # built here, not taken from the shared cache
        got = run()
        monkeypatch.setenv("ASAP_NATIVE_ISA", "sse9")
        native._load.cache_clear()
        assert native.unavailable() == ("native kernel unavailable: ASAP_NATIVE_ISA must be one of avx512, avx2, "
                                        "generic, got 'sse9'")  # fmt: skip
    finally:
        monkeypatch.undo()
        native._load.cache_clear()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
