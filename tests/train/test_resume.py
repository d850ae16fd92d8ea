"""An interrupted run, resumed, ends exactly where an uninterrupted one does."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from asap.train import CheckpointError, read_metrics, train
from asap.train.checkpoint import CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE, load_tensors
from asap.train.loop import Trainer
from tests.train.conftest import tiny_train_config

TIMING = ("samples_per_sec", "epoch_seconds", "elapsed_seconds")


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_tensors(f"{run_dir}/{MODEL_FILE}")[0]


def assert_same_run(a: str, b: str) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6, msg=key)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(read_metrics(f"{a}/{METRICS_FILE}")) == strip(read_metrics(f"{b}/{METRICS_FILE}"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    # Dropout > 0, so the result depends on the restored RNG streams too.
    config = tiny_train_config(tmp_path_factory.mktemp("ref") / "run", dropout=0.2, method="sinkhorn", n_iters=3)
    result = train(config)
    assert result["completed"] and result["global_step"] == 2 * 16
    return config


@pytest.mark.parametrize("stop_at", [7, 16])  # mid-epoch, and exactly at an epoch end
def test_resume_matches_uninterrupted_run(tiny_config, reference, stop_at):
    config = tiny_config(f"stopped{stop_at}", dropout=0.2, method="sinkhorn", n_iters=3, stop_after_steps=stop_at)
    first = train(config)
    assert not first["completed"] and first["global_step"] == stop_at and first["test"] is None
    resumed = train(tiny_config(f"stopped{stop_at}", dropout=0.2, method="sinkhorn", n_iters=3), resume=True)
    assert resumed["completed"] and resumed["global_step"] == 32
    assert_same_run(reference.out_dir, config.out_dir)
    assert resumed["test"]["accuracy"] == pytest.approx(train_result_accuracy(reference.out_dir))


def train_result_accuracy(run_dir: str) -> float:
    import json

    return json.loads(open(f"{run_dir}/eval_test.json").read())["accuracy"]


def test_sigterm_checkpoints_at_a_step_boundary_and_resumes(tiny_config, reference, monkeypatch):
    original = Trainer._step

    def step_then_signal(self, batch):
        original(self, batch)
        if self.global_step == 9:
            os.kill(os.getpid(), signal.SIGTERM)

    kwargs = dict(dropout=0.2, method="sinkhorn", n_iters=3)
    monkeypatch.setattr(Trainer, "_step", step_then_signal)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config("signalled", **kwargs))
    monkeypatch.setattr(Trainer, "_step", original)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    config = tiny_config("signalled", **kwargs)
    resumed = train(config, resume=True)
    assert resumed["completed"]
    assert_same_run(reference.out_dir, config.out_dir)


def test_resume_refuses_other_settings(tiny_config):
    train(tiny_config("short", stop_after_steps=3))
    with pytest.raises(CheckpointError, match=r"lr=0\.1 \(run: 0\.003\)"):
        train(tiny_config("short", lr=0.1), resume=True)


def test_new_run_refuses_an_existing_run_dir(tiny_config):
    train(tiny_config("taken", stop_after_steps=2))
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(tiny_config("taken", stop_after_steps=2))


def test_resume_without_checkpoint(tiny_config, tmp_path):
    with pytest.raises(CheckpointError, match=f"{CHECKPOINT_FILE}: file not found"):
        train(tiny_config("nothing"), resume=True)
