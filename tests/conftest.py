"""Shared test fixtures: deterministic seeds, fp64 helpers and the shared data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real data sets: $ASAP_DATA_DIR, else ../shared/data beside the repo; skip if absent."""
    root = Path(os.environ.get("ASAP_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"shared data directory not found at {root}")
    return root


def rand_qkv(b=2, h=3, n=6, m=None, d=4, dv=None, dtype=torch.float64, requires_grad=False, scale=1.0):
    m = n if m is None else m
    dv = d if dv is None else dv
    q = (scale * torch.randn(b, h, n, d, dtype=dtype)).requires_grad_(requires_grad)
    k = (scale * torch.randn(b, h, m, d, dtype=dtype)).requires_grad_(requires_grad)
    v = torch.randn(b, h, m, dv, dtype=dtype).requires_grad_(requires_grad)
    return q, k, v


def padding_mask(lengths, n):
    """(b, 1, n, n) self-attention mask from per-sequence lengths."""
    valid = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return valid[:, None, :, None] & valid[:, None, None, :]
