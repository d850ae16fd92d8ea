"""Calibration: run the frozen model and accumulate, per Sinkhorn layer, what the fit needs.

A forward *pre*-hook on every selected :class:`~asap.attention.SinkhornOperator`
sees the ``q, k`` (``b h n d``) and boolean mask it is called with. From them
the hook computes, outside autograd and in the reduction dtype,

* the teacher's closure target ``f_{K-2} (b, h, n)`` (docs/method.md sec. 4.1),
* the features ``phi (b, h, L, n)``: the slice potentials on the layer's fixed
  directions (and any extra per-token features, :mod:`asap.compile.maps`),

and adds them to the layer's :class:`~asap.compile.fit.NormalEquations`: the
fit batches to one set, the held-out batches to another (for an honest R^2).
Activations are not kept, except a bounded *reservoir*: the first
``reservoir_size`` sequences of the fit batches and as many of the held-out
batches, stored as ``(q, k, mask)`` on the CPU, which the KL refinement and
the attention-level fidelity figures need. Its memory is at most
``2 * reservoir_size * h * (n + m) * d`` floats per layer (e.g. 64 IMDb
sequences of 256 tokens, 4 heads of 32: 2 x 8 MB).

A nonlinear dual map (``"relu"``, ``"mlp"``) is not fitted from normal
equations: with ``keep_features=True`` the layer also keeps, for every
calibration batch, its per-token inputs and target ``(x (b, h, F, n),
t (b, h, n), valid (b, 1 or h, n))`` on the CPU (:attr:`LayerCalibration.stores`,
split fit / held out): ``(F + 1) h n`` floats per sequence, ``F = L + E``
(e.g. 512 sequences of 128 tokens, 12 heads, F = 18: 57 MB), a fraction of
the ``2 h n d`` of its ``q, k``.

Every call of a selected operator is observed (an operator shared by two
layers, or called twice by a recurrent model, is fitted on all of its calls).
The first input of a pass runs to the end; when every selected operator was
called there, later inputs are cut once each has been called as often as on
the first one (the rest of the network is not needed), which in
``sequential`` mode makes calibrating layer ``l`` cost only the forward of
layers ``0..l``. The cut is a private :class:`BaseException` that ``except
Exception`` in the user's code does not catch; the calls it cuts are never
observed, so the statistics do not depend on whether anything catches it, and
it never leaves :func:`collect`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from asap.attention.checks import validate_attention_inputs
from asap.attention.operators import SinkhornOperator, call_mask
from asap.attention.submodules import find_modules, get_module
from asap.compile.fit import NormalEquations
from asap.compile.maps import build_dual_map, num_features
from asap.compile.plans import as_4d_mask, check_closure_teacher, closure_target, scores_and_support

Batch = Mapping[str, Any] | Sequence[Any] | Tensor


#: Which Sinkhorn operators to compile: ``None`` (all); qualified names (of an operator, or of any module holding
#: some) and/or indices among the model's Sinkhorn operators; or a predicate ``(name, operator) -> bool``.
Selection = str | int | Iterable[str | int] | Callable[[str, SinkhornOperator], bool] | None


@dataclass
class SinkhornLayer:
    """A Sinkhorn operator inside a model: its position among them, its qualified name(s).

    ``names`` has every qualified name the operator object is registered under
    (``name`` first; several when one operator is shared by several layers).
    """

    index: int
    name: str
    operator: SinkhornOperator
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.names:
            self.names = (self.name,)


def sinkhorn_layers(model: nn.Module) -> list[SinkhornLayer]:
    """Every :class:`SinkhornOperator` of ``model``, in module registration order (the forward order of a stack)."""
    return [
        SinkhornLayer(i, found.name, found.module, found.aliases)
        for i, found in enumerate(find_modules(model, SinkhornOperator))
    ]


def _no_sinkhorn(model: nn.Module) -> ValueError:
    return ValueError(
        f"{type(model).__name__} has no Sinkhorn attention operator to compile (no submodule is an "
        "asap.attention.SinkhornOperator; build its attention with method='sinkhorn', e.g. "
        "asap.MultiheadAttention(..., method='sinkhorn'), or convert a transformers encoder with "
        "asap.integrations.transformers.convert(model, 'sinkhorn'))"
    )


def select_layers(model: nn.Module, layers: Selection) -> list[SinkhornLayer]:
    """The Sinkhorn layers to compile, in model order (see :data:`Selection`).

    A name selects the operator of that name, or every Sinkhorn operator inside
    the module of that name; an index counts among the model's Sinkhorn
    operators (0-based). Refused with one line: a model with no Sinkhorn
    operator, an unknown name or index, a name holding no Sinkhorn operator, a
    selection matching nothing, a teacher whose ``n_iters`` is not odd and >= 3.
    """
    found = sinkhorn_layers(model)
    if not found:
        raise _no_sinkhorn(model)
    listing = lambda: ", ".join(repr(layer.name) for layer in found[:8]) + (" ..." if len(found) > 8 else "")  # noqa: E731
    if layers is None:
        chosen = found
    elif callable(layers) and not isinstance(layers, (str, nn.Module)):
        chosen = [layer for layer in found if layers(layer.name, layer.operator)]
        if not chosen:
            raise ValueError(f"select: the predicate accepts none of the Sinkhorn operators ({listing()})")
    else:
        items = [layers] if isinstance(layers, (str, int)) else list(layers)
        picked: set[int] = set()
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (str, int)):
                raise TypeError(f"select: expected qualified names or indices, got {item!r:.80}")
            if isinstance(item, int):
                if not 0 <= item < len(found):
                    raise ValueError(
                        f"layers [{item}] out of range: the model has {len(found)} Sinkhorn layers (0..{len(found) - 1})"
                    )
                picked.add(item)
                continue
            try:
                get_module(model, item)
            except LookupError as err:
                raise ValueError(f"select: {err}; its Sinkhorn operators are {listing()}") from None
            inside = [layer.index for layer in found
                      if any(n == item or n.startswith(item + ".") or item == "" for n in layer.names)]  # fmt: skip
            if not inside:
                raise ValueError(f"select: {item!r} holds no Sinkhorn operator; the model's are {listing()}")
            picked.update(inside)
        if not picked:
            raise ValueError(f"layers [] select nothing: the model has {len(found)} Sinkhorn layers ({listing()})")
        chosen = [found[i] for i in sorted(picked)]
    for layer in chosen:
        check_closure_teacher(layer.operator.n_iters)
    return chosen


@dataclass
class Reservoir:
    """The first ``capacity`` sequences seen, as ``(q, k, mask)`` chunks on the CPU."""

    capacity: int
    chunks: list[tuple[Tensor, Tensor, Tensor | None]] = field(default_factory=list)
    size: int = 0

    def add(self, q: Tensor, k: Tensor, mask: Tensor | None) -> None:
        room = self.capacity - self.size
        if room <= 0:
            return
        take = min(room, q.shape[0])
        if mask is not None:
            mask = mask.expand(q.shape[0], *mask.shape[1:])[:take].cpu()
        self.chunks.append((q[:take].detach().cpu(), k[:take].detach().cpu(), mask))
        self.size += take


class LayerCalibration:
    """Accumulated calibration data of one Sinkhorn layer.

    The head count and size, and so the dual map (its slice directions
    ``(h, L, d)``), are known at the first call; directions are drawn with
    ``seed`` (the caller gives each layer its own). ``dual_map`` is the unfitted
    map whose ``features`` the fit is linear in.
    """

    def __init__(
        self, layer: SinkhornLayer, *, num_slices: int, slice_type: str, seed: int, reservoir_size: int,
        extra_features: tuple[str, ...] = (), keep_features: bool = False,
    ):  # fmt: skip
        self.layer = layer
        self.keep_features = keep_features
        #: With ``keep_features``: per split, the ``(x, target, valid)`` chunks of every calibration batch (CPU).
        self.stores: dict[str, list[tuple[Tensor, Tensor, Tensor | None]]] = {"fit": [], "held_out": []}
        self.n_iters, self.eps = layer.operator.n_iters, layer.operator.eps
        self.num_slices, self.slice_type, self.seed = num_slices, slice_type, seed
        self.extra_features = tuple(extra_features)
        self.dual_map = None
        self.device: torch.device | None = None  # where the layer was called (the fitted map goes there)
        self.num_heads = self.head_dim = None
        self.scale: float | None = None
        self.fit: NormalEquations | None = None
        self.held_out: NormalEquations | None = None
        self.fit_reservoir = Reservoir(reservoir_size)
        self.held_out_reservoir = Reservoir(reservoir_size)
        self.sequences = {"fit": 0, "held_out": 0}

    def _start(self, q: Tensor) -> None:
        self.num_heads, self.head_dim = q.shape[1], q.shape[-1]
        self.device = q.device
        self.scale = self.layer.operator.resolved_scale(q)
        self.dual_map = build_dual_map(
            num_heads=self.num_heads, head_dim=self.head_dim, num_slices=self.num_slices,
            slice_type=self.slice_type, seed=self.seed, extra_features=self.extra_features,
        ).to(q.device)  # fmt: skip
        self.fit = NormalEquations.zeros(self.num_heads, num_features(self.dual_map))
        self.held_out = NormalEquations.zeros(self.num_heads, num_features(self.dual_map))

    def features(self, q: Tensor, k: Tensor, attn_mask: Tensor | None) -> Tensor:
        """``phi (b, h, F, n)`` of the layer's dual map, on the device of ``q``."""
        return self.dual_map.to(q.device).features(q, k, scale=self.scale, attn_mask=attn_mask)

    @torch.no_grad()
    def observe(self, q: Tensor, k: Tensor, attn_mask: Tensor | None, *, held_out: bool) -> None:
        """Add one call of the operator: ``q (b, h, n, d)``, ``k (b, h, m, d)``, bool mask or None."""
        if self.dual_map is None:
            self._start(q)
        elif q.shape[1] != self.num_heads or q.shape[-1] != self.head_dim:
            raise ValueError(
                f"layer {self.layer.name}: called with {q.shape[1]} heads of size {q.shape[-1]}, "
                f"earlier with {self.num_heads} of size {self.head_dim}"
            )
        mask = as_4d_mask(attn_mask)
        scores, supp = scores_and_support(q, k, scale=self.scale, attn_mask=mask)
        target = closure_target(scores, supp, n_iters=self.n_iters, eps=self.eps)
        phi = self.features(q, k, mask)
        split = "held_out" if held_out else "fit"
        (self.held_out if held_out else self.fit).add(phi, target, valid=supp.rows)
        (self.held_out_reservoir if held_out else self.fit_reservoir).add(q, k, mask)
        if self.keep_features:
            rows = None if supp.rows is None else supp.rows.expand(q.shape[0], *supp.rows.shape[1:]).cpu()
            self.stores[split].append((phi.detach().cpu(), target.detach().cpu(), rows))
        self.sequences[split] += q.shape[0]

    def check_seen(self) -> None:
        if self.dual_map is None:
            raise RuntimeError(f"layer {self.layer.name} was never called during calibration (is it used by forward?)")


