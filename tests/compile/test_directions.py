"""Learned slice directions (refine="directions"): gradients through the 1-D potentials, the fit, the artifact."""

from __future__ import annotations

import copy

import pytest
import torch

from asap.attention.dual_map import make_directions
from asap.attention.operators import AsapOperator
from asap.compile import compile_model, load_compiled_module, save_compiled_module
from asap.compile.directions import _unit, direction_problems, fit_directions, mean_direction_kl
from tests.conftest import padding_mask, rand_qkv


def _problems(*, seed, lengths=None, n=10, h=2, d=6, num_slices=3):
    """Chunks of a sharp synthetic K = 11 teacher, with no extra features (the map is the slice potentials)."""
    torch.manual_seed(seed)
    chunks = []
    for _ in range(2):
        q, k, _ = rand_qkv(b=3, h=h, n=n, d=d, scale=1.5)
        chunks.append((q, k, None if lengths is None else padding_mask(lengths, n)))

    def features(q, k, mask):
        from asap.attention.dual_map import slice_potentials

        dirs = make_directions(num_heads=h, head_dim=d, num_slices=num_slices, slice_type="random", seed=0)
        return slice_potentials(q, k, dirs.double(), scale=1.0, attn_mask=mask)

    return direction_problems(chunks, features, num_slices=num_slices, scale=1.0, n_iters=11, eps=1.0)


@pytest.mark.parametrize("lengths", [None, [10, 7, 4]])
def test_the_row_kl_is_differentiable_in_the_directions(lengths):
    """Autograd through projection, sort and potentials agrees with a central finite difference (fp64)."""
    problems = _problems(seed=0, lengths=lengths)
    torch.manual_seed(1)
    raw = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    coef = torch.randn(2, 3, dtype=torch.float64)
    loss = lambda r: mean_direction_kl(problems, _unit(r), coef, scale=1.0, eps=1.0).sum()  # noqa: E731
    (grad,) = torch.autograd.grad(loss(raw), raw)
    assert grad.abs().max() > 0
    step = torch.randn_like(raw)
    h = 1e-6
    with torch.no_grad():
        numeric = (loss(raw + h * step) - loss(raw - h * step)) / (2 * h)
    torch.testing.assert_close((grad * step).sum(), numeric, rtol=1e-4, atol=1e-8)


def test_the_fit_lowers_the_kl_and_never_keeps_a_worse_head():
    train, held = _problems(seed=0), _problems(seed=5)
    start = make_directions(num_heads=2, head_dim=6, num_slices=3, slice_type="random", seed=0).double()
    coef = torch.zeros(2, 3, dtype=torch.float64)
    directions, fitted, info = fit_directions(start, coef, train, held, scale=1.0, eps=1.0, steps=60, lr=5e-2)
    before, after = info["kl_random_directions"], info["kl_learned_directions"]
    assert all(a <= b for a, b in zip(after, before)) and any(a < 0.9 * b for a, b in zip(after, before))
    torch.testing.assert_close(directions.norm(dim=-1), torch.ones(2, 3, dtype=torch.float64))
    for head, kept in enumerate(info["learned_kept"]):
        if not kept:  # a head that did not improve keeps its random directions and its coefficients
            torch.testing.assert_close(directions[head], start[head])
            torch.testing.assert_close(fitted[head], coef[head])


def test_learned_directions_travel_with_the_compiled_model(teacher, batches, tmp_path):
    compiled, report = compile_model(teacher, batches, num_slices=4, refine="directions", map_steps=30)
    layer = report["layers"][0]
    assert set(layer["refine"]) == {"kl_random_directions", "kl_learned_directions", "learned_kept", "steps", "lr"}
    assert len(layer["r2_held_out"]) == layer["num_heads"]
    ops = [m for m in compiled.modules() if isinstance(m, AsapOperator)]
    random = make_directions(num_heads=layer["num_heads"], head_dim=layer["head_dim"], num_slices=4,
                             slice_type="random", seed=layer["seed"])  # fmt: skip
    moved = [not torch.allclose(ops[0].dual_map.directions[h], random[h]) for h in range(layer["num_heads"])]
    assert moved == layer["refine"]["learned_kept"]
    # the artifact of any module carries them: a fresh copy of the teacher loads the learned directions
    save_compiled_module(compiled, tmp_path / "compiled")
    reloaded = load_compiled_module(copy.deepcopy(teacher), tmp_path / "compiled")
    again = [m for m in reloaded.modules() if isinstance(m, AsapOperator)]
    torch.testing.assert_close(again[0].dual_map.directions, ops[0].dual_map.directions)
    torch.testing.assert_close(again[1].dual_map.directions, ops[1].dual_map.directions)
