"""Training, evaluation and checkpoints (no pickle), single-process or data-parallel.

    from asap.train import TrainConfig, train, load_model
    metrics = train(TrainConfig(dataset="digits", method="sinkhorn", n_iters=11, eps=1.0, out_dir="runs/digits"))
    model, run_config = load_model("runs/digits")
"""

from asap.train.checkpoint import (
    CheckpointError,
    RunConfig,
    load_model,
    read_run_config,
)
from asap.train.config import TrainConfig
from asap.train.data import EpochBatchSampler, batch_inputs, load_split
from asap.train.evaluate import evaluate
from asap.train.loop import read_metrics, train

__all__ = [
    "CheckpointError",
    "EpochBatchSampler",
    "RunConfig",
    "TrainConfig",
    "batch_inputs",
    "evaluate",
    "load_model",
    "load_split",
    "read_metrics",
    "read_run_config",
    "train",
]
