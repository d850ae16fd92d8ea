"""Masks and uniform marginals over valid tokens.

Conventions (as in :func:`torch.nn.functional.scaled_dot_product_attention`):
a boolean ``mask`` broadcastable to ``(..., n, m)`` with ``True`` = "query i may
attend to key j". A query whose row allows no key, or a key whose column is
allowed by no query, is *padding*: it gets zero mass, and the marginals are
uniform over the remaining tokens, ``a_i = 1 / n_valid``, ``b_j = 1 / m_valid``
(docs/method.md sec. 1.2). This makes a padded batch give, at valid positions, exactly
what the unpadded sequences give.

Masked entries are excluded with additive ``-inf`` biases, never with large
finite sentinels (which silently leak mass at low temperature ``eps``). Every
log-sum-exp is arranged so that at least one entry is finite, so neither the
forward nor the backward pass can produce NaN on fully padded rows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class Support(NamedTuple):
    """Which queries and keys carry mass, and the log marginals over them.

    Shapes (leading dims ``...`` broadcast like the mask, usually ``b h``):
    ``rows (..., n)`` / ``cols (..., m)`` booleans; ``log_a (..., n)`` and
    ``log_b (..., m)`` hold ``-log n_valid`` / ``-log m_valid`` (finite even for
    an all-padding sequence); ``row_bias`` / ``col_bias`` ``(..., n, m)`` are
    the additive ``0 / -inf`` biases to use in a log-sum-exp over keys (rows)
    and over queries (columns): padding rows (resp. columns) are opened
    entirely so that their log-sum-exp stays finite; their results are then
    discarded with :meth:`zero_rows` / :meth:`zero_cols`.
    All fields except ``log_a``/``log_b`` are ``None`` when there is no mask.
    """

    rows: Tensor | None
    cols: Tensor | None
    log_a: Tensor
    log_b: Tensor
    row_bias: Tensor | None
    col_bias: Tensor | None

    def zero_rows(self, x: Tensor, *, vectors: bool = False) -> Tensor:
        """Set query-indexed ``x`` to zero at padding queries.

        ``x`` is ``(..., n)``, or ``(..., n, k)`` (one vector per query, e.g. an
        attention output) with ``vectors=True``.
        """
        if self.rows is None:
            return x
        rows = self.rows.unsqueeze(-1) if vectors else self.rows
        return torch.where(rows, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def zero_cols(self, x: Tensor) -> Tensor:
        """Set key-indexed ``x (..., m)`` to zero at padding keys."""
        if self.cols is None:
            return x
        return torch.where(self.cols, x, torch.zeros((), dtype=x.dtype, device=x.device))


def valid_rows_cols(mask: Tensor | None, n: int, m: int) -> tuple[Tensor | None, Tensor | None]:
    """Valid queries ``(..., n)`` and keys ``(..., m)`` of a boolean mask ``(..., n, m)``.

    A query row allowing no key, or a key column allowed by no query, is padding.
    Returns ``(None, None)`` when ``mask`` is ``None`` (everything is valid).
    """
    if mask is None:
        return None, None
    full = mask.expand(*mask.shape[:-2], n, m)
    return full.any(dim=-1), full.any(dim=-2)


def key_padding_to_attn_mask(padding_mask: Tensor) -> Tensor:
    """Self-attention mask ``(b, 1, n, n)`` from a token mask ``(b, n)`` (True = real token).

    Both the query and the key must be real: for doubly-stochastic attention a
    padded *query* must also be excluded, or it would take part in the column
    constraint and change the result at valid positions.
    """
    if padding_mask.dtype != torch.bool or padding_mask.dim() != 2:
        raise ValueError(
            f"padding_mask must be a bool tensor of shape (b, n) with True = real token; "
            f"got dtype {padding_mask.dtype} and shape {tuple(padding_mask.shape)}"
        )
    return (padding_mask[:, None, :, None] & padding_mask[:, None, None, :])


def support(
    mask: Tensor | None, n: int, m: int, *, dtype: torch.dtype, device: torch.device, biases: bool = True
) -> Support:
    """Build the :class:`Support` of a mask for an ``n x m`` problem in ``dtype``.

    ``biases=False`` leaves ``row_bias``/``col_bias`` as ``None``: for callers that
    apply the boolean mask themselves and must not hold ``(b, 1, n, m)`` floats.
    """
    if mask is None:
        log_a = torch.full((1,), -math.log(n), dtype=dtype, device=device)
        log_b = torch.full((1,), -math.log(m), dtype=dtype, device=device)
        return Support(None, None, log_a, log_b, None, None)
    rows, cols = valid_rows_cols(mask, n, m)
    # clamp(min=1): an all-padding sequence keeps finite (and later discarded) marginals.
    n_valid = rows.sum(dim=-1, keepdim=True).clamp(min=1).to(dtype)
    m_valid = cols.sum(dim=-1, keepdim=True).clamp(min=1).to(dtype)
    neg_inf = torch.full((), float("-inf"), dtype=dtype, device=device)
    if not biases:
        return Support(rows, cols, -n_valid.log(), -m_valid.log(), None, None)
    zero = torch.zeros((), dtype=dtype, device=device)
    row_bias = torch.where(mask | ~rows.unsqueeze(-1), zero, neg_inf)
    col_bias = torch.where(mask | ~cols.unsqueeze(-2), zero, neg_inf)
    return Support(rows, cols, -n_valid.log(), -m_valid.log(), row_bias, col_bias)


def padding_support(valid: Tensor, *, dtype: torch.dtype) -> Support:
    """The :class:`Support` of self-attention over padded sequences, from a token mask ``valid (b, n)``.

    The same problem as ``support(key_padding_to_attn_mask(valid), n, n)`` (query i
    and key j may meet iff both are real tokens), but every field is a vector:
    ``rows``/``cols`` are ``(b, 1, n)`` and the biases are ``row_bias (b, 1, 1, n)``
    (``-inf`` at padded keys) and ``col_bias (b, 1, n, 1)`` (``-inf`` at padded
    queries), so the extra memory is ``O(b n)`` instead of ``O(b n^2)``. A padded
    query's row log-sum-exp then runs over the real keys (it stays finite and is
    discarded); a sequence with no real token is opened entirely for the same reason.
    """
    if valid.dtype != torch.bool or valid.dim() != 2:
        raise ValueError(f"valid must be a bool tensor (b, n), got dtype {valid.dtype} and shape {tuple(valid.shape)}")
    tokens = valid.unsqueeze(1)  # (b, 1, n)
    n_valid = tokens.sum(dim=-1, keepdim=True).clamp(min=1).to(dtype)
    opened = tokens | ~tokens.any(dim=-1, keepdim=True)
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    bias = torch.where(opened, zero, torch.full((), float("-inf"), dtype=dtype, device=valid.device))
    log_a = -n_valid.log()
    return Support(tokens, tokens, log_a, log_a, bias.unsqueeze(-2), bias.unsqueeze(-1))
