"""Operator benchmark on a tiny grid: well-formed JSON, every method accounted for, verification that can fail."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import pytest
import torch

from asap.attention.functional import softmax_attention
from asap.attention.reference import softmax_attention_reference
from asap.bench.operators import (
    SCHEMA,
    BenchMethod,
    OperatorBenchConfig,
    VerificationError,
    add_arguments,
    build_methods,
    config_from_args,
    main,
    random_asap_operator,
    run_operator_bench,
    verify_methods,
)

TINY = dict(batch=1, heads=2, head_dim=8, lengths=(16, 32), sinkhorn_iters=(1, 3), teacher_iters=3, num_slices=4,
            warmup=1, repeats=2, budget_s=None, verify_length=8, max_length={"esp": 16}, backward_max_length=16)


@pytest.fixture(scope="module")
def tiny_result():
    return run_operator_bench(OperatorBenchConfig(**TINY), command="test", log=lambda line: None)


def test_result_is_json_with_schema_machine_and_config(tiny_result):
    data = json.loads(json.dumps(tiny_result))
    assert data["schema"] == SCHEMA
    assert data["config"]["lengths"] == [16, 32]
    assert data["teacher"] == "sinkhorn_k3"
    for key in ("cpu_model", "torch", "git_revision", "date_utc", "load_average"):
        assert key in data["machine"]


def test_every_method_is_timed_or_skipped_with_a_reason(tiny_result):
    names = set(tiny_result["methods"])
    assert {"softmax", "sinkhorn_k1", "sinkhorn_k3", "asap_l4"} <= names
    assert "esp" in names or "esp" in tiny_result["unavailable"]
    modes = [(g["mode"], g["n"]) for g in tiny_result["groups"]]
    assert modes == [("forward", 16), ("forward_backward", 16), ("forward", 32), ("forward_backward", 32)]
    for group in tiny_result["groups"]:
        expected = {n for n, m in tiny_result["methods"].items() if group["mode"] == "forward" or m["trainable"]}
        assert set(group["methods"]) | set(group["skipped"]) == expected
        assert not set(group["methods"]) & set(group["skipped"])
        for res in group["methods"].values():
            assert not res["oom"]
            assert res["median_s"] > 0 and res["q1_s"] <= res["median_s"] <= res["q3_s"]
            assert res["repeats"] == 2 and res["peak_bytes"] > 0
        assert all(reason for reason in group["skipped"].values())
    first_fb = tiny_result["groups"][1]
    assert "asap_l4" not in first_fb["methods"] and "asap_l4" not in first_fb["skipped"]  # not trainable
    late = tiny_result["groups"][3]
    assert set(late["methods"]) == set()  # n=32 > backward_max_length=16: everything skipped, visibly
    assert "backward_max_length" in late["skipped"]["softmax"]


def test_ratios_refer_to_the_teacher_and_softmax_of_the_same_group(tiny_result):
    for group in tiny_result["groups"]:
        methods = group["methods"]
        if not methods:
            continue
        assert methods["sinkhorn_k3"]["speedup_vs_teacher"] == 1.0
        assert methods["softmax"]["speedup_vs_softmax"] == 1.0
        for res in methods.values():
            expected = methods["sinkhorn_k3"]["median_s"] / res["median_s"]
            assert res["speedup_vs_teacher"] == pytest.approx(expected)


def test_verification_recorded_for_every_method(tiny_result):
    records = {r["method"]: r for r in tiny_result["verification"]}
    assert set(records) == set(tiny_result["methods"])
    assert all(r["passed"] for r in records.values())
    assert set(records["sinkhorn_k3"]["errors"]) == {"output", "grad_q", "grad_k", "grad_v"}
    assert set(records["asap_l4"]["errors"]) == {"output"}


def test_verification_fails_loudly_on_a_wrong_fast_path():
    config = OperatorBenchConfig(**TINY)
    wrong = BenchMethod(
        name="wrong_scale", family="softmax", label="wrong", trainable=True, description="softmax at scale 0.9",
        forward=lambda q, k, v, p: softmax_attention(q, k, v, scale=0.9),
        reference=lambda q, k, v, p: softmax_attention_reference(q, k, v),
        reference_name="softmax_attention_reference",
    )
    with pytest.raises(VerificationError, match="wrong_scale: output error"):
        verify_methods({"wrong_scale": wrong}, config, torch.device("cpu"))


def test_asap_method_is_the_full_operator_with_random_coefficients():
    op = random_asap_operator(heads=2, head_dim=8, num_slices=4, eps=1.0, seed=0, device=torch.device("cpu"))
    assert bool(op.dual_map.fitted) and op.dual_map.coef.abs().min() > 0
    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    assert torch.isfinite(op(q, k, v)).all()


def test_missing_esp_is_reported_not_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "asap.attention.esp", None)  # import now raises ImportError
    methods, unavailable = build_methods(OperatorBenchConfig(**TINY), torch.device("cpu"))
    assert "esp" not in methods
    assert "not available" in unavailable["esp"]


def test_config_rejects_a_grid_without_its_teacher():
    with pytest.raises(ValueError, match="teacher"):
        OperatorBenchConfig(sinkhorn_iters=(3, 5), teacher_iters=21)
    with pytest.raises(ValueError, match="unknown method families"):
        OperatorBenchConfig(methods=("softmax", "sinkhorn", "flash"))


def test_cli_writes_json_and_a_command_that_reproduces_the_config(tmp_path):
    out = tmp_path / "bench" / "ops.json"
    argv = ["--device", "cpu", "--batch", "1", "--heads", "2", "--head-dim", "8", "--lengths", "16", "--iters", "3",
            "--teacher-iters", "3", "--slices", "4", "--methods", "softmax,sinkhorn,asap", "--no-backward",
            "--repeats", "1", "--budget-s", "0", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert set(data["groups"][0]["methods"]) == {"softmax", "sinkhorn_k3", "asap_l4"}
    line = (out.parent / "command.txt").read_text().strip()
    assert line == f"ops.json: {data['command']}"
    # Re-parsing the recorded command gives back exactly the configuration that ran.
    recorded = shlex.split(data["command"])
    assert recorded[:3] == ["python", "-m", "asap.bench.operators"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    reparsed = config_from_args(parser.parse_args(recorded[3:])).to_dict()
    assert json.loads(json.dumps(reparsed)) == data["config"]


def test_asap_cli_registers_bench_commands():
    from asap.bench import operators
    from asap.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["bench", "operators", "--lengths", "64,128", "--no-backward"])
    from asap.cli import bench as bench_cli

    assert args.func is bench_cli._run_operators  # validates the grid, then operators.run_from_args
    assert config_from_args(args).lengths == (64, 128) and not config_from_args(args).backward
    # training-cost hands every option, --help included, to asap.bench.training_cost's own parser.
    args = parser.parse_args(["bench", "training-cost", "--shape", "vit:197", "--help"])
    assert args.args == ["--shape", "vit:197", "--help"]


def test_padded_run_passes_token_masks_and_records_the_fraction():
    """--padding: every method gets the (b, n) token mask, is verified against its masked fp64 reference."""
    config = OperatorBenchConfig(**{**TINY, "batch": 3, "lengths": (16,), "backward": False, "padding": 0.25,
                                    "threads": 1, "methods": ("softmax", "sinkhorn", "asap")})  # fmt: skip
    result = run_operator_bench(config, command="test", log=lambda line: None)
    (group,) = result["groups"]
    assert 0.2 <= group["padded_fraction"] <= 0.3
    assert result["machine"]["torch_threads"] == 1
    assert all(record["passed"] for record in result["verification"])
    assert result["config"]["extra_features"] == ["qk_mean", "q_norm"]
    with pytest.raises(ValueError, match="padding"):
        OperatorBenchConfig(padding=0.5)


def test_padded_verification_catches_a_method_that_ignores_padding():
    config = OperatorBenchConfig(**{**TINY, "batch": 3, "padding": 0.25})
    wrong = BenchMethod(
        name="softmax", family="softmax", label="softmax", trainable=False, description="ignores the padding",
        forward=lambda q, k, v, p: softmax_attention(q, k, v),
        reference=lambda q, k, v, p: softmax_attention_reference(
            q, k, v, attn_mask=None if p is None else p[:, None, :, None] & p[:, None, None, :]),
        reference_name="softmax_attention_reference",
    )
    with pytest.raises(VerificationError, match="softmax"):
        verify_methods({"softmax": wrong}, config, torch.device("cpu"))
