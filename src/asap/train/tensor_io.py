"""Weights files without pickle: safetensors in and out, with a content hash and checks against a model.

Integrity: every weights file written by a run records in its own header the
sha256 of its tensors (:func:`tensors_sha256`: names, dtypes, shapes and bytes),
so the hash is written atomically with the weights; loading checks it, and
refuses non-finite weights. Runs written before the hash existed (no
``weights_sha256`` entry) still load, and are still checked for finiteness.

One file may hold several state dicts side by side under prefixes
(``"model/..."``, ``"optimizer/..."``): :func:`prefixed`, :func:`strip_prefix`,
:func:`header_part`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from asap.io import atomic_write_bytes, dumps_strict
from asap.train.layout import CheckpointError

#: Header entry of a weights file holding :func:`tensors_sha256` of its tensors.
HASH_KEY = "weights_sha256"


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


def prefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` with names ``PREFIX/name`` (one part of a file holding several)."""
    return {f"{prefix}/{k}": v for k, v in tensors.items()}


def strip_prefix(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors named ``PREFIX/name``, as ``name`` (inverse of :func:`prefixed`)."""
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}


def expected_shapes(model: nn.Module, *, prefix: str | None = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{name: (shape, dtype)}`` of ``model``'s state dict (names under ``PREFIX/`` when given), for :func:`check_shapes`."""
    start = "" if prefix is None else prefix + "/"
    return {start + k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def header_part(header: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of a :func:`read_header` map named ``PREFIX/...``."""
    return {k: v for k, v in header.items() if k.startswith(prefix + "/")}
