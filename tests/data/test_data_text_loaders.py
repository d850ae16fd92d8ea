"""Text loaders on tiny files written in the official formats."""

import csv
import gzip
import io

import pytest
import torch

from asap.data import clean_ag_news_text, clean_imdb_text, load_dataset, unescape_zhang_text


def _write(path, text, *, compress=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def _imdb_csv(rows):
    """The shared IMDb copy's format, written by an independent CSV writer."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    return buffer.getvalue()


def _zhang_line(*fields):
    """One row as in the Zhang et al. files: every field quoted, quotes doubled."""
    return ",".join('"' + str(field).replace('"', '""') + '"' for field in fields) + "\n"


# ------------------------------------------------------------------------------------------------
# IMDb
# ------------------------------------------------------------------------------------------------

IMDB_ROWS = [
    ("Awful.<br /><br />Truly awful, with \"quotes\", commas", 0),
    ("Dull\nacross two lines", 0),
    ("Great film.<BR>Loved it", 1),
]


@pytest.mark.parametrize("name, compress", [("train.csv.gz", True), ("train.csv", False)])
def test_imdb_csv(tmp_path, name, compress):
    _write(tmp_path / "imdb" / name, _imdb_csv(IMDB_ROWS), compress=compress)
    data = load_dataset("imdb", split="train", data_dir=tmp_path)
    assert data.classes == ("neg", "pos")
    assert data.labels.tolist() == [0, 0, 1]
    assert data.texts == [clean_imdb_text(text) for text, _ in IMDB_ROWS]
    assert data.texts[0] == 'Awful.  Truly awful, with "quotes", commas'
    assert data.texts[1] == "Dull\nacross two lines"


def test_clean_imdb_text_only_touches_line_breaks():
    assert clean_imdb_text("a<br />b<br/>c<br>d <b>bold</b>") == "a b c d <b>bold</b>"


def test_imdb_bad_header(tmp_path):
    _write(tmp_path / "imdb" / "test.csv", "review,sentiment\nx,1\n")
    with pytest.raises(ValueError, match=r"test\.csv:1: expected the header"):
        load_dataset("imdb", split="test", data_dir=tmp_path)


def test_imdb_bad_label_names_line(tmp_path):
    # Header on line 1, the two-line field on lines 2-3, "ok" on 4: the bad row starts on line 5.
    _write(tmp_path / "imdb" / "test.csv", _imdb_csv([("one\ntwo", 0), ("ok", 1), ("bad", 2)]))
    with pytest.raises(ValueError, match=r"test\.csv:5: class index must be an integer in 0\.\.1, got '2'"):
        load_dataset("imdb", split="test", data_dir=tmp_path)


def test_imdb_wrong_field_count(tmp_path):
    _write(tmp_path / "imdb" / "test.csv", "text,label\n\"a\",0\n\"b\",1,extra\n")
    with pytest.raises(ValueError, match=r"test\.csv:3: expected 2 fields"):
        load_dataset("imdb", split="test", data_dir=tmp_path)


def test_imdb_empty_file_is_an_error(tmp_path):
    _write(tmp_path / "imdb" / "test.csv", "text,label\n")
    with pytest.raises(ValueError, match="no examples"):
        load_dataset("imdb", split="test", data_dir=tmp_path)


def test_imdb_truncated_gzip(tmp_path):
    raw = gzip.compress(_imdb_csv(IMDB_ROWS * 50).encode())
    (tmp_path / "imdb").mkdir()
    (tmp_path / "imdb" / "train.csv.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"train\.csv\.gz: truncated or corrupt gzip"):
        load_dataset("imdb", split="train", data_dir=tmp_path)


def test_imdb_unterminated_quote(tmp_path):
    _write(tmp_path / "imdb" / "test.csv", 'text,label\n"fine",1\n"never closed,0\n')
    with pytest.raises(ValueError, match=r"test\.csv:3: malformed CSV"):
        load_dataset("imdb", split="test", data_dir=tmp_path)


def test_imdb_original_folder_layout(tmp_path):
    split = tmp_path / "aclImdb" / "train"
    # Numeric, not lexicographic, order of ids: 2 before 10.
    _write(split / "neg" / "10_1.txt", "neg ten")
    _write(split / "neg" / "2_3.txt", "neg two<br />end")
    _write(split / "pos" / "0_9.txt", "pos zero")
    data = load_dataset("imdb", split="train", data_dir=tmp_path)
    assert data.texts == ["neg two end", "neg ten", "pos zero"]
    assert data.labels.tolist() == [0, 0, 1]


def test_imdb_folder_layout_bad_file_name(tmp_path):
    split = tmp_path / "aclImdb" / "test"
    _write(split / "neg" / "review.txt", "x")
    _write(split / "pos" / "0_9.txt", "y")
    with pytest.raises(ValueError, match=r"review\.txt: IMDb review files must be named"):
        load_dataset("imdb", split="test", data_dir=tmp_path)


def test_imdb_missing_names_the_official_files(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("imdb", split="test", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "imdb" / "test.csv.gz") in message and "aclImdb" in message


# ------------------------------------------------------------------------------------------------
# Zhang et al. CSV: AG News, DBpedia-14, Yelp Review Full
# ------------------------------------------------------------------------------------------------

AG_ROWS = [
    (3, "Fears for T N pension after talks", "Unions say they are 'disappointed'."),
    (4, 'A "quoted" title (AP)', "A second\\team paid \\$10 million; it #39;s \\\\done."),
    (1, "World", "Line one\\Line two &lt;TXN.N&gt; and  quot;hi quot;"),
]


@pytest.mark.parametrize("folder", ["ag_news", "ag_news_csv"])
@pytest.mark.parametrize("compress", [True, False])
def test_ag_news(tmp_path, folder, compress):
    name = "test.csv.gz" if compress else "test.csv"
    _write(tmp_path / folder / name, "".join(_zhang_line(*row) for row in AG_ROWS), compress=compress)
    data = load_dataset("ag_news", split="test", data_dir=tmp_path)
    assert data.classes == ("World", "Sports", "Business", "Sci/Tech")
    assert data.labels.tolist() == [2, 3, 0]
    assert data.texts == [
        "Fears for T N pension after talks. Unions say they are 'disappointed'.",
        'A "quoted" title (AP). A second team paid $10 million; it\'s  done.',
        'World. Line one Line two <TXN.N> and "hi"',
    ]


def test_ag_news_classes_file_is_used(tmp_path):
    _write(tmp_path / "ag_news" / "test.csv", _zhang_line(2, "t", "d"))
    _write(tmp_path / "ag_news" / "classes.txt", "W\nS\nB\nT\n")
    data = load_dataset("ag_news", split="test", data_dir=tmp_path)
    assert data.classes == ("W", "S", "B", "T") and data.labels.tolist() == [1]


def test_ag_news_classes_file_wrong_count(tmp_path):
    _write(tmp_path / "ag_news" / "test.csv", _zhang_line(2, "t", "d"))
    _write(tmp_path / "ag_news" / "classes.txt", "W\nS\nB\n")
    with pytest.raises(ValueError, match=r"classes\.txt: expected 4 class names, found 3"):
        load_dataset("ag_news", split="test", data_dir=tmp_path)


def test_ag_news_missing_train_split(tmp_path):
    _write(tmp_path / "ag_news" / "test.csv", _zhang_line(2, "t", "d"))
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("ag_news", split="train", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "ag_news" / "train.csv.gz") in message and "ag_news_csv.tgz" in message


@pytest.mark.parametrize("label", ["0", "5", "x", ""])
def test_ag_news_bad_class_index(tmp_path, label):
    _write(tmp_path / "ag_news" / "test.csv", _zhang_line(1, "a", "b") + _zhang_line(label, "c", "d"))
    with pytest.raises(ValueError, match=r"test\.csv:2: class index must be an integer in 1\.\.4"):
        load_dataset("ag_news", split="test", data_dir=tmp_path)


def test_ag_news_missing_field(tmp_path):
    _write(tmp_path / "ag_news" / "test.csv", _zhang_line(1, "a", "b") + _zhang_line(1, "b") + _zhang_line(1, "c", "d"))
    with pytest.raises(ValueError, match=r"test\.csv:2: expected 3 fields"):
        load_dataset("ag_news", split="test", data_dir=tmp_path)


def test_clean_ag_news_text_rules():
    assert clean_ag_news_text("over \\$1 billion") == "over $1 billion"
    assert clean_ag_news_text("social\\network") == "social network"
    assert clean_ag_news_text("the  #36;10 bill, it #39;s") == "the $10 bill, it's"
    assert clean_ag_news_text("three times; AT&amp;T") == "three times; AT&T"  # " times;" is not an entity


def test_dbpedia14_default_classes_and_joined_title(tmp_path):
    rows = [
        (1, "E. D. Abbott Ltd", " Abbott of Farnham was a coachbuilder."),
        (14, "Some Book", "A novel.\\nIn two parts."),
    ]
    _write(tmp_path / "dbpedia_csv" / "train.csv", "".join(_zhang_line(*row) for row in rows))
    data = load_dataset("dbpedia14", split="train", data_dir=tmp_path)
    assert len(data.classes) == 14 and data.classes[0] == "Company" and data.classes[13] == "WrittenWork"
    assert data.labels.tolist() == [0, 13]
    assert data.texts == [
        "E. D. Abbott Ltd. Abbott of Farnham was a coachbuilder.",
        "Some Book. A novel.\nIn two parts.",
    ]


def test_dbpedia14_class_index_above_14(tmp_path):
    _write(tmp_path / "dbpedia_csv" / "test.csv.gz", _zhang_line(15, "t", "c"), compress=True)
    with pytest.raises(ValueError, match=r"test\.csv\.gz:1: class index must be an integer in 1\.\.14"):
        load_dataset("dbpedia14", split="test", data_dir=tmp_path)


def test_yelp_review_full(tmp_path):
    rows = [(5, 'Best "pizza".\\n\\nWould return.'), (1, "Cold food, rude staff.")]
    _write(tmp_path / "yelp_review_full_csv" / "test.csv", "".join(_zhang_line(*row) for row in rows))
    data = load_dataset("yelp_review_full", split="test", data_dir=tmp_path)
    assert data.labels.tolist() == [4, 0] and len(data.classes) == 5
    assert data.texts == ['Best "pizza".\n\nWould return.', "Cold food, rude staff."]


def test_yelp_extra_field_is_malformed(tmp_path):
    _write(tmp_path / "yelp_review_full_csv" / "train.csv", _zhang_line(3, "text", "extra"))
    with pytest.raises(ValueError, match=r"train\.csv:1: expected 2 fields"):
        load_dataset("yelp_review_full", split="train", data_dir=tmp_path)


def test_unescape_zhang_text_is_one_left_to_right_pass():
    assert unescape_zhang_text('a\\nb \\"q\\" c\\\\nd') == 'a\nb "q" c\\nd'


def test_labels_are_int64(tmp_path):
    _write(tmp_path / "imdb" / "test.csv", _imdb_csv(IMDB_ROWS))
    assert load_dataset("imdb", split="test", data_dir=tmp_path).labels.dtype == torch.int64


def test_imdb_csv_preferred_over_folder_layout(tmp_path):
    _write(tmp_path / "imdb" / "test.csv", _imdb_csv([("from the csv", 1)]))
    _write(tmp_path / "aclImdb" / "test" / "neg" / "0_1.txt", "from the folder")
    _write(tmp_path / "aclImdb" / "test" / "pos" / "0_9.txt", "from the folder")
    assert load_dataset("imdb", split="test", data_dir=tmp_path).texts == ["from the csv"]
