"""Fitting the ASAP dual map: normal equations, ridge least squares, KL refinement.

Per (layer, head) the map is linear in the L slice potentials (docs/method.md sec. 4.3, 4.4)::

    f_hat_i = sum_l alpha_l phi_l(i)          (centred over valid queries)

and is fitted to the teacher's closure target ``t_i = f_{K-2}(i)`` over every
valid query of every calibration sequence.

* :class:`NormalEquations` accumulates ``G = Phi^T Phi (h, L, L)``,
  ``c = Phi^T t (h, L)``, ``t^T t``, ``sum t`` and the count of valid tokens, in
  fp64, batch by batch: the activations themselves are never kept. Sums are
  exact to rounding, so accumulating over batches equals one big batch.
* :func:`solve_ridge` solves ``(G + lambda tr(G)/L I) alpha = c`` in fp64. The
  ridge is *relative to the Gram trace* so that one default (``1e-3``) means
  the same thing whatever the scale of the potentials (they grow with
  ``|q| |k|``) and whatever the number of calibration tokens. The solve is
  :func:`asap.attention.least_squares.solve_normal_equations` (Cholesky, a
  least-norm fallback, a residual check of every head), and a fit whose
  training R2 is absurd (< -1 or not finite) is refused.
* :func:`explained_variance` gives R^2 of a coefficient vector on any set of
  normal equations (e.g. held-out ones), without revisiting the data.
* :func:`refine_kl` is the optional second stage: it minimises the KL
  divergence between the teacher's attention rows and ASAP's, directly on
  the quantity that matters downstream (the least-squares fit weights every
  dual error equally, while the attention is insensitive to some of them).
* :func:`fit_semi_dual` is the label-free alternative (the objective-based fit
  of amortised OT, arXiv 2604.15114): it maximises the entropic semi-dual
  ``D(f) = <a, f> + <b, ccol(f)>`` of the predicted dual, averaged over the
  calibration sequences, with no Sinkhorn target at all. ``D`` is concave and
  its maximiser is the *converged* Sinkhorn dual, so this fit aims at the
  fully balanced plan rather than at the K-step teacher.

Features and targets are centred per sequence before they arrive here (the
1-D potentials and the closure target are both centred over valid queries),
so the model has no intercept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from asap.attention.least_squares import check_training_r2, residual_and_r2, solve_normal_equations
from asap.compile.plans import asap_log_attention, row_kl, scores_and_support, sinkhorn_log_attention
from asap.transport.ctransform import c_transform_cols
from asap.transport.masks import Support


@dataclass
class NormalEquations:
    """Sufficient statistics of a least-squares fit, one problem per head (fp64).

    ``gram (h, L, L)``, ``cross (h, L)``, ``target_sq (h,)`` = sum t^2,
    ``target_sum (h,)`` = sum t, ``count (h,)`` = number of valid tokens.
    """

    gram: Tensor
    cross: Tensor
    target_sq: Tensor
    target_sum: Tensor
    count: Tensor

    @classmethod
    def zeros(cls, num_heads: int, num_features: int) -> "NormalEquations":
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        h, f = num_heads, num_features
        return cls(z(h, f, f), z(h, f), z(h), z(h), z(h))

    @property
    def num_heads(self) -> int:
        return self.gram.shape[0]

    @property
    def num_features(self) -> int:
        return self.gram.shape[-1]

    def add(self, phi: Tensor, target: Tensor, *, valid: Tensor | None) -> None:
        """Accumulate one batch.

        Args:
            phi: features ``(b, h, L, n)``, zero at padding queries.
            target: ``(b, h, n)``, zero at padding queries.
            valid: ``(b, 1 or h, n)`` bool, True = valid query; ``None`` = all valid.
        """
        if phi.dim() != 4 or target.shape != (phi.shape[0], phi.shape[1], phi.shape[3]):
            raise ValueError(f"phi (b, h, L, n) and target (b, h, n) disagree: {tuple(phi.shape)} vs {tuple(target.shape)}")
        if phi.shape[1] != self.num_heads or phi.shape[2] != self.num_features:
            raise ValueError(
                f"features of shape {tuple(phi.shape)} for normal equations of {self.num_heads} heads "
                f"x {self.num_features} features"
            )
        phi, target = phi.detach().double().cpu(), target.detach().double().cpu()
        if valid is not None:
            w = valid.detach().cpu().to(torch.float64).expand_as(target)
            phi, target = phi * w.unsqueeze(2), target * w
            count = w.sum(dim=(0, 2))
        else:
            count = torch.full((self.num_heads,), float(target.shape[0] * target.shape[2]), dtype=torch.float64)
        self.gram += torch.einsum("bhln,bhkn->hlk", phi, phi)
        self.cross += torch.einsum("bhln,bhn->hl", phi, target)
        self.target_sq += (target * target).sum(dim=(0, 2))
        self.target_sum += target.sum(dim=(0, 2))
        self.count += count

    def merged(self, other: "NormalEquations") -> "NormalEquations":
        """The statistics of the union of both data sets."""
        return NormalEquations(
            self.gram + other.gram,
            self.cross + other.cross,
            self.target_sq + other.target_sq,
            self.target_sum + other.target_sum,
            self.count + other.count,
        )


def solve_ridge(normal: NormalEquations, *, ridge: float, what: str = "dual map") -> Tensor:
    """Ridge least squares per head: ``alpha (h, L)`` in fp64.

    Solves ``(G + lambda * tr(G) / L * I) alpha = c`` with ``lambda = ridge`` by
    :func:`~asap.attention.least_squares.solve_normal_equations` (Cholesky; the
    minimum-norm solution where the system is singular, e.g. ``ridge = 0`` on
    collinear features; the residual of every head checked). ``what`` names the
    fit in errors (e.g. the layer).

    Raises:
        ValueError: a negative ridge, a head without calibration tokens, a
            solve that fails its residual check, or a training R2 below -1 or
            not finite (a broken fit, refused rather than returned).
    """
    if not (ridge >= 0 and math.isfinite(ridge)):
        raise ValueError(f"ridge must be >= 0 and finite, got {ridge}")
    if bool((normal.count == 0).any()):
        raise ValueError("cannot fit the dual map: no valid calibration token for at least one head")
    gram, cross = normal.gram, normal.cross
    num_features = gram.shape[-1]
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)  # (h,)
    eye = torch.eye(num_features, dtype=gram.dtype)
    system = gram + (ridge * trace / num_features)[:, None, None] * eye
    coef = solve_normal_equations(system, cross, what=what)
    check_training_r2(explained_variance(normal, coef), what=what)
    return coef


def residual_sum_of_squares(normal: NormalEquations, coef: Tensor) -> Tensor:
    """``sum (t - Phi alpha)^2 = t^T t - 2 alpha^T c + alpha^T G alpha`` per head: ``(h,)``."""
    return _residual_and_r2(normal, coef)[0]


def explained_variance(normal: NormalEquations, coef: Tensor) -> Tensor:
    """R^2 per head, ``1 - RSS / TSS`` with ``TSS = sum (t - mean t)^2``: ``(h,)``.

    1 is a perfect fit, 0 is no better than predicting the mean; it can be
    negative on held-out data.
    """
    return _residual_and_r2(normal, coef)[1]


def _residual_and_r2(normal: NormalEquations, coef: Tensor) -> tuple[Tensor, Tensor]:
    return residual_and_r2(normal.gram, normal.cross, normal.target_sq, normal.target_sum, normal.count, coef)


# --------------------------------------------------------------------------- KL refinement


@dataclass
class KLProblem:
    """One chunk of reservoir data prepared for KL refinement (all fp32, or fp64 for fp64 inputs).

    ``scores (b, h, n, m)``, ``phi (b, h, L, n)``, the teacher's ``log_attn
    (b, h, n, m)`` and the :class:`Support` of the chunk's mask.
    """

    scores: Tensor
    phi: Tensor
    teacher_log_attn: Tensor
    supp: Support

    def f_hat(self, coef: Tensor) -> Tensor:
        """The linear map's predicted query dual ``(b, h, n)`` for coefficients ``coef (h, L)``."""
        return torch.einsum("bhln,hl->bhn", self.phi, coef.to(self.phi.dtype))

    def kl(self, coef: Tensor, *, eps: float) -> Tensor:
        """Mean row KL per head ``(h,)`` for coefficients ``coef (h, L)``."""
        return self.kl_of_dual(self.f_hat(coef), eps=eps)

    def kl_of_dual(self, f_hat: Tensor, *, eps: float) -> Tensor:
        """Mean row KL per head ``(h,)`` of ASAP from a predicted dual ``f_hat (b, h, n)`` to the teacher's rows."""
        log_attn = asap_log_attention(self.scores, f_hat, eps=eps, supp=self.supp)
        return row_kl(self.teacher_log_attn, log_attn, rows=self.supp.rows)

    def semi_dual(self, coef: Tensor, *, eps: float) -> Tensor:
        """Entropic semi-dual ``D(f) = <a, f> + <b, ccol(f)>`` per head ``(h,)``, averaged over the sequences.

        ``ccol(f)`` makes the column marginal exact, so the plan's mass is 1 and the ``-eps (mass - 1)``
        term of the full dual (:func:`asap.transport.dual_objective`) vanishes. Shifting ``f`` by a
        constant leaves ``D`` unchanged (``ccol`` shifts back), as it leaves the attention unchanged.
        """
        f = self.supp.zero_rows(self.f_hat(coef))
        g = c_transform_cols(self.scores, f, eps=eps, supp=self.supp)
        a = self.supp.zero_rows(self.supp.log_a.exp().expand_as(f))
        b = self.supp.zero_cols(self.supp.log_b.exp().expand_as(g))
        return ((f * a).sum(-1) + (g * b).sum(-1)).mean(0)


