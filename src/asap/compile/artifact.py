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
``eps``, ``scale``, heads, head size, slices (type, L, seed), extra features,
the dual map (``map``: ``kind`` and its ``options``; absent in artifacts older
than the map family: linear) and the warm-start ``extra_steps`` (absent: 0);
the fit options, the calibration size and the fidelity figures (with
``target_tv``, each layer's choice and the candidates it measured).

Loading trusts nothing in the folder (an artifact may come from someone else)
and checks, in this order, before anything large is read or allocated:

1. the manifest's schema (:func:`validate_manifest`): types, required keys,
   sizes within bounds; one :class:`ManifestError` naming the file and field;
2. the weights file name: a plain name inside the artifact folder
   (:func:`asap.io.file_inside`), else :class:`UnsafeArtifactPathError`, and
   no file outside the folder is opened, hashed or named by its hash;
3. the safetensors *header* of the weights (names, shapes, dtypes; no tensor
   read) against the model the manifest describes, built on the ``meta``
   device (so ``dim = 65536`` allocates nothing);
4. the sha256 of the weights, then the tensors themselves (finite values),
   and only then the real model is built and loaded strictly. Every file is written atomically (temporary file,
fsync, rename), the manifest last: a crash leaves no manifest pointing at
half-written weights.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asap.attention.dual_map import DUAL_MAPS, EXTRA_FEATURES, SLICE_TYPES, DualMap
from asap.attention.operators import AsapOperator, SinkhornOperator
from asap.attention.submodules import find_modules, get_module, replace_module
from asap.errors import ConfigError, UnsafePathError
from asap.io import atomic_write_json, check_format, file_inside, is_finite_number, is_int, read_json
from asap.models import build_model, model_config_from_dict
from asap.train.checkpoint import (
    CheckpointError,
    _validate_model_dict,
    check_finite,
    check_shapes,
    check_state_dict,
    load_tensors,
    read_header,
    save_tensors,
)

FORMAT = "asap-compiled"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"


#: Bounds of a compiled layer's description: far beyond any real model, small enough that a
#: manifest cannot describe an absurd one (the header comparison catches the rest before allocation).
MAX_LAYER_SIZES = {"num_heads": 4096, "head_dim": 2**16, "slices.num": 2**16}
MAX_COMPILED_LAYERS = 4096
#: Warm-start half-steps a manifest may ask of a compiled layer.
MAX_EXTRA_STEPS = 1024


class ArtifactError(CheckpointError):
    """A compiled artifact that cannot be used; the message names the file and the problem."""


class ManifestError(ArtifactError, ConfigError):
    """A manifest whose structure is wrong (type, missing key, size); names the file and the field."""


class UnsafeArtifactPathError(ArtifactError, UnsafePathError):
    """A file name in a manifest that is not a plain name inside the artifact folder."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def compiled_layers(model: nn.Module) -> list[dict[str, Any]]:
    """Description of every ASAP operator of ``model`` (module name, shapes, slices, eps, scale)."""
    layers = []
    for found in find_modules(model, AsapOperator):
        name, module = found.name, found.module
        if len(found.aliases) > 1:
            raise ArtifactError(f"{name}: an ASAP operator shared under several names {list(found.aliases)} cannot be "
                                "saved in this format (asap.compile.save_compiled_module can)")  # fmt: skip
        dual_map = module.dual_map
        if not isinstance(dual_map, DualMap):
            raise ArtifactError(f"{name}: only the registered dual-map kinds can be saved, got {type(dual_map).__name__}")
        layers.append({
            "name": name,
            "eps": module.eps,
            "scale": module.scale,
            "num_heads": dual_map.num_heads,
            "head_dim": dual_map.head_dim,
            "slices": {"type": dual_map.slice_type, "num": dual_map.num_slices, "seed": int(dual_map.seed)},
            "extra_features": list(getattr(dual_map, "extra_features", ())),
            "map": {"kind": dual_map.kind, "options": dual_map.map_options},
            "extra_steps": module.extra_steps,
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


def locate_manifest(path: str | os.PathLike, *, saved_as: str) -> tuple[Path, Path]:
    """``(folder, manifest path)`` from a folder or its ``manifest.json``; :class:`ArtifactError` when that file
    does not exist, asking whether the folder is ``saved_as`` (what writes such manifests)."""
    path = Path(path)
    directory, manifest_path = (path, path / MANIFEST_FILE) if path.is_dir() else (path.parent, path)
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path}: file not found (is {directory} {saved_as}?)")
    return directory, manifest_path


def read_manifest(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """``(artifact dir, manifest)`` from an artifact directory or its ``manifest.json``; format checked."""
    directory, manifest_path = locate_manifest(path, saved_as="a compiled model from `asap compile`")
    manifest = check_format(read_json(manifest_path, error=ArtifactError, what="manifest"), fmt=FORMAT,
                            version=FORMAT_VERSION, source=manifest_path, error=ArtifactError, kind="manifest")  # fmt: skip
    validate_manifest(manifest, source=str(manifest_path))
    return directory, manifest


def _is_positive_number(value: Any) -> bool:
    return is_finite_number(value) and value > 0


def json_objects(
    entries: list[Any], field: str, bad: Callable[[str, str], Exception]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, entry)`` for each entry of the manifest list ``field``, ``where`` naming it (``field[i]``);
    an entry that is not a JSON object raises ``bad(where, problem)``."""
    for i, entry in enumerate(entries):
        where = f"{field}[{i}]"
        if not isinstance(entry, dict):
            raise bad(where, f"must be a JSON object, got {entry!r:.60}")
        yield where, entry


def validate_weights_entry(weights: Any, *, source: str) -> None:
    """A manifest's ``weights`` entry: ``{"file": name, "sha256": 64 lowercase hex digits}``, else :class:`ManifestError`.

    The file name is only typed here; :func:`artifact_file` decides whether it stays inside the folder.
    """
    if not isinstance(weights, dict):
        raise ManifestError(f"{source}: weights must be a JSON object, got {weights!r:.60}")
    if not isinstance(weights.get("file"), str):
        raise ManifestError(f"{source}: weights.file must be a file name, got {weights.get('file')!r:.60}")
    digest = weights.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ManifestError(f"{source}: weights.sha256 must be 64 lowercase hex digits, got {digest!r:.80}")


def validate_manifest(manifest: Any, *, source: str) -> None:
    """Check the structure of a manifest; :class:`ManifestError` naming ``source`` and the first bad field.

    Checked: ``weights`` (``file`` a string, ``sha256`` 64 hex digits),
    ``model_config`` (every field present and typed, sizes within the run
    config's bounds, as for a run's ``config.json``), ``run_config`` (null or an
    object), ``compiled_layers`` (a list of at most :data:`MAX_COMPILED_LAYERS`
    layers, each with a distinct ``name``, finite positive ``eps``, a
    finite positive or null ``scale``, integer ``num_heads``/``head_dim``/``slices.num`` within
    :data:`MAX_LAYER_SIZES`, a known ``slices.type``, an integer ``slices.seed``
    in ``[0, 2**63)``, distinct known ``extra_features``, an optional ``map``
    whose kind is registered and whose options that kind accepts, an optional
    integer ``extra_steps`` in ``[0, MAX_EXTRA_STEPS]``). Whether the sizes fit
    the weights is checked later, against the safetensors header.
    """

    def bad(field: str, problem: str) -> ManifestError:
        return ManifestError(f"{source}: {field} {problem}")

    if not isinstance(manifest, dict):
        raise bad("the manifest", f"must be a JSON object, got {type(manifest).__name__}")
    for key in ("weights", "model_config", "compiled_layers"):
        if key not in manifest:
            raise bad(repr(key), "is missing")
    validate_weights_entry(manifest["weights"], source=source)
    model_config = manifest["model_config"]
    if not isinstance(model_config, dict):
        raise bad("model_config", f"must be a JSON object, got {model_config!r:.60}")
    try:
        _validate_model_dict(model_config, source=source)
    except CheckpointError as err:  # its messages name the field "model.<x>"; here it is "model_config.<x>"
        raise ManifestError(str(err).replace(f"{source}: model", f"{source}: model_config", 1)) from None
    for key in ("run_config", "source"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise bad(key, f"must be a JSON object or null, got {manifest[key]!r:.60}")
    layers = manifest["compiled_layers"]
    if not isinstance(layers, list):
        raise bad("compiled_layers", f"must be a list, got {layers!r:.60}")
    if len(layers) > MAX_COMPILED_LAYERS:
        raise bad("compiled_layers", f"has {len(layers)} entries, at most {MAX_COMPILED_LAYERS} allowed")
    names: set[str] = set()
    for where, layer in json_objects(layers, "compiled_layers", bad):
        name = layer.get("name")
        if not isinstance(name, str) or not name:
            raise bad(f"{where}.name", f"must be a module name, got {name!r:.60}")
        if name in names:
            raise bad(f"{where}.name", f"{name!r} appears twice")
        names.add(name)
        if not _is_positive_number(layer.get("eps")):
            raise bad(f"{where}.eps", f"must be a finite positive number, got {layer.get('eps')!r:.60}")
        if layer.get("scale") is not None and not _is_positive_number(layer["scale"]):  # null: 1/sqrt(head_dim)
            raise bad(f"{where}.scale", f"must be a finite positive number or null, got {layer['scale']!r:.60}")
        slices = layer.get("slices")
        if not isinstance(slices, dict):
            raise bad(f"{where}.slices", f"must be a JSON object, got {slices!r:.60}")
        sizes = {"num_heads": layer.get("num_heads"), "head_dim": layer.get("head_dim"), "slices.num": slices.get("num")}
        for key, value in sizes.items():
            if not is_int(value) or not 1 <= value <= MAX_LAYER_SIZES[key]:
                raise bad(f"{where}.{key}", f"must be an integer in [1, {MAX_LAYER_SIZES[key]}], got {value!r:.60}")
        if slices.get("type") not in SLICE_TYPES:
            raise bad(f"{where}.slices.type", f"must be one of {list(SLICE_TYPES)}, got {slices.get('type')!r:.60}")
        if slices["type"] == "axis" and slices["num"] > layer["head_dim"]:
            raise bad(f"{where}.slices.num", f"({slices['num']}) cannot exceed head_dim ({layer['head_dim']}) for axis slices")
        if not is_int(slices.get("seed")) or not 0 <= slices["seed"] < 2**63:
            raise bad(f"{where}.slices.seed", f"must be an integer in [0, 2**63), got {slices.get('seed')!r:.60}")
        extra = layer.get("extra_features", [])
        if (not isinstance(extra, list) or not all(isinstance(f, str) and f in EXTRA_FEATURES for f in extra)
                or len(set(extra)) != len(extra)):  # fmt: skip
            raise bad(f"{where}.extra_features", f"must be distinct names from {list(EXTRA_FEATURES)}, got {extra!r:.80}")
        map_entry = layer.get("map", {"kind": "linear", "options": {}})
        if not isinstance(map_entry, dict) or map_entry.get("kind") not in DUAL_MAPS:
            raise bad(f"{where}.map", f"must be {{'kind': one of {sorted(DUAL_MAPS)}, 'options': {{...}}}}, got {map_entry!r:.80}")
        try:
            DUAL_MAPS[map_entry["kind"]].check_options(map_entry.get("options", {}))
        except ValueError as err:
            raise bad(f"{where}.map.options", f"are invalid ({err})") from None
        steps = layer.get("extra_steps", 0)
        if not is_int(steps) or not 0 <= steps <= MAX_EXTRA_STEPS:
            raise bad(f"{where}.extra_steps", f"must be an integer in [0, {MAX_EXTRA_STEPS}], got {steps!r:.60}")
        if layer.get("teacher") is not None and not isinstance(layer["teacher"], dict):
            raise bad(f"{where}.teacher", f"must be a JSON object or null, got {layer['teacher']!r:.60}")


def artifact_file(directory: str | os.PathLike, name: object, *, what: str) -> Path:
    """``directory / name`` for a file name read from a manifest: a plain name inside ``directory``.

    Raises :class:`UnsafeArtifactPathError` (nothing is opened) otherwise.
    """
    try:
        return file_inside(directory, name, what=what)
    except UnsafePathError as err:
        raise UnsafeArtifactPathError(str(err)) from None


def read_weights_header(
    weights: Path, *, directory: Path, format: tuple[str, int]
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The safetensors header ``{name: (shape, dtype)}`` of an artifact's weights (no tensor read); format checked.

    ``weights`` has passed :func:`artifact_file`; ``format`` is the ``(name,
    version)`` its metadata must record. Raises :class:`ArtifactError` naming the file.
    """
    if not weights.is_file():
        raise ArtifactError(f"{weights}: file not found (the manifest in {directory} refers to it)")
    try:
        header, meta = read_header(weights)
    except CheckpointError as err:
        raise ArtifactError(str(err)) from None
    if (meta.get("format"), meta.get("format_version")) != tuple(format):
        raise ArtifactError(f"{weights}: not a {format[0]!r} weights file (format {meta.get('format')!r})")
    return header


def read_checked_tensors(
    weights: Path,
    *,
    header: dict[str, tuple[tuple[int, ...], torch.dtype]],
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
    sha256: str,
) -> dict[str, torch.Tensor]:
    """The tensors of ``weights``, after the checks of the module docstring's steps 3 and 4.

    In order: the ``header`` (from :func:`read_weights_header`) against the
    ``expected`` names, shapes and dtypes (nothing read yet), the file's sha256
    against the manifest's, then the tensors, which must all be finite.
    Raises :class:`ArtifactError` naming the file.
    """
    try:
        check_shapes(expected, header, source=str(weights))
    except CheckpointError as err:
        raise ArtifactError(str(err)) from None
    digest = sha256_file(weights)
    if digest != sha256:
        raise ArtifactError(
            f"{weights}: sha256 {digest[:12]}... does not match the manifest's {sha256[:12]}... "
            "(the weights are corrupted, truncated or from another compilation)"
        )
    try:
        tensors, _ = load_tensors(weights)
        check_finite(tensors, source=str(weights))
    except CheckpointError as err:
        raise ArtifactError(str(err)) from None
    return tensors


def check_fitted(model: nn.Module, *, source: str) -> None:
    """Refuse a loaded model holding a dual map that was saved unfitted (:class:`ArtifactError` naming ``source``)."""
    unfitted = [found.name for found in find_modules(model, DualMap) if not bool(found.module.fitted)]
    if unfitted:
        raise ArtifactError(f"{source}: dual maps {unfitted} were saved unfitted")


def _install_asap_operators(model: nn.Module, layers: list[dict[str, Any]], *, source: str) -> None:
    """Replace the named Sinkhorn operators of a freshly built teacher by empty ASAP operators of the recorded shapes.

    ``layers`` has passed :func:`validate_manifest`. Builds under the caller's
    default device (``meta`` for the shape check: nothing is allocated).
    """
    for i, layer in enumerate(layers):
        name = layer["name"]
        try:
            current = get_module(model, name)
            parent = get_module(model, name.rpartition(".")[0])
        except LookupError:
            raise ManifestError(
                f"{source}: compiled layer {name!r} does not exist in the model its config describes"
            ) from None
        if not isinstance(current, SinkhornOperator):
            kind = type(current).__name__
            raise ManifestError(f"{source}: {name!r} is a {kind} in the config's model, not a Sinkhorn layer")
        for key in ("num_heads", "head_dim"):  # the attention module around the operator knows its shape
            expected = getattr(parent, key, None)
            if expected is not None and layer[key] != expected:
                raise ManifestError(
                    f"{source}: compiled_layers[{i}].{key} is {layer[key]}, but {name!r} has {expected} in the config's model"
                )
        slices = layer["slices"]
        map_entry = layer.get("map", {"kind": "linear", "options": {}})
        try:  # the operator builds its own (unfitted) dual map from the recorded options: no tensor is read
            operator = AsapOperator(
                num_heads=layer["num_heads"], head_dim=layer["head_dim"], eps=layer["eps"], scale=layer["scale"],
                num_slices=slices["num"], slice_type=slices["type"], seed=slices["seed"],
                extra_features=tuple(layer.get("extra_features", ())), map_kind=map_entry["kind"],
                map_options=map_entry.get("options", {}), extra_steps=layer.get("extra_steps", 0),
            )  # fmt: skip
        except (ValueError, TypeError) as err:
            raise ManifestError(f"{source}: invalid description of compiled layer {name!r} ({err})") from None
        replace_module(model, name, operator)


def _build(manifest: dict[str, Any], *, source: str) -> nn.Module:
    """The model a (validated) manifest describes, compiled layers installed, on the current default device."""
    try:
        model = build_model(model_config_from_dict(manifest["model_config"]))
    except (ValueError, TypeError) as err:
        raise ManifestError(f"{source}: invalid model config ({err})") from None
    _install_asap_operators(model, manifest["compiled_layers"], source=source)
    return model


def load_compiled(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a compiled model: ``(model in eval mode, manifest)``.

    The order of the checks is the module docstring's: schema, file name,
    header shapes against a ``meta`` model, hash, finite tensors; the real
    model is built last, so a manifest that lies about sizes never allocates.

    Raises:
        ArtifactError: missing or mismatched files, corrupted weights, wrong shapes (see the module docstring);
            :class:`ManifestError` for a malformed manifest, :class:`UnsafeArtifactPathError` for a bad file name.
    """
    directory, manifest = read_manifest(path)
    source = str(directory / MANIFEST_FILE)
    weights = artifact_file(directory, manifest["weights"]["file"], what=f"{source}: weights.file")
    run_config = manifest.get("run_config") or {}
    data = run_config.get("data") if isinstance(run_config.get("data"), dict) else {}
    if data.get("tokenizer") is not None:  # read by `asap eval` from this folder: the same rule
        artifact_file(directory, data["tokenizer"], what=f"{source}: run_config.data.tokenizer")
    header = read_weights_header(weights, directory=directory, format=(FORMAT, FORMAT_VERSION))
    with torch.device("meta"):  # shapes only: nothing is allocated, whatever sizes the manifest claims
        skeleton = _build(manifest, source=source)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    del skeleton
    tensors = read_checked_tensors(weights, header=header, expected=expected, sha256=manifest["weights"]["sha256"])
    model = _build(manifest, source=source)
    try:
        check_state_dict(model, tensors, source=str(weights))
    except CheckpointError as err:
        raise ArtifactError(str(err)) from None
    model.load_state_dict(tensors, strict=True)
    check_fitted(model, source=str(weights))
    return model.to(device).eval(), manifest
