"""The dual-map family (issue 11 item 1): one interface for "linear", "relu" and "mlp".

Each kind: its options refused where they do not belong, its buffers save and
load, fp32 forward equal to an independent fp64 reference, the padding-mask
path equal to the 4-D mask path, ``set_coefficients`` giving exactly the linear
map, and operators rebuilt from their typed options. On a CUDA machine, the
forward passes run with ``set_sync_debug_mode("error")`` (no host sync).
"""

from __future__ import annotations

import io
import json

import pytest
import torch

from asap.attention import AsapOperator, build_operator
from asap.attention.dual_map import DUAL_MAPS, DualMap, SliceDualMap, build_dual_map
from asap.attention.module import AttentionConfig, operator_config
from asap.attention.nonlinear_maps import MlpDualMap, ReluDualMap
from asap.attention.options import AsapOptions
from asap.attention.relu_maps import peaks_from_raw, relu_network_forward, relu_network_layers
from asap.transport.masks import key_padding_to_attn_mask

KINDS = ("linear", "relu", "mlp")
SMALL = {"linear": {}, "relu": {"depth": 3, "num_stacks": 2}, "mlp": {"hidden": 6}}


def randomised(kind: str, *, heads: int = 2, d: int = 5, slices: int = 4, extras=("qk_mean", "q_norm"), seed: int = 3):
    """A map of ``kind`` with every trained tensor random (as if fitted), fp32."""
    m = build_dual_map(num_heads=heads, head_dim=d, num_slices=slices, slice_type="random", seed=seed,
                       extra_features=extras, kind=kind, map_options=SMALL[kind])  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    m.set_coefficients(torch.randn(heads, m.num_features, generator=g) * 0.5)
    with torch.no_grad():
        if kind == "relu":
            sm = m.slice_map
            sm.raw_peaks.copy_(torch.randn(sm.raw_peaks.shape, generator=g))
            sm.coef.copy_(torch.randn(sm.coef.shape, generator=g))
            sm.set_input_range(-torch.rand(heads, slices, generator=g) - 0.5, torch.rand(heads, slices, generator=g) + 0.5)
        if kind == "mlp":
            m.w_out.copy_(torch.randn(m.w_out.shape, generator=g))
            m.b_in.copy_(torch.randn(m.b_in.shape, generator=g))
            m.set_input_scale(0.5 + torch.rand(heads, m.num_features, generator=g))
    return m


def reference_fp64(m: DualMap, q, k, *, scale, valid=None):
    """``f_hat`` in fp64 from plain code: the fp64 features, then the kind's map spelled out token by token."""
    attn_mask = None if valid is None else key_padding_to_attn_mask(valid)
    x = DualMap.features(m, q.double(), k.double(), scale=scale, attn_mask=attn_mask).double()
    b, h, F, n = x.shape
    rows = torch.ones(b, h, n, dtype=torch.bool) if valid is None else valid[:, None, :].expand(b, h, n)
    out = torch.zeros(b, h, n, dtype=torch.float64)
    for head in range(h):
        xh = x[:, head].permute(0, 2, 1)  # (b, n, F)
        if m.kind == "linear":
            f = xh @ m.coefficients()[head].double()
        elif m.kind == "mlp":
            z = xh * m.in_scale[head].double()
            hidden = torch.relu(z @ m.w_in[head].double().T + m.b_in[head].double())
            f = xh @ m.skip[head].double() + hidden @ m.w_out[head].double()
        else:
            sm, L, M = m.slice_map, m.num_slices, m.num_stacks
            peaks = peaks_from_raw(sm.raw_peaks.double())
            cols = []
            for slice_ in range(L):
                lo, hi = sm.lo[head, slice_].double(), sm.hi[head, slice_].double()
                u = ((xh[..., slice_] - lo) / (hi - lo)).clamp(0, 1)
                for stack in range(M):
                    value, _ = relu_network_forward(relu_network_layers(peaks[head, slice_, stack]), u.reshape(-1))
                    cols.append(value.reshape(u.shape))
            design = torch.cat([torch.stack(cols, -1), xh], dim=-1)  # (b, n, L M + F)
            w = rows[:, head].double().unsqueeze(-1)
            design = (design - (design * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)) * w
            f = design @ sm.coef[head].double()
        out[:, head] = f
    w = rows.double()
    return (out - (out * w).sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp(min=1)) * w


