"""``asap train`` / ``asap eval`` end to end on digits (no data directory needed)."""

from __future__ import annotations

import json

import pytest

from asap.cli.main import main
from asap.train import load_model, read_metrics

TINY = ["--dataset", "digits", "--limit", "200", "--dim", "16", "--depth", "1", "--heads", "2",
        "--batch-size", "16", "--device", "cpu", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "digits_sk3"
    args = ["train", *TINY, "--method", "sinkhorn", "--n-iters", "3", "--eps", "1", "--epochs", "2",
            "--checkpoint-every", "5", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    return out


def test_train_writes_metrics_checkpoint_and_config(run_dir):
    for name in ("config.json", "model.safetensors", "checkpoint.safetensors", "metrics.jsonl", "eval_test.json"):
        assert (run_dir / name).is_file(), name
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"step", "train_loss", "train_acc", "val_loss", "val_acc", "samples_per_sec"} <= rows[0].keys()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["attention"] == {"method": "sinkhorn", "options": {"n_iters": 3, "eps": 1.0}}
    assert config["train"]["num_heads"] == 2 and config["train"]["out_dir"] == str(run_dir)
    assert "--n-iters 3" in (run_dir / "command.txt").read_text()
    model, _ = load_model(run_dir)
    assert model.config.depth == 1


def test_eval_reads_the_run_back(run_dir, capsys):
    trained = json.loads((run_dir / "eval_test.json").read_text())
    out = run_dir / "again.json"
    assert main(["eval", str(run_dir), "--limit", "200", "--device", "cpu", "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["accuracy"] == pytest.approx(trained["accuracy"]) and printed["num_samples"] == 200


def test_eval_with_another_method(run_dir, capsys):
    assert main(["eval", str(run_dir), "--method-override", "sinkhorn", "--n-iters", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["attention"] == {"method": "sinkhorn", "options": {"n_iters": 1}}
    assert (run_dir / "eval_test_sinkhorn_n_iters1.json").is_file()


def test_resume_cli_refuses_changed_settings_and_continues(tmp_path, capsys):
    out = tmp_path / "stopped"
    assert main(["train", *TINY, "--epochs", "1", "--stop-after-steps", "3", "--out", str(out)]) == 0
    assert not (out / "eval_test.json").exists()
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--lr", "0.5"]) == 2
    assert "cannot change --lr" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert (out / "eval_test.json").is_file()
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == 11
