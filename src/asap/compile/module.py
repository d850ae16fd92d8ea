"""Compile any model: every Sinkhorn attention of an arbitrary ``nn.Module`` to ASAP, and its artifact.

``asap compile`` compiles the project's own models from a saved run. A model of
your own, or a transformers encoder converted to Sinkhorn attention
(:func:`asap.integrations.transformers.convert`), compiles with three calls:

* :func:`compile_module` finds the :class:`~asap.attention.SinkhornOperator` s
  in the model (wherever they hang: in an :class:`asap.MultiheadAttention`,
  in your own attention block, in a converted transformers layer), or the ones
  you select by qualified name or predicate; calibrates them on any iterable
  of inputs your model accepts, calling the model the way you say; fits each
  one's dual map and puts an :class:`~asap.attention.AsapOperator` in its place,
  **in place**;
* :func:`save_compiled_module` writes ``model.safetensors`` (the whole state
  dict) and ``manifest.json`` (the qualified name and typed options of every
  ASAP operator, :class:`~asap.attention.options.AsapOptions`);
* :func:`load_compiled_module` takes a freshly built instance of *your* model
  class (asap never needs, imports or pickles it), puts ASAP operators built
  from the recorded options at the recorded names and loads the weights
  strictly, after the checks of :mod:`asap.compile.artifact` (file names inside
  the folder, schema, shapes against the safetensors header before anything is
  read, sha256, finite values).

Usage
-----

A model of your own whose attention is Sinkhorn, calibrated on a
``DataLoader`` of dicts with your own forward call::

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from torch.utils.data import DataLoader
    >>> import asap
    >>> from asap.compile import compile_module, save_compiled_module, load_compiled_module
    >>> class Encoder(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.attn = nn.ModuleList(asap.MultiheadAttention(16, num_heads=2, method="sinkhorn", n_iters=5)
    ...                                   for _ in range(2))
    ...     def forward(self, x, mask):
    ...         for attn in self.attn:
    ...             x = x + attn(x, padding_mask=mask)
    ...         return x
    >>> _ = torch.manual_seed(0)
    >>> rows = [{"x": torch.randn(10, 16), "mask": torch.arange(10) < 6 + i % 5} for i in range(16)]
    >>> loader = DataLoader(rows, batch_size=4)
    >>> model = Encoder().eval()
    >>> model, report = compile_module(model, loader, forward=lambda m, b: m(b["x"], b["mask"]), num_slices=4)
    >>> [layer["name"] for layer in report["layers"]]
    ['attn.0.operator', 'attn.1.operator']
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_compiled_module(model, folder)
    >>> loaded = load_compiled_module(Encoder().eval(), folder)   # a fresh instance of your own class
    >>> batch = next(iter(loader))
    >>> torch.equal(loaded(batch["x"], batch["mask"]), model(batch["x"], batch["mask"]))
    True

Select layers with ``select="attn.1"`` (a qualified name: the operator, or any
module holding Sinkhorn operators), a list of names or indices, or a predicate
``select=lambda name, op: op.n_iters >= 5``. The data may be a list, a
``DataLoader``, a generator (``mode="teacher"`` only: it is read once); each
item's tensors are moved to the model's device and passed to
``forward(model, item)``, by default ``model(**item)`` for a mapping,
``model(*item)`` for a tuple or list, ``model(item)`` otherwise. Exceptions
raised by your model or your forward propagate unchanged, and the model is
then left as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from asap.attention.dual_map import DualMap
from asap.attention.module import operator_config
from asap.attention.operators import AsapOperator, AttentionOperator, build_operator
from asap.attention.options import AsapOptions
from asap.attention.submodules import find_modules, get_module, replace_module
from asap.compile.artifact import (
    MANIFEST_FILE,
    MAX_COMPILED_LAYERS,
    MAX_LAYER_SIZES,
    WEIGHTS_FILE,
    ArtifactError,
    ManifestError,
    artifact_file,
    json_objects,
    locate_manifest,
    read_checked_tensors,
    read_weights_header,
    sha256_file,
    validate_weights_entry,
)
from asap.compile.calibrate import Selection, model_device, select_layers, sinkhorn_layers
from asap.compile.swap import CompileOptions, compile_selected
from asap.io import atomic_write_json, is_int, read_json
from asap.train.checkpoint import save_tensors

FORMAT = "asap-compiled-module"
FORMAT_VERSION = 1
#: Floating dtypes an operator's tensors may be recorded in.
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
#: At most this many tied (shared) state-dict entries in a manifest.
MAX_TIED = 2**16


def compile_module(
    model: nn.Module,
    data: Iterable[Any],
    options: CompileOptions | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    select: Selection = None,
    stop_early: bool = True,
    progress: Any = None,
    **fields: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Compile the Sinkhorn attention operators of any ``model`` to ASAP, **in place**.

    Args:
        model: any module holding :class:`~asap.attention.SinkhornOperator` s
            (odd ``n_iters >= 3``), anywhere among its submodules. It is
            modified in place (``copy.deepcopy`` it first to keep the teacher);
            its training flag is kept (calibration itself runs in eval mode,
            without autograd).
        data: any iterable of inputs the model accepts: a list, a
            ``DataLoader``, a generator (tensors, tuples, dicts, ...). Iterated
            once per pass: once in ``"teacher"`` mode, once per selected layer
            in ``"sequential"`` mode (which therefore refuses a one-shot iterator).
        forward: ``forward(model, item)`` calls the model on one item (its
            tensors already moved to the model's device); its result is
            ignored. Default: ``model(**item)`` for a mapping (restricted to
            ``model.input_names`` if the model declares them), ``model(*item)``
            for a tuple or list, ``model(item)`` otherwise.
        select: which operators: ``None`` (all); a qualified name (of a
            Sinkhorn operator, or of any module holding some, e.g.
            ``"encoder.layer.3"``), an index among the model's Sinkhorn
            operators, or a list of them; or a predicate ``(name, operator) -> bool``.
            The others stay Sinkhorn.
        stop_early: each forward after the first is cut once every selected
            operator has been called as often as on the first item (the rest of
            the network is not run). Set ``False`` if the number of calls depends
            on the input. Every call before the cut is calibrated on (an operator
            shared by several layers, or called several times, included).
        progress: optional ``tqdm``-like callable wrapping each pass (``total``
            is ``len(data)`` or None).
        options, fields: a :class:`~asap.compile.swap.CompileOptions` (default: its
            defaults) and fields replacing some of them (features,
            ridge, KL refinement, calibration mode, held-out fraction: the last
            batches when ``len(data)`` is known, else every ``1/fraction``-th;
            the dual map ``map_kind`` with ``map_options = {kind: {option: value}}``
            and its fit's ``map_steps``, ``map_lr``; ``target_tv`` to choose the
            map and warm-start steps of each layer by measurement); ``layers`` is
            refused here (``select`` chooses the operators).

    Returns:
        ``(model, report)``: ``model`` itself, its selected Sinkhorn operators
        replaced by fitted :class:`~asap.attention.AsapOperator` s (same eps and
        scale, on the device they were called on), and a JSON-ready report
        (options, calibration counts, per-layer and per-head fidelity figures,
        ``"selected"``: the compiled operators' names).

    Raises:
        ValueError: a model with no Sinkhorn operator, a selection that names
            nothing or matches nothing, a teacher with even ``n_iters``, no
            data. Whatever the model or ``forward`` raises propagates unchanged,
            and the model is then left as it was.
    """
    if forward is not None and not callable(forward):
        raise TypeError(f"compile_module: forward must be a callable (model, item) -> Any, got {forward!r:.80}")
    if "layers" in fields or (options is not None and options.layers is not None):
        raise ValueError("compile_module chooses operators with select= (names, indices or a predicate), not layers")
    options = CompileOptions.build(options, **fields)
    selected = select_layers(model, select)
    total = len(sinkhorn_layers(model))
    report = compile_selected(model, data, selected, options, forward=forward, stop_early=stop_early, progress=progress)
    report["selected"] = [layer.name for layer in selected]
    report["num_sinkhorn_layers"] = total
    return model, report