def qk(b=3, h=2, n=9, d=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g, dtype=dtype), torch.randn(b, h, n, d, generator=g, dtype=dtype))


def test_the_registry_holds_the_three_kinds():
    assert DUAL_MAPS["linear"] is SliceDualMap and DUAL_MAPS["relu"] is ReluDualMap and DUAL_MAPS["mlp"] is MlpDualMap
    for kind in KINDS:
        assert issubclass(DUAL_MAPS[kind], DualMap) and DUAL_MAPS[kind].kind == kind
    assert ReluDualMap.check_options() == {"depth": 4, "num_stacks": 2}
    assert MlpDualMap.check_options({"hidden": 8}) == {"hidden": 8}


@pytest.mark.parametrize("kind, bad, match", [
    ("linear", {"depth": 3}, r"'linear' does not take option\(s\) \['depth'\]"),
    ("linear", {"hidden": 3}, r"'linear' does not take option\(s\) \['hidden'\]"),
    ("relu", {"hidden": 8}, r"'relu' does not take option\(s\) \['hidden'\]; its options are \['depth', 'num_stacks'\]"),
    ("mlp", {"depth": 2}, r"'mlp' does not take option\(s\) \['depth'\]; its options are \['hidden'\]"),
    ("relu", {"depth": 0}, r"depth must be an integer in \[1, 16\]"),
    ("relu", {"depth": 2.5}, r"depth must be an integer"),
    ("mlp", {"hidden": True}, r"hidden must be an integer"),
])  # fmt: skip
def test_options_a_kind_does_not_take_are_refused_everywhere(kind, bad, match):
    with pytest.raises(ValueError, match=match):
        AsapOptions(map_kind=kind, map_options=bad)
    with pytest.raises(ValueError, match=match):
        AsapOperator(num_heads=1, head_dim=4, num_slices=2, map_kind=kind, map_options=bad)
    with pytest.raises(ValueError, match=match):
        build_dual_map(num_heads=1, head_dim=4, num_slices=2, slice_type="random", seed=0, kind=kind, map_options=bad)
    with pytest.raises(TypeError, match="does not take option"):  # flat kind options are not operator options
        build_operator("asap", num_heads=1, head_dim=4, map_kind=kind, **bad)


def test_options_json_round_trip_and_defaults():
    opts = AsapOptions(map_kind="relu", map_options={"depth": 3})
    assert opts.map_options == {"depth": 3, "num_stacks": 2}
    again = AsapOptions.from_dict(json.loads(json.dumps(opts.to_dict())))
    assert again == opts and hash(again) == hash(opts)
    assert "map_options" not in AsapOptions().to_dict()  # a linear operator's record is unchanged
    assert AsapOptions(map_kind="mlp").to_dict()["map_options"] == {"hidden": 32}


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind):
    m = randomised(kind)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    fresh = build_dual_map(num_heads=2, head_dim=5, num_slices=4, slice_type="random", seed=3,
                           extra_features=("qk_mean", "q_norm"), kind=kind, map_options=SMALL[kind])  # fmt: skip
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())), strict=True)
    assert bool(fresh.fitted)
    expected = {"directions", "seed", "fitted"}
    expected |= {"linear": {"coef", "extra_coef"}, "mlp": {"skip", "in_scale", "w_in", "b_in", "w_out"},
                 "relu": {f"slice_map.{n}" for n in ("raw_peaks", "lo", "hi", "coef", "range_set", "fitted")}}[kind]  # fmt: skip
    assert set(m.state_dict()) == expected
    assert all(not t.is_floating_point() or t.dtype == torch.float32 for t in m.state_dict().values())
    q, k = qk()
    valid = torch.tensor([[True] * 9, [True] * 6 + [False] * 3, [True] * 2 + [False] * 7])
    assert torch.equal(fresh(q, k, scale=0.5, padding_mask=valid), m(q, k, scale=0.5, padding_mask=valid))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padded", [False, True])
