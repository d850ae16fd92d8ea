from fractions import Fraction

import pytest
import torch

from asap.data import stratified_head, stratified_split, train_val_split


@pytest.mark.parametrize("num, fraction", [(10, 0.2), (101, 0.1), (7, 0.5), (1000, 0.05)])
def test_train_val_split_is_a_partition_of_the_right_size(num, fraction):
    train, val = train_val_split(num, val_fraction=fraction, seed=3)
    assert train.dtype == val.dtype == torch.int64
    assert len(set(train.tolist()) & set(val.tolist())) == 0
    assert sorted(train.tolist() + val.tolist()) == list(range(num))
    assert val.numel() == round(num * fraction)


def test_train_val_split_is_deterministic_and_seed_dependent():
    first = train_val_split(500, val_fraction=0.2, seed=7)
    again = train_val_split(500, val_fraction=0.2, seed=7)
    other = train_val_split(500, val_fraction=0.2, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other[1])


def test_train_val_split_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    train_val_split(100, val_fraction=0.3, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_sets_keep_one_item_on_each_side():
    train, val = train_val_split(2, val_fraction=0.01, seed=0)
    assert train.numel() == 1 and val.numel() == 1
    train, val = train_val_split(5, val_fraction=0.0, seed=0)
    assert train.tolist() == [0, 1, 2, 3, 4] and val.numel() == 0


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_bad_fraction_is_refused(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(10, val_fraction=fraction, seed=0)


def test_stratified_split_keeps_each_class_share():
    labels = torch.tensor([0] * 50 + [1] * 31 + [2] * 9)[torch.randperm(90, generator=torch.Generator().manual_seed(0))]
    train, test = stratified_split(labels, test_fraction=0.2, seed=5)
    assert sorted(train.tolist() + test.tolist()) == list(range(90))
    for c, n_c in ((0, 50), (1, 31), (2, 9)):
        assert int((labels[test] == c).sum()) == round(n_c * 0.2)
    again = stratified_split(labels, test_fraction=0.2, seed=5)
    assert torch.equal(test, again[1])


def _largest_remainder_oracle(counts, limit):
    """Quota per class by exact rational arithmetic (an independent implementation)."""
    total = sum(counts)
    exact = [Fraction(c * limit, total) for c in counts]
    quotas = [int(q) for q in exact]
    by_remainder = sorted(range(len(counts)), key=lambda c: (-(exact[c] - quotas[c]), c))
    for c in by_remainder[: limit - sum(quotas)]:
        quotas[c] += 1
    return quotas


@pytest.mark.parametrize("limit", [1, 2, 5, 17, 30, 59])
def test_stratified_head_quotas_and_order(limit):
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([0] * 25 + [1] * 20 + [2] * 15)[torch.randperm(60, generator=generator)]
    index = stratified_head(labels, limit)
    assert index.numel() == limit
    assert torch.equal(index, index.sort().values)
    quotas = _largest_remainder_oracle([25, 20, 15], limit)
    for c in range(3):
        members = torch.nonzero(labels == c).flatten().tolist()
        chosen = [i for i in index.tolist() if labels[i] == c]
        assert chosen == members[: quotas[c]]  # the first items of the class, in file order


def test_stratified_head_on_class_sorted_file_keeps_both_classes():
    labels = torch.tensor([0] * 100 + [1] * 100)  # as IMDb: all negatives first
    index = stratified_head(labels, 10)
    assert torch.bincount(labels[index]).tolist() == [5, 5]
    assert set(stratified_head(labels, 10).tolist()) <= set(stratified_head(labels, 20).tolist())


def test_stratified_head_limits():
    labels = torch.tensor([0, 1, 1])
    assert stratified_head(labels, 10).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="limit"):
        stratified_head(labels, 0)
