"""From a data set name to batches: splits, tokenizer, normalisation, samplers.

Determinism is what makes ``--resume`` exact and N processes equal to one:

* the order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone, so
  a resumed run replays it and skips the batches already done;
* a *global* batch is cut into ``world_size`` equal contiguous shares, so the
  data seen at each step does not depend on the number of processes;
* loaders get their own seeded generator, so creating one never consumes the
  global torch RNG (which dropout uses).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

import asap.data as asap_data
from asap.errors import AsapError, ConfigError
from asap.io import file_inside
from asap.train.layout import PRETRAINED_TOKENIZER, TOKENIZER_FILE
from asap.train.config import TrainConfig
from asap.train.distributed import DistInfo, barrier
from asap.train.pretrained import pretrained_tokenizer


class EpochBatchSampler(Sampler[list[int]]):
    """This process's share of the global batches of one training epoch.

    The epoch's order is ``np.random.default_rng([seed, epoch]).permutation(num_samples)``;
    global batch ``s`` is ``order[s*B : (s+1)*B]`` (``B = batch_size``; an
    incomplete last batch is dropped) and rank ``r`` of ``R`` takes its
    ``r``-th contiguous ``B/R`` slice. The first ``start_batch`` batches are
    skipped, which is how a resumed run continues mid-epoch.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ):
        if batch_size % world_size != 0:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world_size}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.epoch = seed, epoch
        self.rank, self.world_size = rank, world_size
        self.start_batch = start_batch

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.start_batch, 0)

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        share = self.batch_size // self.world_size
        for step in range(self.start_batch, self.batches_per_epoch):
            start = step * self.batch_size + self.rank * share
            yield order[start : start + share].tolist()


