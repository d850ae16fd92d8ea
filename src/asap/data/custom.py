"""Your own data: the options, errors and label/split rules shared by every custom format.

A custom data set is named ``SCHEME:PATH`` (``csv:reviews.csv``,
``imagefolder:photos/``; see :func:`asap.data.registry.parse_dataset_spec`).
Every format produces the same containers as the built-in data sets
(:class:`TextData`, :class:`ImageData`), so tokenizer training, datasets and
training run unchanged. The rules below are common to all formats:

* **Splits** are ``train``, ``validation`` (optional) and ``test``. They come
  from the layout (one file or folder per split), from a split column whose
  values are those three words (case and surrounding spaces ignored), or,
  when neither exists and ``test_fraction`` is set, from a deterministic
  stratified split (:func:`asap.data.splits.stratified_split`).
* **Labels** may be strings or integers. The class list is built from the
  labels of *every* split, so train and test map a label to the same index
  whichever split is loaded: sorted numerically when every label is an
  integer (``"2"`` before ``"10"``; ``"01"`` and ``"1"`` are one class,
  named ``"1"``), else sorted by code point. The class names are recorded in
  ``data.classes``.
* **Errors**: a bad row raises :class:`DataFileError` (a ``ValueError``) naming
  the file and the line (or the row); a missing file raises
  :class:`DataNotFoundError` (a ``FileNotFoundError``) naming what was looked for.
"""

from __future__ import annotations

import gzip
import pathlib
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch

from asap.data.splits import stratified_split
from asap.errors import AsapError, ConfigError

#: The split names a custom data set may hold, in this order.
SPLITS = ("train", "validation", "test")

#: ``imagefolder:PATH`` with a single ``PATH/<class>/`` level holds this share of each class out as "test".
DEFAULT_IMAGE_TEST_FRACTION = 0.2


class DataFileError(AsapError, ValueError):
    """A malformed data file: the message names the file and the line (or row)."""


class DataNotFoundError(AsapError, FileNotFoundError):
    """A data file or folder that does not exist: the message names every path tried."""


