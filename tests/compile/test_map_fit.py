"""Compile-time fits of the dual-map family (issue 11 items 1 and 3).

* A synthetic problem whose target dual is a known nonlinear function of the
  slice potentials: every kind fits it, and "relu" and "mlp" beat the linear
  map on held-out R2 by a wide margin (a silent fall-back to linear fails).
* The MLP's early stopping never leaves a head worse on held-out data than the
  linear map it starts from.
* The ReLU map keeps exactly 2^k linear pieces per network after a fit through
  the compile pipeline (the paper's property; peaks checked to have moved).
* Each kind through compile_model / compile_module and both artifact formats:
  the loaded model is the compiled one, the manifest records kind and options.
* Options that do not belong are refused; ``target_tv`` picks the first
  candidate by cost that reaches the target and records what it tried.
"""

from __future__ import annotations

import json

import pytest
import torch

from asap.attention.dual_map import build_dual_map
from asap.attention.operators import AsapOperator
from asap.attention.relu_maps import relu_network_forward, relu_network_layers
from asap.compile import compile_model, compile_module, load_compiled, load_compiled_module, save_compiled, save_compiled_module
from asap.compile.fit import NormalEquations, explained_variance, solve_ridge
from asap.compile.map_fit import chunks_r2, fit_mlp, fit_relu
from asap.compile.swap import CompileOptions, candidate_cost, target_tv_candidates
from asap.transport.sinkhorn import center
from tests.attention.test_relu_maps import linear_pieces, pattern_regions

from .conftest import make_batches

HEADS, DIM, SLICES = 2, 8, 4
EXTRAS = ("qk_mean", "q_norm")


def synthetic(seed: int, batches: int):
    """Chunks ``(x, t, valid)``: the inputs of a map on random q, k, and a nonlinear target of the potentials."""
    g = torch.Generator().manual_seed(seed)
    reference = build_dual_map(num_heads=HEADS, head_dim=DIM, num_slices=SLICES, slice_type="random", seed=0,
                               extra_features=EXTRAS)  # fmt: skip
    chunks = []
    for _ in range(batches):
        q, k = torch.randn(8, HEADS, 24, DIM, generator=g), torch.randn(8, HEADS, 24, DIM, generator=g)
        valid = (torch.arange(24)[None] < torch.randint(6, 25, (8,), generator=g)[:, None])[:, None, :]
        x = reference.features(q, k, scale=DIM**-0.5, attn_mask=valid[..., :, None] & valid[..., None, :])
        phi = x[:, :, :SLICES]
        t = 2 * phi[:, :, 0].abs() + torch.sin(3 * phi[:, :, 1]) + phi[:, :, 2] * phi[:, :, 3]
        chunks.append((x, center(t, valid=valid), valid))
    return chunks


def ridge(chunks):
    normal = NormalEquations.zeros(HEADS, SLICES + len(EXTRAS))
    for x, t, valid in chunks:
        normal.add(x, t, valid=valid)
    return normal


def fresh(kind: str, **options):
    return build_dual_map(num_heads=HEADS, head_dim=DIM, num_slices=SLICES, slice_type="random", seed=0,
                          extra_features=EXTRAS, kind=kind, map_options=options)  # fmt: skip


def test_nonlinear_kinds_beat_the_linear_map_on_a_nonlinear_target():
    fit, held = synthetic(0, 4), synthetic(1, 2)
    coef = solve_ridge(ridge(fit), ridge=1e-3)
    linear = fresh("linear")
    linear.set_coefficients(coef.float())
    r2_linear = chunks_r2(lambda x, v: linear.predict(x, valid=v), held)
    # the chunks' R2 is the normal equations' R2 (one definition)
    torch.testing.assert_close(torch.tensor(r2_linear), explained_variance(ridge(held), coef).float(), rtol=0, atol=1e-5)
    relu = fresh("relu", depth=3)
    info = fit_relu(relu, fit, held, ridge=1e-3, steps=120, lr=2e-2)
    mlp = fresh("mlp", hidden=16)
    fit_mlp(mlp, coef.float(), fit, held, steps=150, lr=2e-2)
    r2 = {kind: chunks_r2(lambda x, v, m=m: m.predict(x, valid=v), held) for kind, m in (("relu", relu), ("mlp", mlp))}
    assert max(r2_linear) < 0.8, r2_linear
    for kind, values in r2.items():
        for head in range(HEADS):
            assert values[head] > r2_linear[head] + 0.15, (kind, values, r2_linear)
    assert info["stages"][0]["stage"] == "least_squares" and bool(relu.fitted) and bool(mlp.fitted)
    # what the operator runs is what was scored: forward(q, k) = predict(features(q, k))
    q, k = torch.randn(2, HEADS, 10, DIM), torch.randn(2, HEADS, 10, DIM)
    for m in (relu, mlp):
        torch.testing.assert_close(m(q, k, scale=0.3), m.predict(m.features(q, k, scale=0.3)), rtol=0, atol=0)


