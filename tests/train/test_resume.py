"""An interrupted run, resumed, ends exactly where an uninterrupted one does."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from asap.errors import ConfigError
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
    with pytest.raises(CheckpointError, match="already holds a run; continue it with --resume"):
        train(tiny_config("taken", stop_after_steps=2))


def test_resume_of_a_folder_without_a_run_says_so(tiny_config, tmp_path):
    with pytest.raises(CheckpointError, match="no such run directory; nothing to resume"):
        train(tiny_config("nothing"), resume=True)
    assert not (tmp_path / "nothing").exists()  # the refusal created nothing
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json: file not found; .* holds no run to resume"):
        train(tiny_config("empty"), resume=True)
    assert list((tmp_path / "empty").iterdir()) == []


def died_before_first_checkpoint(tiny_config, name: str, **overrides):
    """A run folder as a crash in epoch 1 leaves it: config.json (and metrics.jsonl), no checkpoint."""
    config = tiny_config(name, stop_after_steps=3, **overrides)
    train(config)
    for leftover in (CHECKPOINT_FILE, MODEL_FILE):
        os.remove(f"{config.out_dir}/{leftover}")
    return config


def test_a_run_that_died_before_its_first_checkpoint_resumes_from_step_0(tiny_config, reference, capsys):
    kwargs = dict(dropout=0.2, method="sinkhorn", n_iters=3)
    died_before_first_checkpoint(tiny_config, "died", **kwargs)
    config = tiny_config("died", **kwargs)
    resumed = train(config, resume=True)
    assert "holds no checkpoint yet (the run stopped before its first one): starting at step 0" in capsys.readouterr().out
    assert resumed["completed"] and resumed["global_step"] == 32
    assert_same_run(reference.out_dir, config.out_dir)  # exactly the uninterrupted run


def test_a_new_run_in_that_folder_says_what_to_do(tiny_config):
    died_before_first_checkpoint(tiny_config, "died2")
    with pytest.raises(CheckpointError, match=r"stopped before its first checkpoint; start it again from step 0 with --resume"):
        train(tiny_config("died2"))
    with pytest.raises(CheckpointError, match=r"lr=0\.5 \(run: 0\.003\)"):  # resume still checks the settings
        train(tiny_config("died2", lr=0.5), resume=True)


def test_stop_after_steps_already_reached_is_refused(tiny_config):
    train(tiny_config("far", stop_after_steps=5))
    with pytest.raises(ConfigError, match="--stop-after-steps 3: the run is already at step 5"):
        train(tiny_config("far", stop_after_steps=3), resume=True)


def test_a_refused_set_up_leaves_no_folder_behind(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="--patch-size 3 does not divide"):
        train(tiny_config("deep/er/run", patch_size=3))
    assert not (tmp_path / "deep").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(ConfigError, match="--batch-size 500 is larger than"):
        train(tiny_config("mine", batch_size=500))
    assert list((tmp_path / "mine").iterdir()) == []  # not even the lock file
