"""The data sets by name: what each one is, and one entry point to load a split.

Two kinds of names reach :func:`load_dataset` (the ``--dataset`` value):

* a built-in data set, a key of :data:`DATASETS` (``imdb``, ``digits``, ...),
  read from its official files under the data directory;
* your own data, ``SCHEME:PATH``, where ``SCHEME`` is a key of
  :data:`DATA_SOURCES`: ``csv:PATH``, ``jsonl:PATH``
  (:mod:`asap.data.table_files`), ``imagefolder:PATH``
  (:mod:`asap.data.image_folder`) and ``hf:PATH`` (:mod:`asap.data.hf_files`),
  or one added with :func:`register_dataset`. How to read it (column names,
  ...) travels as a :class:`DataOptions`. ``PATH`` is used as given (relative
  to the current directory; ``~`` expanded); the data directory is not used.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from asap.data import image_loaders, text_loaders
from asap.data.containers import ImageData, TextData
from asap.data.custom import SPLITS, DataOptions
from asap.data.hf_files import load_hf
from asap.data.image_folder import load_image_folder
from asap.data.paths import resolve_data_dir
from asap.data.splits import stratified_head
from asap.data.table_files import load_csv, load_jsonl
from asap.errors import ConfigError


@dataclass(frozen=True)
class DatasetInfo:
    """What a data set is, without loading it.

    Attributes:
        name: the key in :data:`DATASETS` and the ``--dataset`` value.
        kind: ``"text"`` (:class:`TextData`) or ``"image"`` (:class:`ImageData`).
        num_classes: number of labels; ``None`` for your own data, where it
            is known only once loaded (``len(data.classes)``).
        splits: the official splits (a validation split is cut from "train"
            with :func:`train_val_split`); for your own data, the splits it
            may hold (``"validation"`` is optional).
        needs_data_dir: False for data shipped with a Python package and for
            your own data (``SCHEME:PATH``).
        description: one line, with the source to cite.
    """

    name: str
    kind: Literal["text", "image"]
    num_classes: int | None
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


# ---------------------------------------------------------------------------------- your own data


class DatasetLoader(Protocol):
    """Reads one split of a ``SCHEME:PATH`` data set: ``loader(path, split=..., options=...)``."""

    def __call__(self, path: pathlib.Path, *, split: str, options: DataOptions) -> TextData | ImageData: ...


@dataclass(frozen=True)
class DataSource:
    """A registered ``SCHEME:PATH`` format.

    Attributes:
        scheme: the prefix before ``:``.
        loader: reads one split (see :class:`DatasetLoader`).
        kind: ``"text"`` or ``"image"``; ``None`` when it follows the options
            (``"image"`` if ``options.image_column`` is set, else ``"text"``).
        options: the :class:`DataOptions` fields the loader reads; setting any
            other one away from its default is refused.
        description: one line, for listings and messages.
    """

    scheme: str
    loader: DatasetLoader
    kind: Literal["text", "image"] | None
    options: frozenset[str]
    description: str

    def kind_for(self, options: DataOptions) -> Literal["text", "image"]:
        if self.kind is not None:
            return self.kind
        return "image" if options.image_column is not None else "text"


_TABLE_OPTIONS = frozenset({"text_column", "label_column", "split_column", "test_fraction", "split_seed"})
_IMAGE_OPTIONS = frozenset({"test_fraction", "split_seed", "image_mode", "image_size"})

#: The ``SCHEME:PATH`` formats, by scheme (extend with :func:`register_dataset`).
DATA_SOURCES: dict[str, DataSource] = {
    source.scheme: source
    for source in (
        DataSource("csv", load_csv, "text", _TABLE_OPTIONS,
                   "a CSV file with a split column, or a folder of train.csv and test.csv"),
        DataSource("jsonl", load_jsonl, "text", _TABLE_OPTIONS,
                   "a JSON Lines file with a split key, or a folder of train.jsonl and test.jsonl"),
        DataSource("imagefolder", load_image_folder, "image", _IMAGE_OPTIONS,
                   "a folder of class subfolders, optionally under train/ and test/"),
        DataSource("hf", load_hf, None, _TABLE_OPTIONS | _IMAGE_OPTIONS | {"image_column"},
                   "a Hugging Face datasets folder (save_to_disk) or local Parquet/CSV files"),
    )
}  # fmt: skip

_SCHEME = re.compile(r"[a-z][a-z0-9_]*")


def register_dataset(
    name: str,
    loader: DatasetLoader,
    *,
    kind: Literal["text", "image"],
    options: frozenset[str] | set[str] = frozenset(),
    description: str = "",
) -> DataSource:
    """Add a ``name:PATH`` format, so that ``--dataset name:PATH`` (and :func:`load_dataset`) read it.

    ``loader(path, split=..., options=...)`` returns the split as a
    :class:`TextData` or :class:`ImageData` of ``kind``; ``options`` names the
    :class:`DataOptions` fields it reads. A name already taken (a scheme or a
    built-in data set) is refused: register once, at import.
    """
    if not isinstance(name, str) or not _SCHEME.fullmatch(name):
        raise ConfigError(f"data-set scheme must be lower-case letters, digits and _, got {name!r}")
    if name in DATA_SOURCES or name in DATASETS:
        raise ConfigError(f"data-set name {name!r} is already registered")
    if kind not in ("text", "image"):
        raise ConfigError(f"kind must be 'text' or 'image', got {kind!r}")
    if not callable(loader):
        raise ConfigError(f"loader for {name!r} must be callable, got {type(loader).__name__}")
    known = set(DataOptions.__dataclass_fields__)
    if not set(options) <= known:
        raise ConfigError(f"unknown data option(s) {sorted(set(options) - known)}; known: {sorted(known)}")
    source = DataSource(name, loader, kind, frozenset(options), description)
    DATA_SOURCES[name] = source
    return source


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed ``SCHEME:PATH`` data-set name; ``str(spec)`` gives it back."""

    scheme: str
    path: pathlib.Path

    def __str__(self) -> str:
        return f"{self.scheme}:{self.path}"

    def absolute(self) -> DatasetSpec:
        """The same data with an absolute path, to store in a run's config (which may be read from elsewhere)."""
        return DatasetSpec(self.scheme, self.path.absolute())


