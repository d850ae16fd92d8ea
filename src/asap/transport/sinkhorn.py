"""Fixed-K log-domain Sinkhorn: the teacher's duals and the ASAP closure target.

Starting from ``g_0 = 0``, ``K`` half-steps alternate, the first being a row
step (docs/method.md sec. 2.1)::

    f_1 = crow(g_0),  g_2 = ccol(f_1),  f_3 = crow(g_2),  ...

* ``K = 1`` is softmax attention at temperature ``eps``.
* Odd ``K`` ends with a row step (rows exact, columns approximate): the final
  plan is ``P = exp((S + f_K + g_{K-1}) / eps)``.
* Even ``K`` ends with a column step (columns exact, rows approximate).
* For odd ``K >= 3`` the final plan is exactly the *closure* of ``f_{K-2}``:
  ``g_{K-1} = ccol(f_{K-2})``, ``f_K = crow(g_{K-1})``. ``f_{K-2}`` (centred over
  valid queries) is therefore the target that ASAP's dual map learns
  (docs/method.md sec. 4.1).

The default path runs exactly ``K`` half-steps with no host synchronisation, so
it can be captured by ``torch.compile(fullgraph=True)`` and CUDA graphs. A
tolerance mode (``tol``) checks the column marginal error every
``check_every`` column steps and stops early; it synchronises with the host at each
check and is meant for analysis, not for training.

For convergence studies, ``sinkhorn(..., return_iterates=True)`` also returns
the duals of the plan after every half-step (:class:`SinkhornIterates`, no
host synchronisation either), from which the plans, their marginal errors
(:meth:`SinkhornIterates.marginal_errors`) or the dual objective follow::

    supp = support(mask, n, m, dtype=torch.float64, device=scores.device)
    result, iterates = sinkhorn(scores, n_iters=21, eps=1.0, supp=supp, return_iterates=True)
    row_err, col_err = iterates.marginal_errors(scores, eps=1.0, supp=supp)   # (21, b, h) each

References: Cuturi, "Sinkhorn distances", NeurIPS 2013; Peyre & Cuturi,
"Computational Optimal Transport", 2019, sec. 4.4 (log-domain stabilisation);
Sander et al., "Sinkformers", AISTATS 2022.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, overload

import torch
from torch import Tensor

from asap.transport.ctransform import c_transform_cols, c_transform_rows, col_step, row_step, scaled_logits
from asap.transport.diagnostics import marginal_errors
from asap.transport.masks import Support

class SinkhornResult(NamedTuple):
    """Duals of the final plan and the closure target.

    f: ``(..., n)`` query dual of the final plan (``f_K`` for odd K, ``f_{K-1}`` for even K).
    g: ``(..., m)`` key dual of the final plan (``g_{K-1}`` for odd K, ``g_K`` for even K).
    target: ``(..., n)`` ``f_{K-2}`` centred over valid queries (odd ``K >= 3``), else ``None``.
    n_steps: number of half-steps actually run (``K`` unless ``tol`` stopped earlier).
    """

    f: Tensor
    g: Tensor
    target: Tensor | None
    n_steps: int


class SinkhornIterates(NamedTuple):
    """The duals of the plan after every half-step of :func:`sinkhorn` (``return_iterates=True``).

    f: ``(K, ..., n)``; ``f[k - 1]`` is the query dual after ``k`` half-steps:
        ``f_k`` after a row step (odd ``k``), unchanged (``f_{k-1}``) after a column step.
    g: ``(K, ..., m)``; ``g[k - 1]`` is the key dual after ``k`` half-steps:
        ``g_k`` after a column step (even ``k``), unchanged after a row step (``g[0] = 0``).

    ``K`` is the number of half-steps run (``SinkhornResult.n_steps``); the last
    iterate is the result's ``(f, g)``. The plan after ``k`` half-steps is
    ``exp((S + f[k-1] + g[k-1]) / eps)`` (:func:`asap.transport.diagnostics.log_plan`):
    its row marginal is exact after a row step, its column marginal after a column step.
    """

    f: Tensor
    g: Tensor

    def marginal_errors(self, scores: Tensor, *, eps: float, supp: Support) -> tuple[Tensor, Tensor]:
        """L1 marginal errors ``(rows, cols)`` of the plan after every half-step, each ``(K, ...)``.

        ``rows[k - 1] = sum_i |P_k 1 - a|_i`` and ``cols[k - 1] = sum_j |P_k^T 1 - b|_j``
        (:func:`asap.transport.diagnostics.marginal_errors`, one ``(..., n, m)``
        plan at a time); the error that is not exact after a step is the one a
        convergence study follows: ``cols`` after row steps, ``rows`` after
        column steps. No host synchronisation.
        """
        pairs = [marginal_errors(scores, f, g, eps=eps, supp=supp) for f, g in zip(self.f, self.g)]
        return torch.stack([rows for rows, _ in pairs]), torch.stack([cols for _, cols in pairs])


def center(x: Tensor, *, valid: Tensor | None = None) -> Tensor:
    """Subtract the mean over the last dim (over ``valid`` entries only); padding stays 0.

    Duals are defined up to a constant (``f + c``, ``g - c`` give the same plan),
    so targets and predictions are compared after centring.
    """
    if valid is None:
        return x - x.mean(dim=-1, keepdim=True)
    w = valid.to(x.dtype)
    mean = (x * w).sum(dim=-1, keepdim=True) / w.sum(dim=-1, keepdim=True).clamp(min=1)
    return (x - mean) * w


def _column_marginal_error(g_old: Tensor, g_new: Tensor, *, eps: float, supp: Support) -> Tensor:
    """L1 column-marginal error of the plan (f, g_old), read off the next column step.

    ``g_new = ccol(f)`` gives ``colsum_j = b_j exp((g_old_j - g_new_j)/eps)`` for free.
    """
    colsum_ratio = torch.expm1((g_old - g_new) / eps).abs()
    err = supp.zero_cols(colsum_ratio * supp.log_b.exp())
    return err.sum(dim=-1)


@overload
def sinkhorn(
    scores: Tensor, *, n_iters: int, eps: float = ..., supp: Support, tol: float | None = ..., check_every: int = ...,
    logits: tuple[Tensor, Tensor] | None = ..., return_iterates: Literal[False] = ...,
) -> SinkhornResult: ...  # fmt: skip


@overload
def sinkhorn(
    scores: Tensor, *, n_iters: int, eps: float = ..., supp: Support, tol: float | None = ..., check_every: int = ...,
    logits: tuple[Tensor, Tensor] | None = ..., return_iterates: Literal[True],
) -> tuple[SinkhornResult, SinkhornIterates]: ...  # fmt: skip


def sinkhorn(
    scores: Tensor,
    *,
    n_iters: int,
    eps: float = 1.0,
    supp: Support,
    tol: float | None = None,
    check_every: int = 10,
    logits: tuple[Tensor, Tensor] | None = None,
    return_iterates: bool = False,
) -> SinkhornResult | tuple[SinkhornResult, SinkhornIterates]:
    """Run ``n_iters`` Sinkhorn half-steps on a score matrix.

    Args:
        scores: ``S (..., n, m)``, already in the reduction dtype (fp32/fp64).
        n_iters: ``K >= 1`` half-steps, the first a row step (the maximum when ``tol`` is set).
        eps: entropic regularisation (the temperature).
        supp: valid tokens and log marginals, from :func:`asap.transport.masks.support`.
        tol: if set, stop once the L1 column-marginal error of every problem is
            below ``tol`` (checked every ``check_every`` column steps, always
            stopping after a row step). Synchronises with the host at each check.
        logits: the log-kernels ``scaled_logits(scores, eps=eps, supp=supp)`` when
            the caller needs them too (Sinkhorn attention's final row
            normalisation), so they are formed once; computed here otherwise.
        return_iterates: also return the duals after every half-step:
            ``(result, SinkhornIterates)`` with ``f (K, ..., n)`` and ``g (K, ..., m)``
            (``K = result.n_steps``), for convergence studies. Costs their memory
            (``K (n + m)`` per problem, kept in the autograd graph when there is
            one), no extra pass and no host synchronisation. The default returns
            the :class:`SinkhornResult` alone, as before.
    """
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1 half-step, got {n_iters}")
    if tol is not None and check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    row_logits, col_logits = logits if logits is not None else scaled_logits(scores, eps=eps, supp=supp)
    # Without autograd every half-step reuses one workspace (see logsumexp_).
    work = None if (torch.is_grad_enabled() and scores.requires_grad) else torch.empty_like(row_logits)
    g = scores.new_zeros(scores.shape[:-2] + (scores.shape[-1],))
    f = scores.new_zeros(scores.shape[:-1])
    f_prev = None  # f_{k-2} when the current step k is a row step
    fs: list[Tensor] = []  # the duals after every half-step (return_iterates only)
    gs: list[Tensor] = []
    step = 0
    while step < n_iters:
        step += 1
        if step % 2 == 1:
            f_prev, f = f, row_step(row_logits, g, eps=eps, supp=supp, work=work)
        else:
            g_new = col_step(col_logits, f, eps=eps, supp=supp, work=work)
            if tol is not None and step > 2 and (step // 2) % check_every == 0:
                err = _column_marginal_error(g, g_new, eps=eps, supp=supp)
                if bool((err < tol).all()):  # host sync: tolerance mode only
                    step -= 1  # the plan (f, g) after the last row step is the answer
                    break
            g = g_new
        if return_iterates:
            fs.append(f)
            gs.append(g)
    target = None
    if step % 2 == 1 and step >= 3:
        target = center(f_prev, valid=supp.rows)
    result = SinkhornResult(f=f, g=g, target=target, n_steps=step)
    if not return_iterates:
        return result
    return result, SinkhornIterates(f=torch.stack(fs), g=torch.stack(gs))


def closure(scores: Tensor, f_hat: Tensor, *, eps: float, supp: Support) -> tuple[Tensor, Tensor]:
    """The two-sided entropic c-transform of a query dual: ``g = ccol(f_hat)``, ``f = crow(g)``.

    With ``f_hat = f_{K-2}`` this reproduces the K-step teacher exactly.
    Returns ``(f, g)``.
    """
    g = c_transform_cols(scores, f_hat, eps=eps, supp=supp)
    return c_transform_rows(scores, g, eps=eps, supp=supp), g
