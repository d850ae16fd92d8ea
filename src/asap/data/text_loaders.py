"""Readers for the text benchmarks, in their official on-disk formats.

Layout under the data directory (the first existing candidate is used):

============================  ===================================================
``imdb``                      ``imdb/{split}.csv.gz`` or ``imdb/{split}.csv``
                              (header ``text,label``, the shared copy), else the
                              original ``aclImdb/{split}/{neg,pos}/<id>_<stars>.txt``
                              (also under ``imdb/aclImdb/``)
``ag_news``                   ``ag_news/{split}.csv[.gz]`` or ``ag_news_csv/...``
``dbpedia14``                 ``dbpedia_csv/{split}.csv[.gz]``
``yelp_review_full``          ``yelp_review_full_csv/{split}.csv[.gz]``
============================  ===================================================

The last three use the CSV format of Zhang, Zhao & LeCun (2015): no header,
every field double-quoted, ``""`` for a quote inside a field, a 1-based class
index first, then one text field (Yelp) or two (title, body: AG News,
DBpedia), which are joined as ``title + ". " + body``. Class names come from
``classes.txt`` beside the CSV when present, else from the official lists below.

Every malformed row raises ``ValueError`` naming the file and the line where the
row starts; a missing file raises ``FileNotFoundError`` naming what was looked for.
"""

from __future__ import annotations

import csv
import gzip
import html
import pathlib
import re
import zlib
from collections.abc import Callable, Iterator

import torch

from asap.data.containers import TextData
from asap.data.paths import find_first

IMDB_CLASSES = ("neg", "pos")
AG_NEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")
DBPEDIA14_CLASSES = (
    "Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder", "MeanOfTransportation",
    "Building", "NaturalPlace", "Village", "Animal", "Plant", "Album", "Film", "WrittenWork",
)  # fmt: skip
YELP_REVIEW_FULL_CLASSES = ("1 star", "2 stars", "3 stars", "4 stars", "5 stars")

# ----------------------------------------------------------------------------------------------
# Clean-up of the text fields. Each data set has its own quirks; the functions are public so a
# user can see (and test) exactly what the model reads.
# ----------------------------------------------------------------------------------------------

_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def clean_imdb_text(text: str) -> str:
    """Replace the HTML line breaks of IMDb reviews (``<br />``, ``<br>``) by a space.

    The reviews were scraped from HTML and keep ``<br />`` tags (on average
    several per review); left in, a subword tokenizer would spend vocabulary and
    sequence length on markup. A space keeps the words on either side apart.
    Apart from stripping surrounding whitespace, nothing else is changed.
    """
    return _HTML_BREAK.sub(" ", text).strip()


_ZHANG_ESCAPE = re.compile(r'\\([n"\\])')
_ZHANG_UNESCAPED = {"n": "\n", '"': '"', "\\": "\\"}


def unescape_zhang_text(text: str) -> str:
    """Decode the backslash escapes of the Zhang et al. (2015) CSV files (DBpedia, Yelp).

    Their readme: "New lines are escaped by a backslash followed with an "n"
    character". ``\\n`` becomes a newline; the companion escapes ``\\"`` and
    ``\\\\`` become ``"`` and ``\\``. One regular-expression pass decodes them
    left to right, so ``\\\\n`` is a backslash followed by ``n``, not a newline.
    """
    return _ZHANG_ESCAPE.sub(lambda m: _ZHANG_UNESCAPED[m.group(1)], text).strip()


# "&#39;" lost its "&" (replaced by a space) in the AG corpus: "it #39;s", "the  #36;10".
# A whitelist, not any "word;": " times;" must stay text, not become "×".
_AG_ENTITY_REMNANT = re.compile(r" (#\d{1,6}|quot|amp|lt|gt|nbsp|hellip|[lr][sd]quo|[mn]dash);")


