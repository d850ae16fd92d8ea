"""Your own data: csv:, jsonl:, imagefolder: and hf: loaders, their splits, labels and refusals."""

import gzip
import json
import os
import re

import numpy as np
import pytest
import torch

from asap.data import (
    DATA_SOURCES,
    DataFileError,
    DataNotFoundError,
    DataOptions,
    ImageClassificationDataset,
    ImageData,
    SubwordTokenizer,
    TextClassificationDataset,
    TextData,
    channel_mean_std,
    collate_text,
    dataset_info,
    load_dataset,
    parse_dataset_spec,
    register_dataset,
)
from asap.errors import AsapError, ConfigError

Image = pytest.importorskip("PIL.Image", reason="Pillow (a matplotlib dependency) reads the image folders")


def write(path, text, *, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode(encoding) if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def refused(error, path, line, what):
    """The error names ``path:line`` and says ``what``."""
    message = str(error.value)
    assert f"{path}:{line}:" in message, message
    assert re.search(what, message), message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------- CSV

REVIEWS = (
    "text,label,split\n"
    "a fine film,pos,train\n"
    "dull,neg,train\n"
    '"long, with a comma\nand a line break",pos,Train\n'
    "so-so,meh,test\n"
    "great,pos, test \n"
    "\n"
    "bad,neg,validation\n"
)


def test_csv_single_file_splits_and_sorted_string_classes(tmp_path):
    path = write(tmp_path / "reviews.csv", REVIEWS)
    train = load_dataset(f"csv:{path}", split="train")
    test = load_dataset(f"csv:{path}", split="test")
    valid = load_dataset(f"csv:{path}", split="validation")
    # "meh" occurs in test only, yet train and test share one class list.
    assert train.classes == test.classes == valid.classes == ("meh", "neg", "pos")
    assert train.texts == ["a fine film", "dull", "long, with a comma\nand a line break"]
    assert train.labels.tolist() == [2, 1, 2]
    assert test.texts == ["so-so", "great"] and test.labels.tolist() == [0, 2]
    assert valid.texts == ["bad"] and valid.labels.tolist() == [1]
    assert isinstance(train, TextData) and train.labels.dtype == torch.int64


def test_csv_integer_labels_sort_numerically_and_merge_by_value(tmp_path):
    rows = ["text,label,split", "a,10,train", "b,2,train", "c,1,train", "d,01,test", "e,-3,test"]
    path = write(tmp_path / "numbers.csv", "\n".join(rows) + "\n")
    train = load_dataset(f"csv:{path}", split="train")
    test = load_dataset(f"csv:{path}", split="test")
    assert train.classes == ("-3", "1", "2", "10")
    assert train.labels.tolist() == [3, 2, 1]
    assert test.labels.tolist() == [1, 0]  # "01" is class "1"


def test_csv_options_bom_crlf_and_gzip(tmp_path):
    text = "\ufeffreview ,sentiment,fold\r\nnice,1,train\r\nugly,0,train\r\nok,1,test\r\n"
    path = write(tmp_path / "data.csv.gz", text)
    options = DataOptions(text_column="review", label_column="sentiment", split_column="fold")
    train = load_dataset(f"csv:{path}", split="train", options=options)
    assert train.texts == ["nice", "ugly"] and train.classes == ("0", "1") and train.labels.tolist() == [1, 0]


def test_csv_folder_of_split_files(tmp_path):
    write(tmp_path / "d" / "train.csv", "text,label\nx,b\ny,a\n")
    write(tmp_path / "d" / "test.csv.gz", "text,label,split\nz,c,whatever\n")  # a split column there is ignored
    train = load_dataset(f"csv:{tmp_path / 'd'}", split="train")
    test = load_dataset(f"csv:{tmp_path / 'd'}", split="test")
    assert train.classes == test.classes == ("a", "b", "c")
    assert train.labels.tolist() == [1, 0] and test.texts == ["z"] and test.labels.tolist() == [2]
    with pytest.raises(DataNotFoundError, match="no 'validation' split.*train, test"):
        load_dataset(f"csv:{tmp_path / 'd'}", split="validation")
    write(tmp_path / "d" / "train.csv.gz", "text,label\nq,a\n")
    with pytest.raises(DataFileError, match="both train.csv and train.csv.gz"):
        load_dataset(f"csv:{tmp_path / 'd'}", split="train")


def test_csv_folder_without_train_file(tmp_path):
    write(tmp_path / "d" / "test.csv", "text,label\nz,c\n")
    with pytest.raises(DataNotFoundError, match="no train.csv or train.csv.gz"):
        load_dataset(f"csv:{tmp_path / 'd'}", split="test")


@pytest.mark.parametrize(
    ("content", "line", "what"),
    [
        ("review,label,split\nx,a,train\n", 1, "no text column 'text' in the header \\(columns: review, label, split"),
        ("text,label\nx,a\n", 1, "no split column 'split'.*test_fraction"),
        ("text,label,split\nx,a,train\ny, ,train\n", 3, "empty label"),
        ("text,label,split\nx,a,train\n\ny,b\n", 4, "expected 3 fields like the header, got 2"),
        ("text,label,split\nx,a,train\ny,b,holdout\n", 3, "unknown split 'holdout'; expected one of train, valid"),
        ('text,label,split\nx,a,train\n"y\nz,b,train\nq,"r"s,test\n', 3, "malformed CSV"),
        ("text,label,text\nx,a,b\n", 1, "text column 'text' appears 2 times"),
    ],
)
def test_csv_bad_rows_name_file_and_line(tmp_path, content, line, what):
    path = write(tmp_path / "bad.csv", content)
    with pytest.raises(DataFileError) as error:
        load_dataset(f"csv:{path}", split="train")
    refused(error, path, line, what)
    assert isinstance(error.value, (AsapError, ValueError))


def test_csv_bad_utf8_names_its_exact_line(tmp_path):
    good = "text,label,split\n" + "".join(f"row {i} \u00e9,a,train\n" for i in range(2000))  # past any read buffer
    path = write(tmp_path / "latin1.csv", good.encode() + b"caf\xe9,a,train\n")
    with pytest.raises(DataFileError) as error:
        load_dataset(f"csv:{path}", split="train")
    refused(error, path, 2002, "not valid UTF-8")


def test_csv_test_fraction_cuts_a_stratified_deterministic_split(tmp_path):
    rows = [f"doc {i},{'ab'[i % 2]}" for i in range(20)]
    path = write(tmp_path / "plain.csv", "text,label\n" + "\n".join(rows) + "\n")
    options = DataOptions(test_fraction=0.3, split_seed=3)
    train = load_dataset(f"csv:{path}", split="train", options=options)
    test = load_dataset(f"csv:{path}", split="test", options=options)
    assert len(train) == 14 and len(test) == 6 and test.labels.tolist().count(0) == 3
    assert sorted(train.texts + test.texts) == sorted(f"doc {i}" for i in range(20))
    assert load_dataset(f"csv:{path}", split="test", options=options).texts == test.texts
    assert load_dataset(f"csv:{path}", split="test", options=DataOptions(test_fraction=0.3)).texts != test.texts
    with pytest.raises(DataNotFoundError, match="no validation split"):
        load_dataset(f"csv:{path}", split="validation", options=options)
    with_split = write(tmp_path / "split.csv", REVIEWS)
    with pytest.raises(DataFileError, match="has a split column 'split'; test_fraction is only for files without one"):
        load_dataset(f"csv:{with_split}", split="train", options=options)


def test_csv_missing_path_and_empty_split(tmp_path):
    with pytest.raises(DataNotFoundError, match="no such file or folder"):
        load_dataset(f"csv:{tmp_path / 'nope.csv'}", split="train")
    path = write(tmp_path / "only_train.csv", "text,label,split\nx,a,train\n")
    with pytest.raises(DataNotFoundError, match="no 'test' split \\(splits found: train\\)"):
        load_dataset(f"csv:{path}", split="test")
    with pytest.raises(DataFileError, match="empty file"):
        load_dataset(f"csv:{write(tmp_path / 'empty.csv', '')}", split="train")


# ---------------------------------------------------------------------------------------------- JSONL


def jsonl(*items):
    return "".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items)


