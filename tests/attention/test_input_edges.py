"""Edge inputs of the public attention functions (issue 12, D10 and D15).

Empty batch or head dims give empty results (a private kernel used to die with
SIGFPE on h = 0, ESP raised ZeroDivisionError); d = 0, infinite or boolean
options and impossible module sizes are refused with a message naming them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import asap
from asap.attention import MultiheadAttention, build_operator

FUNCTIONS = {
    "softmax": lambda q, k, v, **kw: asap.softmax_attention(q, k, v, **kw),
    "sinkhorn": lambda q, k, v, **kw: asap.sinkhorn_attention(q, k, v, n_iters=3, **kw),
    "esp": lambda q, k, v, **kw: asap.esp_attention(q, k, v, **kw),
    "asap": lambda q, k, v, **kw: asap.asap_attention(q, k, v, torch.zeros(q.shape[:-1], dtype=q.dtype), **kw),
}


@pytest.mark.parametrize("method", FUNCTIONS)
@pytest.mark.parametrize("b, h", [(0, 3), (2, 0), (0, 0)])
@pytest.mark.parametrize("grad", [False, True])
def test_empty_batch_or_heads_give_empty_results(method, b, h, grad):
    q, k, v = torch.randn(b, h, 5, 4), torch.randn(b, h, 6, 4), torch.randn(b, h, 6, 3)
    if grad:
        q.requires_grad_(True)
    out = FUNCTIONS[method](q, k, v)
    assert out.shape == (b, h, 5, 3)


@pytest.mark.parametrize("method", FUNCTIONS)
def test_zero_head_size_is_refused_by_name(method):
    q = torch.randn(2, 3, 5, 0)
    with pytest.raises(ValueError, match="head size d = 0"):
        FUNCTIONS[method](q, q, torch.randn(2, 3, 5, 2))


@pytest.mark.parametrize("method", ["sinkhorn", "asap"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), True, -1.0, 0.0])
def test_eps_must_be_finite_positive_number(method, bad):
    q = torch.randn(1, 2, 4, 3)
    with pytest.raises(ValueError, match="eps must be a finite positive number"):
        FUNCTIONS[method](q, q, q, eps=bad)


@pytest.mark.parametrize("method", FUNCTIONS)
@pytest.mark.parametrize("bad", [float("inf"), True, -2.0])
def test_scale_must_be_finite_positive_number(method, bad):
    q = torch.randn(1, 2, 4, 3)
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        FUNCTIONS[method](q, q, q, scale=bad)


def test_n_iters_takes_integers_not_bools():
    q = torch.randn(1, 2, 4, 3)
    with pytest.raises(ValueError, match="n_iters"):
        asap.sinkhorn_attention(q, q, q, n_iters=True)
    out = asap.sinkhorn_attention(q, q, q, n_iters=np.int64(3))  # a NumPy integer is an integer
    torch.testing.assert_close(out, asap.sinkhorn_attention(q, q, q, n_iters=3), rtol=0, atol=0)


@pytest.mark.parametrize("dim, heads", [(8, 0), (8, -2), (0, 2), (8, True), (8, 3)])
def test_multihead_sizes_refused_at_construction(dim, heads):
    with pytest.raises(ValueError, match="num_heads|dim"):
        MultiheadAttention(dim, num_heads=heads, method="sinkhorn", n_iters=3)


@pytest.mark.parametrize("method", ["sinkhorn", "asap", "softmax"])
def test_operator_scale_checked_at_construction(method):
    with pytest.raises(ValueError, match="scale"):
        build_operator(method, num_heads=2, head_dim=4, scale=-1.0)