class _StopCalibration(BaseException):
    """Cuts a calibration forward pass once its remaining calls are not needed (private; never leaves :func:`collect`).

    A :class:`BaseException`, like :class:`KeyboardInterrupt`: a user's forward
    or model that catches ``Exception`` lets it through. ``run`` is the
    :class:`_Pass` that raised it, so that :func:`collect` only ever catches its own.
    """

    def __init__(self, run: "_Pass"):
        super().__init__("calibration: the rest of this forward pass is not needed")
        self.run = run


def model_device(model: nn.Module) -> torch.device | None:
    """The device of ``model``'s first parameter (else first buffer); ``None`` for a module with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def to_device(item: Any, device: torch.device | None) -> Any:
    """``item`` with every tensor in it (inside mappings, lists and tuples, at any depth) moved to ``device``.

    A mapping becomes a ``dict``, except one with its own ``.to`` (a transformers
    ``BatchEncoding``), which moves itself; other objects are returned as they are.
    """
    if device is None:
        return item
    if isinstance(item, Tensor):
        return item.to(device)
    if isinstance(item, Mapping):
        if type(item) is not dict and callable(getattr(item, "to", None)):  # a BatchEncoding, a TensorDict: keep its type
            return item.to(device)
        return {key: to_device(value, device) for key, value in item.items()}
    if isinstance(item, tuple) and hasattr(item, "_fields"):  # a named tuple
        return type(item)(*(to_device(value, device) for value in item))
    if isinstance(item, (list, tuple)):
        return type(item)(to_device(value, device) for value in item)
    return item


def model_inputs(model: nn.Module, batch: Batch, device: torch.device | None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` to call ``model`` with, from a batch (its tensors moved to ``device`` unless None).

    A mapping is passed as keyword arguments, restricted to ``model.input_names``
    when the model declares them (so collated batches with ``labels`` work); a
    tuple/list are positional arguments; anything else (a tensor) is one
    positional argument.
    """
    if isinstance(batch, Mapping):
        names = getattr(model, "input_names", None)
        if names is not None:
            missing = [n for n in names if n not in batch]
            if missing:
                raise KeyError(f"calibration batch has no {missing} (keys: {sorted(batch)}); the model needs {list(names)}")
            batch = {n: batch[n] for n in names}
        return (), to_device(dict(batch), device)
    if isinstance(batch, (tuple, list)):
        return tuple(to_device(list(batch), device)), {}
    return (to_device(batch, device),), {}


