"""The attention function and the mask function that transformers dispatches to for ``attn_implementation="asap"``.

transformers (5.x) runs every self-attention of a model through
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``, called as::

    fn(module, query, key, value, attention_mask, *, scaling, dropout, **kwargs)
        query, key, value: (b, h, n, d);   attention_mask: built by the mask function below
        -> (out (b, n, h, d), weights (b, h, n, m) or None)

and builds ``attention_mask`` with ``ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]``.
Both are registered under :data:`ATTN_IMPLEMENTATION` by :func:`register`, and both are
needed:

* the attention function alone is called with ``attention_mask=None`` (transformers
  skips mask creation for an implementation it has no mask function for), so padding
  would be attended, silently;
* transformers' own masks are *key-padding only* (``mask[b, i, j] = token_j is real``):
  a padded query still attends the real keys, so under the column constraint of a
  doubly-stochastic method it takes mass from them and changes the output at the real
  tokens. :func:`asap_mask` also masks padded *queries*, as
  :func:`asap.transport.masks.key_padding_to_attn_mask` does, which asap's operators
  read as "this token carries no mass" (rows and columns both).

The function itself holds no state: it calls the asap operator stored on the HF
attention module as ``module.asap_operator`` (:data:`OPERATOR_ATTR`), so that the
compile stage, which finds :class:`~asap.attention.SinkhornOperator` s by type and
swaps them by qualified name (:mod:`asap.attention.submodules`), sees and replaces them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function, sdpa_mask

from asap.errors import AsapError, ConfigError
from asap.transport.ctransform import reduction_dtype

#: The ``attn_implementation`` name asap registers with transformers.
ATTN_IMPLEMENTATION = "asap"
#: The attribute of each HF attention module holding its asap operator.
OPERATOR_ATTR = "asap_operator"
#: The attribute of a mask built by :func:`asap_mask` holding its ``(b, n)`` token mask.
TOKENS_ATTR = "asap_tokens"


class UnsupportedModelError(AsapError, NotImplementedError):
    """A model, or a use of it, that asap attention cannot run exactly (causal, cross attention, ...)."""


def asap_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = bidirectional_mask_function,
    attention_mask: Tensor | None = None,
    allow_is_bidirectional_skip: bool = False,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> Tensor | None:
    """The boolean self-attention mask ``(b, 1, n, n)`` asap needs, or ``None`` when nothing is padded.

    ``attention_mask`` is transformers' 2-D token mask ``(b, n)`` (True = real token,
    already boolean here). The mask is transformers' own (``sdpa_mask``: the mask
    pattern AND real keys) AND real queries, so a padded token is excluded both as a
    key and as a query: ``mask[b, 0, i, j] = real_i & real_j`` for a plain encoder.
    """
    if q_length != kv_length:
        raise UnsupportedModelError(
            f"asap attention is self-attention over one sequence; got {q_length} queries and {kv_length} keys "
            "(a cache or cross attention)"
        )
    mask = sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, allow_is_causal_skip=False,
        allow_is_bidirectional_skip=allow_is_bidirectional_skip, use_vmap=use_vmap, device=device,
    )  # fmt: skip
    if mask is None or attention_mask is None:
        return mask
    if attention_mask.shape[-1] != q_length:
        raise UnsupportedModelError(
            f"attention_mask covers {attention_mask.shape[-1]} tokens but the sequence has {q_length}"
        )
    # sdpa_mask masks padded keys only; the same tokens are padded queries.
    tokens = attention_mask.to(device=mask.device, dtype=torch.bool)
    mask = mask & tokens[:, None, :, None]
    if mask_function is bidirectional_mask_function:
        # Then the mask is exactly the outer product tokens x tokens: the operators can take the (b, n)
        # token mask instead, O(n) memory and no (b, 1, n, n) mask reductions per layer. A tensor
        # attribute, so that a mask transformers rebuilt or a caller's own mask never carries it.
        setattr(mask, TOKENS_ATTR, tokens)
    return mask


def _softmax_weights(query: Tensor, key: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Row-softmax attention weights ``(b, h, n, m)``; rows of padded queries are zero (never NaN)."""
    rdtype = reduction_dtype(query.dtype)
    scores = (query.to(rdtype) @ key.to(rdtype).transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return torch.softmax(scores, dim=-1).nan_to_num(0.0).to(query.dtype)


def asap_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """Run ``module.asap_operator`` on ``query (b, h, n, d)``, ``key``, ``value (b, h_kv, n, d)``.

    Returns ``(out (b, n, h, d), weights)``: ``weights (b, h, n, n)`` only for the softmax
    method when ``output_attentions`` is asked for (the other methods refuse it: they
    never form a weight matrix they could return cheaply). ``attention_mask`` must be
    the boolean mask of :func:`asap_mask` (or a boolean 4-D mask of the caller's, True
    = attend, padded queries masked too); an additive float mask is refused.

    ``scaling`` is ignored: the operator carries the module's scale (set by
    :func:`~asap.integrations.hf.convert.convert`), so compiling it keeps it.
    ``dropout`` (attention-probability dropout) is not applied by any method:
    dropping entries of a doubly-stochastic matrix breaks its constraints.
    Grouped-query attention (fewer key/value heads) is expanded to the query heads.
    """
    operator = getattr(module, OPERATOR_ATTR, None)
    if operator is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} has no asap operator: convert the model with "
            "asap.integrations.transformers.convert(model, method) before using attn_implementation='asap'"
        )
    if kwargs.get("is_causal", getattr(module, "is_causal", False)):
        raise UnsupportedModelError(
            f"{type(module).__name__} is causal; asap attention supports bidirectional encoders only"
        )
    if isinstance(attention_mask, Tensor) and attention_mask.dtype != torch.bool:
        raise ConfigError(
            f"asap attention takes a boolean mask (True = attend), got a {attention_mask.dtype} mask; pass the "
            "2-D padding mask (b, n) as attention_mask and let the model build it"
        )
    if attention_mask is not None and not isinstance(attention_mask, Tensor):
        raise ConfigError(f"asap attention takes a boolean tensor mask, got {type(attention_mask).__name__}")
    if query.shape[-2] != key.shape[-2]:
        raise UnsupportedModelError(
            f"asap attention is self-attention: {query.shape[-2]} queries but {key.shape[-2]} keys"
        )
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != heads:
        if kv_heads == 0 or heads % kv_heads:
            raise UnsupportedModelError(f"{heads} query heads cannot share {kv_heads} key/value heads")
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    config = getattr(module, "config", None)
    want_weights = bool(kwargs.get("output_attentions") or getattr(config, "output_attentions", False))
    weights = None
    if want_weights:
        if operator.method != "softmax":
            raise UnsupportedModelError(
                f"output_attentions=True: the {operator.method!r} operator does not return attention weights"
            )
        weights = _softmax_weights(query, key, attention_mask, operator.resolved_scale(query))
    tokens = getattr(attention_mask, TOKENS_ATTR, None)
    if tokens is not None and operator.takes_padding_mask and tuple(tokens.shape) == (query.shape[0], query.shape[-2]):
        out = operator(query, key, value, padding_mask=tokens)  # (b, h, n, d)
    else:
        out = operator(query, key, value, attn_mask=attention_mask)
    return out.transpose(1, 2).contiguous(), weights


def register() -> str:
    """Register the attention and mask functions under :data:`ATTN_IMPLEMENTATION` (idempotent); return the name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, asap_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, asap_mask)
    return ATTN_IMPLEMENTATION
