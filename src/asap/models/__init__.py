"""Models with pluggable attention: a text classifier and a Vision Transformer.

Both are stacks of the same pre-norm :class:`Block`; the attention method
(softmax, Sinkhorn, ESP, ASAP) is part of the model config.
"""

from asap.models.blocks import MLP, Block
from asap.models.config import (
    MODEL_CONFIGS,
    PRESETS,
    ModelConfig,
    TextClassifierConfig,
    ViTConfig,
    model_config_from_dict,
)
from asap.models.factory import MODELS, attention_layers, build_model, register_model, swap_attention
from asap.models.text import TextClassifier
from asap.models.vision import VisionTransformer

__all__ = [
    "MLP",
    "Block",
    "MODEL_CONFIGS",
    "MODELS",
    "PRESETS",
    "ModelConfig",
    "TextClassifier",
    "TextClassifierConfig",
    "ViTConfig",
    "VisionTransformer",
    "attention_layers",
    "build_model",
    "model_config_from_dict",
    "register_model",
    "swap_attention",
]
