"""Per-slice sorting, quantile couplings, plans and costs, against POT and dense computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asap.transport.sliced_plans import (
    dense_slice_plans,
    hard_sort,
    quantile_coupling,
    slice_costs,
    slice_plans_apply,
    soft_sort,
)

ot = pytest.importorskip("ot")

F64 = torch.float64


def _dense_coupling(coupling, n: int, m: int) -> torch.Tensor:
    lead = coupling.rows.shape[:-1]
    w = torch.zeros(*lead, n * m, dtype=F64)
    w = w.scatter_add(-1, coupling.rows * m + coupling.cols, coupling.mass)
    return w.view(*lead, n, m)


def _points(n: int, m: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=F64), torch.randn(m, d, generator=gen, dtype=F64)


@pytest.mark.parametrize("n, m", [(5, 5), (4, 7), (7, 3), (1, 4)])
def test_quantile_coupling_is_pots_1d_optimal_plan(n, m):
    coupling = quantile_coupling(n, m, dtype=F64)
    # Any increasing positions: the 1-D optimal plan between them is the quantile coupling.
    expected = ot.emd_1d(np.arange(n) / n, np.arange(m) / m + 0.01, metric="sqeuclidean")
    np.testing.assert_allclose(_dense_coupling(coupling, n, m).numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(coupling.rank_mass.numpy(), np.full(n, 1 / n))


def test_quantile_coupling_with_padding_uses_valid_counts_only():
    n, m = 6, 5
    valid_q = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    valid_k = torch.tensor([[1, 0, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    coupling = quantile_coupling(n, m, valid_q=valid_q, valid_k=valid_k, dtype=F64)
    dense = _dense_coupling(coupling, n, m)
    for row, (nv, mv) in enumerate([(4, 3), (6, 5)]):
        expected = np.zeros((n, m))
        expected[:nv, :mv] = ot.emd_1d(np.arange(nv) / nv, np.arange(mv) / mv + 0.01)
        np.testing.assert_allclose(dense[row].numpy(), expected, atol=1e-12)
        np.testing.assert_allclose(coupling.rank_mass[row, :nv].numpy(), np.full(nv, 1 / nv))
        assert (coupling.rank_mass[row, nv:] == 0).all()
    assert (dense[2] == 0).all() and (coupling.rank_mass[2] == 0).all()  # all padding: no mass, no NaN


@pytest.mark.parametrize("n, m", [(6, 6), (5, 8)])
def test_hard_slice_plans_and_costs_match_pot(n, m):
    d, num_slices = 3, 4
    q, k = _points(n, m, d)
    theta = torch.randn(num_slices, d, dtype=F64, generator=torch.Generator().manual_seed(1))
    theta = theta / theta.norm(dim=-1, keepdim=True)
    perm_q, perm_k = hard_sort((q @ theta.T).T), hard_sort((k @ theta.T).T)
    coupling = quantile_coupling(n, m, dtype=F64)
    plans = dense_slice_plans(perm_q, perm_k, coupling)  # (L, n, m)
    _, _, log = ot.expected_sliced_plan(q.numpy(), k.numpy(), projections=theta.T.numpy(), log=True)
    for slice_index, sparse in enumerate(log["G"]):
        expected = np.zeros((n, m))
        np.add.at(expected, (sparse.rows, sparse.cols), sparse.data)
        np.testing.assert_allclose(plans[slice_index].numpy(), expected, atol=1e-12)
    for metric in ("sqeuclidean", "euclidean"):
        full = torch.from_numpy(ot.dist(q.numpy(), k.numpy(), metric=metric))
        expected_costs = (plans * full).sum(dim=(-1, -2))
        torch.testing.assert_close(slice_costs(perm_q, perm_k, coupling, q, k, cost=metric), expected_costs)
    torch.testing.assert_close(
        slice_costs(perm_q, perm_k, coupling, q, k, cost="dot"), (plans * -(q @ k.T)).sum(dim=(-1, -2))
    )


@pytest.mark.parametrize("cost", ["dot", "sqeuclidean", "euclidean"])
def test_soft_slice_costs_equal_dense_plan_costs(cost):
    n, m, d = 5, 7, 3
    q, k = _points(n, m, d, seed=2)
    valid_k = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    perm_q = soft_sort(q.T, tau_sort=0.3)
    perm_k = soft_sort(k.T, tau_sort=0.3, valid=valid_k)
    coupling = quantile_coupling(n, m, valid_k=valid_k, dtype=F64)
    plans = dense_slice_plans(perm_q, perm_k, coupling)
    full = {"dot": -(q @ k.T), "sqeuclidean": torch.cdist(q, k) ** 2, "euclidean": torch.cdist(q, k)}[cost]
    torch.testing.assert_close(slice_costs(perm_q, perm_k, coupling, q, k, cost=cost), (plans * full).sum(dim=(-1, -2)))
    assert (plans[..., ~valid_k] == 0).all()


@pytest.mark.parametrize("soft", [True, False])
def test_slice_plans_apply_equals_dense_plans(soft):
    n, m, d = 6, 5, 4
    q, k = _points(n, m, d, seed=3)
    v = torch.randn(m, 2, dtype=F64)
    valid_q = torch.tensor([1, 1, 0, 1, 1, 0], dtype=torch.bool)
    valid_k = torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool)
    def sort(x, valid):
        return soft_sort(x, tau_sort=0.2, valid=valid) if soft else hard_sort(x, valid=valid)

    perm_q, perm_k = sort(q.T, valid_q), sort(k.T, valid_k)
    coupling = quantile_coupling(n, m, valid_q=valid_q, valid_k=valid_k, dtype=F64)
    plans = dense_slice_plans(perm_q, perm_k, coupling)
    plan_v, row_mass = slice_plans_apply(perm_q, perm_k, coupling, v)
    torch.testing.assert_close(plan_v, plans @ v)
    torch.testing.assert_close(row_mass, plans.sum(dim=-1))
    assert (plans[:, ~valid_q] == 0).all() and (plans[..., ~valid_k] == 0).all()
    if not soft:  # exact sort: uniform marginals over valid tokens
        torch.testing.assert_close(plans.sum(dim=-1)[:, valid_q], torch.full((d, 4), 1 / 4, dtype=F64))
        torch.testing.assert_close(plans.sum(dim=-2)[:, valid_k], torch.full((d, 4), 1 / 4, dtype=F64))


def test_soft_sort_converges_to_hard_sort_monotonically():
    n, m, d = 8, 8, 3
    q, k = _points(n, m, d, seed=4)
    coupling = quantile_coupling(n, m, dtype=F64)
    hard = dense_slice_plans(hard_sort(q.T), hard_sort(k.T), coupling)
    errors = []
    for tau_sort in (1.0, 1e-1, 1e-2, 1e-3, 1e-4):
        soft = dense_slice_plans(soft_sort(q.T, tau_sort=tau_sort), soft_sort(k.T, tau_sort=tau_sort), coupling)
        errors.append((soft - hard).abs().max().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6


@pytest.mark.parametrize("distance", ["abs", "squared"])
def test_soft_sort_is_row_stochastic_and_sorts(distance):
    x = torch.tensor([[0.3, -1.0, 2.0, 0.0, 5.0]], dtype=F64)
    valid = torch.tensor([True, True, False, True, True])
    perm = soft_sort(x, tau_sort=1e-4, valid=valid, distance=distance)
    torch.testing.assert_close(perm.soft.sum(dim=-1), torch.ones(1, 5, dtype=F64))
    assert (perm.soft[..., ~valid] == 0).all()
    sorted_values = (perm.soft @ x.T.unsqueeze(0)).squeeze(-1)[0, :4]  # valid ranks
    torch.testing.assert_close(sorted_values, torch.tensor([-1.0, 0.0, 0.3, 5.0], dtype=F64), atol=1e-6, rtol=0)
    assert perm.order[0, -1] == 2  # padding sorted last


def test_soft_sort_all_padding_gives_zeros_and_finite_gradients():
    x = torch.randn(2, 4, dtype=F64, requires_grad=True)
    valid = torch.zeros(4, dtype=torch.bool)
    perm = soft_sort(x, tau_sort=1e-3, valid=valid)
    assert (perm.soft == 0).all()
    perm.soft.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_soft_sort_rejects_bad_options():
    x = torch.randn(1, 3)
    with pytest.raises(ValueError, match="tau_sort"):
        soft_sort(x, tau_sort=0.0)
    with pytest.raises(ValueError, match="distance"):
        soft_sort(x, tau_sort=0.1, distance="cubic")
    with pytest.raises(ValueError, match="cost"):
        perm = hard_sort(x)
        slice_costs(perm, perm, quantile_coupling(3, 3), torch.randn(3, 2), torch.randn(3, 2), cost="cosine")
