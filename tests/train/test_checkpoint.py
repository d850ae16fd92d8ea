"""Checkpoint files: round trips and clear errors on bad files (the atomic writers are tested in tests/test_io.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from asap.errors import UnsafePathError
from asap.models import swap_attention
from asap.train import CheckpointError, load_model, read_run_config, train
from asap.train.checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    HASH_KEY,
    MODEL_FILE,
    capture_rng_state,
    flatten_optimizer_state,
    load_tensors,
    restore_rng_state,
    save_tensors,
    tensors_sha256,
    unflatten_optimizer_state,
)
from asap.train.data import load_split, to_model_dataset
from asap.train.evaluate import evaluate


def adam_after_steps(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(
        [{"params": model[0].parameters(), "weight_decay": 0.1}, {"params": model[2].parameters(), "weight_decay": 0.0}],
        lr=1e-2, betas=(0.8, 0.9),
    )  # fmt: skip
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    return model, opt


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    model, opt = adam_after_steps()
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    save_tensors(tmp_path / "opt.safetensors", tensors, metadata={"opt": meta})
    loaded, loaded_meta = load_tensors(tmp_path / "opt.safetensors")

    clone, clone_opt = adam_after_steps(seed=1)  # other values, same structure
    clone.load_state_dict(model.state_dict())
    clone_opt.load_state_dict(unflatten_optimizer_state(loaded, loaded_meta["opt"]))
    assert clone_opt.param_groups[0]["betas"] == (0.8, 0.9)
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (clone, clone_opt)):  # one more identical step on both
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    state = capture_rng_state(torch.device("cpu"))
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.randn(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng_state(state, torch.device("cpu"))
    again = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.randn(), torch.rand(3))
    assert expected[:2] == again[:2] and expected[3] == again[3]
    assert np.array_equal(expected[2], again[2]) and torch.equal(expected[4], again[4])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from asap.train import TrainConfig

    out = tmp_path_factory.mktemp("ckpt") / "run"
    config = TrainConfig(
        dataset="digits", out_dir=str(out), limit=200, dim=16, depth=1, num_heads=2, epochs=1, batch_size=16,
        method="sinkhorn", n_iters=3, progress=False, device="cpu",
    )  # fmt: skip
    result = train(config)
    return out, result


def test_load_model_reproduces_the_trained_model(trained_run):
    run_dir, result = trained_run
    model, run_config = load_model(run_dir)
    assert not model.training
    assert run_config.model.attention.method == "sinkhorn"
    assert run_config.train.n_iters == 3
    dataset, collate = load_split(run_config.data, run_dir, split="test", data_dir=None, limit=200)
    metrics = evaluate(model, dataset, collate=collate)
    assert metrics["num_samples"] == result["test"]["num_samples"]
    assert metrics["accuracy"] == pytest.approx(result["test"]["accuracy"])
    assert metrics["loss"] == pytest.approx(result["test"]["loss"], rel=1e-6)
    for weights_file in (MODEL_FILE, "checkpoint.safetensors"):  # a weights file in the run also works
        same, _ = load_model(run_dir / weights_file)
        for a, b in zip(model.state_dict().values(), same.state_dict().values()):
            assert torch.equal(a, b)


def copy_run(run_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in (CONFIG_FILE, MODEL_FILE):
        (dest / name).write_bytes((run_dir / name).read_bytes())
    return dest


def test_corrupted_weights_file_is_named(trained_run, tmp_path):
    run = copy_run(trained_run[0], tmp_path / "bad")
    data = (run / MODEL_FILE).read_bytes()
    (run / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*corrupted"):
        load_model(run)


def test_missing_key_is_named(trained_run, tmp_path):
    run = copy_run(trained_run[0], tmp_path / "missing")
    tensors, _ = load_tensors(run / MODEL_FILE)
    del tensors["head.weight"]
    save_tensors(run / MODEL_FILE, tensors)
    with pytest.raises(CheckpointError, match=r"missing keys \['head.weight'\]"):
        load_model(run)


def test_config_that_does_not_match_the_weights(trained_run, tmp_path):
    run = copy_run(trained_run[0], tmp_path / "mismatch")
    tensors, _ = load_tensors(run / MODEL_FILE)
    save_tensors(run / MODEL_FILE, tensors)  # drop the embedded config: only config.json speaks
    config = json.loads((run / CONFIG_FILE).read_text())
    config["model"]["dim"] = 32
    (run / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape/dtype mismatches"):
        load_model(run)


def test_weights_written_for_another_model_are_refused(trained_run, tmp_path):
    run = copy_run(trained_run[0], tmp_path / "other")
    config = json.loads((run / CONFIG_FILE).read_text())
    config["model"]["depth"] = 2
    (run / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="different model"):
        load_model(run)


def test_missing_or_malformed_config(trained_run, tmp_path):
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        load_model(tmp_path)
    run = copy_run(trained_run[0], tmp_path / "json")
    (run / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(run)


def test_swapped_method_evaluates(trained_run):
    model, run_config = load_model(trained_run[0])
    dataset, collate = load_split(run_config.data, trained_run[0], split="test", data_dir=None, limit=50)
    swap_attention(model, "softmax")
    assert 0.0 <= evaluate(model, dataset, collate=collate)["accuracy"] <= 1.0


# --------------------------------------------------------------------------- integrity (D11)


def raw_header(path) -> dict[str, str]:
    with safetensors.safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def test_weights_record_their_sha256_and_a_changed_byte_is_caught(trained_run, tmp_path):
    run = copy_run(trained_run[0], tmp_path / "patched")
    header = raw_header(run / MODEL_FILE)
    tensors, _ = load_tensors(run / MODEL_FILE)
    assert json.loads(header[HASH_KEY]) == tensors_sha256(tensors)
    tensors["head.bias"][0] += 1e-3  # a silent edit, the recorded hash kept
    safetensors.torch.save_file(tensors, str(run / MODEL_FILE), metadata=header)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: the weights do not match the sha256"):
        load_model(run)


@pytest.mark.parametrize("weights_file", [MODEL_FILE, CHECKPOINT_FILE])
def test_non_finite_weights_are_refused_naming_the_file(trained_run, tmp_path, weights_file):
    run = copy_run(trained_run[0], tmp_path / "nan")
    (run / CHECKPOINT_FILE).write_bytes((trained_run[0] / CHECKPOINT_FILE).read_bytes())
    header = raw_header(run / weights_file)
    del header[HASH_KEY]  # an older file without a hash, or a re-signed one: finiteness is still checked
    tensors, _ = load_tensors(run / weights_file)
    key = next(k for k in tensors if k.endswith("head.weight"))
    tensors[key][0, 0] = float("nan")
    safetensors.torch.save_file(tensors, str(run / weights_file), metadata=header)
    with pytest.raises(CheckpointError, match=rf"{weights_file}: non-finite values .*head\.weight"):
        load_model(run / weights_file)


def test_runs_written_without_a_hash_still_load(trained_run, tmp_path):
    run = copy_run(trained_run[0], tmp_path / "old")
    header = raw_header(run / MODEL_FILE)
    del header[HASH_KEY]
    tensors, _ = load_tensors(run / MODEL_FILE)
    safetensors.torch.save_file(tensors, str(run / MODEL_FILE), metadata=header)
    model, _ = load_model(run)
    assert torch.equal(model.state_dict()["head.weight"], tensors["head.weight"])


# --------------------------------------------------------------------------- config schema (D13)


def edited_run(trained_run, tmp_path, edit) -> Path:
    run = copy_run(trained_run[0], tmp_path / "edited")
    config = json.loads((run / CONFIG_FILE).read_text())
    edit(config)
    (run / CONFIG_FILE).write_text(json.dumps(config))
    return run


def _set(path: str, value):
    def edit(config):
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return edit


_DELETE = object()
SCHEMA_CASES = [
    ("model", None, "'model' must be a JSON object"),
    ("model", "vit", "'model' must be a JSON object"),
    ("train", [], "'train' must be a JSON object"),
    ("data", None, "'data' must be a JSON object"),
    ("format_version", True, "format version True"),
    ("format_version", 2, "format version 2"),
    ("model.model_type", "gpt", "model.model_type must be one of"),
    ("model.dim", _DELETE, "model.dim is missing"),
    ("model.dim", "64", "model.dim must be an integer"),
    ("model.dim", True, "model.dim must be an integer"),
    ("model.depth", 10**6, "model.depth must be an integer in \\[1, 1024\\]"),
    ("model.mlp_ratio", None, "model.mlp_ratio must be a finite number"),
    ("model.attention", None, "model.attention must be"),
    ("model.attention.options", [], "model.attention.options must be a JSON object"),
    ("model.extra", 1, "unknown field"),
    ("train.lr", -1, "TrainConfig.lr"),
    ("train.grad_clip", -1, "TrainConfig.grad_clip"),
    ("train.batch_size", "64", "TrainConfig.batch_size"),
    ("data.kind", "audio", "data.kind must be 'text' or 'image'"),
    ("data.classes", None, "data.classes must be a non-empty list"),
    ("data.mean", [0.5, 0.5], "data.mean must be 1 finite number"),
    ("data.std", [0.0], "data.std must be positive"),
    ("versions", "x", "'versions' must be a JSON object"),
]


@pytest.mark.parametrize(("path", "value", "message"), SCHEMA_CASES, ids=[c[0] + "=" + repr(c[1])[:12] for c in SCHEMA_CASES])
def test_malformed_config_is_a_checkpoint_error_naming_the_file(trained_run, tmp_path, path, value, message):
    run = edited_run(trained_run, tmp_path, _set(path, value))
    with pytest.raises(CheckpointError, match=rf"{CONFIG_FILE}: .*{message}"):
        load_model(run)


def test_deep_or_huge_json_is_refused(trained_run, tmp_path):
    run = copy_run(trained_run[0], tmp_path / "deep")
    (run / CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_run_config(run)


def test_a_config_claiming_a_huge_model_is_refused_before_allocating(trained_run, tmp_path):
    # dim 2**20: one real qkv matrix would be 12 TiB. The shapes are compared with the file's
    # header on a meta-device model, so this fails fast instead of allocating (or being OOM-killed).
    run = edited_run(trained_run, tmp_path, _set("model.dim", 2**20))
    tensors, _ = load_tensors(run / MODEL_FILE)
    save_tensors(run / MODEL_FILE, tensors)  # no embedded model config: only config.json speaks
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weights do not match .*shape/dtype mismatches"):
        load_model(run)


@pytest.mark.parametrize("name", ["/etc/hostname", "../x/tokenizer.json", "..", "sub/tok.json"])
def test_tokenizer_names_must_stay_inside_the_run(tmp_path, name):
    info = {"kind": "text", "tokenizer": name, "max_length": 8, "dataset": "imdb"}
    with pytest.raises(UnsafePathError):
        to_model_dataset(None, info, tmp_path)