def test_forward_matches_the_fp64_reference(kind, padded):
    m = randomised(kind)
    q, k = qk(dtype=torch.float64)
    valid = torch.tensor([[True] * 9, [True] * 6 + [False] * 3, [True] * 2 + [False] * 7]) if padded else None
    ref = reference_fp64(m, q, k, scale=0.5, valid=valid)
    out64 = m.double()(q, k, scale=0.5, padding_mask=valid)
    m = m.float()
    out32 = m(q.float(), k.float(), scale=0.5, padding_mask=valid)
    assert out64.dtype == torch.float64 and out32.dtype == torch.float32
    torch.testing.assert_close(out64, ref, rtol=0, atol=1e-11)
    torch.testing.assert_close(out32.double(), ref, rtol=0, atol=2e-5 * (1 + float(ref.abs().max())))
    # the 4-D mask and the (b, n) token mask are the same problem; bf16 inputs are computed in fp32
    if padded:
        mask = key_padding_to_attn_mask(valid)
        torch.testing.assert_close(m(q.float(), k.float(), scale=0.5, attn_mask=mask), out32, rtol=0, atol=1e-6)
    assert m(q.bfloat16(), k.bfloat16(), scale=0.5, padding_mask=valid).dtype == torch.float32


@pytest.mark.parametrize("kind", ["relu", "mlp"])
def test_set_coefficients_gives_exactly_the_linear_map(kind):
    linear = build_dual_map(num_heads=2, head_dim=5, num_slices=4, slice_type="random", seed=3, extra_features=("qk_mean",))
    rich = build_dual_map(num_heads=2, head_dim=5, num_slices=4, slice_type="random", seed=3, extra_features=("qk_mean",),
                          kind=kind, map_options=SMALL[kind])  # fmt: skip
    coef = torch.randn(2, 5)
    linear.set_coefficients(coef)
    rich.set_coefficients(coef)
    assert torch.equal(rich.directions, linear.directions)
    q, k = qk()
    valid = torch.tensor([[True] * 9, [True] * 4 + [False] * 5, [True] * 9])
    torch.testing.assert_close(rich(q, k, scale=0.4, padding_mask=valid), linear(q, k, scale=0.4, padding_mask=valid),
                               rtol=0, atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="coefficients of shape"):
        rich.set_coefficients(torch.zeros(2, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_operator_rebuilds_from_its_options(kind):
    m = randomised(kind, heads=2, d=4)
    op = AsapOperator(num_heads=2, head_dim=4, eps=0.7, dual_map=m, extra_steps=1)
    assert op.options.map_kind == kind and op.options.map_options == m.map_options
    config = AttentionConfig.from_dict(json.loads(json.dumps(operator_config(op).to_dict())))
    rebuilt = build_operator(config.method, num_heads=2, head_dim=4, **config.options)
    assert type(rebuilt.dual_map) is type(m) and rebuilt.dual_map.map_options == m.map_options
    rebuilt.load_state_dict(op.state_dict(), strict=True)
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    pad = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(q, k, v, padding_mask=pad), op(q, k, v, padding_mask=pad), rtol=0, atol=0)
        assert torch.isfinite(op(q, k, v)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync check needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_no_host_sync_in_the_operator_forward(kind):
    op = AsapOperator(num_heads=2, head_dim=8, dual_map=randomised(kind, heads=2, d=8)).cuda()
    q, k, v = (torch.randn(3, 2, 33, 8, device="cuda") for _ in range(3))
    pad = torch.arange(33, device="cuda")[None] < torch.tensor([33, 20, 5], device="cuda")[:, None]
    op(q, k, v, padding_mask=pad)  # the one-time fitted check reads the flag (a sync) on the first call
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            op(q, k, v, padding_mask=pad)
            op(q, k, v)
            op.dual_map(q, k, scale=0.3, attn_mask=key_padding_to_attn_mask(pad))
    finally:
        torch.cuda.set_sync_debug_mode("default")
