"""A run's ``config.json`` (:class:`RunConfig`: model, training options, data, versions), its schema,
and a trained model rebuilt from a run directory (:func:`load_model`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asap.errors import AsapError, ConfigError
from asap.integrations import provide_model_type
from asap.io import atomic_write_json, file_inside, is_finite_number, is_int, read_json
from asap.models import ModelConfig, build_model, model_config_from_dict
from asap.models.config import MODEL_CONFIGS
from asap.train.config import TrainConfig
from asap.train.layout import (
    CONFIG_FILE,
    FORMAT_VERSION,
    MODEL_FILE,
    SUBWORD_TOKENIZER,
    TOKENIZER_TYPES,
    CheckpointError,
)
from asap.train.tensor_io import (
    check_finite,
    check_shapes,
    check_state_dict,
    expected_shapes,
    load_tensors,
    read_header,
    save_tensors,
    strip_prefix,
)


def _version(dist_name: str) -> str:
    try:
        return importlib_metadata.version(dist_name)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def library_versions() -> dict[str, str]:
    """The versions a run records in its ``config.json``: asap and torch."""
    return {"asap": _version("asap-attention"), "torch": torch.__version__}


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    """``model.config`` as a dict: its ``to_dict()``, or the config itself when it is a dict (the model protocol)."""
    config = model.config
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


@dataclass
class RunConfig:
    """The contents of a run's ``config.json``.

    ``data`` describes the inputs the model expects: ``dataset``, ``kind``
    ("text" | "image"), ``classes``, for your own data (``SCHEME:PATH``, an
    absolute path) its ``data_options``, and for text ``tokenizer`` (file name
    in the run directory), ``tokenizer_type`` ("subword", the default, or
    "pretrained": a pretrained model's own) and ``max_length``; for images
    ``mean``/``std`` (per channel, on the 0..1 scale) used to normalise pixels.
    """

    model: ModelConfig
    train: TrainConfig
    data: dict[str, Any]
    format_version: int = FORMAT_VERSION
    versions: dict[str, str] = dataclasses.field(default_factory=library_versions)
    #: where the run was trained (:func:`asap.env.machine_info` and ``world_size``); informative only.
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "versions": self.versions,
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "data": self.data,
            "environment": self.environment,
        }

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "run config") -> RunConfig:
        """Rebuild from :meth:`to_dict` after checking its schema (:func:`validate_run_config`).

        Raises:
            CheckpointError: naming ``source`` and the first problem found.
        """
        validate_run_config(d, source=source)
        try:
            return cls(
                model=model_config_from_dict(d["model"]),
                train=TrainConfig.from_dict(d["train"]),
                data=d["data"],
                format_version=d["format_version"],
                versions=d.get("versions", {}),
                environment=d.get("environment", {}),
            )
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"{source}: invalid run config ({err})") from None


# --------------------------------------------------------------------------- run config schema

#: Upper bounds on a model config's sizes: far beyond any model this library trains, small
#: enough that a config cannot make the loader build millions of modules.
MAX_MODEL_SIZES = {"depth": 1024, "num_heads": 4096, "dim": 2**20, "vocab_size": 2**24, "max_length": 2**20,
                   "image_size": 2**16, "in_channels": 2**12, "num_classes": 2**20}  # fmt: skip


def _schema_error(source: str, where: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{source}: {where} {problem}")


def validate_run_config(d: Any, *, source: str) -> None:
    """Check the structure of a run config (``config.json``, or the copy inside a compiled manifest).

    Types, required keys, every field of the model config present (a missing
    one is never filled with a default: the config must describe the weights),
    sizes within :data:`MAX_MODEL_SIZES`, the data description of its kind.
    Raises :class:`CheckpointError` naming ``source`` and the field.
    """
    if not isinstance(d, dict):
        raise _schema_error(source, "the run config", f"must be a JSON object, got {type(d).__name__}")
    if not is_int(d.get("format_version")) or d["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{source}: format version {d.get('format_version')!r}, this asap reads {FORMAT_VERSION}")
    for key in ("model", "train", "data"):
        if not isinstance(d.get(key), dict):
            raise _schema_error(source, f"{key!r}", f"must be a JSON object, got {d.get(key)!r:.60}")
    for key in ("versions", "environment"):
        if key in d and not isinstance(d[key], dict):
            raise _schema_error(source, f"{key!r}", f"must be a JSON object, got {d[key]!r:.60}")
    _validate_model_dict(d["model"], source=source)
    _validate_data_dict(d["data"], source=source)


def _validate_model_dict(model: dict[str, Any], *, source: str) -> None:
    try:  # a model type defined by an adapter (a pretrained transformers classifier) is registered on import
        provide_model_type(model.get("model_type"))
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None
    cls = MODEL_CONFIGS.get(model.get("model_type"))
    if cls is None:
        raise _schema_error(source, "model.model_type", f"must be one of {sorted(MODEL_CONFIGS)}, got {model.get('model_type')!r}")
    check_dict = getattr(cls, "check_dict", None)
    if check_dict is not None:  # a config class that checks its own dict (its fields are not all sizes)
        try:
            check_dict(model)
        except (ValueError, TypeError) as err:
            raise _schema_error(source, "model", f"is invalid ({err})") from None
        return
    for f in dataclasses.fields(cls):
        if f.name not in model:
            raise _schema_error(source, f"model.{f.name}", "is missing")
        value = model[f.name]
        if f.name == "attention":
            if not isinstance(value, dict) or not isinstance(value.get("method"), str):
                raise _schema_error(source, "model.attention", f"must be {{'method': str, 'options': {{...}}}}, got {value!r:.80}")
            if not isinstance(value.get("options", {}), dict):
                raise _schema_error(source, "model.attention.options", f"must be a JSON object, got {value['options']!r:.60}")
        elif f.name in ("mlp_ratio", "dropout"):
            if not is_finite_number(value):
                raise _schema_error(source, f"model.{f.name}", f"must be a finite number, got {value!r:.60}")
        elif f.name == "pooling":
            if not isinstance(value, str):
                raise _schema_error(source, "model.pooling", f"must be a string, got {value!r:.60}")
        elif not is_int(value) or value < 1 or value > MAX_MODEL_SIZES.get(f.name, 2**31):
            bound = MAX_MODEL_SIZES.get(f.name, 2**31)
            raise _schema_error(source, f"model.{f.name}", f"must be an integer in [1, {bound}], got {value!r:.60}")
    unknown = sorted(set(model) - {f.name for f in dataclasses.fields(cls)} - {"model_type"}, key=str)
    if unknown:
        raise _schema_error(source, "model", f"has unknown field(s) {unknown[:8]}")


def _validate_data_dict(data: dict[str, Any], *, source: str) -> None:
    if not isinstance(data.get("dataset"), str):
        raise _schema_error(source, "data.dataset", f"must be a string, got {data.get('dataset')!r:.60}")
    classes = data.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise _schema_error(source, "data.classes", f"must be a non-empty list of strings, got {classes!r:.60}")
    if "data_options" in data and not isinstance(data["data_options"], dict):
        raise _schema_error(source, "data.data_options", f"must be a JSON object, got {data['data_options']!r:.60}")
    kind = data.get("kind")
    if kind == "text":
        if not isinstance(data.get("tokenizer"), str):
            raise _schema_error(source, "data.tokenizer", f"must be a file name, got {data.get('tokenizer')!r:.60}")
        if data.get("tokenizer_type", SUBWORD_TOKENIZER) not in TOKENIZER_TYPES:
            raise _schema_error(source, "data.tokenizer_type", f"must be one of {TOKENIZER_TYPES}, got {data['tokenizer_type']!r:.60}")
        if not is_int(data.get("max_length")) or data["max_length"] < 1:
            raise _schema_error(source, "data.max_length", f"must be a positive integer, got {data.get('max_length')!r:.60}")
    elif kind == "image":
        for key in ("image_size", "in_channels"):
            if not is_int(data.get(key)) or data[key] < 1:
                raise _schema_error(source, f"data.{key}", f"must be a positive integer, got {data.get(key)!r:.60}")
        for key in ("mean", "std"):
            values = data.get(key)
            if (not isinstance(values, list) or len(values) != data["in_channels"]
                    or not all(is_finite_number(v) for v in values)):  # fmt: skip
                raise _schema_error(source, f"data.{key}", f"must be {data['in_channels']} finite number(s), got {values!r:.60}")
        if not all(v > 0 for v in data["std"]):
            raise _schema_error(source, "data.std", f"must be positive, got {data['std']!r:.60}")
    else:
        raise _schema_error(source, "data.kind", f"must be 'text' or 'image', got {kind!r:.60}")


def write_run_config(run_dir: str | os.PathLike, config: RunConfig) -> None:
    atomic_write_json(Path(run_dir) / CONFIG_FILE, config.to_dict())


def read_json_file(path: str | os.PathLike, *, what: str = "file") -> Any:
    """Parse a JSON file, refusing what is not JSON (or absurdly large or deep) with a one-line CheckpointError."""
    return read_json(path, error=CheckpointError, what=what)


def read_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """Read and validate ``RUN_DIR/config.json``; a clear :class:`CheckpointError` if it is missing or malformed.

    The file names it holds (the tokenizer of a text run) must be plain names inside ``RUN_DIR``.
    """
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (is {run_dir} a run directory?)")
    config = RunConfig.from_dict(read_json_file(path, what="run config"), source=str(path))
    if config.data["kind"] == "text":
        try:
            file_inside(run_dir, config.data["tokenizer"], what=f"{path}: data.tokenizer")
        except AsapError as err:
            raise CheckpointError(str(err)) from None
    return config


def save_model(run_dir: str | os.PathLike, model: nn.Module, *, step: int) -> None:
    """Atomically write the weights to ``RUN_DIR/model.safetensors`` (the model config and the weights'
    sha256 ride along in its header)."""
    meta = {"format_version": FORMAT_VERSION, "step": step, "model": model_config_dict(model)}
    save_tensors(Path(run_dir) / MODEL_FILE, model.state_dict(), metadata=meta, record_hash=True)


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[nn.Module, RunConfig]:
    """Rebuild a trained model from a run directory (or a weights file in it: ``model.safetensors``,
    or the weights inside ``checkpoint.safetensors``).

    Returns ``(model in eval mode, RunConfig)``. The architecture comes from
    ``config.json``; the weights must match it exactly.

    Raises:
        CheckpointError: missing/corrupted files, or weights that do not fit the
            config (missing or extra keys, other shapes); the message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or weights file")
    run_dir, weights_path = (path, path / MODEL_FILE) if path.is_dir() else (path.parent, path)
    run_config = read_run_config(run_dir)
    header, header_meta = read_header(weights_path)
    is_checkpoint = "progress" in header_meta  # a resumable checkpoint: its weights are stored under "model/"
    if is_checkpoint:
        header = {k[len("model/") :]: v for k, v in header.items() if k.startswith("model/")}
    stored = header_meta.get("model")
    if stored is not None and stored != run_config.model.to_dict():
        raise CheckpointError(
            f"{weights_path}: written for a different model than {run_dir / CONFIG_FILE} describes"
        )
    try:
        with torch.device("meta"):  # shapes only: a config claiming a huge model allocates nothing
            skeleton = build_model(run_config.model)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{run_dir / CONFIG_FILE}: cannot build its model ({err})") from None
    check_shapes(expected_shapes(skeleton), header, source=str(weights_path))
    del skeleton
    tensors, _ = load_tensors(weights_path)
    if is_checkpoint:
        tensors = strip_prefix("model", tensors)
    check_finite(tensors, source=str(weights_path))
    model = build_model(run_config.model)
    check_state_dict(model, tensors, source=str(weights_path))
    model.load_state_dict(tensors)
    return model.to(device).eval(), run_config
