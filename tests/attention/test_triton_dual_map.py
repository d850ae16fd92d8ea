"""The one-kernel Triton dual map against the fp64 design-matrix reference and the fused PyTorch path.

Under Triton's CPU interpreter, as tests/attention/test_triton_kernels.py. The kernel is
uncentred and arbitrary up to a constant per (b, h); every comparison is centred over the
valid queries and made there. Shapes are small: the interpreter runs each program in NumPy.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

pytest.importorskip("triton", reason="the optional extra asap-attention[triton] is not installed")

# Triton reads TRITON_INTERPRET when @triton.jit decorates the kernels, i.e. at import.
_saved = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    from asap.attention import triton_kernels as tk

    if not tk.INTERPRET:  # imported earlier without the interpreter: build the kernels again
        tk = importlib.reload(tk)
    from asap.attention import triton_dual_map as td

    if not td.INTERPRET:
        td = importlib.reload(td)
finally:
    if _saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved

from asap.attention.dual_map import SliceDualMap, build_dual_map  # noqa: E402
from asap.transport.masks import key_padding_to_attn_mask  # noqa: E402
from asap.transport.sinkhorn import center  # noqa: E402
from tests.conftest import compile_without_interpreter  # noqa: E402

MOMENTS = ("qk_mean", "q_norm")
RTOL = 1e-5  # of the largest |f| of the reference: fp32 rounding of O(n) sums


def _map(*, heads=2, d=16, slices=4, extras=MOMENTS, slice_type="random") -> SliceDualMap:
    m = build_dual_map(num_heads=heads, head_dim=d, num_slices=slices, slice_type=slice_type, seed=3,
                       extra_features=extras)  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    m.set_coefficients(torch.randn(heads, m.num_features, generator=gen, dtype=torch.float64))
    return m


def _qk(b=2, h=2, n=17, d=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    return q.to(dtype), k.to(dtype)


def _valid(lengths, n):
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def _triton(m: SliceDualMap, q, k, *, scale, valid=None):
    """The kernel on the map's buffers (the moment coefficients the map has, None for the others)."""
    extra = {name: m.extra_coef[:, m.extra_features.index(name)] for name in m.extra_features}
    return td.slice_dual_map_triton(q, k, m.directions, m.coef, scale=scale, c_mean=extra.get("qk_mean"),
                                    c_norm=extra.get("q_norm"), valid=valid)  # fmt: skip


def _rows(valid, shape):
    return torch.ones(shape, dtype=torch.bool) if valid is None else valid[:, None, :].expand(shape)


def _reference(m: SliceDualMap, q, k, *, scale, valid=None):
    """fp64 ``predict(features(q, k))``, centred over valid queries (0 at padding)."""
    mask = None if valid is None else key_padding_to_attn_mask(valid)
    x = m.features(q.double(), k.double(), scale=scale, attn_mask=mask)
    return m.predict(x, valid=None if valid is None else valid[:, None, :])


def _centred(f, valid):
    return center(f.double(), valid=_rows(valid, f.shape))


def _check(m, q, k, *, scale, valid=None, rtol=RTOL):
    """Triton vs the fp64 reference and vs the fused PyTorch path, centred, at valid queries; returns f."""
    f = _triton(m, q, k, scale=scale, valid=valid)
    assert f.dtype == torch.float32 and f.shape == q.shape[:-1]
    rows = _rows(valid, f.shape)
    assert (f[~rows] == 0).all()  # padded queries: written as 0
    truth = _reference(m, q, k, scale=scale, valid=valid)
    tol = rtol * truth.abs().max().item() + 1e-7
    torch.testing.assert_close(_centred(f, valid)[rows], truth[rows], rtol=0, atol=tol)
    fused = m._forward_fused(q, k, scale=scale, valid=valid, center=False)
    torch.testing.assert_close(_centred(f, valid)[rows], _centred(fused, valid)[rows], rtol=0, atol=tol)
    return f


