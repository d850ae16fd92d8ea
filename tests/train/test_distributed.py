"""Two data-parallel CPU processes (gloo) train the same model as one process on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asap.train import read_metrics, train
from asap.train.checkpoint import METRICS_FILE, MODEL_FILE, load_tensors
from tests.train.conftest import tiny_train_config

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    # One epoch of 4 optimiser steps on a global batch of 16 (8 per process), dropout 0.
    options = dict(epochs=1, limit=80, method="sinkhorn", n_iters=3)
    single = tiny_train_config(tmp_path / "single", **options)
    train(single)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", "-m", "asap.cli.main", "train", "--dataset", "digits", "--limit", "80",
        "--dim", "16", "--depth", "1", "--heads", "2", "--epochs", "1", "--batch-size", "16", "--lr", "3e-3",
        "--method", "sinkhorn", "--n-iters", "3", "--device", "cpu", "--no-progress",
        "--out", str(tmp_path / "ddp"),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    one, two = load_tensors(tmp_path / "single" / MODEL_FILE)[0], load_tensors(tmp_path / "ddp" / MODEL_FILE)[0]
    assert one.keys() == two.keys()
    for key in one:
        # Only the order of the gradient sums differs (all-reduce of two halves vs one mean),
        # i.e. float32 rounding, which a few Adam steps can amplify to ~1e-6.
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    # Validation is sharded and all-reduced: the same numbers, logged once (rank 0 only).
    (row_one,), (row_two,) = read_metrics(tmp_path / "single" / METRICS_FILE), read_metrics(tmp_path / "ddp" / METRICS_FILE)
    for key in ("step", "train_loss", "train_acc", "val_loss", "val_acc"):
        assert row_two[key] == pytest.approx(row_one[key], rel=1e-5), key
    assert (tmp_path / "ddp" / "command.txt").read_text().count("asap train") == 1