def test_jsonl_single_file_and_folder(tmp_path):
    path = write(tmp_path / "d.jsonl", jsonl(
        {"text": "x\u2028y", "label": 1, "split": "train"},
        "",
        {"text": "z", "label": "1", "split": "test"},
        {"text": "w", "label": 0, "split": "train", "extra": [1, 2]},
    ))  # fmt: skip
    train = load_dataset(f"jsonl:{path}", split="train")
    assert train.texts == ["x\u2028y", "w"] and train.classes == ("0", "1") and train.labels.tolist() == [1, 0]
    assert load_dataset(f"jsonl:{path}", split="test").labels.tolist() == [1]
    write(tmp_path / "f" / "train.jsonl.gz", jsonl({"body": "a", "y": "cat"}))
    write(tmp_path / "f" / "test.jsonl", jsonl({"body": "b", "y": "dog"}))
    options = DataOptions(text_column="body", label_column="y")
    test = load_dataset(f"jsonl:{tmp_path / 'f'}", split="test", options=options)
    assert test.texts == ["b"] and test.classes == ("cat", "dog") and test.labels.tolist() == [1]


@pytest.mark.parametrize(
    ("bad", "what"),
    [
        ('{"text": "y", "label": "a", "split": "train"', "bad JSON"),
        ('["y", "a", "train"]', "expected a JSON object, got list"),
        ({"text": "y", "split": "train"}, "missing key 'label' \\(keys: text, split\\)"),
        ({"text": "y", "label": "a"}, "missing key 'split'.*test_fraction"),
        ({"text": 3, "label": "a", "split": "train"}, "'text' must be a string, got int"),
        ({"text": "y", "label": 1.5, "split": "train"}, "'label' must be a string or an integer, got 1.5"),
        ({"text": "y", "label": True, "split": "train"}, "'label' must be a string or an integer, got true"),
        ({"text": "y", "label": "", "split": "train"}, "empty label"),
        ({"text": "y", "label": "a", "split": "dev"}, "unknown split 'dev'"),
    ],
)
def test_jsonl_bad_lines_name_file_and_line(tmp_path, bad, what):
    path = write(tmp_path / "bad.jsonl", jsonl({"text": "x", "label": "a", "split": "train"}, "  ", bad))
    with pytest.raises(DataFileError) as error:
        load_dataset(f"jsonl:{path}", split="train")
    refused(error, path, 3, what)