# Lengths of b = 4 rows of 17 tokens: full, several padded, a single valid token, most padded.
LENGTHS = [17, 11, 1, 4]


@pytest.mark.parametrize("extras", [(), ("qk_mean",), ("q_norm",), MOMENTS])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_fp64_reference_and_fused_path(extras, padded):
    m = _map(extras=extras)
    q, k = _qk(b=4)
    _check(m, q, k, scale=0.4, valid=_valid(LENGTHS, 17) if padded else None)


@pytest.mark.parametrize(("n", "d", "slices"), [(5, 16, 1), (17, 64, 16), (32, 32, 4)])
def test_lengths_head_sizes_and_slice_counts(n, d, slices):
    m = _map(d=d, slices=slices)
    q, k = _qk(n=n, d=d)
    _check(m, q, k, scale=d**-0.5, valid=_valid([n, max(1, n - 3)], n))


def test_long_rows_take_several_column_blocks():
    """n = 130 pads to BLOCK_N = 256 with 16-column blocks: the chunked sums and ragged last block."""
    assert td._launch_config(130, 16)["BLOCK_J"] < td._launch_config(130, 16)["BLOCK_N"]
    m = _map(heads=2, slices=2)
    q, k = _qk(b=2, h=2, n=130)
    _check(m, q, k, scale=0.25, valid=_valid([130, 77], 130))


def test_padding_anywhere_and_an_empty_row():
    """Left padding and holes are as good as right padding; a row without a valid token is all 0."""
    m = _map()
    q, k = _qk(b=3, n=9)
    valid = torch.tensor([[False, False, True, True, True, True, True, True, True],
                          [True, False, True, True, False, True, False, True, True],
                          [False] * 9])  # fmt: skip
    f = _check(m, q, k, scale=0.5, valid=valid)
    assert (f[2] == 0).all()


def test_padded_tokens_never_reach_valid_queries():
    """Whatever padded positions hold (here NaN) is masked out, not multiplied by 0."""
    m = _map()
    q, k = _qk(b=2)
    valid = _valid([17, 10], 17)
    clean = _triton(m, q, k, scale=0.4, valid=valid)
    q_nan, k_nan = q.clone(), k.clone()
    q_nan[1, :, 10:] = float("nan")
    k_nan[1, :, 10:] = float("nan")
    torch.testing.assert_close(_triton(m, q_nan, k_nan, scale=0.4, valid=valid), clean, rtol=0, atol=0)


def test_any_layout_is_read_in_place():
    """Transposed (b, n, h, d) storage, views sliced along d and n, k expanded over heads: same values, same f."""
    b, h, n, d = 2, 2, 17, 16
    m = _map(heads=h, d=d)
    valid = _valid([17, 12], n)
    gen = torch.Generator().manual_seed(2)
    q_bnhd = torch.randn(b, n, h, d, generator=gen)
    q_t = q_bnhd.transpose(1, 2)  # (b, h, n, d), strides of (b, n, h, d)
    k_wide = torch.randn(b, h, n + 4, 2 * d, generator=gen)
    k_sliced = k_wide[:, :, 2 : n + 2, ::2]  # sliced along n and d (d-stride 2)
    k_expanded = torch.randn(b, 1, n, d, generator=gen).expand(b, h, n, d)  # head stride 0
    for q, k in ((q_t, k_sliced), (k_sliced, k_expanded), (k_expanded, q_t)):
        f = _check(m, q, k, scale=0.3, valid=valid)
        torch.testing.assert_close(f, _triton(m, q.contiguous(), k.contiguous(), scale=0.3, valid=valid), rtol=0, atol=0)