def call_model(model: nn.Module, batch: Batch) -> Any:
    """The default calibration forward: ``model(**batch)`` / ``model(*batch)`` / ``model(batch)`` (see :func:`model_inputs`)."""
    args, kwargs = model_inputs(model, batch, None)
    return model(*args, **kwargs)


def num_held_out(num_batches: int, fraction: float) -> int:
    """How many trailing calibration batches are held out: ``round(fraction * N)``, at least 1 when N >= 2."""
    check_holdout_fraction(fraction)
    if num_batches < 2 or fraction == 0:
        return 0
    return min(num_batches - 1, max(1, round(fraction * num_batches)))


def check_holdout_fraction(fraction: float) -> float:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {fraction}")
    return fraction


def held_out_rule(num_batches: int | None, fraction: float) -> Callable[[int], bool]:
    """Which calibration batches (by position) are held out of the fit.

    When the number of batches ``N`` is known (a list, a ``DataLoader`` over a
    sized data set): the last :func:`num_held_out` ``(N, fraction)`` of them.
    When it is not (a generator, an iterable data set): batch ``i`` is held out
    when ``floor((i + 1) fraction) > floor(i fraction)``, a ``fraction`` of
    the batches spread evenly over the stream.
    """
    check_holdout_fraction(fraction)
    if num_batches is not None:
        first = num_batches - num_held_out(num_batches, fraction)
        return lambda i: i >= first
    return lambda i: math.floor((i + 1) * fraction) > math.floor(i * fraction)


