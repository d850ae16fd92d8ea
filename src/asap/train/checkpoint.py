"""Checkpoints without pickle: safetensors for every tensor, JSON for the rest.

A run directory holds

    config.json              model + train + data description, format and library versions
    model.safetensors        the model weights (all the compile stage and ``asap eval`` need)
    checkpoint.safetensors   everything ``--resume`` needs, in ONE file so that it is
                             always self-consistent: weights ("model/..."), AdamW state
                             ("optimizer/..."), RNG states ("rng/..."), running epoch sums
                             ("progress/..."); the non-tensor parts (param groups, scheduler,
                             counters) as JSON in the safetensors metadata header
    metrics.jsonl, tokenizer.json, eval_<split>.json

Every write is atomic and every JSON strict (:mod:`asap.io`: a temporary file
in the same directory, flushed, then ``os.replace``-d over the target; no bare
``NaN``/``Infinity``). ``torch.load`` (pickle) is never used.

Integrity: every weights file written by a run records in its own header the
sha256 of its tensors (:func:`tensors_sha256`: names, dtypes, shapes and bytes),
so the hash is written atomically with the weights; loading checks it, and
refuses non-finite weights. Runs written before the hash existed (no
``weights_sha256`` entry) still load, and are still checked for finiteness.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from asap.errors import AsapError, ConfigError
from asap.integrations import provide_model_type
from asap.io import atomic_write_bytes, atomic_write_json, dumps_strict, file_inside, read_json
from asap.models import ModelConfig, build_model, model_config_from_dict
from asap.models.config import MODEL_CONFIGS
from asap.train.config import TrainConfig

#: Version of the run-directory layout; bump on incompatible changes.
FORMAT_VERSION = 1

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
METRICS_FILE = "metrics.jsonl"
TOKENIZER_FILE = "tokenizer.json"
#: ``data.tokenizer_type`` of a text run: its own trained subword tokenizer, or a pretrained model's.
SUBWORD_TOKENIZER, PRETRAINED_TOKENIZER = "subword", "pretrained"
TOKENIZER_TYPES = (SUBWORD_TOKENIZER, PRETRAINED_TOKENIZER)
LOCK_FILE = ".lock"

#: Header entry of a weights file holding :func:`tensors_sha256` of its tensors.
HASH_KEY = "weights_sha256"


class CheckpointError(AsapError, RuntimeError):
    """A checkpoint or run directory that cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------- safetensors


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 over ``tensors`` in name order: each name, dtype and shape, then its bytes.

    A hash of the content rather than of the file, so that it can be stored in
    the file's own header (written atomically with the weights).
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, Tensor], *, metadata: dict[str, Any] | None = None,
    record_hash: bool = False,
) -> None:  # fmt: skip
    """Atomically save ``tensors`` (made contiguous, on CPU) with JSON-encoded ``metadata`` values.

    ``record_hash`` stores :func:`tensors_sha256` under ``weights_sha256``, which
    :func:`load_tensors` then checks.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {k: dumps_strict(v) for k, v in (metadata or {}).items()}
    if record_hash:
        header[HASH_KEY] = json.dumps(tensors_sha256(tensors))
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=header))


def _open_error(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: corrupted or not a safetensors file ({err})")


def read_header(path: str | os.PathLike) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict[str, Any]]:
    """``({name: (shape, dtype)}, metadata)`` of a safetensors file, from its header alone (no tensor is read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            out = {}
            for key in f.keys():
                piece = f.get_slice(key)
                dtype = safetensors.torch._TYPES.get(piece.get_dtype())
                if dtype is None:
                    raise ValueError(f"tensor {key!r} has unsupported dtype {piece.get_dtype()}")
                out[key] = (tuple(piece.get_shape()), dtype)
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except (safetensors.SafetensorError, OSError, ValueError, RecursionError) as err:
        raise _open_error(path, err) from None
    return out, meta


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a safetensors file written by :func:`save_tensors`: ``(tensors, metadata)`` (CPU).

    If the header records ``weights_sha256``, the tensors must match it.

    Raises:
        CheckpointError: missing, truncated, altered or otherwise unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: json.loads(v) for k, v in header.items()}
    except (safetensors.SafetensorError, OSError, ValueError, RecursionError) as err:
        raise _open_error(path, err) from None
    recorded = meta.pop(HASH_KEY, None)
    if recorded is not None and recorded != tensors_sha256(tensors):
        raise CheckpointError(
            f"{path}: the weights do not match the sha256 recorded when they were saved (the file was altered or damaged)"
        )
    return tensors, meta


