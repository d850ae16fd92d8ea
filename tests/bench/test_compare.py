"""Side-by-side measurement helpers: rebuilt attention matrices and timings."""

from __future__ import annotations

import torch

from asap.attention.operators import AsapOperator, SinkhornOperator
from asap.attention.reference import asap_plan_reference, sinkhorn_plan_reference
from asap.bench.compare import attention_maps, operator_attention
from asap.compile import compile_model, truncate_sinkhorn
from tests.compile.conftest import _one_thread, batches, teacher  # noqa: F401 (the compile tests' fixtures)
from tests.conftest import padding_mask, rand_qkv


def test_operator_attention_matches_references():
    q, k, _ = rand_qkv(b=2, h=2, n=6, d=4)
    mask = padding_mask([6, 4], 6)
    sinkhorn = SinkhornOperator(n_iters=7, eps=0.5)
    expected = sinkhorn_plan_reference(q, k, n_iters=7, eps=0.5, attn_mask=mask)
    torch.testing.assert_close(operator_attention(sinkhorn, q, k, mask), expected)
    asap = AsapOperator(num_heads=2, head_dim=4, num_slices=3, eps=0.5).double()
    asap.dual_map.coef.normal_()
    f_hat = asap.dual_map(q, k, scale=0.5, attn_mask=mask)
    expected = asap_plan_reference(q, k, f_hat, eps=0.5, attn_mask=mask)
    torch.testing.assert_close(operator_attention(asap, q, k, mask), expected)


def test_maps_of_a_teacher_and_its_variants(teacher, batches):
    compiled, _ = compile_model(teacher, batches, num_slices=3)
    models = {"teacher": teacher, "k3": truncate_sinkhorn(teacher, n_iters=3), "asap": compiled}
    maps = attention_maps(models, batches[0], layer=0)
    # Layer 0 sees the same inputs in every model; all maps are row-stochastic over valid rows.
    rows = batches[0]["padding_mask"]
    for attn in maps.values():
        sums = attn.sum(-1)[:, 0]
        torch.testing.assert_close(sums[rows], torch.ones_like(sums[rows]))
    assert not torch.allclose(maps["teacher"], maps["k3"])
