"""Triangle-wave ReLU slice maps (Milkert, Hyde and Laine, arXiv 2311.18022): regions, convexity, fit, parity."""

from __future__ import annotations

import io
import math

import pytest
import torch

from asap.attention.relu_maps import (
    ReluSliceDualMap,
    fit_readout,
    merge_ranges,
    peaks_from_raw,
    raw_from_peaks,
    refine,
    relu_network_forward,
    relu_network_layers,
    scales_from_peaks,
    slice_range,
    triangle,
    triangle_network,
)

DEPTH = 5
# Midpoints of 2^16 cells: an open grid of (0, 1). The end points 0 and 1 (and any exact hit of a
# breakpoint) are single points where a pre-activation is exactly 0: patterns of measure zero.
GRID = (torch.arange(2**16, dtype=torch.float64) + 0.5) / 2**16
# Training moves peaks towards 0.05 / 0.95, which leaves pieces of ~3e-5: a finer grid resolves them.
FINE_GRID = (torch.arange(2**19, dtype=torch.float64) + 0.5) / 2**19


def pattern_regions(pre: torch.Tensor, *, atol: float = 1e-9) -> int:
    """Maximal runs of one activation pattern (``pre > 0``) along the (sorted) input line.

    Grid points with a pre-activation within ``atol`` of 0 lie numerically on a region
    boundary (e.g. a valley where ``z_i`` should be exactly 0 and rounds to -1e-17) and
    are dropped; that loses a region only if it is narrower than a grid cell.
    """
    constant = (pre == pre[:1]).all(dim=0)  # e.g. the running sum P_0 = 0 of layer 1: one pattern everywhere
    keep = ((pre.abs() > atol) | constant).all(dim=-1)
    patterns = pre[keep] > 0
    changed = (patterns[1:] != patterns[:-1]).any(dim=-1)
    return int(changed.sum()) + 1


def linear_pieces(x: torch.Tensor, y: torch.Tensor, *, atol: float = 1e-7) -> int:
    """Linear pieces of a sampled piecewise-linear function: runs of >= 2 grid intervals with one slope.

    An interval that straddles a kink has an in-between slope and belongs to no run,
    so each piece wider than two grid steps is counted exactly once.
    """
    slope = torch.diff(y) / torch.diff(x)
    same = torch.diff(slope).abs() <= atol * (1 + slope[1:].abs())
    starts = same[1:] & ~same[:-1]
    return int(starts.sum()) + int(same[0])


def all_peaks(dual_map: ReluSliceDualMap) -> list[torch.Tensor]:
    return list(dual_map.peaks().double().reshape(-1, dual_map.depth + 1))


def grid_map(*, depth: int = DEPTH, num_stacks: int = 2, heads: int = 2, slices: int = 3) -> ReluSliceDualMap:
    m = ReluSliceDualMap(num_heads=heads, num_slices=slices, num_features=0, depth=depth, num_stacks=num_stacks)
    m.set_input_range(torch.zeros(heads, slices), torch.ones(heads, slices), margin=0.0)
    return m


