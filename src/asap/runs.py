"""Saved runs and compiled artifacts: load, calibrate, predict, evaluate (above both ``train`` and ``compile``).

A training run (``asap train``) or a compiled artifact (``asap compile``) on
disk is opened here: :func:`load_teacher` and :func:`calibration_batches` are
what ``asap compile``, the experiment driver and the benchmarks share;
:func:`load_run_model` opens either kind, and :func:`evaluate_run` is
``asap eval``. Calibration inputs come from the run's *training* split (labels
ignored); accuracy is measured on another split (``test`` by default), never
on calibration data.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from asap.attention import AsapOperator, AttentionOperator
from asap.compile.artifact import MANIFEST_FILE, ArtifactError, artifact_file, load_compiled, sha256_file
from asap.compile.swap import truncate_sinkhorn
from asap.errors import ConfigError
from asap.io import atomic_write_json, file_inside, method_key
from asap.models import attention_layers, swap_attention
from asap.train.checkpoint import CONFIG_FILE, LOCK_FILE, METRICS_FILE, MODEL_FILE, CheckpointError, RunConfig, load_model
from asap.train.data import batch_inputs, load_split
from asap.train.distributed import resolve_device
from asap.train.evaluate import eval_record, evaluate


@dataclass
class TeacherRun:
    """A trained run loaded for compilation."""

    run_dir: Path
    model: nn.Module
    run_config: RunConfig
    source_sha256: str

    @property
    def data_info(self) -> dict[str, Any]:
        return self.run_config.data

    def extra_files(self) -> list[Path]:
        """Files the compiled artifact needs beside the weights (the tokenizer of a text run).

        The name comes from the run's ``config.json``, which may come from someone
        else: it must be a plain file name inside the run folder (whatever the
        run's kind), else :class:`~asap.errors.UnsafePathError` before anything is
        opened or copied.
        """
        tokenizer = self.data_info.get("tokenizer")
        if tokenizer is None:
            return []
        return [file_inside(self.run_dir, tokenizer, what=f"{self.run_dir / CONFIG_FILE}: data.tokenizer")]


def load_teacher(run_dir: str | os.PathLike, *, device: str | torch.device = "cpu") -> TeacherRun:
    run_dir = Path(run_dir)
    model, run_config = load_model(run_dir, device=device)
    return TeacherRun(run_dir, model, run_config, sha256_file(run_dir / MODEL_FILE))


def load_data(
    teacher: TeacherRun, *, split: str, limit: int | None, data_dir: str | None = None
) -> tuple[Dataset, Any]:
    """``(dataset, collate)`` of a split, encoded as the teacher was trained (tokenizer, pixel statistics)."""
    data_dir = data_dir or teacher.run_config.train.data_dir
    return load_split(teacher.data_info, teacher.run_dir, split=split, data_dir=data_dir, limit=limit)


def calibration_batches(
    teacher: TeacherRun, *, num_samples: int, batch_size: int, seed: int = 0, data_dir: str | None = None
) -> list[dict[str, Any]]:
    """``num_samples`` training inputs (a stratified subset, shuffled with ``seed``) in batches of ``batch_size``.

    Shuffling matters: the stratified subset is ordered by class, and the last
    batches are held out for the fidelity figures.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"calibration needs num_samples >= 1 and batch_size >= 1, got {num_samples}, {batch_size}")
    dataset, collate = load_data(teacher, split="train", limit=num_samples, data_dir=data_dir)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    return [collate([dataset[i] for i in order[s : s + batch_size]]) for s in range(0, len(order), batch_size)]


@torch.no_grad()
def predict(model: nn.Module, data: tuple[Dataset, Any], *, batch_size: int = 128) -> tuple[Tensor, Tensor]:
    """``(predicted classes, labels)`` over a whole data set, in order (eval mode)."""
    dataset, collate = data
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds, labels = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        logits = model(**batch_inputs(batch, model.input_names, device))
        preds.append(logits.argmax(-1).cpu())
        labels.append(batch["labels"])
    model.train(was_training)
    return torch.cat(preds), torch.cat(labels)


