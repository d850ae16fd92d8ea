"""Learned slice directions: the linear dual map's directions fitted by gradient on the row KL (issue 11).

The linear map's features are the exact 1-D Kantorovich potentials of ``q`` and ``k`` projected on ``L``
directions per head (docs/method.md sec. 4.3). Drawn at random, the directions give a random basis of
potentials; here the directions ``D (h, L, d)`` and the coefficients ``alpha (h, L + E)`` are fitted
jointly, by Adam, on the mean row KL between the teacher's attention and ASAP's on the calibration
reservoir::

    min_{D, alpha}  mean_rows KL(A_teacher || A_asap(f_hat)),   f_hat = sum_c alpha_c phi_c(q, k; D / |D|)

The potentials are differentiable in the directions almost everywhere: the sort order of the projections
is locally constant and the sorted values move with the projection. The fit starts from the ridge solution
on the random directions; it is evaluated on the held-out reservoir every few steps, the best state is kept,
and per head the learned directions replace the random ones only where they lower the held-out KL. The
extra features (``qk_mean``, ``q_norm``) do not depend on the directions and are computed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from asap.attention.dual_map import slice_potentials
from asap.compile.fit import KLProblem, kl_problems
from asap.compile.plans import closure_target

#: Held-out evaluations of a direction fit: one every this many Adam steps (and after the last).
EVAL_EVERY = 10


@dataclass
class DirectionProblem:
    """One reservoir chunk prepared for the direction fit: the :class:`~asap.compile.fit.KLProblem` of the
    random directions (scores, support, the teacher's rows) plus what new directions need.

    ``q, k (b, h, n|m, d)`` and ``mask`` recompute the potentials; ``extra (b, h, E, n)`` holds the
    direction-free features (or None); ``target (b, h, n)`` is the teacher's closure target (for R2).
    """

    base: KLProblem
    q: Tensor
    k: Tensor
    mask: Tensor | None
    extra: Tensor | None
    target: Tensor

    def features(self, directions: Tensor, *, scale: float) -> Tensor:
        """The design matrix ``(b, h, L + E, n)`` for unit ``directions (h, L, d)``: potentials, then extras."""
        phi = slice_potentials(self.q, self.k, directions, scale=scale, attn_mask=self.mask)
        return phi if self.extra is None else torch.cat([phi, self.extra.to(phi.dtype)], dim=2)

    def f_hat(self, directions: Tensor, coef: Tensor, *, scale: float) -> Tensor:
        x = self.features(directions, scale=scale)
        return torch.einsum("bhln,hl->bhn", x, coef.to(x.dtype))

    def kl(self, directions: Tensor, coef: Tensor, *, scale: float, eps: float) -> Tensor:
        """Mean row KL per head ``(h,)``."""
        return self.base.kl_of_dual(self.f_hat(directions, coef, scale=scale), eps=eps)


@torch.no_grad()
def direction_problems(
    chunks: Sequence[tuple[Tensor, Tensor, Tensor | None]], features, *, num_slices: int, scale: float, n_iters: int,
    eps: float,
) -> list[DirectionProblem]:  # fmt: skip
    """Prepare reservoir chunks ``(q, k, mask)``; ``features(q, k, mask)`` is the dual map's (its columns past
    ``num_slices`` are the direction-free extras)."""
    problems = []
    for (q, k, mask), base in zip(chunks, kl_problems(chunks, features, scale=scale, n_iters=n_iters, eps=eps)):
        extra = base.phi[:, :, num_slices:] if base.phi.shape[2] > num_slices else None
        target = closure_target(base.scores, base.supp, n_iters=n_iters, eps=eps)
        problems.append(DirectionProblem(base, q, k, mask, extra, target))
    return problems


def _unit(raw: Tensor) -> Tensor:
    return raw / raw.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_direction_kl(problems: Sequence[DirectionProblem], directions: Tensor, coef: Tensor, *, scale: float,
                      eps: float) -> Tensor:  # fmt: skip
    """Row KL per head ``(h,)`` averaged over chunks, weighted by their number of sequences."""
    total = sum(p.kl(directions, coef, scale=scale, eps=eps) * p.q.shape[0] for p in problems)
    return total / sum(p.q.shape[0] for p in problems)


@torch.no_grad()
def reservoir_r2(problems: Sequence[DirectionProblem], directions: Tensor, coef: Tensor, *, scale: float) -> list[float]:
    """Explained variance per head of the closure target by ``f_hat``, over the valid queries of ``problems``."""
    residual = total = 0.0
    for p in problems:
        f_hat = p.f_hat(directions, coef, scale=scale).double()
        target = p.target.double()
        rows = p.base.supp.rows
        valid = torch.ones_like(target, dtype=torch.bool) if rows is None else rows.expand_as(target)
        weight = valid.double()
        count = weight.sum(-1, keepdim=True).clamp_min(1)
        f_hat = f_hat - (f_hat * weight).sum(-1, keepdim=True) / count  # both centred per sequence
        target = target - (target * weight).sum(-1, keepdim=True) / count
        residual = residual + (((f_hat - target) ** 2) * weight).sum(dim=(0, 2))
        total = total + ((target**2) * weight).sum(dim=(0, 2))
    return (1 - residual / total.clamp_min(1e-300)).tolist()


def fit_directions(
    directions: Tensor,
    coef: Tensor,
    train: Sequence[DirectionProblem],
    held_out: Sequence[DirectionProblem],
    *,
    scale: float,
    eps: float,
    steps: int = 300,
    lr: float = 1e-2,
) -> tuple[Tensor, Tensor, dict[str, list]]:
    """Fit ``directions (h, L, d)`` and ``coef (h, L + E)`` jointly by Adam on the mean row KL of ``train``.

    Starts from the given (random) directions and their ridge ``coef``; keeps, per head, the state with the
    lowest held-out KL seen (every :data:`EVAL_EVERY` steps), and the starting point where nothing beat it.
    Returns ``(directions, coef, info)`` with the held-out KL per head before and after and which heads changed.
    """
    if not train:
        raise ValueError("the direction fit needs at least one calibration chunk")
    check = held_out or train
    dtype = train[0].base.scores.dtype
    start_dirs, start_coef = directions.detach().to(dtype), coef.detach().to(dtype)
    raw = start_dirs.clone().requires_grad_(True)
    alpha = start_coef.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([raw, alpha], lr=lr)
    with torch.no_grad():
        before = mean_direction_kl(check, start_dirs, start_coef, scale=scale, eps=eps)
    best = before.clone()
    best_dirs, best_coef = start_dirs.clone(), start_coef.clone()
    for step in range(1, steps + 1):
        optimiser.zero_grad()
        loss = mean_direction_kl(train, _unit(raw), alpha, scale=scale, eps=eps).sum()
        loss.backward()
        optimiser.step()
        if step % EVAL_EVERY == 0 or step == steps:
            with torch.no_grad():
                now = mean_direction_kl(check, _unit(raw), alpha, scale=scale, eps=eps)
                better = torch.isfinite(now) & (now < best)
                best = torch.where(better, now, best)
                best_dirs[better] = _unit(raw)[better]
                best_coef[better] = alpha[better]
    changed = best < before
    info = {"kl_random_directions": before.tolist(), "kl_learned_directions": best.tolist(),
            "learned_kept": changed.tolist(), "steps": steps, "lr": lr}  # fmt: skip
    return best_dirs.to(directions.dtype), best_coef.to(coef.dtype), info