def test_ties_do_not_matter():
    """Repeated queries and keys, and integer coordinates on axis slices (many equal projections)."""
    m = _map()
    q, k = _qk(b=2)
    q[:, :, 5] = q[:, :, 2]
    q[:, :, 9] = q[:, :, 2]
    k[:, :, 3] = k[:, :, 7]
    _check(m, q, k, scale=0.4, valid=_valid([17, 13], 17))
    axis = _map(slices=8, slice_type="axis")
    gen = torch.Generator().manual_seed(4)
    q_int, k_int = (torch.randint(-2, 3, (2, 2, 17, 16), generator=gen).float() for _ in range(2))
    _check(axis, q_int, k_int, scale=0.4, valid=_valid([17, 13], 17))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_rule(dtype):
    """Error vs fp64 (of the unrounded inputs) at most twice that of the fused PyTorch path on the same inputs."""
    m = _map(d=32)
    q64, k64 = _qk(b=2, n=24, d=32, dtype=torch.float64)
    valid = _valid([24, 15], 24)
    q, k = q64.to(dtype), k64.to(dtype)
    truth = _reference(m, q64, k64, scale=32**-0.5, valid=valid)
    rows = _rows(valid, truth.shape)
    fast = _centred(_triton(m, q, k, scale=32**-0.5, valid=valid), valid)
    plain = _centred(m._forward_fused(q, k, scale=32**-0.5, valid=valid, center=False), valid)
    fast_err = (fast - truth)[rows].abs().max()
    plain_err = (plain - truth)[rows].abs().max()
    assert plain_err > 0 and fast_err <= 2 * plain_err, (fast_err, plain_err)


class TestRefusals:
    def test_supports_says_yes_or_why_not(self, monkeypatch):
        q, k = _qk()
        assert td.supports_dual_map(q, k) is None
        assert td.supports_dual_map(q, k, _valid([17, 3], 17)) is None
        assert "longer than" in td.supports_dual_map(*_qk(b=1, h=1, n=td.MAX_N + 1))
        assert "head size" in td.supports_dual_map(*_qk(b=1, h=1, n=4, d=td.MAX_HEAD_DIM + 1))
        assert "self-attention" in td.supports_dual_map(q, k[:, :, :9])
        assert "inference-only" in td.supports_dual_map(q.clone().requires_grad_(), k)
        with torch.no_grad():
            assert td.supports_dual_map(q.clone().requires_grad_(), k) is None
        assert "fp64" in td.supports_dual_map(q.double(), k.double())
        assert "share a dtype" in td.supports_dual_map(q, k.half())
        assert "valid" in td.supports_dual_map(q, k, torch.ones(2, 16, dtype=torch.bool))
        assert "valid" in td.supports_dual_map(q, k, torch.ones(2, 17))
        assert "empty" in td.supports_dual_map(*_qk(b=0))
        monkeypatch.setattr(td, "INTERPRET", False)
        assert "TRITON_INTERPRET=1" in td.supports_dual_map(q, k)

    def test_errors_are_one_line(self):
        m = _map()
        q, k = _qk()
        with pytest.raises(ValueError, match="self-attention"):
            td.slice_dual_map_triton(q, k[:, :, :9], m.directions, m.coef, scale=0.4)
        with pytest.raises(ValueError, match="directions"):
            td.slice_dual_map_triton(q, k, m.directions[:, :, :8], m.coef, scale=0.4)
        with pytest.raises(ValueError, match="coef"):
            td.slice_dual_map_triton(q, k, m.directions, m.coef[:, :3], scale=0.4)
        with pytest.raises(ValueError, match="c_mean"):
            td.slice_dual_map_triton(q, k, m.directions, m.coef, scale=0.4, c_mean=m.coef)
        with pytest.raises(ValueError, match="scale"):
            td.slice_dual_map_triton(q, k, m.directions, m.coef, scale=0.0)


@pytest.mark.slow
def test_kernel_compiles_for_a_gpu_target(tmp_path):
    """Ahead-of-time compilation for sm_90 at the longest rows (no GPU needed): what the interpreter does not check."""
    code = (
        "import torch\n"
        "from asap.attention.triton_dual_map import compile_dual_map_for_target\n"
        "print(compile_dual_map_for_target(dtype=torch.bfloat16, n=256, head_dim=80))\n"
    )
    assert 0 <= int(compile_without_interpreter(tmp_path, code)) <= 227 * 1024
