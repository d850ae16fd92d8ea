"""A pretrained transformers encoder with a classification head, as a model of asap's training loop.

This is what ``asap train --model hf:PATH`` fine-tunes::

    config = classifier_config(folder, num_classes=2, attention=AttentionConfig("sinkhorn", {"n_iters": 3}))
    model = HFClassifier.from_pretrained(config)      # the folder's weights, a fresh head, asap attention
    logits = model(input_ids, padding_mask=mask)      # text: (b, n) ids, (b, n) bool (True = real token)
    logits = model(images=pixels)                     # ViT: (b, c, s, s) normalised pixels

:class:`HFClassifier` wraps a ``*ForSequenceClassification`` (BERT, MiniLM,
RoBERTa, DistilBERT) or ``ViTForImageClassification`` model converted with
:func:`~asap.integrations.hf.convert.convert`, and speaks the project's model
protocol: ``input_names``, logits out, and a serialisable ``.config``
(:class:`HFClassifierConfig`) that records the transformers config itself, so a
saved run rebuilds the model from its own ``config.json`` without the folder it
came from (``source`` is kept for the record only).

Importing this module registers the model type ``"hf_classifier"`` with
:mod:`asap.models` (``build_model``, ``model_config_from_dict``);
:func:`asap.integrations.provide_model_type` imports it when a saved run needs it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from asap.attention.module import AttentionConfig
from asap.errors import ConfigError
from asap.integrations.hf.convert import ARCHITECTURES, architecture, check_encoder, convert
from asap.integrations.hf.io import load_pretrained_classifier, local_folder
from asap.models import register_model

MODEL_TYPE = "hf_classifier"
TASKS = ("text", "image")
_AUTO = {"text": AutoModelForSequenceClassification, "image": AutoModelForImageClassification}
#: Bounds on the sizes a recorded transformers config may claim: far beyond any real encoder, small enough
#: that a config read from a run folder cannot make the loader build millions of modules.
MAX_SIZES = {"num_hidden_layers": 1024, "n_layers": 1024, "num_attention_heads": 4096, "n_heads": 4096,
             "hidden_size": 2**20, "dim": 2**20, "intermediate_size": 2**22, "hidden_dim": 2**22,
             "vocab_size": 2**24, "max_position_embeddings": 2**20, "type_vocab_size": 2**16,
             "image_size": 2**16, "patch_size": 2**16, "num_channels": 2**12}  # fmt: skip


@dataclass
class HFClassifierConfig:
    """What builds an :class:`HFClassifier`; round-trips through JSON (``to_dict`` / ``from_dict``).

    Attributes:
        source: the local folder the pretrained weights came from (absolute; for
            the record: a saved run's weights are its own).
        task: ``"text"`` or ``"image"`` (which head and inputs).
        num_classes: outputs of the classification head.
        hf_config: the transformers config of the classifier (``num_labels ==
            num_classes``), as JSON; the model is rebuilt from it.
        attention: the asap method and options the self-attention runs.
    """

    model_type: ClassVar[str] = MODEL_TYPE

    source: str
    task: str
    num_classes: int
    hf_config: dict[str, Any]
    attention: AttentionConfig = field(default_factory=AttentionConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"HFClassifierConfig.source must be a folder name, got {self.source!r:.60}")
        if self.task not in TASKS:
            raise ValueError(f"HFClassifierConfig.task must be one of {TASKS}, got {self.task!r:.60}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or not 1 <= self.num_classes <= 2**20:
            raise ValueError(f"HFClassifierConfig.num_classes must be an integer in [1, {2**20}], got {self.num_classes!r:.60}")
        if not isinstance(self.attention, AttentionConfig):
            raise TypeError(f"HFClassifierConfig.attention must be an AttentionConfig, got {type(self.attention).__name__}")
        if not isinstance(self.hf_config, dict):
            raise ValueError(f"HFClassifierConfig.hf_config must be a JSON object, got {type(self.hf_config).__name__}")
        self.hf_config = json.loads(json.dumps(self.hf_config))  # the JSON form, so that to_dict round-trips
        model_type = self.hf_config.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(f"hf_config.model_type must be one of {sorted(ARCHITECTURES)}, got {model_type!r:.60}")
        if ARCHITECTURES[model_type].task != self.task:
            raise ValueError(f"a {model_type!r} model is a {ARCHITECTURES[model_type].task} model, not {self.task}")
        for key, bound in MAX_SIZES.items():
            value = self.hf_config.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound):
                raise ValueError(f"hf_config.{key} must be an integer in [1, {bound}], got {value!r:.60}")
        labels = self.hf_config.get("id2label")
        if not isinstance(labels, dict) or len(labels) != self.num_classes:
            found = len(labels) if isinstance(labels, dict) else labels
            raise ValueError(f"hf_config.id2label must hold num_classes={self.num_classes} labels, got {found!r:.60}")

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "source": self.source, "task": self.task,
                "num_classes": self.num_classes, "hf_config": self.hf_config, "attention": self.attention.to_dict()}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HFClassifierConfig:
        """Rebuild from :meth:`to_dict`; unknown or missing fields are refused (``ValueError``)."""
        if not isinstance(data, dict):
            raise ValueError(f"HFClassifierConfig: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        if data.pop("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"config is not for model_type {MODEL_TYPE!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown, missing = sorted(set(data) - set(names), key=str), [n for n in names if n not in data]
        if unknown or missing:
            raise ValueError(f"HFClassifierConfig: unknown field(s) {unknown[:8]}, missing field(s) {missing}")
        attention = data["attention"]
        if not isinstance(attention, dict) or not isinstance(attention.get("method"), str) or not isinstance(
            attention.get("options", {}), dict
        ):
            raise ValueError(f"HFClassifierConfig.attention must be {{'method': str, 'options': {{...}}}}, got {attention!r:.80}")
        data["attention"] = AttentionConfig.from_dict(attention)
        return cls(**data)

    #: the run-config schema check of :mod:`asap.train.checkpoint` (``ValueError`` / ``TypeError`` naming the field).
    check_dict = from_dict

    def transformers_config(self) -> Any:
        """The transformers config object of :attr:`hf_config`."""
        return CONFIG_MAPPING[self.hf_config["model_type"]].from_dict(self.hf_config)

    def max_tokens(self) -> int | None:
        """The longest token sequence the model's position embeddings cover (text), else None."""
        if self.task != "text":
            return None
        positions = self.hf_config.get("max_position_embeddings")
        if self.hf_config["model_type"] == "roberta":  # positions start after the padding index
            positions -= int(self.hf_config.get("pad_token_id") or 0) + 1
        return positions

    def image_shape(self) -> tuple[int, int] | None:
        """``(channels, side)`` of the images a ViT takes, else None."""
        if self.task != "image":
            return None
        return int(self.hf_config.get("num_channels", 3)), int(self.hf_config.get("image_size", 224))


def classifier_config(path: str | os.PathLike, *, num_classes: int, attention: AttentionConfig) -> HFClassifierConfig:
    """The config of a classifier on the pretrained encoder in the local folder ``path`` (nothing is downloaded).

    Refused with one line naming the folder: no ``config.json``, an unsupported
    architecture, a decoder. The attention options are checked when the model
    is built (:func:`~asap.integrations.hf.convert.convert` refuses what the method does not take).
    """
    folder = local_folder(path)
    try:
        hf_config = AutoConfig.from_pretrained(folder, num_labels=num_classes, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder / 'config.json'}: not a transformers config ({err})".splitlines()[0]) from None
    arch = architecture(hf_config)
    check_encoder(hf_config)
    return HFClassifierConfig(
        source=str(folder.absolute()), task=arch.task, num_classes=num_classes,
        hf_config=json.loads(hf_config.to_json_string(use_diff=False)), attention=attention,
    )  # fmt: skip


class HFClassifier(nn.Module):
    """A converted transformers classifier with the project's model protocol.

    ``forward(input_ids, *, padding_mask)`` (text; ``padding_mask`` True = real
    token, the model's ``attention_mask``) or ``forward(images=...)`` (ViT)
    returns the logits ``(b, num_classes)``. ``HFClassifier(config)`` builds the
    model from ``config.hf_config`` with fresh weights (then load a state dict);
    :meth:`from_pretrained` loads the pretrained encoder from ``config.source``.
    """

    def __init__(self, config: HFClassifierConfig, *, model: nn.Module | None = None):
        super().__init__()
        if model is None:
            model = _AUTO[config.task].from_config(config.transformers_config())
            convert(model, config.attention.method, **config.attention.options)
        self.config = config
        self.model = model
        self.input_names: tuple[str, ...] = ("input_ids", "padding_mask") if config.task == "text" else ("images",)

    @classmethod
    def from_pretrained(cls, config: HFClassifierConfig) -> HFClassifier:
        """The encoder of ``config.source`` with a fresh head (seed torch first for a reproducible one), in float32."""
        model = load_pretrained_classifier(
            config.source, num_labels=config.num_classes, method=config.attention.method, **config.attention.options
        )
        return cls(config, model=model.float())

    def forward(self, input_ids: Tensor | None = None, *, padding_mask: Tensor | None = None,
                images: Tensor | None = None) -> Tensor:  # fmt: skip
        if self.config.task == "text":
            if input_ids is None:
                raise ValueError("a text classifier takes input_ids (b, n) and padding_mask (b, n)")
            return self.model(input_ids=input_ids, attention_mask=padding_mask).logits
        if images is None:
            raise ValueError("an image classifier takes images (b, c, s, s)")
        return self.model(pixel_values=images).logits

    def set_attention(self, method: str, **options: Any) -> HFClassifier:
        """Run every self-attention with another asap method (keeping the weights), as ``asap eval --method-override``."""
        convert(self.model, method, **options)
        self.config = dataclasses.replace(self.config, attention=AttentionConfig(method=method, options=dict(options)))
        return self


register_model(HFClassifierConfig, HFClassifier)

__all__ = ["MODEL_TYPE", "HFClassifier", "HFClassifierConfig", "classifier_config"]