def test_mlp_early_stopping_never_ends_worse_than_the_linear_start():
    fit = synthetic(0, 3)
    held = [(x, torch.randn_like(t) * (v.float() if v is not None else 1), v) for x, t, v in synthetic(2, 2)]  # noise
    coef = solve_ridge(ridge(fit), ridge=1e-3)
    mlp = fresh("mlp", hidden=8)
    info = fit_mlp(mlp, coef.float(), fit, held, steps=60, lr=5e-2, eval_every=5, patience=3)
    (stage,) = info["stages"]
    assert all(a <= b for a, b in zip(stage["held_out_after"], stage["held_out_before"]))
    assert stage["steps_run"] < 60  # stopped early: nothing generalises to noise
    linear = fresh("linear")
    linear.set_coefficients(coef.float())
    worse = [h for h in range(HEADS) if stage["held_out_after"][h] == stage["held_out_before"][h]]
    for h in worse:  # a head that never improved keeps the linear map exactly
        assert torch.equal(mlp.w_out[h], torch.zeros_like(mlp.w_out[h])) and torch.equal(mlp.skip[h], coef[h].float())


@pytest.fixture(scope="module")
def relu_compiled():
    from .conftest import tiny_text_config
    from asap.models import TextClassifier

    torch.manual_seed(0)
    teacher = TextClassifier(tiny_text_config())
    with torch.no_grad():
        for block in teacher.blocks:
            block.attn.qkv.weight.mul_(4.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compiled, report = compile_model(teacher.eval(), make_batches(8), num_slices=4, map_kind="relu",
                                         map_options={"relu": {"depth": 3}}, map_steps=60, map_lr=0.05)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return teacher, compiled, report


def test_relu_networks_keep_exactly_2k_pieces_after_the_compile_fit(relu_compiled):
    _, compiled, report = relu_compiled
    ops = [m for m in compiled.modules() if isinstance(m, AsapOperator)]
    assert [type(op.dual_map).__name__ for op in ops] == ["ReluDualMap"] * 2
    grid = (torch.arange(2**16, dtype=torch.float64) + 0.5) / 2**16
    for op, layer in zip(ops, report["layers"]):
        refined = layer["map_fit"]["stages"][1]
        assert refined["stage"] == "refine_regression" and refined["kept"], refined
        sm = op.dual_map.slice_map
        initial = build_dual_map(num_heads=2, head_dim=8, num_slices=4, slice_type="random", seed=0, kind="relu",
                                 map_options={"depth": 3}).slice_map.peaks()  # fmt: skip
        assert float((sm.peaks() - initial).abs().max()) > 0.1, "the fit did not move the peaks: the test proves nothing"
        k = sm.depth
        for peaks in sm.peaks().double().reshape(-1, k + 1):
            out, pre = relu_network_forward(relu_network_layers(peaks), grid)
            assert pattern_regions(pre) == 2**k and linear_pieces(grid, out) == 2**k
        # the module's own evaluation on each network's whole input interval [lo, hi]
        phi = sm.lo.double()[None, :, :, None] + (sm.hi - sm.lo).double()[None, :, :, None] * grid
        basis = sm.slice_features(phi).reshape(-1, grid.numel())
        for y in basis:
            assert linear_pieces(grid, y) == 2**k


@pytest.mark.parametrize("kind, options", [("linear", {}), ("relu", {"depth": 2, "num_stacks": 1}), ("mlp", {"hidden": 4})])
def test_each_kind_compiles_saves_and_loads(tmp_path, teacher, batches, kind, options):
    compiled, report = compile_model(teacher, batches, num_slices=3, map_kind=kind, map_options={kind: options} if options else {},
                                     map_steps=20)  # fmt: skip
    ops = [m for m in compiled.modules() if isinstance(m, AsapOperator)]
    assert [op.dual_map.kind for op in ops] == [kind, kind] and all(bool(op.dual_map.fitted) for op in ops)
    assert report["options"]["map_kind"] == kind and report["layers"][0]["map"]["kind"] == kind
    if kind != "linear":
        assert report["options"]["map_options"][kind] == ops[0].dual_map.map_options and "map_fit" in report["layers"][0]
        assert all(-1 <= r <= 1 for r in report["layers"][0]["r2_held_out"])
    loaded, manifest = load_compiled(save_compiled(tmp_path / "a", compiled, report=report))
    assert manifest["compiled_layers"][0]["map"] == {"kind": kind, "options": ops[0].dual_map.map_options}
    batch = batches[-1]
    with torch.no_grad():
        expected = compiled(batch["input_ids"], padding_mask=batch["padding_mask"])
        torch.testing.assert_close(loaded(batch["input_ids"], padding_mask=batch["padding_mask"]), expected, rtol=0, atol=0)
    # the module artifact of the same model, into a fresh instance
    save_compiled_module(compiled, tmp_path / "m", report=report)
    entry = json.loads((tmp_path / "m" / "manifest.json").read_text())["operators"][0]
    assert entry["options"]["map_kind"] == kind and entry["options"].get("map_options", {}) == ops[0].dual_map.map_options
    fresh = load_compiled_module(type(teacher)(teacher.config).eval(), tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch["input_ids"], padding_mask=batch["padding_mask"]), expected, rtol=0, atol=0)


