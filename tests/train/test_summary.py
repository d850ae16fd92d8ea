"""Publishing runs to results/ and the generated README."""

from __future__ import annotations

import json

from asap.cli.main import main as asap_main
from asap.train.summary import main, publish_run, summarise_run


def test_publish_and_readme(tmp_path):
    run = tmp_path / "runs" / "digits_sk3"
    args = ["train", "--dataset", "digits", "--limit", "120", "--dim", "16", "--depth", "1", "--heads", "2",
            "--batch-size", "16", "--epochs", "1", "--method", "sinkhorn", "--n-iters", "3", "--eps", "1",
            "--device", "cpu", "--no-progress", "--out", str(run)]  # fmt: skip
    assert asap_main(args) == 0
    results = tmp_path / "results"
    copied = publish_run(run, results / "digits_sk3")
    assert "checkpoint.safetensors" not in copied and not (results / "digits_sk3" / "checkpoint.safetensors").exists()
    assert {"model.safetensors", "config.json", "command.txt"} <= set(copied)
    assert "model.safetensors" not in publish_run(run, results / "small", max_weight_bytes=10)

    row = summarise_run(results / "digits_sk3")
    test = json.loads((run / "eval_test.json").read_text())
    assert row["test_acc"] == test["accuracy"] and row["K"] == 3 and row["eps"] == 1.0 and row["epochs"] == 1
    assert main(["readme", str(results)]) == 0
    readme = (results / "README.md").read_text()
    assert f"{test['accuracy']:.4f} ({test['num_samples']:,})" in readme
    assert readme.count("| digits_sk3 |") == 1 and "| small |" in readme


def test_the_size_column_reads_a_pretrained_encoders_config():
    """A run of asap train --model hf:PATH has no dim/depth/heads of its own: they come from its transformers config."""
    from types import SimpleNamespace

    from asap.train.summary import _size

    hf = SimpleNamespace(hf_config={"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6,
                                    "num_attention_heads": 12})
    assert _size(hf) == "bert: dim 384, depth 6, heads 12"
    assert _size(SimpleNamespace(dim=64, depth=2, num_heads=4)) == "dim 64, depth 2, heads 4"
