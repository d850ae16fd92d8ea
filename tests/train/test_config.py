"""Every TrainConfig field is checked once, at construction, with a message naming it (D2)."""

from __future__ import annotations

import math

import pytest

from asap.errors import ConfigError
from asap.train import TrainConfig
from asap.train.config import OptionError

BAD = [
    ("grad_clip", -1.0), ("grad_clip", 0.0), ("grad_clip", math.inf),
    ("min_lr_ratio", -1.0), ("min_lr_ratio", 1.5),
    ("weight_decay", -1.0), ("weight_decay", math.nan),
    ("eps", math.inf), ("eps", 0.0), ("eps", -1.0),
    ("lr", 0.0), ("lr", math.nan), ("lr", math.inf),
    ("stop_after_steps", 0), ("stop_after_steps", -1),
    ("patch_size", 0), ("eval_batch_size", 0), ("eval_batch_size", -1),
    ("val_fraction", 0.0), ("val_fraction", 1.0),
    ("batch_size", 0), ("batch_size", True), ("epochs", True), ("epochs", 2.5), ("lr", True),
    ("dropout", 1.0), ("warmup_fraction", 1.0), ("betas", (0.9, 1.0)), ("betas", (0.9,)),
    ("seed", -1), ("seed", 2**32), ("num_workers", -1), ("checkpoint_every", -1), ("log_every", 0),
    ("limit", 0), ("dim", 0), ("depth", -1), ("num_heads", 0), ("mlp_ratio", 0.0), ("n_iters", 0),
    ("method", "nope"), ("preset", "huge"), ("pooling", "max"), ("device", "gpu"), ("dataset", ""),
    ("augment", 1), ("progress", "yes"), ("attention_options", {"foo": 1}), ("attention_options", {"eps": 1.0}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_bad_field_is_refused_naming_it(name, value):
    with pytest.raises(OptionError) as info:
        TrainConfig(**{name: value})
    assert info.value.field == name and f"TrainConfig.{name}" in str(info.value)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_dim_must_divide_by_heads_after_the_preset():
    with pytest.raises(OptionError, match="dim=30 must be divisible by num_heads=4"):
        TrainConfig(dim=30)  # the tiny preset has 4 heads


@pytest.mark.parametrize("name", ["grad_clip", "patch_size", "eval_batch_size", "stop_after_steps", "limit", "eps"])
def test_none_means_the_default(name):
    assert getattr(TrainConfig(**{name: None}), name) is None


def test_eval_batch_size_default_is_explicit_not_an_or():
    assert TrainConfig(batch_size=8).resolved_eval_batch_size == 16
    assert TrainConfig(batch_size=8, eval_batch_size=3).resolved_eval_batch_size == 3


def test_from_dict_round_trip_and_unknown_field():
    config = TrainConfig(method="sinkhorn", n_iters=3, betas=(0.8, 0.9))
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown field"):
        TrainConfig.from_dict({"nope": 1})


def test_validation_does_not_touch_the_global_rng():
    import torch

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    TrainConfig(method="asap", attention_options={"num_slices": 4})  # builds one operator to check options
    assert torch.equal(torch.rand(3), expected)
