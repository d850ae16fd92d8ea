"""Samplers and schedule: the deterministic pieces that make resume and data parallelism exact."""

from __future__ import annotations

import math

import pytest

from asap.train.data import EpochBatchSampler, shard_batches
from asap.train.schedule import warmup_cosine


def batches(**kwargs) -> list[list[int]]:
    return list(EpochBatchSampler(**{"num_samples": 103, "batch_size": 8, "seed": 3, "epoch": 1, **kwargs}))


def test_epoch_is_a_seeded_permutation_without_the_incomplete_batch():
    full = batches()
    assert len(full) == 103 // 8 == len(EpochBatchSampler(103, batch_size=8, seed=3, epoch=1))
    flat = [i for b in full for i in b]
    assert len(set(flat)) == len(flat) == 96 and set(flat) <= set(range(103))
    assert full == batches()  # same (seed, epoch): same order
    assert full != batches(epoch=2) and full != batches(seed=4)


def test_ranks_split_each_global_batch_into_contiguous_shares():
    full = batches()
    shares = [batches(rank=r, world_size=4) for r in range(4)]
    for step, global_batch in enumerate(full):
        assert [i for r in range(4) for i in shares[r][step]] == global_batch


def test_skipping_done_batches_resumes_the_same_order():
    assert batches(start_batch=5) == batches()[5:]
    assert len(EpochBatchSampler(103, batch_size=8, seed=3, epoch=1, start_batch=5)) == 12 - 5 + 0


def test_batch_must_split_evenly_across_processes():
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        EpochBatchSampler(10, batch_size=6, seed=0, epoch=0, world_size=4)


def test_evaluation_shards_cover_every_item_once():
    shards = [shard_batches(11, batch_size=2, rank=r, world_size=3) for r in range(3)]
    seen = sorted(i for shard in shards for b in shard for i in b)
    assert seen == list(range(11))


def test_warmup_then_cosine():
    lr = [warmup_cosine(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(21)]
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lr[4] == 1.0 and math.isclose(lr[20], 0.1)
    assert math.isclose(lr[12], 0.1 + 0.9 * 0.5)  # half way through the decay
    assert all(a >= b for a, b in zip(lr[4:], lr[5:]))