def random_data(*, heads: int, slices: int, n: int = 64, b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    phi = torch.rand(b, heads, slices, n, generator=g, dtype=torch.float64)
    target = torch.randn(b, heads, n, generator=g, dtype=torch.float64)
    return phi, target - target.mean(-1, keepdim=True)


def mse_objective(phi, feat, target, valid=None):
    def objective(predict):
        return ((predict(phi, feat, valid=valid) - target) ** 2).mean()

    return objective


# --------------------------------------------------------------------------- (a) exactly 2^k regions


def assert_exactly_2k(dual_map: ReluSliceDualMap, grid: torch.Tensor = GRID) -> None:
    k = dual_map.depth
    for peaks in all_peaks(dual_map):
        out, patterns = relu_network_forward(relu_network_layers(peaks), grid)
        assert pattern_regions(patterns) == 2**k
        assert linear_pieces(grid, out) == 2**k  # no two neighbouring regions share a slope
    # the module's batched path: every (head, slice, stack) function has 2^k pieces too
    phi = grid.expand(1, dual_map.num_heads, dual_map.num_slices, -1)
    basis = dual_map.slice_features(phi).reshape(-1, grid.numel())
    for y in basis:
        assert linear_pieces(grid, y) == 2**k


def test_exactly_2k_pieces_at_initialisation():
    dual_map = grid_map()
    assert_exactly_2k(dual_map)
    # the explicit ReLU network and the fast evaluation are the same function
    peaks = all_peaks(dual_map)[1]
    out, _ = relu_network_forward(relu_network_layers(peaks), GRID)
    torch.testing.assert_close(out, triangle_network(GRID, peaks), rtol=0, atol=1e-13)


def test_exactly_2k_pieces_after_training_on_random_data():
    dual_map = grid_map(heads=1, slices=3)
    phi, target = random_data(heads=1, slices=3)
    fit_readout(dual_map, [(phi, None, target, None)])
    before = dual_map.peaks().clone()
    info = refine(dual_map, mse_objective(phi, None, target), steps=40, lr=0.1)
    assert info["kept"] and info["after"] < info["before"]
    moved = (dual_map.peaks() - before).abs().max()
    assert moved > 0.2, "training did not move the peaks: the test would prove nothing"
    assert_exactly_2k(dual_map, FINE_GRID)


def test_unrestricted_network_of_the_same_shape_has_fewer_regions():
    """Control: the count has teeth. Random weights in the same width-3, depth-k layout do not reach 2^k."""
    template = relu_network_layers(torch.full((DEPTH + 1,), 0.5, dtype=torch.float64))
    x = -4 + 8 * (torch.arange(2**17, dtype=torch.float64) + 0.5) / 2**17
    counts = []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        layers = [(torch.randn(w.shape, generator=g, dtype=torch.float64), torch.randn(b.shape, generator=g, dtype=torch.float64))
                  for w, b in template]  # fmt: skip
        _, patterns = relu_network_forward(layers, x)
        counts.append(pattern_regions(patterns))
    assert max(counts) < 2**DEPTH, counts  # seeds 0-19 reach 3 to 14 regions on [-4, 4]


def test_breaking_the_restriction_changes_the_count():
    peaks = torch.full((DEPTH + 1,), 0.5, dtype=torch.float64)
    broken = peaks.clone()
    broken[1] = 1.4  # a peak outside (0, 1): the second triangle no longer maps onto [0, 1]
    out, patterns = relu_network_forward(relu_network_layers(broken), GRID)
    assert pattern_regions(patterns) != 2**DEPTH
    assert linear_pieces(GRID, out) != 2**DEPTH


def test_peaks_stay_inside_the_unit_interval_for_any_raw_value():
    raw = torch.tensor([-1e4, -50.0, 0.0, 50.0, 1e4])
    a = peaks_from_raw(raw)
    assert bool(((a > 0) & (a < 1)).all()) and bool((a * (1 - a) > 0).all())
    torch.testing.assert_close(peaks_from_raw(raw_from_peaks(torch.tensor([0.2, 0.5, 0.9]))), torch.tensor([0.2, 0.5, 0.9]))


# --------------------------------------------------------------------------- (b) convexity, manifold


def test_initialisation_is_the_x_squared_interpolant():
    peaks = torch.full((DEPTH + 1,), 0.5, dtype=torch.float64)
    torch.testing.assert_close(scales_from_peaks(peaks), 4.0 ** -torch.arange(1, DEPTH + 1, dtype=torch.float64))
    nodes = torch.arange(2**DEPTH + 1, dtype=torch.float64) / 2**DEPTH
    torch.testing.assert_close(nodes + triangle_network(nodes, peaks), nodes**2, rtol=0, atol=1e-15)


def test_scales_follow_the_recursion():
    a = torch.tensor([0.3, 0.6, 0.2, 0.7, 0.45], dtype=torch.float64)
    s = scales_from_peaks(a)
    assert s[0] == a[0] * a[1]
    for i in range(len(s) - 1):  # 0-based: s_{i+1} = s_i (1 - a_{i+1}) a_{i+2}
        torch.testing.assert_close(s[i + 1], s[i] * (1 - a[i + 1]) * a[i + 2])


def second_differences(y: torch.Tensor) -> torch.Tensor:
    return y[2:] - 2 * y[1:-1] + y[:-2]


def test_convex_for_random_and_trained_peaks():
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        peaks = 0.05 + 0.9 * torch.rand(DEPTH + 1, generator=g, dtype=torch.float64)
        assert second_differences(triangle_network(GRID, peaks)).min() >= -1e-13
    dual_map = grid_map(num_stacks=1)
    phi, target = random_data(heads=2, slices=3, seed=3)
    fit_readout(dual_map, [(phi, None, target, None)])
    refine(dual_map, mse_objective(phi, None, target), steps=30, lr=0.1)
    basis = dual_map.slice_features(GRID.expand(1, 2, 3, -1)).reshape(-1, GRID.numel())
    assert second_differences(basis.T).min() >= -1e-13


def test_off_the_scaling_law_the_network_is_not_convex():
    """Control for the convexity test: the same triangles with a scale off the law give a concave kink."""
    peaks = torch.full((DEPTH + 1,), 0.5, dtype=torch.float64)
    s = scales_from_peaks(peaks).clone()
    s[1] *= 3  # level 2 now outweighs level 1 at the first breakpoint
    z, out = GRID, torch.zeros_like(GRID)
    for i in range(DEPTH):
        z = triangle(z, peaks[i])
        out = out - s[i] * z
    assert second_differences(out).min() < -1e-6


# --------------------------------------------------------------------------- (c) fitting 1-D targets


def one_slice_problem(fn, *, n: int = 2000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = -1 + 3 * torch.rand(1, 1, 1, n, generator=g, dtype=torch.float64)
    phi = x - x.mean(-1, keepdim=True)
    target = fn(x)[:, :, 0]
    return phi, phi.clone(), target - target.mean(-1, keepdim=True)


def fitted_rss(fn, *, num_stacks: int, refine_steps: int = 0):
    phi, feat, target = one_slice_problem(fn)
    m = ReluSliceDualMap(num_heads=1, num_slices=1, num_features=1, depth=DEPTH, num_stacks=num_stacks)
    m.set_input_range(*slice_range(phi))
    info = fit_readout(m, [(phi, feat, target, None)])
    if refine_steps:
        before = info["rss"][0]
        out = refine(m, mse_objective(phi, feat, target), steps=refine_steps, lr=0.05)
        assert out["kept"] and out["after"] < out["before"]
        info = fit_readout(m, [(phi, feat, target, None)])  # re-solve the readout at the trained peaks
        assert info["rss"][0] < before
    pred = m(phi, feat)
    return float(((pred - target) ** 2).sum()), info


def linear_rss(fn) -> float:
    phi, _, target = one_slice_problem(fn)
    coef = (phi * target[:, :, None]).sum() / (phi * phi).sum()
    return float(((coef * phi[:, :, 0] - target) ** 2).sum())


@pytest.mark.parametrize("name, fn, stacks, steps, factor", [
    ("x^2", lambda x: x**2, 1, 0, 1e-4),
    ("|x|", lambda x: x.abs(), 1, 150, 1e-2),
    ("sin", lambda x: torch.sin(2 * x), 2, 300, 1e-2),  # two inflections on [-1, 2]: needs the DC form
])  # fmt: skip
def test_fit_matches_1d_targets_better_than_linear(name, fn, stacks, steps, factor):
    rss, info = fitted_rss(fn, num_stacks=stacks, refine_steps=steps)
    torch.testing.assert_close(torch.tensor(rss), torch.tensor(info["rss"][0]), rtol=1e-6, atol=1e-9)
    assert rss < factor * linear_rss(fn), (name, rss, linear_rss(fn))


def test_non_convex_extension_beats_a_single_convex_stack_on_a_sine():
    """A signed single stack is convex or concave per slice; a sine with two inflections needs the DC form."""
    convex, _ = fitted_rss(lambda x: torch.sin(2 * x), num_stacks=1, refine_steps=300)
    dc, _ = fitted_rss(lambda x: torch.sin(2 * x), num_stacks=2, refine_steps=300)
    assert dc < 0.1 * convex


def test_refine_lbfgs_reduces_the_objective_and_rejects_a_worse_point():
    phi, feat, target = one_slice_problem(lambda x: x.abs())
    m = ReluSliceDualMap(num_heads=1, num_slices=1, num_features=1, depth=4)
    m.set_input_range(*slice_range(phi))
    fit_readout(m, [(phi, feat, target, None)])
    out = refine(m, mse_objective(phi, feat, target), steps=40, optimizer="lbfgs")
    assert out["kept"] and out["after"] < out["before"]
    state = {k: v.clone() for k, v in m.state_dict().items()}
    # a held-out objective that any change makes worse: the map must stay as it was
    anchor = m(phi, feat).detach()
    out = refine(m, mse_objective(phi, feat, target), steps=5, held_out=lambda p: ((p(phi, feat) - anchor) ** 2).sum())
    assert not out["kept"]
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k])