def test_compile_module_fits_a_kind_with_kl_refinement(teacher, batches):
    model, report = compile_module(teacher, batches, num_slices=3, map_kind="mlp", map_options={"mlp": {"hidden": 4}},
                                   map_steps=15, refine="kl", refine_iters=2)  # fmt: skip
    stages = [s["stage"] for s in report["layers"][0]["map_fit"]["stages"]]
    assert stages == ["adam_regression", "adam_kl"]
    assert all(type(m.dual_map).__name__ == "MlpDualMap" for m in model.modules() if isinstance(m, AsapOperator))


@pytest.mark.parametrize("options, match", [
    (dict(map_options={"relu": {"depth": 3}}), r"map_options for 'relu': map_kind 'linear' compiles only \['linear'\]"),
    (dict(map_kind="relu", map_options={"mlp": {"hidden": 3}}), r"map_options for 'mlp'"),
    (dict(map_kind="relu", map_options={"relu": {"hidden": 3}}), r"'relu' does not take option\(s\) \['hidden'\]"),
    (dict(map_kind="mlp", map_options={"mlp": {"hidden": 0}}), r"hidden must be an integer in \[1, 4096\]"),
    (dict(map_kind="spline"), "map_kind must be one of"),
    (dict(map_options={"spline": {}}), "unknown dual map kind 'spline'"),
    (dict(target_tv=0.0), r"target_tv must be a number in \(0, 1\]"),
    (dict(target_tv=float("nan")), "target_tv"),
    (dict(target_tv=0.1, map_kind="mlp"), "leave map_kind at 'linear'"),
    (dict(map_steps=0), "map_steps"),
    (dict(map_lr=-1.0), "map_lr"),
])  # fmt: skip
def test_options_that_do_not_belong_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        CompileOptions(**options)


def test_target_tv_options_take_every_candidate_kind():
    opts = CompileOptions(target_tv=0.05, map_options={"relu": {"depth": 2}, "mlp": {"hidden": 8}})
    assert opts.map_kinds == ("linear", "relu", "mlp")
    assert opts.map_options == {"relu": {"depth": 2, "num_stacks": 2}, "mlp": {"hidden": 8}}
    assert json.loads(json.dumps(opts.to_dict()))["target_tv"] == 0.05


def test_candidates_are_in_increasing_cost():
    candidates = target_tv_candidates()
    assert candidates == [("linear", 0), ("relu", 0), ("mlp", 0), ("linear", 1), ("relu", 1), ("mlp", 1),
                          ("linear", 2), ("relu", 2), ("mlp", 2)]  # fmt: skip
    costs = [candidate_cost(*c) for c in candidates]
    assert costs == sorted(costs) and len(set(costs)) == len(costs)
    assert candidate_cost("mlp", 0) < candidate_cost("linear", 1) and candidate_cost("linear", 0) == 2.0
    assert candidate_cost("linear", 0, extra_features=("qk_mean", "lse_keys")) == 3.0  # one more pass over the scores


def test_target_tv_takes_the_first_candidate_that_reaches_it(teacher, batches):
    _, unreachable = compile_model(teacher, batches, num_slices=2, extra_features=(), target_tv=1e-12, map_steps=15)
    tried = unreachable["layers"][0]["selection"]["candidates"]
    assert [(c["map"], c["extra_steps"]) for c in tried] == target_tv_candidates()  # none reached: all tried
    selection = unreachable["layers"][0]["selection"]
    lowest = min(tried, key=lambda c: (c["row_tv"], c["cost"]))
    assert not selection["reached"] and selection["chosen"]["row_tv"] == lowest["row_tv"]
    assert "no candidate reaches target 1e-12" in unreachable["selection"][0]
    # a target between the linear map's TV and the best one: the first candidate (by cost) at or below it
    linear = tried[0]["row_tv"]
    target = (linear + lowest["row_tv"]) / 2
    assert lowest["row_tv"] < linear, "no candidate beats the linear map here: the test would prove nothing"
    compiled, report = compile_model(teacher, batches, num_slices=2, extra_features=(), target_tv=target, map_steps=15)
    selection = report["layers"][0]["selection"]
    expected = next(c for c in tried if c["row_tv"] <= target)
    assert selection["reached"] and (selection["chosen"]["map"], selection["chosen"]["extra_steps"]) == (
        expected["map"], expected["extra_steps"])  # fmt: skip
    assert [c["row_tv"] for c in selection["candidates"]] == [c["row_tv"] for c in tried[: len(selection["candidates"])]]
    op = [m for m in compiled.modules() if isinstance(m, AsapOperator)][0]
    assert (op.dual_map.kind, op.extra_steps) == (expected["map"], expected["extra_steps"])
    # the report's figure for the layer is the TV the choice was made on
    assert sum(report["layers"][0]["row_tv_asap"]) / 2 == pytest.approx(selection["chosen"]["row_tv"], rel=1e-12)
