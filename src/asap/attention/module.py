"""Multi-head attention whose normalisation is one switch.

``MultiheadAttention(dim, num_heads=8, method="sinkhorn", n_iters=11)`` owns the
query/key/value and output projections; the normalisation is an
:class:`~asap.attention.operators.AttentionOperator` held in ``.operator``, so
``asap compile`` can replace a trained Sinkhorn operator by its ASAP operator
in place while every weight stays where it is.
"""

from __future__ import annotations

import numbers

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn

from asap.attention.operators import OPERATORS, build_operator
from asap.transport.masks import key_padding_to_attn_mask


@dataclass
class AttentionConfig:
    """Serialisable description of the attention a model uses.

    ``method`` is one of ``"softmax" | "sinkhorn" | "esp" | "asap"``; ``options``
    are that method's keyword options (e.g. ``{"n_iters": 11, "eps": 1.0}``).
    """

    method: str = "softmax"
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AttentionConfig":
        unknown = set(data) - {"method", "options"}
        if unknown:
            raise ValueError(f"AttentionConfig: unknown field(s) {sorted(unknown)}")
        return cls(method=data.get("method", "softmax"), options=dict(data.get("options", {})))


class MultiheadAttention(nn.Module):
    """Self-attention ``(b, n, dim) -> (b, n, dim)`` with a pluggable normaliser.

    Args:
        dim: model width; must be divisible by ``num_heads``.
        num_heads: number of heads ``h`` (head size ``d = dim / h``).
        method: ``"softmax" | "sinkhorn" | "esp" | "asap"``.
        qkv_bias: bias in the input projection.
        dropout: dropout on the output projection. Dropout on the attention
            matrix itself is deliberately not offered: it would break the
            doubly-stochastic constraint the other methods enforce.
        **method_options: options of the chosen method (refused if it does not take them).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        method: str = "softmax",
        qkv_bias: bool = True,
        dropout: float = 0.0,
        **method_options: Any,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"MultiheadAttention: {name} must be an integer >= 1, got {value!r}")
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.operator = build_operator(method, num_heads=num_heads, head_dim=self.head_dim, **method_options)

    @property
    def method(self) -> str:
        return self.operator.method

    @classmethod
    def from_config(cls, dim: int, *, num_heads: int, config: AttentionConfig, **kwargs: Any) -> "MultiheadAttention":
        return cls(dim, num_heads=num_heads, method=config.method, **kwargs, **config.options)

    def forward(self, x: Tensor, *, padding_mask: Tensor | None = None) -> Tensor:
        """``x (b, n, dim)``; ``padding_mask (b, n)`` bool, True = real token."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MultiheadAttention expects x of shape (b, n, {self.dim}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if padding_mask is None:
            out = self.operator(q, k, v)  # (b, h, n, d)
        else:
            if padding_mask.shape != (b, n):
                raise ValueError(f"padding_mask must have shape (b, n) = {(b, n)}, got {tuple(padding_mask.shape)}")
            if self.operator.takes_padding_mask:  # O(b n) vectors instead of a (b, 1, n, n) mask
                out = self.operator(q, k, v, padding_mask=padding_mask)
            else:
                out = self.operator(q, k, v, attn_mask=key_padding_to_attn_mask(padding_mask))
        out = out.transpose(1, 2).reshape(b, n, self.dim)
        if padding_mask is not None:
            out = out * padding_mask.unsqueeze(-1).to(out.dtype)
        return self.dropout(self.proj(out))


def operator_config(operator: nn.Module) -> AttentionConfig:
    """The :class:`AttentionConfig` that rebuilds ``operator`` (its ``.options``; weights come from the state dict)."""
    options = getattr(operator, "options", None)
    if options is None or not hasattr(options, "to_dict"):
        raise TypeError(f"{type(operator).__name__} has no typed options to describe it")
    return AttentionConfig(method=operator.method, options=options.to_dict())


def available_methods() -> tuple[str, ...]:
    return tuple(sorted(OPERATORS))


__all__ = ["AttentionConfig", "MultiheadAttention", "available_methods", "operator_config"]