# --------------------------------------------------------------------------- (d) state dict, (e) parity


def random_fitted_map(seed: int = 0, *, heads: int = 3, slices: int = 4, features: int = 2, stacks: int = 2):
    g = torch.Generator().manual_seed(seed)
    m = ReluSliceDualMap(num_heads=heads, num_slices=slices, num_features=features, depth=4, num_stacks=stacks)
    with torch.no_grad():
        m.raw_peaks.copy_(torch.randn(m.raw_peaks.shape, generator=g))
        m.coef.copy_(torch.randn(m.coef.shape, generator=g))
    m.set_input_range(-torch.rand(heads, slices, generator=g), torch.rand(heads, slices, generator=g))
    return m


def test_state_dict_round_trip():
    m = random_fitted_map()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    fresh = ReluSliceDualMap(num_heads=3, num_slices=4, num_features=2, depth=4, num_stacks=2)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert set(m.state_dict()) == {"raw_peaks", "lo", "hi", "coef", "range_set", "fitted"}
    g = torch.Generator().manual_seed(5)
    phi, feat = torch.randn(2, 3, 4, 10, generator=g), torch.randn(2, 3, 2, 10, generator=g)
    assert torch.equal(m(phi, feat), fresh(phi, feat))


def reference_fp64(m: ReluSliceDualMap, phi, feat, valid=None):
    """Independent fp64 oracle: the explicit ReLU networks, one (head, slice, stack) at a time."""
    b, h, L, n = phi.shape
    phi, feat = phi.double(), feat.double()
    w = torch.ones(b, h, n, dtype=torch.float64) if valid is None else valid.double().expand(b, h, n)
    peaks = peaks_from_raw(m.raw_peaks.double())  # the fp64 path maps the raw peaks in fp64
    cols = []
    for l in range(L):
        for s in range(m.num_stacks):
            col = torch.empty(b, h, n, dtype=torch.float64)
            for head in range(h):
                lo, hi = m.lo[head, l].double(), m.hi[head, l].double()
                u = ((phi[:, head, l] - lo) / (hi - lo)).clamp(0, 1)
                out, _ = relu_network_forward(relu_network_layers(peaks[head, l, s]), u.reshape(-1))
                col[:, head] = out.reshape(b, n)
            cols.append(col)
    design = torch.stack(cols + [feat[:, :, f] for f in range(feat.shape[2])], dim=2)
    mean = (design * w[:, :, None]).sum(-1, keepdim=True) / w[:, :, None].sum(-1, keepdim=True)
    design = (design - mean) * w[:, :, None]
    return torch.einsum("bhcn,hc->bhn", design, m.coef.double())


