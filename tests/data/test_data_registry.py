import csv
import io

import pytest
import torch

from asap.data import DATASETS, DEFAULT_DATA_ENV, ImageData, TextData, load_dataset


def _imdb_sorted_by_class(path, per_class):
    """An IMDb CSV like the shared copy: every negative first, then every positive."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows([(f"negative review {i}", 0) for i in range(per_class)])
    writer.writerows([(f"positive review {i}", 1) for i in range(per_class)])
    path.parent.mkdir(parents=True)
    path.write_text(buffer.getvalue())


def test_registry_lists_the_seven_data_sets():
    assert set(DATASETS) == {"imdb", "ag_news", "dbpedia14", "yelp_review_full", "cifar100", "fashion_mnist", "digits"}
    for name, info in DATASETS.items():
        assert info.name == name and info.kind in ("text", "image") and info.splits == ("train", "test")
        assert info.needs_data_dir == (name != "digits")


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        load_dataset("mnist", split="train")
    assert all(name in str(info.value) for name in DATASETS)


def test_unknown_split_lists_valid_ones():
    with pytest.raises(ValueError, match="no split 'validation'.*train, test"):
        load_dataset("digits", split="validation")


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_bad_limit(limit):
    with pytest.raises(ValueError, match="limit"):
        load_dataset("digits", split="train", limit=limit)


def test_missing_data_dir_for_a_file_data_set(monkeypatch):
    monkeypatch.delenv(DEFAULT_DATA_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=DEFAULT_DATA_ENV):
        load_dataset("imdb", split="train")


def test_environment_variable_is_read(tmp_path, monkeypatch):
    _imdb_sorted_by_class(tmp_path / "imdb" / "test.csv", 3)
    monkeypatch.setenv(DEFAULT_DATA_ENV, str(tmp_path))
    assert len(load_dataset("imdb", split="test")) == 6


def test_limit_is_stratified_first_of_each_class(tmp_path):
    _imdb_sorted_by_class(tmp_path / "imdb" / "train.csv", 10)
    data = load_dataset("imdb", split="train", data_dir=tmp_path, limit=5)
    assert isinstance(data, TextData)
    assert data.texts == [f"negative review {i}" for i in range(3)] + [f"positive review {i}" for i in range(2)]
    assert data.labels.tolist() == [0, 0, 0, 1, 1]
    full = load_dataset("imdb", split="train", data_dir=tmp_path, limit=1000)
    assert len(full) == 20


def test_kind_and_num_classes_match_the_data():
    full = load_dataset("digits", split="train")
    data = load_dataset("digits", split="train", limit=50)
    assert isinstance(data, ImageData) and len(data) == 50
    assert len(data.classes) == DATASETS["digits"].num_classes
    share = torch.bincount(full.labels, minlength=10).double() * 50 / len(full)
    assert (torch.bincount(data.labels, minlength=10) - share).abs().max() < 1
