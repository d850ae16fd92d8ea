"""The ASAP dual map: predicted Sinkhorn query dual from exact 1-D slice potentials.

For each head, ``L`` fixed unit directions ``theta_l`` define slices. Per token
the features are the exact 1-D Kantorovich query potentials ``phi_l(i)``
(:func:`asap.transport.sliced.kantorovich_potentials_1d`) and the map is linear
(docs/method.md sec. 4.3)::

    f_hat_i = sum_l alpha_{h,l} phi_l(i),   centred over valid queries.

The directions and coefficients are *buffers*, not parameters: they are fitted
by ``asap compile`` (ridge least squares, then optionally KL refinement), not
by gradient descent of the host model, and they save and load with the model's
state dict.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from asap.transport.masks import valid_rows_cols
from asap.transport.sinkhorn import center
from asap.transport.sliced import project, query_potentials_1d

SliceType = Literal["random", "axis"]
SLICE_TYPES: tuple[str, ...] = ("random", "axis")


def make_directions(*, num_heads: int, head_dim: int, num_slices: int, slice_type: SliceType, seed: int) -> Tensor:
    """Unit slice directions ``(h, L, d)``.

    ``"random"``: i.i.d. Gaussian directions normalised to the sphere, drawn
    from a ``torch.Generator`` seeded with ``seed`` (independent per head), so
    they are reproducible from the stored seed. ``"axis"``: ``L <= d``
    coordinate axes, evenly spaced over ``0..d-1`` (all of them when ``L = d``).
    """
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    if slice_type == "random":
        gen = torch.Generator().manual_seed(seed)
        dirs = torch.randn(num_heads, num_slices, head_dim, generator=gen, dtype=torch.float64)
        return (dirs / dirs.norm(dim=-1, keepdim=True)).to(torch.float32)
    if slice_type == "axis":
        if num_slices > head_dim:
            raise ValueError(f"axis slices: num_slices ({num_slices}) cannot exceed head_dim ({head_dim})")
        axes = torch.linspace(0, head_dim - 1, num_slices).round().long()
        eye = torch.eye(head_dim)[axes]  # (L, d)
        return eye.unsqueeze(0).expand(num_heads, -1, -1).clone()
    raise ValueError(f"slice_type must be one of {SLICE_TYPES}, got {slice_type!r}")


def slice_potentials(q: Tensor, k: Tensor, directions: Tensor, *, scale: float, attn_mask: Tensor | None) -> Tensor:
    """Query-side 1-D potentials ``phi (b, h, L, n)`` in fp32 (fp64 for fp64 inputs)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    x, y = project(q.to(dtype), k.to(dtype), directions.to(dtype), scale=scale)
    rows, cols = valid_rows_cols(attn_mask, q.shape[-2], k.shape[-2])
    if rows is not None:
        rows = rows.expand(*q.shape[:-1])
        cols = cols.expand(*k.shape[:-1])
    return query_potentials_1d(x, y, x_valid=rows, y_valid=cols)


class SliceDualMap(nn.Module):
    """Linear map from slice potentials to the Sinkhorn query dual, one per head.

    Buffers: ``directions (h, L, d)``, ``coef (h, L)``, ``seed`` and ``fitted``
    (False until ``asap compile`` writes the coefficients). Cheap extra
    per-token features are added by :class:`asap.compile.maps.ExtendedSliceDualMap`.
    """

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        num_slices: int = 16,
        slice_type: SliceType = "random",
        seed: int = 0,
    ):
        super().__init__()
        self.num_heads, self.head_dim, self.num_slices = num_heads, head_dim, num_slices
        self.slice_type = slice_type
        directions = make_directions(
            num_heads=num_heads, head_dim=head_dim, num_slices=num_slices, slice_type=slice_type, seed=seed
        )
        self.register_buffer("directions", directions)
        self.register_buffer("coef", torch.zeros(num_heads, num_slices))
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("fitted", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, slices={self.num_slices}, slice_type={self.slice_type!r}"

    def features(self, q: Tensor, k: Tensor, *, scale: float, attn_mask: Tensor | None = None) -> Tensor:
        """``phi (b, h, L, n)``: the features the map is linear in (centred over valid queries)."""
        return slice_potentials(q, k, self.directions, scale=scale, attn_mask=attn_mask)

    def forward(self, q: Tensor, k: Tensor, *, scale: float, attn_mask: Tensor | None = None) -> Tensor:
        """Predicted, centred query dual ``f_hat (b, h, n)``."""
        if q.shape[1] != self.num_heads or q.shape[-1] != self.head_dim:
            raise ValueError(
                f"SliceDualMap fitted for {self.num_heads} heads of size {self.head_dim}, "
                f"got q of shape {tuple(q.shape)}"
            )
        phi = self.features(q, k, scale=scale, attn_mask=attn_mask)
        f_hat = torch.einsum("bhln,hl->bhn", phi, self.coef.to(phi.dtype))
        rows, _ = valid_rows_cols(attn_mask, q.shape[-2], k.shape[-2])
        return center(f_hat, valid=None if rows is None else rows.expand(*f_hat.shape))
