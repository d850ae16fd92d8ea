"""Hugging Face ``datasets`` data sets on local disk (``hf:PATH``), never downloading.

``PATH`` may be:

* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
  (it holds ``dataset_dict.json``, or ``state.json`` for a single data set),
  read with ``datasets.load_from_disk``;
* a folder of local Parquet or CSV files (``.parquet``, ``.csv``, ``.csv.gz``;
  one format per folder, searched recursively), read with
  ``datasets.load_dataset("parquet" | "csv", data_files=...)``. A file whose
  name (or folder) starts with a split name (``train.parquet``,
  ``train-00000-of-00002.parquet``, ``test/part0.parquet``) belongs to that split;
* one such file.

The splits are those of the ``DatasetDict`` or the file names (``train``,
``validation``, ``test``; other splits, such as IMDb's ``unsupervised``, are
ignored). A single data set (one file, or files not named by split) takes its
splits from ``split_column`` or, if ``test_fraction`` is set, from a stratified
cut, as :mod:`asap.data.table_files` does.

Columns come from :class:`DataOptions`: ``text_column`` and ``label_column``
for text; with ``image_column`` set the data set is an image one (images as
the ``datasets.Image`` feature, stored with their bytes, or as ``(H, W)`` /
``(H, W, C)`` arrays of 0..255), read like :mod:`asap.data.image_folder`
(``image_mode``, ``image_size``). A ``ClassLabel`` label column keeps its own
names and order; other labels (strings or integers) follow
:mod:`asap.data.custom`. A bad value is named by split and row.

The loader sets ``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1`` (and the
flags ``datasets`` read from them at import) for the duration of the call, so
nothing is downloaded. Parquet and CSV files are converted once into the
``datasets`` cache (``$HF_DATASETS_CACHE``), as ``load_dataset`` always does.
Needs the ``hf`` extra (``pip install datasets``).
"""

from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from asap.data.containers import ImageData, TextData
from asap.data.custom import (
    SPLITS,
    DataFileError,
    DataNotFoundError,
    DataOptions,
    check_split,
    class_names,
    held_out_rows,
    label_indices,
    label_key,
    missing_split,
    split_name,
)
from asap.data.image_folder import ImageSource, image_layout, pil_image_module, read_images

_OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv"}
_SAVED_MARKERS = ("dataset_dict.json", "state.json")


@contextmanager
def offline_datasets() -> Iterator[Any]:
    """The ``datasets`` module in offline mode (environment and its import-time flags), restored after."""
    saved_env = {name: os.environ.get(name) for name in _OFFLINE_ENV}
    os.environ.update(dict.fromkeys(_OFFLINE_ENV, "1"))  # before the first import, which reads them
    try:
        try:
            import datasets
        except ImportError as err:
            raise ModuleNotFoundError(
                "hf:PATH data sets need `datasets`: pip install datasets (or asap-attention[hf])"
            ) from err
        saved_flags = {name: getattr(datasets.config, name) for name in _OFFLINE_ENV if hasattr(datasets.config, name)}
        bars_were_on = datasets.is_progress_bar_enabled()
        for name in saved_flags:
            setattr(datasets.config, name, True)
        datasets.disable_progress_bars()
        try:
            yield datasets
        finally:
            for name, value in saved_flags.items():
                setattr(datasets.config, name, value)
            if bars_were_on:
                datasets.enable_progress_bars()
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _file_kind(path: pathlib.Path) -> str | None:
    name = path.name.lower()
    return next((suffix for suffix in (".csv.gz", ".parquet", ".csv") if name.endswith(suffix)), None)


def _split_of(file: pathlib.Path, root: pathlib.Path) -> str | None:
    """The split a file belongs to by its name or a folder name under ``root``, else ``None``."""
    for part in [*file.relative_to(root).parts[:-1], file.name]:
        lowered = part.lower()
        for split in SPLITS:
            if lowered == split or (lowered.startswith(split) and lowered[len(split)] in "-_."):
                return split
    return None


def _read_files(datasets, path: pathlib.Path) -> dict[str, Any]:
    """``{split or "": Dataset}`` from local Parquet/CSV files (``""``: one data set holding every split)."""
    if path.is_file():
        files = [path] if _file_kind(path) else []
        root = path.parent
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and _file_kind(p) and not p.name.startswith("."))
        root = path
    if not files:
        raise DataNotFoundError(
            f"hf:{path}: not a saved data set ({' or '.join(_SAVED_MARKERS)}) and no .parquet/.csv/.csv.gz files"
        )
    builders = {_FILE_BUILDERS[_file_kind(f)] for f in files}
    if len(builders) > 1:
        raise DataFileError(f"hf:{path}: holds both Parquet and CSV files; keep one format")
    groups: dict[str, list[str]] = {}
    for file in files:
        groups.setdefault(_split_of(file, root) or "", []).append(str(file))
    if "" in groups and len(groups) > 1:
        stray = groups[""][0]
        raise DataFileError(f"hf:{path}: {stray} is not named by a split ({', '.join(SPLITS)}) like the others")
    if "" in groups:
        groups = {"train": groups[""]}
        single = True
    else:
        single = False
    loaded = datasets.load_dataset(builders.pop(), data_files=groups)
    return {("" if single else name): data for name, data in loaded.items()}


def read_splits(path: pathlib.Path) -> dict[str, Any]:
    """``{split: datasets.Dataset}`` of ``hf:PATH``; the key ``""`` holds a single data set of every split."""
    with offline_datasets() as datasets:
        if path.is_dir() and any((path / marker).is_file() for marker in _SAVED_MARKERS):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                return {name: data for name, data in loaded.items() if name in SPLITS}
            return {"": loaded}
        if not path.exists():
            raise DataNotFoundError(f"hf:{path}: no such file or folder")
        return _read_files(datasets, path)


