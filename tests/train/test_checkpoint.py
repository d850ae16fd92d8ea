"""Checkpoint files: round trips, atomic writes, and clear errors on bad files."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from asap.models import swap_attention
from asap.train import CheckpointError, load_model, train
from asap.train.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    atomic_write_bytes,
    capture_rng_state,
    flatten_optimizer_state,
    load_tensors,
    restore_rng_state,
    save_tensors,
    unflatten_optimizer_state,
)
from asap.train.data import load_split
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


def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"good")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"partial")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temporary left behind


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