def check_finite(tensors: dict[str, Tensor], *, source: str) -> None:
    """Raise a :class:`CheckpointError` naming ``source`` if a floating tensor holds NaN or infinity."""
    bad = [k for k, t in tensors.items() if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(
            f"{source}: non-finite values (NaN or infinity) in {bad[:8]}{' ...' if len(bad) > 8 else ''}; "
            "these weights cannot be used"
        )


def check_state_dict(module: nn.Module, tensors: dict[str, Tensor], *, source: str) -> None:
    """Raise a :class:`CheckpointError` unless ``tensors`` has exactly ``module``'s keys, shapes and dtypes."""
    check_shapes(
        {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()},
        {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()},
        source=source,
    )


def check_shapes(
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
    found: dict[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    source: str,
) -> None:
    """:func:`check_state_dict` on ``{name: (shape, dtype)}`` maps (e.g. a meta model against a file header)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{k}: file {found[k][0]} {found[k][1]}, model {shape} {dtype}"
        for k, (shape, dtype) in expected.items()
        if k in found and found[k] != (shape, dtype)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if mismatched:
        problems.append("shape/dtype mismatches: " + "; ".join(mismatched[:8]))
    if problems:
        raise CheckpointError(
            f"{source}: weights do not match the model described by its config ({' | '.join(problems)})"
        )


def _prefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}/{k}": v for k, v in tensors.items()}


def _strip(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}


# --------------------------------------------------------------------------- optimiser state


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors ``{"<param index>/<name>": t}`` and JSON metadata.

    Non-tensor per-parameter entries and the ``param_groups`` go to the metadata.
    """
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{index}/{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------- RNG state


def capture_rng_state(device: torch.device) -> dict[str, Tensor]:
    """This process's torch (CPU and, if used, CUDA), numpy and Python RNG states as fixed-size tensors.

    Fixed sizes let the states of all processes be gathered with one
    ``all_gather`` per entry (see :mod:`asap.train.distributed`).
    """
    np_state = np.random.get_state()
    py_version, py_keys, py_gauss = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_counters": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "python_keys": torch.tensor([py_version, *py_keys], dtype=torch.int64),
        "python_gauss": torch.tensor([py_gauss is not None, py_gauss or 0.0], dtype=torch.float64),
    }
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8), device)
    pos, has_gauss = state["numpy_counters"].tolist()
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, float(state["numpy_gauss"][0]))
    )
    py = state["python_keys"].tolist()
    has_py_gauss, py_gauss = state["python_gauss"].tolist()
    random.setstate((py[0], tuple(py[1:]), py_gauss if has_py_gauss else None))


# --------------------------------------------------------------------------- resumable checkpoint


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    rng: dict[str, Tensor],
    progress: dict[str, Any],
    progress_tensors: dict[str, Tensor],
) -> None:
    """Write the complete training state to one safetensors file, atomically.

    ``rng`` holds the RNG states of every process (stacked on dim 0), ``progress``
    JSON counters (epoch, batch, step, ...), ``progress_tensors`` running sums.
    ``scheduler`` None (a run without one) is stored as null.
    """
    opt_tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
    tensors = {
        **_prefixed("model", model.state_dict()),
        **_prefixed("optimizer", opt_tensors),
        **_prefixed("rng", rng),
        **_prefixed("progress", progress_tensors),
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "optimizer": opt_meta,
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "progress": progress,
    }
    save_tensors(path, tensors, metadata=meta, record_hash=True)


