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


def _synthetic_calls(seed: int, count: int, *, b: int = 4, h: int = 2, n: int = 12, d: int = 8) -> list[LayerCall]:
    """Sharp-ish attention inputs with padding: ``q, k`` scaled up so that the teacher's rows are peaked."""
    gen = torch.Generator().manual_seed(seed)
    valid = torch.arange(n)[None] < torch.tensor([n, n - 3, n - 5, n])[:b, None]
    return [LayerCall(3 * torch.randn(b, h, n, d, generator=gen), 3 * torch.randn(b, h, n, d, generator=gen),
                      torch.randn(b, h, n, d, generator=gen), valid) for _ in range(count)]  # fmt: skip


def test_every_map_kind_is_fitted_scored_and_timed():
    """--maps linear,relu,mlp: each kind gets its own fit (different points, its own R2), KL and a softmax-unit cost."""
    calls = _synthetic_calls(1, 6)
    teacher = SinkhornOperator(n_iters=5, eps=1.0)
    config = FidelityConfig(slices=(4,), extra_steps=(0, 2), truncated=(1, 3, 5), budget_s=0.01, repeats=2,
                            maps=("linear", "relu", "mlp"), map_steps=30)  # fmt: skip
    plane = layer_plane(calls[:4], calls[4:], teacher, config)
    assert [(m["map"], m["L"]) for m in plane["maps"]] == [("linear", 4), ("relu", 4), ("mlp", 4)]
    for entry in plane["maps"]:
        assert len(entry["r2_held_out"]) == 2 and all(-10 < r <= 1 for r in entry["r2_held_out"])
        assert len(entry["r2_fit"]) == 2
    assert "fit_info" not in plane["maps"][0] and plane["maps"][1]["fit_info"]["stages"]
    asap = {p["method"]: p for p in plane["points"] if p["family"] == "asap"}
    assert set(asap) == {f"{prefix}_l4_j{j}" for prefix in ("asap", "asap_relu", "asap_mlp") for j in (0, 2)}
    assert {p["map"] for p in asap.values()} == {"linear", "relu", "mlp"}
    # a kind silently not fitted (or fitted as the linear map) would repeat the linear map's figures
    for kind in ("relu", "mlp"):
        assert asap[f"asap_{kind}_l4_j0"]["row_tv"] != asap["asap_l4_j0"]["row_tv"]
        assert asap[f"asap_{kind}_l4_j0"]["kl"] != asap["asap_l4_j0"]["kl"]
    assert plane["maps"][1]["r2_fit"] != plane["maps"][0]["r2_fit"] != plane["maps"][2]["r2_fit"]
    assert plane["softmax_ms"] > 0
    for p in plane["points"]:
        assert p["kl"] >= 0 and 0 <= p["row_tv"] <= 1
        assert p["cost"] == pytest.approx(p["ms"] / plane["softmax_ms"])
    vs = fidelity.against_truncation(plane["points"])
    assert set(vs["maps"]) == {"linear", "relu", "mlp"} and vs["K3"]["row_tv"] > vs["K5"]["row_tv"]
    for m in vs["maps"].values():
        assert set(m) == {"cheapest", "within_K3", "within_K5"} and m["cheapest"]["row_tv"] >= 0


def test_fit_map_linear_is_fit_dual_map_and_richer_maps_are_their_own_fits():
    """fit_map("linear") is the ridge fit unchanged; relu and mlp are fitted maps of their kind, early-stopped on a split."""
    from asap.compile.direct import fit_dual_map, fit_map

    calls = _synthetic_calls(2, 8)
    items = [(c.q, c.k, c.valid) for c in calls[:6]]
    held = [(c.q, c.k, c.valid) for c in calls[6:]]
    linear, stats = fit_map(items, kind="linear", n_iters=5, num_slices=4, held_out=held)
    ref, ref_stats = fit_dual_map(items, n_iters=5, num_slices=4, held_out=held)
    assert torch.equal(linear.coefficients(), ref.coefficients()) and stats == ref_stats
    for kind in ("relu", "mlp"):
        dual_map, kstats = fit_map(items, kind=kind, n_iters=5, num_slices=4, held_out=held, steps=40)
        assert dual_map.kind == kind and bool(dual_map.fitted)
        assert all(p.dtype == torch.float32 for p in dual_map.buffers() if p.is_floating_point())
        assert kstats["fit_items"] == 4 and kstats["early_stopping_items"] == 2
        assert len(kstats["r2_held_out"]) == 2 and kstats["r2_held_out"] != stats["r2_held_out"]
    with pytest.raises(ValueError, match="holdout_fraction"):
        fit_map(items, kind="mlp", n_iters=5, holdout_fraction=1.0)


def test_fit_map_learned_directions_lower_the_early_stopping_kl():
    """fit_map("linear", refine="directions"): the ridge map's directions and coefficients fitted on the row KL;
    the kept state is never worse than the ridge one on the early-stopping items, and the map uses it."""
    from asap.compile.direct import fit_dual_map, fit_map

    calls = _synthetic_calls(2, 8)
    items = [(c.q, c.k, c.valid) for c in calls[:6]]
    held = [(c.q, c.k, c.valid) for c in calls[6:]]
    ridge, _ = fit_dual_map(items, n_iters=5, num_slices=4, held_out=held)
    learned, stats = fit_map(items, kind="linear", n_iters=5, num_slices=4, held_out=held, steps=30, refine="directions")
    info = stats["fit_info"]
    assert stats["fit_items"] == 4 and stats["early_stopping_items"] == 2 and len(stats["r2_held_out"]) == 2
    assert all(a <= b for a, b in zip(info["kl_learned_directions"], info["kl_random_directions"]))
    assert any(info["learned_kept"])  # 30 steps on a sharp toy teacher move at least one head
    moved = (learned.directions - ridge.directions).abs().amax(dim=(-1, -2)) > 0
    assert moved.tolist() == info["learned_kept"]
    torch.testing.assert_close(learned.directions.norm(dim=-1), torch.ones(2, 4))
    with pytest.raises(ValueError, match="refine"):
        fit_map(items, kind="mlp", n_iters=5, refine="directions")


def test_cli_maps_option_and_schema(teacher_run):
    out = teacher_run / "fid" / "maps.json"
    argv = [str(teacher_run / "teacher"), "--calibration", "32", "--held-out", "16", "--batch-size", "16",
            "--extra-steps", "0", "--truncated", "3,5", "--budget", "0.02", "--maps", "linear,mlp", "--map-steps", "20",
            "--layers", "0", "--extra-features", "qk_mean,lse_landmarks", "--out", str(out)]  # fmt: skip
    assert fidelity.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == "asap.bench.fidelity/2" and doc["config"]["maps"] == ["linear", "mlp"]
    assert doc["config"]["extra_features"] == ["qk_mean", "lse_landmarks"]
    (layer,) = doc["layers"]
    assert [m["map"] for m in layer["maps"]] == ["linear", "mlp"]
    assert {p["method"] for p in layer["points"]} == {"sinkhorn_k3", "sinkhorn_k5", "asap_l16_j0", "asap_mlp_l16_j0"}
    assert set(layer["against_truncation"]["maps"]) == {"linear", "mlp"}
    with pytest.raises(SystemExit):
        fidelity.main([str(teacher_run / "teacher"), "--maps", "linear,cubic"])
    with pytest.raises(ValueError, match="maps"):
        FidelityConfig(maps=("linear", "linear"))
    with pytest.raises(ValueError, match="refine"):
        FidelityConfig(refine="kl")