def shard_batches(num_samples: int, *, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Evaluation batches: rank ``r`` takes items ``r, r+R, r+2R, ...`` (every item once over all ranks)."""
    mine = list(range(rank, num_samples, world_size))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def make_loader(
    dataset: Dataset, batches: Sampler[list[int]] | list[list[int]], *, collate: Callable, num_workers: int, seed: int
) -> DataLoader:
    """A DataLoader over explicit index batches, with its own generator (never the global RNG)."""
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


def batch_inputs(batch: dict[str, Tensor], input_names: tuple[str, ...], device: torch.device) -> dict[str, Tensor]:
    """The model's keyword inputs (``model.input_names``) from a collated batch, on ``device``."""
    missing = [name for name in input_names if name not in batch]
    if missing:
        raise KeyError(f"batch has no {missing} (keys: {sorted(batch)}); the model needs {list(input_names)}")
    return {name: batch[name].to(device, non_blocking=True) for name in input_names}


# --------------------------------------------------------------------------- data sets


@dataclass
class PreparedData:
    """Training and validation sets ready for a model, and ``info`` (stored in ``config.json``)."""

    train: Dataset
    val: Dataset
    collate: Callable
    info: dict[str, Any]


def to_model_dataset(data: Any, info: dict[str, Any], run_dir: str | os.PathLike, *, augment: bool = False, seed: int = 0):
    """Wrap raw :class:`TextData`/:class:`ImageData` into a dataset of model inputs, as ``info`` prescribes.

    Returns ``(dataset, collate)``. The tokenizer named by ``info`` (read from a
    run's config) must be a plain file name inside ``run_dir``: the run's own
    subword tokenizer, or (``info["tokenizer_type"] == "pretrained"``) a
    pretrained model's.
    """
    if info["kind"] == "text":
        path = file_inside(run_dir, info["tokenizer"], what=f"{Path(run_dir) / 'config.json'}: data.tokenizer")
        if info.get("tokenizer_type") == PRETRAINED_TOKENIZER:  # its padding id is saved in its file
            tokenizer = asap_data.PretrainedTokenizer.load(path)
            collate = partial(asap_data.collate_text, pad_id=tokenizer.pad_id)
        else:
            tokenizer, collate = asap_data.SubwordTokenizer.load(path), asap_data.collate_text
        return asap_data.TextClassificationDataset(data, tokenizer, info["max_length"]), collate
    # Mirroring changes the class of a digit, and may change that of your own images (text, arrows, ...):
    # only the built-in photo and clothes sets are flipped.
    hflip = info["dataset"] in asap_data.DATASETS and info["dataset"] != "digits"
    dataset = asap_data.ImageClassificationDataset(
        data, mean=info["mean"], std=info["std"], augment=augment, seed=seed, hflip=hflip
    )
    return dataset, asap_data.collate_image


def prepare_data(config: TrainConfig, run_dir: Path, dist: DistInfo) -> PreparedData:
    """Load the training split, hold out ``val_fraction`` of it, fit the tokenizer / pixel statistics
    on the remaining training part only, and build both datasets.

    The tokenizer is trained once (by rank 0) and cached as ``RUN_DIR/tokenizer.json``;
    other ranks, and a resumed run, load that file. A pretrained model
    (``config.pretrained``) brings its own tokenizer, copied there the same way.
    Your own data (``SCHEME:PATH``) records its :class:`~asap.data.DataOptions`
    in ``info["data_options"]``, so that :func:`load_split` reads it back alike.
    """
    options = config.dataset_options()
    spec = asap_data.dataset_info(config.dataset, options=options)
    raw = load_raw(config.dataset, split="train", data_dir=config.data_dir, limit=config.limit, options=options)
    train_idx, val_idx = asap_data.train_val_split(len(raw), val_fraction=config.val_fraction, seed=config.seed)
    # Checked before anything is trained or written: an empty validation part used to fail after an epoch.
    if len(val_idx) == 0:
        raise ConfigError(
            f"--val-fraction {config.val_fraction} of {len(raw)} training example(s) holds out none for validation; "
            "use more data (--limit) or a larger fraction"
        )
    if len(train_idx) < config.batch_size:
        raise ConfigError(
            f"--batch-size {config.batch_size} is larger than the {len(train_idx)} training example(s) left after "
            f"holding out --val-fraction {config.val_fraction} (of --limit {config.limit}); not one step per epoch"
        )
    train_raw, val_raw = raw.subset(train_idx), raw.subset(val_idx)
    info: dict[str, Any] = {"dataset": config.dataset, "kind": spec.kind, "classes": list(raw.classes)}
    if config.dataset not in asap_data.DATASETS:
        info["data_options"] = options.to_dict()
    if spec.kind == "image" and raw.images.shape[2] != raw.images.shape[3]:
        raise ConfigError(f"{config.dataset}: only square images are supported, got {tuple(raw.images.shape[2:])}")
    if spec.kind == "text" and config.pretrained is not None:
        info.update(tokenizer=TOKENIZER_FILE, max_length=config.max_length)
        path = run_dir / TOKENIZER_FILE
        if dist.is_main and not path.exists():  # rank 0 copies the model's tokenizer; the others wait
            pretrained_tokenizer(config).save(path)
        barrier(dist)
        info["tokenizer_type"] = PRETRAINED_TOKENIZER
    elif spec.kind == "text":
        info.update(tokenizer=TOKENIZER_FILE, max_length=config.max_length)
        path = run_dir / TOKENIZER_FILE
        if dist.is_main:  # rank 0 trains (or finds) the tokenizer; the others wait and load it
            tokenizer = asap_data.load_or_train_tokenizer(path, train_raw.texts, vocab_size=config.vocab_size)
        barrier(dist)
        if not dist.is_main:
            tokenizer = asap_data.SubwordTokenizer.load(path)
        info["vocab_size"] = tokenizer.vocab_size
    else:
        _, channels, height, _ = raw.images.shape
        mean, std = asap_data.channel_mean_std(train_raw)
        info.update(image_size=height, in_channels=channels, mean=list(mean), std=list(std))
    train, collate = to_model_dataset(train_raw, info, run_dir, augment=config.augment, seed=config.seed)
    val, _ = to_model_dataset(val_raw, info, run_dir)
    return PreparedData(train, val, collate, info)


def load_split(
    info: dict[str, Any], run_dir: str | os.PathLike, *, split: str, data_dir: str | None, limit: int | None = None
) -> tuple[Dataset, Callable]:
    """A split (e.g. "test") of a trained run's data set, encoded as at training time: ``(dataset, collate)``.

    Your own data is read with the data options the run recorded (``info["data_options"]``).
    """
    options = asap_data.DataOptions.from_dict(info["data_options"]) if "data_options" in info else None
    raw = load_raw(info["dataset"], split=split, data_dir=data_dir, limit=limit, options=options)
    return to_model_dataset(raw, info, run_dir)


def load_raw(name: str, *, split: str, data_dir: str | None, limit: int | None, options: Any = None):
    """:func:`asap.data.load_dataset`, its refusals of missing or malformed files as one-line errors.

    The data loaders raise ``FileNotFoundError``/``ValueError`` with a message naming the file
    (and the line); those are bad input, not bugs, so they become :class:`ConfigError`.
    """
    try:
        return asap_data.load_dataset(name, split=split, data_dir=data_dir, limit=limit, options=options)
    except AsapError:
        raise
    except (OSError, ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise ConfigError(f"{name} ({split} split): {message}") from err
