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

Once every selected layer has been seen, the hook stops the forward pass
(the rest of the network is not needed), which in ``sequential`` mode makes
calibrating layer ``l`` cost only the forward of layers ``0..l``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from asap.attention.checks import validate_attention_inputs
from asap.attention.operators import SinkhornOperator, call_mask
from asap.compile.fit import NormalEquations
from asap.compile.maps import build_dual_map, num_features
from asap.compile.plans import as_4d_mask, check_closure_teacher, closure_target, scores_and_support

Batch = Mapping[str, Any] | Sequence[Any] | Tensor


@dataclass
class SinkhornLayer:
    """A Sinkhorn operator inside a model: its position among them, its name, and where it hangs."""

    index: int
    name: str
    operator: SinkhornOperator
    parent: nn.Module
    attr: str


def sinkhorn_layers(model: nn.Module) -> list[SinkhornLayer]:
    """Every :class:`SinkhornOperator` of ``model``, in module registration order (the forward order of a stack)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, SinkhornOperator):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            found.append(SinkhornLayer(len(found), name, module, parent, attr))
    return found


def select_layers(model: nn.Module, layers: Iterable[int] | None) -> list[SinkhornLayer]:
    """The Sinkhorn layers to compile: all of them, or the given indices (0-based, among Sinkhorn layers)."""
    found = sinkhorn_layers(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no Sinkhorn attention operator to compile")
    chosen = range(len(found)) if layers is None else sorted(set(int(i) for i in layers))
    bad = [i for i in chosen if not 0 <= i < len(found)]
    if bad or not chosen:
        raise ValueError(
            f"layers {bad or '[]'} out of range: the model has {len(found)} Sinkhorn layers (0..{len(found) - 1})"
        )
    for i in chosen:
        check_closure_teacher(found[i].operator.n_iters)
    return [found[i] for i in chosen]


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
        extra_features: tuple[str, ...] = (),
    ):  # fmt: skip
        self.layer = layer
        self.n_iters, self.eps = layer.operator.n_iters, layer.operator.eps
        self.num_slices, self.slice_type, self.seed = num_slices, slice_type, seed
        self.extra_features = tuple(extra_features)
        self.dual_map = None
        self.num_heads = self.head_dim = None
        self.scale: float | None = None
        self.fit: NormalEquations | None = None
        self.held_out: NormalEquations | None = None
        self.fit_reservoir = Reservoir(reservoir_size)
        self.held_out_reservoir = Reservoir(reservoir_size)
        self.sequences = {"fit": 0, "held_out": 0}

    def _start(self, q: Tensor) -> None:
        self.num_heads, self.head_dim = q.shape[1], q.shape[-1]
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
        self.sequences[split] += q.shape[0]

    def check_seen(self) -> None:
        if self.dual_map is None:
            raise RuntimeError(f"layer {self.layer.name} was never called during calibration (is it used by forward?)")


class _StopForward(Exception):
    """Raised by the last hook: the rest of the forward pass is not needed for calibration."""


def model_inputs(model: nn.Module, batch: Batch, device: torch.device) -> tuple[tuple, dict]:
    """``(args, kwargs)`` to call ``model`` with, from a batch on ``device``.

    A mapping is passed as keyword arguments, restricted to ``model.input_names``
    when the model declares them (so collated batches with ``labels`` work); a
    tensor is one positional argument; a tuple/list are positional arguments.
    """
    move = lambda t: t.to(device) if isinstance(t, Tensor) else t  # noqa: E731
    if isinstance(batch, Mapping):
        names = getattr(model, "input_names", None)
        if names is not None:
            missing = [n for n in names if n not in batch]
            if missing:
                raise KeyError(f"calibration batch has no {missing} (keys: {sorted(batch)}); the model needs {list(names)}")
            batch = {n: batch[n] for n in names}
        return (), {key: move(value) for key, value in batch.items()}
    if isinstance(batch, Tensor):
        return (move(batch),), {}
    return tuple(move(t) for t in batch), {}


def num_held_out(num_batches: int, fraction: float) -> int:
    """How many trailing calibration batches are held out: ``round(fraction * N)``, at least 1 when N >= 2."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {fraction}")
    if num_batches < 2 or fraction == 0:
        return 0
    return min(num_batches - 1, max(1, round(fraction * num_batches)))


@torch.no_grad()
def collect(
    model: nn.Module,
    batches: Sequence[Batch],
    calibrations: list[LayerCalibration],
    *,
    held_out_batches: int,
    progress: Any = None,
) -> None:
    """Run ``model`` (eval mode) over ``batches`` and feed every selected layer's calls to its calibration.

    The last ``held_out_batches`` batches go to the held-out statistics.
    ``progress`` is an optional callable wrapping the batch iterator (e.g. ``tqdm``).
    """
    if not batches:
        raise ValueError("calibration needs at least one batch")
    device = next(model.parameters()).device
    state: dict[str, Any] = {"held_out": False, "seen": set()}
    handles = []

    def make_hook(calib: LayerCalibration):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            q, k, v = args[:3] if len(args) >= 3 else (kwargs.get("q"), kwargs.get("k"), kwargs.get("v"))
            mask = validate_attention_inputs(q, k, v, attn_mask=call_mask(kwargs), method="sinkhorn")
            calib.observe(q, k, mask, held_out=state["held_out"])
            state["seen"].add(calib.layer.index)
            if len(state["seen"]) == len(calibrations):
                raise _StopForward

        return hook

    was_training = model.training
    model.eval()
    try:
        for calib in calibrations:
            handles.append(calib.layer.operator.register_forward_pre_hook(make_hook(calib), with_kwargs=True))
        iterator = enumerate(batches)
        if progress is not None:
            iterator = progress(iterator, total=len(batches))
        for i, batch in iterator:
            state["held_out"] = i >= len(batches) - held_out_batches
            state["seen"] = set()
            args, kwargs = model_inputs(model, batch, device)
            try:
                model(*args, **kwargs)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for calib in calibrations:
        calib.check_seen()
