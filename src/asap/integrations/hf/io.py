"""Saving and loading converted models, and local pretrained classifiers and tokenizers (nothing downloaded).

A converted model is saved as a folder::

    config.json          the model's own transformers config (config.save_pretrained)
    asap_attention.json  the model class, the asap method and its options (format "asap-hf-converted")
    model.safetensors    every tensor of the state dict, asap operators included (safetensors, no pickle)

:func:`load_converted` rebuilds the model from ``config.json`` (the class named in
``asap_attention.json``, which must be one of the supported architectures' model
classes), converts it with the recorded method and options, and loads the weights
strictly: a missing, unexpected or mis-shaped tensor is an error naming the file.
The folder is also readable by transformers itself (``AutoModel.from_pretrained``
ignores the asap operators' tensors and gives the plain softmax model).

Only the converted operators are saved this way. A model whose Sinkhorn operators
``asap compile`` replaced by fitted ASAP operators is a compiled model, saved by the
compile stage's artifact; :func:`save_converted` refuses it rather than write a file
that would load into something else.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from asap.attention import OPERATORS
from asap.attention.dual_map import SliceDualMap
from asap.data.tokenizer import PretrainedTokenizer
from asap.errors import ConfigError
from asap.io import atomic_write_json, check_format, read_json
from asap.integrations.hf.convert import architecture, conversion, converted_operators, convert

FORMAT = "asap-hf-converted"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
ATTENTION_FILE = "asap_attention.json"
WEIGHTS_FILE = "model.safetensors"
#: Constructor flags of transformers model classes that change which tensors exist (recorded so the rebuild matches).
STRUCTURE_FLAGS = ("add_pooling_layer", "use_mask_token")
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _structure(model: PreTrainedModel) -> dict[str, bool]:
    """The :data:`STRUCTURE_FLAGS` the model's class takes, read back from the modules they create.

    Only base models take them (``BertModel(config, add_pooling_layer=False)``);
    task models build their base model themselves.
    """
    params = inspect.signature(type(model).__init__).parameters
    flags: dict[str, bool] = {}
    if "add_pooling_layer" in params:
        flags["add_pooling_layer"] = getattr(model, "pooler", None) is not None
    if "use_mask_token" in params:
        flags["use_mask_token"] = getattr(getattr(model, "embeddings", None), "mask_token", None) is not None
    return flags


def _check_savable(model: nn.Module) -> dict[str, Any]:
    """The JSON record of a converted model; refuse models whose operators are not the converted ones."""
    config = conversion(model)
    expected = OPERATORS[config.method]
    for name, operator in converted_operators(model):
        replaced = type(operator) is not expected or (
            config.method == "asap" and type(getattr(operator, "dual_map", None)) is not SliceDualMap
        )
        if replaced:
            raise ConfigError(
                f"{name}.asap_operator is a {type(operator).__name__}, not the {expected.__name__} the model was "
                "converted to (compiled by `asap compile`?); save a compiled model with the compile stage's artifact"
            )
    try:
        json.dumps(config.options)
    except TypeError:
        raise ConfigError(
            f"the {config.method!r} options {sorted(config.options)} are not all JSON values; they cannot be saved"
        ) from None
    dtype = next(model.parameters()).dtype
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "structure": _structure(model),
        "attention": config.to_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        "transformers_version": transformers.__version__,
    }


def save_converted(model: PreTrainedModel, path: str | os.PathLike) -> Path:
    """Save a converted model to the folder ``path`` (created if needed): config, asap options, safetensors weights.

    Returns the folder. Sets ``model.config.architectures`` to the model class (as
    ``save_pretrained`` does). Overwrites the three files if they exist; nothing else in
    the folder is touched. Refuses a model that was not converted, or whose
    operators were replaced since (compiled), before writing anything.
    """
    record = _check_savable(model)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    # save_model drops duplicate names of tied tensors (e.g. an MLM decoder tied to the embeddings).
    save_model(model, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "asap_format": FORMAT})
    atomic_write_json(folder / ATTENTION_FILE, record)
    return folder


def _read_record(folder: Path) -> dict[str, Any]:
    path = folder / ATTENTION_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (is {folder} a model saved by save_converted?)")
    record = read_json(path, error=ConfigError, what="asap attention record")
    check_format(record, fmt=FORMAT, version=FORMAT_VERSION, source=path, error=ConfigError)
    attention = record.get("attention")
    if not isinstance(attention, dict) or not isinstance(attention.get("options", {}), dict):
        raise ConfigError(f"{path}: field 'attention' must be {{'method': ..., 'options': {{...}}}}")
    structure = record.get("structure", {})
    if not isinstance(structure, dict) or any(
        key not in STRUCTURE_FLAGS or not isinstance(val, bool) for key, val in structure.items()
    ):
        raise ConfigError(f"{path}: field 'structure' must map {list(STRUCTURE_FLAGS)} to booleans")
    if record.get("dtype") not in FLOAT_DTYPES:
        raise ConfigError(f"{path}: dtype must be one of {sorted(FLOAT_DTYPES)}, got {record.get('dtype')!r}")
    return record


def _model_class(name: object, config: Any, *, source: Path) -> type[PreTrainedModel]:
    """The transformers class ``name``, accepted only if it is a model class of the config's (supported) type."""
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ConfigError(f"{source}: model_class {name!r} is not a transformers model class")
    config_class = getattr(cls, "config_class", None)
    if config_class is None or getattr(config_class, "model_type", None) != config.model_type:
        raise ConfigError(f"{source}: model_class {name!r} does not take a {config.model_type!r} config")
    return cls