def parse_dataset_spec(name: str) -> DatasetSpec:
    """``"csv:data/reviews.csv"`` -> ``DatasetSpec("csv", Path("data/reviews.csv"))`` (``~`` expanded).

    Raises:
        ConfigError: not ``SCHEME:PATH`` with a scheme of :data:`DATA_SOURCES`,
            or an empty path.
    """
    scheme, colon, path = name.partition(":") if isinstance(name, str) else ("", "", "")
    if not colon or scheme not in DATA_SOURCES:
        raise ConfigError(f"{name!r} is not SCHEME:PATH for a scheme of: {', '.join(DATA_SOURCES)}")
    if not path:
        raise ConfigError(f"{name!r}: empty path after {scheme}:")
    return DatasetSpec(scheme, pathlib.Path(path).expanduser())


def _resolve(name: str, options: DataOptions | None) -> tuple[DatasetInfo, DataSource | None, DatasetSpec | None]:
    """The info of ``name``, its source and spec (``None`` for a built-in), with ``options`` checked against it."""
    if options is not None and not isinstance(options, DataOptions):
        raise ConfigError(f"options must be a DataOptions, got {type(options).__name__}")
    options = options or DataOptions()
    if isinstance(name, str) and name in DATASETS:
        if options.changed():
            raise ConfigError(
                f"data set {name!r} takes no data options (got {', '.join(options.changed())}); "
                f"they are for {', '.join(f'{s}:PATH' for s in DATA_SOURCES)}"
            )
        return DATASETS[name], None, None
    if not (isinstance(name, str) and ":" in name):
        schemes = ", ".join(f"{s}:PATH" for s in DATA_SOURCES)
        raise ConfigError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)} (or {schemes})")
    spec = parse_dataset_spec(name)
    source = DATA_SOURCES[spec.scheme]
    stray = [field for field in options.changed() if field not in source.options]
    if stray:
        raise ConfigError(
            f"{spec.scheme}:PATH does not read the data option(s) {', '.join(stray)}; "
            f"it reads {', '.join(sorted(source.options)) or 'none'}"
        )
    info = DatasetInfo(str(spec), source.kind_for(options), None, SPLITS, False, source.description)
    return info, source, spec


def dataset_info(name: str, *, options: DataOptions | None = None) -> DatasetInfo:
    """What ``name`` is (a key of :data:`DATASETS` or ``SCHEME:PATH``), without loading it.

    Raises:
        ConfigError: an unknown name or scheme, or ``options`` the data set
            does not read (a ``ValueError``; the message lists the valid ones).
    """
    return _resolve(name, options)[0]


def load_dataset(
    name: str,
    *,
    split: str,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    options: DataOptions | None = None,
) -> TextData | ImageData:
    """Load one split of a data set: a built-in one from its official files, or your own (``SCHEME:PATH``).

    Args:
        name: a key of :data:`DATASETS`, or ``SCHEME:PATH`` with a scheme of
            :data:`DATA_SOURCES` (``csv:``, ``jsonl:``, ``imagefolder:``, ``hf:``).
        split: one of ``dataset_info(name).splits``.
        data_dir: the data directory; ``None`` reads ``$ASAP_DATA_DIR``
            (see :func:`resolve_data_dir`). Ignored by data sets that ship with
            a package (digits) and by ``SCHEME:PATH`` names.
        limit: keep only this many items, for quick runs. The subset is
            *stratified* (each class keeps its share, see
            :func:`stratified_head`) and deterministic: the first items of
            each class in file order. ``None`` keeps everything.
        options: how to read ``SCHEME:PATH`` data (column names, ...);
            ``None`` means the defaults. Built-in data sets take none.

    Raises:
        ValueError: unknown name or split (the message lists the valid ones),
            a bad ``limit`` or option, or a malformed file (file and line named).
        FileNotFoundError: no data directory, or the split's file is missing
            (the message names the paths tried and the official file).
    """
    info, source, spec = _resolve(name, options)
    if split not in info.splits:
        raise ValueError(f"data set {name!r} has no split {split!r}; choose one of: {', '.join(info.splits)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if source is None:
        root = resolve_data_dir(data_dir) if info.needs_data_dir else None
        data = _LOADERS[name](root, split)
    else:
        data = source.loader(spec.path, split=split, options=options or DataOptions())
        expected = TextData if info.kind == "text" else ImageData
        if not isinstance(data, expected):
            raise TypeError(f"the {spec.scheme}: loader returned {type(data).__name__}, not {expected.__name__}")
    if limit is not None and limit < len(data):
        data = data.subset(stratified_head(data.labels, limit))
    return data
