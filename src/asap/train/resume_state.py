"""The resumable state of a run in one safetensors file: weights, optimiser, schedule, RNG streams, progress.

``checkpoint.safetensors`` holds everything ``--resume`` needs in ONE file, so
that it is always self-consistent: weights ("model/..."), optimiser state
("optimizer/..."), RNG states of every process ("rng/..."), running epoch sums
("progress/..."); the non-tensor parts (param groups, schedule, counters) as
JSON in the safetensors metadata header.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from asap.train.layout import FORMAT_VERSION, CheckpointError
from asap.train.tensor_io import (
    check_finite,
    check_shapes,
    check_state_dict,
    expected_shapes,
    header_part,
    load_tensors,
    prefixed,
    read_header,
    save_tensors,
    strip_prefix,
)


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
        **prefixed("model", model.state_dict()),
        **prefixed("optimizer", opt_tensors),
        **prefixed("rng", rng),
        **prefixed("progress", progress_tensors),
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
    check_shapes(expected_shapes(model, prefix="model"), header_part(read_header(path)[0], "model"), source=str(path))
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
    weights = strip_prefix("model", tensors)
    check_state_dict(model, weights, source=str(path))
    model.load_state_dict(weights)
    try:
        optimizer.load_state_dict(unflatten_optimizer_state(strip_prefix("optimizer", tensors), meta["optimizer"]))
        if (scheduler is None) != (meta["scheduler"] is None):
            raise ValueError("the checkpoint was written " + ("without" if scheduler is not None else "with") + " a schedule")
        if scheduler is not None:
            scheduler.load_state_dict(meta["scheduler"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: optimizer or schedule state does not match the model ({err})") from None
    return ResumeState(strip_prefix("rng", tensors), progress, strip_prefix("progress", tensors))