def load_converted(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Load a folder written by :func:`save_converted`: the converted model, in eval mode, on ``device``.

    Nothing is downloaded: the model is built from the folder's ``config.json``.
    Raises :class:`~asap.errors.ConfigError` naming the file on a missing or
    invalid file, an unknown model class, or weights that do not match the model
    exactly.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder (expected a model saved by save_converted)")
    record = _read_record(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(f"{folder / CONFIG_FILE}: file not found")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder / CONFIG_FILE}: not a transformers config ({err})".splitlines()[0]) from None
    architecture(config)
    cls = _model_class(record.get("model_class"), config, source=folder / ATTENTION_FILE)
    model = cls(config, **record.get("structure", {}))
    attention = record["attention"]
    convert(model, attention.get("method"), **attention.get("options", {}))
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"{weights}: file not found")
    try:
        load_model(model, str(weights), strict=True)
    except (RuntimeError, SafetensorError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{weights}: does not match the model its config describes ({first})") from None
    return model.to(device=device, dtype=FLOAT_DTYPES[record["dtype"]]).eval()


def local_folder(path: str | os.PathLike) -> Path:
    """``path`` as a local pretrained-model folder (one holding ``config.json``); never a hub name."""
    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(
            f"{folder}: not a local model folder with {CONFIG_FILE} (models are read from local folders only; "
            "nothing is downloaded)"
        )
    return folder


def load_pretrained_classifier(
    path: str | os.PathLike, *, num_labels: int, method: str = "softmax", **options: Any
) -> PreTrainedModel:
    """A pretrained encoder from a local folder with a fresh classification head, converted to ``method``.

    Text models (BERT, MiniLM, RoBERTa, DistilBERT) load as
    ``AutoModelForSequenceClassification``, ViT as ``AutoModelForImageClassification``,
    with ``local_files_only=True``; the encoder keeps its pretrained weights, the head
    of ``num_labels`` outputs is initialised by transformers (seed torch first for a
    reproducible head; a head of another size in the checkpoint is re-initialised).
    ``options`` are ``method``'s options, as for :func:`convert`. Call it as
    ``model(input_ids=..., attention_mask=..., labels=...)`` (text) or
    ``model(pixel_values=..., labels=...)`` (ViT); ``.logits`` is ``(b, num_labels)``.
    """
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
        raise ConfigError(f"num_labels must be a positive int, got {num_labels!r}")
    folder = local_folder(path)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    arch = architecture(config)
    auto = transformers.AutoModelForImageClassification if arch.task == "image" else (
        transformers.AutoModelForSequenceClassification
    )  # fmt: skip
    model = auto.from_pretrained(folder, num_labels=num_labels, local_files_only=True, ignore_mismatched_sizes=True)
    return convert(model, method, **options)


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved in a local model folder (``AutoTokenizer``, ``local_files_only=True``).

    Call it as ``tokenizer(texts, padding=True, truncation=True, max_length=n,
    return_tensors="pt")``; its ``attention_mask`` (1 = real token) is the padding
    mask the converted model expects.
    """
    folder = local_folder(path)
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder}: no tokenizer could be loaded ({err})".splitlines()[0]) from None


def pretrained_tokenizer(path: str | os.PathLike) -> PretrainedTokenizer:
    """The tokenizer of a local model folder as an :class:`asap.data.PretrainedTokenizer` (what a run keeps).

    It is the fast tokenizer's ``tokenizers`` backend with its padding id, so it
    encodes exactly as ``tokenizer(texts, truncation=True, max_length=n)`` does.
    Refused, naming the folder: a tokenizer with no fast version, or no pad token.
    """
    tokenizer = load_tokenizer(path)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"{path}: its tokenizer ({type(tokenizer).__name__}) has no fast version (tokenizer.json); asap keeps the "
            "fast tokenizer's backend with a run"
        )
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"{path}: its tokenizer has no pad token, so batches of several lengths cannot be padded")
    try:
        return PretrainedTokenizer(tokenizer.backend_tokenizer, pad_id=int(tokenizer.pad_token_id))
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None


__all__ = [
    "ATTENTION_FILE",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "load_converted",
    "load_pretrained_classifier",
    "load_tokenizer",
    "local_folder",
    "pretrained_tokenizer",
    "save_converted",
]
