"""ESP attention: POT's expected sliced plan as oracle, the dense reference, padding, tiling, gradients, dtypes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from asap.attention.esp import _tile_shape, esp_attention
from asap.attention.operators import OPERATORS, EspOperator, build_operator
from asap.attention.reference import esp_attention_reference
from asap.transport.masks import key_padding_to_attn_mask

ot = pytest.importorskip("ot")

F64 = torch.float64


def _qkv(b=2, h=2, n=6, m=None, d=4, dv=3, *, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    q = torch.randn(b, h, n, d, generator=gen, dtype=F64)
    k = torch.randn(b, h, m, d, generator=gen, dtype=F64)
    v = torch.randn(b, h, m, dv, generator=gen, dtype=F64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _unit_directions(*shape, seed=1):
    theta = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return theta / theta.norm(dim=-1, keepdim=True)


def _attention_matrix(q, k, **options):
    """ESP attention matrix ``A (b, h, n, m)``, read off by attending to the identity values."""
    b, h, m = k.shape[0], k.shape[1], k.shape[2]
    eye = torch.eye(m, dtype=q.dtype).expand(b, h, m, m)
    return esp_attention(q, k, eye, **options)


# ---------------------------------------------------------------- POT oracle (exact sorting)


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean"])
@pytest.mark.parametrize("beta", [0.0, 0.7, 5.0])
def test_hard_plan_is_pots_expected_sliced_plan(metric, beta):
    # n = 8: POT takes its permutation branch only when sum(1/n) == 1 exactly in floating point; for
    # other n it falls into its n != m branch, whose slice costs are mis-weighted (see below).
    q, k, _ = _qkv(b=1, h=2, n=8)
    theta = _unit_directions(2, 5, 4)  # per-head directions (h, L, d)
    attention = _attention_matrix(q, k, scale=1.0, directions=theta, soft=False, tau=beta, cost=metric)
    for head in range(2):
        expected, _ = ot.expected_sliced_plan(
            q[0, head].numpy(), k[0, head].numpy(), projections=theta[head].T.numpy(), metric=metric, beta=beta
        )
        np.testing.assert_allclose(attention[0, head].numpy() / 8, expected, atol=1e-12)


def test_default_axis_slices_and_scale_match_pot():
    """Default slices are the d axes; the moved points are ``sqrt(scale) q`` and ``sqrt(scale) k``."""
    q, k, _ = _qkv(b=1, h=1, n=8, d=5)
    scale = 0.37
    attention = _attention_matrix(q, k, scale=scale, soft=False, tau=2.0, cost="sqeuclidean")
    points_q, points_k = (math.sqrt(scale) * t[0, 0].numpy() for t in (q, k))
    expected, _ = ot.expected_sliced_plan(points_q, points_k, projections=np.eye(5), metric="sqeuclidean", beta=2.0)
    np.testing.assert_allclose(attention[0, 0].numpy() / 8, expected, atol=1e-12)


def test_published_preset_matches_pot_with_its_conventions():
    """Published: points ``scale q``, Euclidean cost weighted by ``n`` (plans of mass n), ``A = n pi``."""
    q, k, _ = _qkv(b=1, h=1, n=8, d=4)
    scale, tau, n = 0.5, 0.3, 8
    attention = _attention_matrix(q, k, scale=scale, soft=False, tau=tau, published=True)
    expected, _ = ot.expected_sliced_plan(
        scale * q[0, 0].numpy(), scale * k[0, 0].numpy(), projections=np.eye(4), metric="euclidean", beta=tau * n
    )
    np.testing.assert_allclose(attention[0, 0].numpy() / n, expected, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 1.5])
def test_hard_plan_unequal_lengths_matches_pots_quantile_plans(beta):
    """n != m: POT's per-slice plans are the oracle. POT 0.9.7 mis-weights its n != m slice *costs*
    (``sparse_ot_dist`` indexes the pair weights by row index; PythonOT/POT#845, fixed by #846), so the
    slice weights are recomputed from POT's own plans and ``ot.dist``."""
    q, k, _ = _qkv(b=1, h=1, n=5, m=8, d=3)
    theta = _unit_directions(4, 3)
    attention = _attention_matrix(q, k, scale=1.0, directions=theta, soft=False, tau=beta, cost="sqeuclidean")
    _, _, log = ot.expected_sliced_plan(q[0, 0].numpy(), k[0, 0].numpy(), projections=theta.T.numpy(), log=True)
    full = ot.dist(q[0, 0].numpy(), k[0, 0].numpy(), metric="sqeuclidean")
    plans = []
    for sparse in log["G"]:
        plan = np.zeros((5, 8))
        np.add.at(plan, (sparse.rows, sparse.cols), sparse.data)
        plans.append(plan)
    costs = np.array([(plan * full).sum() for plan in plans])
    weights = np.exp(-beta * costs - np.logaddexp.reduce(-beta * costs))
    expected = sum(w * plan for w, plan in zip(weights, plans))
    np.testing.assert_allclose(attention[0, 0].numpy() / 5, expected, atol=1e-12)


def test_sqeuclidean_cost_is_dot_cost_at_twice_tau_for_exact_plans():
    q, k, v = _qkv(n=7)
    dot = esp_attention(q, k, v, soft=False, tau=1.3, cost="dot")
    sq = esp_attention(q, k, v, soft=False, tau=0.65, cost="sqeuclidean")
    torch.testing.assert_close(dot, sq)


# ---------------------------------------------------------------- structure of A


def test_exact_attention_is_doubly_stochastic_on_square_inputs():
    q, k, _ = _qkv(n=9)
    attention = _attention_matrix(q, k, soft=False)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 2, 9, dtype=F64))
    torch.testing.assert_close(attention.sum(-2), torch.ones(2, 2, 9, dtype=F64))


