"""Build a model from its config, and change the attention method of a built model."""

from __future__ import annotations

from typing import Any

from torch import nn

from asap.attention.module import MultiheadAttention
from asap.attention.operators import build_operator
from asap.models.config import ModelConfig, TextClassifierConfig, ViTConfig
from asap.models.text import TextClassifier
from asap.models.vision import VisionTransformer

#: model_type -> model class.
MODELS: dict[str, type[nn.Module]] = {
    TextClassifierConfig.model_type: TextClassifier,
    ViTConfig.model_type: VisionTransformer,
}


def build_model(config: ModelConfig) -> nn.Module:
    """Instantiate the model a config describes (dispatch on ``config.model_type``)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODELS:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {sorted(MODELS)}")
    return MODELS[model_type](config)


def attention_layers(model: nn.Module) -> list[MultiheadAttention]:
    """Every :class:`MultiheadAttention` of ``model``, in forward order."""
    return [m for m in model.modules() if isinstance(m, MultiheadAttention)]


def swap_attention(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Replace, in place, the attention normalisation of every layer by ``build_operator(method, ...)``.

    The projections (and so the trained weights) are kept; only the operator
    that turns ``q, k, v`` into outputs changes. This is how a Sinkhorn teacher
    is evaluated with fewer iterations or with softmax. Returns ``model``.
    """
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MultiheadAttention layer to swap")
    for layer in layers:
        operator = build_operator(method, num_heads=layer.num_heads, head_dim=layer.head_dim, **options)
        reference = next(layer.parameters())
        layer.operator = operator.to(device=reference.device)
    return model