def test_fp32_forward_matches_fp64_reference():
    m = random_fitted_map(1)
    g = torch.Generator().manual_seed(2)
    phi64 = torch.randn(2, 3, 4, 16, generator=g, dtype=torch.float64) * 0.7
    feat64 = torch.randn(2, 3, 2, 16, generator=g, dtype=torch.float64)
    ref = reference_fp64(m, phi64, feat64)
    out64 = m(phi64, feat64)
    out32 = m(phi64.float(), feat64.float())
    assert out64.dtype == torch.float64 and out32.dtype == torch.float32
    torch.testing.assert_close(out64, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(out32.double(), ref, rtol=0, atol=2e-5 * float(ref.abs().max()))


def test_strided_expanded_and_low_precision_inputs():
    m = random_fitted_map(2)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 3, 16, 4, generator=g)  # token-major storage: phi is a transposed view
    phi = base.transpose(-1, -2)
    feat = torch.randn(1, 3, 2, 16, generator=g).expand(2, -1, -1, -1)
    assert not phi.is_contiguous()
    torch.testing.assert_close(m(phi, feat), m(phi.contiguous(), feat.contiguous()), rtol=0, atol=0)
    ref = reference_fp64(m, phi, feat)
    # bf16 inputs are computed in fp32: the error is that of rounding the inputs, at most ~twice plain bf16's
    phi16, feat16 = phi.bfloat16(), feat.bfloat16()
    out16 = m(phi16, feat16)
    assert out16.dtype == torch.float32
    own = (out16.double() - ref).abs().max()
    plain = (reference_fp64(m, phi16.float(), feat16.float()) - ref).abs().max()  # input rounding alone
    assert own <= 2 * plain + 1e-5


