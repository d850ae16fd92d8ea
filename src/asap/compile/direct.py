"""Fit an ASAP dual map straight from attention inputs, for any model: one call, no hooks, no project classes.

``asap compile`` finds the Sinkhorn layers of a model and hooks them; a user
with a model of their own, or with ``q, k`` saved from anywhere, only needs::

    from asap.compile.direct import fit_dual_map

    dual_map, stats = fit_dual_map([(q1, k1, pad1), (q2, k2, pad2)], n_iters=11, eps=1.0)
    op = AsapOperator(num_heads=h, head_dim=d, eps=1.0, dual_map=dual_map)

Each item is ``(q, k)`` or ``(q, k, padding_mask)`` with ``q, k (b, h, n, d)`` and
an optional ``(b, n)`` token mask (True = real token), or a 4-D boolean
``attn_mask`` broadcastable to ``(b, h, n, n)`` for other masks. The fit is the
one ``asap compile`` does (docs/method.md sec. 4.4): the design matrix of
:meth:`~asap.attention.dual_map.SliceDualMap.features` against the teacher's
closure target ``f_{K-2}``, accumulated in fp64 normal equations (the inputs
are not kept), then ridge least squares relative to the Gram trace.

:func:`fit_map` fits any kind of the family (``"linear"``, ``"relu"``, ``"mlp"``)
the way ``asap compile --map`` does, from the same items.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from asap.attention.dual_map import DEFAULT_EXTRA_FEATURES, SliceDualMap, build_dual_map
from asap.compile.fit import NormalEquations, explained_variance, solve_ridge
from asap.compile.plans import closure_target, scores_and_support
from asap.transport.masks import key_padding_to_attn_mask


def _as_mask(mask: Tensor | None) -> Tensor | None:
    if mask is None or mask.dim() == 4:
        return mask
    if mask.dim() == 2:
        return key_padding_to_attn_mask(mask)
    raise ValueError(f"fit_dual_map: a mask is (b, n) token padding or a 4-D boolean mask, got shape {tuple(mask.shape)}")


def _closure_inputs(
    dual_map: SliceDualMap, items: Iterable[tuple], *, n_iters: int, eps: float, scale: float | None
) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """Per item ``(q, k)`` or ``(q, k, mask)``: the map's inputs ``x (b, h, F, n)``, the ``n_iters``-step closure
    target ``(b, h, n)`` and the valid query rows (None: all), in fp64 (``dual_map`` must be fp64)."""
    for item in items:
        if len(item) not in (2, 3):
            raise ValueError(f"fit_dual_map: each item is (q, k) or (q, k, mask), got {len(item)} elements")
        q, k = item[0].detach().double(), item[1].detach().double()
        mask = _as_mask(item[2] if len(item) == 3 else None)
        if q.shape[1] != dual_map.num_heads or q.shape[-1] != dual_map.head_dim:
            raise ValueError(f"fit_dual_map: q of shape {tuple(q.shape)} for a map of {dual_map.num_heads} heads "
                             f"of size {dual_map.head_dim}")  # fmt: skip
        s = q.shape[-1] ** -0.5 if scale is None else scale
        scores, supp = scores_and_support(q, k, scale=s, attn_mask=mask)
        target = closure_target(scores, supp, n_iters=n_iters, eps=eps)
        yield dual_map.features(q, k, scale=s, attn_mask=mask), target, supp.rows


def accumulate(
    dual_map: SliceDualMap, items: Iterable[tuple], *, n_iters: int, eps: float, scale: float | None = None
) -> NormalEquations:
    """The fp64 normal equations of ``dual_map``'s design matrix against the ``n_iters``-step closure target."""
    normal = None
    for phi, target, rows in _closure_inputs(dual_map.double(), items, n_iters=n_iters, eps=eps, scale=scale):
        if normal is None:
            normal = NormalEquations.zeros(dual_map.num_heads, dual_map.num_features)
        normal.add(phi, target, valid=rows)
    if normal is None:
        raise ValueError("fit_dual_map: no inputs to fit on")
    return normal


