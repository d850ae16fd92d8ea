"""``train(config)``: build a run's objects from a :class:`TrainConfig`, then run them in a :class:`Trainer`.

The loop itself (steps, checkpoints, exact resume, divergence checks) is
:class:`asap.train.trainer.Trainer`, which takes objects; this module only
builds them: the run folder (:class:`~asap.train.run_folder.RunFolder`, opened
first so that nothing is written before it is checked and locked), the data
(:func:`~asap.train.data.prepare_data`: tokenizer or pixel statistics fitted on
the training part), the model (:func:`model_config_for`), AdamW
(:func:`make_optimizer`) and the warm-up + cosine schedule, in that order: the
order in which they draw from the seeded generators is part of a run's result.
When the run completes, it evaluates the test split (``eval_test.json``).
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from asap.env import machine_info
from asap.errors import ConfigError
from asap.io import atomic_write_json
from asap.models import ModelConfig, TextClassifierConfig, ViTConfig
from asap.train.run_config import RunConfig
from asap.train.config import TrainConfig
from asap.train.data import load_split, prepare_data
from asap.train.distributed import barrier, cleanup_distributed, setup_distributed
from asap.train.evaluate import eval_record
from asap.train.pretrained import initial_model, pretrained_model_config
from asap.train.run_folder import RunFolder, read_metrics
from asap.train.schedule import warmup_cosine
from asap.train.trainer import LoopOptions, RunInterrupted, Trainer, TrainingDiverged

__all__ = [
    "LoopOptions",
    "RunInterrupted",
    "Trainer",
    "TrainingDiverged",
    "make_optimizer",
    "model_config_for",
    "read_metrics",
    "seed_all",
    "train",
]


def train(
    config: TrainConfig, *, resume: bool = False, command: str | None = None, allow_unfitted: bool = False
) -> dict[str, Any]:
    """Train a model as ``config`` says; with ``resume=True`` continue the run in ``config.out_dir``.

    Under ``torchrun`` every process calls this; the global batch is split
    across them and only rank 0 writes files. Returns (on every rank) a dict
    with the per-epoch ``history`` (as in ``metrics.jsonl``), ``test`` metrics
    (None when the run stopped early), ``global_step`` and ``completed``.

    ``command`` (the command line) is appended to ``RUN_DIR/command.txt`` once
    every check has passed. ``method="asap"`` trains with a dual map that is never
    fitted (``asap compile`` fits it to a trained teacher); that is refused
    unless ``allow_unfitted``.

    Raises:
        ConfigError, CheckpointError: bad options or run folder (nothing written).
        TrainingDiverged: a non-finite loss (the last good checkpoint is kept).
        RunInterrupted: SIGINT/SIGTERM, after a checkpoint.
    """
    if config.method == "asap" and not allow_unfitted:
        raise ConfigError(
            "--method asap: ASAP's dual map is not trained but fitted to a trained teacher by `asap compile`; "
            "train with sinkhorn and compile, or pass --allow-unfitted (allow_unfitted=True) to train with an "
            "unfitted (zero) map"
        )
    dist = setup_distributed(config.device)
    try:
        if config.batch_size % dist.world_size != 0:
            raise ConfigError(
                f"--batch-size {config.batch_size} must be divisible by the number of processes {dist.world_size}"
            )
        folder = RunFolder(config.out_dir, resume=resume, dist=dist)
        try:
            with folder.setting_up():
                seed_all(config.seed)
                data = prepare_data(config, folder.path, dist)
                model_config = model_config_for(config, data.info)
                torch.manual_seed(config.seed)  # identical initial weights on every process
                model = initial_model(config, model_config).to(dist.device)
                run_config = RunConfig(
                    model=model_config, train=config, data=data.info,
                    environment={**machine_info(dist.device), "world_size": dist.world_size},
                )  # fmt: skip
                options = LoopOptions.from_config(config)
                optimizer = make_optimizer(model, config)
                total_steps = options.total_steps(len(data.train))  # >= 1: prepare_data checked
                schedule = partial(
                    warmup_cosine,
                    warmup_steps=math.ceil(config.warmup_fraction * total_steps),
                    total_steps=total_steps,
                    min_ratio=config.min_lr_ratio,
                )
                scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
                trainer = Trainer(
                    model, data.train, data.val, collate=data.collate, optimizer=optimizer, scheduler=scheduler,
                    options=options, resume=resume, dist=dist, run_folder=folder, run_config=run_config,
                    command=command,
                )  # fmt: skip
            result = trainer.run()
            if result["completed"]:
                result["test"] = _evaluate_test(trainer, config, run_config)
                result["elapsed_seconds"] = trainer.elapsed()
            # Wait for rank 0 to finish writing: a rank that tears down its gloo group
            # while a peer is still in flight aborts ("terminate called without an
            # active exception"). Not on the error path, where a peer may never arrive.
            barrier(dist)
        finally:
            folder.release()
        return result
    finally:
        cleanup_distributed(dist)


def _evaluate_test(trainer: Trainer, config: TrainConfig, run_config: RunConfig) -> dict[str, Any]:
    """Evaluate the finished run on the test split; rank 0 writes ``eval_test.json``."""
    start = time.perf_counter()
    test_set, collate = load_split(run_config.data, trainer.run_dir, split="test", data_dir=config.data_dir, limit=config.limit)
    test = eval_record(
        trainer.evaluate(test_set, collate), run_dir=trainer.run_dir, dataset=config.dataset, split="test",
        limit=config.limit, attention=run_config.model.attention.to_dict(),
        seconds=time.perf_counter() - start, device=trainer.dist.device,
    )  # fmt: skip
    if trainer.dist.is_main:
        atomic_write_json(trainer.run_dir / "eval_test.json", test)
        print(f"test accuracy {test['accuracy']:.4f} (loss {test['loss']:.4f}, {test['num_samples']} examples)", flush=True)
    return test


def model_config_for(config: TrainConfig, data_info: dict[str, Any]) -> ModelConfig:
    """The model a training config asks for, shaped by the data (vocabulary, classes, image size).

    A pretrained model (``config.pretrained``) gives its own config, checked against the data
    (:func:`asap.train.pretrained.pretrained_model_config`).
    Raises :class:`ConfigError` when the options do not fit the data (a patch
    size that does not divide the image).
    """
    if config.pretrained is not None:
        return pretrained_model_config(config, data_info)
    size = config.model_size()
    common = dict(num_classes=len(data_info["classes"]), dropout=config.dropout, attention=config.attention_config(), **size)
    if data_info["kind"] == "text":
        return TextClassifierConfig(
            vocab_size=data_info["vocab_size"], max_length=config.max_length, pooling=config.pooling, **common
        )
    image_size = data_info["image_size"]
    patch_size = config.patch_size
    if patch_size is None:  # the default: the largest of 4, 2, 1 that leaves at least 4 x 4 patches
        patch_size = next(p for p in (4, 2, 1) if image_size % p == 0 and image_size // p >= 4)
    elif patch_size > image_size or image_size % patch_size != 0:
        raise ConfigError(
            f"--patch-size {patch_size} does not divide the {image_size} x {image_size} images of {data_info['dataset']}"
        )
    return ViTConfig(image_size=image_size, patch_size=patch_size, in_channels=data_info["in_channels"], **common)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not biases, norms, position embeddings, class token)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.dim() < 2 or name.split(".")[-1] in ("position_embedding", "cls_token")
        (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def seed_all(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
