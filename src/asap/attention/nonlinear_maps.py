"""Nonlinear dual maps of the family (:data:`asap.attention.dual_map.DUAL_MAPS`): ``"relu"`` and ``"mlp"``.

Both take the inputs every kind shares (docs/method.md sec. 4.2, 4.3): per
token ``i`` and head ``h``, ``x(i) = (phi_1(i), ..., phi_L(i), e_1(i), ..., e_E(i))``,
the ``L`` exact 1-D slice potentials and the ``E`` extra features, each column
centred over valid queries (:meth:`~asap.attention.dual_map.DualMap.features`,
``x (b, h, F, n)``, ``F = L + E``). Each is the linear map plus a nonlinear
part, zero after :meth:`set_coefficients`, so that a freshly written map *is*
the ridge-fitted linear map and the compile-time fit (``asap.compile``) starts
from it.

**"relu"** (:class:`ReluDualMap`; Milkert, Hyde and Laine, arXiv 2311.18022;
the construction and its proofs are in :mod:`asap.attention.relu_maps`)::

    f_hat_i = center( sum_l sum_m w_{h,l,m} N_{h,l,m}(u_{h,l}(phi_l(i)))  +  sum_c beta_{h,c} x_c(i) ),

one depth-``k`` triangle-wave ReLU network ``N`` per (head, slice, stack),
each with exactly ``2^k`` linear pieces on its input interval at every peak
vector (so at initialisation and through training), convex, combined with
signed weights over ``M`` stacks (the non-convex extension). Options:
``depth`` ``k`` (default 4: 16 pieces) and ``num_stacks`` ``M`` (default 2).
Buffers: ``directions``, ``seed``, ``fitted`` and the submodule
``slice_map`` (:class:`~asap.attention.relu_maps.ReluSliceDualMap`:
``raw_peaks (h, L, M, k+1)``, input range ``lo, hi (h, L)``, read-out
``coef (h, L M + F)``, flags). Cost per token: ``L M`` networks of ``k``
triangle layers (2 ReLUs each), then ``L M + F`` multiply-adds.

**"mlp"** (:class:`MlpDualMap`), the strongest unconstrained baseline: one
hidden layer of width ``H`` per head with a linear skip connection::

    z = s_h * x(i)                           (per-feature input scale s_h (F,), fitted)
    f_hat_i = center( <a_h, x(i)> + <w_h, relu(W_h z + c_h)> ),

``a_h (F)`` the skip (the linear map), ``W_h (H, F)``, ``c_h (H)``, ``w_h (H)``.
Option: ``hidden`` ``H`` (default 32). Buffers: ``skip (h, F)``,
``in_scale (h, F)``, ``w_in (h, H, F)``, ``b_in (h, H)``, ``w_out (h, H)``
(zero until fitted), plus ``directions``, ``seed``, ``fitted``. ``w_in`` and
``b_in`` are drawn at construction from the map's ``seed`` (a generator of
its own), so an unfitted map is reproducible. Cost per token: ``2 H F + H + F``
multiply-adds.

Shapes: ``x (b, h, F, n)``; ``valid (b, 1 or h, n)`` bool (True = real query)
or None. Everything is computed in the dtype of ``x`` (fp32, fp64 for fp64
inputs: :meth:`features` already promotes half precision), buffers are cast to
it, and nothing in a forward pass reads a value back to the host.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from asap.attention.dual_map import DualMap, SliceType
from asap.attention.relu_maps import ReluSliceDualMap
from asap.transport.sinkhorn import center

#: Offset XOR-ed into the seed of the MLP's hidden-layer generator, so its draws are not those of the directions.
_MLP_SEED_SALT = 0x5DEECE66D


class ReluDualMap(DualMap):
    """Per-slice triangle-wave ReLU networks plus the linear term (module docstring), one map per head."""

    kind = "relu"
    OPTIONS = {"depth": (4, 1, 16), "num_stacks": (2, 1, 16)}

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        num_slices: int = 16,
        slice_type: SliceType = "random",
        seed: int = 0,
        extra_features: tuple[str, ...] = (),
        depth: int = 4,
        num_stacks: int = 2,
    ):
        super().__init__()
        self.depth, self.num_stacks = depth, num_stacks
        self._init_slices(num_heads=num_heads, head_dim=head_dim, num_slices=num_slices, slice_type=slice_type,
                          seed=seed, extra_features=extra_features)  # fmt: skip
        self.register_buffer("fitted", torch.tensor(False))
        self.slice_map = ReluSliceDualMap(num_heads=num_heads, num_slices=num_slices, num_features=self.num_features,
                                          depth=depth, num_stacks=num_stacks)  # fmt: skip

    def extra_repr(self) -> str:
        extra = f", extra_features={self.extra_features}" if self.extra_features else ""
        return f"heads={self.num_heads}, slices={self.num_slices}, slice_type={self.slice_type!r}{extra}"

    @property
    def num_slice_functions(self) -> int:
        """``L M``: the nonlinear columns of the read-out, before the ``F`` linear ones."""
        return self.num_slices * self.num_stacks

    def design(self, x: Tensor, *, valid: Tensor | None = None, raw_peaks: Tensor | None = None) -> Tensor:
        """Fit-ready design ``(b, h, L M + F, n)``: the slice networks of ``phi = x[:, :, :L]``, then ``x``, centred."""
        return self.slice_map.design(x[:, :, : self.num_slices], x, valid=valid, raw_peaks=raw_peaks)

    def predict(self, x: Tensor, *, valid: Tensor | None = None) -> Tensor:
        """``f_hat (b, h, n)``: the read-out of :meth:`design` (centred over ``valid``, 0 at padding)."""
        return self.slice_map.predict(self.design(x, valid=valid))

    @torch.no_grad()
    def set_coefficients(self, coef: Tensor) -> None:
        """Linear term ``(h, F)`` into the read-out, slice weights zero: the map is then that linear map."""
        if tuple(coef.shape) != (self.num_heads, self.num_features):
            raise ValueError(f"coefficients of shape {tuple(coef.shape)} for a map of shape {(self.num_heads, self.num_features)}")
        readout = self.slice_map.coef
        readout.zero_()
        readout[:, self.num_slice_functions :] = coef.to(readout.dtype)
        self.slice_map.fitted.fill_(True)
        self.fitted.fill_(True)


class MlpDualMap(DualMap):
    """A one-hidden-layer MLP over the slice potentials and extras with a linear skip, one per head (module docstring)."""

    kind = "mlp"
    OPTIONS = {"hidden": (32, 1, 4096)}

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        num_slices: int = 16,
        slice_type: SliceType = "random",
        seed: int = 0,
        extra_features: tuple[str, ...] = (),
        hidden: int = 32,
    ):
        super().__init__()
        self.hidden = hidden
        self._init_slices(num_heads=num_heads, head_dim=head_dim, num_slices=num_slices, slice_type=slice_type,
                          seed=seed, extra_features=extra_features)  # fmt: skip
        self.register_buffer("fitted", torch.tensor(False))
        h, f = num_heads, self.num_features
        gen = torch.Generator().manual_seed(seed ^ _MLP_SEED_SALT)
        w_in = torch.randn(h, hidden, f, generator=gen, dtype=torch.float64) / f**0.5
        b_in = 2 * torch.rand(h, hidden, generator=gen, dtype=torch.float64) - 1
        self.register_buffer("skip", torch.zeros(h, f))
        self.register_buffer("in_scale", torch.ones(h, f))
        self.register_buffer("w_in", w_in.to(torch.float32))
        self.register_buffer("b_in", b_in.to(torch.float32))
        self.register_buffer("w_out", torch.zeros(h, hidden))

    #: The buffers a gradient fit trains, in the order of :meth:`tensors`.
    TRAINED = ("skip", "w_in", "b_in", "w_out")

    def extra_repr(self) -> str:
        extra = f", extra_features={self.extra_features}" if self.extra_features else ""
        return f"heads={self.num_heads}, slices={self.num_slices}, hidden={self.hidden}{extra}"

    def tensors(self) -> dict[str, Tensor]:
        """The trained buffers by name (:data:`TRAINED`): what :meth:`predict` takes as ``params``."""
        return {name: getattr(self, name) for name in self.TRAINED}

    def predict(self, x: Tensor, *, valid: Tensor | None = None, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """``f_hat (b, h, n)`` (centred over ``valid``, 0 at padding); ``params`` replaces :meth:`tensors` (a fit's)."""
        p = self.tensors() if params is None else params
        dtype = x.dtype
        z = x * self.in_scale.to(dtype)[None, :, :, None]
        pre = torch.einsum("bhfn,hjf->bhjn", z, p["w_in"].to(dtype)) + p["b_in"].to(dtype)[None, :, :, None]
        f_hat = torch.einsum("bhfn,hf->bhn", x, p["skip"].to(dtype))
        f_hat = f_hat + torch.einsum("bhjn,hj->bhn", torch.relu(pre), p["w_out"].to(dtype))
        return center(f_hat, valid=None if valid is None else valid.expand(*f_hat.shape))

    @torch.no_grad()
    def set_coefficients(self, coef: Tensor) -> None:
        """Linear term ``(h, F)`` into the skip, ``w_out`` zero: the map is then that linear map."""
        if tuple(coef.shape) != (self.num_heads, self.num_features):
            raise ValueError(f"coefficients of shape {tuple(coef.shape)} for a map of shape {(self.num_heads, self.num_features)}")
        self.skip.copy_(coef.to(self.skip.dtype))
        self.w_out.zero_()
        self.fitted.fill_(True)

    @torch.no_grad()
    def set_input_scale(self, scale: Tensor) -> None:
        """Per-feature input scale ``(h, F)`` (the compile fit: 1 / std of each input over the calibration tokens)."""
        if tuple(scale.shape) != (self.num_heads, self.num_features) or not bool(torch.isfinite(scale).all()):
            raise ValueError(f"input scale must be finite of shape {(self.num_heads, self.num_features)}, got {tuple(scale.shape)}")
        self.in_scale.copy_(scale.to(self.in_scale.dtype))

    @torch.no_grad()
    def set_tensors(self, params: Mapping[str, Tensor]) -> None:
        """Write trained tensors (names of :data:`TRAINED`) into the buffers."""
        for name, value in params.items():
            getattr(self, name).copy_(value.detach().to(getattr(self, name).dtype))


__all__ = ["MlpDualMap", "ReluDualMap"]
