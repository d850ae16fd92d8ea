"""Fine-tuning a pretrained transformers encoder (``TrainConfig.pretrained = "hf:PATH"``).

The glue between the training loop and :mod:`asap.integrations.hf`: everything
that reads the pretrained folder is here, so that the loop itself does not
change. The folder gives

* the model config (:class:`~asap.integrations.hf.classifier.HFClassifierConfig`),
  checked against the data: text model for text data, sequences no longer than
  its position embeddings, images of the shape a ViT takes;
* the initial model: the pretrained encoder, a fresh head (drawn from the
  torch seed), its self-attention converted to the run's method;
* the tokenizer, which the run keeps as ``RUN_DIR/tokenizer.json``
  (:class:`asap.data.PretrainedTokenizer`), so evaluation and compilation
  read the run alone.

``transformers`` is the optional extra ``asap-attention[hf]``; without it a run
that asks for a pretrained model is refused with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from asap.data import PretrainedTokenizer
from asap.errors import ConfigError
from asap.models import ModelConfig, build_model
from asap.train.config import TrainConfig


def _hf(config: TrainConfig) -> Any:
    """The transformers adapter (:mod:`asap.integrations.hf.classifier`), or a one-line refusal."""
    try:
        from asap.integrations.hf import classifier
    except ImportError as err:
        raise ConfigError(
            f"--model {config.pretrained}: needs the transformers package: pip install 'asap-attention[hf]' ({err})"
        ) from None
    return classifier


def pretrained_folder(config: TrainConfig) -> Path:
    """The local folder of ``config.pretrained`` (``hf:PATH``)."""
    return Path(config.pretrained.partition(":")[2])


def pretrained_tokenizer(config: TrainConfig) -> PretrainedTokenizer:
    """The pretrained model's tokenizer, as the run keeps it."""
    _hf(config)
    from asap.integrations.hf.io import pretrained_tokenizer as load

    return load(pretrained_folder(config))


def pretrained_model_config(config: TrainConfig, data_info: dict[str, Any]) -> Any:
    """The classifier config for ``config.pretrained`` on the data ``data_info`` describes, or a one-line refusal."""
    hf = _hf(config)
    folder = pretrained_folder(config)
    model_config = hf.classifier_config(folder, num_classes=len(data_info["classes"]), attention=config.attention_config())
    if model_config.task != data_info["kind"]:
        raise ConfigError(
            f"--model {config.pretrained}: a {model_config.task} model cannot classify the {data_info['kind']} data of "
            f"{data_info['dataset']}"
        )
    positions = model_config.max_tokens()
    if positions is not None and config.max_length > positions:
        raise ConfigError(
            f"--max-length {config.max_length}: longer than the {positions} positions of the pretrained model in {folder}"
        )
    shape = model_config.image_shape()
    if shape is not None and shape != (data_info["in_channels"], data_info["image_size"]):
        (channels, side), have = shape, (data_info["in_channels"], data_info["image_size"])
        raise ConfigError(
            f"--model {config.pretrained}: the ViT takes {channels} x {side} x {side} images, {data_info['dataset']} has "
            f"{have[0]} x {have[1]} x {have[1]}; read them so with --data-option image_size={side}"
            + (" --data-option image_mode=RGB" if channels == 3 and have[0] != 3 else "")
        )
    return model_config


def initial_model(config: TrainConfig, model_config: ModelConfig | Any) -> nn.Module:
    """The model a run starts from: the pretrained encoder with a fresh head, or the project's model, freshly built.

    Seed torch first: the fresh weights (the head of a pretrained model) are drawn from the global generator.
    """
    if config.pretrained is not None:
        return _hf(config).HFClassifier.from_pretrained(model_config)
    return build_model(model_config)