# ------------------------------------------------------------------------------------ columns


def _column(data, name: str, *, role: str, where: str) -> list[Any]:
    if name not in data.column_names:
        hint = ""
        if role == "text":
            images = [c for c, f in data.features.items() if type(f).__name__ == "Image"]
            hint = f"; for an image data set set image_column (e.g. {images[0]!r})" if images else ""
        raise DataFileError(f"{where}: no {role} column {name!r} (columns: {', '.join(data.column_names)}){hint}")
    return data[name]


def _label_strings(data, options: DataOptions, where: str) -> list[str]:
    feature = data.features.get(options.label_column)
    values = _column(data, options.label_column, role="label", where=where)
    if type(feature).__name__ == "ClassLabel":
        missing = next((row for row, v in enumerate(values) if v is None or v < 0), None)
        if missing is not None:  # datasets marks an unlabelled row by -1
            raise DataFileError(f"{where} row {missing}: no label ({values[missing]!r})")
        return [feature.int2str(v) for v in values]
    labels = []
    for row, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise DataFileError(f"{where} row {row}: label must be a string or an integer, got {value!r}")
        labels.append(label_key(str(value), f"{where} row {row}"))
    return labels


def _classes(parts: dict[str, Any], labels: dict[str, list[str]], options: DataOptions) -> tuple[str, ...]:
    features = [data.features.get(options.label_column) for data in parts.values()]
    if features and all(type(f).__name__ == "ClassLabel" for f in features):
        names = {tuple(f.names) for f in features}
        if len(names) > 1:
            raise DataFileError(f"splits disagree on the ClassLabel names of {options.label_column!r}: {sorted(names)}")
        return names.pop()
    return class_names([label for split_labels in labels.values() for label in split_labels])


def _image_sources(data, options: DataOptions, where: str) -> list[ImageSource]:
    Image = pil_image_module()
    feature = data.features.get(options.image_column)
    if type(feature).__name__ == "Image":
        import datasets

        values = data.cast_column(options.image_column, datasets.Image(decode=False))[options.image_column]
    else:
        values = _column(data, options.image_column, role="image", where=where)
    sources = []
    for row, value in enumerate(values):
        name = f"{where} row {row}"
        if isinstance(value, dict):
            if not value.get("bytes"):
                # A path-only image would point anywhere on disk; save_to_disk and to_parquet embed the bytes.
                raise DataFileError(f"{name}: image stored as a path, not bytes; save the data set with its images")
            sources.append((name, lambda raw=value["bytes"]: Image.open(io.BytesIO(raw))))
            continue
        array = np.asarray(value)
        channels_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))
        if array.dtype.kind not in "ui" or not channels_ok:
            raise DataFileError(
                f"{name}: expected an image or an (H, W[, C]) integer array, got {array.dtype} {array.shape}"
            )
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DataFileError(f"{name}: pixel values must lie in 0..255, got {array.min()}..{array.max()}")
        array = array.astype(np.uint8)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        sources.append((name, lambda a=array: Image.fromarray(a)))
    return sources


def load_hf(path: pathlib.Path, *, split: str, options: DataOptions) -> TextData | ImageData:
    """``hf:PATH``: one split of a local Hugging Face data set (see the module docstring)."""
    source = f"hf:{path}"
    check_split(split, source)
    parts = read_splits(path)
    if "" in parts:  # one data set holding every split
        data = parts[""]
        if options.test_fraction is None:
            values = _column(data, options.split_column, role="split", where=source)
            splits = [split_name(value, f"{source} row {row}") for row, value in enumerate(values)]
            index = [row for row, name in enumerate(splits) if name == split]
            if not index:
                raise missing_split(split, source, [name for name in SPLITS if name in splits])
        else:
            if options.split_column in data.column_names:
                raise DataFileError(
                    f"{source}: has a split column {options.split_column!r}; test_fraction is only for data without one"
                )
            labels = _label_strings(data, options, source)
            index = held_out_rows(
                label_indices(labels, class_names(labels)), split,
                test_fraction=options.test_fraction, seed=options.split_seed, source=source,
            ).tolist()  # fmt: skip
        parts = {"": data}
        chosen = data.select(index)
    else:
        if options.test_fraction is not None:
            raise DataFileError(f"{source}: has its own splits; test_fraction is only for a single data set")
        if split not in parts:
            raise missing_split(split, source, list(parts))
        chosen = parts[split]
    where = f"{source} ({split} split)"
    labels = {name: _label_strings(data, options, f"{source} ({name or 'all'} split)") for name, data in parts.items()}
    classes = _classes(parts, labels, options)
    chosen_labels = label_indices(_label_strings(chosen, options, where), classes)
    if len(chosen) == 0:
        raise DataFileError(f"{where}: no rows")
    if options.image_column is None:
        texts = _column(chosen, options.text_column, role="text", where=where)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataFileError(f"{where} row {row}: text must be a string, got {type(text).__name__}")
        return TextData(list(texts), chosen_labels, classes)
    every = [
        image for name, data in parts.items()
        for image in _image_sources(data, options, f"{source} ({name or 'all'} split)")
    ]  # fmt: skip
    mode, size = image_layout(every, options)
    images = read_images(_image_sources(chosen, options, where), mode=mode, size=size)
    return ImageData(images, chosen_labels, classes)