def test_soft_attention_rows_exact_columns_close():
    q, k, _ = _qkv(n=9)
    attention = _attention_matrix(q, k, tau_sort=1e-3)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 2, 9, dtype=F64))
    assert (attention.sum(-2) - 1).abs().max() < 1e-2


def test_soft_attention_converges_to_exact_monotonically():
    q, k, _ = _qkv(n=8, seed=3)
    hard = _attention_matrix(q, k, soft=False)
    taus = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
    errors = [(_attention_matrix(q, k, tau_sort=t) - hard).abs().max().item() for t in taus]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6


# ---------------------------------------------------------------- the dense reference, every option

OPTION_SETS = [
    dict(soft=False),
    dict(tau_sort=0.3),
    dict(tau_sort=0.3, cost="sqeuclidean"),
    dict(tau_sort=0.3, cost="euclidean", normalize="marginal"),
    dict(tau_sort=0.05, published=True),
    dict(soft=False, published=True, cost="dot"),
    dict(tau_sort=0.3, tau=3.0, directions=_unit_directions(2, 6, 4)),
]


def _option_id(options: dict) -> str:
    return "-".join(f"{key}={val}" for key, val in options.items() if key != "directions") or "default"


@pytest.mark.parametrize("options", OPTION_SETS, ids=_option_id)
@pytest.mark.parametrize("padded", [False, True])
def test_matches_dense_reference(options, padded):
    q, k, v = _qkv(n=6, m=5)
    mask = None
    if padded:
        valid_q = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
        valid_k = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
        mask = valid_q[:, None, :, None] & valid_k[:, None, None, :]
    expected = esp_attention_reference(q, k, v, attn_mask=mask, **options)
    for budget in (None, 600):  # one tile, and tiles of single slices and groups
        out = esp_attention(q, k, v, attn_mask=mask, memory_budget_bytes=budget, **options)
        torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------- padding


@pytest.mark.parametrize("soft", [True, False])
def test_padded_batch_agrees_with_unpadded_sequences(soft):
    b, h, n, d = 3, 2, 7, 4
    lengths = [7, 4, 1]
    q, k, v = (t.requires_grad_() for t in _qkv(b=b, h=h, n=n, d=d))
    padding = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    out = esp_attention(q, k, v, attn_mask=key_padding_to_attn_mask(padding), soft=soft, tau_sort=0.1)
    for i, length in enumerate(lengths):
        q_i, k_i, v_i = (t[i : i + 1, :, :length] for t in (q, k, v))
        alone = esp_attention(q_i, k_i, v_i, soft=soft, tau_sort=0.1)
        torch.testing.assert_close(out[i : i + 1, :, :length], alone)
        assert (out[i, :, length:] == 0).all()
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert (t.grad[1, :, 4:] == 0).all()  # padded tokens influence nothing


