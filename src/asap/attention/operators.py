"""Attention normalisers as swappable modules: the one switch of the library.

An operator takes already-projected ``q, k, v`` (``b h n d``) and a boolean
mask and returns ``(b, h, n, dv)``. :class:`~asap.attention.module.MultiheadAttention`
owns the projections and one operator; changing the normalisation (or
compiling a trained Sinkhorn layer to ASAP) replaces only the operator.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from asap.attention import native
from asap.attention.checks import check_int, check_positive, validate_attention_inputs, validate_padding_mask
from asap.attention.dual_map import SLICE_TYPES, DualMap, SliceDualMap, build_dual_map, make_directions
from asap.attention.esp import DEFAULT_MEMORY_BUDGET, check_esp_options, esp_attention
from asap.attention.functional import asap_attention, sinkhorn_attention, softmax_attention
from asap.attention.options import AsapOptions, EspConventions, Normalize, SinkhornOptions, SoftmaxOptions
from asap.transport.ctransform import DEFAULT_TILE_BYTES
from asap.transport.masks import key_padding_to_attn_mask
from asap.transport.sliced_plans import SliceCost


class AttentionOperator(nn.Module):
    """Base class: ``forward(q, k, v, *, attn_mask=None) -> (b, h, n, dv)``.

    Operators with ``takes_padding_mask = True`` also accept
    ``forward(..., padding_mask=(b, n))`` (True = real token, self-attention),
    which :class:`~asap.attention.module.MultiheadAttention` passes instead of a
    ``(b, 1, n, n)`` mask so that padding costs ``O(b n)`` memory.
    """

    method: ClassVar[str]
    takes_padding_mask: ClassVar[bool] = False

    def __init__(self, *, scale: float | None = None):
        super().__init__()
        # Checked here, at construction, like every other option (not first at forward time).
        self.scale = None if scale is None else check_positive(f"{self.method}: scale", scale)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def resolved_scale(self, q: Tensor) -> float:
        return q.shape[-1] ** -0.5 if self.scale is None else self.scale


class SoftmaxOperator(AttentionOperator):
    method = "softmax"
    takes_padding_mask = True

    @property
    def options(self) -> SoftmaxOptions:
        return SoftmaxOptions(scale=self.scale)

    def forward(self, q, k, v, *, attn_mask=None, padding_mask=None):
        return softmax_attention(q, k, v, attn_mask=attn_mask, padding_mask=padding_mask, scale=self.scale)


class SinkhornOperator(AttentionOperator):
    """The teacher: ``n_iters`` Sinkhorn half-steps at regularisation ``eps``."""

    method = "sinkhorn"
    takes_padding_mask = True

    def __init__(self, *, n_iters: int = 3, eps: float = 1.0, grad_mode: str = "unroll", scale: float | None = None):
        super().__init__(scale=scale)
        opts = SinkhornOptions(n_iters=n_iters, eps=eps, grad_mode=grad_mode, scale=scale)
        self.n_iters, self.eps, self.grad_mode = opts.n_iters, opts.eps, opts.grad_mode

    @property
    def options(self) -> SinkhornOptions:
        return SinkhornOptions(n_iters=self.n_iters, eps=self.eps, grad_mode=self.grad_mode, scale=self.scale)

    def extra_repr(self) -> str:
        return f"n_iters={self.n_iters}, eps={self.eps}, grad_mode={self.grad_mode!r}"

    def forward(self, q, k, v, *, attn_mask=None, padding_mask=None):
        return sinkhorn_attention(
            q, k, v, n_iters=self.n_iters, eps=self.eps, scale=self.scale, attn_mask=attn_mask,
            padding_mask=padding_mask, grad_mode=self.grad_mode,
        )  # fmt: skip


class AsapOperator(AttentionOperator):
    """The compiled operator: a fitted dual map plus the two-sided c-transform.

    Options: ``eps`` and ``scale`` (the teacher's), the dual map (``num_slices``,
    ``slice_type``, ``seed``, ``extra_features``, ``map_kind`` with its
    ``map_options``, e.g. ``map_kind="relu", map_options={"depth": 3}``; see
    :mod:`asap.attention.dual_map`; an option the kind does not take is
    refused), ``extra_steps`` (Sinkhorn half-steps after the closure, a warm
    start) and ``backend`` (see :func:`~asap.attention.functional.asap_attention`).
    A given ``dual_map`` module replaces the one these options would build (a
    :class:`~asap.attention.dual_map.DualMap` then supplies the map options).
    """

    method = "asap"
    takes_padding_mask = True

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        eps: float = 1.0,
        num_slices: int = 16,
        slice_type: str = "random",
        seed: int = 0,
        extra_features: tuple[str, ...] | list[str] = (),
        map_kind: str = "linear",
        map_options: Mapping[str, Any] | None = None,
        extra_steps: int = 0,
        backend: str = "auto",
        tile_bytes: int = DEFAULT_TILE_BYTES,
        scale: float | None = None,
        dual_map: nn.Module | None = None,
    ):
        super().__init__(scale=scale)
        if isinstance(dual_map, DualMap):  # the given map's own shape is what the options record
            num_slices, slice_type, extra_features = dual_map.num_slices, dual_map.slice_type, dual_map.extra_features
            seed, map_kind = int(dual_map.seed), dual_map.kind  # construction only: not a forward-time sync
            map_options = dual_map.map_options
        opts = AsapOptions(eps=eps, num_slices=num_slices, slice_type=slice_type, seed=seed,
                           extra_features=tuple(extra_features), map_kind=map_kind, extra_steps=extra_steps,
                           backend=backend, tile_bytes=tile_bytes, scale=scale,
                           map_options=dict(map_options or {}))  # fmt: skip
        self.eps, self.tile_bytes, self.extra_steps, self.backend = opts.eps, opts.tile_bytes, opts.extra_steps, opts.backend
        self._map_options = {key: getattr(opts, key) for key in ("num_slices", "slice_type", "seed", "extra_features",
                                                                "map_kind", "map_options")}  # fmt: skip
        self.dual_map = dual_map or build_dual_map(
            num_heads=check_int("asap: num_heads", num_heads, minimum=1),
            head_dim=check_int("asap: head_dim", head_dim, minimum=1),
            num_slices=opts.num_slices,
            slice_type=opts.slice_type,
            seed=opts.seed,
            extra_features=opts.extra_features,
            kind=opts.map_kind,
            map_options=opts.map_options,
        )
        self._checked_fitted = False

    @property
    def options(self) -> AsapOptions:
        """Everything that rebuilds this operator (the fitted coefficients are in the state dict)."""
        return AsapOptions(eps=self.eps, extra_steps=self.extra_steps, backend=self.backend,
                           tile_bytes=self.tile_bytes, scale=self.scale, **self._map_options)  # fmt: skip

    def extra_repr(self) -> str:
        return f"eps={self.eps}, extra_steps={self.extra_steps}, backend={self.backend!r}"

    def forward(self, q, k, v, *, attn_mask=None, padding_mask=None):
        if not self._checked_fitted:
            # Checked once (reading the flag is a host sync). A zero map is a valid operator
            # (one column step then a row step), but almost certainly not what was meant.
            self._checked_fitted = True
            if not bool(getattr(self.dual_map, "fitted", True)):
                warnings.warn("ASAP operator used before its dual map was fitted (run `asap compile`)", stacklevel=2)
        scale = self.resolved_scale(q)
        if attn_mask is None and not self.extra_steps and self.backend in ("auto", "native"):
            out = self._forward_native(q, k, v, scale=scale, padding_mask=padding_mask)
            if out is not None:
                return out
        if not isinstance(self.dual_map, DualMap):  # a user's map: the documented (q, k, scale, attn_mask) call
            mask = attn_mask if padding_mask is None else key_padding_to_attn_mask(padding_mask)
            f_hat = self.dual_map(q, k, scale=scale, attn_mask=mask)
        elif padding_mask is not None:
            # A constant per (b, h) in f_hat cancels in the closure: the map skips its centring.
            f_hat = self.dual_map(q, k, scale=scale, padding_mask=padding_mask, center=False)
        else:
            f_hat = self.dual_map(q, k, scale=scale, attn_mask=attn_mask, center=attn_mask is not None)
        return asap_attention(
            q, k, v, f_hat, eps=self.eps, scale=scale, attn_mask=attn_mask, padding_mask=padding_mask,
            extra_steps=self.extra_steps, backend=self.backend, tile_bytes=self.tile_bytes,
        )  # fmt: skip

    def _forward_native(self, q, k, v, *, scale: float, padding_mask) -> Tensor | None:
        """The linear dual map and the closure in one native call (CPU inference, self-attention).

        Taken where it is the measured choice (:func:`asap.attention.native.fused_worth_it`: rows up to
        128 tokens, padded rows up to 1024), or always with ``backend="native"``. None when this call
        cannot take it (another map kind, longer rows, autograd, no native build, ...): the caller then runs the map and
        :func:`asap_attention` as usual. ``lse_keys`` is formed by the kernel from the closure's scores;
        ``lse_landmarks`` (a matrix product the kernel does not take) runs as the map (the kernel, then the
        extra) and the native closure from its ``f_hat``.
        """
        dual_map = self.dual_map
        n = q.shape[-2]
        if not isinstance(dual_map, SliceDualMap) or not dual_map.use_native:
            return None
        if not native.fused_worth_it(n, padded=padding_mask is not None) and self.backend != "native":
            return None
        if native.supports(q, k, v) is not None:
            return None
        validate_attention_inputs(q, k, v, attn_mask=None, is_causal=False, method="asap")
        padding = validate_padding_mask(padding_mask, q, k, attn_mask=None, method="asap")
        dual_map._check_shape(q)
        arguments = dual_map.native_arguments()
        if arguments is None:  # lse_landmarks: the map adds it after its kernel, the closure takes its f_hat
            arguments = {"f_hat": dual_map(q, k, scale=scale, padding_mask=padding, center=False)}
        out = native.asap_forward_native(q, k, v, scale=scale, eps=self.eps, valid=padding, center=False, **arguments)
        return out if out.dtype == v.dtype else out.to(v.dtype)


class EspOperator(AttentionOperator):
    """ESP attention as a swappable operator (the maths and options: :func:`~asap.attention.esp.esp_attention`).

    Slice directions: by default the ``head_dim`` coordinate axes (``L = d``,
    ESPFormer's choice, no projection needed). ``num_slices`` and/or
    ``slice_type="random"`` draw ``(h, L, d)`` directions with
    :func:`asap.attention.dual_map.make_directions` from ``seed`` (stored as a
    buffer, so they travel with the state dict); ``directions`` gives them
    explicitly (``(L, d)`` or ``(h, L, d)``).
    """

    method = "esp"
    takes_padding_mask = True

    def __init__(
        self,
        *,
        num_heads: int | None = None,
        head_dim: int | None = None,
        num_slices: int | None = None,
        slice_type: str = "axis",
        seed: int = 0,
        directions: Tensor | None = None,
        soft: bool = True,
        tau_sort: float = 1e-3,
        tau: float = 1.0,
        cost: SliceCost | None = None,
        normalize: Normalize | None = None,
        published: bool = False,
        memory_budget_bytes: int | None = DEFAULT_MEMORY_BUDGET,
        scale: float | None = None,
    ):
        super().__init__(scale=scale)
        check_esp_options(tau_sort=tau_sort, tau=tau, memory_budget_bytes=memory_budget_bytes)
        EspConventions.resolve(cost=cost, normalize=normalize, published=published)  # fail at construction
        if slice_type not in SLICE_TYPES:
            raise ValueError(f"esp: slice_type must be one of {SLICE_TYPES}, got {slice_type!r}")
        if directions is None and (num_slices is not None or slice_type != "axis"):
            if num_heads is None or head_dim is None:
                raise ValueError("esp: drawing slice directions needs num_heads and head_dim")
            directions = make_directions(
                num_heads=num_heads, head_dim=head_dim, num_slices=num_slices or head_dim, slice_type=slice_type,
                seed=seed,
            )
        self.register_buffer("directions", directions, persistent=True)
        self.soft, self.tau_sort, self.tau = soft, tau_sort, tau
        self.cost, self.normalize, self.published = cost, normalize, published
        self.memory_budget_bytes = memory_budget_bytes

    def extra_repr(self) -> str:
        slices = "axis" if self.directions is None else f"L={self.directions.shape[-2]}"
        return (
            f"slices={slices}, soft={self.soft}, tau_sort={self.tau_sort}, tau={self.tau}, cost={self.cost!r}, "
            f"normalize={self.normalize!r}, published={self.published}"
        )

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None, padding_mask: Tensor | None = None
    ) -> Tensor:
        """Same mask rule as :func:`esp_attention`: ``padding_mask (b, n)`` as is, ``attn_mask`` checked to be key-padding."""
        return esp_attention(
            q, k, v, attn_mask=attn_mask, padding_mask=padding_mask, scale=self.scale, directions=self.directions,
            soft=self.soft, tau_sort=self.tau_sort, tau=self.tau, cost=self.cost, normalize=self.normalize,
            published=self.published, memory_budget_bytes=self.memory_budget_bytes,
        )


# --------------------------------------------------------------------------------------------------
# Reference: dense, per-sequence, in the input dtype. An oracle for tests (call it in fp64), written
# independently of asap.transport.sliced_plans: padded tokens are dropped rather than masked, plans are
# materialised, and the quantile coupling is built by the textbook north-west-corner walk.


def call_mask(kwargs: Mapping[str, Any]) -> Tensor | None:
    """The boolean ``attn_mask`` of an operator call's keyword arguments, whichever form the caller used.

    For hooks that capture what an operator receives: a ``padding_mask (b, n)``
    (what :class:`~asap.attention.module.MultiheadAttention` passes) becomes the
    equivalent ``(b, 1, n, n)`` mask, so no hook silently drops the padding.
    """
    padding = kwargs.get("padding_mask")
    if padding is not None:
        return key_padding_to_attn_mask(padding)
    return kwargs.get("attn_mask")


OPERATORS: dict[str, type[AttentionOperator]] = {
    "softmax": SoftmaxOperator,
    "sinkhorn": SinkhornOperator,
    "asap": AsapOperator,
    "esp": EspOperator,
}


def register_operator(cls: type[AttentionOperator]) -> type[AttentionOperator]:
    """Add an operator class to the switch under ``cls.method``."""
    OPERATORS[cls.method] = cls
    return cls


def build_operator(method: str, *, num_heads: int, head_dim: int, **options: Any) -> AttentionOperator:
    """Instantiate the operator for ``method`` with its own options; refuse options it does not take."""
    if method not in OPERATORS:
        raise ValueError(f"unknown attention method {method!r}; choose one of {sorted(OPERATORS)}")
    cls = OPERATORS[method]
    params = inspect.signature(cls.__init__).parameters
    accepted = {name for name, p in params.items() if p.kind == p.KEYWORD_ONLY}
    unknown = sorted(set(options) - accepted)
    if unknown:
        valid = sorted(accepted - {"num_heads", "head_dim"})
        raise TypeError(f"method {method!r} does not take option(s) {unknown}; its options are {valid}")
    shape = {key: val for key, val in (("num_heads", num_heads), ("head_dim", head_dim)) if key in accepted}
    return cls(**shape, **options)