# --------------------------------------------------------------------------------------------------- save and load


def _operator_dtype(operator: nn.Module) -> str | None:
    """The one floating dtype of an operator's tensors (``"float32"``), or None when it has none or several."""
    dtypes = {t.dtype for t in operator.state_dict().values() if t.is_floating_point()}
    if len(dtypes) != 1:
        return None
    return str(dtypes.pop()).removeprefix("torch.")


def _untied(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, tied)``: one entry per distinct tensor, and ``{alias: kept name}`` for the others.

    Tied weights (an output layer sharing the embedding matrix, an operator shared
    by two layers) appear once in the file. A tensor that only partly overlaps
    another one's memory is copied, as safetensors stores no views.
    """
    tensors: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, tensor in state.items():
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        key = (*storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in seen:
            tied[name] = seen[key]
            continue
        if tensor.numel() and storage in storages:
            tensor = tensor.clone()
        seen[key] = name
        storages.add(storage)
        tensors[name] = tensor
    return tensors, tied


def save_compiled_module(
    model: nn.Module, directory: str | os.PathLike, *, report: dict[str, Any] | None = None
) -> Path:
    """Save a model compiled by :func:`compile_module` (any ``nn.Module``) to ``directory``; return it.

    Writes ``model.safetensors`` (every tensor of ``model.state_dict()``; a tied
    tensor once) and then ``manifest.json`` (format ``"asap-compiled-module"``):
    the model's class name (for information), the weights' sha256, for every
    :class:`~asap.attention.AsapOperator` its qualified name(s), ``method`` and
    typed options (:func:`~asap.attention.module.operator_config`), heads, head
    size and dtype; the tied entries; and ``report`` if given. Both files are
    written atomically, the manifest last. No pickle: the model class is not saved,
    :func:`load_compiled_module` takes a fresh instance of it.

    Raises:
        ArtifactError: no ASAP operator in ``model`` (not compiled), or one whose
            dual map cannot be rebuilt from its options (not a registered ``DualMap`` kind) or was never fitted.
    """
    found = find_modules(model, AsapOperator)
    if not found:
        raise ArtifactError(
            f"{type(model).__name__} has no ASAP operator to save: compile it first (asap.compile.compile_module)"
        )
    operators = []
    for item in found:
        operator = item.module
        if not isinstance(operator.dual_map, DualMap):
            raise ArtifactError(
                f"{item.name}: its dual map is a {type(operator.dual_map).__name__}, which its options cannot rebuild; "
                "only the registered dual-map kinds (asap.attention.dual_map.DUAL_MAPS) can be saved"
            )
        if not bool(operator.dual_map.fitted):  # a host sync, at save time only
            raise ArtifactError(f"{item.name}: its dual map was never fitted (compile the model first)")
        operators.append({
            "name": item.name,
            "aliases": list(item.aliases[1:]),
            **operator_config(operator).to_dict(),
            "num_heads": operator.dual_map.num_heads,
            "head_dim": operator.dual_map.head_dim,
            "dtype": _operator_dtype(operator),
        })  # fmt: skip
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors, tied = _untied(model.state_dict())
    weights = out / WEIGHTS_FILE
    save_tensors(weights, tensors, metadata={"format": FORMAT, "format_version": FORMAT_VERSION})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "module_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(weights)},
        "operators": operators,
        "tied": tied,
        "report": report,
    }
    atomic_write_json(out / MANIFEST_FILE, manifest)
    return out


def _is_module_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and all(value.split(".")) and len(value) <= 4096


def validate_module_manifest(manifest: Any, *, source: str) -> None:
    """Check the structure of a compiled-module manifest; :class:`ManifestError` naming ``source`` and the first bad field.

    Checked: ``format`` and ``format_version``; ``weights`` (``file`` a string,
    ``sha256`` 64 hex digits); ``operators``, a list of 1 to
    :data:`~asap.compile.artifact.MAX_COMPILED_LAYERS` entries, each with a
    module ``name`` and ``aliases`` (dotted names, all distinct over the
    manifest), ``method`` ``"asap"``, ``options`` that
    :class:`~asap.attention.options.AsapOptions` accepts, ``num_heads`` /
    ``head_dim`` / ``options.num_slices`` within
    :data:`~asap.compile.artifact.MAX_LAYER_SIZES`, ``dtype`` null or a float
    dtype name; ``tied`` an object mapping a state-dict name to another that is
    not itself tied; ``report`` and ``module_class`` null or an object / string.
    Whether the sizes fit the weights is checked later, against the safetensors header.
    """

    def bad(field: str, problem: str) -> ManifestError:
        return ManifestError(f"{source}: {field} {problem}")

    if not isinstance(manifest, dict):
        raise bad("the manifest", f"must be a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise bad("format", f"must be {FORMAT!r}, got {manifest.get('format')!r:.60} (not a compiled-module manifest)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise bad("format_version", f"is {manifest.get('format_version')!r:.20}, this asap reads {FORMAT_VERSION}")
    for key in ("weights", "operators"):
        if key not in manifest:
            raise bad(repr(key), "is missing")
    validate_weights_entry(manifest["weights"], source=source)
    if manifest.get("module_class") is not None and not isinstance(manifest["module_class"], str):
        raise bad("module_class", f"must be a string or null, got {manifest['module_class']!r:.60}")
    if manifest.get("report") is not None and not isinstance(manifest["report"], dict):
        raise bad("report", f"must be a JSON object or null, got {manifest['report']!r:.60}")
    operators = manifest["operators"]
    if not isinstance(operators, list) or not 1 <= len(operators) <= MAX_COMPILED_LAYERS:
        raise bad("operators", f"must be a list of 1 to {MAX_COMPILED_LAYERS} entries, got {operators!r:.60}")
    names: set[str] = set()
    for where, entry in json_objects(operators, "operators", bad):
        aliases = entry.get("aliases", [])
        if not isinstance(aliases, list):
            raise bad(f"{where}.aliases", f"must be a list of module names, got {aliases!r:.60}")
        for field, name in [("name", entry.get("name"))] + [(f"aliases[{j}]", a) for j, a in enumerate(aliases)]:
            if not _is_module_name(name):
                raise bad(f"{where}.{field}", f"must be a qualified module name (a.b.c), got {name!r:.60}")
            if name in names:
                raise bad(f"{where}.{field}", f"{name!r} appears twice")
            names.add(name)
        if entry.get("method") != "asap":
            raise bad(f"{where}.method", f"must be 'asap', got {entry.get('method')!r:.40}")
        options = entry.get("options")
        if not isinstance(options, dict):
            raise bad(f"{where}.options", f"must be a JSON object, got {options!r:.60}")
        try:
            parsed = AsapOptions.from_dict(options)
        except (TypeError, ValueError) as err:
            raise bad(f"{where}.options", f"are invalid ({err})") from None
        sizes = {"num_heads": entry.get("num_heads"), "head_dim": entry.get("head_dim"), "slices.num": parsed.num_slices}
        for key, value in sizes.items():
            field = "options.num_slices" if key == "slices.num" else key
            if not is_int(value) or not 1 <= value <= MAX_LAYER_SIZES[key]:
                raise bad(f"{where}.{field}", f"must be an integer in [1, {MAX_LAYER_SIZES[key]}], got {value!r:.60}")
        if parsed.slice_type == "axis" and parsed.num_slices > entry["head_dim"]:
            raise bad(f"{where}.options.num_slices", f"({parsed.num_slices}) cannot exceed head_dim "
                                                     f"({entry['head_dim']}) for axis slices")  # fmt: skip
        if entry.get("dtype") is not None and entry["dtype"] not in FLOAT_DTYPES:
            raise bad(f"{where}.dtype", f"must be null or one of {sorted(FLOAT_DTYPES)}, got {entry['dtype']!r:.40}")
    tied = manifest.get("tied", {})
    if not isinstance(tied, dict) or len(tied) > MAX_TIED:
        raise bad("tied", f"must be a JSON object of at most {MAX_TIED} entries, got {tied!r:.60}")
    for alias, kept in tied.items():
        if not isinstance(kept, str) or not kept or alias == kept or kept in tied:
            raise bad(f"tied[{alias!r:.60}]", f"must name another, untied state-dict entry, got {kept!r:.60}")


def read_module_manifest(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """``(folder, manifest)`` of a compiled module: a folder, or its ``manifest.json``; schema validated."""
    directory, manifest_path = locate_manifest(path, saved_as="saved by save_compiled_module")
    manifest = read_json(manifest_path, error=ManifestError, what="manifest")
    validate_module_manifest(manifest, source=str(manifest_path))
    return directory, manifest


def _site(model: nn.Module, name: str, *, source: str, field: str) -> AttentionOperator:
    """The attention operator the fresh model has at ``name`` (the one an ASAP operator goes in place of)."""
    try:
        current = get_module(model, name)
    except LookupError as err:
        raise ManifestError(f"{source}: {field} {name!r} is not in the given {type(model).__name__} ({err})") from None
    if not isinstance(current, AttentionOperator):
        raise ManifestError(
            f"{source}: {field} {name!r} is a {type(current).__name__} in the given {type(model).__name__}, "
            "not an attention operator (is it the model class that was compiled?)"
        )
    return current


def _build_operators(manifest: dict[str, Any], *, source: str) -> list[AsapOperator]:
    """The (unfitted) ASAP operators the manifest describes, on the current default device, in their dtypes."""
    built = []
    for i, entry in enumerate(manifest["operators"]):
        try:
            operator = build_operator("asap", num_heads=entry["num_heads"], head_dim=entry["head_dim"],
                                      **AsapOptions.from_dict(entry["options"]).to_dict())  # fmt: skip
        except (TypeError, ValueError) as err:
            raise ManifestError(f"{source}: operators[{i}] does not describe an ASAP operator ({err})") from None
        if entry.get("dtype") is not None:
            operator = operator.to(FLOAT_DTYPES[entry["dtype"]])
        built.append(operator)
    return built


def _paths(entry: dict[str, Any]) -> list[str]:
    return [entry["name"], *entry.get("aliases", [])]


def load_compiled_module(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a compiled module saved by :func:`save_compiled_module` into ``model``, a fresh instance of its class.

    ``model`` is built by the caller (asap never imports or unpickles the
    class); its attention operators at the recorded names (Sinkhorn, softmax or
    any :class:`~asap.attention.AttentionOperator`) are replaced, in place, by
    ASAP operators built from the recorded options (on the device of ``model``'s
    first tensor), and the file's weights are loaded with
    ``load_state_dict(strict=True)``. Returns ``model`` (its training flag unchanged).

    Checked, in this order, before anything large is read: the manifest's
    schema (:func:`validate_module_manifest`); the weights file name (a plain
    name inside ``directory``, else :class:`~asap.compile.artifact.UnsafeArtifactPathError`
    before any file is opened); every recorded name against ``model``; the
    safetensors header's names, shapes and dtypes against ``model`` with the
    operators installed (built on the ``meta`` device: nothing is allocated);
    then the sha256, finite values, and that every dual map was saved fitted.
    Every check runs before ``model`` is touched, so a refused artifact leaves
    it as it was (and if ``load_state_dict`` itself fails, the operators it had
    are put back).

    Raises:
        ArtifactError: naming the file and the problem (:class:`~asap.compile.artifact.ManifestError`
            for a malformed manifest or names the model does not have).
    """
    directory, manifest = read_module_manifest(directory)
    source = str(directory / MANIFEST_FILE)
    weights = artifact_file(directory, manifest["weights"]["file"], what=f"{source}: weights.file")
    operators = manifest["operators"]
    for i, entry in enumerate(operators):
        for j, name in enumerate(_paths(entry)):
            _site(model, name, source=source, field=f"operators[{i}].{'name' if j == 0 else f'aliases[{j - 1}]'}")
    header = read_weights_header(weights, directory=directory, format=(FORMAT, FORMAT_VERSION))

    with torch.device("meta"):  # shapes only: nothing is allocated, whatever sizes the manifest claims
        skeletons = _build_operators(manifest, source=source)
    replaced = [path for entry in operators for path in _paths(entry)]
    expected = {
        key: (tuple(t.shape), t.dtype) for key, t in model.state_dict().items()
        if not any(key.startswith(path + ".") for path in replaced)
    }  # fmt: skip
    for entry, skeleton in zip(operators, skeletons):
        for path in _paths(entry):
            expected.update({f"{path}.{key}": (tuple(t.shape), t.dtype) for key, t in skeleton.state_dict().items()})
    del skeletons
    tied = manifest.get("tied", {})
    for alias, kept in tied.items():
        if alias not in expected or kept not in expected or expected[alias] != expected[kept]:
            raise ManifestError(
                f"{source}: tied[{alias!r}] = {kept!r} are not two state-dict entries of one shape and dtype in the given "
                f"{type(model).__name__}"
            )
        del expected[alias]
    tensors = read_checked_tensors(weights, header=header, expected=expected, sha256=manifest["weights"]["sha256"])
    for alias, kept in tied.items():
        tensors[alias] = tensors[kept]
    unfitted = [entry["name"] for entry in operators if not bool(tensors[f"{entry['name']}.dual_map.fitted"])]
    if unfitted:
        raise ArtifactError(f"{weights}: the dual maps of {unfitted} were saved unfitted")

    device = model_device(model)
    built = _build_operators(manifest, source=source)
    previous: list[tuple[str, nn.Module]] = []
    try:
        for entry, operator in zip(operators, built):
            operator = operator.to(device) if device is not None else operator
            for path in _paths(entry):
                current = get_module(model, path)
                previous.append((path, replace_module(model, path, operator.train(current.training))))
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            raise ArtifactError(f"{weights}: does not load into the given {type(model).__name__} "
                                f"({' '.join(line.strip() for line in first[:3])})") from None  # fmt: skip
    except BaseException:
        for path, old in reversed(previous):
            replace_module(model, path, old)
        raise
    return model


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "compile_module",
    "load_compiled_module",
    "read_module_manifest",
    "save_compiled_module",
    "validate_module_manifest",
]