def accuracies(
    teacher: TeacherRun,
    compiled: nn.Module,
    *,
    data: tuple[Dataset, Any],
    layers: list[int] | None,
    truncated_iters: int,
    batch_size: int = 128,
) -> dict[str, Any]:
    """Test accuracy of the teacher, ASAP, and Sinkhorn truncated to ``truncated_iters`` in the same layers.

    Also the *agreement* of ASAP and of the truncated model with the teacher (the fraction of examples
    where their predicted class is the teacher's): a lower-variance measure of fidelity than the
    difference of two accuracies on a small test set.
    """
    teacher_pred, labels = predict(teacher.model, data, batch_size=batch_size)
    truncated = truncate_sinkhorn(teacher.model, n_iters=truncated_iters, layers=layers)
    truncated_pred, _ = predict(truncated, data, batch_size=batch_size)
    asap_pred, _ = predict(compiled, data, batch_size=batch_size)
    accuracy = lambda pred: float((pred == labels).double().mean())  # noqa: E731
    agreement = lambda pred: float((pred == teacher_pred).double().mean())  # noqa: E731
    key = method_key("sinkhorn", n_iters=truncated_iters)
    return {
        "teacher": accuracy(teacher_pred),
        key: accuracy(truncated_pred),
        "asap": accuracy(asap_pred),
        "agreement": {"asap": agreement(asap_pred), key: agreement(truncated_pred)},
        "num_samples": len(labels),
    }


def load_run_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[nn.Module, RunConfig]:
    """A trained run *or* a compiled artifact: ``(model in eval mode, RunConfig)``.

    This is what ``asap eval`` calls so that it accepts both: a directory with a
    ``manifest.json`` is loaded strictly by :func:`~asap.compile.load_compiled`
    (its run config is the teacher's, stored in the manifest; the tokenizer is
    copied beside it), anything else by :func:`asap.train.load_model`.
    """
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if not (directory / MANIFEST_FILE).is_file():
        return load_model(path, device=device)
    model, manifest = load_compiled(directory, device=device)
    source = directory / MANIFEST_FILE
    if not manifest.get("run_config"):
        raise ArtifactError(f"{source}: no run config (saved without its teacher run)")
    try:
        run_config = RunConfig.from_dict(manifest["run_config"], source=f"{source}: run_config")
    except CheckpointError as err:
        raise ArtifactError(str(err)) from None
    if run_config.data["kind"] == "text":  # the tokenizer is read from the artifact folder
        artifact_file(directory, run_config.data["tokenizer"], what=f"{source}: run_config.data.tokenizer")
    return model, run_config


def saved_kind(directory: Path) -> str | None:
    """What ``directory`` holds: ``"compiled artifact"`` (a ``manifest.json``), ``"run"`` (a ``config.json``
    beside weights or metrics: a training run, or a saved Hugging Face model), or None."""
    if (directory / MANIFEST_FILE).is_file():
        return "compiled artifact"
    if (directory / CONFIG_FILE).is_file() and (
        (directory / METRICS_FILE).is_file() or (directory / LOCK_FILE).exists() or any(directory.glob("*.safetensors"))
    ):
        return "run"
    return None


def check_output_dir(out_dir: str | os.PathLike, *, run_dir: str | os.PathLike) -> Path:
    """Refuse an output folder for a compiled artifact that would damage a run; return it (nothing is written).

    With symlinks resolved, ``out_dir`` may not be, contain or lie inside
    ``run_dir``; may not be or lie inside any other saved run, nor lie inside an
    artifact; and, if it exists, must be a folder that is empty or an earlier
    artifact holding only files (so that overwriting it replaces an artifact and
    nothing else). Raises :class:`~asap.errors.ConfigError` naming the folder.
    """
    out = Path(out_dir)
    target, run = out.resolve(), Path(run_dir).resolve()
    if target == run or run in target.parents:
        raise ConfigError(f"--out {out}: is or lies inside the run folder {run_dir}; choose a folder outside it")
    if target in run.parents:
        raise ConfigError(f"--out {out}: contains the run folder {run_dir}; choose a folder outside it")
    for folder in (target, *target.parents):
        kind = saved_kind(folder)
        if kind == "run" or (kind is not None and folder != target):
            where = "is" if folder == target else f"lies inside {folder}, which is"
            raise ConfigError(f"--out {out}: {where} a saved {kind}; choose a new folder")
    if out.is_symlink() and not target.exists():
        raise ConfigError(f"--out {out}: is a symlink to nothing ({target}); choose a new folder")
    if target.exists():
        if not target.is_dir():
            raise ConfigError(f"--out {out}: exists and is not a folder")
        entries = list(target.iterdir())
        if entries and saved_kind(target) is None:
            raise ConfigError(f"--out {out}: exists and is not empty (and not a compiled artifact); choose a new folder")
        nested = [e.name for e in entries if e.is_dir() or not e.is_file()]
        if nested:
            raise ConfigError(f"--out {out}: the artifact folder also holds {sorted(nested)[:4]}; choose a new folder")
    return out


# --------------------------------------------------------------------------- evaluating a saved run or artifact


