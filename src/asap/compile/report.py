"""The fidelity report of a compiled model: per layer and head, how close ASAP is to its teacher.

Figures, on the *held-out* calibration batches (the fit batches when there are
none, which the report then says):

* ``r2_fit`` / ``r2_held_out``: explained variance of the dual fit, from the
  normal equations (all calibration tokens, no activation kept); for a
  nonlinear map, from the kept per-token data (:mod:`asap.compile.map_fit`).
* ``kl_*`` / ``row_tv_*``: mean over valid query rows of the KL divergence
  ``KL(A_teacher || A)`` and of the total variation ``1/2 |A_teacher - A|_1``,
  for ASAP and for Sinkhorn truncated to ``truncated_iters`` half-steps, on the
  reservoir sequences.
* ``col_err_*``: L1 column-marginal error ``sum_j |sum_i a_i A_ij - b_j|`` of
  the teacher, ASAP and truncated Sinkhorn (0 = doubly stochastic).
* ``time_ms`` (only when the caller passes a ``timer``, as ``asap compile`` does with
  :func:`asap.bench.measure.time_operators_ms`): median wall time of one call of the teacher,
  truncated Sinkhorn and ASAP on one held-out chunk. This module times nothing itself; it only
  hands the three operators and their inputs to the timer (:func:`layer_operators`).

**Same cost.** An odd-K Sinkhorn layer runs K log-sum-exp passes over the
``n x m`` scores (K - 1 alternating c-transforms, then the row softmax of the
attention itself). ASAP runs 2 (one column c-transform of the predicted dual,
then the row softmax), plus ``L`` projections and sorts of ``n`` and ``m``
numbers (``O(L (n d + n log n))``, no ``n x m`` work). The cheapest Sinkhorn
that uses the column constraint at all is ``K = 3`` (row, column, row): one
more ``n x m`` pass than ASAP, and exactly ASAP with its predicted dual
replaced by ``f_1 = crow(0)``. It is the default truncated baseline; the
measured times, where a timer was given, are reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from asap.attention.operators import SinkhornOperator
from asap.compile.fit import KLProblem, explained_variance, kl_problems
from asap.compile.plans import (
    asap_log_attention,
    column_error,
    row_kl,
    row_total_variation,
    scores_and_support,
    sinkhorn_log_attention,
)

if TYPE_CHECKING:
    from asap.compile.calibrate import LayerCalibration


def _to_list(x: Tensor) -> list[float]:
    return [float(v) for v in x.double().cpu()]


#: A fitted dual map as a function of its inputs: ``(x (b, h, F, n), valid (b, 1 or h, n) | None) -> f_hat (b, h, n)``.
Predict = Callable[[Tensor, Tensor | None], Tensor]


def linear_predict(coef: Tensor) -> Predict:
    """The linear map ``f_hat = sum_c coef_{h,c} x_c`` (uncentred: the closure ignores a constant per row)."""
    return lambda phi, valid: torch.einsum("bhln,hl->bhn", phi, coef.to(phi.dtype))


def fidelity_chunks(calib: "LayerCalibration") -> tuple[list[tuple], bool]:
    """The reservoir chunks the figures are measured on: the held-out ones (``True``), else the fit ones (``False``)."""
    held = bool(calib.held_out_reservoir.chunks)
    return (calib.held_out_reservoir.chunks if held else calib.fit_reservoir.chunks), held


def prepare_problems(calib: "LayerCalibration", chunks: Sequence[tuple]) -> list[KLProblem]:
    """Scores, map inputs, the teacher's log-attention and the support of each reservoir chunk ``(q, k, mask)``."""
    return kl_problems(list(chunks), calib.features, scale=calib.scale, n_iters=calib.n_iters, eps=calib.eps)


