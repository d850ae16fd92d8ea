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


def _semi_dual_problem(*, lengths=None, n=9, seed=0):
    """One KLProblem whose only feature is the converged Sinkhorn query dual f* (centred), and f* itself."""
    from asap.compile.fit import KLProblem
    from asap.compile.plans import scores_and_support, sinkhorn_log_attention
    from asap.transport.sinkhorn import sinkhorn

    torch.manual_seed(seed)
    q, k, _ = rand_qkv(b=3, h=2, n=n, d=4, scale=1.5)
    mask = None if lengths is None else padding_mask(lengths, n)
    scores, supp = scores_and_support(q, k, scale=1.0, attn_mask=mask)
    f_star = sinkhorn(scores, n_iters=301, eps=1.0, supp=supp).target  # f_{K-2} of a converged run: f*
    teacher = sinkhorn_log_attention(scores, supp, n_iters=301, eps=1.0)
    return KLProblem(scores, f_star.unsqueeze(2), teacher, supp), f_star


@pytest.mark.parametrize("lengths", [None, [9, 6, 4]])
def test_semi_dual_fit_recovers_the_converged_dual_without_labels(lengths):
    """With f* itself as the feature, the label-free fit must find coefficient 1: the semi-dual's maximiser."""
    from asap.compile.fit import fit_semi_dual, mean_semi_dual

    problem, _ = _semi_dual_problem(lengths=lengths)
    held, _ = _semi_dual_problem(lengths=lengths, seed=1)
    coef, info = fit_semi_dual(1, [problem], [held], eps=1.0, max_iter=50)
    torch.testing.assert_close(coef, torch.ones_like(coef), atol=2e-3, rtol=0)  # L-BFGS tolerance
    assert all(fit > zero for fit, zero in zip(info["semi_dual_fit"], info["semi_dual_zero"]))
    assert all(kl < 1e-4 < zero for kl, zero in zip(info["kl_fit"], info["kl_zero"]))  # the converged teacher's rows, reached without its duals
    # the objective is concave with its maximum at f*: moving the coefficient either way lowers it
    best = mean_semi_dual([problem], coef, eps=1.0)
    for delta in (-0.2, 0.2):
        assert (mean_semi_dual([problem], coef + delta, eps=1.0) < best).all()


def test_semi_dual_ignores_a_constant_shift_of_the_dual():
    problem, f_star = _semi_dual_problem(lengths=[9, 6, 4])
    ones = problem.supp.zero_rows(torch.ones_like(f_star)).unsqueeze(2)
    shifted = type(problem)(problem.scores, torch.cat([problem.phi, ones], dim=2), problem.teacher_log_attn,
                            problem.supp)  # fmt: skip
    coef = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(shifted.semi_dual(coef, eps=1.0), shifted.semi_dual(coef + torch.tensor([0.0, 3.0]), eps=1.0))


def test_semi_dual_fit_is_refused_with_nonlinear_maps():
    from asap.compile.swap import CompileOptions

    CompileOptions(refine="dual")
    with pytest.raises(ValueError, match="linear map only"):
        CompileOptions(refine="dual", map_kind="mlp")
    with pytest.raises(ValueError, match="linear map only"):
        CompileOptions(refine="dual", target_tv=0.05)
