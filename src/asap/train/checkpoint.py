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

Every write goes to a temporary file in the same directory, is flushed to disk
and then ``os.replace``-d over the target: an interrupted write leaves the
previous good file untouched. ``torch.load`` (pickle) is never used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import tempfile
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from asap.models import ModelConfig, build_model, model_config_from_dict
from asap.train.config import TrainConfig

#: Version of the run-directory layout; bump on incompatible changes.
FORMAT_VERSION = 1

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
METRICS_FILE = "metrics.jsonl"
TOKENIZER_FILE = "tokenizer.json"


_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointError(RuntimeError):
    """A checkpoint or run directory that cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


# --------------------------------------------------------------------------- safetensors


def save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], *, metadata: dict[str, Any] | None = None) -> None:
    """Atomically save ``tensors`` (made contiguous, on CPU) with JSON-encoded ``metadata`` values."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=header))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a safetensors file written by :func:`save_tensors`: ``(tensors, metadata)`` (CPU).

    Raises:
        CheckpointError: missing, truncated or otherwise unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: json.loads(v) for k, v in header.items()}
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupted or not a safetensors file ({err})") from None
    return tensors, meta


def check_state_dict(module: nn.Module, tensors: dict[str, Tensor], *, source: str) -> None:
    """Raise a :class:`CheckpointError` unless ``tensors`` has exactly ``module``'s keys, shapes and dtypes."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{k}: file {tuple(tensors[k].shape)} {tensors[k].dtype}, model {tuple(v.shape)} {v.dtype}"
        for k, v in expected.items()
        if k in tensors and (tensors[k].shape != v.shape or tensors[k].dtype != v.dtype)
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
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng: dict[str, Tensor],
    progress: dict[str, Any],
    progress_tensors: dict[str, Tensor],
) -> None:
    """Write the complete training state to one safetensors file, atomically.

    ``rng`` holds the RNG states of every process (stacked on dim 0), ``progress``
    JSON counters (epoch, batch, step, ...), ``progress_tensors`` running sums.
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
        "scheduler": scheduler.state_dict(),
        "progress": progress,
    }
    save_tensors(path, tensors, metadata=meta)


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
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> ResumeState:
    """Restore ``model``, ``optimizer`` and ``scheduler`` in place from :func:`save_checkpoint`'s file."""
    tensors, meta = load_tensors(path)
    for key in ("format_version", "optimizer", "scheduler", "progress"):
        if key not in meta:
            raise CheckpointError(f"{path}: not a training checkpoint (metadata entry {key!r} missing)")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta['format_version']}, this asap reads {FORMAT_VERSION}")
    weights = _strip("model", tensors)
    check_state_dict(model, weights, source=str(path))
    model.load_state_dict(weights)
    try:
        optimizer.load_state_dict(unflatten_optimizer_state(_strip("optimizer", tensors), meta["optimizer"]))
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: optimizer state does not match the model ({err})") from None
    scheduler.load_state_dict(meta["scheduler"])
    return ResumeState(_strip("rng", tensors), meta["progress"], _strip("progress", tensors))


# --------------------------------------------------------------------------- run config + model


def _version(dist_name: str) -> str:
    try:
        return importlib_metadata.version(dist_name)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class RunConfig:
    """The contents of a run's ``config.json``.

    ``data`` describes the inputs the model expects: ``dataset``, ``kind``
    ("text" | "image"), ``classes``, and for text ``tokenizer`` (file name in
    the run directory) and ``max_length``; for images ``mean``/``std`` (per
    channel, on the 0..1 scale) used to normalise pixels.
    """

    model: ModelConfig
    train: TrainConfig
    data: dict[str, Any]
    format_version: int = FORMAT_VERSION
    versions: dict[str, str] = dataclasses.field(
        default_factory=lambda: {"asap": _version("asap-attention"), "torch": torch.__version__}
    )
    #: where the run was trained (see :func:`describe_environment`); informative only.
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
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return cls(
            model=model_config_from_dict(d["model"]),
            train=TrainConfig.from_dict(d["train"]),
            data=d["data"],
            format_version=d["format_version"],
            versions=d.get("versions", {}),
            environment=d.get("environment", {}),
        )


def describe_environment(device: torch.device, world_size: int) -> dict[str, Any]:
    """The hardware a run uses, for reports: device, processes, CPU model and cores, torch threads."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env: dict[str, Any] = {
        "device": str(device),
        "world_size": world_size,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def write_run_config(run_dir: str | os.PathLike, config: RunConfig) -> None:
    atomic_write_json(Path(run_dir) / CONFIG_FILE, config.to_dict())


def read_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """Read ``RUN_DIR/config.json``; a clear :class:`CheckpointError` if it is missing or malformed."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (is {run_dir} a run directory?)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        found = raw.get("format_version") if isinstance(raw, dict) else None
        raise CheckpointError(f"{path}: format version {found!r}, this asap reads {FORMAT_VERSION}")
    try:
        return RunConfig.from_dict(raw)
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: invalid run config ({err})") from None


def save_model(run_dir: str | os.PathLike, model: nn.Module, *, step: int) -> None:
    """Atomically write the weights to ``RUN_DIR/model.safetensors`` (the model config rides along)."""
    meta = {"format_version": FORMAT_VERSION, "step": step, "model": model.config.to_dict()}
    save_tensors(Path(run_dir) / MODEL_FILE, model.state_dict(), metadata=meta)


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
    run_dir, weights_path = (path, path / MODEL_FILE) if path.is_dir() else (path.parent, path)
    run_config = read_run_config(run_dir)
    tensors, meta = load_tensors(weights_path)
    if "progress" in meta:  # a resumable checkpoint: its weights are stored under "model/"
        tensors = _strip("model", tensors)
    stored = meta.get("model")
    if stored is not None and stored != run_config.model.to_dict():
        raise CheckpointError(
            f"{weights_path}: written for a different model than {run_dir / CONFIG_FILE} describes"
        )
    model = build_model(run_config.model)
    check_state_dict(model, tensors, source=str(weights_path))
    model.load_state_dict(tensors)
    return model.to(device).eval(), run_config
