"""Exact 1-D Kantorovich potentials: feasibility, tightness, and POT's optimal cost."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asap.transport import kantorovich_potentials_1d, project, transport_cost_1d


def _lp_plan(a: np.ndarray, b: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """An optimal plan: POT's network simplex, or SciPy's HiGHS LP where POT wrongly reports infeasibility.

    POT 0.9 answers "Problem infeasible" with an all-zero plan for some uniform 2 x 2 problems
    (for example hypothesis' n = m = 2, seed 23157); the LP below is the same problem.
    """
    plan, log = ot.emd(a, b, cost, log=True)
    if log["result_code"] == 1:
        return plan
    from scipy.optimize import linprog

    n, m = cost.shape
    rows = np.kron(np.eye(n), np.ones((1, m)))
    cols = np.kron(np.ones((1, n)), np.eye(m))
    res = linprog(cost.ravel(), A_eq=np.vstack([rows, cols]), b_eq=np.concatenate([a, b]), bounds=(0, None), method="highs")
    assert res.status == 0, res.message
    return res.x.reshape(n, m)


def _check_against_lp(x: np.ndarray, y: np.ndarray, f: np.ndarray, g: np.ndarray):
    n, m = len(x), len(y)
    cost = -np.outer(x, y)
    slack = cost - (f[:, None] + g[None, :])
    assert slack.min() > -1e-12, "potentials must be feasible: f_i + g_j <= c_ij"
    a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    # With one point on either side the only coupling is the product (POT's simplex rejects 1 x 1).
    plan = np.outer(a, b) if min(n, m) == 1 else _lp_plan(a, b, cost)
    # Complementary slackness: tight wherever the optimal plan puts mass.
    assert np.abs(slack[plan > 1e-12]).max() < 1e-12
    np.testing.assert_allclose(f.mean() + g.mean(), (plan * cost).sum(), atol=1e-12)


@pytest.mark.parametrize("n,m", [(9, 9), (5, 8), (8, 3), (1, 4), (6, 1)])
def test_potentials_are_optimal_duals(n, m):
    x = torch.randn(4, n, dtype=torch.float64)
    y = torch.randn(4, m, dtype=torch.float64)
    f, g = kantorovich_potentials_1d(x, y)
    for slice_ in range(4):
        _check_against_lp(x[slice_].numpy(), y[slice_].numpy(), f[slice_].numpy(), g[slice_].numpy())


def test_equal_size_recursion_of_method_md():
    """f_(r+1) = f_(r) - y_(r) (x_(r+1) - x_(r)) and g_(r) = -x_(r) y_(r) - f_(r) in sorted order."""
    x = torch.randn(1, 6, dtype=torch.float64)
    y = torch.randn(1, 6, dtype=torch.float64)
    f, g = kantorovich_potentials_1d(x, y)
    xs, xi = x[0].sort()
    ys, yi = y[0].sort()
    f_sorted = torch.zeros(6, dtype=torch.float64)
    for r in range(5):
        f_sorted[r + 1] = f_sorted[r] - ys[r] * (xs[r + 1] - xs[r])
    shift = f_sorted.mean()
    torch.testing.assert_close(f[0, xi], f_sorted - shift)
    torch.testing.assert_close(g[0, yi], -xs * ys - f_sorted + shift)


def test_one_d_cost_matches_pot_wasserstein():
    """-xy differs from (x-y)^2/2 by terms in x alone and y alone: same plan, cost shifted."""
    x = torch.randn(3, 10, dtype=torch.float64)
    y = torch.randn(3, 10, dtype=torch.float64)
    f, g = kantorovich_potentials_1d(x, y)
    w2 = ot.wasserstein_1d(x.T.numpy(), y.T.numpy(), p=2)  # per slice
    expected = 0.5 * w2 - 0.5 * (x**2).mean(-1).numpy() - 0.5 * (y**2).mean(-1).numpy()
    np.testing.assert_allclose(transport_cost_1d(f, g).numpy(), expected, atol=1e-12)


def test_padding_equals_unpadded_and_pads_are_zero():
    x = torch.randn(2, 3, 7, dtype=torch.float64)  # (b, L, n)
    y = torch.randn(2, 3, 7, dtype=torch.float64)
    x_valid = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1] * 7], dtype=torch.bool)
    y_valid = torch.tensor([[1, 0, 1, 1, 0, 1, 1], [1] * 7], dtype=torch.bool)
    f, g = kantorovich_potentials_1d(x, y, x_valid=x_valid, y_valid=y_valid)
    f0, g0 = kantorovich_potentials_1d(x[0][:, x_valid[0]], y[0][:, y_valid[0]])
    torch.testing.assert_close(f[0][:, x_valid[0]], f0)
    torch.testing.assert_close(g[0][:, y_valid[0]], g0)
    assert (f[0][:, ~x_valid[0]] == 0).all() and (g[0][:, ~y_valid[0]] == 0).all()
    cost = transport_cost_1d(f, g, x_valid=x_valid, y_valid=y_valid)
    torch.testing.assert_close(cost[0], transport_cost_1d(f0, g0))


def test_no_quadratic_tensor_and_gradients_are_finite():
    x = torch.randn(2, 4, 50, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, 50, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, 30:] = False
    f, g = kantorovich_potentials_1d(x, y, x_valid=valid, y_valid=valid)
    (f.square().sum() + g.square().sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


def test_project_shapes_and_scale():
    q = torch.randn(2, 3, 5, 4)
    k = torch.randn(2, 3, 6, 4)
    dirs = torch.nn.functional.normalize(torch.randn(3, 7, 4), dim=-1)
    x, y = project(q, k, dirs, scale=0.5)
    assert x.shape == (2, 3, 7, 5) and y.shape == (2, 3, 7, 6)
    torch.testing.assert_close(x[1, 2, 3], 0.5 * q[1, 2] @ dirs[2, 3])


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    m=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_property_feasible_and_tight(n, m, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, generator=gen, dtype=torch.float64)
    y = torch.randn(1, m, generator=gen, dtype=torch.float64)
    f, g = kantorovich_potentials_1d(x, y)
    _check_against_lp(x[0].numpy(), y[0].numpy(), f[0].numpy(), g[0].numpy())


def test_fast_equal_size_path_equals_general_path():
    """Unpadded n = m takes a rank-to-rank fast path; all-True masks force the general one."""
    from asap.transport import query_potentials_1d

    x = torch.randn(2, 3, 5, 11, dtype=torch.float64)
    y = torch.randn(2, 3, 5, 11, dtype=torch.float64)
    valid = torch.ones(2, 3, 11, dtype=torch.bool)
    f_fast, g_fast = kantorovich_potentials_1d(x, y)
    f_gen, g_gen = kantorovich_potentials_1d(x, y, x_valid=valid, y_valid=valid)
    torch.testing.assert_close(f_fast, f_gen, rtol=0, atol=1e-13)
    torch.testing.assert_close(g_fast, g_gen, rtol=0, atol=1e-13)
    torch.testing.assert_close(query_potentials_1d(x, y), f_gen, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_sort_fast_path_matches_torch_sort(dtype):
    from asap.transport.sliced import argsort_last, sort_last

    x = torch.randn(3, 2, 5, 37, dtype=dtype, requires_grad=True)
    values, perm = sort_last(x)
    expected_values, expected_perm = torch.sort(x, dim=-1)
    assert perm.dtype == torch.int64
    torch.testing.assert_close(values, expected_values, rtol=0, atol=0)
    assert torch.equal(perm, expected_perm)  # continuous data: no ties
    # Gradients flow through the gathered values exactly as through torch.sort's.
    weights = torch.randn_like(values)
    (grad,) = torch.autograd.grad((values * weights).sum(), x)
    (expected_grad,) = torch.autograd.grad((expected_values * weights).sum(), x)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
    # Non-contiguous input, infinities (the padding key) and an inference tensor.
    with torch.inference_mode():
        y = torch.randn(4, 9, 6, dtype=dtype).transpose(-1, -2)
        y[..., 0] = float("inf")
        assert torch.equal(torch.gather(y, -1, argsort_last(y)), torch.sort(y, dim=-1).values)


@pytest.mark.parametrize("n", [1, 17, 256, 600])
def test_packed_argsort_is_a_sorting_permutation(n):
    """The fp32 packed-key argsort (index in the low fp64 mantissa bits): ties, +-0, +-inf and NaN included."""
    from asap.transport.sliced import PACKED_ARGSORT_MIN_N, _packed_argsort_f32, argsort_last

    gen = torch.Generator().manual_seed(n)
    x = torch.randn(3, 5, n, generator=gen)
    x[0, 0, : n // 2] = 0.25  # ties
    x[0, 1, ::3] = float("inf")  # the dual map's padding sentinel
    x[0, 2, ::4] = -0.0
    x[0, 2, 1::4] = 0.0
    x[0, 3, ::5] = -float("inf")
    x[1] = torch.tensor(3.0e38) * torch.sign(x[1])  # near the fp32 range
    perm = torch.from_numpy(_packed_argsort_f32(x.numpy()))
    assert perm.dtype == torch.int64
    assert torch.equal(perm.sort(dim=-1).values, torch.arange(n).expand_as(perm))  # a permutation of each row
    assert torch.equal(torch.gather(x, -1, perm), torch.sort(x, dim=-1).values)
    x[2, 0, 0] = float("nan")  # garbage in: still a permutation, NaN last
    perm = torch.from_numpy(_packed_argsort_f32(x.numpy()))
    assert torch.equal(perm.sort(dim=-1).values, torch.arange(n).expand_as(perm))
    assert int(perm[2, 0, -1]) == 0
    if n >= PACKED_ARGSORT_MIN_N:  # argsort_last takes this path for such rows
        y = torch.randn(4, n, generator=gen)
        assert torch.equal(torch.gather(y, -1, argsort_last(y)), torch.sort(y, dim=-1).values)
