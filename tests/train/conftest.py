from __future__ import annotations

import pytest

from asap.train import TrainConfig


def tiny_train_config(out_dir, **overrides) -> TrainConfig:
    """A seconds-long digits run: 270 training images (16 steps of 16 per epoch), a 1-block ViT."""
    kwargs = dict(
        dataset="digits", out_dir=str(out_dir), limit=300, dim=16, depth=1, num_heads=2,
        epochs=2, batch_size=16, lr=3e-3, progress=False, device="cpu",
    )  # fmt: skip
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


@pytest.fixture
def tiny_config(tmp_path):
    return lambda name="run", **overrides: tiny_train_config(tmp_path / name, **overrides)
