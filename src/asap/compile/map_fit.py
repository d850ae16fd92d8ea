"""Compile-time fits of the nonlinear dual maps, ``"relu"`` and ``"mlp"`` (issue 11 item 1).

The linear map is fitted from normal equations (:mod:`asap.compile.fit`). A
nonlinear map needs the per-token data itself: the layer's *stores*
(:attr:`asap.compile.calibrate.LayerCalibration.stores`), chunks
``(x (b, h, F, n), t (b, h, n), valid (b, 1 or h, n))`` of the map's inputs
(slice potentials and extras, centred) and the teacher's closure target
``t = f_{K-2}`` (centred, 0 at padding), split into fit and held-out batches.

**Objectives** (per head ``h``, summed over heads; the heads are independent problems):

* *dual regression*: ``J_h = sum_i (f_hat_i - t_i)^2 / TSS_h`` over the valid
  queries of the chunks, ``TSS_h = sum_i (t_i - tbar_h)^2``, i.e. ``1 - R2_h``:
  scale-free, so every head weighs the same;
* *row KL* (with ``refine="kl"``): the mean over valid rows of
  ``KL(A_teacher || A_asap)`` on the reservoir sequences
  (:func:`asap.compile.fit.kl_problems`), as the linear map's KL refinement.

**"relu"** (:func:`fit_relu`; the construction is in :mod:`asap.attention.relu_maps`):

1. the input interval of each (head, slice) network: the range of that slice's
   potential over the fit tokens, widened by 5 % each side (:func:`~asap.attention.relu_maps.slice_range`);
2. least squares: the read-out over the joint design ``[N_{l,m}(u_l), x]``
   with the networks at their initialisation on the manifold (all peaks 1/2:
   the ``u^2`` interpolant), ridge relative to each column's energy
   (:func:`~asap.attention.relu_maps.fit_readout`);
3. gradient refinement of peaks and read-out together
   (:func:`~asap.attention.relu_maps.refine`, Adam, ``steps`` at ``lr``) on
   the dual regression, then with ``refine="kl"`` on the row KL; each stage is
   kept only if it lowers its held-out objective. Peaks move through their raw
   values only, so every network keeps exactly ``2^k`` linear pieces.

**"mlp"** (:func:`fit_mlp`):

1. the linear skip := the ridge coefficients of the linear map, ``w_out := 0``
   (the map *is* the ridge-fitted linear map), the input scale := ``1 / std``
   of each input column over the fit tokens (1 for a constant column);
2. full-batch Adam on ``skip, w_in, b_in, w_out`` (``skip`` and ``w_out``
   trained in units of their per-head scale, ``max |skip|`` and the target's
   standard deviation, so ``lr`` is a relative step for them), at most
   ``steps`` steps on the dual regression; every ``eval_every`` steps the
   held-out objective of every head is measured and each head keeps its best
   iterate (*early stopping*, per head: training stops when no head improved
   for ``patience`` evaluations). The start is an iterate, so no head ends
   worse on held-out data than the linear map it started from;
3. with ``refine="kl"``, the same loop on the row KL.

With no held-out batch (``holdout_fraction = 0``) the held-out objective is the
training one, and the report says so (``"held_out": false``). All of it runs on
the CPU, in the dtype of the stores (fp32, fp64 for fp64 models), without
touching the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from asap.attention.nonlinear_maps import MlpDualMap, ReluDualMap
from asap.attention.relu_maps import fit_readout, merge_ranges, refine, slice_range
from asap.compile.fit import KLProblem
from asap.compile.plans import asap_log_attention, row_kl

Chunk = tuple[Tensor, Tensor, Tensor | None]  # (x (b, h, F, n), t (b, h, n), valid (b, 1 or h, n) | None)
Predict = Callable[[Tensor, Tensor | None], Tensor]  # (x, valid) -> f_hat (b, h, n)
#: Margin of the ReLU networks' input interval, as a fraction of the calibration range on each side.
RANGE_MARGIN = 0.05


def _weights(t: Tensor, valid: Tensor | None) -> Tensor:
    return torch.ones_like(t) if valid is None else valid.to(t.dtype).expand_as(t)


def target_tss(chunks: Sequence[Chunk]) -> Tensor:
    """``TSS_h = sum t^2 - (sum t)^2 / N`` over the valid queries of ``chunks``: ``(h,)`` fp64 (smallest normal if 0)."""
    sq = total = count = 0
    for _, t, valid in chunks:
        w = _weights(t, valid).double()
        t = t.double() * w
        sq, total, count = sq + (t * t).sum((0, 2)), total + t.sum((0, 2)), count + w.sum((0, 2))
    return (sq - total**2 / count.clamp(min=1)).clamp(min=torch.finfo(torch.float64).tiny)


def residual_ss(predict: Predict, chunks: Sequence[Chunk]) -> Tensor:
    """``RSS_h = sum (f_hat - t)^2`` over valid queries: ``(h,)`` in the dtype of the chunks (differentiable)."""
    total = 0
    for x, t, valid in chunks:
        r = (predict(x, valid) - t) * _weights(t, valid)
        total = total + (r * r).sum((0, 2))
    return total


def chunks_r2(predict: Predict, chunks: Sequence[Chunk]) -> list[float]:
    """Per-head ``R2 = 1 - RSS / TSS`` of ``predict`` on ``chunks`` (the definition of :func:`asap.compile.fit.explained_variance`)."""
    with torch.no_grad():
        rss = residual_ss(predict, chunks).double()
    return [float(v) for v in 1 - rss / target_tss(chunks)]


def mean_kl(problems: Sequence[KLProblem], predict: Predict, *, eps: float) -> Tensor:
    """Row KL per head ``(h,)`` of the map ``predict`` on prepared reservoir chunks, weighted by their sequences."""
    total = 0
    for p in problems:
        log_attn = asap_log_attention(p.scores, predict(p.phi, p.supp.rows), eps=eps, supp=p.supp)
        total = total + row_kl(p.teacher_log_attn, log_attn, rows=p.supp.rows) * p.scores.shape[0]
    return total / sum(p.scores.shape[0] for p in problems)


Objective = Callable[[Predict], Tensor]  # predict -> per-head loss (h,)


def _objectives(
    kind: str, fit: Sequence[Chunk], held: Sequence[Chunk], kl: tuple[list[KLProblem], list[KLProblem]] | None, eps: float
) -> tuple[Objective, Objective]:
    """``(train, held_out)`` per-head objectives of ``kind`` = "regression" | "kl"."""
    if kind == "regression":
        tss_fit, tss_held = target_tss(fit).to(fit[0][0].dtype), target_tss(held).to(held[0][0].dtype)
        return (lambda p: residual_ss(p, fit) / tss_fit), (lambda p: residual_ss(p, held) / tss_held)
    train, held_problems = kl
    return (lambda p: mean_kl(train, p, eps=eps)), (lambda p: mean_kl(held_problems, p, eps=eps))


def _check_stores(fit: Sequence[Chunk], held: Sequence[Chunk], what: str) -> tuple[Sequence[Chunk], bool]:
    if not fit:
        raise ValueError(f"{what}: no calibration data kept for the nonlinear dual map (keep_features was off)")
    return (held, True) if held else (fit, False)


# --------------------------------------------------------------------------------------------------------- relu


def fit_relu(
    dual_map: ReluDualMap,
    fit: Sequence[Chunk],
    held: Sequence[Chunk],
    *,
    ridge: float,
    steps: int,
    lr: float,
    kl: tuple[list[KLProblem], list[KLProblem]] | None = None,
    eps: float = 1.0,
    what: str = "relu dual map",
) -> dict[str, Any]:
    """Fit a ReLU dual map in place (module docstring): input range, least squares, refinement. Returns the stages."""
    held, has_held = _check_stores(fit, held, what)
    L = dual_map.num_slices
    sm = dual_map.slice_map
    ranges = None
    for x, _, valid in fit:
        r = slice_range(x[:, :, :L], valid=valid)
        ranges = r if ranges is None else merge_ranges(ranges, r)
    try:
        sm.set_input_range(*ranges, margin=RANGE_MARGIN)
        readout = fit_readout(sm, [(x[:, :, :L], x, t, valid) for x, t, valid in fit], ridge=ridge)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
    dual_map.fitted.fill_(True)
    stages: list[dict[str, Any]] = [{"stage": "least_squares", "r2_fit": readout["r2"]}]
    for objective in ("regression",) + (("kl",) if kl is not None else ()):
        train, held_out = _objectives(objective, fit, held, kl, eps)

        def as_predict(p: Callable[..., Tensor]) -> Predict:
            return lambda x, valid: p(x[:, :, :L], x, valid=valid)

        info = refine(sm, lambda p: train(as_predict(p)).sum(), steps=steps, lr=lr, optimizer="adam",
                      held_out=lambda p: held_out(as_predict(p)).sum())  # fmt: skip
        stages.append({"stage": f"refine_{objective}", "steps": steps, "held_out_before": info["before"],
                       "held_out_after": info["after"], "kept": info["kept"]})  # fmt: skip
    return {"held_out": has_held, "stages": stages}


# ---------------------------------------------------------------------------------------------------------- mlp


def input_scale(chunks: Sequence[Chunk]) -> Tensor:
    """``1 / std`` of every input column over the valid queries: ``(h, F)`` fp64 (1 where a column is constant)."""
    sq = count = 0
    for x, t, valid in chunks:
        w = _weights(t, valid).double().unsqueeze(2)
        sq, count = sq + (x.double() ** 2 * w).sum((0, 3)), count + w.sum((0, 3))
    std = (sq / count.clamp(min=1)).sqrt()
    return torch.where(std > 0, 1 / std.clamp(min=torch.finfo(torch.float64).tiny), torch.ones_like(std))


def adam_early_stopping(
    dual_map: MlpDualMap,
    train: Objective,
    held_out: Objective,
    *,
    units: dict[str, Tensor],
    steps: int,
    lr: float,
    eval_every: int = 10,
    patience: int = 10,
) -> dict[str, Any]:
    """Adam on the MLP's trained tensors, per-head early stopping on the held-out objective; writes the best back.

    ``train`` and ``held_out`` map a predictor to a per-head loss ``(h,)``; ``units[name]`` (broadcast
    against the tensor, head first) is the scale a tensor is trained in.
    Returns the held-out objective per head before and after, and the steps run.
    """
    start = {name: t.detach().clone() for name, t in dual_map.tensors().items()}
    raw = {name: (value / units.get(name, 1.0)).requires_grad_(True) for name, value in start.items()}

    def current() -> dict[str, Tensor]:
        return {name: value * units.get(name, 1.0) for name, value in raw.items()}

    def predict_with(params: dict[str, Tensor]) -> Predict:
        return lambda x, valid: dual_map.predict(x, valid=valid, params=params)

    with torch.no_grad():
        best_loss = held_out(predict_with(start)).detach().clone()
    before = best_loss.clone()
    best = {name: value.clone() for name, value in start.items()}
    opt = torch.optim.Adam(list(raw.values()), lr=lr)
    stale, ran = 0, 0
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = train(predict_with(current())).sum()
        if not torch.isfinite(loss):
            break
        loss.backward()
        opt.step()
        ran = step
        if step % eval_every and step != steps:
            continue
        with torch.no_grad():
            params = current()
            held = held_out(predict_with(params))
            better = torch.isfinite(held) & (held < best_loss)
            for name, value in params.items():
                mask = better.view(-1, *([1] * (value.dim() - 1)))
                best[name] = torch.where(mask, value, best[name])
            best_loss = torch.where(better, held, best_loss)
        stale = 0 if bool(better.any()) else stale + 1
        if stale >= patience:
            break
    dual_map.set_tensors(best)
    return {"steps_run": ran, "held_out_before": before.tolist(), "held_out_after": best_loss.tolist()}


def fit_mlp(
    dual_map: MlpDualMap,
    coef: Tensor,
    fit: Sequence[Chunk],
    held: Sequence[Chunk],
    *,
    steps: int,
    lr: float,
    kl: tuple[list[KLProblem], list[KLProblem]] | None = None,
    eps: float = 1.0,
    eval_every: int = 10,
    patience: int = 10,
    what: str = "mlp dual map",
) -> dict[str, Any]:
    """Fit an MLP dual map in place from the ridge coefficients ``coef (h, F)`` of the linear map (module docstring)."""
    held, has_held = _check_stores(fit, held, what)
    dtype = fit[0][0].dtype
    dual_map.set_coefficients(coef.to(dtype))
    dual_map.set_input_scale(input_scale(fit))
    t_std = (target_tss(fit) / sum(_weights(t, v).double().sum((0, 2)) for _, t, v in fit).clamp(min=1)).sqrt()
    units = {
        "skip": coef.abs().amax(dim=-1, keepdim=True).clamp(min=1e-6).to(dtype),
        "w_out": t_std.clamp(min=1e-6).unsqueeze(-1).to(dtype),
    }
    stages: list[dict[str, Any]] = []
    for objective in ("regression",) + (("kl",) if kl is not None else ()):
        info = adam_early_stopping(dual_map, *_objectives(objective, fit, held, kl, eps), units=units, steps=steps,
                                   lr=lr, eval_every=eval_every, patience=patience)  # fmt: skip
        stages.append({"stage": f"adam_{objective}", **info})
    if not all(math.isfinite(v) for v in stages[-1]["held_out_after"]):
        raise ValueError(f"{what}: the fit gave a non-finite held-out objective; refusing it")
    return {"held_out": has_held, "stages": stages}


__all__ = ["adam_early_stopping", "chunks_r2", "fit_mlp", "fit_relu", "input_scale", "mean_kl", "residual_ss", "target_tss"]
