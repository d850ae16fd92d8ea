from __future__ import annotations

import math

import pytest
import torch

from asap.transport import key_padding_to_attn_mask, support, valid_rows_cols


def test_valid_rows_and_cols():
    mask = torch.tensor([[True, False, True], [False, False, False]])
    rows, cols = valid_rows_cols(mask, 2, 3)
    assert rows.tolist() == [True, False]
    assert cols.tolist() == [True, False, True]
    assert valid_rows_cols(None, 2, 3) == (None, None)


def test_key_padding_mask_excludes_padded_queries_too():
    pm = torch.tensor([[True, True, False]])
    mask = key_padding_to_attn_mask(pm)
    assert mask.shape == (1, 1, 3, 3)
    assert mask[0, 0, 2].any().item() is False and mask[0, 0, :, 2].any().item() is False
    with pytest.raises(ValueError, match="bool"):
        key_padding_to_attn_mask(pm.float())


def test_support_marginals_are_uniform_over_valid_tokens():
    mask = key_padding_to_attn_mask(torch.tensor([[True, True, True, False], [False] * 4]))
    supp = support(mask, 4, 4, dtype=torch.float64, device=torch.device("cpu"))
    assert math.isclose(supp.log_a[0, 0, 0].item(), -math.log(3))
    assert torch.isfinite(supp.log_a).all()  # an all-padding sequence keeps finite marginals
    assert (supp.row_bias[1] == 0).all()  # its rows are opened, never all -inf