def test_all_padding_sequence_outputs_zero_without_nan():
    q, k, v = (t.requires_grad_() for t in _qkv(b=2, n=5))
    padding = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    for options in (dict(), dict(soft=False), dict(published=True)):
        out = esp_attention(q, k, v, attn_mask=key_padding_to_attn_mask(padding), **options)
        assert (out[1] == 0).all()
        q.grad = k.grad = v.grad = None
        out.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ---------------------------------------------------------------- tiling and gradients


def test_tile_shape_splits_slices_then_groups():
    shape = dict(n=64, m=64, d=16, dv=16, soft=True, euclidean=False, itemsize=4)
    assert _tile_shape(8, 16, budget=None, **shape) == (8, 16)
    groups, slices = _tile_shape(8, 16, budget=8 * 4 * 200_000, **shape)
    assert groups == 8 and 1 <= slices < 16
    assert _tile_shape(8, 16, budget=1, **shape) == (1, 1)


@pytest.mark.parametrize("soft", [True, False])
def test_tiled_and_untiled_agree_forward_and_backward(soft):
    q, k, v = _qkv(b=2, h=2, n=8, d=6, dv=5, seed=5)
    padding = torch.tensor([[1] * 8, [1] * 5 + [0] * 3], dtype=torch.bool)
    mask = key_padding_to_attn_mask(padding)
    results = []
    for budget in (None, 1000):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = esp_attention(*leaves, attn_mask=mask, soft=soft, tau_sort=0.2, memory_budget_bytes=budget)
        (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum().backward()
        results.append((out, *(t.grad for t in leaves)))
    for untiled, tiled in zip(*results):
        torch.testing.assert_close(tiled, untiled)


def test_no_full_slice_tensor_is_ever_alive():
    """With a small budget, no tensor of b*h*L*n*n elements is created, forward or backward."""

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    b, h, n, d = 2, 2, 64, 4
    q, k, v = (t.float().requires_grad_() for t in _qkv(b=b, h=h, n=n, d=d, dv=d))
    budget = 4 * b * h * 10 * n * n  # about one slice per tile
    with LargestTensor() as mode:
        esp_attention(q, k, v, tau_sort=1e-3, memory_budget_bytes=budget).sum().backward()
    assert mode.largest < b * h * d * n * n / 2
    with LargestTensor() as mode:
        esp_attention(q, k, v, soft=False, memory_budget_bytes=None).sum().backward()
    assert mode.largest < b * h * n * n  # exact sorting: O(L n d) gathers only, never n x n


@pytest.mark.parametrize("cost", ["dot", "sqeuclidean", "euclidean"])
@pytest.mark.parametrize("budget", [None, 300])
def test_gradcheck_fp64(cost, budget):
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, h=2, n=4, d=3, dv=2, seed=7))
    padding = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)

    def fn(q, k, v):
        return esp_attention(
            q, k, v, attn_mask=key_padding_to_attn_mask(padding), tau_sort=0.5, tau=2.0, cost=cost,
            memory_budget_bytes=budget,
        )

    assert torch.autograd.gradcheck(fn, (q, k, v))


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_at_most_twice_the_naive_reference(dtype):
    q, k, v = _qkv(b=2, h=2, n=16, d=8, dv=8, dtype=dtype, seed=11)
    options = dict(tau_sort=0.1, tau=1.0)
    exact = esp_attention_reference(*(t.double() for t in (q, k, v)), **options)  # same rounded inputs
    ours = esp_attention(q, k, v, **options)
    naive = esp_attention_reference(q, k, v, **options)
    assert ours.dtype == dtype
    error_ours = (ours.double() - exact).abs().max()
    error_naive = (naive.double() - exact).abs().max()
    assert error_ours <= 2 * error_naive, (error_ours, error_naive)


# ---------------------------------------------------------------- errors


