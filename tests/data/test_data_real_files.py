"""The real shared data files (skipped where absent): row counts and class balance from SOURCES.md."""

import os
import pathlib

import pytest
import torch

from asap.data import DEFAULT_DATA_ENV, load_dataset


def _data_root() -> pathlib.Path:
    env = os.environ.get(DEFAULT_DATA_ENV)
    if env:
        return pathlib.Path(env)
    return pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _require(relative: str) -> pathlib.Path:
    root = _data_root()
    if not (root / relative).exists():
        pytest.skip(f"{root / relative} is absent")
    return root


@pytest.fixture(scope="module")
def imdb():
    root = _require("imdb")
    return {split: load_dataset("imdb", split=split, data_dir=root) for split in ("train", "test")}


@pytest.mark.parametrize("split", ["train", "test"])
def test_imdb_counts(imdb, split):
    data = imdb[split]
    assert len(data) == 25_000
    assert torch.bincount(data.labels).tolist() == [12_500, 12_500]
    assert not any("<br" in text for text in data.texts)


def test_imdb_spot_checks(imdb):
    # From SOURCES.md: rows are neg ids 0..12499 then pos ids 0..12499.
    assert imdb["train"].texts[12_500].startswith("Bromwell High is a cartoon comedy.")
    assert imdb["test"].texts[0].startswith("Once again Mr. Costner has dragged out a movie")
    assert imdb["test"].texts[12_500].startswith("I went and saw this movie last night")


def test_imdb_limit_is_balanced(imdb):
    small = load_dataset("imdb", split="train", data_dir=_data_root(), limit=100)
    assert torch.bincount(small.labels).tolist() == [50, 50]
    assert small.texts[:50] == imdb["train"].texts[:50]


def test_ag_news_test_split():
    root = _require("ag_news/test.csv.gz")
    data = load_dataset("ag_news", split="test", data_dir=root)
    assert len(data) == 7_600
    assert torch.bincount(data.labels).tolist() == [1_900] * 4
    assert data.classes == ("World", "Sports", "Business", "Sci/Tech")
    assert data.texts[0].startswith("Fears for T N pension after talks. ")
    assert not any("\\" in text or "#39;" in text for text in data.texts)


def test_ag_news_train_split_is_absent_with_a_clear_message():
    root = _require("ag_news/test.csv.gz")
    if (root / "ag_news" / "train.csv.gz").exists() or (root / "ag_news" / "train.csv").exists():
        pytest.skip("this copy has the AG News training split")
    with pytest.raises(FileNotFoundError, match=r"(?s)AG News split 'train' not found.*train\.csv"):
        load_dataset("ag_news", split="train", data_dir=root)


@pytest.mark.parametrize("split, size", [("train", 60_000), ("test", 10_000)])
def test_fashion_mnist(split, size):
    root = _require("fashion_mnist")
    data = load_dataset("fashion_mnist", split=split, data_dir=root)
    assert data.images.shape == (size, 1, 28, 28) and data.images.dtype == torch.uint8
    assert torch.bincount(data.labels).tolist() == [size // 10] * 10