def clean_ag_news_text(text: str) -> str:
    """Undo the escapes of the AG News files.

    Despite their readme, the AG News files mark a line break by a *lone*
    backslash (``"a second\\team"``, ``"gave\\no indication"``), so ``\\n``
    cannot be decoded as a newline there. The rules, in order:

    1. ``\\$`` is an escaped dollar sign: ``$``.
    2. Any other run of backslashes is a line break: one space.
    3. HTML entities whose ``&`` became a space in the corpus (``" #39;"``,
       ``" quot;"``, ``" #36;"``, ...) are decoded, dropping that space:
       ``"it #39;s"`` becomes ``"it's"``.
    4. Remaining regular entities (``&lt;``, ``&amp;``, ...) are decoded.
    """
    text = text.replace("\\$", "$")
    text = re.sub(r"\\+", " ", text)
    text = _AG_ENTITY_REMNANT.sub(lambda m: html.unescape(f"&{m.group(1)};"), text)
    return html.unescape(text).strip()


# ----------------------------------------------------------------------------------------------
# File readers.
# ----------------------------------------------------------------------------------------------


def _csv_records(path: pathlib.Path) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line number where the record starts, fields)`` from a ``.csv`` or ``.csv.gz``.

    Low-level failures (bad quoting, a truncated gzip stream, invalid UTF-8)
    become ``ValueError`` naming the file and line.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    line = 0
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as stream:
            reader = csv.reader(stream, strict=True)
            while True:
                line = reader.line_num + 1
                try:
                    record = next(reader)
                except StopIteration:
                    return
                yield line, record
    except csv.Error as err:
        raise ValueError(f"{path}:{line}: malformed CSV: {err}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 (near line {line}): {err}") from err
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path}: truncated or corrupt gzip stream (near line {line}): {err}") from err


def _class_index(field: str, num_classes: int, *, first: int, where: str) -> int:
    value = field.strip()
    if not (value.isascii() and value.isdigit()) or not first <= int(value) < first + num_classes:
        last = first + num_classes - 1
        raise ValueError(f"{where}: class index must be an integer in {first}..{last}, got {field!r}")
    return int(value) - first


def _text_data(texts: list[str], labels: list[int], classes: tuple[str, ...], path: pathlib.Path) -> TextData:
    if not texts:
        raise ValueError(f"{path}: contains no examples")
    return TextData(texts, torch.tensor(labels, dtype=torch.int64), classes)


def read_imdb_csv(path: pathlib.Path) -> TextData:
    """Read the shared IMDb copy: CSV with header ``text,label``, label 0 = neg, 1 = pos.

    Texts go through :func:`clean_imdb_text`.
    """
    texts, labels = [], []
    records = _csv_records(path)
    header = next(records, None)
    if header is None or header[1] != ["text", "label"]:
        found = None if header is None else header[1]
        raise ValueError(f"{path}:1: expected the header ['text', 'label'], got {found}")
    for line, record in records:
        if len(record) != 2:
            raise ValueError(f"{path}:{line}: expected 2 fields (text, label), got {len(record)}")
        labels.append(_class_index(record[1], 2, first=0, where=f"{path}:{line}"))
        texts.append(clean_imdb_text(record[0]))
    return _text_data(texts, labels, IMDB_CLASSES, path)


_ACLIMDB_NAME = re.compile(r"^(\d+)_(\d+)\.txt$")


def read_imdb_folder(split_dir: pathlib.Path) -> TextData:
    """Read the original ``aclImdb/{split}`` layout: ``neg/`` and ``pos/`` of ``<id>_<stars>.txt``.

    Order matches the shared CSV: negatives by numeric id, then positives.
    Texts go through :func:`clean_imdb_text`.
    """
    texts, labels = [], []
    for label, name in enumerate(IMDB_CLASSES):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            raise FileNotFoundError(f"IMDb folder layout: missing {class_dir} (expected aclImdb/<split>/{{neg,pos}}/)")
        numbered = []
        for file in class_dir.glob("*.txt"):
            match = _ACLIMDB_NAME.match(file.name)
            if match is None:
                raise ValueError(f"{file}: IMDb review files must be named <id>_<stars>.txt")
            numbered.append((int(match.group(1)), file))
        for _, file in sorted(numbered):
            try:
                texts.append(clean_imdb_text(file.read_text(encoding="utf-8")))
            except UnicodeDecodeError as err:
                raise ValueError(f"{file}: not valid UTF-8: {err}") from err
            labels.append(label)
    return _text_data(texts, labels, IMDB_CLASSES, split_dir)


def read_class_names(path: pathlib.Path, *, num_classes: int) -> tuple[str, ...]:
    """Read a ``classes.txt``: one class name a line, in label order (blank lines ignored)."""
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if len(names) != num_classes:
        raise ValueError(f"{path}: expected {num_classes} class names, found {len(names)}")
    return names


