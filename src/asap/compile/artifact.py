"""The compiled-model artifact: ``model.safetensors`` + ``manifest.json``, and its strict loader.

Layout of ``OUT_DIR``::

    model.safetensors   every weight of the compiled model (teacher weights + fitted dual maps)
    manifest.json       what the weights are and how they were made (below)
    tokenizer.json      copied from the teacher run when it has one (text models)
    fidelity.json/.png  the fidelity report (written by ``asap compile``)

The manifest holds: the format name and version; the sha256 of the teacher's
weights (the source) and of ``model.safetensors``; the model config (the
teacher's, Sinkhorn everywhere) and the run config (data description) the
model needs; for every compiled layer its module name, teacher ``K`` and
``eps``, ``scale``, heads, head size, slices (type, L, seed), extra features; the fit options,
the calibration size and the fidelity figures.

Loading rebuilds the teacher architecture from the config, replaces the
compiled layers' operators by ASAP operators of the recorded shapes, and loads
the weights with strict key/shape/dtype checks. It refuses, with a message
naming the file and the problem: a missing file, a manifest of another format
or version, weights whose hash is not the manifest's (corrupted, truncated or
replaced), an unreadable safetensors file, a layer the config does not have,
or tensors that do not fit. Every file is written atomically (temporary file,
fsync, rename), the manifest last: a crash leaves no manifest pointing at
half-written weights.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asap.attention.dual_map import SliceDualMap
from asap.attention.operators import AsapOperator, SinkhornOperator
from asap.compile.maps import build_dual_map
from asap.models import build_model, model_config_from_dict
from asap.io import read_json
from asap.train.checkpoint import CheckpointError, atomic_write_json, check_state_dict, load_tensors, save_tensors

FORMAT = "asap-compiled"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"


class ArtifactError(CheckpointError):
    """A compiled artifact that cannot be used; the message names the file and the problem."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def compiled_layers(model: nn.Module) -> list[dict[str, Any]]:
    """Description of every ASAP operator of ``model`` (module name, shapes, slices, eps, scale)."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, AsapOperator):
            dual_map = module.dual_map
            if not isinstance(dual_map, SliceDualMap):
                raise ArtifactError(f"{name}: only SliceDualMap dual maps can be saved, got {type(dual_map).__name__}")
            layers.append({
                "name": name,
                "eps": module.eps,
                "scale": module.scale,
                "num_heads": dual_map.num_heads,
                "head_dim": dual_map.head_dim,
                "slices": {"type": dual_map.slice_type, "num": dual_map.num_slices, "seed": int(dual_map.seed)},
                "extra_features": list(getattr(dual_map, "extra_features", ())),
            })  # fmt: skip
    return layers


def save_compiled(
    out_dir: str | os.PathLike,
    model: nn.Module,
    *,
    report: dict[str, Any],
    run_config: dict[str, Any] | None = None,
    source_sha256: str | None = None,
    copy_files: list[str | os.PathLike] = (),
) -> Path:
    """Write the artifact of a compiled asap model (one with a ``.config``) to ``out_dir``.

    ``report`` is :func:`~asap.compile.compile_model`'s report (options,
    calibration, fidelity); its per-layer teacher ``K`` goes into the layer
    entries. ``run_config`` is the teacher run's ``config.json`` contents (so
    evaluation finds the data description and tokenizer); ``copy_files`` are
    copied beside the weights (e.g. the tokenizer). Returns ``out_dir``.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ArtifactError(f"{type(model).__name__} has no serialisable .config: only asap models can be saved")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = compiled_layers(model)
    teacher = {layer["name"]: layer for layer in report.get("layers", [])}
    for layer in layers:
        source = teacher.get(layer["name"], {})
        layer["teacher"] = {"n_iters": source.get("n_iters"), "eps": source.get("eps", layer["eps"])}
    for path in copy_files:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: file to copy into the artifact not found")
        shutil.copyfile(path, out / path.name)
    weights = out / WEIGHTS_FILE
    save_tensors(weights, model.state_dict(), metadata={"format": FORMAT, "format_version": FORMAT_VERSION})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(weights)},
        "source": {"checkpoint_sha256": source_sha256},
        "model_config": config.to_dict(),
        "run_config": run_config,
        "compiled_layers": layers,
        "options": report.get("options"),
        "calibration": report.get("calibration"),
        "fidelity": report.get("layers"),
        "accuracy": report.get("accuracy"),
    }
    atomic_write_json(out / MANIFEST_FILE, manifest)
    return out