def batch_count(batches: Iterable[Any]) -> int | None:
    """``len(batches)`` when it has one (a ``DataLoader`` over an iterable data set raises: None)."""
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


class _Pass:
    """The state of one calibration pass over the data: which calls to observe, when to cut a forward."""

    def __init__(self, calibrations: list[LayerCalibration], *, stop_early: bool):
        self.calibrations = calibrations
        self.stop_early = stop_early
        self.held_out = False
        self.calls = [0] * len(calibrations)
        self.budget: list[int] | None = None  # the calls of each operator on the first input, once known
        self.cut = False

    def start_item(self, held_out: bool) -> None:
        self.held_out, self.calls, self.cut = held_out, [0] * len(self.calibrations), False

    def end_first_item(self) -> None:
        # Cut later forwards only if every selected operator was called on the first input (else the call
        # counts say nothing about where the forward could stop).
        if self.stop_early and all(self.calls):
            self.budget = list(self.calls)

    def hook(self, index: int):
        calib = self.calibrations[index]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.cut:  # the cut was caught (by a bare except) and the model called again: observe nothing
                raise _StopCalibration(self)
            q, k, v = args[:3] if len(args) >= 3 else (kwargs.get("q"), kwargs.get("k"), kwargs.get("v"))
            mask = validate_attention_inputs(q, k, v, attn_mask=call_mask(kwargs), method="sinkhorn")
            calib.observe(q, k, mask, held_out=self.held_out)
            self.calls[index] += 1
            if self.budget is not None and all(c >= b for c, b in zip(self.calls, self.budget)):
                self.cut = True
                raise _StopCalibration(self)

        return hook