# ---------------------------------------------------------------------------------------------- registry


def test_dataset_info_and_spec_parsing(tmp_path):
    spec = parse_dataset_spec("csv:~/reviews.csv")
    assert spec.scheme == "csv" and spec.path == spec.path.expanduser() and str(spec).startswith("csv:/")
    assert parse_dataset_spec("csv:rel.csv").absolute().path.is_absolute()
    assert dataset_info("csv:x.csv").kind == "text" and dataset_info("jsonl:x").kind == "text"
    assert dataset_info("imagefolder:x").kind == "image"
    assert dataset_info("hf:x").kind == "text"
    assert dataset_info("hf:x", options=DataOptions(image_column="img")).kind == "image"
    assert dataset_info("csv:x.csv").num_classes is None and dataset_info("digits").num_classes == 10
    for bad in ("mnist", "tsv:x.tsv"):
        with pytest.raises(ConfigError, match="imdb.*csv:PATH|not SCHEME:PATH"):
            dataset_info(bad)
    with pytest.raises(ConfigError, match="empty path"):
        dataset_info("csv:")


def test_options_a_source_does_not_read_are_refused():
    with pytest.raises(ConfigError, match="data set 'digits' takes no data options \\(got text_column\\)"):
        load_dataset("digits", split="train", options=DataOptions(text_column="body"))
    with pytest.raises(ConfigError, match="csv:PATH does not read the data option\\(s\\) image_size"):
        dataset_info("csv:x.csv", options=DataOptions(image_size=32))
    with pytest.raises(ConfigError, match="imagefolder:PATH does not read the data option\\(s\\) label_column"):
        dataset_info("imagefolder:x", options=DataOptions(label_column="y"))
    with pytest.raises(ConfigError, match="two roles"):
        DataOptions(text_column="x", label_column="x")
    for bad in (dict(test_fraction=1.0), dict(image_mode="CMYK"), dict(image_size=0), dict(text_column=" ")):
        with pytest.raises(ConfigError):
            DataOptions(**bad)