@dataclass(frozen=True)
class DataOptions:
    """How to read a custom data set (``csv:``, ``jsonl:``, ``imagefolder:``, ``hf:``).

    Each format reads only some fields (see
    :data:`asap.data.registry.DATA_SOURCES`); setting another one away from its
    default is refused, so a misplaced option never goes silently unused.

    Attributes:
        text_column: the column (CSV header, JSON key, HF column) holding the text.
        label_column: the column holding the class label (string or integer).
        split_column: the column holding ``train`` / ``validation`` / ``test``,
            read when one file (or one HF data set) holds every split.
        image_column: ``hf:`` only: the column holding images; when set the
            data set is an image one, else a text one.
        test_fraction: when a single source has no split column (or an image
            folder has no ``train/``, ``test/`` level), hold out this share of
            each class as "test", drawn with ``split_seed``. ``None``: refused for
            tables (a missing split column is more likely a typo), and
            :data:`DEFAULT_IMAGE_TEST_FRACTION` for image folders.
        split_seed: the seed of that split.
        image_mode: ``"L"`` (grey, 1 channel), ``"RGB"`` (3 channels), or
            ``"auto"``: grey when every image of every split is grey
            (PIL modes ``1``, ``L``, ``LA``), else RGB.
        image_size: resize every image to ``image_size x image_size``
            (bilinear). ``None``: never resize; every image must then share one size.
    """

    text_column: str = "text"
    label_column: str = "label"
    split_column: str = "split"
    image_column: str | None = None
    test_fraction: float | None = None
    split_seed: int = 0
    image_mode: Literal["auto", "L", "RGB"] = "auto"
    image_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("text_column", "label_column", "split_column", "image_column"):
            value = getattr(self, name)
            if value is None and name == "image_column":
                continue
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"data option {name} must be a non-empty column name, got {value!r}")
        used = [self.text_column, self.label_column, self.split_column]
        if self.image_column is not None:
            used.append(self.image_column)
        if len(set(used)) != len(used):
            raise ConfigError(f"data options name one column for two roles: {used}")
        if self.test_fraction is not None and (
            isinstance(self.test_fraction, bool)
            or not isinstance(self.test_fraction, (int, float))
            or not 0.0 < self.test_fraction < 1.0
        ):
            raise ConfigError(f"data option test_fraction must lie in (0, 1) or be None, got {self.test_fraction!r}")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise ConfigError(f"data option split_seed must be an integer, got {self.split_seed!r}")
        if self.image_mode not in ("auto", "L", "RGB"):
            raise ConfigError(f"data option image_mode must be 'auto', 'L' or 'RGB', got {self.image_mode!r}")
        if self.image_size is not None and (
            isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1
        ):
            raise ConfigError(f"data option image_size must be a positive integer or None, got {self.image_size!r}")

    def changed(self) -> tuple[str, ...]:
        """The names of the fields set away from their defaults."""
        default = DataOptions()
        return tuple(f.name for f in fields(self) if getattr(self, f.name) != getattr(default, f.name))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (for a run's ``config.json``); :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataOptions:
        """The options stored by :meth:`to_dict`; an unknown key is refused (:class:`ConfigError`)."""
        if not isinstance(values, dict):
            raise ConfigError(f"data options must be a mapping, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown data option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)


# ---------------------------------------------------------------------------------- file text


def read_text_file(path: pathlib.Path) -> str:
    """The whole file as text: ``.gz`` decompressed, UTF-8 checked, a leading BOM dropped.

    Decoding the whole byte string at once lets a bad byte be placed exactly:
    UTF-8 never uses the newline byte inside a multi-byte character, so the
    line of the bad byte is one plus the newlines before it.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise DataNotFoundError(f"{path}: no such file") from err
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (EOFError, gzip.BadGzipFile, zlib.error) as err:
            raise DataFileError(f"{path}: truncated or corrupt gzip file: {err}") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataFileError(f"{path}:{line}: not valid UTF-8 ({err.reason}, byte 0x{raw[err.start]:02x})") from err
    return text.removeprefix("\ufeff")


# ---------------------------------------------------------------------------------- labels

_INTEGER = re.compile(r"[+-]?[0-9]+")


def label_key(value: str, where: str) -> str:
    """A label as read (a stripped string); empty labels are refused, naming ``where``."""
    key = value.strip()
    if not key:
        raise DataFileError(f"{where}: empty label")
    return key


def class_names(labels: Sequence[str]) -> tuple[str, ...]:
    """The sorted class list of ``labels`` (all splits): numeric when every label is an integer."""
    distinct = set(labels)
    if distinct and all(_INTEGER.fullmatch(label) for label in distinct):
        return tuple(str(value) for value in sorted({int(label) for label in distinct}))
    return tuple(sorted(distinct))


def label_indices(labels: Sequence[str], classes: tuple[str, ...]) -> torch.Tensor:
    """``(N,)`` int64 indices of ``labels`` in ``classes`` (from :func:`class_names`)."""
    index = {name: i for i, name in enumerate(classes)}
    # Integer labels were merged by value ("01" is class "1"); only canonical integer names mark that case.
    numeric = all(_INTEGER.fullmatch(name) and str(int(name)) == name for name in classes)
    keys = [str(int(label)) for label in labels] if numeric else list(labels)
    return torch.tensor([index[key] for key in keys], dtype=torch.int64)


# ---------------------------------------------------------------------------------- splits


def split_name(value: object, where: str) -> str:
    """A split column value as one of :data:`SPLITS` (case and spaces ignored), else an error at ``where``."""
    name = value.strip().lower() if isinstance(value, str) else None
    if name not in SPLITS:
        raise DataFileError(f"{where}: unknown split {value!r}; expected one of {', '.join(SPLITS)}")
    return name


def check_split(split: str, source: str) -> None:
    """Refuse a requested split outside :data:`SPLITS`."""
    if split not in SPLITS:
        raise ConfigError(f"{source}: no split {split!r}; choose one of: {', '.join(SPLITS)}")


def held_out_rows(
    labels: torch.Tensor, split: str, *, test_fraction: float, seed: int, source: str
) -> torch.Tensor:
    """The rows of ``split`` when a source has no split of its own: a stratified train/test cut.

    Each class keeps ``test_fraction`` of its items in "test" (drawn with
    ``seed``, :func:`stratified_split`); there is no "validation" split (the
    trainer cuts one from "train").
    """
    if split == "validation":
        raise DataNotFoundError(
            f"{source}: has no validation split (train and test are cut with test_fraction={test_fraction})"
        )
    train, test = stratified_split(labels, test_fraction=test_fraction, seed=seed)
    return train if split == "train" else test


def missing_split(split: str, source: str, present: Sequence[str]) -> DataNotFoundError:
    """The error for a split that a source does not hold."""
    found = ", ".join(present) if present else "none"
    return DataNotFoundError(f"{source}: has no {split!r} split (splits found: {found})")