@torch.no_grad()
def collect(
    model: nn.Module,
    batches: Iterable[Any],
    calibrations: list[LayerCalibration],
    *,
    held_out_batches: int | Callable[[int], bool] = 0,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    stop_early: bool = True,
    progress: Any = None,
) -> dict[str, int]:
    """Run ``model`` (eval mode, no autograd) over ``batches`` once; feed every call of the selected operators to its calibration.

    Args:
        batches: any iterable of inputs (a list, a ``DataLoader``, a generator);
            each one's tensors are moved to the model's device (:func:`model_device`).
        held_out_batches: the number of trailing batches held out of the fit
            (needs ``len(batches)``), or a rule ``i -> bool`` (:func:`held_out_rule`).
        forward: ``forward(model, batch)`` runs the model on one batch; default
            :func:`call_model`. Its return value is ignored.
        stop_early: cut forwards once the selected operators have been called as
            often as on the first batch (see the module docstring); ``False`` runs
            every forward to the end (a model whose call count depends on the input).
        progress: optional ``tqdm``-like callable wrapping the batch iterator.

    Returns ``{"batches": N, "held_out_batches": H}``. An exception raised by
    the model or by ``forward`` propagates unchanged; the hooks are removed and
    the model's training mode restored whatever happens.
    """
    rule = held_out_batches
    if not callable(rule):
        total = batch_count(batches)
        if total is None:
            raise TypeError("collect: held_out_batches as a count needs batches with a len(); pass a rule i -> bool")
        first = total - int(rule)
        rule = lambda i: i >= first  # noqa: E731
    forward = call_model if forward is None else forward
    device = model_device(model)
    run = _Pass(calibrations, stop_early=stop_early)
    handles = []
    counts = {"batches": 0, "held_out_batches": 0}
    was_training = model.training
    model.eval()
    try:
        for index, calib in enumerate(calibrations):
            handles.append(calib.layer.operator.register_forward_pre_hook(run.hook(index), with_kwargs=True))
        iterator: Any = enumerate(batches)
        if progress is not None:
            iterator = progress(iterator, total=batch_count(batches))
        for i, batch in iterator:
            held = bool(rule(i))
            run.start_item(held)
            try:
                forward(model, to_device(batch, device))
            except _StopCalibration as stop:
                if stop.run is not run:  # another (nested) calibration's: not ours to catch
                    raise
            if i == 0:
                run.end_first_item()
            counts["batches"] += 1
            counts["held_out_batches"] += held
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if counts["batches"] == 0:
        raise ValueError("calibration needs at least one batch (the data gave none)")
    for calib in calibrations:
        calib.check_seen()
    return counts
