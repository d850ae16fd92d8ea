"""``compile_model``: calibrate, fit and swap every Sinkhorn operator of a model for its ASAP operator.

The compiled model is a copy of the teacher in which each selected
:class:`~asap.attention.SinkhornOperator` is replaced by an
:class:`~asap.attention.AsapOperator` with the same ``eps`` and ``scale``,
carrying a fitted :class:`~asap.attention.SliceDualMap`. Every other weight is
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
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn

from asap.attention.dual_map import SLICE_TYPES
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
from asap.compile.fit import kl_problems, refine_kl, solve_ridge
from asap.compile.maps import DEFAULT_EXTRA_FEATURES, EXTRA_FEATURES, set_coefficients
from asap.compile.report import layer_fidelity

MODES = ("teacher", "sequential")
REFINE = ("none", "kl")


@dataclass(frozen=True)
class CompileOptions:
    """The options of :func:`compile_model` (stored in the artifact's manifest).

    ``num_slices`` L and ``slice_type`` ("random" | "axis") choose the
    features, ``extra_features`` cheap per-token features appended to them (see
    :mod:`asap.compile.maps`; ``()`` gives the plain linear slice map); ``seed``
    draws random directions (layer ``l`` uses ``seed + l``,
    so layers do not share directions); ``ridge`` is relative to the Gram trace;
    ``refine="kl"`` adds the KL stage (``refine_iters`` L-BFGS iterations);
    ``holdout_fraction`` of the calibration batches (the last ones) is held out
    for the fidelity figures and to accept or reject the refinement;
    ``reservoir_size`` caps the sequences kept per layer and split for the
    refinement and the attention-level figures; ``truncated_iters`` is the
    same-cost Sinkhorn baseline of the report.
    """

    num_slices: int = 16
    slice_type: str = "random"
    extra_features: tuple[str, ...] = DEFAULT_EXTRA_FEATURES
    seed: int = 0
    ridge: float = 1e-3
    refine: str = "none"
    refine_iters: int = 30
    mode: str = "teacher"
    layers: tuple[int, ...] | None = None
    holdout_fraction: float = 0.25
    reservoir_size: int = 64
    truncated_iters: int = 3

    def __post_init__(self) -> None:
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
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.reservoir_size < 1 or self.refine_iters < 1:
            raise ValueError("reservoir_size and refine_iters must be >= 1")
        if self.truncated_iters < 1 or self.truncated_iters % 2 == 0:
            raise ValueError(f"truncated_iters must be odd and >= 1, got {self.truncated_iters}")

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
        prepare = lambda chunks: kl_problems(  # noqa: E731
            chunks, calib.features, scale=calib.scale, n_iters=calib.n_iters, eps=calib.eps
        )
        coef, info = refine_kl(
            coef.float(), prepare(calib.fit_reservoir.chunks), prepare(calib.held_out_reservoir.chunks),
            eps=calib.eps, max_iter=options.refine_iters,
        )  # fmt: skip
    return coef.float(), info


def asap_operator_for(calib: LayerCalibration, coef: Tensor) -> AsapOperator:
    """The ASAP operator replacing ``calib``'s Sinkhorn layer: same eps and scale, fitted dual map.

    Its tensors (the dual map's) are on the device the layer was called on during
    calibration; it takes the teacher operator's training flag.
    """
    teacher = calib.layer.operator
    dual_map = copy.deepcopy(calib.dual_map)
    set_coefficients(dual_map, coef)
    operator = AsapOperator(
        num_heads=calib.num_heads, head_dim=calib.head_dim, eps=teacher.eps, scale=teacher.scale, dual_map=dual_map
    )
    return operator.train(teacher.training)


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
) -> dict[str, Any]:
    """Calibrate, fit and swap the ``selected`` Sinkhorn layers of ``model`` IN PLACE; return the report.

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
    new = lambda layer: LayerCalibration(  # noqa: E731
        layer, num_slices=options.num_slices, slice_type=options.slice_type, seed=options.seed + layer.index,
        reservoir_size=options.reservoir_size, extra_features=options.extra_features,
    )  # fmt: skip
    run = dict(held_out_batches=rule, forward=forward, stop_early=stop_early, progress=progress)
    swapped: list[SinkhornLayer] = []
    try:
        if options.mode == "teacher":
            calibrations = [new(layer) for layer in selected]
            counts = collect(model, data, calibrations, **run)
            fitted = [(calib, *fit_coefficients(calib, options)) for calib in calibrations]
            for calib, coef, _ in fitted:
                swap_in(model, calib.layer, asap_operator_for(calib, coef))
                swapped.append(calib.layer)
        else:
            fitted, counts = [], None
            for layer in selected:  # layers below `layer` already run ASAP when it is calibrated
                calib = new(layer)
                seen = collect(model, data, [calib], **run)
                counts = counts or seen
                coef, info = fit_coefficients(calib, options)
                swap_in(model, layer, asap_operator_for(calib, coef))
                swapped.append(layer)
                fitted.append((calib, coef, info))
        report_layers = [_layer_report(calib, coef, info, options) for calib, coef, info in fitted]
    except BaseException:
        for layer in swapped:
            swap_in(model, layer, layer.operator)
        raise
    return {
        "options": options.to_dict(),
        "calibration": dict(counts),
        "layers": report_layers,
    }


def _layer_report(calib: LayerCalibration, coef: Tensor, info: dict[str, Any], options: CompileOptions) -> dict[str, Any]:
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
        **layer_fidelity(calib, coef, truncated_iters=options.truncated_iters,
                         asap_operator=asap_operator_for(calib, coef)),  # fmt: skip
    }
    if len(calib.layer.names) > 1:
        entry["aliases"] = list(calib.layer.names)
    if info:
        entry["refine"] = info
    return entry


def compile_model(
    model: nn.Module,
    calibration_batches: Iterable[Any],
    *,
    num_slices: int = 16,
    slice_type: str = "random",
    extra_features: tuple[str, ...] = DEFAULT_EXTRA_FEATURES,
    seed: int = 0,
    ridge: float = 1e-3,
    refine: str = "none",
    mode: str = "teacher",
    layers: Iterable[int] | None = None,
    holdout_fraction: float = 0.25,
    reservoir_size: int = 64,
    refine_iters: int = 30,
    truncated_iters: int = 3,
    progress: Any = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Compile the Sinkhorn layers of a trained model to ASAP without retraining; the model is not modified.

    Args:
        model: any module containing :class:`~asap.attention.SinkhornOperator` s
            (odd ``n_iters >= 3``); it is not modified.
        calibration_batches: unlabelled inputs, iterated once per pass: dicts of
            keyword inputs (filtered by ``model.input_names`` when present),
            tensors or tuples of positional inputs (a list, a ``DataLoader``).
        layers: indices among the model's Sinkhorn layers to compile (``None``:
            all); the others stay Sinkhorn (the frozen-layer experiment).
        other options: see :class:`CompileOptions`.
        progress: optional ``tqdm``-like callable wrapping each calibration pass.

    Returns:
        ``(compiled, report)``: a deep copy of ``model`` with ASAP operators in
        the selected layers (eval mode), and a JSON-ready report with the
        options, calibration sizes and per-layer, per-head fidelity figures.

    :func:`asap.compile.module.compile_module` is the same pipeline for any
    model, in place, with a custom forward and selection by name.
    """
    options = CompileOptions(
        num_slices=num_slices, slice_type=slice_type, extra_features=tuple(extra_features), seed=seed, ridge=ridge,
        refine=refine,
        refine_iters=refine_iters, mode=mode, layers=None if layers is None else tuple(sorted(set(layers))),
        holdout_fraction=holdout_fraction, reservoir_size=reservoir_size, truncated_iters=truncated_iters,
    )  # fmt: skip
    if batch_count(calibration_batches) == 0:
        raise ValueError("calibration needs at least one batch")
    compiled = copy.deepcopy(model).eval()
    selected = select_layers(compiled, options.layers)
    report = compile_selected(compiled, calibration_batches, selected, options, progress=progress)
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
