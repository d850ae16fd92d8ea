"""The fidelity plane on a seconds-long teacher: fitted maps, TV figures checked by hand, verdict, plot, CLI errors."""

from __future__ import annotations

import json

import pytest
import torch

from asap.attention.operators import SinkhornOperator
from asap.attention.reference import sinkhorn_plan_reference
from asap.bench import fidelity
from asap.bench.fidelity import FidelityConfig, LayerCall, layer_plane, pareto_verdict
from asap.errors import ConfigError
from asap.train import train
from tests.train.conftest import tiny_train_config


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    train(tiny_train_config(root / "teacher", depth=2, epochs=1, method="sinkhorn", n_iters=5, eps=1.0))
    return root


def test_run_teacher_plane_json_and_png(teacher_run, capsys):
    out = teacher_run / "fid" / "teacher.json"
    argv = [str(teacher_run / "teacher"), "--calibration", "48", "--held-out", "16", "--batch-size", "16",
            "--extra-steps", "0,2", "--truncated", "1,3", "--budget", "0.05", "--out", str(out)]  # fmt: skip
    assert fidelity.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == fidelity.SCHEMA and out.with_suffix(".png").is_file()
    assert [layer["layer"] for layer in doc["layers"]] == [0, 1]
    for layer in doc["layers"]:
        names = {p["method"] for p in layer["points"]}
        assert names == {"sinkhorn_k1", "sinkhorn_k3", "asap_l16_j0", "asap_l16_j2"}
        for p in layer["points"]:
            assert 0 <= p["row_tv"] <= 1 and p["ms"] > 0
        assert "asap_wins" in layer["verdict"]


def test_figures_match_the_fp64_plans():
    """TV of truncation to the teacher, recomputed from the reference plans; ASAP + 2 steps from the oracle dual is exact."""
    torch.manual_seed(0)
    valid = torch.arange(7)[None] < torch.tensor([7, 5, 3])[:, None]
    calls = [LayerCall(torch.randn(3, 2, 7, 4), torch.randn(3, 2, 7, 4), torch.randn(3, 2, 7, 4), valid) for _ in range(3)]
    teacher = SinkhornOperator(n_iters=5, eps=0.8)
    config = FidelityConfig(slices=(4,), extra_steps=(0,), truncated=(3,), budget_s=0.01, repeats=2)
    plane = layer_plane(calls[:2], calls[2:], teacher, config)
    point = next(p for p in plane["points"] if p["method"] == "sinkhorn_k3")
    call = calls[2]
    q, k = call.q.double(), call.k.double()
    a = sinkhorn_plan_reference(q, k, n_iters=3, eps=0.8, attn_mask=call.attn_mask)
    t = sinkhorn_plan_reference(q, k, n_iters=5, eps=0.8, attn_mask=call.attn_mask)
    tv = 0.5 * (a - t).abs().sum(-1)
    rows = valid[:, None, :].expand_as(tv)
    assert point["row_tv"] == pytest.approx(float(tv[rows].mean()), rel=1e-4, abs=1e-6)


def test_verdict():
    pts = [{"method": "sinkhorn_k3", "family": "truncated", "K": 3, "row_tv": 0.05, "ms": 10.0},
           {"method": "sinkhorn_k5", "family": "truncated", "K": 5, "row_tv": 0.02, "ms": 15.0},
           {"method": "asap_l16_j0", "family": "asap", "row_tv": 0.03, "ms": 11.0},
           {"method": "asap_l16_j2", "family": "asap", "row_tv": 0.03, "ms": 16.0}]  # fmt: skip
    verdict = pareto_verdict(pts)
    assert verdict["asap_points_on_front"] == [{"asap": "asap_l16_j0", "beats": "sinkhorn_k3"}]


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="RUN_DIR or --hf"):
        fidelity.main(["--out", str(tmp_path / "x.json")])
    with pytest.raises(ConfigError, match="--held-out"):
        fidelity.main([str(tmp_path), "--held-out", "0"])
    with pytest.raises(ValueError, match="extra_steps"):
        FidelityConfig(extra_steps=(-1,))
    assert not (tmp_path / "x.json").exists()