def test_options_round_trip_through_a_dict():
    options = DataOptions(text_column="body", test_fraction=0.1, image_size=16)
    assert DataOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options
    assert options.changed() == ("text_column", "test_fraction", "image_size")
    with pytest.raises(ConfigError, match="unknown data option\\(s\\) colour"):
        DataOptions.from_dict({"colour": "red"})


def test_register_dataset_adds_a_scheme(tmp_path, monkeypatch):
    monkeypatch.setattr("asap.data.registry.DATA_SOURCES", dict(DATA_SOURCES))

    def lines(path, *, split, options):
        texts = path.read_text().split()
        return TextData(texts, torch.zeros(len(texts), dtype=torch.int64), ("only",))

    register_dataset("words", lines, kind="text", description="one word a text")
    path = write(tmp_path / "w.txt", "a b c d")
    data = load_dataset(f"words:{path}", split="test", limit=2)
    assert data.texts == ["a", "b"]
    with pytest.raises(ConfigError, match="already registered"):
        register_dataset("csv", lines, kind="text")
    with pytest.raises(ConfigError, match="already registered"):
        register_dataset("imdb", lines, kind="text")
    register_dataset("wrong", lines, kind="image")
    with pytest.raises(TypeError, match="returned TextData, not ImageData"):
        load_dataset(f"wrong:{path}", split="train")
    with pytest.raises(ConfigError, match="does not read"):
        load_dataset(f"words:{path}", split="train", options=DataOptions(text_column="t"))


def test_loaded_text_feeds_the_tokenizer_and_dataset(tmp_path):
    rows = "".join(f"{'good film' if i % 2 else 'bad plot'} {i},{('neg', 'pos')[i % 2]},train\n" for i in range(40))
    path = write(tmp_path / "r.csv", "text,label,split\n" + rows)
    train = load_dataset(f"csv:{path}", split="train", limit=10)
    assert len(train) == 10 and train.labels.tolist().count(1) == 5
    tokenizer = SubwordTokenizer.train(train.texts, vocab_size=60)
    batch = collate_text([TextClassificationDataset(train, tokenizer, 8)[i] for i in range(4)])
    assert batch["labels"].tolist() == train.labels[:4].tolist()


# ---------------------------------------------------------------------------------------------- image folders


def png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)
    return array


def grey(value, side=4):
    return np.full((side, side), value, dtype=np.uint8) + np.arange(side, dtype=np.uint8)


def test_imagefolder_split_layout_grey(tmp_path):
    png(tmp_path / "train" / "dog" / "b.png", grey(20))
    png(tmp_path / "train" / "dog" / "a.png", grey(10))
    png(tmp_path / "train" / "cat" / "x.png", grey(30))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image, ignored")
    png(tmp_path / "test" / "emu" / "e.png", grey(40))
    train = load_dataset(f"imagefolder:{tmp_path}", split="train")
    assert isinstance(train, ImageData) and train.images.dtype == torch.uint8
    assert train.images.shape == (3, 1, 4, 4) and train.classes == ("cat", "dog", "emu")
    assert train.labels.tolist() == [0, 1, 1]
    assert torch.equal(train.images[1, 0], torch.from_numpy(grey(10)))  # files in name order
    test = load_dataset(f"imagefolder:{tmp_path}", split="test")
    assert test.labels.tolist() == [2] and test.classes == train.classes
    mean, std = channel_mean_std(train)
    item, label = ImageClassificationDataset(train, mean=mean, std=std)[0]
    assert item.shape == (1, 4, 4) and int(label) == 0


