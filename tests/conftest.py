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


def compile_without_interpreter(tmp_path, code: str) -> str:
    """Run ``code`` in a fresh Python without ``TRITON_INTERPRET`` (Triton compiles for real, cache in ``tmp_path``).

    For the ahead-of-time GPU compile tests: skips where triton has no NVIDIA backend; returns the last
    line ``code`` printed.
    """
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton has no NVIDIA backend in this install")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip().splitlines()[-1]
