"""Your own data through the command line: ``asap train --dataset csv:|jsonl:|imagefolder:|hf:PATH``, then
``asap eval RUN`` and ``asap compile RUN`` reading the same data from what the run recorded.

Oracles: the accuracy ``asap train`` wrote for the test split (eval must find the same data and
encoding again, from another directory, without the options); the loaders' own file:line errors.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from asap.cli.main import main
from asap.train import load_split, read_run_config

TINY = ["--dim", "16", "--depth", "1", "--heads", "2", "--batch-size", "8", "--epochs", "1", "--vocab-size", "60",
        "--device", "cpu", "--no-progress"]  # fmt: skip
GOOD, BAD, OTHER = ["good", "fine", "great"], ["bad", "awful", "poor"], ["film", "plot", "actor", "scene"]


def reviews(n: int = 40, *, test_from: int = 32) -> list[dict]:
    """``n`` two-class reviews (integer stars 1 / 5), the last ``n - test_from`` in the test split."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        words = rng.sample(GOOD if positive else BAD, 2) + rng.sample(OTHER, 2)
        rows.append({"review": " ".join(words), "stars": 5 if positive else 1, "part": "test" if i >= test_from else "train"})
    return rows


def write_csv(path, rows, columns=("review", "stars", "part")):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]) + "\n")
    return path


def eval_accuracy(run, capsys) -> float:
    capsys.readouterr()
    assert main(["eval", str(run), "--device", "cpu", "--output", str(run.parent / f"{run.name}_again.json")]) == 0
    return json.loads(capsys.readouterr().out)["accuracy"]


def test_csv_run_records_absolute_data_and_options_and_eval_reads_them_back(tmp_path, monkeypatch, capsys):
    (tmp_path / "work").mkdir()
    write_csv(tmp_path / "work" / "data" / "reviews.csv", reviews())
    monkeypatch.chdir(tmp_path / "work")
    args = ["train", "--dataset", "csv:data/reviews.csv", "--text-column", "review", "--label-column", "stars",
            "--data-option", "split_column=part", "--method", "sinkhorn", "--n-iters", "3", *TINY, "--out", "run"]  # fmt: skip
    assert main(args) == 0
    run = tmp_path / "work" / "run"
    config = read_run_config(run)
    absolute = f"csv:{tmp_path / 'work' / 'data' / 'reviews.csv'}"
    assert config.train.dataset == config.data["dataset"] == absolute
    assert config.data["classes"] == ["1", "5"]  # integer labels, sorted numerically
    assert config.data["data_options"]["text_column"] == "review" and config.data["data_options"]["split_column"] == "part"
    assert "--text-column review" in (run / "command.txt").read_text()
    trained = json.loads((run / "eval_test.json").read_text())["accuracy"]
    monkeypatch.chdir(tmp_path)  # elsewhere, and without repeating a single data option
    assert eval_accuracy(tmp_path / "work" / "run", capsys) == pytest.approx(trained)
    out = tmp_path / "compiled"
    assert main(["compile", str(run), "--calibration", "16", "--batch-size", "8", "--slices", "4", "--no-eval",
                 "--quiet", "--out", str(out)]) == 0  # fmt: skip
    assert eval_accuracy(out, capsys) == pytest.approx(trained, abs=0.5)  # reads the data the run recorded


def test_jsonl_folder_of_split_files(tmp_path, capsys):
    rows = reviews()
    for split in ("train", "test"):
        lines = [json.dumps({"body": r["review"], "label": "pos" if r["stars"] == 5 else "neg"}) for r in rows if r["part"] == split]
        (tmp_path / "data" / f"{split}.jsonl").parent.mkdir(exist_ok=True)
        (tmp_path / "data" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    assert main(["train", "--dataset", f"jsonl:{tmp_path / 'data'}", "--text-column", "body", *TINY, "--out", str(run)]) == 0
    assert read_run_config(run).data["classes"] == ["neg", "pos"]
    assert eval_accuracy(run, capsys) == pytest.approx(json.loads((run / "eval_test.json").read_text())["accuracy"])


def test_hf_dataset_saved_on_disk(tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets", reason="hf: data sets need the `datasets` package (the hf extra)")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    rows = reviews()
    splits = {split: datasets.Dataset.from_dict({"text": [r["review"] for r in rows if r["part"] == split],
                                                 "label": [r["stars"] for r in rows if r["part"] == split]})
              for split in ("train", "test")}  # fmt: skip
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    run = tmp_path / "run"
    assert main(["train", "--dataset", f"hf:{tmp_path / 'saved'}", *TINY, "--out", str(run)]) == 0
    assert eval_accuracy(run, capsys) == pytest.approx(json.loads((run / "eval_test.json").read_text())["accuracy"])


def test_imagefolder_trains_a_vit_without_flipping_your_images(tmp_path, capsys):
    image = pytest.importorskip("PIL.Image", reason="Pillow reads image folders")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for label, base in (("dark", 40), ("light", 200)):
            for i in range(count):
                path = tmp_path / "photos" / split / label / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                image.fromarray((base + rng.integers(0, 20, (8, 8))).astype(np.uint8)).save(path)
    run = tmp_path / "run"
    assert main(["train", "--dataset", f"imagefolder:{tmp_path / 'photos'}", "--augment", *TINY, "--out", str(run)]) == 0
    info = read_run_config(run).data
    assert info["kind"] == "image" and info["classes"] == ["dark", "light"] and info["image_size"] == 8
    train_set, _ = load_split(info, run, split="train", data_dir=None)
    assert train_set.hflip is False  # mirroring may change the class of your own images: off unless built in
    assert eval_accuracy(run, capsys) == pytest.approx(json.loads((run / "eval_test.json").read_text())["accuracy"])


@pytest.mark.parametrize(
    "name, content, line",
    [
        ("bad.csv", "review,stars,part\ngood film,5,train\nbad film,,train\n", 3),
        ("bad.jsonl", '{"review": "good", "stars": 5, "part": "train"}\n{"review": "bad", "stars": 1, "part": "train"\n', 2),
    ],
)
def test_a_bad_row_is_one_line_naming_file_and_line_and_exit_2(tmp_path, capsys, name, content, line):
    path = tmp_path / name
    path.write_text(content)
    scheme = name.split(".")[1]
    args = ["train", "--dataset", f"{scheme}:{path}", "--text-column", "review", "--label-column", "stars",
            "--data-option", "split_column=part", *TINY, "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("asap train: error: ") and f"{path}:{line}:" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset", "imagefolder:photos", "--text-column", "t"], "--text-column: data set 'imagefolder:photos' does not read"),
        (["--dataset", "csv:x.csv", "--data-option", "image_size=8"], "--data-option: data set 'csv:x.csv' does not read the data option image_size"),
        (["--dataset", "digits", "--label-column", "y"], "--label-column: data set 'digits' does not read"),
        (["--dataset", "csv:x.csv", "--data-option", "text_column=t"], "--data-option: give text_column as its own field"),
        (["--dataset", "csv:x.csv", "--data-option", "test_fraction=2"], "--data-option: data option test_fraction must lie in"),
        (["--dataset", "parquet:x"], "--dataset: 'parquet:x' is not SCHEME:PATH"),
    ],
)
def test_data_options_are_checked_before_anything_runs(tmp_path, capsys, extra, message):
    assert main(["train", *extra, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
