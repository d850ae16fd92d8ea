"""Build a model from its config, and change the attention method of a built model."""

from __future__ import annotations

from typing import Any

from torch import nn

from asap.attention.module import MultiheadAttention
from asap.attention.operators import build_operator
from asap.attention.submodules import find_modules, replace_module
from asap.models.config import MODEL_CONFIGS, ModelConfig, TextClassifierConfig, ViTConfig
from asap.models.text import TextClassifier
from asap.models.vision import VisionTransformer

#: model_type -> model class.
MODELS: dict[str, type[nn.Module]] = {
    TextClassifierConfig.model_type: TextClassifier,
    ViTConfig.model_type: VisionTransformer,
}


def register_model(config_class: type, model_class: type[nn.Module]) -> None:
    """Add a model type, so that :func:`build_model` and :func:`~asap.models.model_config_from_dict` know it.

    ``config_class.model_type`` names it; the config class has ``to_dict`` /
    ``from_dict``, and the model class is built as ``model_class(config)``.
    Adapters register their models when imported (the transformers adapter:
    ``"hf_classifier"``); registering the same pair again does nothing, another
    class under a taken name is refused.
    """
    model_type = getattr(config_class, "model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"{config_class!r} has no model_type")
    if MODEL_CONFIGS.get(model_type, config_class) is not config_class or MODELS.get(model_type, model_class) is not model_class:
        raise ValueError(f"model type {model_type!r} is already registered with other classes")
    MODEL_CONFIGS[model_type] = config_class
    MODELS[model_type] = model_class


def build_model(config: ModelConfig) -> nn.Module:
    """Instantiate the model a config describes (dispatch on ``config.model_type``)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODELS:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {sorted(MODELS)}")
    return MODELS[model_type](config)


def attention_layers(model: nn.Module) -> list[MultiheadAttention]:
    """Every :class:`MultiheadAttention` of ``model``, in forward order."""
    return [found.module for found in find_modules(model, MultiheadAttention)]


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
        replace_module(layer, "operator", operator.to(device=reference.device))
    return model
