"""Serialisable model configurations.

Every model is described by a dataclass that round-trips through JSON
(``to_dict`` / ``from_dict``), so a checkpoint's ``config.json`` rebuilds the
exact architecture, attention method included. ``from_dict`` refuses unknown
or missing fields with an error naming them: a config that does not describe
the weights beside it must fail loudly, not build a different model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from asap.attention.module import AttentionConfig

#: Size presets (``--preset``); explicit ``dim/depth/num_heads/mlp_ratio`` override them.
#: "base" is the text encoder of the Sinkformer code base (6 layers, d 256, 8 heads, ffn 1024).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0},
    "small": {"dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0},
    "base": {"dim": 256, "depth": 6, "num_heads": 8, "mlp_ratio": 4.0},
}


def _check_positive(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ValueError(f"{type(config).__name__}.{name} must be positive, got {value!r}")


def _check_common(config: Any) -> None:
    _check_positive(config, "num_classes", "dim", "depth", "num_heads", "mlp_ratio")
    if config.dim % config.num_heads != 0:
        raise ValueError(
            f"{type(config).__name__}: dim={config.dim} must be divisible by num_heads={config.num_heads}"
        )
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"{type(config).__name__}.dropout must be in [0, 1), got {config.dropout!r}")
    if not isinstance(config.attention, AttentionConfig):
        raise TypeError(f"{type(config).__name__}.attention must be an AttentionConfig, got {type(config.attention)}")


class _Serialisable:
    """``to_dict``/``from_dict`` for a model config holding an ``attention: AttentionConfig``."""

    model_type: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model_type": self.model_type}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, AttentionConfig) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = dict(data)
        model_type = data.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"config is for model_type {model_type!r}, not {cls.model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config field(s) {unknown}")
        if "attention" in data:
            data["attention"] = AttentionConfig.from_dict(data["attention"])
        try:
            return cls(**data)
        except TypeError as err:  # a required field is missing
            raise ValueError(f"{cls.__name__}: {err}") from None


@dataclass
class TextClassifierConfig(_Serialisable):
    """A transformer encoder over subword tokens with a classification head.

    ``max_length`` fixes the number of learned position embeddings (plus one
    for the class token when ``pooling="cls"``). ``pooling="mean"`` averages the
    valid tokens (padding excluded, so a padded batch gives the logits of the
    unpadded sequences); ``"cls"`` reads a learned class token, as in BERT.
    """

    model_type: ClassVar[str] = "text_classifier"

    vocab_size: int
    num_classes: int
    max_length: int = 256
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    pooling: str = "mean"
    attention: AttentionConfig = field(default_factory=AttentionConfig)

    def __post_init__(self) -> None:
        _check_positive(self, "vocab_size", "max_length")
        _check_common(self)
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"TextClassifierConfig.pooling must be 'mean' or 'cls', got {self.pooling!r}")


@dataclass
class ViTConfig(_Serialisable):
    """A Vision Transformer: non-overlapping ``patch_size`` patches of a square
    ``image_size`` image, a class token, learned position embeddings.

    ``image_size`` must be a multiple of ``patch_size``; the sequence length is
    ``(image_size / patch_size)**2 + 1`` (e.g. 28 px, patch 4: 49 + 1 tokens).
    """

    model_type: ClassVar[str] = "vit"

    num_classes: int
    image_size: int = 28
    patch_size: int = 4
    in_channels: int = 1
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    attention: AttentionConfig = field(default_factory=AttentionConfig)

    def __post_init__(self) -> None:
        _check_positive(self, "image_size", "patch_size", "in_channels")
        _check_common(self)
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"ViTConfig: image_size={self.image_size} must be a multiple of patch_size={self.patch_size}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


ModelConfig = TextClassifierConfig | ViTConfig

#: model_type -> config class, for :func:`model_config_from_dict`.
MODEL_CONFIGS: dict[str, type] = {c.model_type: c for c in (TextClassifierConfig, ViTConfig)}


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Rebuild any model config from its ``to_dict()`` output (dispatch on ``model_type``)."""
    model_type = data.get("model_type")
    if model_type not in MODEL_CONFIGS:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {sorted(MODEL_CONFIGS)}")
    return MODEL_CONFIGS[model_type].from_dict(data)
