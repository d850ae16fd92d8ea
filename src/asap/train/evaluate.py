"""Accuracy and loss of a model over a data set (data-parallel aware), and of a saved run."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from asap.attention import AsapOperator, AttentionOperator
from asap.errors import ConfigError
from asap.models import attention_layers, swap_attention
from asap.io import atomic_write_json
from asap.train.checkpoint import RunConfig, load_model
from asap.train.data import batch_inputs, load_split, make_loader, shard_batches
from asap.train.distributed import DistInfo, all_reduce_sum, resolve_device


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    collate,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    dist: DistInfo | None = None,
    num_workers: int = 0,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on every item of ``dataset``.

    With several processes each evaluates a disjoint shard and the sums are
    all-reduced, so every rank returns the same, complete result.
    Returns ``{"loss", "accuracy", "num_samples"}``.
    """
    dist = dist or DistInfo(device=torch.device(device))
    device = torch.device(device)
    batches = shard_batches(len(dataset), batch_size=batch_size, rank=dist.rank, world_size=dist.world_size)
    loader = make_loader(dataset, batches, collate=collate, num_workers=num_workers, seed=0)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for batch in loader:
        labels = batch["labels"].to(device)
        logits = model(**batch_inputs(batch, model.input_names, device))
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        sums += torch.stack([loss.double(), (logits.argmax(-1) == labels).sum().double(), sums.new_tensor(len(labels))])
    model.train(was_training)
    loss_sum, correct, count = all_reduce_sum(sums, dist).tolist()
    if count == 0:
        raise ConfigError("cannot evaluate on an empty data set (no examples in this split)")
    return {"loss": loss_sum / count, "accuracy": correct / count, "num_samples": int(count)}


def eval_record(
    metrics: dict[str, float], *, run_dir, dataset: str, split: str, limit: int | None,
    attention: dict[str, Any], seconds: float, device: torch.device,
) -> dict[str, Any]:
    """The ``eval_<split>.json`` record (one schema for ``asap train`` and ``asap eval``)."""
    return {
        "run": str(run_dir), "dataset": dataset, "split": split, "limit": limit, "attention": attention,
        **metrics, "seconds": seconds, "samples_per_sec": metrics["num_samples"] / seconds, "device": str(device),
    }  # fmt: skip


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
    from asap.compile.runs import load_run_model  # compile builds on train, not the other way round

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
