"""Layout fuzz: every public attention function gives the same answer for any memory layout.

Fast paths (private fused kernels, NumPy sorts, folded biases) may assume a
layout; issue 12 found one that silently returned wrong attention for a
transposed or sliced ``q``. Here every function is called on the same values
stored contiguously, with transposed storage (last dim not unit-stride), as a
sliced view ``t[..., ::2]`` and as a stride-0 broadcast (``expand``), in fp32
and fp64, with and without a padding mask and autograd; the output (and the
gradients) must equal the call on contiguous copies, and the fp64 reference.
"""

from __future__ import annotations

import pytest
import torch

from asap.attention import MultiheadAttention, asap_attention, build_operator, esp_attention
from asap.attention import sinkhorn_attention, softmax_attention
from asap.attention.esp import esp_attention_reference
from asap.attention.reference import (
    asap_attention_reference,
    sinkhorn_attention_reference,
    softmax_attention_reference,
)
from tests.conftest import padding_mask

LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")
METHODS = ("softmax", "sinkhorn3", "sinkhorn4", "esp", "asap")


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``t`` in another memory layout (``expanded`` changes values: head 0 broadcast)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed":  # same values, last dim of stride n
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":  # a view with last-dim stride 2
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "expanded":  # stride 0 along heads
        return t[:, :1].expand(*t.shape)
    raise AssertionError(layout)


def call(method: str, q, k, v, f, mask, *, reference: bool = False):
    if method == "softmax":
        fn = softmax_attention_reference if reference else softmax_attention
        return fn(q, k, v, attn_mask=mask)
    if method.startswith("sinkhorn"):
        fn = sinkhorn_attention_reference if reference else sinkhorn_attention
        return fn(q, k, v, n_iters=int(method[-1]), eps=0.7, attn_mask=mask)
    if method == "esp":
        fn = esp_attention_reference if reference else esp_attention
        return fn(q, k, v, attn_mask=mask, tau_sort=0.05)
    fn = asap_attention_reference if reference else asap_attention
    return fn(q, k, v, f, eps=0.7, attn_mask=mask)


def _inputs(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    f = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, f)]


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", METHODS)
def test_every_layout_gives_the_contiguous_answer(method, layout, dtype, masked, grad):
    q, k, v, f = (relayout(t, layout) for t in _inputs(dtype, seed=LAYOUTS.index(layout)))
    # f_hat (b, h, n) gets the layout of its own kind: sliced / expanded along heads.
    mask = padding_mask([6, 4], 6) if masked else None
    leaves = [q, k, v, f]
    if grad:
        # Leaves keep their layout: make them leaves of the strided views themselves.
        leaves = [t.detach().requires_grad_(True) for t in leaves]
    out = call(method, *leaves, mask)
    copies = [t.detach().contiguous().requires_grad_(grad) for t in leaves]
    expected = call(method, *copies, mask)
    tol = dict(rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)
    torch.testing.assert_close(out, expected, **tol)
    reference = call(method, *(t.detach().double() for t in leaves), mask, reference=True)
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=2e-5 if dtype == torch.float32 else 1e-11)
    if grad:
        used = leaves if method == "asap" else leaves[:3]
        used_copies = copies if method == "asap" else copies[:3]
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        grads = torch.autograd.grad((out * weight).sum(), used)
        grads_expected = torch.autograd.grad((expected * weight).sum(), used_copies)
        for a, b in zip(grads, grads_expected):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-11)


@pytest.mark.parametrize("seed", range(6))
def test_mixed_layouts_per_argument(seed):
    """Each of q, k, v, f_hat in its own layout (drawn per seed), fp32 and fp64, masked, no autograd."""
    gen = torch.Generator().manual_seed(100 + seed)
    for dtype in (torch.float32, torch.float64):
        base = _inputs(dtype, seed)
        picks = torch.randint(len(LAYOUTS), (4,), generator=gen).tolist()
        args = [relayout(t, LAYOUTS[p]) for t, p in zip(base, picks)]
        mask = padding_mask([6, 3], 6) if seed % 2 else None
        for method in METHODS:
            with torch.no_grad():
                out = call(method, *args, mask)
                expected = call(method, *(t.contiguous() for t in args), mask)
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("mask_layout", ["contiguous", "transposed", "expanded"])
@pytest.mark.parametrize("method", ["softmax", "sinkhorn3", "asap"])
def test_mask_layouts(method, mask_layout):
    """An arbitrary boolean mask in any layout (transposed storage, stride-0 over batch and heads)."""
    q, k, v, f = _inputs(torch.float32, seed=3)
    mask = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(4)) > 0.4
    mask[..., 0, :] = True
    if mask_layout == "transposed":
        mask = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif mask_layout == "expanded":
        mask = mask[:1, :1].expand(2, 3, 6, 6)
    with torch.no_grad():
        out = call(method, q, k, v, f, mask)
        expected = call(method, q, k, v, f, mask.contiguous())
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", ["softmax", "sinkhorn", "esp", "asap"])
def test_operators_and_module_take_any_layout(method, layout):
    """``build_operator(...)`` on strided q, k, v and ``MultiheadAttention`` on a strided ``x``."""
    torch.manual_seed(0)
    options = {"num_slices": 4} if method == "asap" else {}
    op = build_operator(method, num_heads=3, head_dim=8, **options).double()
    if method == "asap":
        op.dual_map.coef.normal_()
        op.dual_map.fitted.fill_(True)
    q, k, v, _ = (relayout(t, layout) for t in _inputs(torch.float64, seed=5))
    mask = padding_mask([6, 4], 6)
    for m in (None, mask):
        with torch.no_grad():
            torch.testing.assert_close(
                op(q, k, v, attn_mask=m), op(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=m),
                rtol=0, atol=1e-12,
            )
    attn = MultiheadAttention(24, num_heads=3, method=method, **options).double()
    if method == "asap":
        attn.operator.dual_map.coef.normal_()
        attn.operator.dual_map.fitted.fill_(True)
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    x = relayout(x.unsqueeze(1), layout).squeeze(1) if layout != "expanded" else x[:1].expand(2, 6, 24)
    pm = torch.ones(2, 6, dtype=torch.bool)
    pm[1, 4:] = False
    for p in (None, pm):
        with torch.no_grad():
            torch.testing.assert_close(attn(x, padding_mask=p), attn(x.contiguous(), padding_mask=p), rtol=0, atol=1e-12)
