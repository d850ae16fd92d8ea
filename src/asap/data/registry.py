"""The data sets by name: what each one is, and one entry point to load a split."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from asap.data import image_loaders, text_loaders
from asap.data.containers import ImageData, TextData
from asap.data.paths import resolve_data_dir
from asap.data.splits import stratified_head


@dataclass(frozen=True)
class DatasetInfo:
    """What a data set is, without loading it.

    Attributes:
        name: the key in :data:`DATASETS` and the ``--dataset`` value.
        kind: ``"text"`` (:class:`TextData`) or ``"image"`` (:class:`ImageData`).
        num_classes: number of labels.
        splits: the official splits (a validation split is cut from "train"
            with :func:`train_val_split`).
        needs_data_dir: False only for data shipped with a Python package.
        description: one line, with the source to cite.
    """

    name: str
    kind: Literal["text", "image"]
    num_classes: int
    splits: tuple[str, ...]
    needs_data_dir: bool
    description: str


_SPLITS = ("train", "test")

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("imdb", "text", 2, _SPLITS, True,
                    "IMDb movie reviews, positive/negative, 25k/25k (Maas et al., ACL 2011)"),
        DatasetInfo("ag_news", "text", 4, _SPLITS, True,
                    "AG News topics, 120k/7.6k (Zhang, Zhao & LeCun, NIPS 2015)"),
        DatasetInfo("dbpedia14", "text", 14, _SPLITS, True,
                    "DBpedia-14 ontology classes, 560k/70k (Zhang, Zhao & LeCun, NIPS 2015)"),
        DatasetInfo("yelp_review_full", "text", 5, _SPLITS, True,
                    "Yelp reviews, 1-5 stars, 650k/50k (Zhang, Zhao & LeCun, NIPS 2015)"),
        DatasetInfo("cifar100", "image", 100, _SPLITS, True,
                    "CIFAR-100, 32x32 RGB, 50k/10k, binary version (Krizhevsky 2009)"),
        DatasetInfo("fashion_mnist", "image", 10, _SPLITS, True,
                    "Fashion-MNIST, 28x28 grey, 60k/10k (Xiao, Rasul & Vollgraf 2017)"),
        DatasetInfo("digits", "image", 10, _SPLITS, False,
                    "scikit-learn digits, 8x8 grey, 1,797 images, fixed stratified 80/20 split (UCI)"),
    )
}  # fmt: skip

_LOADERS: dict[str, Callable[[pathlib.Path | None, str], TextData | ImageData]] = {
    "imdb": text_loaders.load_imdb,
    "ag_news": text_loaders.load_ag_news,
    "dbpedia14": text_loaders.load_dbpedia14,
    "yelp_review_full": text_loaders.load_yelp_review_full,
    "cifar100": image_loaders.load_cifar100,
    "fashion_mnist": image_loaders.load_fashion_mnist,
    "digits": image_loaders.load_digits,
}


def load_dataset(
    name: str, *, split: str, data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> TextData | ImageData:
    """Load one split of a data set from its official files.

    Args:
        name: a key of :data:`DATASETS`.
        split: one of ``DATASETS[name].splits``.
        data_dir: the data directory; ``None`` reads ``$ASAP_DATA_DIR``
            (see :func:`resolve_data_dir`). Ignored by data sets that ship with
            a package (digits).
        limit: keep only this many items, for quick runs. The subset is
            *stratified* (each class keeps its share, see
            :func:`stratified_head`) and deterministic: the first items of
            each class in file order. ``None`` keeps everything.

    Raises:
        ValueError: unknown name or split (the message lists the valid ones),
            a bad ``limit``, or a malformed file (file and line named).
        FileNotFoundError: no data directory, or the split's file is missing
            (the message names the paths tried and the official file).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    info = DATASETS[name]
    if split not in info.splits:
        raise ValueError(f"data set {name!r} has no split {split!r}; choose one of: {', '.join(info.splits)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    root = resolve_data_dir(data_dir) if info.needs_data_dir else None
    data = _LOADERS[name](root, split)
    if limit is not None and limit < len(data):
        data = data.subset(stratified_head(data.labels, limit))
    return data
