"""A non-finite loss stops the run at once, with a one-line error, and writes nothing non-finite (D2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from asap.train import read_metrics, train
from asap.train.checkpoint import CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE, load_tensors
from asap.train.loop import Trainer, TrainingDiverged


def poison_at(monkeypatch, step: int) -> None:
    """Make the weights NaN right before optimiser step ``step`` (1-based), so its loss is NaN."""
    original = Trainer._step

    def step_with_nan(self, batch):
        if self.global_step + 1 == step:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        original(self, batch)

    monkeypatch.setattr(Trainer, "_step", step_with_nan)


def test_nan_between_log_points_is_caught_and_the_last_checkpoint_kept(tiny_config, monkeypatch):
    # log_every and the epoch (16 steps) are longer than the gap between the checkpoint and the NaN.
    config = tiny_config("nan", checkpoint_every=5, log_every=1000)
    poison_at(monkeypatch, 12)
    with pytest.raises(TrainingDiverged, match=r"NaN or infinite at step 12 .*last checkpoint \(step 10\)"):
        train(config)
    run = config.out_dir
    good = {name: open(f"{run}/{name}", "rb").read() for name in (CHECKPOINT_FILE, MODEL_FILE)}
    monkeypatch.undo()
    _, meta = load_tensors(f"{run}/{CHECKPOINT_FILE}")
    assert meta["progress"]["global_step"] == 10  # the checkpoint of step 10, not overwritten at 15
    assert read_metrics(f"{run}/{METRICS_FILE}") == []  # no epoch line with a NaN loss
    # The run resumes from that checkpoint (and, unpoisoned, completes).
    result = train(tiny_config("nan", checkpoint_every=5, log_every=1000), resume=True)
    assert result["completed"] and result["global_step"] == 32
    assert good[CHECKPOINT_FILE] != open(f"{run}/{CHECKPOINT_FILE}", "rb").read()


def test_nan_in_the_last_steps_of_a_run_fails_before_any_checkpoint(tiny_config, monkeypatch):
    poison_at(monkeypatch, 3)
    config = tiny_config("early", epochs=1, log_every=1000)
    with pytest.raises(TrainingDiverged, match="no checkpoint was written"):
        train(config)
    assert not Path(config.out_dir, CHECKPOINT_FILE).exists() and not Path(config.out_dir, MODEL_FILE).exists()


def test_a_diverging_learning_rate_is_refused_not_finished(tiny_config):
    # The review's reproduction: lr 1e6, progress refreshes never reached; it used to exit 0 with NaN weights.
    config = tiny_config("lr", lr=1e6, log_every=1000, epochs=1, grad_clip=None)
    with pytest.raises(TrainingDiverged):
        train(config)
    run = Path(config.out_dir)
    assert not (run / "eval_test.json").exists() and not (run / MODEL_FILE).exists()
    for line in (run / METRICS_FILE).read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
