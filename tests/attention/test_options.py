"""Typed operator options: validated once, frozen, JSON round trip, and operators rebuilt from them."""

from __future__ import annotations

import json

import pytest
import torch

from asap.attention import AsapOperator, build_operator
from asap.attention.dual_map import build_dual_map
from asap.attention.module import AttentionConfig, operator_config
from asap.attention.options import AsapOptions, SinkhornOptions, SoftmaxOptions


@pytest.mark.parametrize("options", [
    SoftmaxOptions(), SoftmaxOptions(scale=0.3), SinkhornOptions(n_iters=11, eps=0.5, grad_mode="closure"),
    AsapOptions(num_slices=8, extra_features=("qk_mean", "q_norm"), extra_steps=2, backend="flash", seed=3),
])  # fmt: skip
def test_json_round_trip(options):
    again = type(options).from_dict(json.loads(json.dumps(options.to_dict())))
    assert again == options
    with pytest.raises(Exception):  # frozen
        options.scale = 1.0


@pytest.mark.parametrize("cls, bad, name", [
    (SinkhornOptions, {"n_iters": 0}, "n_iters"), (SinkhornOptions, {"eps": float("inf")}, "eps"),
    (SinkhornOptions, {"grad_mode": "fast"}, "grad_mode"), (AsapOptions, {"num_slices": True}, "num_slices"),
    (AsapOptions, {"slice_type": "grid"}, "slice_type"), (AsapOptions, {"extra_features": ("k_norm",)}, "extra feature"),
    (AsapOptions, {"map_kind": "spline"}, "map_kind"), (AsapOptions, {"backend": "cuda"}, "backend"),
    (AsapOptions, {"extra_steps": -1}, "extra_steps"), (SoftmaxOptions, {"scale": -1.0}, "scale"),
])  # fmt: skip
def test_bad_options_are_refused_by_name(cls, bad, name):
    with pytest.raises(ValueError, match=name):
        cls(**bad)


def test_unknown_keys_are_refused():
    with pytest.raises(TypeError, match="does not take option"):
        AsapOptions.from_dict({"num_slices": 4, "slices": 4})


def test_operators_rebuild_from_their_config():
    torch.manual_seed(0)
    dual_map = build_dual_map(num_heads=2, head_dim=4, num_slices=5, slice_type="random", seed=7,
                              extra_features=("q_norm",))  # fmt: skip
    dual_map.set_coefficients(torch.randn(2, 6))
    compiled = AsapOperator(num_heads=2, head_dim=4, eps=0.7, dual_map=dual_map, extra_steps=1)
    config = operator_config(compiled)
    assert config.method == "asap" and config.options["num_slices"] == 5 and config.options["seed"] == 7
    config = AttentionConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    rebuilt = build_operator(config.method, num_heads=2, head_dim=4, **config.options)
    rebuilt.load_state_dict(compiled.state_dict())
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(q, k, v), compiled(q, k, v), rtol=0, atol=0)
    sinkhorn = build_operator("sinkhorn", num_heads=2, head_dim=4, n_iters=5, eps=0.5)
    assert operator_config(sinkhorn).options == {"n_iters": 5, "eps": 0.5, "grad_mode": "unroll", "scale": None}
