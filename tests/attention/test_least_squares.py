"""The one solver of regularised normal equations (issue 12 item 15): fp64 NumPy references at any size.

torch 2.13's batched fp64 ``torch.linalg.solve`` fails on CPU with two threads
for 164 or more features (MKL DLASWP), raising or returning wrong numbers; the
helper must give the reference answer there, solve singular systems by least
norm, and refuse rather than return a solve whose residual is absurd.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asap.attention import least_squares
from asap.attention.least_squares import (
    check_training_r2,
    relative_residual,
    residual_and_r2,
    solve_normal_equations,
)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _normal_equations(h: int, n: int, num_features: int, *, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    phi = torch.randn(h, n, num_features, dtype=torch.float64, generator=gen)
    t = phi @ torch.randn(h, num_features, 1, dtype=torch.float64, generator=gen) / num_features**0.5
    t = t.squeeze(-1) + 0.1 * torch.randn(h, n, dtype=torch.float64, generator=gen)
    return phi, t, phi.transpose(1, 2) @ phi, (phi.transpose(1, 2) @ t.unsqueeze(-1)).squeeze(-1)


def test_400_features_on_two_threads_match_numpy(two_threads):
    phi, t, gram, cross = _normal_equations(3, 1200, 400)
    system = gram + 1e-3 * torch.eye(400, dtype=torch.float64)
    coef = solve_normal_equations(system, cross)
    for head in range(3):
        expected = np.linalg.solve(system[head].numpy(), cross[head].numpy())
        np.testing.assert_allclose(coef[head].numpy(), expected, rtol=1e-9, atol=1e-12)
    assert float(relative_residual(system, cross, coef).max()) < 1e-12


def test_solve_ridge_at_400_features_on_two_threads_matches_numpy(two_threads):
    from asap.compile.fit import NormalEquations, explained_variance, solve_ridge

    phi, t, gram, cross = _normal_equations(2, 1000, 400, seed=1)
    normal = NormalEquations.zeros(2, 400)
    normal.add(phi.transpose(1, 2).unsqueeze(0), t.unsqueeze(0), valid=None)
    coef = solve_ridge(normal, ridge=1e-3)
    for head in range(2):
        x, y = phi[head].numpy(), t[head].numpy()
        g = x.T @ x
        expected = np.linalg.solve(g + 1e-3 * np.trace(g) / 400 * np.eye(400), x.T @ y)
        np.testing.assert_allclose(coef[head].numpy(), expected, rtol=1e-8, atol=1e-12)
        resid = y - x @ expected
        r2 = 1 - resid @ resid / ((y - y.mean()) @ (y - y.mean()))
        np.testing.assert_allclose(explained_variance(normal, coef)[head].item(), r2, rtol=1e-9)


def test_singular_system_gives_the_least_norm_solution():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(2, 50, 4, dtype=torch.float64, generator=gen)
    # duplicated column, a column that is a sum of two others, and an all-zero column: rank 4 of 7
    phi = torch.cat([base, base[..., :1], base[..., 1:2] + base[..., 2:3], torch.zeros(2, 50, 1, dtype=torch.float64)], -1)
    t = torch.randn(2, 50, dtype=torch.float64, generator=gen)
    gram = phi.transpose(1, 2) @ phi
    cross = (phi.transpose(1, 2) @ t.unsqueeze(-1)).squeeze(-1)
    coef = solve_normal_equations(gram, cross)
    for head in range(2):
        expected = np.linalg.lstsq(phi[head].numpy(), t[head].numpy(), rcond=None)[0]  # minimum norm
        np.testing.assert_allclose(coef[head].numpy(), expected, rtol=1e-7, atol=1e-10)
    # an all-zero system (features that never moved) gives zero coefficients, not an error
    zero = solve_normal_equations(torch.zeros(1, 3, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64))
    assert torch.equal(zero, torch.zeros(1, 3, dtype=torch.float64))


def test_garbage_from_the_factor_solve_is_refused(monkeypatch):
    _, _, gram, cross = _normal_equations(2, 200, 20)
    system = gram + torch.eye(20, dtype=torch.float64)
    monkeypatch.setattr(least_squares, "_factor_solve", lambda factor, rhs: torch.full_like(rhs, 1e100))
    with pytest.raises(ValueError, match=r"layer 3 \(blocks.3\).*head 0 has relative residual"):
        solve_normal_equations(system, cross, what="layer 3 (blocks.3)")
    monkeypatch.setattr(least_squares, "_factor_solve", lambda factor, rhs: torch.full_like(rhs, float("nan")))
    with pytest.raises(ValueError, match="non-finite coefficients for head 0"):
        solve_normal_equations(system, cross)


def test_non_finite_or_misshapen_systems_are_refused():
    system, rhs = torch.eye(3).expand(2, 3, 3).clone().double(), torch.ones(2, 3, dtype=torch.float64)
    system[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="head 1 are not finite"):
        solve_normal_equations(system, rhs)
    with pytest.raises(ValueError, match=r"system must be \(h, L, L\)"):
        solve_normal_equations(torch.eye(3), rhs)
    with pytest.raises(ValueError, match="max_residual"):
        solve_normal_equations(torch.eye(3).expand(2, 3, 3), rhs, max_residual=float("inf"))


def test_absurd_training_r2_is_refused_with_the_head():
    check_training_r2(torch.tensor([0.9, 0.0, -0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"layer 1: head 1 has training R2 -3"):
        check_training_r2(torch.tensor([0.9, -3.0]), what="layer 1")
    with pytest.raises(ValueError, match="head 0 has training R2 nan"):
        check_training_r2(torch.tensor([float("nan")]))


def test_solve_ridge_refuses_a_fit_with_absurd_r2_naming_it(monkeypatch):
    """Even if a solver returned finite garbage that passed its own check, the fit's R2 guard refuses it."""
    import asap.compile.fit as fit

    phi, t, _, _ = _normal_equations(2, 100, 5, seed=3)
    normal = fit.NormalEquations.zeros(2, 5)
    normal.add(phi.transpose(1, 2).unsqueeze(0), t.unsqueeze(0), valid=None)
    monkeypatch.setattr(fit, "solve_normal_equations", lambda system, rhs, what: torch.full_like(rhs, 1e6))
    with pytest.raises(ValueError, match=r"layer 0 \(blocks.0.attn\): head 0 has training R2"):
        fit.solve_ridge(normal, ridge=1e-3, what="layer 0 (blocks.0.attn)")


def test_residual_and_r2_match_the_data():
    phi, t, gram, cross = _normal_equations(2, 80, 6, seed=4)
    coef = torch.randn(2, 6, dtype=torch.float64)
    rss, r2 = residual_and_r2(gram, cross, (t * t).sum(-1), t.sum(-1), torch.full((2,), 80.0, dtype=torch.float64), coef)
    resid = t - torch.einsum("hnl,hl->hn", phi, coef)
    torch.testing.assert_close(rss, (resid * resid).sum(-1))
    centred = t - t.mean(-1, keepdim=True)
    torch.testing.assert_close(r2, 1 - (resid * resid).sum(-1) / (centred * centred).sum(-1))
