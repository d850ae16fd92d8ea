"""Text classification from your own CSV or JSON Lines files (``csv:PATH``, ``jsonl:PATH``).

Two layouts, for either format (``.gz`` compressed files are read too):

* ``PATH`` **a file** holding every split, with a split column::

      text,label,split                      {"text": "great film", "label": "pos", "split": "train"}
      great film,pos,train                  {"text": "dull", "label": "neg", "split": "test"}
      dull,neg,test

  Without a split column, set ``test_fraction`` to cut a stratified test split instead.
* ``PATH`` **a folder** holding ``train.csv`` and ``test.csv`` (and optionally
  ``validation.csv``; likewise ``train.jsonl`` ...; each may be ``.gz``). A
  split column in those files is ignored.

CSV: the first non-blank record is the header (a UTF-8 BOM and spaces around
names are ignored); fields follow the ``csv`` module's default dialect (comma,
``"`` quoting, ``""`` for a quote, quoted fields may span lines); every row has
as many fields as the header; blank lines are skipped. JSON Lines: one JSON
object per line; blank lines skipped; the text must be a string, the label a
string or an integer. Column names come from :class:`DataOptions`
(``text_column``, ``label_column``, ``split_column``; defaults ``text``,
``label``, ``split``). Labels and splits follow :mod:`asap.data.custom`.

Errors name the file and the line where the record starts: a missing column or
key, an empty label, a wrong number of fields, bad quoting, bad JSON, bad
UTF-8, an unknown split value.
"""

from __future__ import annotations

import csv
import io
import json
import pathlib
from collections.abc import Callable
from typing import Literal

from asap.data.containers import TextData
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
    read_text_file,
    split_name,
)
from asap.errors import ConfigError

#: One row: (text, label as read, split or None when the layout gives it).
Row = tuple[str, str, str | None]
#: How a file's split column is read: required, ignored (the file name gives the split), or forbidden.
SplitMode = Literal["column", "ignore", "forbid"]


def _column_index(header: list[str], name: str, *, role: str, where: str, hint: str = "") -> int:
    hits = [i for i, column in enumerate(header) if column == name]
    if not hits:
        raise DataFileError(f"{where}: no {role} column {name!r} in the header (columns: {', '.join(header)}){hint}")
    if len(hits) > 1:
        raise DataFileError(f"{where}: the {role} column {name!r} appears {len(hits)} times in the header")
    return hits[0]


def read_csv_rows(path: pathlib.Path, options: DataOptions, *, split_mode: SplitMode) -> list[Row]:
    """The rows of one CSV file (see the module docstring), with errors naming ``path`` and the line."""
    reader = csv.reader(io.StringIO(read_text_file(path), newline=""), strict=True)
    header: list[str] | None = None
    columns: tuple[int, int, int | None] = (0, 0, None)
    rows: list[Row] = []
    line = 0
    try:
        while True:
            line = reader.line_num + 1  # where the next record starts
            try:
                record = next(reader)
            except StopIteration:
                break
            if not record:  # a blank line
                continue
            where = f"{path}:{line}"
            if header is None:
                header = [name.strip() for name in record]
                text = _column_index(header, options.text_column, role="text", where=where)
                label = _column_index(header, options.label_column, role="label", where=where)
                split = None
                if split_mode == "column":
                    split = _column_index(header, options.split_column, role="split", where=where, hint=_SPLIT_HINT)
                elif split_mode == "forbid" and options.split_column in header:
                    raise DataFileError(f"{where}: has a split column {options.split_column!r}; {_FRACTION_CLASH}")
                columns = (text, label, split)
                continue
            if len(record) != len(header):
                raise DataFileError(f"{where}: expected {len(header)} fields like the header, got {len(record)}")
            text, label, split = columns
            rows.append((
                record[text],
                label_key(record[label], where),
                None if split is None else split_name(record[split], where),
            ))  # fmt: skip
    except csv.Error as err:
        raise DataFileError(f"{path}:{line}: malformed CSV: {err}") from err
    if header is None:
        raise DataFileError(f"{path}: empty file (no header)")
    return rows


_SPLIT_HINT = " (or set test_fraction to cut a stratified test split)"
_FRACTION_CLASH = "test_fraction is only for files without one"