def test_refuses_causal_general_masks_and_bad_options():
    q, k, v = _qkv(n=4)
    with pytest.raises(ValueError, match="causal"):
        esp_attention(q, k, v, is_causal=True)
    with pytest.raises(ValueError, match="key-padding"):
        esp_attention(q, k, v, attn_mask=torch.ones(4, 4, dtype=torch.bool).tril())
    with pytest.raises(TypeError, match="boolean"):
        esp_attention(q, k, v, attn_mask=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="cost"):
        esp_attention(q, k, v, cost="cosine")
    with pytest.raises(ValueError, match="normalize"):
        esp_attention(q, k, v, normalize="column")
    with pytest.raises(ValueError, match="tau_sort"):
        esp_attention(q, k, v, tau_sort=-1.0)
    with pytest.raises(ValueError, match="tau"):
        esp_attention(q, k, v, tau=float("nan"))
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        esp_attention(q, k, v, memory_budget_bytes=0)
    with pytest.raises(ValueError, match="directions"):
        esp_attention(q, k, v, directions=torch.randn(3, 5, dtype=F64))


# ---------------------------------------------------------------- the operator


def test_operator_matches_functional_and_stores_directions():
    q, k, v = _qkv(h=2, n=5, d=4)
    op = EspOperator(num_heads=2, head_dim=4, num_slices=6, slice_type="random", seed=3, tau_sort=0.1)
    assert op.directions.shape == (2, 6, 4) and "directions" in op.state_dict()
    expected = esp_attention(q, k, v, directions=op.directions.to(F64), tau_sort=0.1)
    torch.testing.assert_close(op(q, k, v), expected)
    axis = EspOperator(soft=False)
    assert axis.directions is None
    torch.testing.assert_close(axis(q, k, v), esp_attention(q, k, v, soft=False))
    with pytest.raises(ValueError, match="cost"):
        EspOperator(cost="manhattan")
    with pytest.raises(ValueError, match="num_heads"):
        EspOperator(num_slices=4)


def test_operator_is_built_by_the_method_switch():
    if "esp" not in OPERATORS:
        pytest.skip("EspOperator is not registered in OPERATORS yet (asap.attention.__init__)")
    op = build_operator("esp", num_heads=2, head_dim=4, tau_sort=0.1, memory_budget_bytes=10_000)
    assert isinstance(op, EspOperator) and op.method == "esp"


def test_one_mask_rule_for_the_function_the_operator_and_the_switch():
    """Issue 12 item 5: a mask forbidding pairs of valid tokens was refused by esp_attention but silently
    ignored by build_operator("esp") (up to 0.76 of a row on masked pairs); every entry point now refuses it."""
    import asap  # registers EspOperator in the method switch

    q, k, _ = _qkv(b=2, h=3, n=6, d=8)
    eye = torch.eye(6, dtype=F64).expand(2, 3, 6, 6)
    arbitrary = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(0)) > 0.4
    arbitrary[..., range(6), range(6)] = True
    entries = {
        "esp_attention": lambda **kw: esp_attention(q, k, eye, **kw),
        "EspOperator": lambda **kw: EspOperator()(q, k, eye, **kw),
        "build_operator": lambda **kw: asap.build_operator("esp", num_heads=3, head_dim=8)(q, k, eye, **kw),
    }
    padding = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    expected = esp_attention_reference(q, k, eye, attn_mask=key_padding_to_attn_mask(padding))
    for name, call in entries.items():
        with pytest.raises(ValueError, match="key-padding masks only"):
            call(attn_mask=arbitrary)
        with pytest.raises(ValueError, match="key-padding masks only"):
            call(attn_mask=torch.ones(6, 6, dtype=torch.bool).tril())
        # a key-padding mask, as a (b, 1, n, n) mask or as (b, n) token vectors, is honoured exactly
        for kwargs in ({"attn_mask": key_padding_to_attn_mask(padding)}, {"padding_mask": padding}):
            torch.testing.assert_close(call(**kwargs), expected, msg=f"{name} {sorted(kwargs)}")
    with pytest.raises(ValueError, match="either attn_mask or padding_mask"):
        esp_attention(q, k, eye, attn_mask=key_padding_to_attn_mask(padding), padding_mask=padding)


def test_multihead_attention_passes_esp_its_padding_as_token_vectors():
    from asap.attention.module import MultiheadAttention

    torch.manual_seed(0)
    mha = MultiheadAttention(8, num_heads=2, method="esp", tau_sort=0.1).double()
    assert mha.operator.takes_padding_mask
    x = torch.randn(2, 5, 8, dtype=F64)
    padding = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    out = mha(x, padding_mask=padding)
    short = mha(x[1:, :3])
    torch.testing.assert_close(out[1, :3], short[0])