def attention_operators(model: nn.Module) -> list[nn.Module]:
    """The attention operator of every layer, in forward order: the project's layers', else the operators
    modules hold directly (a converted transformers model keeps one per self-attention)."""
    layers = attention_layers(model)
    if layers:
        return [layer.operator for layer in layers]
    return [m for m in model.modules() if isinstance(m, AttentionOperator)]


def unfitted_asap_layers(model: nn.Module) -> list[int]:
    """Indices of the attention layers whose operator is ASAP with a dual map never fitted."""
    out = []
    for i, operator in enumerate(attention_operators(model)):
        fitted = getattr(getattr(operator, "dual_map", None), "fitted", None)
        if isinstance(operator, AsapOperator) and fitted is not None and not bool(fitted):
            out.append(i)
    return out


def set_attention(model: nn.Module, method: str, **options: Any) -> None:
    """Run every attention layer of ``model`` with ``method`` (``asap eval --method-override``), keeping the weights.

    A model that knows how to change its own attention (a pretrained transformers classifier,
    ``model.set_attention``) does so; the project's models swap their layers' operators.
    """
    own = getattr(model, "set_attention", None)
    if callable(own):
        own(method, **options)
    else:
        swap_attention(model, method, **options)


def _load_for_eval(run_dir: Path, *, device: torch.device) -> tuple[nn.Module, RunConfig, dict[str, Any]]:
    """A trained run or a model compiled by ``asap compile``, and the attention it runs."""
    model, run_config = load_run_model(run_dir, device=device)
    compiled = [i for i, op in enumerate(attention_operators(model)) if isinstance(op, AsapOperator)]
    if compiled:
        return model, run_config, {"method": "asap", "compiled_layers": compiled}
    return model, run_config, run_config.model.attention.to_dict()


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    split: str = "test",
    data_dir: str | None = None,
    limit: int | None = None,
    batch_size: int = 256,
    device: str = "auto",
    method: str | None = None,
    method_options: dict[str, Any] | None = None,
    output: str | os.PathLike | None = None,
    allow_unfitted: bool = False,
) -> dict[str, Any]:
    """Evaluate a saved run (or a compiled model directory) on one split, optionally with another method.

    ``method``/``method_options`` swap every layer's attention operator before
    evaluating (e.g. a Sinkhorn K=11 teacher evaluated with K=3 or softmax).
    ``data_dir`` defaults to the run's own (then ``$ASAP_DATA_DIR``). The result
    is written as JSON to ``output`` (default ``RUN_DIR/eval_<split>[_<method>...][_limit<n>].json``).

    ASAP layers whose dual map was never fitted (``method="asap"`` on a teacher,
    or a run trained that way) are refused unless ``allow_unfitted``: a zero map
    gives an answer, but not ASAP's.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ConfigError(f"{run_dir}: no such run directory, artifact or weights file")
    if batch_size < 1 or isinstance(batch_size, bool):
        raise ConfigError(f"--batch-size: must be an integer >= 1, got {batch_size!r}")
    dev = resolve_device(device)
    model, run_config, attention = _load_for_eval(run_dir, device=dev)
    if method is not None:
        try:
            set_attention(model, method, **(method_options or {}))
        except (TypeError, ValueError) as err:  # an unknown method or an option it does not take
            raise ConfigError(f"--method-override {method}: {err}") from None
        attention = {"method": method, "options": dict(method_options or {})}
    unfitted = unfitted_asap_layers(model)
    if unfitted and not allow_unfitted:
        raise ConfigError(
            f"ASAP layer(s) {unfitted} have a dual map that was never fitted; compile the run first "
            "(asap compile), or pass --allow-unfitted (allow_unfitted=True) to evaluate the unfitted map"
        )
    dataset, collate = load_split(
        run_config.data, run_dir, split=split, data_dir=data_dir or run_config.train.data_dir, limit=limit
    )
    start = time.perf_counter()
    metrics = evaluate(model, dataset, collate=collate, batch_size=batch_size, device=dev)
    result = eval_record(
        metrics, run_dir=run_dir, dataset=run_config.data["dataset"], split=split, limit=limit,
        attention=attention, seconds=time.perf_counter() - start, device=dev,
    )  # fmt: skip
    if output is None:  # one file per distinct evaluation, so none overwrites another
        suffix = "" if method is None else f"_{method}" + "".join(f"_{k}{v}" for k, v in sorted((method_options or {}).items()))
        suffix += "" if limit is None else f"_limit{limit}"
        output = run_dir / f"eval_{split}{suffix}.json"
    atomic_write_json(output, result)
    return result
