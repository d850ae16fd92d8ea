"""A user's own model and data, trained through :class:`Trainer` directly: same loop, checkpoints, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from asap.errors import ConfigError
from asap.train import CheckpointError, LoopOptions, Trainer, read_metrics
from asap.train.trainer import TrainingDiverged
from asap.train.checkpoint import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, MODEL_FILE, load_tensors

TIMING = ("samples_per_sec", "epoch_seconds", "elapsed_seconds")


class TinyMLP(nn.Module):
    """Not a model of this project: only the protocol (input_names, logits out, a JSON .config)."""

    input_names = ("features",)

    def __init__(self, width: int = 16, num_classes: int = 3):
        super().__init__()
        self.config = {"kind": "tiny_mlp", "width": width, "num_classes": num_classes}
        self.net = nn.Sequential(nn.Linear(4, width), nn.GELU(), nn.Dropout(0.3), nn.Linear(width, num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def to_batch(items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    xs, ys = zip(*items)
    return {"features": torch.stack(xs), "labels": torch.stack(ys)}


def datasets() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(120, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x[:100], y[:100]), TensorDataset(x[100:], y[100:])


def make_trainer(out_dir, *, resume: bool = False, lr: float = 1e-2, scheduled: bool = True, **options) -> Trainer:
    """The objects built the same way each time (as a resumed run must), then handed to a Trainer."""
    torch.manual_seed(0)
    model = TinyMLP()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    opts = LoopOptions(out_dir=str(out_dir), epochs=3, batch_size=16, seed=5, progress=False, device="cpu", **options)
    train_set, val_set = datasets()
    scheduler = None
    if scheduled:
        total = opts.total_steps(len(train_set))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    return Trainer(model, train_set, val_set, collate=to_batch, optimizer=optimizer, scheduler=scheduler,
                   options=opts, resume=resume)  # fmt: skip


def run(trainer: Trainer) -> dict:
    with trainer:
        return trainer.run()


def assert_bitwise_same_run(a, b) -> None:
    wa, wb = load_tensors(a / MODEL_FILE)[0], load_tensors(b / MODEL_FILE)[0]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(read_metrics(a / METRICS_FILE)) == strip(read_metrics(b / METRICS_FILE))


@pytest.mark.parametrize("stop_at", [4, 12])  # mid-epoch (6 steps per epoch), and in the second epoch
def test_own_model_interrupted_and_resumed_equals_an_uninterrupted_run(tmp_path, stop_at):
    whole = run(make_trainer(tmp_path / "whole"))
    assert whole["completed"] and whole["global_step"] == 3 * 6 and len(whole["history"]) == 3
    first = run(make_trainer(tmp_path / "parts", stop_after_steps=stop_at))
    assert not first["completed"] and first["global_step"] == stop_at
    resumed = run(make_trainer(tmp_path / "parts", resume=True))
    assert resumed["completed"] and resumed["global_step"] == 18
    assert_bitwise_same_run(tmp_path / "whole", tmp_path / "parts")
    _, meta = load_tensors(tmp_path / "parts" / CHECKPOINT_FILE)
    assert meta["progress"]["global_step"] == 18 and meta["scheduler"]["last_epoch"] == 18


def test_the_run_folder_records_the_model_loop_and_optimizer(tmp_path):
    run(make_trainer(tmp_path / "run", stop_after_steps=2))
    record = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    assert record["model"] == {"kind": "tiny_mlp", "width": 16, "num_classes": 3}
    assert record["loop"]["batch_size"] == 16 and record["loop"]["seed"] == 5
    assert record["optimizer"]["type"] == "AdamW" and record["optimizer"]["defaults"]["lr"] == 1e-2
    assert record["scheduler"] == "LambdaLR"
    _, meta = load_tensors(tmp_path / "run" / MODEL_FILE)
    assert meta["model"] == record["model"] and meta["step"] == 2


def test_resume_refuses_other_settings_and_a_second_new_run(tmp_path):
    run(make_trainer(tmp_path / "run", stop_after_steps=2))
    with pytest.raises(CheckpointError, match="already holds a run"):
        make_trainer(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"optimizer=.*'lr': 0\.5"):
        make_trainer(tmp_path / "run", resume=True, lr=0.5)
    with pytest.raises(CheckpointError, match=r"batch_size=8 \(run: 16\)"):
        model = TinyMLP()
        Trainer(model, *datasets(), collate=to_batch, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01),
                options=LoopOptions(out_dir=str(tmp_path / "run"), epochs=3, batch_size=8, seed=5, device="cpu"),
                resume=True)  # fmt: skip
    result = run(make_trainer(tmp_path / "run", resume=True))  # the refusals left the run (and its lock) intact
    assert result["completed"]


def test_without_a_schedule(tmp_path):
    whole = run(make_trainer(tmp_path / "whole", scheduled=False))
    run(make_trainer(tmp_path / "parts", scheduled=False, stop_after_steps=7))
    with pytest.raises(CheckpointError, match=r"scheduler='LambdaLR' \(run: None\)"):
        make_trainer(tmp_path / "parts", resume=True)
    run(make_trainer(tmp_path / "parts", scheduled=False, resume=True))
    assert whole["history"][-1]["lr"] == 1e-2
    assert_bitwise_same_run(tmp_path / "whole", tmp_path / "parts")


def test_refusals_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="LoopOptions.batch_size: must be >= 1"):
        LoopOptions(out_dir=str(tmp_path / "x"), batch_size=0)
    with pytest.raises(ConfigError, match="--batch-size 500 is larger than the 100 training example"):
        model = TinyMLP()
        Trainer(model, *datasets(), collate=to_batch, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                options=LoopOptions(out_dir=str(tmp_path / "big"), batch_size=500, device="cpu"))  # fmt: skip
    plain = nn.Linear(4, 3)
    with pytest.raises(ConfigError, match=r"the model has no \.input_names"):
        Trainer(plain, *datasets(), collate=to_batch, optimizer=torch.optim.SGD(plain.parameters(), lr=0.1),
                options=LoopOptions(out_dir=str(tmp_path / "plain"), batch_size=10, device="cpu"))  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_a_non_finite_loss_stops_a_trainer_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    original = Trainer._step

    def step_with_nan(self, batch):
        if self.global_step + 1 == 5:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        original(self, batch)

    monkeypatch.setattr(Trainer, "_step", step_with_nan)
    with pytest.raises(TrainingDiverged, match=r"at step 5 .*last checkpoint \(step 3\).*--lr \(now 0\.01\)"):
        run(make_trainer(tmp_path / "nan", checkpoint_every=3))
    monkeypatch.undo()
    _, meta = load_tensors(tmp_path / "nan" / CHECKPOINT_FILE)
    assert meta["progress"]["global_step"] == 3
    assert run(make_trainer(tmp_path / "nan", checkpoint_every=3, resume=True))["completed"]


def test_loop_options_of_a_train_config(tmp_path):
    from asap.train import TrainConfig

    config = TrainConfig(out_dir=str(tmp_path / "r"), epochs=2, batch_size=8, seed=3, grad_clip=None, device="cpu")
    options = LoopOptions.from_config(config)
    assert (options.epochs, options.batch_size, options.seed, options.grad_clip) == (2, 8, 3, None)
    assert options.resolved_eval_batch_size == config.resolved_eval_batch_size == 16


def test_without_progress_bars_a_log_line_is_printed_every_log_every_steps(tmp_path, capsys):
    """``--no-progress`` is for log files: a plain line per ``log_every`` steps, not silence until the epoch ends."""
    from asap.train import TrainConfig, train

    config = TrainConfig(dataset="digits", limit=96, epochs=1, batch_size=16, log_every=2, progress=False,
                         device="cpu", out_dir=str(tmp_path / "run"))  # fmt: skip
    train(config)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch 1/1 step ")]
    assert [line.split()[3] for line in lines] == ["2/5", "4/5"]  # 96 images, 10 % held out: 86 -> 5 batches
    assert all(" loss " in line and " acc " in line and " lr " in line for line in lines)
