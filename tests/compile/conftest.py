"""Small Sinkhorn models and calibration batches for the compile tests."""

from __future__ import annotations

import pytest
import torch

from asap.attention.module import AttentionConfig
from asap.models import TextClassifier, TextClassifierConfig


def tiny_text_config(*, n_iters: int = 5, depth: int = 2, eps: float = 1.0) -> TextClassifierConfig:
    return TextClassifierConfig(
        vocab_size=40, num_classes=3, max_length=12, dim=16, depth=depth, num_heads=2, mlp_ratio=2.0,
        attention=AttentionConfig("sinkhorn", {"n_iters": n_iters, "eps": eps}),
    )  # fmt: skip


def make_batches(num_batches: int, *, batch_size: int = 6, n: int = 12, vocab: int = 40, seed: int = 0):
    """Collated-style batches with padding (at least 3 real tokens) and labels the compile stage must ignore."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        ids = torch.randint(1, vocab, (batch_size, n), generator=gen)
        lengths = torch.randint(3, n + 1, (batch_size,), generator=gen)
        padding_mask = torch.arange(n)[None, :] < lengths[:, None]
        labels = torch.randint(0, 3, (batch_size,), generator=gen)
        batches.append({"input_ids": ids, "padding_mask": padding_mask, "labels": labels})
    return batches


@pytest.fixture
def teacher() -> TextClassifier:
    torch.manual_seed(0)
    model = TextClassifier(tiny_text_config())
    # Larger q/k weights than the default init, so attention is far from uniform and the fit is not trivial.
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
    return model.eval()


@pytest.fixture
def batches():
    return make_batches(4)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one intra-op thread avoids oversubscribing a shared CPU (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
