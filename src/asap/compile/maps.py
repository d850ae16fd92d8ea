"""Dual maps the compile stage fits: the linear slice map, optionally with cheap extra per-token features.

The default is :class:`~asap.attention.SliceDualMap`: ``f_hat = Phi alpha``
over the L slice potentials. :class:`ExtendedSliceDualMap` appends per-token
features that cost ``O(n d)`` (no ``n x m`` work, no extra sort), each centred
over valid queries like the potentials:

* ``"qk_mean"``: ``scale <q_i, mean_j k_j>`` (mean over valid keys): the
  first-order term of the row log-sum-exp that the query dual undoes
  (``-eps LSE_j((S_ij + g_j)/eps) ~ -mean_j S_ij - ...``);
* ``"q_norm"``: ``scale^2 |q_i|^2``: the isotropic part of the second-order
  (variance) term ``scale^2 q_i^T Cov(k) q_i / (2 eps)``.

Why they help: for weakly peaked attention (small scores), the Sinkhorn dual
is close to ``-scale <q_i, mean_j k_j>`` plus a variance term. A slice potential
carries that linear term only through ``<theta, q_i> <theta, kbar>``, so a
combination of L slices represents it only if ``sum_l alpha_l theta_l theta_l^T``
is close to the identity, which L random directions do not give. The
measurements that made them the default are in
``results/compile/*/ablation_features``; pass ``extra_features=()`` for the
paper's plain linear map.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asap.attention.dual_map import SliceDualMap
from asap.transport.masks import valid_rows_cols
from asap.transport.sinkhorn import center

EXTRA_FEATURES: tuple[str, ...] = ("qk_mean", "q_norm")
#: The default of ``asap compile``: both, chosen by the ablations in ``results/compile/*/ablation_features``.
DEFAULT_EXTRA_FEATURES: tuple[str, ...] = ("qk_mean", "q_norm")


def extra_query_features(q: Tensor, k: Tensor, *, names: tuple[str, ...], scale: float, attn_mask: Tensor | None) -> Tensor:
    """Per-token features ``(b, h, E, n)`` (fp32, or fp64 for fp64 inputs), centred over valid queries, 0 at padding."""
    unknown = sorted(set(names) - set(EXTRA_FEATURES))
    if unknown:
        raise ValueError(f"unknown extra feature(s) {unknown}; choose from {EXTRA_FEATURES}")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.to(dtype), k.to(dtype)
    rows, cols = valid_rows_cols(attn_mask, q.shape[-2], k.shape[-2])
    if cols is None:
        k_mean = k.mean(dim=-2)
    else:
        w = cols.expand(*k.shape[:-1]).to(dtype).unsqueeze(-1)
        k_mean = (k * w).sum(dim=-2) / w.sum(dim=-2).clamp(min=1)
    computed = {
        "qk_mean": lambda: scale * torch.einsum("bhnd,bhd->bhn", q, k_mean),
        "q_norm": lambda: scale**2 * (q * q).sum(-1),
    }
    feats = torch.stack([computed[name]() for name in names], dim=2)  # (b, h, E, n)
    valid = None if rows is None else rows.expand(*q.shape[:-1]).unsqueeze(2)
    return center(feats, valid=valid)


class ExtendedSliceDualMap(SliceDualMap):
    """:class:`SliceDualMap` plus the ``extra_features``; buffer ``extra_coef (h, E)``."""

    def __init__(self, *, num_heads: int, head_dim: int, num_slices: int = 16, slice_type: str = "random",
                 seed: int = 0, extra_features: tuple[str, ...] = ("qk_mean",)):  # fmt: skip
        super().__init__(num_heads=num_heads, head_dim=head_dim, num_slices=num_slices, slice_type=slice_type, seed=seed)
        unknown = sorted(set(extra_features) - set(EXTRA_FEATURES))
        if unknown or not extra_features:
            raise ValueError(f"extra_features must be a non-empty subset of {EXTRA_FEATURES}, got {extra_features}")
        self.extra_features = tuple(extra_features)
        self.register_buffer("extra_coef", torch.zeros(num_heads, len(self.extra_features)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, extra_features={self.extra_features}"

    def features(self, q: Tensor, k: Tensor, *, scale: float, attn_mask: Tensor | None = None) -> Tensor:
        """``(b, h, L + E, n)``: the slice potentials, then the extra features."""
        phi = super().features(q, k, scale=scale, attn_mask=attn_mask)
        extra = extra_query_features(q, k, names=self.extra_features, scale=scale, attn_mask=attn_mask)
        return torch.cat([phi, extra.to(phi.dtype)], dim=2)

    def forward(self, q: Tensor, k: Tensor, *, scale: float, attn_mask: Tensor | None = None) -> Tensor:
        if q.shape[1] != self.num_heads or q.shape[-1] != self.head_dim:
            raise ValueError(
                f"dual map fitted for {self.num_heads} heads of size {self.head_dim}, got q of shape {tuple(q.shape)}"
            )
        phi = self.features(q, k, scale=scale, attn_mask=attn_mask)
        coef = torch.cat([self.coef, self.extra_coef], dim=-1).to(phi.dtype)
        f_hat = torch.einsum("bhln,hl->bhn", phi, coef)
        rows, _ = valid_rows_cols(attn_mask, q.shape[-2], k.shape[-2])
        return center(f_hat, valid=None if rows is None else rows.expand(*f_hat.shape))


def build_dual_map(
    *, num_heads: int, head_dim: int, num_slices: int, slice_type: str, seed: int, extra_features: tuple[str, ...] = ()
) -> SliceDualMap:
    """The plain :class:`SliceDualMap`, or an :class:`ExtendedSliceDualMap` when ``extra_features`` are asked for."""
    shape = dict(num_heads=num_heads, head_dim=head_dim, num_slices=num_slices, slice_type=slice_type, seed=seed)
    if extra_features:
        return ExtendedSliceDualMap(**shape, extra_features=tuple(extra_features))
    return SliceDualMap(**shape)


def num_features(dual_map: SliceDualMap) -> int:
    return dual_map.num_slices + len(getattr(dual_map, "extra_features", ()))


@torch.no_grad()
def set_coefficients(dual_map: SliceDualMap, coef: Tensor) -> None:
    """Write fitted coefficients ``(h, L + E)`` into the map's buffers and mark it fitted."""
    L = dual_map.num_slices
    if coef.shape != (dual_map.num_heads, num_features(dual_map)):
        expected = (dual_map.num_heads, num_features(dual_map))
        raise ValueError(f"coefficients of shape {tuple(coef.shape)} for a map of shape {expected}")
    dual_map.coef.copy_(coef[:, :L])
    if isinstance(dual_map, ExtendedSliceDualMap):
        dual_map.extra_coef.copy_(coef[:, L:])
    dual_map.fitted.fill_(True)