@torch.no_grad()
def kl_problems(
    chunks: list[tuple[Tensor, Tensor, Tensor | None]], features: Callable, *, scale: float, n_iters: int, eps: float
) -> list[KLProblem]:
    """Prepare reservoir chunks ``(q, k, mask)`` for :func:`refine_kl`: scores, features and teacher rows.

    ``features(q, k, mask) -> phi (b, h, F, n)`` is the dual map's feature function.
    """
    problems = []
    for q, k, mask in chunks:
        scores, supp = scores_and_support(q, k, scale=scale, attn_mask=mask)
        phi = features(q, k, mask)
        teacher = sinkhorn_log_attention(scores, supp, n_iters=n_iters, eps=eps)
        problems.append(KLProblem(scores, phi, teacher, supp))
    return problems


def mean_kl(problems: list[KLProblem], coef: Tensor, *, eps: float) -> Tensor:
    """Row KL per head ``(h,)`` averaged over chunks, weighted by their number of sequences."""
    total = sum(p.kl(coef, eps=eps) * p.scores.shape[0] for p in problems)
    return total / sum(p.scores.shape[0] for p in problems)


def refine_kl(
    coef: Tensor,
    train: list[KLProblem],
    held_out: list[KLProblem],
    *,
    eps: float,
    max_iter: int = 30,
) -> tuple[Tensor, dict[str, list[float]]]:
    """Refine ``coef (h, L)`` by L-BFGS on the mean row KL of the ``train`` chunks.

    The heads are independent problems; their losses are summed so one
    L-BFGS run optimises all of them. The refined coefficients are kept *per
    head* only where they lower the KL on the ``held_out`` chunks (or on
    ``train`` when there is no held-out chunk); elsewhere the ridge solution
    stays. Returns ``(coef, info)`` where ``info`` has the per-head KL of the
    ridge and refined solutions on the held-out chunks and which heads were kept.
    """
    if not train:
        raise ValueError("KL refinement needs at least one calibration chunk")
    check = held_out or train
    start = coef.detach().to(train[0].phi.dtype)
    param = start.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([param], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = mean_kl(train, param, eps=eps).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    refined = param.detach()
    with torch.no_grad():
        before = mean_kl(check, start, eps=eps)
        after = mean_kl(check, refined, eps=eps)
    improved = torch.isfinite(after) & (after < before)
    out = torch.where(improved.unsqueeze(-1), refined, start)
    info = {"kl_ridge": before.tolist(), "kl_refined": after.tolist(), "refined_kept": improved.tolist()}
    return out.to(coef.dtype), info


def mean_semi_dual(problems: list[KLProblem], coef: Tensor, *, eps: float) -> Tensor:
    """Semi-dual per head ``(h,)`` averaged over chunks, weighted by their number of sequences."""
    total = sum(p.semi_dual(coef, eps=eps) * p.scores.shape[0] for p in problems)
    return total / sum(p.scores.shape[0] for p in problems)


def fit_semi_dual(
    num_features: int, train: list[KLProblem], held_out: list[KLProblem], *, eps: float, max_iter: int = 30
) -> tuple[Tensor, dict[str, list[float]]]:
    """Label-free fit of the linear map: maximise the mean entropic semi-dual by L-BFGS, from ``coef = 0``.

    No teacher dual is used (``KLProblem.teacher_log_attn`` is read only to *report* the held-out row KL
    of the result beside the zero map's). Heads are independent; their objectives are summed so one
    L-BFGS run optimises all of them. Returns ``(coef (h, num_features), info)``, ``info`` holding the
    held-out semi-dual and row KL per head at the zero map and at the fit.
    """
    if not train:
        raise ValueError("the semi-dual fit needs at least one calibration chunk")
    check = held_out or train
    start = train[0].phi.new_zeros(train[0].phi.shape[1], num_features)
    param = start.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([param], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = -mean_semi_dual(train, param, eps=eps).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    coef = param.detach()
    if not bool(torch.isfinite(coef).all()):
        raise ValueError("the semi-dual fit diverged (non-finite coefficients); use refine='none' or 'kl'")
    with torch.no_grad():
        info = {
            "semi_dual_zero": mean_semi_dual(check, start, eps=eps).tolist(),
            "semi_dual_fit": mean_semi_dual(check, coef, eps=eps).tolist(),
            "kl_zero": mean_kl(check, start, eps=eps).tolist(),
            "kl_fit": mean_kl(check, coef, eps=eps).tolist(),
        }
    return coef, info