def read_jsonl_rows(path: pathlib.Path, options: DataOptions, *, split_mode: SplitMode) -> list[Row]:
    """The rows of one JSON Lines file (see the module docstring), with errors naming ``path`` and the line."""
    rows: list[Row] = []
    # Split on "\n" only: str.splitlines would also cut at U+2028, which JSON strings may hold raw.
    for number, raw in enumerate(read_text_file(path).split("\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{where}: bad JSON: {err.msg} (column {err.colno})") from err
        if not isinstance(item, dict):
            raise DataFileError(f"{where}: expected a JSON object, got {type(item).__name__}")
        for key in (options.text_column, options.label_column) + (
            (options.split_column,) if split_mode == "column" else ()
        ):
            if key not in item:
                hint = _SPLIT_HINT if key == options.split_column else ""
                raise DataFileError(f"{where}: missing key {key!r} (keys: {', '.join(map(str, item))}){hint}")
        if split_mode == "forbid" and options.split_column in item:
            raise DataFileError(f"{where}: has a split key {options.split_column!r}; {_FRACTION_CLASH}")
        text, label = item[options.text_column], item[options.label_column]
        if not isinstance(text, str):
            raise DataFileError(f"{where}: {options.text_column!r} must be a string, got {type(text).__name__}")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataFileError(
                f"{where}: {options.label_column!r} must be a string or an integer, got {json.dumps(label)}"
            )
        split = split_name(item[options.split_column], where) if split_mode == "column" else None
        rows.append((text, label_key(str(label), where), split))
    return rows


# ------------------------------------------------------------------------------------ layouts


def split_files(folder: pathlib.Path, suffix: str) -> dict[str, pathlib.Path]:
    """``{split: file}`` for the ``{split}{suffix}[.gz]`` files of ``folder`` (both forms of one split: refused)."""
    found = {}
    for split in SPLITS:
        candidates = [path for path in (folder / f"{split}{suffix}", folder / f"{split}{suffix}.gz") if path.is_file()]
        if len(candidates) > 1:
            raise DataFileError(f"{folder}: both {candidates[0].name} and {candidates[1].name} exist; keep one")
        if candidates:
            found[split] = candidates[0]
    if "train" not in found:
        raise DataNotFoundError(
            f"{folder}: no train{suffix} or train{suffix}.gz (a folder data set holds train{suffix} and "
            f"test{suffix}, optionally validation{suffix})"
        )
    return found


def load_table(
    path: pathlib.Path,
    *,
    split: str,
    options: DataOptions,
    scheme: str,
    suffix: str,
    read_rows: Callable[..., list[Row]],
) -> TextData:
    """One split of a table data set, in either layout; classes from every split (see the module docstring)."""
    source = f"{scheme}:{path}"
    check_split(split, source)
    if path.is_dir():
        if options.test_fraction is not None:
            raise ConfigError(f"{source}: test_fraction is for a single file; this folder gives the splits by file")
        files = split_files(path, suffix)
        parts = {name: read_rows(file, options, split_mode="ignore") for name, file in files.items()}
        rows = [row for name in files for row in parts[name]]
        if split not in files:
            raise missing_split(split, source, list(files))
        where = files[split]
        chosen = parts[split]
    elif path.is_file():
        split_mode: SplitMode = "column" if options.test_fraction is None else "forbid"
        rows = read_rows(path, options, split_mode=split_mode)
        where = path
        if split_mode == "column":
            chosen = [row for row in rows if row[2] == split]
            if not chosen:
                raise missing_split(split, source, [name for name in SPLITS if any(row[2] == name for row in rows)])
        else:
            labels = label_indices([row[1] for row in rows], class_names([row[1] for row in rows]))
            index = held_out_rows(
                labels, split, test_fraction=options.test_fraction, seed=options.split_seed, source=source
            )
            chosen = [rows[i] for i in index.tolist()]
    else:
        raise DataNotFoundError(f"{source}: no such file or folder")
    if not chosen:
        raise DataFileError(f"{where}: no {split!r} rows")
    classes = class_names([row[1] for row in rows])
    return TextData([row[0] for row in chosen], label_indices([row[1] for row in chosen], classes), classes)


def load_csv(path: pathlib.Path, *, split: str, options: DataOptions) -> TextData:
    """``csv:PATH``: one split of a CSV data set (see the module docstring for the layouts)."""
    return load_table(path, split=split, options=options, scheme="csv", suffix=".csv", read_rows=read_csv_rows)


def load_jsonl(path: pathlib.Path, *, split: str, options: DataOptions) -> TextData:
    """``jsonl:PATH``: one split of a JSON Lines data set (see the module docstring for the layouts)."""
    return load_table(path, split=split, options=options, scheme="jsonl", suffix=".jsonl", read_rows=read_jsonl_rows)
