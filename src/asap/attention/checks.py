"""Input validation shared by every attention operator.

Errors name the argument, what was expected and what was given, so that a
wrong call fails at the boundary instead of producing a silent NaN deep inside
a log-sum-exp.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

CAUSAL_ERROR = (
    "is_causal=True is not supported by doubly-stochastic attention ({method!r}): a lower-triangular "
    "matrix whose rows and columns all sum to 1 is the identity, so exact doubly-stochastic causal "
    "attention does not exist (docs/method.md sec. 6.2). Use method='softmax' for causal models."
)


def validate_attention_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    method: str,
) -> Tensor | None:
    """Check ``q (b,h,n,d)``, ``k (b,h,m,d)``, ``v (b,h,m,dv)`` and a boolean mask; return the mask.

    Doubly-stochastic methods accept only boolean masks (True = attend): an
    additive float mask has no meaning for the column constraint.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{method} attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{method} attention: {name} must have 4 dims (b, h, seq, dim), got shape {tuple(t.shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{method} attention: {name} must be a floating tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{method} attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{method} attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"{method} attention: batch and head dims must match: q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{method} attention: q and k head sizes differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{method} attention: k and v lengths differ: {k.shape[-2]} vs {v.shape[-2]}")
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError(f"{method} attention: empty sequence (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if q.shape[-1] == 0:
        raise ValueError(f"{method} attention: head size d = 0 (q {tuple(q.shape)}): scores need at least one feature")
    if is_causal and method != "softmax":
        raise ValueError(CAUSAL_ERROR.format(method=method))
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"{method} attention: attn_mask must be a bool tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool:
        raise TypeError(
            f"{method} attention: attn_mask must be boolean (True = attend), got dtype {attn_mask.dtype}; "
            "additive float masks are not defined for doubly-stochastic attention"
        )
    if attn_mask.device != q.device:
        raise ValueError(f"{method} attention: attn_mask is on {attn_mask.device}, q on {q.device}")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        torch.broadcast_shapes(attn_mask.shape, target)
    except RuntimeError:
        raise ValueError(
            f"{method} attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
            f"(b, h, n, m) = {target}"
        ) from None
    if attn_mask.dim() > 4:
        raise ValueError(f"{method} attention: attn_mask has {attn_mask.dim()} dims, at most 4 allowed")
    return attn_mask


def validate_padding_mask(
    padding_mask: Tensor | None, q: Tensor, k: Tensor, *, attn_mask: Tensor | None, method: str
) -> Tensor | None:
    """Check a token mask ``padding_mask (b, n)`` (bool, True = real token) for self-attention; return it.

    It means the same as ``attn_mask = key_padding_to_attn_mask(padding_mask)``
    (padded queries and padded keys get no mass) but lets the operators keep
    ``O(b n)`` vectors instead of ``(b, 1, n, n)`` masks. It needs ``n = m``, and
    is refused together with ``attn_mask`` (pass one or the other).
    """
    if padding_mask is None:
        return None
    if attn_mask is not None:
        raise ValueError(f"{method} attention: pass either attn_mask or padding_mask, not both")
    if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool:
        got = padding_mask.dtype if isinstance(padding_mask, Tensor) else type(padding_mask).__name__
        raise TypeError(f"{method} attention: padding_mask must be a bool tensor (True = real token), got {got}")
    b, _, n, _ = q.shape
    if k.shape[-2] != n:
        raise ValueError(f"{method} attention: padding_mask is for self-attention (n = m), got n = {n}, m = {k.shape[-2]}")
    if tuple(padding_mask.shape) != (b, n):
        raise ValueError(f"{method} attention: padding_mask must have shape (b, n) = {(b, n)}, got {tuple(padding_mask.shape)}")
    if padding_mask.device != q.device:
        raise ValueError(f"{method} attention: padding_mask is on {padding_mask.device}, q on {q.device}")
    return padding_mask


def check_positive(name: str, value: float) -> float:
    """``value`` as a float if it is a finite real number > 0 (``True`` is not a number here; inf is refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def check_int(name: str, value: int, *, minimum: int) -> int:
    """``value`` as an int if it is an integer (Python or NumPy, not bool) >= ``minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def empty_output(q: Tensor, v: Tensor) -> Tensor | None:
    """The (empty) result for a batch or head count of 0, else None.

    Private kernels divide by the number of (batch, head) problems (h = 0 raised
    SIGFPE in one of them), so no fast path may see an empty problem set.
    """
    b, h, n, _ = q.shape
    if b * h == 0:
        return q.new_zeros(b, h, n, v.shape[-1])
    return None


def default_scale(scale: float | None, head_dim: int) -> float:
    """``1/sqrt(d)`` unless given; a given scale must be positive."""
    if scale is None:
        return head_dim**-0.5
    return check_positive("scale", scale)
