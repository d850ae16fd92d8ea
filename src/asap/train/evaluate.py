"""Accuracy and loss of a model over a data set (data-parallel aware).

Evaluating a saved run or a compiled artifact (``asap eval``) is :func:`asap.runs.evaluate_run`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from asap.errors import ConfigError
from asap.train.data import batch_inputs, make_loader, shard_batches
from asap.train.distributed import DistInfo, all_reduce_sum


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
