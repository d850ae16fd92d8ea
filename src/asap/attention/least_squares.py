"""Regularised normal equations, solved per head safely at any size, and the checks of a fit.

Every linear read-out of the project (the ASAP dual map's ridge fit,
:func:`asap.compile.fit.solve_ridge`, and the ReLU dual map's read-out,
:func:`asap.attention.relu_maps.fit_readout`) ends in the same problem, one per
head ``h``::

    A_h x_h = b_h,        A_h = Phi_h^T Phi_h + R_h   (L x L, symmetric positive semi-definite),
                          b_h = Phi_h^T t_h           (L,),

with a regulariser ``R_h`` (diagonal, >= 0) chosen by the caller. This module
solves it in fp64 and refuses a solution it cannot vouch for:

* **Cholesky first.** ``A = U^T U`` by :func:`torch.linalg.cholesky_ex` (no
  pivoting, so none of the row-swap code that makes batched LU,
  ``torch.linalg.solve``, fail on torch 2.13 CPU for L >= 164 with two threads:
  MKL "Parameter 6 was incorrect on entry to DLASWP", then an error or,
  inside a long process, silently wrong coefficients). A head is solved by the
  factor when the factorisation succeeded and the factor is not numerically
  singular: ``(min_i U_ii / max_i U_ii)^2 > L * eps_64`` (the square of the
  factor's diagonal spread is a lower bound on the condition number of ``A``).
* **Least norm otherwise.** A head that is not (numerically) positive definite
  (ridge 0 on collinear features, an all-zero feature) is solved by its
  eigendecomposition ``A = V diag(w) V^T`` as ``x = V diag(w^+) V^T b``, where
  ``w^+_i = 1 / w_i`` for ``w_i > L * eps_64 * max_j |w_j|`` and 0 otherwise: the
  minimum-norm least-squares solution (the pseudo-inverse's, without batched LU
  or SVD).
* **Every solve is checked.** The normwise relative residual per head::

      rho_h = ||A_h x_h - b_h|| / (||A_h||_F ||x_h|| + ||b_h||)        (0 when the denominator is 0)

  is the backward error of the solution: a backward-stable solve gives about
  ``L * eps_64`` (1e-13 at L = 400). A head with ``rho_h > max_residual``
  (default ``1e-6``) or a non-finite coefficient is refused with a
  :class:`ValueError` naming the head, so wrong coefficients cannot leave this
  module silently. Normal equations have ``b`` in the range of ``A`` (up to
  rounding), so the least-norm path passes the same check; an inconsistent
  system does not, which is what is wanted here.

:func:`check_training_r2` is the second guard, on the fit as a whole: the
training R2 of a regularised least-squares fit is >= 0 for a centred target
(zero coefficients are feasible and give R2 = 0, and the regularised solution
does at least as well on the penalised objective), so an R2 below -1 or not
finite is a broken fit, not a bad model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MAX_RESIDUAL = 1e-6
"""Default bound on the normwise relative residual of a solve; a stable solve gives ~ L * 2.2e-16."""

MIN_TRAINING_R2 = -1.0
"""A fit whose training R2 is below this (or not finite) is refused."""


def _factor_solve(factor: Tensor, rhs: Tensor) -> Tensor:
    """``x (h, L)`` from the Cholesky factors ``factor (h, L, L)`` (lower) of ``A`` and ``rhs (h, L)``."""
    return torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)


def least_norm_solve(system: Tensor, rhs: Tensor) -> Tensor:
    """Minimum-norm least-squares solution of symmetric PSD systems by eigendecomposition: ``(h, L)``.

    ``system (h, L, L)`` is symmetrised, ``A = V diag(w) V^T``; eigenvalues at
    or below ``L * eps_64 * max |w|`` are treated as zero (the pseudo-inverse's
    default cut-off), so ``x = V diag(w^+) V^T b``.
    """
    system = 0.5 * (system + system.transpose(-1, -2))
    w, vecs = torch.linalg.eigh(system)
    cut = system.shape[-1] * torch.finfo(system.dtype).eps * w.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(w > cut, 1 / torch.where(w > cut, w, torch.ones_like(w)), torch.zeros_like(w))
    proj = torch.einsum("hlk,hl->hk", vecs, rhs)  # V^T b
    return torch.einsum("hlk,hk->hl", vecs, inv * proj)


def relative_residual(system: Tensor, rhs: Tensor, coef: Tensor) -> Tensor:
    """``||A x - b|| / (||A||_F ||x|| + ||b||)`` per head: ``(h,)`` (0 where the denominator is 0)."""
    resid = torch.einsum("hlk,hk->hl", system, coef) - rhs
    denom = torch.linalg.matrix_norm(system) * torch.linalg.vector_norm(coef, dim=-1)
    denom = denom + torch.linalg.vector_norm(rhs, dim=-1)
    num = torch.linalg.vector_norm(resid, dim=-1)
    return torch.where(denom > 0, num / torch.where(denom > 0, denom, torch.ones_like(denom)), num)


def solve_normal_equations(
    system: Tensor, rhs: Tensor, *, what: str = "least-squares fit", max_residual: float = MAX_RESIDUAL
) -> Tensor:
    """Solve the regularised normal equations ``A_h x_h = b_h`` of every head in fp64: ``x (h, L)``.

    Args:
        system: ``A (h, L, L)``, symmetric positive semi-definite (``Phi^T Phi``
            plus the caller's regulariser), any float dtype (solved in fp64).
        rhs: ``b (h, L)`` (``Phi^T t``).
        what: what is being fitted, for the error messages (e.g. ``"layer 3 (blocks.3.attn)"``).
        max_residual: refuse a head whose normwise relative residual exceeds this.

    Cholesky per head where the system is numerically positive definite, the
    eigendecomposition least-norm solution elsewhere (module docstring).

    Raises:
        ValueError: the system is not finite, a coefficient is not finite, or a
            residual exceeds ``max_residual``; the message names ``what`` and the head.
    """
    if system.dim() != 3 or system.shape[-1] != system.shape[-2] or rhs.shape != system.shape[:-1]:
        raise ValueError(f"{what}: system must be (h, L, L) and rhs (h, L), got {tuple(system.shape)} and {tuple(rhs.shape)}")
    if not (max_residual > 0 and math.isfinite(max_residual)):
        raise ValueError(f"max_residual must be a finite number > 0, got {max_residual}")
    system, rhs = system.detach().to(torch.float64), rhs.detach().to(torch.float64)
    finite = torch.isfinite(system).flatten(1).all(-1) & torch.isfinite(rhs).all(-1)
    if not bool(finite.all()):
        head = int((~finite).nonzero()[0, 0])
        raise ValueError(f"{what}: the normal equations of head {head} are not finite (NaN or inf in the data)")
    num_features = system.shape[-1]
    factor, info = torch.linalg.cholesky_ex(system)
    diag = factor.diagonal(dim1=-2, dim2=-1)
    spread = (diag.amin(dim=-1) / diag.amax(dim=-1)) ** 2  # NaN (-> not ok) for an all-zero system
    ok = (info == 0) & (spread > num_features * torch.finfo(torch.float64).eps)
    coef = torch.zeros_like(rhs)
    if bool(ok.any()):
        coef[ok] = _factor_solve(factor[ok], rhs[ok])
    if bool((~ok).any()):
        coef[~ok] = least_norm_solve(system[~ok], rhs[~ok])
    if not bool(torch.isfinite(coef).all()):
        head = int((~torch.isfinite(coef)).any(-1).nonzero()[0, 0])
        raise ValueError(f"{what}: the solve gave non-finite coefficients for head {head}; refusing the fit")
    rho = relative_residual(system, rhs, coef)
    bad = ~(rho <= max_residual)
    if bool(bad.any()):
        head = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{what}: the least-squares solve of head {head} has relative residual {float(rho[head]):.3g} "
            f"(limit {max_residual:g}); the coefficients would be wrong, refusing the fit"
        )
    return coef


def residual_and_r2(
    gram: Tensor, cross: Tensor, target_sq: Tensor, target_sum: Tensor, count: Tensor, coef: Tensor
) -> tuple[Tensor, Tensor]:
    """Residual sum of squares and R2 per head from the normal equations, without revisiting the data.

    With ``G = Phi^T Phi (h, L, L)``, ``c = Phi^T t (h, L)``, ``t^T t``, ``sum t`` and
    the token count ``N`` (each ``(h,)``)::

        RSS = t^T t - 2 x^T c + x^T G x   (clamped at 0),     TSS = t^T t - (sum t)^2 / N,
        R2 = 1 - RSS / TSS

    (``TSS`` clamped at the smallest normal fp64, so a constant target gives R2 = 1
    when it is fitted exactly). Returns ``(rss (h,), r2 (h,))`` in fp64.
    """
    coef = coef.to(torch.float64)
    quad = torch.einsum("hl,hlk,hk->h", coef, gram, coef)
    rss = (target_sq - 2 * (coef * cross).sum(-1) + quad).clamp(min=0)
    tiny = torch.finfo(torch.float64).tiny
    tss = (target_sq - target_sum**2 / count.clamp(min=1)).clamp(min=tiny)
    return rss, 1 - rss / tss


def check_training_r2(r2: Tensor, *, what: str = "least-squares fit", minimum: float = MIN_TRAINING_R2) -> None:
    """Refuse a fit whose training R2 (per head, ``(h,)``) is below ``minimum`` or not finite.

    Raises:
        ValueError: naming ``what``, the first bad head and its R2.
    """
    bad = ~(r2 >= minimum)
    if bool(bad.any()):
        head = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{what}: head {head} has training R2 {float(r2[head]):.3g} (below {minimum:g} or not finite); "
            "the fit is broken, refusing it"
        )