@dataclass
class ResumeState:
    """What :func:`load_checkpoint` gives back besides restoring model/optimiser/scheduler in place."""

    rng: dict[str, Tensor]
    progress: dict[str, Any]
    progress_tensors: dict[str, Tensor]


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
) -> ResumeState:
    """Restore ``model``, ``optimizer`` and ``scheduler`` in place from :func:`save_checkpoint`'s file."""
    check_shapes(_expected_shapes(model, prefix="model"), _header_part(read_header(path)[0], "model"), source=str(path))
    tensors, meta = load_tensors(path)
    for key in ("format_version", "optimizer", "scheduler", "progress"):
        if key not in meta:
            raise CheckpointError(f"{path}: not a training checkpoint (metadata entry {key!r} missing)")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta['format_version']!r}, this asap reads {FORMAT_VERSION}")
    progress = meta["progress"]
    needed = ("epoch", "batch_in_epoch", "global_step", "epoch_seconds", "elapsed_seconds", "world_size")
    if not isinstance(progress, dict) or any(k not in progress for k in needed):
        raise CheckpointError(f"{path}: progress entry malformed (expected the keys {list(needed)})")
    check_finite(tensors, source=str(path))
    weights = _strip("model", tensors)
    check_state_dict(model, weights, source=str(path))
    model.load_state_dict(weights)
    try:
        optimizer.load_state_dict(unflatten_optimizer_state(_strip("optimizer", tensors), meta["optimizer"]))
        if (scheduler is None) != (meta["scheduler"] is None):
            raise ValueError("the checkpoint was written " + ("without" if scheduler is not None else "with") + " a schedule")
        if scheduler is not None:
            scheduler.load_state_dict(meta["scheduler"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: optimizer or schedule state does not match the model ({err})") from None
    return ResumeState(_strip("rng", tensors), progress, _strip("progress", tensors))


def _expected_shapes(model: nn.Module, *, prefix: str | None = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    start = "" if prefix is None else prefix + "/"
    return {start + k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _header_part(header: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k: v for k, v in header.items() if k.startswith(prefix + "/")}


# --------------------------------------------------------------------------- run config + model


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_run_config(d: Any, *, source: str) -> None:
    """Check the structure of a run config (``config.json``, or the copy inside a compiled manifest).

    Types, required keys, every field of the model config present (a missing
    one is never filled with a default: the config must describe the weights),
    sizes within :data:`MAX_MODEL_SIZES`, the data description of its kind.
    Raises :class:`CheckpointError` naming ``source`` and the field.
    """
    if not isinstance(d, dict):
        raise _schema_error(source, "the run config", f"must be a JSON object, got {type(d).__name__}")
    if not _is_int(d.get("format_version")) or d["format_version"] != FORMAT_VERSION:
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
            if not _is_number(value):
                raise _schema_error(source, f"model.{f.name}", f"must be a finite number, got {value!r:.60}")
        elif f.name == "pooling":
            if not isinstance(value, str):
                raise _schema_error(source, "model.pooling", f"must be a string, got {value!r:.60}")
        elif not _is_int(value) or value < 1 or value > MAX_MODEL_SIZES.get(f.name, 2**31):
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
        if not _is_int(data.get("max_length")) or data["max_length"] < 1:
            raise _schema_error(source, "data.max_length", f"must be a positive integer, got {data.get('max_length')!r:.60}")
    elif kind == "image":
        for key in ("image_size", "in_channels"):
            if not _is_int(data.get(key)) or data[key] < 1:
                raise _schema_error(source, f"data.{key}", f"must be a positive integer, got {data.get(key)!r:.60}")
        for key in ("mean", "std"):
            values = data.get(key)
            if (not isinstance(values, list) or len(values) != data["in_channels"]
                    or not all(_is_number(v) for v in values)):  # fmt: skip
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
    check_shapes(_expected_shapes(skeleton), header, source=str(weights_path))
    del skeleton
    tensors, _ = load_tensors(weights_path)
    if is_checkpoint:
        tensors = _strip("model", tensors)
    check_finite(tensors, source=str(weights_path))
    model = build_model(run_config.model)
    check_state_dict(model, tensors, source=str(weights_path))
    model.load_state_dict(tensors)
    return model.to(device).eval(), run_config