def read_manifest(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """``(artifact dir, manifest)`` from an artifact directory or its ``manifest.json``; format checked."""
    path = Path(path)
    directory, manifest_path = (path, path / MANIFEST_FILE) if path.is_dir() else (path.parent, path)
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path}: file not found (is {directory} a compiled model from `asap compile`?)")
    manifest = read_json(manifest_path, error=ArtifactError, what="manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path}: not an {FORMAT!r} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path}: format version {manifest.get('format_version')!r}, this asap reads {FORMAT_VERSION}"
        )
    for key in ("weights", "model_config", "compiled_layers"):
        if key not in manifest:
            raise ArtifactError(f"{manifest_path}: missing field {key!r}")
    return directory, manifest


def _install_asap_operators(model: nn.Module, layers: list[dict[str, Any]], *, source: str) -> None:
    """Replace the named Sinkhorn operators of a freshly built teacher by empty ASAP operators of the recorded shapes."""
    for layer in layers:
        name = layer["name"]
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            current = getattr(parent, attr)
        except AttributeError:
            raise ArtifactError(
                f"{source}: compiled layer {name!r} does not exist in the model its config describes"
            ) from None
        if not isinstance(current, SinkhornOperator):
            kind = type(current).__name__
            raise ArtifactError(f"{source}: {name!r} is a {kind} in the config's model, not a Sinkhorn layer")
        slices = layer["slices"]
        try:
            dual_map = build_dual_map(
                num_heads=layer["num_heads"], head_dim=layer["head_dim"], num_slices=slices["num"],
                slice_type=slices["type"], seed=slices["seed"], extra_features=tuple(layer.get("extra_features", ())),
            )  # fmt: skip
        except (KeyError, ValueError, TypeError) as err:
            raise ArtifactError(f"{source}: invalid description of compiled layer {name!r} ({err})") from None
        operator = AsapOperator(
            num_heads=layer["num_heads"], head_dim=layer["head_dim"], eps=layer["eps"], scale=layer["scale"],
            dual_map=dual_map,
        )  # fmt: skip
        setattr(parent, attr, operator)


def load_compiled(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a compiled model: ``(model in eval mode, manifest)``.

    Raises:
        ArtifactError: missing or mismatched files, corrupted weights, wrong shapes (see the module docstring).
    """
    directory, manifest = read_manifest(path)
    weights = directory / manifest["weights"].get("file", WEIGHTS_FILE)
    if not weights.is_file():
        raise ArtifactError(f"{weights}: file not found (the manifest in {directory} refers to it)")
    digest = sha256_file(weights)
    if digest != manifest["weights"].get("sha256"):
        raise ArtifactError(
            f"{weights}: sha256 {digest[:12]}... does not match the manifest's "
            f"{str(manifest['weights'].get('sha256'))[:12]}... "
            "(the weights are corrupted, truncated or from another compilation)"
        )
    try:
        tensors, meta = load_tensors(weights)
    except CheckpointError as err:
        raise ArtifactError(str(err)) from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{weights}: not written by `asap compile` (format {meta.get('format')!r})")
    try:
        model = build_model(model_config_from_dict(manifest["model_config"]))
    except (ValueError, TypeError) as err:
        raise ArtifactError(f"{directory / MANIFEST_FILE}: invalid model config ({err})") from None
    _install_asap_operators(model, manifest["compiled_layers"], source=str(directory / MANIFEST_FILE))
    try:
        check_state_dict(model, tensors, source=str(weights))
    except CheckpointError as err:
        raise ArtifactError(str(err)) from None
    model.load_state_dict(tensors, strict=True)
    unfitted = [name for name, m in model.named_modules() if isinstance(m, SliceDualMap) and not bool(m.fitted)]
    if unfitted:
        raise ArtifactError(f"{weights}: dual maps {unfitted} were saved unfitted")
    return model.to(device).eval(), manifest