def test_imagefolder_auto_mode_is_rgb_for_every_split_if_one_image_is_colour(tmp_path):
    png(tmp_path / "train" / "a" / "0.png", grey(50))
    colour = np.zeros((4, 4, 3), dtype=np.uint8)
    colour[..., 0] = 200
    png(tmp_path / "test" / "a" / "0.png", colour)
    train = load_dataset(f"imagefolder:{tmp_path}", split="train")
    assert train.images.shape == (1, 3, 4, 4)
    assert torch.equal(train.images[0, 0], train.images[0, 2])  # grey in RGB: equal channels
    test = load_dataset(f"imagefolder:{tmp_path}", split="test")
    assert test.images[0, :, 0, 0].tolist() == [200, 0, 0]
    forced = load_dataset(f"imagefolder:{tmp_path}", split="test", options=DataOptions(image_mode="L"))
    assert forced.images.shape == (1, 1, 4, 4)


def test_imagefolder_single_level_is_split_stratified(tmp_path):
    for c in ("a", "b"):
        for i in range(5):
            png(tmp_path / c / f"{i}.png", grey(10 * i + (c == "b")))
    train = load_dataset(f"imagefolder:{tmp_path}", split="train")
    test = load_dataset(f"imagefolder:{tmp_path}", split="test")
    assert len(train) == 8 and test.labels.tolist() == [0, 1]  # 20 % of each class
    seen = {bytes(x.numpy()) for x in torch.cat([train.images, test.images])}
    assert len(seen) == 10
    half = load_dataset(f"imagefolder:{tmp_path}", split="test", options=DataOptions(test_fraction=0.4))
    assert len(half) == 4
    with pytest.raises(DataNotFoundError, match="no 'validation' split"):
        load_dataset(f"imagefolder:{tmp_path}", split="validation")


def test_imagefolder_sizes_must_match_unless_resized(tmp_path):
    png(tmp_path / "train" / "a" / "0.png", grey(1, side=4))
    odd = tmp_path / "test" / "a" / "0.png"
    png(odd, np.zeros((6, 5), dtype=np.uint8))
    with pytest.raises(DataFileError, match=f"{re.escape(str(odd))}: image is 5x6 .* is 4x4; .*image_size"):
        load_dataset(f"imagefolder:{tmp_path}", split="train")  # the test split is checked too
    resized = load_dataset(f"imagefolder:{tmp_path}", split="test", options=DataOptions(image_size=8))
    assert resized.images.shape == (1, 1, 8, 8)


def test_imagefolder_bad_files_are_named(tmp_path):
    png(tmp_path / "a" / "0.png", grey(1))
    broken = tmp_path / "a" / "1.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataFileError, match=f"{re.escape(str(broken))}: not a readable image"):
        load_dataset(f"imagefolder:{tmp_path}", split="train")
    broken.unlink()
    (tmp_path / "b").mkdir()
    with pytest.raises(DataFileError, match="class folder holds no images"):
        load_dataset(f"imagefolder:{tmp_path}", split="train")
    (tmp_path / "b").rmdir()
    deep = tmp_path / "a" / "2.png"
    Image.fromarray(np.zeros((4, 4), dtype=np.uint16) + 1000).save(deep)
    with pytest.raises(DataFileError, match=f"{re.escape(str(deep))}: 16-bit"):
        load_dataset(f"imagefolder:{tmp_path}", split="train")
    with pytest.raises(DataNotFoundError, match="no such folder"):
        load_dataset(f"imagefolder:{tmp_path / 'none'}", split="train")


# ---------------------------------------------------------------------------------------------- Hugging Face


@pytest.fixture
def hf(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="hf: data sets need the `datasets` package (the hf extra)")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return datasets