def test_padding_is_zero_and_valid_queries_are_centred():
    m = random_fitted_map(3)
    g = torch.Generator().manual_seed(4)
    phi = torch.randn(2, 3, 4, 12, generator=g, dtype=torch.float64)
    feat = torch.randn(2, 3, 2, 12, generator=g, dtype=torch.float64)
    valid = torch.ones(2, 1, 12, dtype=torch.bool)
    valid[1, :, 7:] = False
    out = m(phi, feat, valid=valid)
    assert torch.equal(out[1, :, 7:], torch.zeros_like(out[1, :, 7:]))
    torch.testing.assert_close(out[1, :, :7].sum(-1), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, reference_fp64(m, phi, feat, valid), rtol=0, atol=1e-12)
    # the valid queries do not see the padding values
    phi2 = phi.clone()
    phi2[1, :, :, 7:] = 100.0
    torch.testing.assert_close(m(phi2, feat, valid=valid), out, rtol=0, atol=0)


# --------------------------------------------------------------------------- input range and errors


def test_input_range_covers_the_calibration_potentials():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(3, 2, 4, 20, generator=g), 5 + torch.randn(2, 2, 4, 20, generator=g)
    valid = torch.ones(3, 1, 20, dtype=torch.bool)
    valid[:, :, 15:] = False
    a[:, :, :, 15:] = 1e6  # padding must not enter the range
    lo, hi = merge_ranges(slice_range(a, valid=valid), slice_range(b))
    torch.testing.assert_close(lo, torch.minimum(a[..., :15].amin(dim=(0, 3)), b.amin(dim=(0, 3))).double())
    m = ReluSliceDualMap(num_heads=2, num_slices=4, num_features=0, depth=3)
    m.set_input_range(lo, hi, margin=0.1)
    for phi in (a[..., :15], b):
        u = (phi - m.lo[..., None]) / (m.hi - m.lo)[..., None]
        assert bool((u > 0.05).all() & (u < 0.95).all())
    # constant potentials: a non-degenerate interval, finite features
    m.set_input_range(torch.ones(2, 4), torch.ones(2, 4))
    assert bool((m.hi > m.lo).all()) and bool(torch.isfinite(m(torch.ones(1, 2, 4, 3))).all())


def test_bad_input_is_a_clear_error():
    m = ReluSliceDualMap(num_heads=2, num_slices=3, num_features=1, depth=3)
    with pytest.raises(ValueError, match="phi must be"):
        m(torch.zeros(1, 2, 4, 5), torch.zeros(1, 2, 1, 5))
    with pytest.raises(ValueError, match="linear features"):
        m(torch.zeros(1, 2, 3, 5))
    with pytest.raises(ValueError, match="finite"):
        m.set_input_range(torch.full((2, 3), math.inf), torch.full((2, 3), math.inf))
    with pytest.raises(ValueError, match="depth"):
        ReluSliceDualMap(num_heads=1, num_slices=1, num_features=0, depth=0)
    with pytest.raises(ValueError, match="optimizer"):
        refine(m, lambda p: torch.zeros(()), optimizer="sgd")
    with pytest.raises(ValueError, match="no valid calibration token"):
        fit_readout(m, [(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 4), torch.zeros(1, 1, 4, dtype=torch.bool))])
