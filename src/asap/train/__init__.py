"""Training, evaluation and checkpoints (no pickle), single-process or data-parallel.

    from asap.train import TrainConfig, train, load_model
    metrics = train(TrainConfig(dataset="digits", method="sinkhorn", n_iters=11, eps=1.0, out_dir="runs/digits"))
    model, run_config = load_model("runs/digits")

Your own model and data go through the same loop, checkpoints and resume with
:class:`Trainer` (objects: a model, datasets, an optimiser, a schedule) and its
:class:`LoopOptions`; ``train(config)`` is a builder on top of it.
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
from asap.train.trainer import LoopOptions, Trainer

__all__ = [
    "CheckpointError",
    "EpochBatchSampler",
    "LoopOptions",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "batch_inputs",
    "evaluate",
    "load_model",
    "load_split",
    "read_metrics",
    "read_run_config",
    "train",
]