def test_hf_saved_dataset_dict_with_class_labels(tmp_path, hf):
    features = hf.Features({"text": hf.Value("string"), "label": hf.ClassLabel(names=["neg", "pos"])})
    saved = hf.DatasetDict(
        train=hf.Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, 1]}, features=features),
        test=hf.Dataset.from_dict({"text": ["d"], "label": [0]}, features=features),
        unsupervised=hf.Dataset.from_dict({"text": ["e"], "label": [0]}, features=features),
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    before = {name: os.environ.get(name) for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    train = load_dataset(f"hf:{tmp_path / 'saved'}", split="train")
    assert {name: os.environ.get(name) for name in before} == before  # offline only during the call
    assert train.texts == ["a", "b", "c"] and train.labels.tolist() == [1, 0, 1] and train.classes == ("neg", "pos")
    with pytest.raises(DataNotFoundError, match="no 'validation' split \\(splits found: train, test\\)"):
        load_dataset(f"hf:{tmp_path / 'saved'}", split="validation")
    with pytest.raises(DataFileError, match="no text column 'body' \\(columns: text, label\\)"):
        load_dataset(f"hf:{tmp_path / 'saved'}", split="train", options=DataOptions(text_column="body"))


def test_hf_parquet_and_csv_folders(tmp_path, hf):
    hf.Dataset.from_dict({"t": ["x", "y"], "y": ["b", "a"]}).to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    hf.Dataset.from_dict({"t": ["z"], "y": ["c"]}).to_parquet(str(tmp_path / "pq" / "test" / "part.parquet"))
    options = DataOptions(text_column="t", label_column="y")
    test = load_dataset(f"hf:{tmp_path / 'pq'}", split="test", options=options)
    assert test.texts == ["z"] and test.classes == ("a", "b", "c") and test.labels.tolist() == [2]
    write(tmp_path / "csvs" / "all.csv", "text,label,split\nx,3,train\ny,1,test\nz,2,train\n")
    train = load_dataset(f"hf:{tmp_path / 'csvs'}", split="train")
    assert train.texts == ["x", "z"] and train.classes == ("1", "2", "3") and train.labels.tolist() == [2, 1]
    write(tmp_path / "bad" / "train.csv", "text,label\nx,a\ny,\n")
    with pytest.raises(DataFileError, match="\\(train split\\) row 1: label must be a string or an integer, got None"):
        load_dataset(f"hf:{tmp_path / 'bad'}", split="train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="no .parquet/.csv/.csv.gz files"):
        load_dataset(f"hf:{tmp_path / 'empty'}", split="train")


def test_hf_image_column(tmp_path, hf):
    images = [Image.fromarray(grey(v)) for v in (5, 6, 7)]
    features = hf.Features({"img": hf.Image(), "label": hf.Value("int64"), "split": hf.Value("string")})
    columns = {"img": images, "label": [2, 7, 2], "split": ["train", "test", "train"]}
    data = hf.Dataset.from_dict(columns, features=features)
    data.save_to_disk(str(tmp_path / "imgs"))
    with pytest.raises(DataFileError, match="set image_column \\(e.g. 'img'\\)"):
        load_dataset(f"hf:{tmp_path / 'imgs'}", split="train")
    options = DataOptions(image_column="img")
    train = load_dataset(f"hf:{tmp_path / 'imgs'}", split="train", options=options)
    assert isinstance(train, ImageData) and train.images.shape == (2, 1, 4, 4) and train.classes == ("2", "7")
    assert torch.equal(train.images[1, 0], torch.from_numpy(grey(7))) and train.labels.tolist() == [0, 0]
    pixels = [grey(1).tolist(), (grey(2).astype(int) + 300).tolist()]
    arrays = hf.Dataset.from_dict({"pixels": pixels, "label": [0, 1], "split": ["train"] * 2})
    arrays.save_to_disk(str(tmp_path / "arrays"))
    with pytest.raises(DataFileError, match="row 1: pixel values must lie in 0..255"):
        load_dataset(f"hf:{tmp_path / 'arrays'}", split="train", options=DataOptions(image_column="pixels"))