def fit_dual_map(
    items: Iterable[tuple],
    *,
    n_iters: int,
    eps: float = 1.0,
    scale: float | None = None,
    num_slices: int = 16,
    slice_type: str = "random",
    seed: int = 0,
    extra_features: tuple[str, ...] = DEFAULT_EXTRA_FEATURES,
    ridge: float = 1e-3,
    held_out: Iterable[tuple] | None = None,
) -> tuple[SliceDualMap, dict[str, Any]]:
    """A fitted fp32 dual map for a K-step teacher, and ``{"r2_fit": [...], "r2_held_out": [...] | None}`` per head.

    ``n_iters`` is the teacher's K (odd, >= 3); ``scale`` defaults to ``1/sqrt(d)``.
    ``held_out`` items (same form) give the held-out R2 without entering the fit.
    """
    items = list(items)
    if not items:
        raise ValueError("fit_dual_map: no inputs to fit on")
    q0 = items[0][0]
    dual_map = build_dual_map(num_heads=q0.shape[1], head_dim=q0.shape[-1], num_slices=num_slices,
                              slice_type=slice_type, seed=seed, extra_features=tuple(extra_features))  # fmt: skip
    normal = accumulate(dual_map, items, n_iters=n_iters, eps=eps, scale=scale)
    coef = solve_ridge(normal, ridge=ridge, what="fit_dual_map")
    stats: dict[str, Any] = {"r2_fit": [float(x) for x in explained_variance(normal, coef)], "r2_held_out": None}
    if held_out is not None:
        held = accumulate(dual_map, held_out, n_iters=n_iters, eps=eps, scale=scale)
        stats["r2_held_out"] = [float(x) for x in explained_variance(held, coef)]
    dual_map = dual_map.float()
    dual_map.set_coefficients(coef.float())
    return dual_map, stats


#: Adam steps and step size of a nonlinear map's fit when the caller names none: ``asap compile``'s defaults.
MAP_STEPS, MAP_LR = 300, 1e-2


def _stores(features_map, items: Iterable[tuple], *, n_iters: int, eps: float, scale: float | None, dtype: torch.dtype
            ) -> list[tuple[Tensor, Tensor, Tensor | None]]:  # fmt: skip
    """The per-token chunks ``(x (b, h, F, n), t (b, h, n), valid (b, 1, n) | None)`` a nonlinear fit works on.

    As :class:`asap.compile.calibrate.LayerCalibration` keeps them with ``keep_features``: the map's inputs
    and the ``n_iters``-step closure target, computed in fp64 (``features_map``: an fp64 map of the same
    slices), stored in ``dtype``.
    """
    return [(x.to(dtype), target.to(dtype), None if rows is None else rows.expand(x.shape[0], *rows.shape[1:]))
            for x, target, rows in _closure_inputs(features_map, items, n_iters=n_iters, eps=eps, scale=scale)]