@torch.no_grad()
def asap_fidelity(problems: Sequence[KLProblem], predict: Predict, *, eps: float, extra_steps: int = 0) -> dict[str, Tensor]:
    """ASAP's figures per head ``(h,)`` against the teacher, averaged over chunks weighted by their sequences.

    ``kl_asap`` and ``row_tv_asap`` (mean over valid query rows of ``KL(A_teacher || A)``
    and of ``1/2 sum_j |A_teacher,ij - A_ij|``) and ``col_err_asap`` (L1 column
    error), for the map ``predict`` followed by the closure and ``extra_steps``
    half-steps. The one row-TV computation of the compile stage: the report's
    figures and ``target_tv``'s choice of a configuration both come from here.
    """
    sums: dict[str, Tensor] = {}
    weight = 0
    for p in problems:
        f_hat = predict(p.phi, p.supp.rows)
        asap = asap_log_attention(p.scores, f_hat, eps=eps, supp=p.supp, extra_steps=extra_steps)
        figures = {
            "kl_asap": row_kl(p.teacher_log_attn, asap, rows=p.supp.rows),
            "row_tv_asap": row_total_variation(p.teacher_log_attn, asap, rows=p.supp.rows),
            "col_err_asap": column_error(asap, p.supp).mean(0),
        }
        b = p.scores.shape[0]
        for key, value in figures.items():
            sums[key] = sums.get(key, 0) + value * b
        weight += b
    return {key: value / weight for key, value in sums.items()}


@torch.no_grad()
def layer_fidelity(
    calib: "LayerCalibration",
    coef: Tensor,
    *,
    truncated_iters: int = 3,
    predict: Predict | None = None,
    r2: tuple[list[float], list[float] | None] | None = None,
    extra_steps: int = 0,
) -> dict[str, Any]:
    """Per-head fidelity figures of one fitted layer (see the module docstring).

    The map is the linear one of ``coef (h, F)`` unless ``predict`` is given (a nonlinear map,
    whose ``r2 = (fit, held_out)`` the caller then supplies); ``extra_steps`` is
    the operator's warm-start half-steps.
    """
    chunks, held = fidelity_chunks(calib)
    problems = prepare_problems(calib, chunks)
    predict = linear_predict(coef) if predict is None else predict
    sums: dict[str, Tensor] = {}
    weight = 0
    for p in problems:
        truncated = sinkhorn_log_attention(p.scores, p.supp, n_iters=truncated_iters, eps=calib.eps)
        figures = {
            "kl_truncated": row_kl(p.teacher_log_attn, truncated, rows=p.supp.rows),
            "row_tv_truncated": row_total_variation(p.teacher_log_attn, truncated, rows=p.supp.rows),
            "col_err_teacher": column_error(p.teacher_log_attn, p.supp).mean(0),
            "col_err_truncated": column_error(truncated, p.supp).mean(0),
        }
        b = p.scores.shape[0]
        for key, value in figures.items():
            sums[key] = sums.get(key, 0) + value * b
        weight += b
    sums = {key: value / weight for key, value in sums.items()}
    sums.update(asap_fidelity(problems, predict, eps=calib.eps, extra_steps=extra_steps))
    if r2 is None:
        r2_fit = _to_list(explained_variance(calib.fit, coef))
        r2_held = _to_list(explained_variance(calib.held_out, coef)) if calib.held_out.count.sum() > 0 else None
    else:
        r2_fit, r2_held = r2
    out: dict[str, Any] = {
        "r2_fit": r2_fit,
        "r2_held_out": r2_held,
        "fidelity_split": "held_out" if held else "fit",
        "truncated_iters": truncated_iters,
    }
    order = ("kl_asap", "kl_truncated", "row_tv_asap", "row_tv_truncated", "col_err_teacher", "col_err_asap",
             "col_err_truncated")  # fmt: skip
    out.update({key: _to_list(sums[key]) for key in order})
    return out


#: ``timer(operators, (q, k, attn_mask)) -> {name: median ms}``: times each operator called as ``op(q, k, k,
#: attn_mask=mask)``; the benchmarks provide it (:func:`asap.bench.measure.time_operators_ms`).
OperatorTimer = Callable[[dict[str, nn.Module], tuple], dict[str, float]]


def layer_operators(
    calib: "LayerCalibration", asap_operator: nn.Module, *, truncated_iters: int
) -> tuple[dict[str, nn.Module], tuple]:
    """The operators a timer compares on one layer, and the inputs they receive: ``({"teacher", "truncated",
    "asap"}, (q, k, attn_mask))`` on the first fidelity chunk (values: the keys, which have the right shape)."""
    chunks, _ = fidelity_chunks(calib)
    teacher = calib.layer.operator
    truncated = SinkhornOperator(n_iters=truncated_iters, eps=teacher.eps, scale=teacher.scale)
    return {"teacher": teacher, "truncated": truncated, "asap": asap_operator.cpu()}, chunks[0]
