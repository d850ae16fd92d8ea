"""Normal equations, ridge solve and explained variance against plain least-squares oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asap.attention.dual_map import make_directions, slice_potentials
from asap.compile.fit import NormalEquations, explained_variance, solve_ridge
from tests.conftest import padding_mask, rand_qkv


def _features(b=3, h=2, n=9, d=5, L=6, lengths=(9, 5, 7), seed=0):
    torch.manual_seed(seed)
    q, k, _ = rand_qkv(b=b, h=h, n=n, d=d)
    mask = padding_mask(list(lengths), n)
    dirs = make_directions(num_heads=h, head_dim=d, num_slices=L, slice_type="random", seed=seed).double()
    phi = slice_potentials(q, k, dirs, scale=d**-0.5, attn_mask=mask)
    valid = mask.any(-1)  # (b, 1, n)
    return phi, valid


def _design(phi, target, valid):
    """Per head: the rows of the valid tokens, as numpy (X (N, L), y (N,))."""
    out = []
    for head in range(phi.shape[1]):
        keep = valid[:, 0].reshape(-1).numpy()
        x = phi[:, head].permute(0, 2, 1).reshape(-1, phi.shape[2]).numpy()[keep]
        y = target[:, head].reshape(-1).numpy()[keep]
        out.append((x, y))
    return out


def test_ridge_recovers_exactly_linear_coefficients():
    phi, valid = _features()
    coef_true = torch.randn(phi.shape[1], phi.shape[2], dtype=torch.float64)
    target = torch.einsum("bhln,hl->bhn", phi, coef_true)
    normal = NormalEquations.zeros(phi.shape[1], phi.shape[2])
    normal.add(phi, target, valid=valid)
    coef = solve_ridge(normal, ridge=0.0)
    torch.testing.assert_close(coef, coef_true, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(explained_variance(normal, coef), torch.ones(phi.shape[1], dtype=torch.float64))


def test_accumulating_batches_equals_one_big_batch():
    phi, valid = _features(b=4, lengths=(9, 4, 6, 8))
    target = torch.randn(phi.shape[0], phi.shape[1], phi.shape[3], dtype=torch.float64) * valid.double()
    whole = NormalEquations.zeros(phi.shape[1], phi.shape[2])
    whole.add(phi, target, valid=valid)
    parts = NormalEquations.zeros(phi.shape[1], phi.shape[2])
    for i in range(4):
        parts.add(phi[i : i + 1], target[i : i + 1], valid=valid[i : i + 1])
    for name in ("gram", "cross", "target_sq", "target_sum", "count"):
        torch.testing.assert_close(getattr(parts, name), getattr(whole, name), rtol=1e-12, atol=1e-12)
    merged = NormalEquations.zeros(phi.shape[1], phi.shape[2])
    first = NormalEquations.zeros(phi.shape[1], phi.shape[2])
    first.add(phi[:2], target[:2], valid=valid[:2])
    merged.add(phi[2:], target[2:], valid=valid[2:])
    torch.testing.assert_close(first.merged(merged).gram, whole.gram)
    assert whole.count.tolist() == [valid.sum().item()] * phi.shape[1]


@pytest.mark.parametrize("ridge", [0.0, 1e-3, 0.5])
def test_ridge_and_r2_match_numpy(ridge):
    phi, valid = _features(seed=3)
    target = torch.randn(phi.shape[0], phi.shape[1], phi.shape[3], dtype=torch.float64) * valid.double()
    normal = NormalEquations.zeros(phi.shape[1], phi.shape[2])
    normal.add(phi, target, valid=valid)
    coef = solve_ridge(normal, ridge=ridge)
    r2 = explained_variance(normal, coef)
    for head, (x, y) in enumerate(_design(phi, target, valid)):
        gram = x.T @ x
        lam = ridge * np.trace(gram) / gram.shape[0]
        expected = np.linalg.lstsq(gram + lam * np.eye(gram.shape[0]), x.T @ y, rcond=None)[0]
        np.testing.assert_allclose(coef[head].numpy(), expected, rtol=1e-6, atol=1e-9)
        resid = y - x @ expected
        np.testing.assert_allclose(r2[head].item(), 1 - (resid @ resid) / ((y - y.mean()) @ (y - y.mean())), rtol=1e-8)


def test_bad_inputs_are_refused():
    normal = NormalEquations.zeros(2, 3)
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        solve_ridge(normal, ridge=-1.0)
    with pytest.raises(ValueError, match="no valid calibration token"):
        solve_ridge(normal, ridge=1e-3)
    with pytest.raises(ValueError, match="features of shape"):
        normal.add(torch.zeros(1, 2, 4, 5), torch.zeros(1, 2, 5), valid=None)