def read_zhang_csv(
    path: pathlib.Path, *, classes: tuple[str, ...], num_text_fields: int, clean: Callable[[str], str]
) -> TextData:
    """Read a Zhang et al. (2015) CSV: ``"class index (1-based)","field", ...``, no header.

    Args:
        path: the ``.csv`` or ``.csv.gz`` file.
        classes: class names; their number fixes the valid class indices.
        num_text_fields: 2 (title, body) for AG News and DBpedia, 1 for Yelp.
        clean: decoding of one field's escapes (data-set specific, see above).

    The cleaned non-empty text fields are joined by ``". "``.
    """
    texts, labels = [], []
    for line, record in _csv_records(path):
        if len(record) != 1 + num_text_fields:
            raise ValueError(
                f"{path}:{line}: expected {1 + num_text_fields} fields (class index and "
                f"{num_text_fields} text field(s)), got {len(record)}"
            )
        labels.append(_class_index(record[0], len(classes), first=1, where=f"{path}:{line}"))
        texts.append(". ".join(part for part in map(clean, record[1:]) if part))
    return _text_data(texts, labels, classes, path)


# ----------------------------------------------------------------------------------------------
# Data-set loaders: directory layout -> reader.
# ----------------------------------------------------------------------------------------------


def load_imdb(root: pathlib.Path, split: str) -> TextData:
    """IMDb (Maas et al. 2011), 25,000 reviews per split, labels neg/pos."""
    path = find_first(
        [
            root / "imdb" / f"{split}.csv.gz",
            root / "imdb" / f"{split}.csv",
            root / "aclImdb" / split,
            root / "imdb" / "aclImdb" / split,
        ],
        what=f"IMDb split {split!r}",
        official=f"imdb/{split}.csv.gz (see shared/data/SOURCES.md) or aclImdb/{split}/ from aclImdb_v1.tar.gz",
    )
    return read_imdb_folder(path) if path.is_dir() else read_imdb_csv(path)


def _load_zhang(
    root: pathlib.Path,
    split: str,
    *,
    folders: tuple[str, ...],
    title: str,
    archive: str,
    classes: tuple[str, ...],
    num_text_fields: int,
    clean: Callable[[str], str],
) -> TextData:
    candidates = [root / folder / f"{split}.csv{ext}" for folder in folders for ext in (".gz", "")]
    official = f"{split}.csv from {archive} (Zhang et al. 2015)"
    path = find_first(candidates, what=f"{title} split {split!r}", official=official)
    classes_file = path.parent / "classes.txt"
    if classes_file.exists():
        classes = read_class_names(classes_file, num_classes=len(classes))
    return read_zhang_csv(path, classes=classes, num_text_fields=num_text_fields, clean=clean)


def load_ag_news(root: pathlib.Path, split: str) -> TextData:
    """AG News: 120,000 train / 7,600 test, 4 topics; text = title + ". " + description."""
    return _load_zhang(
        root, split, folders=("ag_news", "ag_news_csv"), title="AG News", archive="ag_news_csv.tgz",
        classes=AG_NEWS_CLASSES, num_text_fields=2, clean=clean_ag_news_text,
    )  # fmt: skip


def load_dbpedia14(root: pathlib.Path, split: str) -> TextData:
    """DBpedia-14: 560,000 train / 70,000 test, 14 classes; text = title + ". " + content."""
    return _load_zhang(
        root, split, folders=("dbpedia_csv",), title="DBpedia-14", archive="dbpedia_csv.tar.gz",
        classes=DBPEDIA14_CLASSES, num_text_fields=2, clean=unescape_zhang_text,
    )  # fmt: skip


def load_yelp_review_full(root: pathlib.Path, split: str) -> TextData:
    """Yelp Review Full: 650,000 train / 50,000 test, 1 to 5 stars (labels 0..4)."""
    return _load_zhang(
        root, split, folders=("yelp_review_full_csv",), title="Yelp Review Full",
        archive="yelp_review_full_csv.tar.gz", classes=YELP_REVIEW_FULL_CLASSES, num_text_fields=1,
        clean=unescape_zhang_text,
    )  # fmt: skip
