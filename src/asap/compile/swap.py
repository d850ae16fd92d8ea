"""``compile_model``: calibrate, fit and swap every Sinkhorn operator of a model for its ASAP operator.

The compiled model is a copy of the teacher in which each selected
:class:`~asap.attention.SinkhornOperator` is replaced by an
:class:`~asap.attention.AsapOperator` with the same ``eps`` and ``scale``,
carrying a fitted dual map (:class:`~asap.attention.dual_map.DualMap`). Every other weight is
the teacher's, untouched.

Two calibration modes (docs/method.md sec. 4.4):

* ``"teacher"``: one pass of the teacher; every layer is fitted on the
  activations the *teacher* produces. Cheapest; each layer's fit is as good as
  it can be on its own inputs, but at inference layer ``l`` receives inputs
  already perturbed by the compiled layers below.
* ``"sequential"``: layer ``l`` is fitted on the activations produced when
  layers ``< l`` already run ASAP, so each fit sees the distribution it will
  meet at inference (errors below are partly compensated). Costs one forward
  of layers ``0..l`` per layer.

**The dual map** (issue 11): ``map_kind`` ``"linear"`` (default; ridge least
squares, optionally KL refinement, exactly as before), ``"relu"`` or
``"mlp"`` (:mod:`asap.attention.nonlinear_maps`, fitted by
:mod:`asap.compile.map_fit` from the ridge solution), with
``map_options = {kind: {option: value}}``.

**Defaults by measurement** (``target_tv = X``): per layer, the candidates
of :func:`target_tv_candidates` are tried cheapest first, by the cost model of
:func:`candidate_cost`, and the first whose mean held-out row total variation
to the teacher (:func:`asap.compile.report.asap_fidelity`, the report's own
figure) is ``<= X`` is compiled; if none reaches ``X``, the candidate with the
lowest TV is. The layer's report (and so the artifact's manifest) records the
choice, whether it reached ``X``, and the TV and cost of every candidate tried,
with one line per layer in ``report["selection"]``. The held-out batches both
stop the nonlinear fits early and choose among candidates, so the chosen
candidate's held-out TV is slightly optimistic.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from asap.argtypes import cli, finite_float, int_list, name_list, nonnegative_int, positive_float, positive_int
from asap.attention.dual_map import DUAL_MAPS, SLICE_TYPES, build_dual_map, dual_map_class
from asap.attention.operators import AsapOperator, SinkhornOperator
from asap.attention.submodules import replace_module
from asap.compile.calibrate import (
    LayerCalibration,
    Selection,
    SinkhornLayer,
    batch_count,
    collect,
    held_out_rule,
    select_layers,
    sinkhorn_layers,
)
from asap.compile.directions import direction_problems, fit_directions, reservoir_r2
from asap.compile.fit import KLProblem, fit_semi_dual, kl_problems, mean_kl, refine_kl, solve_ridge
from asap.compile.map_fit import chunks_r2, fit_mlp, fit_relu
from asap.compile.maps import DEFAULT_EXTRA_FEATURES, EXTRA_FEATURES, set_coefficients
from asap.compile.report import (
    OperatorTimer,
    Predict,
    asap_fidelity,
    fidelity_chunks,
    layer_fidelity,
    layer_operators,
    linear_predict,
    prepare_problems,
)

MODES = ("teacher", "sequential")
REFINE = ("none", "kl", "dual", "directions")


def extra_feature_list(text: str) -> tuple[str, ...]:
    """``--extra-features``: comma-separated names among :data:`EXTRA_FEATURES`, or ``none``."""
    return () if text == "none" else name_list(EXTRA_FEATURES)(text)
#: The map kinds and warm-start steps ``target_tv`` tries (every combination, cheapest first).
TARGET_TV_KINDS: tuple[str, ...] = ("linear", "relu", "mlp")
TARGET_TV_EXTRA_STEPS: tuple[int, ...] = (0, 1, 2)
#: Charge of each dual map in softmax-call units (see :func:`candidate_cost`).
MAP_COST_UNITS: dict[str, float] = {"linear": 0.0, "relu": 0.25, "mlp": 0.5}


def candidate_cost(kind: str, extra_steps: int, *, extra_features: tuple[str, ...] = ()) -> float:
    """Cost of a compiled configuration in *softmax-call units*: ``2 + extra_steps + MAP_COST_UNITS[kind]``,
    plus 1 with the ``lse_keys`` feature (a log-sum-exp over every score: one more ``n x m`` pass).

    The unit is one pass over the ``n x m`` scores: a log-sum-exp (or softmax)
    over every row or column, which is what one half-step of Sinkhorn and one
    plain attention call cost (docs/method.md sec. 2.3, 4.5). The closure costs
    2 (the column log-sum-exp of ``f_hat``, then the row softmax that is the
    attention itself) and each warm-start half-step 1 more, so a ``K``-step
    truncated Sinkhorn costs ``K`` on the same scale. A dual map does ``O(n)``
    work per row (no ``n x m`` term), which vanishes in this unit as ``m`` grows;
    it is charged a fixed fraction below 1 that orders the maps by their
    per-token work at the defaults -- ``linear`` 0 (L projections and sorts,
    which every kind shares), ``relu`` 0.25 (``L M`` networks of ``k`` triangle
    layers: 16 x 2 x 4 x 2 ReLUs), ``mlp`` 0.5 (``2 H F`` multiply-adds: 2 x 32 x 18)
    -- and keeps every map cheaper than one more ``n x m`` pass, so each richer
    map is tried before an extra half-step. A counted model, not a timing:
    ``asap compile`` times nothing to decide (the measured cost of each path is
    ``asap bench``'s business), and each candidate's cost is recorded with it.
    """
    return 2.0 + extra_steps + MAP_COST_UNITS[kind] + (1.0 if "lse_keys" in extra_features else 0.0)


def target_tv_candidates() -> list[tuple[str, int]]:
    """``(map kind, extra_steps)`` for every kind of :data:`TARGET_TV_KINDS` and step count of
    :data:`TARGET_TV_EXTRA_STEPS`, in increasing :func:`candidate_cost`: linear, relu, mlp; then
    each with 1 extra step; then each with 2."""
    pairs = [(kind, steps) for steps in TARGET_TV_EXTRA_STEPS for kind in TARGET_TV_KINDS]
    return sorted(pairs, key=lambda pair: candidate_cost(*pair))


def _check_map_options(map_options: Any, kinds: tuple[str, ...], *, where: str) -> dict[str, dict[str, int]]:
    """``{kind: {option: value}}`` for the nonlinear ``kinds`` compiled, defaults filled; others refused by name."""
    if not isinstance(map_options, Mapping):
        raise ValueError(f"map_options must be a mapping {{kind: {{option: value}}}}, got {map_options!r:.60}")
    for kind in map_options:
        dual_map_class(kind)  # an unknown kind is named
        if kind not in kinds:
            raise ValueError(f"map_options for {kind!r}: {where} compiles only {list(kinds)} (give options of those kinds)")
    return {kind: dual_map_class(kind).check_options(map_options.get(kind)) for kind in kinds if kind != "linear"}


@dataclass(frozen=True)
class CompileOptions:
    """The options of :func:`compile_model` (stored in the artifact's manifest).

    ``num_slices`` L and ``slice_type`` ("random" | "axis") choose the
    features, ``extra_features`` cheap per-token features appended to them (see
    :mod:`asap.compile.maps`; ``()`` gives the plain linear slice map); ``seed``
    draws random directions (layer ``l`` uses ``seed + l``,
    so layers do not share directions); ``ridge`` is relative to the Gram trace;
    ``refine="kl"`` adds the KL stage (``refine_iters`` L-BFGS iterations),
    ``refine="dual"`` replaces the ridge fit by the label-free semi-dual fit
    (:func:`asap.compile.fit.fit_semi_dual`; linear map only), ``refine="directions"``
    learns the slice directions with the coefficients (:mod:`asap.compile.directions`,
    ``map_steps`` Adam steps of size ``map_lr``; linear map only);
    ``holdout_fraction`` of the calibration batches (the last ones) is held out
    for the fidelity figures and to accept or reject the refinement;
    ``reservoir_size`` caps the sequences kept per layer and split for the
    refinement and the attention-level figures; ``truncated_iters`` is the
    same-cost Sinkhorn baseline of the report.

    The dual map: ``map_kind`` (``"linear"``, ``"relu"``, ``"mlp"``) with
    ``map_options = {kind: {option: value}}`` (``{"relu": {"depth": 3}}``;
    options of a kind that is not compiled are refused, the stored value has
    every default filled in); ``map_steps`` and ``map_lr`` are the Adam steps
    and step size of the nonlinear fits (:mod:`asap.compile.map_fit`).
    ``target_tv`` (a number in (0, 1]) chooses the map and ``extra_steps`` of
    each layer instead (module docstring; ``map_kind`` then stays ``"linear"``
    and ``map_options`` may hold options of every candidate kind).
    """

    num_slices: int = field(default=16, metadata=cli(
        "number L of slice directions per head", flag="--slices", type=positive_int))
    slice_type: str = field(default="random", metadata=cli("slice directions", choices=SLICE_TYPES))
    extra_features: tuple[str, ...] = field(default=DEFAULT_EXTRA_FEATURES, metadata=cli(
        "O(n d) per-token features added to the slice potentials (comma-separated), or 'none'",
        type=extra_feature_list, default_text=",".join(DEFAULT_EXTRA_FEATURES)))
    seed: int = field(default=0, metadata=cli(
        "seed of the random directions (layer l uses seed + l) and of the calibration sample", type=nonnegative_int))
    ridge: float = field(default=1e-3, metadata=cli("ridge, relative to the Gram trace", type=finite_float))
    refine: str = field(default="none", metadata=cli(
        "how the linear map is fitted beyond ridge: kl (second stage, L-BFGS on the teacher's row KL), dual "
        "(label-free: maximise the entropic semi-dual, no Sinkhorn target) or directions (slice directions and "
        "coefficients learned by Adam on the row KL, --map-steps/--map-lr)", choices=REFINE))
    refine_iters: int = field(default=30, metadata=cli("L-BFGS iterations of the KL refinement", type=positive_int))
    mode: str = field(default="teacher", metadata=cli(
        "calibration activations: the teacher's, or sequential (layers below already compiled)", choices=MODES))
    layers: tuple[int, ...] | None = field(default=None, metadata=cli(
        "compile only these Sinkhorn layers, e.g. 0,1", type=int_list(nonnegative_int), default_text="all"))
    holdout_fraction: float = field(default=0.25, metadata=cli(
        "fraction of calibration batches held out", flag="--holdout", type=finite_float))
    reservoir_size: int = field(default=64, metadata=cli(
        "sequences kept per layer for refinement and figures", flag="--reservoir", type=positive_int))
    truncated_iters: int = field(default=3, metadata=cli(
        "half-steps of the same-cost truncated Sinkhorn baseline", type=positive_int))
    map_kind: str = field(default="linear", metadata=cli(
        "dual map kind: linear, relu (per-slice triangle-wave ReLU networks, arXiv 2311.18022) or mlp (one hidden "
        "layer with a linear skip)", flag="--map", choices=tuple(DUAL_MAPS)))
    map_options: dict[str, dict[str, int]] = field(default_factory=dict)
    map_steps: int = field(default=300, metadata=cli(
        "Adam steps of the relu/mlp fit and of --refine directions (early-stopped on held-out data)",
        type=positive_int))
    map_lr: float = field(default=1e-2, metadata=cli(
        "Adam step of the relu/mlp fit and of --refine directions", type=positive_float))
    target_tv: float | None = field(default=None, metadata=cli(
        "per layer, compile the cheapest of linear/relu/mlp x 0/1/2 extra steps whose mean held-out row TV to the "
        "teacher is <= X (else the lowest-TV one); replaces --map", type=finite_float, metavar="X",
        default_text="off, every layer gets --map"))

    @property
    def map_kinds(self) -> tuple[str, ...]:
        """The map kinds this compilation may fit: ``(map_kind,)``, or every candidate of ``target_tv``."""
        return TARGET_TV_KINDS if self.target_tv is not None else (self.map_kind,)

    @classmethod
    def build(cls, options: CompileOptions | None = None, **fields: Any) -> CompileOptions:
        """``options`` (default: every default) with ``fields`` replaced, checked once: the one way the public
        functions turn their keyword options into a :class:`CompileOptions` (an unknown name is a ``TypeError``)."""
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"options must be a CompileOptions, got {type(options).__name__}")
        return dataclasses.replace(options or cls(), **fields)

    def __post_init__(self) -> None:
        # sequences from Python callers and JSON: one canonical form (layers sorted and unique, tuples, a dict)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))
        object.__setattr__(self, "extra_features", tuple(self.extra_features))
        if self.map_options is None or isinstance(self.map_options, Mapping):  # anything else is refused below
            object.__setattr__(self, "map_options", dict(self.map_options or {}))
        if self.num_slices < 1:
            raise ValueError(f"num_slices must be >= 1, got {self.num_slices}")
        if self.slice_type not in SLICE_TYPES:
            raise ValueError(f"slice_type must be one of {SLICE_TYPES}, got {self.slice_type!r}")
        unknown = sorted(set(self.extra_features) - set(EXTRA_FEATURES))
        if unknown:
            raise ValueError(f"extra_features must be among {EXTRA_FEATURES}, got {unknown}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if self.refine not in REFINE:
            raise ValueError(f"refine must be one of {REFINE}, got {self.refine!r}")
        if self.refine in ("dual", "directions") and (self.map_kind != "linear" or self.target_tv is not None):
            raise ValueError(f"refine {self.refine!r} fits the linear map only: "
                             "use it without a relu/mlp map and without target_tv")  # fmt: skip
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.reservoir_size < 1 or self.refine_iters < 1:
            raise ValueError("reservoir_size and refine_iters must be >= 1")
        if self.truncated_iters < 1 or self.truncated_iters % 2 == 0:
            raise ValueError(f"truncated_iters must be odd and >= 1, got {self.truncated_iters}")
        if self.map_kind not in DUAL_MAPS:
            raise ValueError(f"map_kind must be one of {sorted(DUAL_MAPS)}, got {self.map_kind!r}")
        if self.target_tv is not None:
            if isinstance(self.target_tv, bool) or not isinstance(self.target_tv, (int, float)) or not (
                math.isfinite(self.target_tv) and 0 < self.target_tv <= 1
            ):  # fmt: skip
                raise ValueError(f"target_tv must be a number in (0, 1] (a mean row total variation), got {self.target_tv!r}")
            if self.map_kind != "linear":
                raise ValueError(f"target_tv chooses the map of each layer: leave map_kind at 'linear', got {self.map_kind!r}")
        where = "target_tv" if self.target_tv is not None else f"map_kind {self.map_kind!r}"
        object.__setattr__(self, "map_options", _check_map_options(self.map_options, self.map_kinds, where=where))
        if isinstance(self.map_steps, bool) or not isinstance(self.map_steps, int) or self.map_steps < 1:
            raise ValueError(f"map_steps must be an integer >= 1, got {self.map_steps!r}")
        if not (isinstance(self.map_lr, (int, float)) and math.isfinite(self.map_lr) and self.map_lr > 0):
            raise ValueError(f"map_lr must be a finite number > 0, got {self.map_lr!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = None if self.layers is None else list(self.layers)
        out["extra_features"] = list(self.extra_features)
        return out


def fit_coefficients(calib: LayerCalibration, options: CompileOptions) -> tuple[Tensor, dict[str, Any]]:
    """Ridge solution of one layer, optionally refined on the row KL: ``(coef (h, L) fp32, info)``."""
    coef = solve_ridge(calib.fit, ridge=options.ridge, what=f"layer {calib.layer.index} ({calib.layer.name})")
    info: dict[str, Any] = {}
    if options.refine == "kl":
        train, held = reservoir_problems(calib)
        coef, info = refine_kl(coef.float(), train, held, eps=calib.eps, max_iter=options.refine_iters)
    elif options.refine == "dual":  # label-free: the ridge solution above is kept only for comparison
        train, held = reservoir_problems(calib)
        ridge_kl = mean_kl(held or train, coef.float(), eps=calib.eps).tolist()
        coef, info = fit_semi_dual(coef.shape[-1], train, held, eps=calib.eps, max_iter=options.refine_iters)
        info["kl_ridge"] = ridge_kl
    return coef.float(), info


def reservoir_problems(calib: LayerCalibration) -> tuple[list[KLProblem], list[KLProblem]]:
    """The layer's fit and held-out reservoir chunks prepared for the row-KL and semi-dual objectives."""
    prepare = lambda chunks: kl_problems(  # noqa: E731
        chunks, calib.features, scale=calib.scale, n_iters=calib.n_iters, eps=calib.eps
    )
    return prepare(calib.fit_reservoir.chunks), prepare(calib.held_out_reservoir.chunks)


def asap_operator_for(calib: LayerCalibration, coef: Tensor, *, extra_steps: int = 0, dual_map: nn.Module | None = None) -> AsapOperator:
    """The ASAP operator replacing ``calib``'s Sinkhorn layer: same eps and scale, fitted dual map.

    The map is the linear one of ``coef`` unless a fitted ``dual_map`` is given.
    Its tensors (the dual map's) are on the device the layer was called on during
    calibration; it takes the teacher operator's training flag.
    """
    teacher = calib.layer.operator
    if dual_map is None:
        dual_map = copy.deepcopy(calib.dual_map)
        set_coefficients(dual_map, coef)
    operator = AsapOperator(
        num_heads=calib.num_heads, head_dim=calib.head_dim, eps=teacher.eps, scale=teacher.scale, dual_map=dual_map,
        extra_steps=extra_steps,
    )  # fmt: skip
    return operator.train(teacher.training)


@dataclass
class LayerFit:
    """One layer's fitted map: the operator that replaces it and what the report needs.

    ``coef (h, F)`` is the linear map's solution (the map itself for ``"linear"``,
    the ridge starting point of a nonlinear one); ``predict`` evaluates a
    nonlinear map on its inputs (``None``: linear in ``coef``) and ``r2`` is its
    ``(fit, held_out)`` R2 per head; ``info`` the refinement or fit stages;
    ``selection`` what ``target_tv`` tried and chose.
    """

    calib: LayerCalibration
    operator: AsapOperator
    coef: Tensor
    info: dict[str, Any]
    predict: Predict | None = None
    r2: tuple[list[float], list[float] | None] | None = None
    selection: dict[str, Any] | None = None


def fit_learned_directions(calib: LayerCalibration, coef: Tensor, options: CompileOptions) -> LayerFit:
    """The linear map with learned slice directions (:func:`asap.compile.directions.fit_directions`), from the
    ridge ``coef`` on the random ones. The layer's map takes the kept directions, so the fidelity figures and
    the operator use them; R2 is measured on the reservoirs (the normal equations hold the random features)."""
    prepare = lambda chunks: direction_problems(  # noqa: E731
        chunks, calib.features, num_slices=calib.num_slices, scale=calib.scale, n_iters=calib.n_iters, eps=calib.eps
    )
    train, held = prepare(calib.fit_reservoir.chunks), prepare(calib.held_out_reservoir.chunks)
    start = calib.dual_map.directions.detach().to(train[0].base.scores.device if train else "cpu")
    directions, coef, info = fit_directions(start, coef.float(), train, held, scale=calib.scale, eps=calib.eps,
                                            steps=options.map_steps, lr=options.map_lr)  # fmt: skip
    with torch.no_grad():
        calib.dual_map.directions.copy_(directions.to(calib.dual_map.directions))
    r2 = (reservoir_r2(train, directions, coef, scale=calib.scale),
          reservoir_r2(held, directions, coef, scale=calib.scale) if held else None)  # fmt: skip
    return LayerFit(calib, asap_operator_for(calib, coef), coef.float(), info, r2=r2)


def fit_kind(calib: LayerCalibration, options: CompileOptions, kind: str) -> LayerFit:
    """Fit the dual map of ``kind`` for one calibrated layer (``extra_steps`` 0).

    ``"linear"``: :func:`fit_coefficients`, unchanged. ``"relu"``/``"mlp"``: the
    ridge solution, then :func:`asap.compile.map_fit.fit_relu` /
    :func:`~asap.compile.map_fit.fit_mlp` on the layer's kept inputs (and with
    ``refine="kl"`` the row KL of the reservoirs), on the CPU; the fitted map
    goes to the device the layer was called on.
    """
    if kind == "linear":
        coef, info = fit_coefficients(calib, options)
        if options.refine == "directions":
            return fit_learned_directions(calib, coef, options)
        return LayerFit(calib, asap_operator_for(calib, coef), coef, info)
    what = f"layer {calib.layer.index} ({calib.layer.name}) {kind} map"
    coef = solve_ridge(calib.fit, ridge=options.ridge, what=what)
    dual_map = build_dual_map(
        num_heads=calib.num_heads, head_dim=calib.head_dim, num_slices=calib.num_slices, slice_type=calib.slice_type,
        seed=calib.seed, extra_features=calib.extra_features, kind=kind, map_options=options.map_options.get(kind),
    )  # fmt: skip
    kl = None
    if options.refine == "kl":
        train, held = reservoir_problems(calib)
        kl = (train, held or train)
    fit, held_store = calib.stores["fit"], calib.stores["held_out"]
    if kind == "relu":
        info = fit_relu(dual_map, fit, held_store, ridge=options.ridge, steps=options.map_steps, lr=options.map_lr,
                        kl=kl, eps=calib.eps, what=what)  # fmt: skip
    else:
        info = fit_mlp(dual_map, coef.float(), fit, held_store, steps=options.map_steps, lr=options.map_lr, kl=kl,
                       eps=calib.eps, what=what)  # fmt: skip
    cpu_map = copy.deepcopy(dual_map)
    dual_map = dual_map.to(calib.device)

    def predict(x: Tensor, valid: Tensor | None) -> Tensor:
        return (cpu_map if x.device.type == "cpu" else dual_map).predict(x, valid=valid)

    r2 = (chunks_r2(predict, fit), chunks_r2(predict, held_store) if held_store else None)
    return LayerFit(calib, asap_operator_for(calib, coef, dual_map=dual_map), coef.float(), info, predict, r2)


def select_by_target_tv(calib: LayerCalibration, options: CompileOptions) -> LayerFit:
    """``target_tv``: the cheapest candidate whose mean held-out row TV is ``<= target_tv``, else the lowest-TV one.

    Candidates in the order of :func:`target_tv_candidates`; each map kind is
    fitted once, when first needed, and scored with every ``extra_steps`` by
    :func:`asap.compile.report.asap_fidelity` on the layer's held-out reservoir
    (the fit one when there is none: ``"split"`` says which). The TV of a
    candidate is the mean over heads of the per-head mean over valid rows.
    """
    target = float(options.target_tv)
    chunks, held = fidelity_chunks(calib)
    problems = prepare_problems(calib, chunks)
    fits: dict[str, LayerFit] = {}
    tried: list[dict[str, Any]] = []
    chosen = None
    for kind, steps in target_tv_candidates():
        if kind not in fits:
            fits[kind] = fit_kind(calib, options, kind)
        fit = fits[kind]
        predict = fit.predict or linear_predict(fit.coef)
        per_head = asap_fidelity(problems, predict, eps=calib.eps, extra_steps=steps)["row_tv_asap"]
        cost = candidate_cost(kind, steps, extra_features=options.extra_features)
        tried.append({"map": kind, "map_options": fit.operator.dual_map.map_options, "extra_steps": steps,
                      "cost": cost, "row_tv": float(per_head.mean()), "row_tv_per_head": [float(v) for v in per_head]})  # fmt: skip
        if tried[-1]["row_tv"] <= target:
            chosen = tried[-1]
            break
    reached = chosen is not None
    if chosen is None:  # the lowest TV; the cheaper of equals
        chosen = min(tried, key=lambda c: (c["row_tv"], c["cost"]))
    fit = fits[chosen["map"]]
    name = f"layer {calib.layer.index} ({calib.layer.name})"
    config = f"{chosen['map']} map + {chosen['extra_steps']} extra step{'s' if chosen['extra_steps'] != 1 else ''}"
    split = "held-out" if held else "fit (no held-out batch)"
    if reached:
        line = (f"{name}: {config}, {split} row TV {chosen['row_tv']:.4g} <= target {target:g} "
                f"(cost {chosen['cost']:g}; {len(tried)} of {len(target_tv_candidates())} candidates tried)")  # fmt: skip
    else:
        line = (f"{name}: no candidate reaches target {target:g}; took the lowest {split} row TV, {config} at "
                f"{chosen['row_tv']:.4g} (cost {chosen['cost']:g})")  # fmt: skip
    operator = asap_operator_for(calib, fit.coef, extra_steps=chosen["extra_steps"], dual_map=fit.operator.dual_map)
    selection = {"target_tv": target, "reached": reached, "split": "held_out" if held else "fit",
                 "chosen": {k: chosen[k] for k in ("map", "map_options", "extra_steps", "cost", "row_tv")},
                 "candidates": tried, "cost_model": "2 + extra_steps + map charge (softmax-call units; "
                 f"map charges {MAP_COST_UNITS})", "line": line}  # fmt: skip
    return LayerFit(calib, operator, fit.coef, fit.info, fit.predict, fit.r2, selection)


def fit_layer(calib: LayerCalibration, options: CompileOptions) -> LayerFit:
    """One calibrated layer's fitted operator: ``options.map_kind``, or the ``target_tv`` choice."""
    if options.target_tv is not None:
        return select_by_target_tv(calib, options)
    return fit_kind(calib, options, options.map_kind)


def swap_in(model: nn.Module, layer: SinkhornLayer, operator: nn.Module) -> None:
    """Put ``operator`` in place of the layer's operator, in place, under every name it has in ``model``."""
    for name in layer.names:
        replace_module(model, name, operator)


def compile_selected(
    model: nn.Module,
    data: Iterable[Any],
    selected: list[SinkhornLayer],
    options: CompileOptions,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    stop_early: bool = True,
    progress: Any = None,
    timer: OperatorTimer | None = None,
) -> dict[str, Any]:
    """Calibrate, fit and swap the ``selected`` Sinkhorn layers of ``model`` IN PLACE; return the report.

    ``timer`` (optional, from the benchmarks: :func:`asap.bench.measure.time_operators_ms`) adds each
    layer's ``time_ms``: teacher, truncated Sinkhorn and ASAP on one held-out chunk.

    The pipeline of :func:`compile_model` (which calls it on a copy) and of
    :func:`asap.compile.module.compile_module` (on the user's model). ``data`` is
    iterated once per pass (once in ``"teacher"`` mode, once per layer in
    ``"sequential"`` mode, which therefore refuses a one-shot iterator). If
    anything fails, every operator already swapped is put back: the model is
    left as it was (its training flag included).
    """
    if options.mode == "sequential" and len(selected) > 1 and isinstance(data, Iterator):
        raise ValueError(
            "mode='sequential' passes over the calibration data once per layer: give a re-iterable "
            "(a list, a DataLoader), not a one-shot iterator or generator"
        )
    rule = held_out_rule(batch_count(data), options.holdout_fraction)
    keep = options.map_kinds != ("linear",)  # a nonlinear map is fitted from the per-token data
    new = lambda layer: LayerCalibration(  # noqa: E731
        layer, num_slices=options.num_slices, slice_type=options.slice_type, seed=options.seed + layer.index,
        reservoir_size=options.reservoir_size, extra_features=options.extra_features, keep_features=keep,
    )  # fmt: skip
    run = dict(held_out_batches=rule, forward=forward, stop_early=stop_early, progress=progress)
    swapped: list[SinkhornLayer] = []
    try:
        if options.mode == "teacher":
            calibrations = [new(layer) for layer in selected]
            counts = collect(model, data, calibrations, **run)
            fitted = [fit_layer(calib, options) for calib in calibrations]
            for fit in fitted:
                swap_in(model, fit.calib.layer, fit.operator)
                swapped.append(fit.calib.layer)
        else:
            fitted, counts = [], None
            for layer in selected:  # layers below `layer` already run ASAP when it is calibrated
                calib = new(layer)
                seen = collect(model, data, [calib], **run)
                counts = counts or seen
                fit = fit_layer(calib, options)
                swap_in(model, layer, fit.operator)
                swapped.append(layer)
                fitted.append(fit)
        report_layers = [_layer_report(fit, options, timer=timer) for fit in fitted]
    except BaseException:
        for layer in swapped:
            swap_in(model, layer, layer.operator)
        raise
    report = {
        "options": options.to_dict(),
        "calibration": dict(counts),
        "layers": report_layers,
    }
    if options.target_tv is not None:
        report["selection"] = [fit.selection["line"] for fit in fitted]
    return report


def _layer_report(fit: LayerFit, options: CompileOptions, *, timer: OperatorTimer | None = None) -> dict[str, Any]:
    calib, coef, info, operator = fit.calib, fit.coef, fit.info, fit.operator
    dual_map = operator.dual_map
    entry = {
        "index": calib.layer.index,
        "name": calib.layer.name,
        "n_iters": calib.n_iters,
        "eps": calib.eps,
        "scale": calib.scale,
        "num_heads": calib.num_heads,
        "head_dim": calib.head_dim,
        "seed": calib.seed,
        "sequences": dict(calib.sequences),
        "tokens": {"fit": int(calib.fit.count[0]), "held_out": int(calib.held_out.count[0])},
        "map": {"kind": dual_map.kind, "options": dual_map.map_options},
        "extra_steps": operator.extra_steps,
        **layer_fidelity(calib, coef, truncated_iters=options.truncated_iters, predict=fit.predict, r2=fit.r2,
                         extra_steps=operator.extra_steps),  # fmt: skip
    }
    if timer is not None:  # the benchmarks' timer, handed in from above: this stage times nothing itself
        with torch.no_grad():
            entry["time_ms"] = dict(timer(*layer_operators(calib, copy.deepcopy(operator),
                                                           truncated_iters=options.truncated_iters)))  # fmt: skip
    if len(calib.layer.names) > 1:
        entry["aliases"] = list(calib.layer.names)
    if info:
        entry["refine" if dual_map.kind == "linear" else "map_fit"] = info
    if fit.selection is not None:
        entry["selection"] = fit.selection
    return entry


def compile_model(
    model: nn.Module,
    calibration_batches: Iterable[Any],
    options: CompileOptions | None = None,
    *,
    progress: Any = None,
    timer: OperatorTimer | None = None,
    **fields: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Compile the Sinkhorn layers of a trained model to ASAP without retraining; the model is not modified.

    Args:
        model: any module containing :class:`~asap.attention.SinkhornOperator` s
            (odd ``n_iters >= 3``); it is not modified.
        calibration_batches: unlabelled inputs, iterated once per pass: dicts of
            keyword inputs (filtered by ``model.input_names`` when present),
            tensors or tuples of positional inputs (a list, a ``DataLoader``).
        options: a :class:`CompileOptions` (default: its defaults), ``fields`` replacing some of them
            (``compile_model(m, data, num_slices=64, refine="kl")``): ``layers`` (indices among the
            model's Sinkhorn layers, ``None``: all; the others stay Sinkhorn, the frozen-layer
            experiment), the features, the fit and the dual map (``map_kind``, ``map_options``,
            ``map_steps``, ``map_lr``; ``target_tv`` chooses it per layer).
        progress: optional ``tqdm``-like callable wrapping each calibration pass.
        timer: optional operator timer (:func:`asap.bench.measure.time_operators_ms`): adds each layer's
            ``time_ms`` to the report (this stage times nothing itself).

    Returns:
        ``(compiled, report)``: a deep copy of ``model`` with ASAP operators in
        the selected layers (eval mode), and a JSON-ready report with the
        options, calibration sizes and per-layer, per-head fidelity figures.

    :func:`asap.compile.module.compile_module` is the same pipeline for any
    model, in place, with a custom forward and selection by name.
    """
    options = CompileOptions.build(options, **fields)
    if batch_count(calibration_batches) == 0:
        raise ValueError("calibration needs at least one batch")
    compiled = copy.deepcopy(model).eval()
    selected = select_layers(compiled, options.layers)
    report = compile_selected(compiled, calibration_batches, selected, options, progress=progress, timer=timer)
    report["num_sinkhorn_layers"] = len(sinkhorn_layers(model))
    return compiled.eval(), report


def truncate_sinkhorn(model: nn.Module, *, n_iters: int, layers: Iterable[int] | None = None) -> nn.Module:
    """A copy of ``model`` whose selected Sinkhorn layers run ``n_iters`` half-steps (the same-cost baseline)."""
    truncated = copy.deepcopy(model).eval()
    found = sinkhorn_layers(truncated)
    chosen = range(len(found)) if layers is None else layers
    for i in chosen:
        teacher = found[i].operator
        operator = SinkhornOperator(n_iters=n_iters, eps=teacher.eps, grad_mode=teacher.grad_mode, scale=teacher.scale)
        swap_in(truncated, found[i], operator)
    return truncated