def fit_map(
    items: Iterable[tuple],
    *,
    kind: str = "linear",
    n_iters: int,
    eps: float = 1.0,
    scale: float | None = None,
    num_slices: int = 16,
    slice_type: str = "random",
    seed: int = 0,
    extra_features: tuple[str, ...] = DEFAULT_EXTRA_FEATURES,
    ridge: float = 1e-3,
    map_options: dict[str, Any] | None = None,
    steps: int = MAP_STEPS,
    lr: float = MAP_LR,
    holdout_fraction: float = 0.25,
    held_out: Iterable[tuple] | None = None,
    refine: str = "none",
) -> tuple[Any, dict[str, Any]]:
    """A fitted fp32 dual map of family ``kind`` (``"linear" | "relu" | "mlp"``) and its per-head R2.

    ``"linear"`` is :func:`fit_dual_map` (all ``items`` enter the ridge fit); with ``refine="directions"``
    its slice directions and coefficients are then fitted jointly on the row KL, as ``asap compile
    --refine directions`` fits them (:func:`asap.compile.directions.fit_directions`, ``steps`` Adam steps
    at ``lr``), from the ridge solution, on the first items, the kept state judged on the last
    ``holdout_fraction`` of them.
    ``"relu"`` and ``"mlp"`` are fitted as ``asap compile --map`` fits them
    (:func:`asap.compile.map_fit.fit_relu` / :func:`~asap.compile.map_fit.fit_mlp`,
    regression objective, ``steps`` Adam steps at ``lr``): the ridge solution
    on the first items, then the nonlinear fit, whose early stopping and
    kept stages are judged on the last ``holdout_fraction`` of ``items``
    (at least one item when there are two or more; none: judged on the fit
    items). ``held_out`` (same form) never enters the fit: it only gives
    ``"r2_held_out"``. The stats add ``"fit_info"`` (the fit's stages) for a
    nonlinear kind.
    """
    if refine not in ("none", "directions") or (refine == "directions" and kind != "linear"):
        raise ValueError(f"fit_map: refine is 'none', or 'directions' for the linear map; got {refine!r} for {kind!r}")
    items = list(items)
    if not items:
        raise ValueError("fit_map: no inputs to fit on")
    if not 0 <= holdout_fraction < 1:
        raise ValueError(f"fit_map: holdout_fraction must be in [0, 1), got {holdout_fraction}")
    stop = min(len(items) - 1, math.ceil(len(items) * holdout_fraction)) if holdout_fraction > 0 else 0
    fit_items, stop_items = items[: len(items) - stop], items[len(items) - stop :]
    if kind == "linear":
        dual_map, stats = fit_dual_map(items, n_iters=n_iters, eps=eps, scale=scale, num_slices=num_slices,
                                       slice_type=slice_type, seed=seed, extra_features=extra_features, ridge=ridge,
                                       held_out=held_out)  # fmt: skip
        if refine == "directions":
            stats = _learn_directions(dual_map, fit_items, stop_items, held_out, n_iters=n_iters, eps=eps,
                                      scale=scale, steps=steps, lr=lr)  # fmt: skip
        return dual_map, stats
    from asap.compile.map_fit import chunks_r2, fit_mlp, fit_relu
    q0 = items[0][0]
    dual_map = build_dual_map(num_heads=q0.shape[1], head_dim=q0.shape[-1], num_slices=num_slices,
                              slice_type=slice_type, seed=seed, extra_features=tuple(extra_features), kind=kind,
                              map_options=map_options)  # fmt: skip
    coef = solve_ridge(accumulate(dual_map, fit_items, n_iters=n_iters, eps=eps, scale=scale), ridge=ridge,
                       what=f"fit_map ({kind})")  # fmt: skip
    features_map = copy.deepcopy(dual_map).double()  # the slices and extras only: the fit leaves them as they are
    dual_map = dual_map.float()
    as_chunks = lambda part: _stores(features_map, part, n_iters=n_iters, eps=eps, scale=scale, dtype=torch.float32)  # noqa: E731
    fit_chunks, stop_chunks = as_chunks(fit_items), as_chunks(stop_items)
    what = f"fit_map ({kind})"
    with torch.enable_grad():  # the fits are gradient fits, also when called under no_grad
        if kind == "relu":
            info = fit_relu(dual_map, fit_chunks, stop_chunks, ridge=ridge, steps=steps, lr=lr, eps=eps, what=what)
        elif kind == "mlp":
            info = fit_mlp(dual_map, coef.float(), fit_chunks, stop_chunks, steps=steps, lr=lr, eps=eps, what=what)
        else:
            raise ValueError(f"fit_map: no fit for dual map kind {kind!r} (linear, relu, mlp)")

    def predict(x: Tensor, valid: Tensor | None) -> Tensor:
        return dual_map.predict(x, valid=valid)

    stats: dict[str, Any] = {"r2_fit": chunks_r2(predict, fit_chunks), "r2_held_out": None, "fit_info": info,
                             "fit_items": len(fit_items), "early_stopping_items": len(stop_items)}  # fmt: skip
    if held_out is not None:
        stats["r2_held_out"] = chunks_r2(predict, as_chunks(list(held_out)))
    return dual_map, stats


def _learn_directions(dual_map: SliceDualMap, fit_items: list[tuple], stop_items: list[tuple],
                      held_out: Iterable[tuple] | None, *, n_iters: int, eps: float, scale: float | None, steps: int,
                      lr: float) -> dict[str, Any]:  # fmt: skip
    """Fit ``dual_map``'s directions and coefficients in place on the row KL of ``fit_items`` (kept state judged
    on ``stop_items``); the stats: R2 on those items and on ``held_out``, and the fit's ``fit_info``."""
    from asap.compile.directions import direction_problems, fit_directions, reservoir_r2

    q0 = fit_items[0][0]
    s = q0.shape[-1] ** -0.5 if scale is None else scale
    features = lambda q, k, mask: dual_map.features(q, k, scale=s, attn_mask=mask)  # noqa: E731
    prepare = lambda part: direction_problems(  # noqa: E731
        [(item[0].detach().float(), item[1].detach().float(), _as_mask(item[2] if len(item) == 3 else None))
         for item in part], features, num_slices=dual_map.num_slices, scale=s, n_iters=n_iters, eps=eps)  # fmt: skip
    train, stop = prepare(fit_items), prepare(stop_items)
    with torch.enable_grad():  # a gradient fit, also when called under no_grad
        directions, coef, info = fit_directions(dual_map.directions, dual_map.coefficients().float(), train, stop,
                                                scale=s, eps=eps, steps=steps, lr=lr)  # fmt: skip
    with torch.no_grad():
        dual_map.directions.copy_(directions)
    dual_map.set_coefficients(coef)
    held = prepare(list(held_out)) if held_out is not None else []
    return {"r2_fit": reservoir_r2(train, directions, coef, scale=s),
            "r2_held_out": reservoir_r2(held, directions, coef, scale=s) if held else None,
            "fit_info": info, "fit_items": len(fit_items), "early_stopping_items": len(stop_items)}  # fmt: skip
